"""``naive``: sequential fine-tuning, each task trained on its own data with nothing to protect
the earlier ones — the lower bound of continual learning (catastrophic forgetting, McCloskey &
Cohen 1989)."""

from __future__ import annotations

from .base import Strategy, register_strategy


class Naive(Strategy):
    """Train each task in turn; every hook is the base class's no-op."""

    name = "naive"
    generative = True


register_strategy(Naive, "sequential fine-tuning, no protection (the lower bound)")
