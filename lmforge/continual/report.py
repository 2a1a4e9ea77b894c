"""The results of a continual-learning run as files: one table of every strategy (Markdown, CSV,
JSON) and a heatmap of each strategy's accuracy matrix R (PNG, :mod:`lmforge.viz.curves`' figure)."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from ..files import atomic_write_json, atomic_write_text
from ..viz.curves import accuracy_matrix_figure
from ..viz.figures import save_png

COLUMNS = (
    "strategy",
    "average_accuracy",
    "bwt",
    "fwt",
    "forgetting",
    "train_time_s",
    "wall_time_s",
    "peak_rss_mb",
    "general_before",
    "general_after",
)
TABLE_STEM = "results"


def points(value: float | None) -> str:
    """A fraction as accuracy points with one decimal ("n/a" when undefined)."""
    return "n/a" if value is None else f"{100 * value:.1f}"


def table_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for result in results:
        summary = result["summary"]
        rows.append(
            {
                "strategy": result["strategy"],
                **{k: summary.get(k) for k in ("average_accuracy", "bwt", "fwt", "forgetting")},
                "train_time_s": round(sum(s["train_time_s"] for s in result["stages"]), 1),
                "wall_time_s": result.get("wall_time_s"),
                "peak_rss_mb": result.get("peak_rss_mb"),
                "general_before": (result.get("general") or [None])[0],
                "general_after": (result.get("general") or [None])[-1],
            }
        )
    return rows


def markdown(results: list[dict[str, Any]], *, title: str = "") -> str:
    """The comparison table, then each strategy's accuracy matrix (accuracy points)."""
    lines = [f"## {title}", ""] if title else []
    scored = any(set(r.get("metrics") or ["accuracy"]) != {"accuracy"} for r in results)
    watched = any(r.get("general") for r in results)
    lines += [
        f"| strategy | {'avg score' if scored else 'avg acc'} | BWT | FWT | forgetting | train s | wall s | peak RSS MB |"
        + (" general perplexity, before → after |" if watched else ""),
        "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if watched else ""),
    ]
    for row in table_rows(results):
        general = ""
        if watched:
            before, after = row["general_before"], row["general_after"]
            general = f" {before:.2f} → {after:.2f} |" if before is not None and after is not None else " n/a |"
        lines.append(
            f"| {row['strategy']} | {points(row['average_accuracy'])} | {points(row['bwt'])} | {points(row['fwt'])} "
            f"| {points(row['forgetting'])} | {row['train_time_s']} | {row['wall_time_s']} | {row['peak_rss_mb']} |{general}"
        )
    for result in results:
        tasks = result["tasks"]
        measure = "; ".join(f"{t}: {m}" for t, m in zip(tasks, result.get("metrics") or [], strict=False))
        scored = f"score %, {measure}" if measure and set(result["metrics"]) != {"accuracy"} else "accuracy %"
        lines += ["", f"R for {result['strategy']} (row: after training; column: test task; {scored}):", ""]
        lines.append("| after \\ on | " + " | ".join(tasks) + " |")
        lines.append("|---|" + "---:|" * len(tasks))
        lines.append("| (untrained) | " + " | ".join(points(v) for v in result["initial"]) + " |")
        labels = ["all tasks (joint)"] if len(result["rows"]) == 1 and len(tasks) > 1 else tasks
        for label, row in zip(labels, result["rows"], strict=False):
            lines.append(f"| {label} | " + " | ".join(points(v) for v in row) + " |")
        if result.get("general"):
            values = " → ".join(f"{v:.2f}" for v in result["general"])
            lines += ["", f"General ability (perplexity of English text never trained on), untrained → each task: {values}"]
    return "\n".join(lines) + "\n"


def write_tables(folder: Path, results: list[dict[str, Any]], *, title: str = "") -> list[Path]:
    """results.md, results.csv, results.json (and R_<strategy>.png) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    written = [atomic_write_text(folder / f"{TABLE_STEM}.md", markdown(results, title=title))]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(table_rows(results))
    written.append(atomic_write_text(folder / f"{TABLE_STEM}.csv", buffer.getvalue()))
    written.append(atomic_write_json(folder / f"{TABLE_STEM}.json", {"title": title, "strategies": results}))
    for result in results:
        written.append(heatmap(folder / f"R_{result['strategy']}.png", result))
    return written


def heatmap(path: Path, result: dict[str, Any]) -> Path:
    """A PNG heatmap of R (the figure ``lmforge viz run`` draws too)."""
    return save_png(accuracy_matrix_figure(result), path)
