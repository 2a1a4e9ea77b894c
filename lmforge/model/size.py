"""How big a model of a config is, without building it: parameters and training FLOPs per token.

The count builds the model on PyTorch's ``meta`` device (shapes only, no memory), so it is exact
for every architecture, head and option the model supports. FLOPs follow the PaLM / nanoGPT
estimate used for model-FLOPs utilization (MFU).
"""

from __future__ import annotations

import torch

from ..config import ModelConfig
from .transformer import Transformer


def parameter_count(config: ModelConfig, *, non_embedding: bool = False) -> int:
    """Parameters of the model ``config`` builds (shared tensors once; ``non_embedding``: without
    the lookup-only tables, see :meth:`Transformer.num_params`)."""
    with torch.device("meta"):
        model = Transformer(config)
    return model.num_params(non_embedding=non_embedding)


def flops_per_token(config: ModelConfig, seq_len: int | None = None) -> float:
    """Training FLOPs per token (forward + backward): 6·N for the matrix multiplies of the
    non-embedding weights plus 12·L·H·D·T for the attention scores and mixing."""
    seq_len = seq_len or config.max_seq_len
    layers = config.num_layers + (config.num_decoder_layers or 0)
    assert config.head_dim is not None
    attention = 12 * layers * config.num_heads * config.head_dim * seq_len
    return 6 * parameter_count(config, non_embedding=True) + attention
