"""Commands that train: ``lmforge pretrain`` and ``lmforge demo``."""

from __future__ import annotations

from pathlib import Path

from ..errors import LMForgeError
from ..pipeline.demo import run_demo
from ..pipeline.pretraining import DataSection, ModelSection, ObjectiveChoice, TokenizerSection
from ..pipeline.pretraining import pretrain as pretrain_pipeline
from ..training import TrainConfig


def pretrain(
    *,
    model: ModelSection = ModelSection(),  # noqa: B008 (a frozen default: the CLI copies it)
    tokenizer: TokenizerSection = TokenizerSection(),  # noqa: B008
    data: DataSection = DataSection(),  # noqa: B008
    train: TrainConfig = TrainConfig(),  # noqa: B008
    objective: ObjectiveChoice = "auto",
    out: Path = Path("runs/pretrain"),
    resume: bool = False,
    overwrite: bool = False,
    nproc: int = 1,
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
        overwrite: replace what --out holds, as a whole: the new output is written beside it and swapped in at the end (without it, an occupied --out is an error and nothing is touched).
        nproc: train with N processes on this machine (a torchrun job: DDP or FSDP, see --train.strategy); each rank takes --train.batch_size sequences of the global batch.
    """
    result = pretrain_pipeline(
        model=model,
        tokenizer=tokenizer,
        data=data,
        train=train,
        objective=objective,
        out=out,
        resume=resume,
        overwrite=overwrite,
        log=lambda line: print(f"pretrain: {line}"),
    )
    state, last = result.state, result.last_eval
    summary = f"pretrain: step {state.step}/{train.max_steps}"
    if last:
        summary += f", validation loss {last['eval_loss']:.4f} (perplexity {last['eval_ppl']:.2f})"
    print(summary + f", {state.train_time_s:.0f} s of training")
    if state.interrupted:
        print(
            f"pretrain: {state.stopped_by}: checkpoint saved. Continue with the same command plus --resume (run: {out})"
        )
        return state.exit_code
    if state.stop_reason:
        print(f"pretrain: stopped: {state.stop_reason}")
    hint = f"  (try: lmforge generate --model {out} --prompt ...)" if result.model.config.arch != "encoder" else ""
    print(f"pretrain: run directory {out}{hint}")
    return 0


def demo(*, out: Path = Path("runs/demo"), minutes: float = 3.0, seed: int = 0, overwrite: bool = False) -> int:
    """Pretrain a small GPT on the documentation inside Python, in a few minutes on a CPU.

    No download and no data folder: builds the corpus from the Python installation's own
    documentation, trains a byte-level BPE tokenizer, pretrains a small decoder with a progress
    bar, prints samples before and after and the validation curve, and saves a run directory
    that ``lmforge generate --model OUT`` uses. An earlier demo run in OUT is replaced as a
    whole once the new one is done; a folder holding anything else is left alone (an error).

    Args:
        out: the run directory to write.
        minutes: the training time budget (about a minute of preparation comes on top).
        seed: random seed (weights, batches, samples).
        overwrite: replace what --out holds, as a whole: the new output is written beside it and swapped in at the end (without it, an occupied --out is an error and nothing is touched).
    """
    if not 0 < minutes <= 24 * 60:
        raise LMForgeError(f"--minutes must be in (0, 1440], got {minutes}", key="minutes")
    run_demo(out=out, minutes=minutes, seed=seed, overwrite=overwrite, log=print)
    return 0
