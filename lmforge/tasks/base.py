"""What every downstream task shares: options, the task contract, batching, evaluation in the loop.

A task turns rows of a user's files into model batches and back into predictions::

    rows ──parse──► examples ──encode──► features ──collate──► batch ──objective──► loss
    examples ──evaluate(model)──► metrics + one prediction per example

``Task.objective(model, batch) -> ObjectiveOutput`` plugs into the one training loop like the
pretraining objectives (:mod:`lmforge.objectives`), with the target count that fits the task
(one per example for classification, one per response token for SFT). :class:`Batches` feeds the
loop: shuffled each epoch with a seed, examples of similar length batched together (less
padding), resumable. :class:`TaskEvaluation` computes the task's own metrics on the validation
split at every evaluation of the loop and keeps the best weights by the task's main metric, as
Hugging Face ``Trainer``'s ``load_best_model_at_end`` does.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..data.samplers import check_same_world, ranks
from ..errors import ConfigError, LMForgeError, did_you_mean
from ..hooks import Callback
from ..objectives.base import IGNORE_INDEX, Batch
from ..settings import dataclass_from_dict, dataclass_to_dict
from .data import BadRow, Columns, PartialRowError, Row, RowError

if TYPE_CHECKING:
    from ..tokenizers import Tokenizer
    from ..training.loop import Trainer

Feature = dict[str, Any]
DEFAULT_MAX_LENGTH = 128


def _check(options: Any, condition: bool, key: str, why: str) -> None:
    if not condition:
        raise ConfigError(f"{key} = {getattr(options, key)!r}: {why}", key=key)


@dataclass
class TaskOptions:
    """Options every task takes. Each task has its own subclass with the options that concern
    it (``Task.Options``); giving a task an option of another is an error that names the task."""

    max_length: int | None = (
        None  # longest input in tokens, longer ones truncated (QA: window length); default 128, or the model's context if shorter
    )
    eval_examples: int | None = None  # validation examples per evaluation while training (None: all)
    dropout: float | None = (
        None  # the model's dropout and attention dropout while fine-tuning (None: its own)
    )

    def __post_init__(self) -> None:
        _check(self, self.max_length is None or self.max_length >= 4, "max_length", "must be at least 4")
        _check(
            self, self.eval_examples is None or self.eval_examples > 0, "eval_examples", "must be positive or null"
        )
        _check(
            self, self.dropout is None or 0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1) or null"
        )


@dataclass
class ClassificationOptions(TaskOptions):
    """Options of sequence classification."""

    pooling: Literal["auto", "cls", "mean", "last"] = (
        "auto"  # auto = cls (encoder), last (decoder)
    )
    oos_label: str | None = None  # the out-of-scope class (CLINC150: oos)


@dataclass
class GenerationOptions(TaskOptions):
    """Options of the tasks that generate text (SFT, translation, summarization)."""

    template: str | None = None  # decoder prompt, with {field} slots
    max_target_length: int = 128  # longest response or target in tokens
    num_beams: int = 4  # generation in lmforge eval: beams (1 = greedy)
    length_penalty: float = 1.0  # beam search: a finished sequence scores log-prob / length^α
    eval_num_beams: int = 1  # generation while training (validation metric): 1 = greedy, faster

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self, self.max_target_length >= 1, "max_target_length", "must be positive")
        _check(self, self.num_beams >= 1, "num_beams", "must be at least 1")
        _check(self, self.eval_num_beams >= 1, "eval_num_beams", "must be at least 1")


@dataclass
class SFTOptions(GenerationOptions):
    """Options of supervised fine-tuning (prompt → response on a decoder)."""

    packing: bool = False  # pack several short examples into one sequence
    chat: bool = False  # through the model's chat template: a row's messages, or its prompt as the user's turn
    system: str | None = None  # chat: a system message before each conversation (rows without their own)
    chat_template: str | None = None  # chat: a built-in (chatml, llama-2, plain) or Jinja source; None: the model's


@dataclass
class Seq2SeqOptions(GenerationOptions):
    """Options of translation and summarization."""

    source_prefix: str = ""  # encoder-decoder: text put before every source (T5 style)


@dataclass
class QAOptions(TaskOptions):
    """Options of extractive question answering."""

    stride: int = 32  # tokens two windows of a long context share
    max_answer_length: int = 30  # longest answer span, in tokens
    language: Literal["auto", "en", "zh"] = "auto"  # answer normalization (zh: character level, CMRC)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self, self.stride >= 0, "stride", "must be 0 or more")
        _check(self, self.max_answer_length >= 1, "max_answer_length", "must be positive")


@dataclass
class EvalResult:
    """Metrics of one evaluation and one prediction per example (in example order)."""

    metrics: dict[str, Any]
    predictions: list[dict[str, Any]] = field(default_factory=list)

    def scalars(self) -> dict[str, float]:
        return {
            k: float(v)
            for k, v in self.metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }


class Task:
    """The contract of a downstream task. Subclasses set the class attributes and implement
    :meth:`parse`, :meth:`encode`, :meth:`collate`, :meth:`objective` and :meth:`evaluate`.

    A task is built once for one model and never changes its own settings afterwards: options,
    tokenizer and architecture are fixed at construction (what varies per call, such as the beams
    of one evaluation, is an argument).

    Args:
        options: the task's options (its ``Options`` dataclass, or a mapping of its fields;
            None: the defaults).
        tokenizer: the model's tokenizer.
        columns: which column of the files holds each field.
        state: what a trained run recorded about the task (e.g. label names), to evaluate it.
        arch: the model's architecture, when known (checked against the task's ``archs``).

    Raises:
        LMForgeError: an option the task does not have, or an architecture it cannot use.
    """

    Options: ClassVar[type[TaskOptions]] = TaskOptions  # the task's own options
    name: ClassVar[str] = ""
    head: ClassVar[str] = "lm"  # the model head the task trains
    main_metric: ClassVar[str] = "loss"  # the validation metric that picks the best checkpoint
    greater_is_better: ClassVar[bool] = True
    archs: ClassVar[tuple[str, ...]] = ("encoder", "decoder", "encoder_decoder")

    def __init__(
        self,
        options: TaskOptions | dict[str, Any] | None,
        tokenizer: Tokenizer,
        columns: Columns | None = None,
        *,
        state: dict[str, Any] | None = None,
        arch: str | None = None,
    ) -> None:
        self.options: Any = self.options_from(options)
        self.tokenizer = tokenizer
        self.columns = columns or Columns()
        self.state: dict[str, Any] = dict(state or {})
        self.arch = arch
        if arch is not None:
            self.check_arch(arch)

    @classmethod
    def options_from(cls, value: TaskOptions | dict[str, Any] | None) -> TaskOptions:
        """The task's options from its own dataclass, a mapping (a recipe's ``options:``
        section, ``--options.KEY`` flags) or None; an option of another task is refused."""
        if isinstance(value, cls.Options):
            return value
        if value is None:
            return cls.Options()
        values = dataclass_to_dict(value) if dataclasses.is_dataclass(value) else dict(value)
        known = {f.name for f in dataclasses.fields(cls.Options)}
        for key in values:
            if key not in known:
                raise LMForgeError(
                    f"task {cls.name} has no option '{key}'"
                    + did_you_mean(key, known)
                    + f" (its options: {', '.join(sorted(known))})",
                    key=f"options.{key}",
                )
        return dataclass_from_dict(cls.Options, values, prefix="options.")

    @property
    def max_length(self) -> int:
        """The input length limit: ``options.max_length``, or 128 when unset."""
        return self.options.max_length or DEFAULT_MAX_LENGTH

    # ---- data --------------------------------------------------------------------------------

    def parse(self, row: Row) -> list[Any]:
        """The examples of one row (usually one); raises :class:`RowError` for a row it cannot use."""
        raise NotImplementedError

    def examples(
        self, rows: Sequence[Row | BadRow], *, training: bool = False
    ) -> tuple[list[Any], list[BadRow]]:
        """Parse rows into examples, collecting the bad ones with their file and line."""
        examples: list[Any] = []
        bad: list[BadRow] = []
        for row in rows:
            if isinstance(row, BadRow):
                bad.append(row)
                continue
            try:
                examples.extend(self.parse_checked(row, training=training))
            except PartialRowError as err:
                examples.extend(err.examples)
                bad.extend(BadRow(row.file, row.line, reason) for reason in err.errors)
            except RowError as err:
                bad.append(BadRow(row.file, row.line, str(err)))
        return examples, bad

    def parse_checked(self, row: Row, *, training: bool) -> list[Any]:
        return self.parse(row)

    def fit(self, examples: Sequence[Any]) -> None:
        """Learn what the task needs from the training examples (e.g. the label set). Called once."""

    def encode(self, examples: Sequence[Any]) -> list[Feature]:
        """Tokenized features for training (each with a ``length`` for batching)."""
        raise NotImplementedError

    def training_features(self, examples: Sequence[Any]) -> list[Feature]:
        """The features the training batches draw from: :meth:`encode`'s, unless a task trains on
        several views of one example (prompt-based classification with a template ensemble)."""
        return self.encode(examples)

    def collate(self, features: Sequence[Feature]) -> Batch:
        raise NotImplementedError

    # ---- model -------------------------------------------------------------------------------

    def model_changes(self, arch: str) -> dict[str, Any]:
        """ModelConfig fields the task's head needs (head, num_labels, pooling)."""
        return {"head": self.head}

    def check_arch(self, arch: str) -> None:
        if arch not in self.archs:
            raise LMForgeError(
                f"task {self.name} needs a model of arch {' or '.join(self.archs)}, this one is {arch}",
                key="model",
            )

    def objective(self, model: nn.Module, batch: Batch) -> Any:
        raise NotImplementedError

    def num_targets(self, batch: Batch) -> int:
        """Targets a batch counts (normalizes the loss over an accumulation window)."""
        return int((batch["labels"] != -100).sum())

    def evaluate(
        self, model: nn.Module, examples: Sequence[Any], *, batch_size: int = 32, final: bool = True
    ) -> EvalResult:
        """Metrics over ``examples`` and a prediction for each (``final``: with the final-evaluation
        settings, e.g. beam search; else the cheaper in-training ones)."""
        raise NotImplementedError

    def describe(self) -> str:
        """A short line about the task for the run summary."""
        return self.name

    def __call__(self, model: nn.Module, batch: Batch) -> Any:
        return self.objective(model, batch)


# ---- batching ----------------------------------------------------------------------------------


class Batches:
    """Batches of features for the training loop: a new seeded shuffle every epoch, features of
    similar length grouped (sorted inside windows of ``bucket`` batches, then the batches
    shuffled), re-iterable, with ``state_dict`` / ``load_state_dict`` for exact resume.

    Args:
        features: the encoded examples (each with a ``length``).
        collate: features → batch.
        batch_size: features per batch.
        shuffle: shuffle each epoch (training); False: file order, one pass (evaluation).
        seed: seeds the shuffles (epoch e uses seed + e).
        bucket: batches per sorting window (1: no length grouping).
        rank, world_size: this process's place in the job (default: :mod:`lmforge.runtime`'s);
            a shuffled epoch is cut into global batches of world_size × batch_size features,
            each dealt out in slices, one per rank — the rows one process with a batch that
            large would train on (a last batch with fewer features than ranks is left out).
            Evaluation batches (no ``shuffle``) are every rank's whole.
    """

    def __init__(
        self,
        features: Sequence[Feature],
        collate: Callable[[Sequence[Feature]], Batch],
        *,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        bucket: int = 50,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not features:
            raise LMForgeError("no examples to make batches of")
        self.features = features
        self.collate = collate
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.bucket = max(bucket, 1)
        self.rank, self.world_size = ranks(rank, world_size)
        self.lengths = np.array([f["length"] for f in features], dtype=np.int64)
        self.epoch = 0
        self.position = 0  # batches of the current epoch already handed out

    def __len__(self) -> int:
        """Batches per epoch (each rank draws this many)."""
        if not self.shuffle:
            return math.ceil(len(self.features) / self.batch_size)
        n, size = len(self.features), self.batch_size * self.world_size
        short_tail = 0 < n % size < self.world_size
        return n // size + (n % size > 0) - short_tail

    def order(self, epoch: int) -> list[np.ndarray]:
        """The batches (arrays of feature indices) of one epoch."""
        n = len(self.features)
        if not self.shuffle:
            return [np.arange(i, min(i + self.batch_size, n)) for i in range(0, n, self.batch_size)]
        rng = np.random.default_rng(self.seed + epoch)
        order = rng.permutation(n)
        size = self.batch_size * self.world_size  # the global batch
        window = size * self.bucket
        batches: list[np.ndarray] = []
        for start in range(0, n, window):
            chunk = order[start : start + window]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            batches.extend(chunk[i : i + size] for i in range(0, len(chunk), size))
        shuffled = [batches[i] for i in rng.permutation(len(batches))]
        if self.world_size == 1:
            return shuffled
        return [np.array_split(b, self.world_size)[self.rank] for b in shuffled if len(b) >= self.world_size]

    def __iter__(self) -> Iterator[Batch]:
        batches = self.order(self.epoch)
        while self.position < len(batches):
            index = batches[self.position]
            self.position += 1
            yield self.collate([self.features[i] for i in index])
        if self.shuffle:
            self.epoch += 1
        self.position = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        check_same_world(state, self.world_size)
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def pad(rows: Sequence[Sequence[int]], value: int, *, left: bool = False) -> Tensor:
    """Pad integer rows into a (B, T) long tensor (T: the longest row)."""
    T = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), T), value, dtype=torch.long)
    for i, row in enumerate(rows):
        if len(row):
            if left:
                out[i, T - len(row) :] = torch.as_tensor(row, dtype=torch.long)
            else:
                out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out


def length_mask(rows: Sequence[Sequence[int]], *, left: bool = False) -> Tensor:
    """(B, T) bool, True on the real tokens of rows padded by :func:`pad`."""
    T = max((len(r) for r in rows), default=0)
    lengths = torch.tensor([len(r) for r in rows])
    positions = torch.arange(T)[None, :]
    if left:
        return positions >= (T - lengths)[:, None]
    return positions < lengths[:, None]


def token_label_batch(features: Sequence[Feature], pad_id: int) -> Batch:
    """Features with ``input_ids`` and per-token ``labels`` as one padded batch: input_ids,
    attention_mask (True on real tokens), labels (-100 on the padding)."""
    rows = [f["input_ids"] for f in features]
    return {
        "input_ids": pad(rows, pad_id),
        "attention_mask": length_mask(rows),
        "labels": pad([f["labels"] for f in features], IGNORE_INDEX),
    }


def model_device(model: nn.Module) -> torch.device:
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}


def eval_order(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Example indices in batches of similar length (longest first), for fast evaluation."""
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    return [order[i : i + batch_size].tolist() for i in range(0, len(order), batch_size)]


def require_token(tokenizer: Tokenizer, role: str, why: str) -> int:
    token_id = getattr(tokenizer, f"{role}_id")
    if token_id is None:
        raise LMForgeError(f"{why} needs a {role} token, and the tokenizer has none", key="tokenizer")
    return token_id


# ---- evaluation inside the loop ----------------------------------------------------------------


class TaskEvaluation(Callback):
    """At every evaluation of the loop: the task's metrics on the validation examples (logged as
    ``eval_<metric>``), and a copy of the trainable weights whenever the main metric is the best
    so far. :meth:`restore_best` puts the best weights back at the end of training.

    Args:
        task: the task.
        examples: validation examples.
        batch_size: evaluation batch size.
        keep_best: keep the best weights (False: the last ones stay, e.g. AdaLoRA's final ranks).
    """

    def __init__(
        self, task: Task, examples: Sequence[Any], *, batch_size: int, keep_best: bool = True
    ) -> None:
        self.task = task
        limit = task.options.eval_examples
        self.examples = list(examples)[:limit] if limit else list(examples)
        self.batch_size = batch_size
        self.keep_best = keep_best
        self.best: float | None = None
        self.best_step = 0
        self.best_metrics: dict[str, float] = {}
        self.best_weights: dict[str, Tensor] | None = None
        self.history: list[dict[str, float]] = []

    def on_evaluate(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        model = trainer.model
        was_training = model.training
        with torch.no_grad():
            result = self.task.evaluate(model, self.examples, batch_size=self.batch_size, final=False)
        model.train(was_training)
        scalars = result.scalars()
        # the loop's own eval_loss (the objective over the validation batches) stays as it is
        metrics.update({f"eval_{k}": v for k, v in scalars.items() if f"eval_{k}" not in metrics})
        value = scalars.get(self.task.main_metric)
        step = trainer.state.step
        self.history.append({"step": step, **scalars})
        improved = value is not None and (
            self.best is None or (value > self.best if self.task.greater_is_better else value < self.best)
        )
        if improved:
            self.best, self.best_step, self.best_metrics = value, step, scalars
            if self.keep_best:
                self.best_weights = {  # an FSDP shard is gathered whole (every rank calls this)
                    name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().to("cpu", copy=True)
                    for name, p in model.named_parameters()
                    if p.requires_grad
                }
        shown = f"{value:.4f}" if value is not None else "n/a"
        if getattr(trainer, "writer", True):  # in a job, rank 0 alone says it
            tqdm.write(
                f"step {step}: validation {self.task.main_metric} {shown}"
                + (" (best so far)" if improved else ""),
                file=sys.stderr,
            )

    def restore_best(self, model: nn.Module) -> bool:
        """Copy the best weights back into ``model``; False when there is nothing to restore."""
        if not self.keep_best or self.best_weights is None:
            return False
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in self.best_weights.items():
                params[name].copy_(value)
        return True

    def state_dict(self) -> dict[str, Any]:
        return {
            "best": self.best,
            "best_step": self.best_step,
            "best_metrics": self.best_metrics,
            "history": self.history,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = state.get("best")
        self.best_step = int(state.get("best_step", 0))
        self.best_metrics = dict(state.get("best_metrics", {}))
        self.history = list(state.get("history", []))


__all__ = [
    "Batch",
    "Batches",
    "ClassificationOptions",
    "EvalResult",
    "Feature",
    "GenerationOptions",
    "QAOptions",
    "SFTOptions",
    "Seq2SeqOptions",
    "Task",
    "TaskEvaluation",
    "TaskOptions",
    "eval_order",
    "length_mask",
    "model_device",
    "pad",
    "require_token",
    "to_device",
]
