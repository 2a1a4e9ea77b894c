"""``ewc``: online Elastic Weight Consolidation with a diagonal Fisher (Kirkpatrick et al. 2017;
the online form of Schwarz et al. 2018, "Progress & Compress").

After each task, the diagonal of the empirical Fisher information of the trainable parameters
is estimated from per-example gradients of the log-likelihood on that task's training examples,

    F_t = 1/N Σ_n (∂ log p(y_n | x_n; θ) / ∂θ)²,

and folded into a running estimate F̃ ← γ F̃ + F_t, with the anchor θ* set to the weights after
the task. While training later tasks the loss gains

    penalty(θ) = λ/2 Σ_k F̃_k (θ_k − θ*_k)²,     ∂penalty/∂θ = λ F̃ (θ − θ*).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from .base import Strategy, StrategyOptions, register_strategy, trainable

if TYPE_CHECKING:
    from ..learner import Learner, Stage


@dataclass
class EWCOptions(StrategyOptions):
    lam: float = 1000.0  # λ, the strength of the quadratic penalty
    gamma: float = 1.0  # γ, the decay of the earlier tasks' Fisher in the running estimate (online EWC)
    fisher_samples: int = 200  # training examples per task used to estimate the Fisher diagonal

    def __post_init__(self) -> None:
        if self.lam < 0 or not 0 <= self.gamma <= 1 or self.fisher_samples < 1:
            raise ValueError("lam ≥ 0, 0 ≤ gamma ≤ 1 and fisher_samples ≥ 1 are needed")


class EWC(Strategy):
    """A quadratic pull toward the earlier tasks' weights, weighted by their Fisher information."""

    Options = EWCOptions
    name = "ewc"
    generative = True

    def __init__(self, options: EWCOptions) -> None:
        super().__init__(options)
        self.fisher: dict[str, Tensor] = {}
        self.anchor: dict[str, Tensor] = {}

    def penalty(
        self, learner: Learner, model: nn.Module, batch: dict[str, Tensor], logits: Tensor
    ) -> Tensor | None:
        if not self.fisher:
            return None
        return ewc_penalty(model, self.fisher, self.anchor, lam=self.options.lam)

    def finish(self, learner: Learner, stage: Stage) -> None:
        features = learner.stage_features(stage)
        rng = np.random.default_rng(learner.seed(stage))
        picked = rng.choice(
            len(features), size=min(len(features), self.options.fisher_samples), replace=False
        )
        batches = [learner.collate([features[i]]) for i in sorted(picked)]
        fresh = diagonal_fisher(learner.model, batches, lambda model, batch: learner.log_likelihood(model, batch, stage))
        for name, value in fresh.items():
            previous = self.fisher.get(name)
            self.fisher[name] = value if previous is None else self.options.gamma * previous + value
        self.anchor = {n: p.detach().clone() for n, p in trainable(learner.model).items()}

    def state_dict(self) -> dict[str, Any]:
        return {
            **{f"fisher.{k}": v for k, v in self.fisher.items()},
            **{f"anchor.{k}": v for k, v in self.anchor.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.fisher = {k[len("fisher.") :]: v for k, v in state.items() if k.startswith("fisher.")}
        self.anchor = {k[len("anchor.") :]: v for k, v in state.items() if k.startswith("anchor.")}


def ewc_penalty(
    model: nn.Module, fisher: dict[str, Tensor], anchor: dict[str, Tensor], *, lam: float
) -> Tensor:
    """λ/2 Σ F (θ − θ*)² over the parameters named in ``fisher``."""
    parameters = dict(model.named_parameters())
    total = torch.zeros((), device=next(iter(parameters.values())).device)
    for name, weight in fisher.items():
        delta = parameters[name] - anchor[name].to(parameters[name].device)
        total = total + (weight.to(delta.device) * delta.pow(2)).sum()
    return 0.5 * lam * total


def diagonal_fisher(
    model: nn.Module,
    batches: list[dict[str, Tensor]],
    log_likelihood: Callable[[nn.Module, dict[str, Tensor]], Tensor],
) -> dict[str, Tensor]:
    """The empirical Fisher diagonal: the mean over one-example batches of the squared gradient
    of the example's log-likelihood (``log_likelihood(model, batch)``: of the true label among
    the allowed classes, or of the reference answer's tokens)."""
    parameters = trainable(model)
    sums = {n: torch.zeros_like(p) for n, p in parameters.items()}
    device = next(iter(parameters.values())).device
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            value = log_likelihood(model, batch)
            grads = torch.autograd.grad(value, list(parameters.values()), allow_unused=True)
            for (name, _), grad in zip(parameters.items(), grads, strict=True):
                if grad is not None:
                    sums[name] += grad.detach().pow(2)
    finally:
        model.train(was_training)
    return {n: s / max(len(batches), 1) for n, s in sums.items()}


register_strategy(EWC, "online EWC: a Fisher-weighted pull toward the earlier weights")
