"""Downstream tasks: a user's data files → examples → batches → the one training loop → metrics.

- ``classification``: sentiment, intents (binary or many classes, optional out-of-scope class);
- ``sft``: prompt → response pairs with a template, loss on the response only, optional packing;
- ``translation`` / ``summarization``: seq2seq on encoder-decoders (or decoders with a prompt
  template), beam search with a length penalty in evaluation, BLEU/chrF or ROUGE;
- ``qa``: extractive QA (SQuAD / CMRC 2018 style), long contexts in overlapping windows, answers
  mapped back to the original text, EM/F1;
- ``tagging``: token classification of pre-split words (BIO tags: entity F1);
- ``prompt_classification``: classification through the LM / MLM head with a template and label
  words (prompt-based fine-tuning, PET / LM-BFF; :mod:`lmforge.prompting`).

Each task is one class implementing :class:`~lmforge.tasks.base.Task`; :func:`make_task` builds
one by name (the ``TASKS`` registry). What ``lmforge finetune`` and ``lmforge eval`` run is in the
pipeline layer (:mod:`lmforge.pipeline.finetuning`, :mod:`lmforge.pipeline.evaluation`).
"""

from __future__ import annotations

from typing import Any, Literal

from ..errors import LMForgeError, did_you_mean
from .base import (
    Batches,
    ClassificationOptions,
    EvalResult,
    GenerationOptions,
    QAOptions,
    Seq2SeqOptions,
    SFTOptions,
    Task,
    TaskEvaluation,
    TaskOptions,
)
from .classification import ClassificationTask
from .data import (
    BadRow,
    Columns,
    Row,
    RowError,
    SplitPlan,
    check_bad_rows,
    data_files,
    read_label_file,
    read_rows,
)
from .prompt import PromptClassificationTask, PromptOptions
from .qa import QATask
from .seq2seq import SummarizationTask, TranslationTask
from .sft import SFTTask
from .tagging import TaggingTask

TASKS: dict[str, type[Task]] = {
    "classification": ClassificationTask,
    "sft": SFTTask,
    "translation": TranslationTask,
    "summarization": SummarizationTask,
    "qa": QATask,
    "tagging": TaggingTask,
    "prompt_classification": PromptClassificationTask,
}
TaskName = Literal[tuple(TASKS)]  # type: ignore[valid-type]  # the task names, from the registry


def task_class(name: str) -> type[Task]:
    """The task registered as ``name``."""
    if name not in TASKS:
        raise LMForgeError(
            f"unknown task '{name}'" + did_you_mean(name, TASKS) + f" (tasks: {', '.join(TASKS)})", key="task"
        )
    return TASKS[name]


def make_task(
    name: str,
    tokenizer: Any,
    *,
    options: TaskOptions | dict[str, Any] | None = None,
    columns: Columns | None = None,
    state: dict[str, Any] | None = None,
    arch: str | None = None,
) -> Task:
    """The task called ``name`` for ``tokenizer`` and a model of ``arch`` (``options``: its own
    options dataclass or a mapping of them; ``state``: what a trained run recorded, e.g. labels)."""
    return task_class(name)(options, tokenizer, columns, state=state, arch=arch)


__all__ = [
    "TASKS",
    "BadRow",
    "Batches",
    "ClassificationOptions",
    "ClassificationTask",
    "Columns",
    "EvalResult",
    "GenerationOptions",
    "PromptClassificationTask",
    "PromptOptions",
    "QAOptions",
    "QATask",
    "Row",
    "RowError",
    "SFTOptions",
    "SFTTask",
    "Seq2SeqOptions",
    "SplitPlan",
    "SummarizationTask",
    "TaggingTask",
    "Task",
    "TaskEvaluation",
    "TaskName",
    "TaskOptions",
    "TranslationTask",
    "check_bad_rows",
    "data_files",
    "make_task",
    "task_class",
    "read_label_file",
    "read_rows",
]
