"""``lmforge presets``: the named model presets with their shape, size and training FLOPs."""

from __future__ import annotations

from ..config import PRESETS, ModelConfig
from ..model import flops_per_token, parameter_count


def presets() -> int:
    """List the named model presets with their shape, parameter count and training FLOPs per token."""
    print(
        f"{'preset':22} {'arch':16} {'layers':>6} {'width':>6} {'heads':>9} {'params':>10} {'GFLOP/tok':>10}"
    )
    for name in PRESETS:
        config = ModelConfig.from_name(name)
        layers = f"{config.num_layers}" + (
            f"+{config.num_decoder_layers}" if config.num_decoder_layers else ""
        )
        heads = f"{config.num_heads}/{config.num_kv_heads}"
        params = parameter_count(config)
        size = f"{params / 1e6:.1f}M" if params < 1e9 else f"{params / 1e9:.2f}B"
        flops = flops_per_token(config, min(config.max_seq_len, 1024)) / 1e9
        width = config.embed_dim
        print(f"{name:22} {config.arch:16} {layers:>6} {width:>6} {heads:>9} {size:>10} {flops:>10.3f}")
    return 0
