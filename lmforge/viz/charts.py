"""The charts of a method comparison (``lmforge compare``): one figure, six panels, one bar per
method: the score (mean with the spread over seeds as an error bar, each seed a dot), the trainable
share, the size on disk, the peak memory, the wall time and the training throughput."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from .figures import new_figure, save_png


def compare_figure(rows: list[dict[str, Any]], *, title: str = "", scores: dict[str, list[float]] | None = None) -> Figure:
    """Six bar panels over the methods of ``rows`` (as :func:`lmforge.pipeline.compare.summarize` gives them)."""
    methods = [r["method"] for r in rows]
    width = max(9.0, 1.0 + 0.75 * len(methods) * 3)
    figure = new_figure(min(width, 16), 6.2)
    panels = figure.subplots(2, 3)
    x = list(range(len(methods)))
    metric = rows[0]["metric"] if rows else "score"
    score = panels[0][0]
    score.bar(x, [100 * r["mean"] for r in rows], yerr=[100 * r["std"] for r in rows], color="C0", capsize=3, alpha=0.85)
    for i, method in enumerate(methods):
        points = (scores or {}).get(method, [])
        score.plot([i] * len(points), [100 * p for p in points], "k.", ms=4)
    low = min((100 * r["min"] for r in rows), default=0.0)
    score.set_ylim(max(0.0, low - 5), min(100.0, max((100 * r["max"] for r in rows), default=100.0) + 3))
    score.set_title(f"validation {metric} (%), mean ± std", fontsize=9)
    specs = [
        (panels[0][1], "trainable_percent", "trainable parameters (%)", True),
        (panels[0][2], "weights_mb", "size on disk (MB)", True),
        (panels[1][0], "peak_memory_mb", "peak memory (MB)", False),
        (panels[1][1], "wall_time_s", "wall time per run (s)", False),
        (panels[1][2], "tokens_per_s", "training tokens / s", False),
    ]
    for axes, key, label, log in specs:
        values = [float(r[key]) for r in rows]
        axes.bar(x, values, color="C1" if log else "C2", alpha=0.85)
        if log and all(v > 0 for v in values):
            axes.set_yscale("log")
        axes.set_title(label, fontsize=9)
    for axes in panels.ravel():
        axes.set_xticks(x, methods, rotation=35, ha="right", fontsize=8)
        axes.tick_params(axis="y", labelsize=7)
        axes.grid(axis="y", alpha=0.3)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return figure


def write_compare_png(
    rows: list[dict[str, Any]], path: Path, *, title: str = "", scores: dict[str, list[float]] | None = None
) -> Path:
    """:func:`compare_figure` written to ``path``."""
    return save_png(compare_figure(rows, title=title, scores=scores), path)
