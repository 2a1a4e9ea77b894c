"""IA3: learned rescaling of inner activations (Liu et al. 2022, "Few-Shot Parameter-Efficient
Fine-Tuning is Better and Cheaper than In-Context Learning", §3.3).

Three vectors per block, initialized to ones (a no-op): l_k scales the keys, l_v the values (the
outputs of k_proj and v_proj) and l_ff the input of the MLP's down projection. Merging folds them
into the weights: output scaling multiplies the rows of W (and b), input scaling its columns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
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
class IA3Config(PeftConfig):
    """IA3 options: which linear layers get a scaling vector, and which of them scale their input."""

    method: str = "ia3"
    target_modules: list[str] | str = field(default_factory=lambda: ["k_proj", "v_proj", "down_proj"])
    feedforward_modules: list[str] = field(
        default_factory=lambda: ["down_proj"]
    )  # scale the input, not output


class IA3Linear(AdapterModule):
    """y = (W x + b) ⊙ l (output scaling), or y = W (x ⊙ l) + b for feed-forward layers."""

    def __init__(self, base: nn.Linear, *, feedforward: bool) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise LMForgeError(
                f"IA3 scales nn.Linear layers, not {type(base).__name__}", key="target_modules"
            )
        self.feedforward = feedforward
        self.scale = nn.Parameter(torch.ones(base.in_features if feedforward else base.out_features))

    def forward(self, base: nn.Linear, x: Tensor) -> Tensor:
        if self.feedforward:
            return base(x * self.scale)
        return base(x) * self.scale

    @torch.no_grad()
    def merge(self, base: nn.Linear) -> None:
        if self.feedforward:
            base.weight *= self.scale[None, :]
        else:
            base.weight *= self.scale[:, None]
            if base.bias is not None:
                base.bias *= self.scale

    @torch.no_grad()
    def unmerge(self, base: nn.Linear) -> None:
        if (self.scale == 0).any():
            raise LMForgeError(
                "cannot unmerge IA3: a scaling factor is exactly 0, the original weight is lost"
            )
        if self.feedforward:
            base.weight /= self.scale[None, :]
        else:
            base.weight /= self.scale[:, None]
            if base.bias is not None:
                base.bias /= self.scale


def inject_ia3(model: nn.Module, config: IA3Config, name: str) -> None:
    for target in find_targets(model, config.target_modules):
        feedforward = any(target == f or target.endswith("." + f) for f in config.feedforward_modules)
        wrap(model, target, name, IA3Linear(unwrap(model.get_submodule(target)), feedforward=feedforward))
    wrap_modules_to_save(model, config, name)


def hf_config(context: HFExportContext) -> dict[str, Any]:
    """adapter_config.json fields of an IA3 adapter (Hugging Face PEFT's ``IA3Config``)."""
    feedforward = [
        name for name, layer in context.layers.items() if isinstance(layer, IA3Linear) and layer.feedforward
    ]
    return {
        "peft_type": "IA3",
        "feedforward_modules": feedforward,
        "fan_in_fan_out": False,
        "init_ia3_weights": True,
    }


def hf_layer_tensors(layer: AdapterModule) -> dict[str, Tensor]:
    """``ia3_l``: (1, in) for input scaling, (out, 1) for output scaling, as Hugging Face PEFT keeps it."""
    assert isinstance(layer, IA3Linear)
    return {"ia3_l": layer.scale[None, :] if layer.feedforward else layer.scale[:, None]}


register_peft_method(
    "ia3",
    IA3Config,
    inject_ia3,
    mergeable=True,
    hf_export=HFExport(config=hf_config, layer_tensors=hf_layer_tensors),
)
