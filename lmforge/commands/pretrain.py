"""Commands that train: ``lmforge pretrain`` and ``lmforge demo``."""

from __future__ import annotations

from pathlib import Path

from ..training import TrainConfig
from ..training.recipe import DataSection, ModelSection, ObjectiveChoice, TokenizerSection


def pretrain(
    *,
    model: ModelSection = ModelSection(),  # noqa: B008 (a frozen default: the CLI copies it)
    tokenizer: TokenizerSection = TokenizerSection(),  # noqa: B008
    data: DataSection = DataSection(),  # noqa: B008
    train: TrainConfig = TrainConfig(),  # noqa: B008
    objective: ObjectiveChoice = "auto",
    out: Path = Path("runs/pretrain"),
    resume: bool = False,
) -> int:
    """Pretrain a model from raw text: tokenizer, token shards, the training loop, a run directory.

    A recipe (``--config configs/pretrain/NAME.yaml``) has sections model, tokenizer, data and
    train; any field can be overridden, e.g. ``--train.lr 3e-4 --model.num_layers 6
    --data.path FILE``. The objective follows the architecture: causal LM (decoder), masked LM
    (encoder), span corruption (encoder-decoder). Ctrl-C saves a checkpoint; run the same command
    with ``--resume`` to continue exactly where it stopped.

    Args:
        model: the model: ``preset`` plus any ModelConfig field (vocab_size comes from the tokenizer).
        tokenizer: kind (char, bpe, wordpiece) and vocab_size, or path to a tokenizer.json.
        data: path of the text (file, JSONL, folder; none = the Python documentation), seq_len, ...
        train: the loop: max_steps, batch_size, lr, schedule, precision, eval_every, ...
        objective: auto (from the architecture), causal_lm, masked_lm or span_corruption.
        out: the run directory (config.yaml, tokenizer.json, model.safetensors, checkpoints, ...).
        resume: continue the run in --out from its newest checkpoint.
    """
    from ..training import Trainer, seed_everything
    from ..training.recipe import build_pretraining

    seed_everything(train.seed)
    run = build_pretraining(
        model=model,
        tokenizer=tokenizer,
        data=data,
        train=train,
        objective=objective,
        run_dir=out,
        resume=resume,
        progress=train.progress,
    )
    shards = run.shards
    print(
        f"pretrain: {run.model.config.arch} with {run.model.num_params() / 1e6:.2f}M parameters, "
        f"objective {run.objective_name}, tokenizer {run.tokenizer.kind} ({run.tokenizer.vocab_size} tokens), "
        f"{shards['train'].num_tokens:,} training / {shards['validation'].num_tokens:,} validation tokens"
    )
    trainer = Trainer(
        run.model,
        run.objective,
        run.train_batches,
        config=train,
        eval_data=run.eval_batches,
        run_dir=out,
        tokenizer=run.tokenizer,
        run_config=run.run_config,
    )
    if resume:
        step = trainer.resume()
        print(f"pretrain: resumed {out} at step {step}")
    state = trainer.fit()
    last = state.evals[-1] if state.evals else {}
    summary = f"pretrain: step {state.step}/{train.max_steps}"
    if last:
        summary += f", validation loss {last['eval_loss']:.4f} (perplexity {last['eval_ppl']:.2f})"
    print(summary + f", {state.train_time_s:.0f} s of training")
    if state.interrupted:
        print(
            f"pretrain: interrupted; checkpoint saved. Continue with the same command plus --resume (run: {out})"
        )
        return 130
    if state.stop_reason:
        print(f"pretrain: stopped: {state.stop_reason}")
    hint = (
        f"  (try: lmforge generate --model {out} --prompt ...)" if run.model.config.arch != "encoder" else ""
    )
    print(f"pretrain: run directory {out}{hint}")
    return 0


def demo(*, out: Path = Path("runs/demo"), minutes: float = 3.0, seed: int = 0) -> int:
    """Pretrain a small GPT on the documentation inside Python, in a few minutes on a CPU.

    No download and no data folder: builds the corpus from the Python installation's own
    documentation, trains a byte-level BPE tokenizer, pretrains a small decoder with a progress
    bar, prints samples before and after and the validation curve, and saves a run directory
    that ``lmforge generate --model OUT`` uses. An earlier demo run in OUT is replaced.

    Args:
        out: the run directory to write.
        minutes: the training time budget (about a minute of preparation comes on top).
        seed: random seed (weights, batches, samples).
    """
    from ..demo import run_demo
    from ..errors import LMForgeError

    if not 0 < minutes <= 24 * 60:
        raise LMForgeError(f"--minutes must be in (0, 1440], got {minutes}", key="minutes")
    run_demo(out=out, minutes=minutes, seed=seed)
    return 0
