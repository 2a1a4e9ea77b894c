"""AdaLoRA: LoRA whose rank is allocated across layers by importance during training
(Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning").

Each adapted matrix gets an update in SVD form, ΔW = P Λ Q (P: out × r, Λ: r singular values,
Q: r × in), starting at r = init_r with Λ = 0 (a no-op). During training:

- an orthogonality regularizer ‖PᵀP − I‖_F + ‖QQᵀ − I‖_F keeps P and Q close to orthogonal (§3.1);
- each singular value's importance is a smoothed sensitivity |w · ∂L/∂w| (exponential moving
  averages of the sensitivity and of its uncertainty, §3.2), summed over its triplet
  (λ_i, column i of P, row i of Q);
- a cubic schedule lowers the total rank budget from init_r·n to target_r·n (§3.3): flat for
  ``tinit`` warm-up steps, cubic decrease, then fixed for the last ``tfinal`` steps; every
  ``delta_t`` steps the least important singular values are masked to zero to meet the budget.

Unlike Hugging Face PEFT, where the user must call ``update_and_allocate`` by hand or AdaLoRA
silently stays plain LoRA, the allocation here is a callback the training loop attaches on its own
whenever the active adapter is AdaLoRA (:class:`AdaLoraCallback`, given by this method's record and
run through :func:`lmforge.peft.training_callbacks`): after each backward it adds the orthogonality
regularizer's gradients, after each optimizer step it updates the importance scores and masks
singular values down to the scheduled budget, and it logs the budget and total rank. The final
per-layer allocation is stored in the adapter's config (``rank_pattern``, saved with the adapter)
and, with its history, in ``adalora_ranks.json`` in the run directory. Because that final
allocation is part of the method, fine-tuning keeps AdaLoRA's last weights, not the best
validation ones (``keep_best=False``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import LMForgeError
from ..hooks import Callback
from .base import (
    AdapterModule,
    PeftConfig,
    adapted_modules,
    find_targets,
    register_peft_method,
    unwrap,
    wrap,
    wrap_modules_to_save,
)

if TYPE_CHECKING:
    from ..training.loop import Trainer


@dataclass
class AdaLoraConfig(PeftConfig):
    """AdaLoRA options (defaults after the paper's GLUE settings)."""

    method: str = "adalora"
    init_r: int = 12  # starting rank of every matrix
    target_r: int = 8  # average rank per matrix at the end (the budget is target_r × matrices)
    alpha: float = 32.0  # the update is scaled by alpha / init_r
    dropout: float = 0.0
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    total_steps: int | None = None  # training steps (default: the loop's max_steps)
    tinit: int = 0  # warm-up steps at the initial budget
    tfinal: int = 0  # final steps at the target budget, with the allocation frozen
    delta_t: int = 1  # steps between two allocations
    beta1: float = 0.85  # EMA factor of the sensitivity
    beta2: float = 0.85  # EMA factor of its uncertainty
    orth_reg_weight: float = 0.5  # weight of the orthogonality regularizer
    rank_pattern: dict[str, list[bool]] = field(
        default_factory=dict
    )  # the saved allocation (filled in training)

    def __post_init__(self) -> None:
        if not 1 <= self.target_r <= self.init_r:
            raise ValueError(f"target_r = {self.target_r} must be between 1 and init_r = {self.init_r}")
        if not (0 < self.beta1 < 1 and 0 < self.beta2 < 1):
            raise ValueError(f"beta1 = {self.beta1}, beta2 = {self.beta2}: must be in (0, 1)")
        if self.delta_t < 1:
            raise ValueError(f"delta_t = {self.delta_t}: must be at least 1")


class AdaLoraLinear(AdapterModule):
    """ΔW = P diag(Λ) Q scaled by alpha / init_r, on one nn.Linear."""

    def __init__(self, base: nn.Linear, config: AdaLoraConfig) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise LMForgeError(
                f"AdaLoRA adapts nn.Linear layers, not {type(base).__name__}", key="target_modules"
            )
        r = config.init_r
        self.scaling = config.alpha / r
        self.dropout = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        self.lora_A = nn.Parameter(torch.randn(r, base.in_features) * 0.02)  # Q
        self.lora_E = nn.Parameter(torch.zeros(r))  # Λ: zero, a no-op at step 0
        self.lora_B = nn.Parameter(torch.randn(base.out_features, r) * 0.02)  # P

    def delta_weight(self) -> Tensor:
        return self.scaling * (self.lora_B @ (self.lora_A * self.lora_E[:, None]))

    def forward(self, base: nn.Linear, x: Tensor) -> Tensor:
        h = F.linear(self.dropout(x), self.lora_A * self.lora_E[:, None])  # (…, r)
        return base(x) + F.linear(h, self.lora_B) * self.scaling

    def orthogonality(self) -> Tensor:
        """‖QQᵀ − I‖_F + ‖PᵀP − I‖_F."""
        eye = torch.eye(self.lora_A.shape[0], device=self.lora_A.device, dtype=self.lora_A.dtype)
        return torch.linalg.matrix_norm(self.lora_A @ self.lora_A.T - eye) + torch.linalg.matrix_norm(
            self.lora_B.T @ self.lora_B - eye
        )

    @property
    def rank(self) -> int:
        return int((self.lora_E != 0).sum())

    @torch.no_grad()
    def merge(self, base: nn.Linear) -> None:
        base.weight += self.delta_weight().to(base.weight.dtype)

    @torch.no_grad()
    def unmerge(self, base: nn.Linear) -> None:
        base.weight -= self.delta_weight().to(base.weight.dtype)


def inject_adalora(model: nn.Module, config: AdaLoraConfig, name: str) -> None:
    targets = find_targets(model, config.target_modules)
    for target in targets:
        layer = AdaLoraLinear(unwrap(model.get_submodule(target)), config)
        if target in config.rank_pattern:  # a saved allocation: the masked values stay masked
            keep = torch.tensor(config.rank_pattern[target], dtype=torch.bool)
            if keep.numel() != config.init_r:
                raise LMForgeError(
                    f"rank_pattern of {target} has {keep.numel()} entries, init_r is {config.init_r}"
                )
        wrap(model, target, name, layer)
    wrap_modules_to_save(model, config, name)


def adalora_layers(model: nn.Module, name: str) -> dict[str, AdaLoraLinear]:
    return {
        module_name: module.adapters[name]
        for module_name, module in adapted_modules(model)
        if name in module.adapters and isinstance(module.adapters[name], AdaLoraLinear)
    }


class RankAllocator:
    """The budget schedule and importance-based masking of one AdaLoRA adapter.

    Use it through the training loop (a callback built by :func:`lmforge.peft.training_callbacks`):
    ``add_orthogonality_gradients`` after backward, ``update`` after each optimizer step.
    """

    def __init__(self, model: nn.Module, name: str, config: AdaLoraConfig) -> None:
        self.model = model
        self.name = name
        self.config = config
        self.layers = adalora_layers(model, name)
        if not self.layers:
            raise LMForgeError(f"adapter '{name}' has no AdaLoRA layers")
        self.sensitivity: dict[str, Tensor] = {}  # EMA of |w · grad|, per parameter
        self.uncertainty: dict[str, Tensor] = {}  # EMA of |sensitivity − its EMA|
        self.budget = self.initial_budget
        self.history: list[dict[str, Any]] = []

    @property
    def initial_budget(self) -> int:
        return self.config.init_r * len(self.layers)

    @property
    def target_budget(self) -> int:
        return self.config.target_r * len(self.layers)

    def budget_at(self, step: int, total_steps: int) -> tuple[int, bool]:
        """(budget, whether to mask now) at ``step`` (1-based) of ``total_steps``: the cubic schedule."""
        tinit, tfinal = self.config.tinit, self.config.tfinal
        if total_steps <= tinit + tfinal:
            raise LMForgeError(
                f"AdaLoRA needs total_steps ({total_steps}) greater than tinit + tfinal ({tinit} + {tfinal})",
                key="total_steps",
            )
        if step <= tinit:
            return self.initial_budget, False
        if step > total_steps - tfinal:
            return self.target_budget, True
        progress = (step - tinit) / (total_steps - tfinal - tinit)
        budget = int((self.initial_budget - self.target_budget) * (1 - progress) ** 3 + self.target_budget)
        return budget, step % self.config.delta_t == 0

    def orthogonality_loss(self) -> Tensor:
        terms = [layer.orthogonality() for layer in self.layers.values()]
        return self.config.orth_reg_weight * torch.stack(terms).mean()

    def add_orthogonality_gradients(self) -> float:
        """Backpropagate the regularizer into P and Q (as if added to the loss). Returns its value."""
        if not any(layer.lora_A.requires_grad for layer in self.layers.values()):
            return 0.0
        loss = self.orthogonality_loss()
        loss.backward()
        return float(loss.detach())

    @torch.no_grad()
    def _update_importance(self) -> None:
        beta1, beta2 = self.config.beta1, self.config.beta2
        for layer_name, layer in self.layers.items():
            for part in ("lora_A", "lora_E", "lora_B"):
                parameter = getattr(layer, part)
                if parameter.grad is None:
                    continue
                key = f"{layer_name}.{part}"
                sensitivity = (parameter * parameter.grad).abs()
                if key not in self.sensitivity:
                    self.sensitivity[key] = torch.zeros_like(sensitivity)
                    self.uncertainty[key] = torch.zeros_like(sensitivity)
                self.sensitivity[key].mul_(beta1).add_(sensitivity, alpha=1 - beta1)
                self.uncertainty[key].mul_(beta2).add_(
                    (sensitivity - self.sensitivity[key]).abs(), alpha=1 - beta2
                )

    def _scores(self) -> dict[str, Tensor]:
        """Importance of each singular value: its own score plus the mean scores of its P column
        and Q row (the triplet of §3.2)."""
        scores = {}
        for layer_name, layer in self.layers.items():
            part_score = {}
            for part in ("lora_A", "lora_E", "lora_B"):
                key = f"{layer_name}.{part}"
                if key in self.sensitivity:
                    part_score[part] = self.sensitivity[key] * self.uncertainty[key]
                else:
                    part_score[part] = torch.zeros_like(getattr(layer, part))
            scores[layer_name] = (
                part_score["lora_E"] + part_score["lora_A"].mean(dim=1) + part_score["lora_B"].mean(dim=0)
            )
        return scores

    @torch.no_grad()
    def update(self, step: int, total_steps: int) -> dict[str, float]:
        """After the optimizer step: refresh importances, mask to the scheduled budget."""
        self.budget, mask_now = self.budget_at(step, total_steps)
        frozen = step > total_steps - self.config.tfinal and self.config.rank_pattern
        if frozen:  # final phase: the allocation is fixed, keep masked values at zero
            self._apply_pattern(self.config.rank_pattern)
        else:
            self._update_importance()
            if mask_now:
                self._mask_to_budget(self.budget)
                if step > total_steps - self.config.tfinal:
                    self.config.rank_pattern = self.rank_pattern()
        ranks = self.ranks()
        return {"adalora/budget": float(self.budget), "adalora/total_rank": float(sum(ranks.values()))}

    def _mask_to_budget(self, budget: int) -> None:
        scores = self._scores()
        everything = torch.cat([s.flatten() for s in scores.values()])
        if budget >= everything.numel():
            return
        threshold = torch.kthvalue(everything.float(), everything.numel() - budget).values
        for layer_name, layer in self.layers.items():
            layer.lora_E.masked_fill_(scores[layer_name] <= threshold, 0.0)

    def _apply_pattern(self, pattern: dict[str, list[bool]]) -> None:
        for layer_name, layer in self.layers.items():
            if layer_name in pattern:
                keep = torch.tensor(pattern[layer_name], device=layer.lora_E.device)
                layer.lora_E.masked_fill_(~keep, 0.0)

    def ranks(self) -> dict[str, int]:
        """Current rank of each adapted matrix (non-zero singular values)."""
        return {layer_name: layer.rank for layer_name, layer in self.layers.items()}

    def rank_pattern(self) -> dict[str, list[bool]]:
        return {layer_name: (layer.lora_E != 0).tolist() for layer_name, layer in self.layers.items()}

    def state_dict(self) -> dict[str, Any]:
        return {
            "sensitivity": {k: v.cpu() for k, v in self.sensitivity.items()},
            "uncertainty": {k: v.cpu() for k, v in self.uncertainty.items()},
            "rank_pattern": self.config.rank_pattern,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = next(iter(self.layers.values())).lora_E.device
        self.sensitivity = {k: v.to(device) for k, v in state.get("sensitivity", {}).items()}
        self.uncertainty = {k: v.to(device) for k, v in state.get("uncertainty", {}).items()}
        self.config.rank_pattern = state.get("rank_pattern", {})


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


def adalora_callbacks(model: nn.Module, name: str, config: PeftConfig) -> list[Callback]:
    """The loop runs the rank allocation of AdaLoRA adapter ``name`` while it is active."""
    assert isinstance(config, AdaLoraConfig)
    return [AdaLoraCallback(model, name, config)]


register_peft_method(
    "adalora",
    AdaLoraConfig,
    inject_adalora,
    mergeable=True,
    callbacks=adalora_callbacks,
    keep_best=False,  # the final rank allocation is part of the method: its last weights are kept
    no_hf_export_reason="the export of AdaLoRA (Hugging Face PEFT's ADALORA layout with its rank bookkeeping) is not written yet",
)
