"""Continual learning: a sequence of tasks, forgetting measured, strategies that keep old skills.

- :mod:`.metrics`: the accuracy matrix R and average accuracy, BWT, FWT, forgetting;
- :mod:`.strategies`: naive, joint, replay, ewc, lwf, adapters, olora behind one registry;
- :mod:`.learner`: the driver (scenarios task-, class-, domain-incremental);
- :mod:`.generative`: the driver of a generative sequence (SFT tasks answered as text);
- :mod:`.sequence`: the YAML sequence file; :mod:`.report`: the tables and the heatmap.

Files in, files out: :func:`lmforge.pipeline.continual.run_sequence` (``lmforge continual``).
"""

from __future__ import annotations

from .generative import GenerativeLearner
from .learner import SCENARIOS, Learner, Stage, TaskSplit
from .metrics import Summary, summarize
from .strategies import STRATEGIES, Strategy, make_strategy, strategy_names

__all__ = [
    "SCENARIOS",
    "STRATEGIES",
    "GenerativeLearner",
    "Learner",
    "Stage",
    "Strategy",
    "Summary",
    "TaskSplit",
    "make_strategy",
    "strategy_names",
    "summarize",
]
