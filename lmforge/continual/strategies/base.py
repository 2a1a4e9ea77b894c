"""The contract of a continual-learning strategy and the ``STRATEGIES`` registry.

A strategy is one module of this package: an options dataclass, a :class:`Strategy` subclass and
one :func:`register_strategy` call (the same shape as a PEFT method in :mod:`lmforge.peft`). The
driver (:mod:`lmforge.continual.learner`) calls, for each task of the sequence::

    prepare(learner, stage)          structure before training (a new adapter, a model snapshot)
    batches(learner, stage, ...)     what the loop trains on (replay mixes its buffer in)
    penalty(learner, model, batch, logits)   a term added to the task loss (EWC, LwF, O-LoRA)
    finish(learner, stage)           after training (Fisher, buffer update, freezing)
    logits(learner, features, task)  test-time predictions (adapters route to one of theirs)

and ``state_dict`` / ``load_state_dict`` between tasks, so that a killed sequence continues from
the last finished task with the same numbers.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor, nn

from ...errors import LMForgeError, did_you_mean
from ...settings import dataclass_from_dict

if TYPE_CHECKING:
    from ..learner import Learner, Stage

FULL = "full"


@dataclass
class StrategyOptions:
    """Options every strategy takes (each strategy subclasses this with its own)."""


class Strategy:
    """Sequential fine-tuning with no protection: the hooks do nothing (subclasses override).

    Class attributes:
        name: the registry name.
        methods: which fine-tuning methods it combines with: ``"any"`` (full or a PEFT method),
            ``"peft"`` (a PEFT method) or a tuple of method names.
        why: the reason shown when a method is refused.
        all_at_once: train one stage on every task's data (joint training), not one per task.
        owns_adapters: the strategy adds its own adapters (the driver applies no PEFT method).
        generative: it also runs generative sequences (SFT tasks answered as text), where there
            are no class logits to mask, route or distil.
    """

    Options: ClassVar[type[StrategyOptions]] = StrategyOptions
    name: ClassVar[str] = ""
    methods: ClassVar[str | tuple[str, ...]] = "any"
    why: ClassVar[str] = ""
    all_at_once: ClassVar[bool] = False
    owns_adapters: ClassVar[bool] = False
    generative: ClassVar[bool] = False

    def __init__(self, options: StrategyOptions) -> None:
        self.options: Any = options

    def prepare(self, learner: Learner, stage: Stage) -> None:
        """Before training ``stage`` (also replayed, without training, when a run resumes)."""

    def batches(self, learner: Learner, stage: Stage, features: list[dict[str, Any]]) -> Iterable[Any]:
        """The training batches of ``stage`` (default: its own features, shuffled)."""
        return learner.batches(features, stage)

    def penalty(
        self, learner: Learner, model: nn.Module, batch: dict[str, Tensor], logits: Tensor
    ) -> Tensor | None:
        """A regularizer added to the batch's mean task loss (None: nothing)."""
        return None

    def train_classes(self, learner: Learner, stage: Stage, masks: Tensor) -> Tensor:
        """(tasks, C) bool: the classes the task loss spans for an example of each task while
        training ``stage`` (default: the scenario's, ``masks``)."""
        return masks

    def finish(self, learner: Learner, stage: Stage) -> None:
        """After training ``stage``."""

    def logits(self, learner: Learner, features: list[dict[str, Any]], task: int, after: int) -> Tensor:
        """(N, C) logits on task ``task``'s test features after training task ``after``, with the
        scenario's classes already allowed (others at -inf)."""
        return learner.masked_logits(learner.model, features, task, after)

    def state_dict(self) -> dict[str, Any]:
        """What must survive between tasks: JSON-safe values and tensors."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""

    @classmethod
    def check_kind(cls, kind: str) -> None:
        """Refuse a generative sequence unless the strategy runs one (one line)."""
        if kind == "sft" and not cls.generative:
            raise LMForgeError(
                f"strategy {cls.name} runs classification sequences only (it works on class logits); "
                f"generative (sft) sequences take: {', '.join(n for n, r in STRATEGIES.items() if r.strategy_class.generative)}",
                key="strategies",
            )

    @classmethod
    def check_method(cls, method: str) -> None:
        """Refuse a fine-tuning method this strategy does not combine with (one line)."""
        allowed = cls.methods
        if allowed == "any":
            return
        if allowed == "peft" and method != FULL:
            return
        if isinstance(allowed, tuple) and method in allowed:
            return
        wanted = "a PEFT method" if allowed == "peft" else " or ".join(allowed)
        raise LMForgeError(
            f"strategy {cls.name} needs {wanted}, not method {method}: {cls.why}", key="method"
        )


@dataclass
class StrategyRecord:
    """One registry entry."""

    name: str
    strategy_class: type[Strategy]
    summary: str


STRATEGIES: dict[str, StrategyRecord] = {}


def register_strategy(strategy_class: type[Strategy], summary: str) -> type[Strategy]:
    """Add ``strategy_class`` to :data:`STRATEGIES` under its ``name``.

    Raises:
        LMForgeError: a name already taken.
    """
    name = strategy_class.name
    if not name or name in STRATEGIES:
        raise LMForgeError(f"strategy name '{name}' is empty or already registered")
    STRATEGIES[name] = StrategyRecord(name, strategy_class, summary)
    return strategy_class


def strategy_names() -> list[str]:
    return list(STRATEGIES)


def get_strategy(name: str) -> StrategyRecord:
    """The registry record of ``name``.

    Raises:
        LMForgeError: an unknown strategy, with the known ones.
    """
    if name not in STRATEGIES:
        raise LMForgeError(
            f"unknown strategy '{name}'"
            + did_you_mean(name, STRATEGIES)
            + f" (strategies: {', '.join(STRATEGIES)})",
            key="strategy",
        )
    return STRATEGIES[name]


def make_strategy(name: str, options: dict[str, Any] | None = None, *, method: str = FULL) -> Strategy:
    """Strategy ``name`` with ``options``, checked against the fine-tuning ``method``.

    Raises:
        LMForgeError: unknown strategy or option, or a method it does not combine with.
    """
    record = get_strategy(name)
    cls = record.strategy_class
    known = {f.name for f in fields(cls.Options)}
    for key in options or {}:
        if key not in known:
            raise LMForgeError(
                f"strategy {name} has no option '{key}'"
                + did_you_mean(key, known)
                + f" (its options: {', '.join(sorted(known)) or 'none'})",
                key=f"strategies.{name}.{key}",
            )
    cls.check_method(method)
    try:
        built = dataclass_from_dict(cls.Options, dict(options or {}), prefix=f"strategies.{name}.")
    except ValueError as err:
        raise LMForgeError(f"strategy {name}: {err}", key=f"strategies.{name}") from None
    return cls(built)


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    """Name -> parameter, for the parameters that train now."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}
