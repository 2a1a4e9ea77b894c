"""``lmforge finetune`` (full or any PEFT method, the one loop) and ``lmforge eval`` (a trained run
on a split: a table, eval.json, predictions)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..errors import LMForgeError
from ..tasks import TaskName
from ..tasks.base import TaskOptions
from ..tasks.finetuning import MethodName
from ..training import TrainConfig

DEFAULT_TRAIN = TrainConfig(
    max_steps=1000,
    batch_size=32,
    lr=5e-5,
    warmup_steps=100,
    weight_decay=0.01,
    beta2=0.999,
    eval_every=250,
    eval_batches=None,
    save_every=0,
)


def finetune(
    *,
    model: str,
    data: Path,
    task: TaskName,
    method: MethodName = "full",
    peft: dict[str, Any] | None = None,
    columns: dict[str, Any] | None = None,
    labels: Path | None = None,
    split_ratio: list[float] | None = None,
    split_seed: int = 0,
    skip_bad_rows: bool = False,
    options: TaskOptions = TaskOptions(),  # noqa: B008 (a frozen default: the CLI copies it)
    train: TrainConfig = DEFAULT_TRAIN,
    epochs: float | None = None,
    out: Path = Path("runs/finetune"),
    resume: bool = False,
) -> int:
    """Fine-tune a model on a task from your own data files, fully or with a PEFT method.

    The data folder holds train / validation / test files (.jsonl, .csv, .tsv; shards such as
    train-00000-of-00002.jsonl are read in order) and, for classification, labels.txt. The best
    checkpoint by the task's validation metric is kept: RUN_DIR/model.safetensors after full
    fine-tuning, adapter.safetensors + adapter_config.json (task head included) with a PEFT
    method; lmforge.load(RUN_DIR) and lmforge eval read either. Recipes: configs/finetune/.

    Args:
        model: the base model: an lmforge run directory or a Hugging Face model folder.
        data: the data folder (or a single file, split by --split_ratio).
        task: classification, sft, translation, summarization, qa or tagging.
        method: full, or a PEFT method (the choices are the methods registered in lmforge.peft).
        peft: options of the PEFT method, e.g. --peft.r 8 --peft.alpha 16 --peft.target_modules all-linear.
        columns: which column holds each field, e.g. --columns.text sentence --columns.label polarity.
        labels: a file of label names, one per line (default: labels.txt in the data folder, else
            the labels found in the training rows, sorted).
        split_ratio: train,validation[,test] fractions for data not split into files (or the
            validation share carved from a lone train file), e.g. 0.8,0.1,0.1.
        split_seed: seed of the ratio split.
        skip_bad_rows: skip rows that cannot be used (reported with a count) instead of stopping.
        options: task options: max_length, pooling, oos_label, template, num_beams, stride, ...
        train: the loop: lr, batch_size, max_steps, eval_every, precision, schedule, ...
        epochs: train for this many passes over the training data (sets max_steps).
        out: the run directory.
        resume: continue the run in --out from its newest checkpoint.
    """
    from ..tasks.finetuning import DataSpec, finetune_run

    spec = DataSpec(
        path=data,
        columns=_columns(columns),
        labels=labels,
        split_ratio=split_ratio,
        split_seed=split_seed,
        skip_bad_rows=skip_bad_rows,
    )
    spec.plan  # noqa: B018 (checks the split ratio before any work)
    result = finetune_run(
        model=model,
        data=spec,
        task_name=task,
        method=method,
        peft=peft,
        options=options,
        train=train,
        epochs=epochs,
        out=out,
        resume=resume,
    )
    summary = result.summary
    if summary.get("interrupted"):
        print(
            f"finetune: interrupted at step {summary['step']}; continue with the same command plus --resume"
        )
        return 130
    value = summary["validation"].get(summary["main_metric"])
    shown = f"{value:.4f}" if isinstance(value, float) and not math.isnan(value) else "n/a"
    print(
        f"finetune: validation {summary['main_metric']} {shown} at step {summary['best_step']} "
        f"({summary['kept']} weights kept), {summary['train_time_s']:.0f} s of training"
    )
    print(f"finetune: run directory {out}  (try: lmforge eval --model {out} --split test)")
    return 0


def evaluate(
    *,
    model: Path,
    data: Path | None = None,
    split: str = "test",
    columns: dict[str, Any] | None = None,
    predictions: Path | None = None,
    output: Path | None = None,
    batch_size: int = 32,
    num_beams: int | None = None,
    max_examples: int | None = None,
    skip_bad_rows: bool = False,
    device: str = "cpu",
) -> int:
    """Evaluate a fine-tuned run on a split of its data: print a table, write eval.json.

    Args:
        model: the run directory written by lmforge finetune.
        data: the data folder (default: the one the run was trained on).
        split: train, validation or test.
        columns: column mapping (default: the run's).
        predictions: write one prediction per line (JSONL) to this file.
        output: where to write the metrics (default: RUN_DIR/eval.json).
        batch_size: examples per forward pass.
        num_beams: beams for generation tasks (default: the run's options.num_beams).
        max_examples: evaluate only the first N examples.
        skip_bad_rows: skip rows that cannot be used instead of stopping.
        device: cpu, cuda, ...
    """
    from ..tasks.finetuning import EVAL_FILE, eval_run, format_table, write_predictions

    if batch_size < 1:
        raise LMForgeError(f"--batch_size must be positive, got {batch_size}", key="batch_size")
    if max_examples is not None and max_examples < 1:
        raise LMForgeError(f"--max_examples must be positive, got {max_examples}", key="max_examples")
    task, result = eval_run(
        run_dir=model,
        data=data,
        split=split,
        columns=_columns(columns) if columns is not None else None,
        skip_bad_rows=skip_bad_rows,
        batch_size=batch_size,
        num_beams=num_beams,
        max_examples=max_examples,
        device=device,
    )
    print(f"eval: {task.describe()}, {split} split")
    print(format_table(result.metrics))
    target = output or model / EVAL_FILE
    record = {"model": str(model), "split": split, "task": task.name, "metrics": result.metrics}
    target.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"eval: metrics written to {target}")
    if predictions is not None:
        write_predictions(predictions, result.predictions)
        print(f"eval: {len(result.predictions):,} predictions written to {predictions}")
    return 0


def _columns(columns: dict[str, Any] | None) -> dict[str, str]:
    from ..tasks.data import Columns

    return Columns({k: v for k, v in (columns or {}).items()}).mapping
