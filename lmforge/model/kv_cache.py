"""Key/value cache for incremental decoding.

When a decoder generates token t it needs the keys and values of tokens 0..t-1, which do not
change: recomputing them every step makes generation quadratic. The cache keeps them in buffers
allocated once at full length (no reallocation per token) and hands the attention layer views of
the filled part. Reference: the "incremental state" of fairseq, the KV cache of litgpt and
x-transformers.
"""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    """Preallocated key/value buffers of one attention layer.

    Args:
        batch_size: number of sequences decoded together.
        max_seq_len: capacity in positions.
        num_kv_heads: key/value heads of the layer (Hkv).
        head_dim: width of one head (D).
        dtype, device: of the buffers; match the model's.
    """

    def __init__(
        self,
        batch_size: int,
        max_seq_len: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        shape = (batch_size, num_kv_heads, max_seq_len, head_dim)  # (B, Hkv, S_max, D)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    @property
    def max_seq_len(self) -> int:
        return self.keys.shape[2]

    def update(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Append new keys/values (B, Hkv, T, D); return everything cached so far (B, Hkv, S, D)."""
        start, new = self.length, keys.shape[2]
        end = start + new
        if end > self.max_seq_len:
            raise ValueError(f"KV cache is full: {end} positions asked, capacity {self.max_seq_len}")
        # narrow() views are cheaper than slicing with [:, :, a:b] (this runs once per layer per token)
        self.keys.narrow(2, start, new).copy_(keys)
        self.values.narrow(2, start, new).copy_(values)
        self.length = end
        return self.keys.narrow(2, 0, end), self.values.narrow(2, 0, end)

    def get(self) -> tuple[Tensor, Tensor]:
        """The filled part without adding anything (B, Hkv, S, D)."""
        return self.keys.narrow(2, 0, self.length), self.values.narrow(2, 0, self.length)

    def reset(self) -> None:
        """Forget everything (the buffers stay allocated)."""
        self.length = 0

    def truncate(self, length: int) -> None:
        """Forget every position from ``length`` on, keeping the first ``length`` (a shared
        prompt prefix kept while what followed it is replaced)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a KV cache of {self.length} positions to {length}")
        self.length = length

    def reorder(self, batch_indices: Tensor) -> None:
        """Keep/duplicate sequences along the batch, e.g. the surviving beams of beam search."""
        self.keys = self.keys.index_select(0, batch_indices)
        self.values = self.values.index_select(0, batch_indices)


class ModelCache:
    """The caches of a whole model: one :class:`KVCache` per decoder layer for self-attention and,
    for encoder-decoder models, one per layer holding the projected encoder memory (filled on the
    first step, then reused)."""

    def __init__(self, self_attention: list[KVCache], cross_attention: list[KVCache] | None = None) -> None:
        self.self_attention = self_attention
        self.cross_attention = cross_attention

    @property
    def length(self) -> int:
        """Positions already decoded (the offset of the next token)."""
        return self.self_attention[0].length if self.self_attention else 0

    def reset(self) -> None:
        for cache in self.self_attention + (self.cross_attention or []):
            cache.reset()

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` decoded positions of every self-attention cache (the
        cross-attention memory stays): a causal model's keys at those positions depend only on
        the tokens before them, so what follows can be replaced by other tokens exactly."""
        for cache in self.self_attention:
            cache.truncate(length)

    def reorder(self, batch_indices: Tensor) -> None:
        for cache in self.self_attention + (self.cross_attention or []):
            cache.reorder(batch_indices)
