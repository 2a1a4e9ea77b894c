"""The model core: attention, positions, layers, the Transformer and its heads."""

from .attention import SelfAttention
from .kv_cache import KVCache, ModelCache
from .transformer import ModelOutput, Transformer, TransformerStack

__all__ = ["KVCache", "ModelCache", "ModelOutput", "SelfAttention", "Transformer", "TransformerStack"]
