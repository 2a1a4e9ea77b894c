"""``olora``: orthogonal LoRA subspaces (O-LoRA, Wang et al. 2023, "Orthogonal Subspace Learning
for Language Model Continual Learning").

Each task trains a new LoRA; the earlier tasks' updates are kept (folded into the weights, which
computes the same W + Σ_t s·B_t A_t as keeping them beside it) and frozen. The rows of A span the
input subspace an update reads, so the new A is pushed orthogonal to every earlier one:

    penalty = λ_orth Σ_layers Σ_{t<now} Σ_{i,k} |(A_t A_nowᵀ)_{ik}|  +  λ_2 Σ_layers (‖A_now‖² + ‖B_now‖²)

No task id is needed at test time: one model answers every task.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ... import peft as peft_lib
from ...peft.base import adapted_modules
from ...peft.lora import LoraLinear
from .adapters import adapter_name
from .base import Strategy, StrategyOptions, register_strategy

if TYPE_CHECKING:
    from ..learner import Learner, Stage


@dataclass
class OLoRAOptions(StrategyOptions):
    lam_orth: float = 0.5  # λ_orth, the weight of the orthogonality penalty
    lam_l2: float = 0.0  # λ_2, an L2 penalty on the new LoRA's factors

    def __post_init__(self) -> None:
        if self.lam_orth < 0 or self.lam_l2 < 0:
            raise ValueError("lam_orth and lam_l2 must be ≥ 0")


class OLoRA(Strategy):
    """A new LoRA per task, orthogonal to the earlier ones' A subspaces; earlier ones merged."""

    Options = OLoRAOptions
    name = "olora"
    generative = True
    methods = ("lora",)
    why = "its penalty acts on the LoRA factors A"
    owns_adapters = True

    def __init__(self, options: OLoRAOptions) -> None:
        super().__init__(options)
        self.previous: dict[str, list[Tensor]] = {}  # layer name -> the earlier tasks' A matrices

    def prepare(self, learner: Learner, stage: Stage) -> None:
        model = learner.model
        if peft_lib.active_adapter(model) is not None:
            for name, layer in lora_layers(model).items():
                self.previous.setdefault(name, []).append(layer.lora_A.detach().clone())
            peft_lib.merge_and_unload(model)
        peft_lib.apply(
            model,
            "lora",
            adapter_name=adapter_name(stage.index),
            tokenizer=learner.task.tokenizer,
            **learner.peft,
        )

    def penalty(
        self, learner: Learner, model: nn.Module, batch: dict[str, Tensor], logits: Tensor
    ) -> Tensor | None:
        return orthogonality_penalty(
            lora_layers(model), self.previous, self.options.lam_orth, self.options.lam_l2
        )

    def state_dict(self) -> dict[str, Any]:
        return {f"{i}.{name}": a for name, history in self.previous.items() for i, a in enumerate(history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.previous = {}
        for key in sorted(state, key=lambda k: int(k.split(".", 1)[0])):
            self.previous.setdefault(key.split(".", 1)[1], []).append(state[key])


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    """Layer name -> the active adapter's LoRA layer."""
    active = peft_lib.active_adapter(model)
    found = {}
    for name, module in adapted_modules(model):
        layer = module.adapters[active] if active in module.adapters else None  # noqa: SIM401 (a ModuleDict)
        if isinstance(layer, LoraLinear):
            found[name] = layer
    return found


def orthogonality_penalty(
    layers: dict[str, LoraLinear], previous: dict[str, list[Tensor]], lam_orth: float, lam_l2: float
) -> Tensor:
    """λ_orth Σ |A_old A_newᵀ| + λ_2 (‖A_new‖² + ‖B_new‖²) over the layers."""
    total = torch.zeros(())
    for name, layer in layers.items():
        A = layer.lora_A  # (r, in)
        total = total.to(A.device)
        for old in previous.get(name, []):
            total = total + lam_orth * (old.to(A.device) @ A.T).abs().sum()  # (r_old, r)
        if lam_l2:
            total = total + lam_l2 * (A.pow(2).sum() + layer.lora_B.pow(2).sum())
    return total


register_strategy(OLoRA, "O-LoRA: a new LoRA per task, orthogonal to the earlier ones' subspaces")
