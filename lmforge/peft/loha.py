"""LoHa: a low-rank Hadamard product as the update of a frozen weight matrix (Hyeon-Woo et al. 2022,
"FedPara: Low-Rank Hadamard Product for Communication-Efficient Federated Learning", §3; used for
fine-tuning by LyCORIS and Hugging Face PEFT's ``LoHaConfig``).

    y = W x + b + ΔW x,   ΔW = (α/r) · (W1a W1b) ⊙ (W2a W2b)

with W1a, W2a (out × r) and W1b, W2b (r × in). Each factor has rank r, but their elementwise
(Hadamard) product can reach rank r², so LoHa spends 2·r·(in + out) numbers per matrix, twice
LoRA's at the same r, for an update of far higher possible rank (FedPara, Proposition 1).
W2b starts at zero, so ΔW = 0 at step 0 (a no-op); the other three factors start He-uniform, as
nn.Linear initializes its weight. Only the four factors train.

Two regularizers of LyCORIS, active in training mode only: ``rank_dropout`` zeroes random rows of
ΔW (output features) and rescales the kept rows by the inverse of the kept share;
``module_dropout`` skips the whole update for a step.

Merging adds ΔW to W, unmerging subtracts it (the update is a plain weight matrix). The Hugging
Face PEFT export writes the factors as ``hada_w1_a`` … ``hada_w2_b``, the names used here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import LMForgeError
from .base import (
    AdapterModule,
    HFExport,
    HFExportContext,
    PeftConfig,
    find_targets,
    register_peft_method,
    unwrap,
    wrap,
    wrap_modules_to_save,
)


@dataclass
class LoHaConfig(PeftConfig):
    """LoHa options (defaults: rank 8, alpha 8, on the query and value projections)."""

    method: str = "loha"
    r: int = 8  # rank of each factor (W1a W1b and W2a W2b); ΔW's rank can reach r²
    alpha: float = 8.0  # the update is multiplied by alpha / r
    rank_dropout: float = 0.0  # in training, the share of ΔW's rows dropped at random
    module_dropout: float = 0.0  # in training, the chance of skipping the whole update for a step
    target_modules: list[str] | str = field(
        default_factory=lambda: ["q_proj", "v_proj"]
    )  # names, regex or "all-linear"

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"r = {self.r}: the rank must be at least 1")
        for name in ("rank_dropout", "module_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} = {getattr(self, name)}: must be in [0, 1)")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


class LoHaLinear(AdapterModule):
    """The LoHa update of one nn.Linear: y = base(x) + x ΔWᵀ."""

    def __init__(self, base: nn.Linear, config: LoHaConfig) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise LMForgeError(
                f"LoHa adapts nn.Linear layers, not {type(base).__name__}", key="target_modules"
            )
        r, out_features, in_features = config.r, base.out_features, base.in_features
        self.scaling = config.scaling
        self.rank_dropout = config.rank_dropout
        self.module_dropout = config.module_dropout
        self.hada_w1_a = nn.Parameter(torch.empty(out_features, r))
        self.hada_w1_b = nn.Parameter(torch.empty(r, in_features))
        self.hada_w2_a = nn.Parameter(torch.empty(out_features, r))
        self.hada_w2_b = nn.Parameter(torch.zeros(r, in_features))  # zero: a no-op at step 0
        for factor in (self.hada_w1_a, self.hada_w1_b, self.hada_w2_a):
            nn.init.kaiming_uniform_(factor, a=math.sqrt(5))  # as nn.Linear initializes its weight

    def delta_weight(self) -> Tensor:
        """(α/r) · (W1a W1b) ⊙ (W2a W2b), shaped like the base weight (out × in)."""
        return self.scaling * (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b)

    def forward(self, base: nn.Linear, x: Tensor) -> Tensor:
        if self.training and self.module_dropout and torch.rand(()) < self.module_dropout:
            return base(x)
        delta = self.delta_weight()  # (out, in)
        if self.training and self.rank_dropout:
            keep = (torch.rand(delta.shape[0], device=delta.device) >= self.rank_dropout).to(delta.dtype)
            delta = delta * (keep * keep.numel() / keep.sum().clamp(min=1))[:, None]  # kept rows rescaled
        return base(x) + F.linear(x, delta)

    @torch.no_grad()
    def merge(self, base: nn.Linear) -> None:
        base.weight += self.delta_weight().to(base.weight.dtype)

    @torch.no_grad()
    def unmerge(self, base: nn.Linear) -> None:
        base.weight -= self.delta_weight().to(base.weight.dtype)


def inject_loha(model: nn.Module, config: LoHaConfig, name: str) -> None:
    for target in find_targets(model, config.target_modules):
        wrap(model, target, name, LoHaLinear(unwrap(model.get_submodule(target)), config))
    wrap_modules_to_save(model, config, name)


def hf_config(context: HFExportContext) -> dict[str, Any]:
    """adapter_config.json fields of a LoHa adapter (Hugging Face PEFT's ``LoHaConfig``)."""
    config = context.config
    assert isinstance(config, LoHaConfig)
    return {
        "peft_type": "LOHA",
        "r": config.r,
        "alpha": config.alpha,
        "rank_dropout": config.rank_dropout,
        "module_dropout": config.module_dropout,
        "init_weights": True,
        "use_effective_conv2d": False,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def hf_layer_tensors(layer: AdapterModule) -> dict[str, Tensor]:
    """One layer's four factors, under the names Hugging Face PEFT saves them with."""
    assert isinstance(layer, LoHaLinear)
    return {
        "hada_w1_a": layer.hada_w1_a,
        "hada_w1_b": layer.hada_w1_b,
        "hada_w2_a": layer.hada_w2_a,
        "hada_w2_b": layer.hada_w2_b,
    }


register_peft_method(
    "loha",
    LoHaConfig,
    inject_loha,
    mergeable=True,
    hf_export=HFExport(config=hf_config, layer_tensors=hf_layer_tensors),
)
