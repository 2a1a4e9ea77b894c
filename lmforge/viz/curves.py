"""What a run folder recorded, drawn: training curves (``metrics.jsonl``, several runs overlaid, in
the manner of TensorBoard's scalars), AdaLoRA's rank allocation over time (``adalora_ranks.json``),
the confusion matrix of an evaluation (``eval-SPLIT.json`` of ``lmforge eval``) and the accuracy
matrix R of each continual-learning strategy (``results.json`` of ``lmforge continual``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from ..errors import LMForgeError
from .figures import new_figure, save_png

METRICS_FILE = "metrics.jsonl"
ADALORA_FILE = "adalora_ranks.json"
# evaluation bookkeeping (counts, times) and perplexity (exp of the loss drawn beside): not drawn
NOT_CURVES = {"eval_time_s", "eval_examples", "eval_labeled", "eval_batches", "eval_ppl"}
SUMMARY_FILE = "finetune.json"  # a fine-tuned run's summary: names its main metric
CONTINUAL_FILE = "results.json"  # lmforge continual's results: each strategy's accuracy matrix R


@dataclass
class RunRecord:
    """What one run folder holds for pictures."""

    path: Path
    steps: list[dict[str, Any]] = field(default_factory=list)  # training lines of metrics.jsonl
    evals: list[dict[str, Any]] = field(default_factory=list)  # evaluation lines (keys eval_*)
    adalora: dict[str, Any] | None = None
    evaluations: dict[str, dict[str, Any]] = field(default_factory=dict)  # split -> eval-SPLIT.json
    main_metric: str | None = None  # the task's main metric (from finetune.json), e.g. "accuracy"
    continual: list[dict[str, Any]] = field(default_factory=list)  # strategies of results.json

    @property
    def name(self) -> str:
        return self.path.name


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def read_run(path: str | Path) -> RunRecord:
    """The metrics, AdaLoRA history and evaluations of a run folder (torn JSON lines skipped).

    Raises:
        LMForgeError: not a folder, or a folder with none of those files.
    """
    path = Path(path)
    if not path.is_dir():
        raise LMForgeError("run directory not found", file=path)
    record = RunRecord(path)
    metrics = path / METRICS_FILE
    if metrics.is_file():
        for line in metrics.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line torn by a crash
            if not isinstance(row, dict) or "step" not in row:
                continue
            (record.evals if any(k.startswith("eval_") for k in row) else record.steps).append(row)
    if (path / SUMMARY_FILE).is_file():
        summary = json.loads((path / SUMMARY_FILE).read_text(encoding="utf-8"))
        record.main_metric = summary.get("main_metric") if isinstance(summary, dict) else None
    if (path / ADALORA_FILE).is_file():
        record.adalora = json.loads((path / ADALORA_FILE).read_text(encoding="utf-8"))
    for report in sorted(path.glob("eval-*.json")):
        value = json.loads(report.read_text(encoding="utf-8"))
        if isinstance(value, dict) and isinstance(value.get("metrics"), dict):
            record.evaluations[value.get("split") or report.stem.removeprefix("eval-")] = value
    if (path / CONTINUAL_FILE).is_file():
        value = json.loads((path / CONTINUAL_FILE).read_text(encoding="utf-8"))
        strategies = value.get("strategies") if isinstance(value, dict) else None
        record.continual = [r for r in strategies or [] if isinstance(r, dict) and r.get("rows")]
    if not (record.steps or record.evals or record.adalora or record.evaluations or record.continual):
        raise LMForgeError(
            f"nothing to draw: no {METRICS_FILE}, {ADALORA_FILE}, eval-*.json or {CONTINUAL_FILE} here", file=path
        )
    return record


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for row in rows:
        y = _number(row.get(key))
        if y is not None:
            xs.append(float(row["step"]))
            ys.append(y)
    return xs, ys


def curves_figure(runs: list[RunRecord]) -> Figure:
    """Four panels, every run overlaid: training and validation loss, the other validation
    metrics, the learning rate, and tokens per second."""
    figure = new_figure(11, 7.5)
    (loss, quality), (lr, speed) = figure.subplots(2, 2)
    colors = [f"C{i % 10}" for i in range(len(runs))]
    every_key = sorted({k for r in runs for e in r.evals for k in e if k.startswith("eval_")} - NOT_CURVES - {"eval_loss"})
    styles = ["-", "--", ":", "-."]
    for run, color in zip(runs, colors, strict=True):
        label = run.name if len(runs) > 1 else None
        loss.plot(*_series(run.steps, "loss"), color=color, lw=1.2, label=label or "training")
        xs, ys = _series(run.evals, "eval_loss")
        if xs:
            loss.plot(xs, ys, color=color, ls="--", marker="o", ms=3, label=f"{label} validation" if label else "validation")
        # several runs: each one's main metric (one line a run); one run: all its metrics
        main = f"eval_{run.main_metric}" if run.main_metric else None
        eval_keys = [main] if len(runs) > 1 and main in every_key else every_key
        for i, key in enumerate(eval_keys):
            xs, ys = _series(run.evals, key)
            if xs:
                name = key.removeprefix("eval_")
                quality.plot(xs, ys, color=color, ls=styles[i % len(styles)], marker="o", ms=3,
                             label=f"{label}: {name}" if label else name)
        lr.plot(*_series(run.steps, "lr"), color=color, label=label)
        speed.plot(*_series(run.steps, "tokens_per_s"), color=color, label=label)
    for axes, title in ((loss, "loss"), (quality, "validation metrics"), (lr, "learning rate"), (speed, "tokens / s")):
        axes.set_title(title, fontsize=10)
        axes.set_xlabel("step", fontsize=8)
        axes.tick_params(labelsize=8)
        axes.grid(alpha=0.3)
        if axes.lines:
            if any(not str(line.get_label()).startswith("_") for line in axes.lines):
                axes.legend(fontsize=7)
        else:
            axes.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=axes.transAxes, color="#888")
    figure.suptitle("training curves (metrics.jsonl)" + (f": {len(runs)} runs" if len(runs) > 1 else f": {runs[0].name}"), fontsize=11)
    figure.tight_layout()
    return figure


def adalora_figure(run: RunRecord) -> Figure:
    """AdaLoRA's rank of every adapted matrix (rows) at each recorded step (columns)."""
    assert run.adalora is not None
    history = run.adalora.get("history") or []
    final = run.adalora.get("final_ranks") or {}
    names = list(final) or sorted({n for h in history for n in h.get("ranks", {})})
    if not history and final:
        history = [{"step": "final", "ranks": final}]
    if not names or not history:
        raise LMForgeError("adalora_ranks.json holds no ranks", file=run.path / ADALORA_FILE)
    ranks = np.array([[h["ranks"].get(n, 0) for h in history] for n in names], dtype=float)
    figure = new_figure(min(2.5 + 0.25 * len(history), 14), min(1.5 + 0.22 * len(names), 16))
    axes = figure.subplots()
    image = axes.imshow(ranks, aspect="auto", cmap="viridis", vmin=0, vmax=max(run.adalora.get("init_r", ranks.max()), 1),
                        interpolation="nearest")
    axes.set_yticks(range(len(names)), [n.removeprefix("encoder.").removeprefix("decoder.") for n in names], fontsize=6)
    steps = [str(h["step"]) for h in history]
    every = max(1, len(steps) // 12)
    axes.set_xticks(range(0, len(steps), every), steps[::every], fontsize=7)
    axes.set_xlabel("step")
    figure.colorbar(image, ax=axes, label="rank")
    axes.set_title(
        f"AdaLoRA rank allocation of {run.name} (init r {run.adalora.get('init_r')}, target r {run.adalora.get('target_r')})",
        fontsize=9,
    )
    figure.tight_layout()
    return figure


def confusion_figure(run: RunRecord, split: str) -> Figure | None:
    """The confusion matrix of ``eval-SPLIT.json`` (rows: true class, columns: predicted), or None
    when that evaluation has none (not a classification run)."""
    metrics = run.evaluations[split]["metrics"]
    matrix = metrics.get("confusion_matrix")
    per_class = metrics.get("per_class")
    if not matrix:
        return None
    counts = np.array(matrix, dtype=float)
    names = list(per_class) if isinstance(per_class, dict) and len(per_class) == len(counts) else [str(i) for i in range(len(counts))]
    size = min(3 + 0.35 * len(names), 16)
    figure = new_figure(size + 1, size)
    axes = figure.subplots()
    image = axes.imshow(counts, cmap="Blues", interpolation="nearest")
    labeled = len(names) <= 40
    if labeled:
        axes.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
        axes.set_yticks(range(len(names)), names, fontsize=7)
    if len(names) <= 12:
        top = counts.max() or 1.0
        for i in range(len(names)):
            for j in range(len(names)):
                axes.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", fontsize=8,
                          color="white" if counts[i, j] > top / 2 else "black")
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    accuracy = _number(metrics.get("accuracy"))
    axes.set_title(f"{run.name}, {split} split" + (f": accuracy {accuracy:.2%}" if accuracy is not None else ""), fontsize=9)
    figure.colorbar(image, ax=axes, shrink=0.8)
    figure.tight_layout()
    return figure


def accuracy_matrix_figure(result: dict[str, Any]) -> Figure:
    """A continual-learning strategy's accuracy matrix R as a heatmap: row i after training task
    i (one row for joint training), column j the test task, in percent."""
    rows, tasks = result["rows"], result["tasks"]
    values = np.array([[100 * v if v is not None else np.nan for v in row] for row in rows], dtype=float)
    figure = new_figure(max(4.0, 0.6 * len(tasks) + 2), max(2.5, 0.6 * len(rows) + 1.5))
    axes = figure.subplots()
    image = axes.imshow(values, vmin=0, vmax=100, cmap="viridis", aspect="auto")
    axes.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right")
    axes.set_yticks(range(len(rows)), ["joint"] if len(rows) == 1 and len(tasks) > 1 else tasks[: len(rows)])
    axes.set_xlabel("test task")
    axes.set_ylabel("after training")
    for i, row in enumerate(values):
        for j, value in enumerate(row):
            if not math.isnan(value):
                axes.text(j, i, f"{value:.0f}", ha="center", va="center", color="w", fontsize=7)
    axes.set_title(f"accuracy matrix R: {result['strategy']}")
    scored = set(result.get("metrics") or ["accuracy"]) != {"accuracy"}  # a generative sequence's scores
    figure.colorbar(image, ax=axes, label="score %" if scored else "accuracy %")
    figure.tight_layout()
    return figure


def write_run_figures(runs: list[RunRecord], out: Path) -> list[tuple[str, Path, str]]:
    """Every figure the runs allow, as PNG files in ``out``: (section, file, caption) each."""
    written: list[tuple[str, Path, str]] = []
    if any(r.steps or r.evals for r in runs):
        written.append(("training curves", save_png(curves_figure(runs), out / "curves.png"),
                        "loss, validation metrics, learning rate and tokens/s per step"))
    for index, run in enumerate(runs):
        prefix = f"{index + 1}-{run.name}-" if len(runs) > 1 else ""
        if run.adalora is not None:
            written.append((f"AdaLoRA: {run.name}", save_png(adalora_figure(run), out / f"{prefix}adalora-ranks.png"),
                            "rank of each adapted matrix over the training steps"))
        for split in run.evaluations:
            figure = confusion_figure(run, split)
            if figure is not None:
                written.append((f"evaluation: {run.name}", save_png(figure, out / f"{prefix}confusion-{split}.png"),
                                f"confusion matrix, {split} split"))
        for result in run.continual:
            name = result["strategy"]
            written.append((f"continual learning: {run.name}",
                            save_png(accuracy_matrix_figure(result), out / f"{prefix}R-{name}.png"),
                            f"accuracy matrix R of {name}: row i after training task i, column j the test task"))
    return written
