"""The callback contract of the one training loop, at the bottom of lmforge.

The loop calls, in this order, for every callback in its list (the user's first, then the
built-in loggers, so a logger sees what a callback added)::

    on_train_begin(trainer)                   after setup (and after a resume has been applied)
    on_after_backward(trainer)                after the window's backward passes, before clipping
                                              and the optimizer step (add gradients here)
    on_step_end(trainer, metrics)             after every optimizer step; gradients still in .grad
    on_evaluate(trainer, metrics)             after every evaluation on validation batches
    on_save(trainer, path)                    after every checkpoint
    on_train_end(trainer)                     once, however training ended

The base class lives here, below the loop, the PEFT methods and the tasks, so that each of
them can provide callbacks (AdaLoRA's rank allocation, a task's validation metric) without
importing the loop: the design follows Keras/Lightning callbacks and the Hugging Face
``TrainerCallback``. The built-in callbacks (loggers, progress bar, early stopping) are in
:mod:`lmforge.training.callbacks`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .training.loop import Trainer


class Callback:
    """Base class: override the hooks you need; all do nothing by default."""

    def on_train_begin(self, trainer: Trainer) -> None:
        """Called once before the first step (after a resume has restored the state)."""

    def on_after_backward(self, trainer: Trainer) -> None:
        """Called once per step after the backward passes, before clipping and the optimizer step
        (a regularizer can add its gradients here, as AdaLoRA's orthogonality penalty does)."""

    def on_step_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        """Called after each optimizer step with that step's metrics (add to them to log more)."""

    def on_evaluate(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        """Called after each evaluation with ``eval_*`` metrics."""

    def on_save(self, trainer: Trainer, path: Path) -> None:
        """Called after a checkpoint has been written to ``path``."""

    def on_train_end(self, trainer: Trainer) -> None:
        """Called once when training ends (finished, stopped early, interrupted or diverged)."""

    def state_dict(self) -> dict[str, Any]:
        """What must survive a resume (JSON-safe values, tensors, arrays)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
