"""``lwf``: Learning without Forgetting (Li & Hoiem 2016): while training a new task, the model's
outputs on the earlier classes are distilled from a frozen copy of the model as it was before
that task, on the new task's own inputs (no stored data):

    penalty = λ · T² · KL( softmax(z_old / T) ‖ softmax(z_new / T) ),   over the earlier classes,

with temperature T (Hinton et al. 2015); the T² keeps the gradient's size independent of T.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...objectives.base import model_inputs
from .base import Strategy, StrategyOptions, register_strategy

if TYPE_CHECKING:
    from ..learner import Learner, Stage


@dataclass
class LwFOptions(StrategyOptions):
    lam: float = 1.0  # λ, the weight of the distillation term
    temperature: float = 2.0  # T, the softening temperature

    def __post_init__(self) -> None:
        if self.lam < 0 or self.temperature <= 0:
            raise ValueError("lam ≥ 0 and temperature > 0 are needed")


class LwF(Strategy):
    """Distill the previous model's predictions on the earlier classes."""

    Options = LwFOptions
    name = "lwf"

    def __init__(self, options: LwFOptions) -> None:
        super().__init__(options)
        self.teacher: nn.Module | None = None
        self.old_classes: Tensor | None = None

    def prepare(self, learner: Learner, stage: Stage) -> None:
        self.teacher, self.old_classes = None, None
        old = learner.previous_classes(stage)
        if stage.tasks[0] == 0 or not bool(old.any()):
            return
        self.teacher = copy.deepcopy(learner.model).eval()
        for parameter in self.teacher.parameters():
            parameter.requires_grad_(False)
        self.old_classes = old

    def penalty(
        self, learner: Learner, model: nn.Module, batch: dict[str, Tensor], logits: Tensor
    ) -> Tensor | None:
        if self.teacher is None or self.old_classes is None:
            return None
        with torch.no_grad():
            out = self.teacher(batch["input_ids"], **model_inputs(batch, "attention_mask", "token_type_ids"))
        old = self.old_classes.to(logits.device)
        return self.options.lam * distillation_loss(
            logits[:, old], out.logits.float()[:, old], self.options.temperature
        )

    def finish(self, learner: Learner, stage: Stage) -> None:
        self.teacher = None  # the next stage snapshots the model as it is then


def distillation_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """T² · KL(softmax(teacher/T) ‖ softmax(student/T)), averaged over the batch."""
    log_student = F.log_softmax(student / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher / temperature, dim=-1)
    kl = F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


register_strategy(LwF, "learning without forgetting: distill the previous model on the old classes")
