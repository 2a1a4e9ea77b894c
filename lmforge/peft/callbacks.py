"""AdaLoRA's rank allocation as a callback of the one training loop.

The loop attaches it by itself when the active adapter is AdaLoRA (see
:func:`lmforge.peft.training_callbacks`): after each backward it adds the orthogonality
regularizer's gradients, after each optimizer step it updates the importance scores and masks
singular values down to the scheduled budget, and it logs the budget and total rank. The final
per-layer allocation is stored in the adapter's config (``rank_pattern``, saved with the adapter)
and, with its history, in ``adalora_ranks.json`` in the run directory.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from torch import nn

from ..hooks import Callback
from .adalora import AdaLoraConfig, RankAllocator

if TYPE_CHECKING:
    from ..training.loop import Trainer


class AdaLoraCallback(Callback):
    """Runs :class:`RankAllocator` inside the loop; records the allocation every ``record_every`` steps."""

    def __init__(self, model: nn.Module, name: str, config: AdaLoraConfig, *, record_every: int = 10) -> None:
        self.allocator = RankAllocator(model, name, config)
        self.config = config
        self.record_every = record_every
        self.total_steps = config.total_steps
        self.history: list[dict[str, Any]] = []
        self._pending_state: dict[str, Any] | None = None

    def on_train_begin(self, trainer: Trainer) -> None:
        self.total_steps = self.config.total_steps or trainer.config.max_steps
        if self._pending_state is not None:
            self.allocator.load_state_dict(self._pending_state)

    def on_after_backward(self, trainer: Trainer) -> None:
        self.allocator.add_orthogonality_gradients()

    def on_step_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        step = trainer.state.step
        metrics.update(self.allocator.update(step, self.total_steps))
        if step % self.record_every == 0 or step == self.total_steps:
            self.history.append(
                {"step": step, "budget": self.allocator.budget, "ranks": self.allocator.ranks()}
            )

    def on_train_end(self, trainer: Trainer) -> None:
        if not self.config.rank_pattern:
            self.config.rank_pattern = self.allocator.rank_pattern()
        run_dir = getattr(trainer, "run_dir", None)
        if run_dir is not None:
            report = {
                "adapter": self.allocator.name,
                "init_r": self.config.init_r,
                "target_r": self.config.target_r,
                "final_ranks": self.allocator.ranks(),
                "history": self.history,
            }
            (run_dir / "adalora_ranks.json").write_text(json.dumps(report, indent=2) + "\n")

    def state_dict(self) -> dict[str, Any]:
        return {"allocator": self.allocator.state_dict(), "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending_state = state.get("allocator")
        self.history = list(state.get("history", []))
        if self._pending_state is not None:
            self.allocator.load_state_dict(self._pending_state)
