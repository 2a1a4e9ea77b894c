"""``joint``: every task's training data at once, one stage — the upper bound a continual learner
aims for (it breaks the sequential constraint, so only its final row of R exists)."""

from __future__ import annotations

from .base import Strategy, register_strategy


class Joint(Strategy):
    """One stage over the union of all tasks' training examples."""

    name = "joint"
    generative = True
    all_at_once = True


register_strategy(Joint, "all tasks' data at once in one training (the upper bound)")
