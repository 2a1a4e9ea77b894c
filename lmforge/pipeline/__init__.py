"""The pipeline layer: the functions every front end calls (commands, the server, the
continual-learning driver, your own scripts). Each takes typed inputs, returns a result and
prints nothing (a ``log`` callable receives the plan line by line).

- :func:`~lmforge.pipeline.pretraining.pretrain`: a recipe → tokenizer, shards, model, the loop;
- :func:`~lmforge.pipeline.demo.run_demo`: the embedded default, end to end.
"""

from .common import Log, silent
from .pretraining import PretrainResult, pretrain

__all__ = ["Log", "PretrainResult", "pretrain", "silent"]
