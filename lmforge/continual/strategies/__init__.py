"""Continual-learning strategies: one module each, registered in :data:`STRATEGIES` on import."""

from __future__ import annotations

from . import adapters, ewc, joint, lwf, naive, olora, replay
from .base import (
    FULL,
    STRATEGIES,
    Strategy,
    StrategyOptions,
    StrategyRecord,
    get_strategy,
    make_strategy,
    register_strategy,
    strategy_names,
)

__all__ = [
    "FULL",
    "STRATEGIES",
    "Strategy",
    "StrategyOptions",
    "StrategyRecord",
    "adapters",
    "ewc",
    "get_strategy",
    "joint",
    "lwf",
    "make_strategy",
    "naive",
    "olora",
    "register_strategy",
    "replay",
    "strategy_names",
]
