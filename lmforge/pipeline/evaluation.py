"""Using a fine-tuned run: evaluate it on a split of its data, or predict on new inputs.

    RUN_DIR ──lmforge.load──► model + tokenizer ──the task recorded in config.yaml──► Task
        evaluate_run: the task's examples of one split ──task.evaluate──► metrics + predictions
        predict:      rows given by the caller (text, pairs, questions) ──► one prediction each

``lmforge eval`` and ``lmforge predict`` call these; so can a server or a script.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import LMForgeError
from ..runs import LoadedRun, load
from ..tasks import make_task, task_class
from ..tasks.base import EvalResult, Task
from ..tasks.data import Columns
from .finetuning import DataSpec, examples_of, read_examples


@dataclass
class TaskRun:
    """A fine-tuned run ready to use: the loaded run (model in eval mode) and its task."""

    run: LoadedRun
    task: Task

    @property
    def data(self) -> dict[str, Any]:
        """The data section the run was trained with (path, columns, split settings)."""
        return dict(self.run.config.get("data") or {})


def load_task_run(
    run_dir: str | Path,
    *,
    device: str | None = None,
    options: dict[str, Any] | None = None,
    columns: dict[str, str] | None = None,
) -> TaskRun:
    """Load a run written by ``lmforge finetune`` with the task it was trained on.

    Args:
        run_dir: the run directory.
        device: where to put the model (default: CPU).
        options: task options to change for this use (e.g. ``{"num_beams": 1}``).
        columns: column mapping (default: the run's).

    Raises:
        LMForgeError: not a fine-tuned run (no task in its config.yaml), or an unknown option.
    """
    run = load(run_dir, device=device)
    config = run.config
    name = config.get("task")
    if not isinstance(name, str):
        raise LMForgeError(
            "this run was not fine-tuned on a task (config.yaml has no 'task')", file=run_dir, key="model"
        )
    known = {f.name for f in dataclasses.fields(task_class(name).Options)}
    saved = {k: v for k, v in dict(config.get("options") or {}).items() if k in known}  # older runs saved every task's
    saved_columns = dict((config.get("data") or {}).get("columns") or {})
    task = make_task(
        name,
        run.tokenizer,
        options={**saved, **(options or {})},
        columns=Columns(dict(columns if columns is not None else saved_columns)),
        state=config.get("task_state"),
        arch=run.model.config.arch,
    )
    return TaskRun(run, task)


def evaluate_run(
    run_dir: str | Path,
    *,
    data: Path | None = None,
    split: str = "test",
    columns: dict[str, str] | None = None,
    skip_bad_rows: bool = False,
    batch_size: int = 32,
    num_beams: int | None = None,
    max_examples: int | None = None,
    device: str | None = None,
) -> tuple[Task, EvalResult]:
    """Evaluate a fine-tuned run on one split of its data (or of ``data``)."""
    options = {"num_beams": num_beams} if num_beams is not None else None
    loaded = load_task_run(run_dir, device=device, options=options, columns=columns)
    saved = loaded.data
    spec = DataSpec(
        path=Path(data) if data is not None else Path(saved.get("path", ".")),
        columns=loaded.task.columns.mapping,
        split_ratio=saved.get("split_ratio"),
        split_seed=int(saved.get("split_seed", 0)),
        skip_bad_rows=skip_bad_rows,
    )
    examples = read_examples(loaded.task, spec, split)
    if max_examples is not None:
        examples = examples[:max_examples]
    result = loaded.task.evaluate(loaded.run.model, examples, batch_size=batch_size, final=True)
    return loaded.task, result


def predict(loaded: TaskRun, records: list[dict[str, Any]], *, batch_size: int = 32) -> list[dict[str, Any]]:
    """One prediction per input record (fields as in the run's data files, e.g. ``{"text": …}``).

    Raises:
        LMForgeError: a record the task cannot read (missing field, wrong type), naming it.
    """
    examples = examples_of(loaded.task, records, where="input")
    if not examples:
        return []
    return loaded.task.evaluate(loaded.run.model, examples, batch_size=batch_size, final=True).predictions
