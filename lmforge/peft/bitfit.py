"""BitFit: fine-tune only the bias terms (Ben Zaken et al. 2022, "BitFit: Simple Parameter-efficient
Fine-tuning for Transformer-based Masked Language-models").

To keep the base model intact (several adapters, disable, unmerge), each adapter trains a bias
*delta* δ (initialized to zero, a no-op) added to every biased linear layer's output; merging adds
δ to the bias, unmerging subtracts it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import LMForgeError
from .base import (
    AdapterModule,
    PeftConfig,
    find_targets,
    register_peft_method,
    unwrap,
    wrap,
    wrap_modules_to_save,
)


@dataclass
class BitFitConfig(PeftConfig):
    """BitFit options: which linear layers' biases train (default: every biased linear layer)."""

    method: str = "bitfit"
    target_modules: list[str] | str = "all-linear"


class BiasDelta(AdapterModule):
    """y = W x + b + δ."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.delta = nn.Parameter(torch.zeros(base.out_features))

    def forward(self, base: nn.Linear, x: Tensor) -> Tensor:
        return base(x) + self.delta

    @torch.no_grad()
    def merge(self, base: nn.Linear) -> None:
        base.bias += self.delta

    @torch.no_grad()
    def unmerge(self, base: nn.Linear) -> None:
        base.bias -= self.delta


def inject_bitfit(model: nn.Module, config: BitFitConfig, name: str) -> None:
    targets = [
        t
        for t in find_targets(model, config.target_modules)
        if unwrap(model.get_submodule(t)).bias is not None
    ]
    if not targets:
        raise LMForgeError(
            "BitFit needs bias terms, and the targeted layers have none (a model built with bias: false)",
            key="target_modules",
        )
    for target in targets:
        wrap(model, target, name, BiasDelta(unwrap(model.get_submodule(target))))
    wrap_modules_to_save(model, config, name)


register_peft_method(
    "bitfit",
    BitFitConfig,
    inject_bitfit,
    mergeable=True,
    no_hf_export_reason="Hugging Face PEFT has no BitFit method (its bias option trains the base biases themselves)",
)
