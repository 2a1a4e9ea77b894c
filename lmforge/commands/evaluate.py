"""``lmforge eval``: a fine-tuned run on a split of its data — the metrics, the confusions, the
per-class report — and the JSON / JSONL files it writes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import LMForgeError
from ..files import atomic_write_json, write_jsonl
from ..pipeline.evaluation import evaluate_run
from ..tasks.data import Columns

MAX_MATRIX = 12  # classes up to which the whole confusion matrix is printed (beyond: the top confusions)
TOP_CONFUSIONS = 15


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
    """Evaluate a fine-tuned run on a split of its data: print the metrics, write eval-SPLIT.json.

    Classification also prints the confusion matrix (the most frequent confusions when there are
    many classes) and the per-class report of every class. A split without labels (e.g. SST-2's
    test) has nothing to score: say so, and write its predictions with --predictions.

    Args:
        model: the run directory written by lmforge finetune.
        data: the data folder (default: the one the run was trained on).
        split: train, validation or test.
        columns: column mapping (default: the run's).
        predictions: write one prediction per line (JSONL) to this file.
        output: where to write the metrics (default: RUN_DIR/eval-SPLIT.json, one file per split).
        batch_size: examples per forward pass.
        num_beams: beams for generation tasks (default: the run's options.num_beams).
        max_examples: evaluate only the first N examples.
        skip_bad_rows: skip rows that cannot be used instead of stopping.
        device: cpu, cuda, ...
    """
    if batch_size < 1:
        raise LMForgeError(f"--batch_size must be positive, got {batch_size}", key="batch_size")
    if max_examples is not None and max_examples < 1:
        raise LMForgeError(f"--max_examples must be positive, got {max_examples}", key="max_examples")
    task, result = evaluate_run(
        model,
        data=data,
        split=split,
        columns=column_mapping(columns) if columns is not None else None,
        skip_bad_rows=skip_bad_rows,
        batch_size=batch_size,
        num_beams=num_beams,
        max_examples=max_examples,
        device=device,
    )
    print(f"eval: {task.describe()}, {split} split")
    print(format_report(result.metrics, split=split))
    target = output or model / f"eval-{split}.json"
    record = {"model": str(model), "split": split, "task": task.name, "metrics": result.metrics}
    atomic_write_json(target, record)
    print(f"eval: metrics written to {target}")
    if predictions is not None:
        write_jsonl(predictions, result.predictions)
        print(f"eval: {len(result.predictions):,} predictions written to {predictions}")
    return 0


def column_mapping(columns: dict[str, Any]) -> dict[str, str]:
    return Columns(dict(columns)).mapping


def format_table(metrics: dict[str, Any]) -> str:
    """The scalar metrics as a two-column table."""
    scalars = {k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    width = max((len(k) for k in scalars), default=6)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ----------"]
    for key, value in scalars.items():
        shown = f"{value:,}" if isinstance(value, int) else f"{value:.4f}"
        lines.append(f"{key:<{width}}  {shown}")
    return "\n".join(lines)


def format_report(metrics: dict[str, Any], *, split: str) -> str:
    """The metrics table, then (classification) the confusions and the per-class report."""
    if metrics.get("labeled") == 0:
        return (
            f"the {split} split has no labels ({metrics.get('examples', 0):,} examples, all unlabeled, e.g. "
            "label -1): there is nothing to score. Write its predictions with --predictions FILE."
        )
    parts = [format_table(metrics)]
    report = metrics.get("per_class")
    names = list(report) if isinstance(report, dict) else []
    matrix = metrics.get("confusion_matrix")
    if names and matrix:
        parts.append(format_confusions(matrix, names))
    if isinstance(report, dict) and report:
        width = max(len(n) for n in report)
        lines = [f"{'class':<{width}}  precision  recall      f1  support"]
        for name, row in report.items():
            lines.append(
                f"{name:<{width}}  {row['precision']:9.4f}  {row['recall']:6.4f}  {row['f1']:6.4f}  {row['support']:7d}"
            )
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def format_confusions(matrix: list[list[int]], names: list[str]) -> str:
    """The confusion matrix (rows: true class, columns: predicted) when the classes are few, else
    the most frequent confusions (true → predicted, count)."""
    if len(names) <= MAX_MATRIX:
        width = max(max(len(n) for n in names), 5)
        header = "true \\ predicted".ljust(width) + "  " + "  ".join(f"{n[:8]:>8}" for n in names)
        rows = [f"{name:<{width}}  " + "  ".join(f"{c:>8}" for c in row) for name, row in zip(names, matrix, strict=True)]
        return "confusion matrix\n" + "\n".join([header, *rows])
    pairs = [
        (count, names[i], names[j])
        for i, row in enumerate(matrix)
        for j, count in enumerate(row)
        if i != j and count
    ]
    pairs.sort(key=lambda item: -item[0])
    if not pairs:
        return "no confusions: every example is predicted as its own class"
    lines = [f"top confusions ({len(pairs)} pairs of classes confused; true → predicted):"]
    lines += [f"  {count:5d}  {true} → {predicted}" for count, true, predicted in pairs[:TOP_CONFUSIONS]]
    return "\n".join(lines)


