"""Bottleneck adapters: small residual MLPs inserted after sublayers.

- Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP": an adapter after the
  attention output projection and one after the MLP, in every block.
- Pfeiffer et al. 2021, "AdapterFusion": one adapter per block, after the MLP only.

Each adapter maps h to h + up(act(down(h))) with a bottleneck width set directly or as
width / reduction_factor; the up projection starts at zero, so the adapter starts as the identity.
It sits on the sublayer's output before the residual sum (it wraps ``out_proj`` and ``down_proj``).
The nonlinearity is why adapters cannot be merged into the weights.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from ..errors import LMForgeError
from ..model.layers import ACTIVATIONS
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
class AdapterConfig(PeftConfig):
    """Bottleneck adapter options."""

    method: str = "adapter"
    style: str = "houlsby"  # "houlsby" (after attention and MLP) or "pfeiffer" (after the MLP only)
    bottleneck: int | None = None  # bottleneck width; default: embed_dim / reduction_factor
    reduction_factor: int = 16
    activation: str = "relu"

    def __post_init__(self) -> None:
        if self.style not in ("houlsby", "pfeiffer"):
            raise ValueError(f"style = {self.style!r}: must be houlsby or pfeiffer")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation = {self.activation!r}: must be one of {', '.join(ACTIVATIONS)}")
        if self.bottleneck is not None and self.bottleneck < 1:
            raise ValueError(f"bottleneck = {self.bottleneck}: must be at least 1")
        if self.reduction_factor < 1:
            raise ValueError(f"reduction_factor = {self.reduction_factor}: must be at least 1")


class BottleneckAdapter(AdapterModule):
    """h -> h + up(act(down(h))) on the output of the wrapped projection."""

    def __init__(self, dim: int, bottleneck: int, activation: str) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck, dim)
        nn.init.normal_(self.down.weight, std=0.02)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)  # zero: the adapter starts as the identity
        nn.init.zeros_(self.up.bias)

    def forward(self, base: nn.Module, x: Tensor) -> Tensor:
        h = base(x)
        return h + self.up(self.act(self.down(h)))


def inject_adapter(model: nn.Module, config: AdapterConfig, name: str) -> None:
    pattern = (
        r".*layers\.\d+\.(self_attn\.out_proj|mlp\.down_proj)"
        if config.style == "houlsby"
        else r".*layers\.\d+\.mlp\.down_proj"
    )
    targets = find_targets(model, pattern)
    for target in targets:
        base = unwrap(model.get_submodule(target))
        if not isinstance(base, nn.Linear):
            raise LMForgeError(f"adapter target {target} is not a linear layer")
        dim = base.out_features
        bottleneck = config.bottleneck or max(1, dim // config.reduction_factor)
        wrap(model, target, name, BottleneckAdapter(dim, bottleneck, config.activation))
    wrap_modules_to_save(model, config, name)


register_peft_method(
    "adapter",
    AdapterConfig,
    inject_adapter,
    mergeable=False,
    not_mergeable_reason="bottleneck adapters compute h + up(act(down(h))): the nonlinearity cannot be folded into a weight matrix",
    no_hf_export_reason="Hugging Face PEFT has no bottleneck adapters (they live in the separate `adapters` library)",
)
