"""lmforge: build Transformer language models from scratch around a clear self-attention layer,
pretrain them, and adapt them with fine-tuning and parameter-efficient methods."""

from .config import PRESETS, ModelConfig
from .errors import LMForgeError
from .model import KVCache, ModelCache, ModelOutput, SelfAttention, Transformer
from .runs import LoadedRun, load, save_run

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "KVCache",
    "LMForgeError",
    "LoadedRun",
    "ModelCache",
    "ModelConfig",
    "ModelOutput",
    "SelfAttention",
    "Transformer",
    "__version__",
    "load",
    "save_run",
]
