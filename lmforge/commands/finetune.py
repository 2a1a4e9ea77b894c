"""``lmforge finetune``: a model fine-tuned on a task from data files, fully or with any PEFT method."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from ..pipeline.finetuning import DataSpec, MethodName, finetune_run
from ..tasks import TASKS, TaskName
from ..tasks.data import Columns
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
    options: dict[str, Any] | None = None,
    train: TrainConfig = DEFAULT_TRAIN,
    epochs: float | None = None,
    out: Path = Path("runs/finetune"),
    resume: bool = False,
    overwrite: bool = False,
    nproc: int = 1,
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
        options: the task's own options, e.g. --options.max_length 64 --options.pooling mean (each
            task's options are listed below).
        train: the loop: lr, batch_size, max_steps, eval_every, precision, schedule, ...
        epochs: train for this many passes over the training data (sets max_steps).
        out: the run directory.
        resume: continue the run in --out from its newest checkpoint.
        overwrite: replace what --out holds, as a whole: the new output is written beside it and swapped in at the end (without it, an occupied --out is an error and nothing is touched).
        nproc: train with N processes on this machine (a torchrun job: DDP or FSDP, see --train.strategy); each rank takes --train.batch_size sequences of the global batch.
    """
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
        overwrite=overwrite,
        log=lambda line: print(f"finetune: {line}"),
    )
    summary = result.summary
    if result.interrupted:
        print(
            f"finetune: {summary['stopped_by']} at step {summary['step']}: checkpoint saved; "
            "continue with the same command plus --resume"
        )
        return result.state.exit_code if result.state else 130
    value = summary["validation"].get(summary["main_metric"])
    shown = f"{value:.4f}" if isinstance(value, float) and not math.isnan(value) else "n/a"
    print(
        f"finetune: validation {summary['main_metric']} {shown} at step {summary['best_step']} "
        f"({summary['kept']} weights kept), {summary['train_time_s']:.0f} s of training"
    )
    print(f"finetune: run directory {out}  (try: lmforge eval --model {out} --split test)")
    return 0


def _columns(columns: dict[str, Any] | None) -> dict[str, str]:
    return Columns({k: v for k, v in (columns or {}).items()}).mapping


def task_options_help() -> str:
    """The options of each task, for ``lmforge finetune --help``."""
    lines = ["task options (--options.KEY VALUE, or an `options:` section):"]
    for name, cls in TASKS.items():
        fields = ", ".join(f.name for f in dataclasses.fields(cls.Options))
        lines.append(f"  {name}: {fields}")
    return "\n".join(lines)


finetune.cli_epilog = task_options_help  # type: ignore[attr-defined]
# --epochs and --train.max_steps both size the run: a flag beats the recipe file either way.
finetune.cli_conflicts = [("epochs", "train.max_steps")]  # type: ignore[attr-defined]
