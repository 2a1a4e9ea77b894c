"""``lmforge compare``: fine-tuning methods side by side on one model and one data set."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..pipeline.compare import Comparison, peft_sections
from ..pipeline.compare import compare as run_comparison
from ..pipeline.finetuning import DataSpec
from ..training import TrainConfig

DEFAULT_TRAIN = TrainConfig(
    max_steps=300, batch_size=32, lr=1e-3, warmup_steps=30, schedule="linear", min_lr=0.0, weight_decay=0.01,
    beta2=0.999, eval_every=0, eval_batches=None, save_every=0, progress=False,
)
# Learning rates that suit each kind of method on a small pretrained encoder (the rest: --train.lr):
# full fine-tuning moves every weight, soft prompts and prefixes need large steps.
DEFAULT_LR = {"full": 5e-5, "prefix": 1e-2, "prompt": 3e-2, "ptuning": 1e-2}


def compare(
    *,
    model: str,
    data: Path,
    methods: list[str],
    task: str = "classification",
    seeds: list[int] | None = None,
    budget_minutes: float | None = None,
    lr: dict[str, Any] | None = None,
    peft: dict[str, Any] | None = None,
    options: dict[str, Any] | None = None,
    train: TrainConfig = DEFAULT_TRAIN,
    epochs: float | None = None,
    out: Path = Path("runs/compare"),
) -> int:
    """Compare fine-tuning methods: each through the same pipeline, budget and seeds; one report.

    Every method fine-tunes the same base on the same data with the same task options, training
    settings, seeds and share of the time budget (each run in its own process). The report
    (OUT/report.md, report.csv, runs.csv, compare.png) gives the validation score (mean ± spread
    over seeds), trainable parameters and share, size on disk, peak memory, wall time and
    tokens/s. Run it again to go on: a finished method is not run again.

    Args:
        model: the base: a run directory, a Hugging Face model folder or a GGUF file.
        data: the data folder (train / validation files, labels.txt for classification).
        methods: full and PEFT methods, e.g. full,lora,adalora,adapter,ia3,bitfit,prefix,prompt.
        task: the task (classification, sft, translation, summarization, qa, tagging).
        seeds: training seeds, every method runs with each (default: 0).
        budget_minutes: the whole comparison's time, split evenly over methods × seeds; each run
            trains for 3/4 of its share (the rest is for starting, loading and evaluating; on a
            busy machine these can take longer, and the report shows the wall time).
        lr: learning rate per method, e.g. --lr.lora 1e-3 (default: full 5e-5, prefix 1e-2,
            prompt 3e-2, ptuning 1e-2, others --train.lr).
        peft: options per method, e.g. --peft.lora.r 8 (or a `peft: {lora: {r: 8}}` section).
        options: the task's options, e.g. --options.max_length 64.
        train: the loop's settings, shared by every method.
        epochs: passes over the training data (sets max_steps).
        out: the comparison's folder.
    """
    rates = {m: v for m, v in DEFAULT_LR.items() if m in methods} | dict(lr or {})
    comparison = Comparison(
        model=Path(model), data=DataSpec(path=data), methods=list(methods), task_name=task,
        options=dict(options or {}), train=train, epochs=epochs, seeds=list(seeds or [0]),
        budget_minutes=budget_minutes, lr=rates, peft=peft_sections(peft),
    )
    result = run_comparison(comparison, out=out, log=lambda line: print(f"compare: {line}"))
    if result.skipped:
        print(f"compare: {len(result.skipped)} finished runs reused: {', '.join(result.skipped)}")
    for path in result.files:
        print(f"compare: wrote {path}")
    return 1 if result.failures else 0
