"""``replay``: experience replay with a memory budget in examples (Chaudhry et al. 2019, "On Tiny
Episodic Memories in Continual Learning"; replay remains the strongest simple baseline).

The buffer holds references (task, example) to earlier training examples, chosen by one of:

- ``reservoir`` (Vitter 1985, Algorithm R): the n-th example of the stream enters with
  probability capacity / n, replacing a uniformly chosen slot, so at any time the buffer is a
  uniform sample of everything seen;
- ``class_balanced``: an equal share of the budget per class seen so far (a class's share
  shrinks, by random removal, as new classes arrive; new classes fill theirs at random); in a
  generative sequence, where answers are text, an equal share per task.

Each training batch of a new task is its own batch plus ``replay_batch_size`` examples drawn
from the buffer, so old and new examples are mixed in every step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ...errors import LMForgeError
from ...tasks.base import Batches
from .base import Strategy, StrategyOptions, register_strategy

if TYPE_CHECKING:
    from ..learner import Learner, Stage

POLICIES = ("reservoir", "class_balanced")
Ref = tuple[int, int]  # (task index, example index in that task's training examples)


@dataclass
class ReplayOptions(StrategyOptions):
    memory: int | None = None  # buffer size in examples
    memory_fraction: float | None = None  # or: this fraction of all the sequence's training examples
    policy: str = "reservoir"  # reservoir or class_balanced
    replay_batch_size: int | None = None  # buffer examples added to each batch (default: the batch size)

    def __post_init__(self) -> None:
        if (self.memory is None) == (self.memory_fraction is None):
            raise ValueError("give the buffer size as memory (examples) or memory_fraction, one of them")
        if self.memory is not None and self.memory < 1:
            raise ValueError(f"memory = {self.memory}: at least one example")
        if self.memory_fraction is not None and not 0 < self.memory_fraction <= 1:
            raise ValueError(f"memory_fraction = {self.memory_fraction}: must be in (0, 1]")
        if self.policy not in POLICIES:
            raise ValueError(f"policy '{self.policy}': one of {', '.join(POLICIES)}")


class ReservoirBuffer:
    """A uniform sample of a stream, at most ``capacity`` items (Algorithm R)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.items: list[Any] = []
        self.seen = 0

    def add(self, items: Sequence[Any], rng: np.random.Generator) -> None:
        for item in items:
            self.seen += 1
            if len(self.items) < self.capacity:
                self.items.append(item)
            else:
                slot = int(rng.integers(0, self.seen))  # uniform in [0, seen)
                if slot < self.capacity:
                    self.items[slot] = item


class ClassBalancedBuffer:
    """An equal share of ``capacity`` per class seen so far."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.by_class: dict[int, list[Any]] = {}

    @property
    def items(self) -> list[Any]:
        return [item for label in sorted(self.by_class) for item in self.by_class[label]]

    def add(self, items: Sequence[Any], labels: Sequence[int], rng: np.random.Generator) -> None:
        fresh: dict[int, list[Any]] = {}
        for item, label in zip(items, labels, strict=True):
            fresh.setdefault(label, []).append(item)
        classes = sorted(set(self.by_class) | set(fresh))
        share = self.capacity // max(len(classes), 1)
        kept: dict[int, list[Any]] = {}
        for label in classes:
            pool = self.by_class.get(label, []) + fresh.get(label, [])
            if len(pool) > share:
                picked = sorted(rng.choice(len(pool), size=share, replace=False).tolist())
                pool = [pool[i] for i in picked]
            kept[label] = pool
        self.by_class = {label: pool for label, pool in kept.items() if pool}


class MixWithMemory:
    """A collate function that appends ``extra`` features drawn from ``memory`` to each batch."""

    def __init__(self, collate: Any, memory: list[dict[str, Any]], extra: int, seed: int) -> None:
        self.collate, self.memory, self.extra = collate, memory, min(extra, len(memory))
        self.rng = np.random.default_rng(seed)

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        picked = self.rng.choice(len(self.memory), size=self.extra, replace=False)
        return self.collate(list(features) + [self.memory[i] for i in picked])


class Replay(Strategy):
    """Mix a budgeted buffer of earlier examples into every batch."""

    Options = ReplayOptions
    name = "replay"
    generative = True

    def __init__(self, options: ReplayOptions) -> None:
        super().__init__(options)
        self.buffer: ReservoirBuffer | ClassBalancedBuffer | None = None
        self.saved: dict[str, Any] = {}  # a resumed run's buffer, until the learner is known

    def capacity(self, learner: Learner) -> int:
        if self.options.memory is not None:
            return int(self.options.memory)
        total = sum(len(split.train) for split in learner.tasks)
        return max(1, round(self.options.memory_fraction * total))

    def ensure_buffer(self, learner: Learner) -> ReservoirBuffer | ClassBalancedBuffer:
        if self.buffer is None:
            capacity = self.capacity(learner)
            self.buffer = (
                ReservoirBuffer(capacity)
                if self.options.policy == "reservoir"
                else ClassBalancedBuffer(capacity)
            )
            saved, self.saved = self.saved, {}
            if isinstance(self.buffer, ReservoirBuffer) and saved:
                self.buffer.items, self.buffer.seen = [tuple(r) for r in saved["items"]], int(saved["seen"])
            elif saved:
                self.buffer.by_class = {int(k): [tuple(r) for r in v] for k, v in saved["by_class"].items()}
        return self.buffer

    def batches(self, learner: Learner, stage: Stage, features: list[dict[str, Any]]) -> Any:
        refs = self.ensure_buffer(learner).items
        if not refs:
            return learner.batches(features, stage)
        memory = [learner.encode([learner.tasks[t].train[i]], t)[0] for t, i in refs]
        extra = self.options.replay_batch_size or learner.train_config.batch_size
        mix = MixWithMemory(learner.collate, memory, extra, seed=learner.seed(stage) + 7919)
        return Batches(features, mix, batch_size=learner.train_config.batch_size, seed=learner.seed(stage))

    def finish(self, learner: Learner, stage: Stage) -> None:
        buffer = self.ensure_buffer(learner)
        rng = np.random.default_rng(learner.seed(stage))
        for t in stage.tasks:
            refs = [(t, i) for i in range(len(learner.tasks[t].train))]
            if isinstance(buffer, ReservoirBuffer):
                buffer.add(refs, rng)
            else:
                labels = [learner.label_of(t, e) for e in learner.tasks[t].train]
                buffer.add(refs, labels, rng)

    def state_dict(self) -> dict[str, Any]:
        if self.buffer is None:
            return {}
        if isinstance(self.buffer, ReservoirBuffer):
            return {"items": [list(r) for r in self.buffer.items], "seen": self.buffer.seen}
        return {"by_class": {str(k): [list(r) for r in v] for k, v in self.buffer.by_class.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        wanted = "items" if self.options.policy == "reservoir" else "by_class"
        if state and wanted not in state:
            raise LMForgeError(
                f"the saved replay buffer was not {self.options.policy}: resume with the same policy"
            )
        self.buffer, self.saved = None, dict(state)  # rebuilt with the learner's capacity on first use


register_strategy(
    Replay, "experience replay: a budgeted buffer (reservoir or class-balanced) mixed into each batch"
)
