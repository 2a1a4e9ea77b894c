"""What ``lmforge finetune`` and ``lmforge eval`` run: data → task → model (+ PEFT) → the loop.

    finetune: base model (run dir or Hugging Face folder) ──task head──► model ──peft.apply──►
              Trainer(task objective, task batches, validation metric callback) ──► best weights
              ──► RUN_DIR: model.safetensors (full) or adapter.safetensors + adapter_config.json
                  and config.yaml with base_model (PEFT), tokenizer.json, metrics.jsonl
    eval:     lmforge.load(RUN_DIR) ──task from config.yaml──► metrics table, eval.json,
              predictions (JSONL)

Nothing here trains by itself: the loop is :class:`lmforge.training.Trainer` (one loop for
pretraining and fine-tuning), the adapters are :func:`lmforge.peft.apply`'s.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..errors import LMForgeError
from ..peft import get_method, method_names
from ..settings import dataclass_to_dict
from ..training import TrainConfig
from . import make_task
from .base import DEFAULT_MAX_LENGTH, Batches, EvalResult, Task, TaskEvaluation, TaskOptions
from .data import LABELS_FILE, Columns, SplitPlan, check_bad_rows, read_label_file

# "full" or a registered PEFT method: the command line's choices come from lmforge.peft's registry.
MethodName = Literal[("full", *method_names())]  # type: ignore[valid-type]
SUMMARY_FILE = "finetune.json"
EVAL_FILE = "eval.json"


@dataclass
class DataSpec:
    """Where the data is and how to read it (saved in the run config, so eval reads it alike)."""

    path: Path
    columns: dict[str, str] = field(default_factory=dict)
    labels: Path | None = None  # labels file (default: labels.txt in the data folder, if any)
    split_ratio: list[float] | None = None
    split_seed: int = 0
    skip_bad_rows: bool = False

    @property
    def plan(self) -> SplitPlan:
        return SplitPlan(self.split_ratio, seed=self.split_seed)

    def labels_file(self) -> Path | None:
        if self.labels is not None:
            return self.labels
        beside = self.path / LABELS_FILE if self.path.is_dir() else None
        return beside if beside is not None and beside.is_file() else None

    def to_dict(self) -> dict[str, Any]:
        """For the run config: paths made absolute, so eval finds the data from any directory."""
        values = dataclass_to_dict(self)
        values["path"] = str(self.path.resolve())
        if self.labels is not None:
            values["labels"] = str(self.labels.resolve())
        return values


def read_examples(task: Task, data: DataSpec, split: str, *, training: bool = False) -> list[Any]:
    """The examples of one split, bad rows reported (or skipped and counted)."""
    rows = data.plan.train_rows(data.path) if split == "train" else data.plan.rows(data.path, split)
    examples, bad = task.examples(rows, training=training)
    check_bad_rows(bad, skip=data.skip_bad_rows, split=split, used=len(examples))
    if not examples:
        raise LMForgeError(f"the {split} split has no usable examples", file=data.path)
    return examples


def base_tokenizer(model_path: str | Path) -> Any:
    """The tokenizer of a run directory or Hugging Face folder (without loading the model)."""
    from ..files import TOKENIZER_FILE
    from ..interop.hf import is_hf_folder, load_hf_tokenizer
    from ..tokenizers import Tokenizer

    path = Path(model_path)
    if not path.is_dir():
        raise LMForgeError(
            "model folder not found (a run directory or a Hugging Face folder)", file=path, key="model"
        )
    if is_hf_folder(path):
        tokenizer = load_hf_tokenizer(path)
    else:
        tokenizer = Tokenizer.from_file(path / TOKENIZER_FILE) if (path / TOKENIZER_FILE).is_file() else None
    if tokenizer is None:
        raise LMForgeError("the model folder has no tokenizer (tokenizer.json)", file=path, key="model")
    return tokenizer


def load_base(model_path: str | Path, task: Task) -> tuple[Any, Any]:
    """The base model with the task's head (a new head starts fresh) and its tokenizer.

    A Hugging Face folder is read with that head (BERT's pooler goes into a classification
    head); an lmforge run directory keeps its weights and gets the head (a pretrained LM head is
    kept for the generation tasks).
    """
    from ..interop.hf import is_hf_folder, load_hf_model, load_hf_tokenizer
    from ..runs import BASE_MODEL_KEY, load, transplant

    path = Path(model_path)
    if not path.is_dir():
        raise LMForgeError(
            "model folder not found (a run directory or a Hugging Face folder)", file=path, key="model"
        )
    if is_hf_folder(path):
        tokenizer = load_hf_tokenizer(path)
        model = load_hf_model(path)
        task.check_arch(model.config.arch)
        changes = task.model_changes(model.config.arch)
        if (
            changes["head"] != model.config.head
            or changes.get("num_labels", model.config.num_labels) != model.config.num_labels
        ):
            model = load_hf_model(path, head=changes["head"], num_labels=changes.get("num_labels"))
    else:
        run = load(path)
        if run.config.get(BASE_MODEL_KEY) is not None:
            raise LMForgeError(
                "this run holds an adapter: merge it into its base first (lmforge merge), then fine-tune that",
                file=path,
                key="model",
            )
        model, tokenizer = run.model, run.tokenizer
        task.check_arch(model.config.arch)
        changes = task.model_changes(model.config.arch)
    if tokenizer is None:
        raise LMForgeError("the model folder has no tokenizer (tokenizer.json)", file=path, key="model")
    if task.options.dropout is not None:
        changes.update(dropout=task.options.dropout, attn_dropout=task.options.dropout)
    config = model.config
    if any(getattr(config, key) != value for key, value in changes.items()):
        model = transplant(model, config.replace(**changes))
    check_lengths(model.config, task.options, path)
    if config.vocab_size < tokenizer.vocab_size:
        raise LMForgeError(
            f"the tokenizer has {tokenizer.vocab_size} tokens, the model only {config.vocab_size}", file=path
        )
    return model, tokenizer


def check_lengths(config: Any, options: TaskOptions, where: Path) -> None:
    """A model with a position table cannot read past ``max_seq_len``: an unset max_length
    becomes the shorter of 128 and that, a longer one given is refused before training."""
    table = config.position in ("learned", "sinusoidal")
    if options.max_length is None:
        options.max_length = min(DEFAULT_MAX_LENGTH, config.max_seq_len) if table else DEFAULT_MAX_LENGTH
    if table and options.max_length > config.max_seq_len:
        raise LMForgeError(
            f"max_length {options.max_length} is longer than the model's position table "
            f"(max_seq_len {config.max_seq_len}): lower --options.max_length",
            file=where,
            key="options.max_length",
        )


def sized(train: TrainConfig, *, batches: int, epochs: float | None) -> TrainConfig:
    """``train`` with max_steps derived from ``epochs`` over ``batches`` batches per epoch."""
    if epochs is None:
        return train
    if epochs <= 0:
        raise LMForgeError(f"--epochs must be positive, got {epochs}", key="epochs")
    steps = max(1, math.ceil(epochs * batches / train.grad_accum))
    return dataclasses.replace(train, max_steps=steps, warmup_steps=min(train.warmup_steps, steps))


@dataclass
class FinetuneResult:
    """What :func:`finetune_run` returns: the summary (also in finetune.json) and the trained pieces."""

    summary: dict[str, Any]
    model: Any = None  # the fine-tuned model (the kept weights), None when interrupted
    tokenizer: Any = None
    task: Task | None = None


def finetune_run(
    *,
    model: str,
    data: DataSpec,
    task_name: str,
    method: str,
    peft: dict[str, Any] | None,
    options: TaskOptions,
    train: TrainConfig,
    epochs: float | None,
    out: Path,
    resume: bool = False,
) -> FinetuneResult:
    """Fine-tune ``model`` on ``data`` for the task (see the module docstring for the run directory)."""
    from .. import peft as peft_lib
    from ..files import BASE_MODEL_KEY, WEIGHTS_FILE, save_weights
    from ..training import Trainer, latest_checkpoint, seed_everything

    if not resume and latest_checkpoint(out) is not None:
        raise LMForgeError(
            "this run directory already holds a run: add --resume to continue it, or choose another --out",
            file=out,
        )
    if method == "full" and peft:
        raise LMForgeError("PEFT options were given (--peft.*) but --method is full", key="peft")
    seed_everything(train.seed)
    start = time.perf_counter()
    # The data comes first: a classification head's size is the number of labels found there.
    task = make_task(task_name, base_tokenizer(model), options=options, columns=Columns(dict(data.columns)))
    labels_file = data.labels_file()
    if labels_file is not None and hasattr(task, "set_labels"):
        task.set_labels(read_label_file(labels_file), f"{labels_file}")
    train_examples = read_examples(task, data, "train", training=True)
    task.fit(train_examples)
    val_examples = read_examples(task, data, "validation")
    net, tokenizer = load_base(model, task)
    task.tokenizer = tokenizer
    print(f"finetune: {task.describe()}")
    print(
        f"finetune: data {data.path}: {len(train_examples):,} training / {len(val_examples):,} validation examples"
        + "".join(f"; {split} from {where}" for split, where in data.plan.describe(_files(data)).items())
    )

    train_features = task.encode(train_examples)
    batches = Batches(train_features, task.collate, batch_size=train.batch_size, seed=train.seed)
    train = sized(train, batches=len(batches), epochs=epochs)
    val_batches = Batches(task.encode(val_examples), task.collate, batch_size=train.batch_size, shuffle=False)

    if method != "full":
        net = peft_lib.apply(net, method, tokenizer=tokenizer, **dict(peft or {}))
    report = peft_lib.trainable_report(net)
    print(
        f"finetune: {net.config.arch} with {report['total'] / 1e6:.2f}M parameters from {model}, "
        f"method {method}: {peft_lib.format_report(report)}"
    )
    print(
        f"finetune: {train.max_steps:,} steps of {train.batch_size}×{train.grad_accum} examples "
        f"({train.max_steps * train.batch_size * train.grad_accum / max(len(train_features), 1):.2f} epochs), "
        f"validation {task.main_metric} every {train.eval_every or train.max_steps} steps"
    )

    # The method's record says whether the best validation weights are kept (AdaLoRA keeps its last:
    # the final rank allocation is part of the method).
    keep_best = method == "full" or get_method(method).keep_best
    evaluation = TaskEvaluation(task, val_examples, batch_size=max(train.batch_size, 32), keep_best=keep_best)
    run_config: dict[str, Any] = {
        "task": task_name,
        "task_state": task.state,
        "options": dataclass_to_dict(options),
        "data": data.to_dict(),
        "method": method,
        "peft": dict(peft or {}),
        "epochs": epochs,
        "source_model": str(Path(model).resolve()),
    }
    if method != "full":
        run_config[BASE_MODEL_KEY] = str(Path(model).resolve())
    trainer = Trainer(
        net,
        task,
        batches,
        config=train,
        eval_data=val_batches,
        callbacks=[evaluation],
        run_dir=out,
        tokenizer=tokenizer,
        run_config=run_config,
        num_targets=task.num_targets,
    )
    if resume:
        step = trainer.resume()
        print(f"finetune: resumed {out} at step {step}")
    state = trainer.fit()
    if state.interrupted:
        return FinetuneResult({"interrupted": True, "step": state.step})

    restored = evaluation.restore_best(net)
    if method == "full":
        save_weights(net, out / WEIGHTS_FILE)
    else:
        peft_lib.save_adapter(net, out)
        (out / WEIGHTS_FILE).unlink(missing_ok=True)  # the loop's full-weights link: not this run's output
    summary = {
        "task": task_name,
        "method": method,
        "model": str(model),
        "steps": state.step,
        "best_step": evaluation.best_step if restored else state.step,
        "kept": "best" if restored else "last",
        "validation": evaluation.best_metrics
        if restored
        else (evaluation.history[-1] if evaluation.history else {}),
        "main_metric": task.main_metric,
        "trainable_parameters": int(report["trainable"]),
        "total_parameters": int(report["total"]),
        "trainable_percent": report["percent"],
        "train_examples": len(train_features),
        "train_time_s": round(state.train_time_s, 1),
        "eval_time_s": round(state.eval_time_s, 1),
        "wall_time_s": round(time.perf_counter() - start, 1),
        "stop_reason": state.stop_reason,
    }
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    net.eval()
    return FinetuneResult(summary, net, tokenizer, task)


def _files(data: DataSpec) -> dict[str, list[Path]]:
    from .data import data_files

    return data_files(data.path)


# ---- evaluation of a trained run ----------------------------------------------------------------


def eval_run(
    *,
    run_dir: Path,
    data: Path | None,
    split: str,
    columns: dict[str, str] | None,
    skip_bad_rows: bool,
    batch_size: int,
    num_beams: int | None,
    max_examples: int | None,
    device: str | None = None,
) -> tuple[Task, EvalResult]:
    """Load a fine-tuned run and evaluate it on one split."""
    from ..runs import load
    from ..settings import dataclass_from_dict

    run = load(run_dir, device=device)
    config = run.config
    task_name = config.get("task")
    if not isinstance(task_name, str):
        raise LMForgeError(
            "this run was not fine-tuned on a task (config.yaml has no 'task')", file=run_dir, key="model"
        )
    options = dataclass_from_dict(TaskOptions, dict(config.get("options") or {}), prefix="options.")
    if num_beams is not None:
        options = dataclasses.replace(options, num_beams=num_beams)
    saved = dict(config.get("data") or {})
    spec = DataSpec(
        path=Path(data) if data is not None else Path(saved.get("path", ".")),
        columns=dict(columns if columns is not None else saved.get("columns") or {}),
        split_ratio=saved.get("split_ratio"),
        split_seed=int(saved.get("split_seed", 0)),
        skip_bad_rows=skip_bad_rows,
    )
    task = make_task(
        task_name,
        run.tokenizer,
        options=options,
        columns=Columns(spec.columns),
        state=config.get("task_state"),
    )
    examples = read_examples(task, spec, split)
    if max_examples is not None:
        examples = examples[:max_examples]
    result = task.evaluate(run.model, examples, batch_size=batch_size, final=True)
    return task, result


def format_table(metrics: dict[str, Any]) -> str:
    """The scalar metrics as a two-column table; the per-class report below when not too long."""
    scalars = {k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    width = max((len(k) for k in scalars), default=6)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ----------"]
    for key, value in scalars.items():
        shown = f"{value:,}" if isinstance(value, int) else f"{value:.4f}"
        lines.append(f"{key:<{width}}  {shown}")
    report = metrics.get("per_class")
    if isinstance(report, dict) and 0 < len(report) <= 20:
        name_width = max(len(n) for n in report)
        lines += ["", f"{'class':<{name_width}}  precision  recall      f1  support"]
        for name, row in report.items():
            lines.append(
                f"{name:<{name_width}}  {row['precision']:9.4f}  {row['recall']:6.4f}  {row['f1']:6.4f}  {row['support']:7d}"
            )
    return "\n".join(lines)


def write_predictions(path: Path, predictions: Sequence[dict[str, Any]]) -> None:
    """One JSON object per line, in example order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for record in predictions:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
