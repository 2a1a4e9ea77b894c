"""The model core: attention, positions, layers, the Transformer and its heads."""

from .attention import SelfAttention
from .kv_cache import KVCache, ModelCache
from .size import flops_per_token, parameter_count
from .transformer import ModelOutput, Transformer, TransformerStack

__all__ = [
    "KVCache", "ModelCache", "ModelOutput", "SelfAttention", "Transformer", "TransformerStack",
    "flops_per_token",
    "parameter_count",
]
