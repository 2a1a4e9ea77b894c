"""LoRA: low-rank updates of frozen weight matrices, with rsLoRA scaling and DoRA.

- LoRA (Hu et al. 2021): y = W x + (α/r) · B A x, with A (r × in) random, B (out × r) zero, so the
  update starts at exactly zero and only A, B (r·(in + out) numbers per matrix) train.
- rsLoRA (Kalajdzievski 2023): scale α/√r instead of α/r, which keeps the update's size stable
  as the rank grows.
- DoRA (Liu et al. 2024): split the adapted weight into a magnitude and a direction,
  W' = m · (W + s·BA) / ‖W + s·BA‖ (norm of each output row), with m initialized to ‖W‖ so W' = W
  at the start; m and the LoRA factors train. As in the paper (§4.3), the norm is treated as a
  constant in the backward pass to save memory.
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
class LoraConfig(PeftConfig):
    """LoRA options (defaults: rank 8 on the query and value projections)."""

    method: str = "lora"
    r: int = 8  # rank of the update B·A
    alpha: float = 16.0  # scale numerator: the update is multiplied by alpha / r (or alpha / √r)
    dropout: float = 0.0  # dropout on the adapter's input
    target_modules: list[str] | str = field(
        default_factory=lambda: ["q_proj", "v_proj"]
    )  # names, regex or "all-linear"
    use_rslora: bool = False  # scale alpha / √r (rank-stabilized LoRA)
    use_dora: bool = False  # weight-decomposed LoRA (magnitude + direction)

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"r = {self.r}: the rank must be at least 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout = {self.dropout}: must be in [0, 1)")

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r


class LoraLinear(AdapterModule):
    """The LoRA (or DoRA) adapter of one nn.Linear."""

    def __init__(self, base: nn.Linear, config: LoraConfig) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise LMForgeError(
                f"LoRA adapts nn.Linear layers, not {type(base).__name__}", key="target_modules"
            )
        self.scaling = config.scaling
        self.dropout = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        self.lora_A = nn.Parameter(torch.empty(config.r, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, config.r))  # zero: a no-op at step 0
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initializes its weight
        self.use_dora = config.use_dora
        self.additive = not config.use_dora  # DoRA renormalizes the whole weight: not a separate term
        if self.use_dora:
            self.magnitude = nn.Parameter(base.weight.detach().norm(dim=1).clone())  # (out,) = ‖W‖ per row
        self._dora_norm: Tensor | None = None  # the row norms used at merge time, to unmerge exactly

    def delta_weight(self) -> Tensor:
        """s · B A, shaped like the base weight (out × in)."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def output_delta(self, x: Tensor) -> Tensor:
        """s · B A x, the update LoRA adds to the base's output (not DoRA)."""
        return F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling

    def forward(self, base: nn.Linear, x: Tensor) -> Tensor:
        if not self.use_dora:
            return base(x) + self.output_delta(x)
        # DoRA: m · (W + sBA) x / ‖W + sBA‖ + b, the norm detached (constant in backward).
        weight = base.weight + self.delta_weight()
        norm = weight.norm(dim=1).detach()  # (out,)
        x = self.dropout(x)
        out = F.linear(x, weight) * (self.magnitude / norm)
        return out + base.bias if base.bias is not None else out

    @torch.no_grad()
    def merge(self, base: nn.Linear) -> None:
        if not self.use_dora:
            base.weight += self.delta_weight().to(base.weight.dtype)
            return
        weight = base.weight + self.delta_weight()
        self._dora_norm = weight.norm(dim=1)
        base.weight.copy_(weight * (self.magnitude / self._dora_norm)[:, None])

    @torch.no_grad()
    def unmerge(self, base: nn.Linear) -> None:
        if not self.use_dora:
            base.weight -= self.delta_weight().to(base.weight.dtype)
            return
        assert self._dora_norm is not None
        base.weight.copy_(base.weight * (self._dora_norm / self.magnitude)[:, None] - self.delta_weight())
        self._dora_norm = None


def inject_lora(model: nn.Module, config: LoraConfig, name: str) -> None:
    for target in find_targets(model, config.target_modules):
        wrap(model, target, name, LoraLinear(unwrap(model.get_submodule(target)), config))
    wrap_modules_to_save(model, config, name)


def hf_config(context: HFExportContext) -> dict[str, Any]:
    """adapter_config.json fields of a LoRA adapter (Hugging Face PEFT's ``LoraConfig``)."""
    config = context.config
    assert isinstance(config, LoraConfig)
    if config.use_dora:
        raise LMForgeError(
            "cannot export DoRA to the Hugging Face PEFT format: lmforge writes LoRA and rsLoRA adapters only"
        )
    return {
        "peft_type": "LORA",
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.use_rslora,
        "use_dora": False,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
    }


def hf_layer_tensors(layer: AdapterModule) -> dict[str, Tensor]:
    """One layer's tensors as Hugging Face PEFT names them (its ``lora_A``/``lora_B`` are nn.Linear)."""
    assert isinstance(layer, LoraLinear)
    return {"lora_A.weight": layer.lora_A, "lora_B.weight": layer.lora_B}


register_peft_method(
    "lora",
    LoraConfig,
    inject_lora,
    mergeable=True,
    hf_export=HFExport(config=hf_config, layer_tensors=hf_layer_tensors),
)
