"""Position information for attention, each kind as its own small module.

- Learned absolute positions (GPT-2, BERT): a table of trainable vectors added to the embeddings.
- Sinusoidal positions (Vaswani et al. 2017, §3.5): the fixed sin/cos table, added to the embeddings.
- RoPE (Su et al. 2021, "RoFormer"): rotates query/key pairs by an angle proportional to the
  position, so q·k depends only on the relative offset. Uses the "rotate half" pairing of
  GPT-NeoX / Hugging Face Llama, so Hugging Face weights load without permutation.
- ALiBi (Press et al. 2022, "Train Short, Test Long"): no embeddings at all; a per-head linear
  penalty on the query-key distance is added to the attention scores.
- T5 relative position bias (Raffel et al. 2020, §2.1): a learned scalar per head and per
  log-spaced distance bucket, added to the attention scores.

The first two are added to the input embeddings; RoPE is applied inside the attention layer to
Q and K; ALiBi and the relative bias produce an additive score bias of shape (1, H, T, S).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def check_positions(position_ids: Tensor, max_seq_len: int) -> None:
    """Explain a position past the end of a table (skipped under torch.compile: it would sync)."""
    if torch.compiler.is_compiling() or not position_ids.numel():
        return
    largest = int(position_ids.max())
    if largest >= max_seq_len:
        raise ValueError(f"position {largest} is past max_seq_len {max_seq_len} of the position table")


class LearnedPositions(nn.Module):
    """A trainable vector per position, up to ``max_seq_len``."""

    def __init__(self, max_seq_len: int, dim: int) -> None:
        super().__init__()
        self.max_seq_len = max_seq_len
        self.weight = nn.Parameter(torch.zeros(max_seq_len, dim))

    def forward(self, position_ids: Tensor, *, checked: bool = False) -> Tensor:
        """position_ids (..., T) integer -> (..., T, dim) (``checked``: the caller knows they fit)."""
        if not checked:
            check_positions(position_ids, self.max_seq_len)
        return self.weight[position_ids]


def sinusoid_table(num_positions: int, dim: int, base: float = 10000.0) -> Tensor:
    """The fixed (num_positions, dim) table: even columns sin(p / base^(2i/dim)), odd columns cos."""
    position = torch.arange(num_positions, dtype=torch.float32)[:, None]
    inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(base) / dim))
    table = torch.zeros(num_positions, dim)
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq[: dim // 2])
    return table


class SinusoidalPositions(nn.Module):
    """The fixed sin/cos positions of the original Transformer (no parameters)."""

    def __init__(self, max_seq_len: int, dim: int) -> None:
        super().__init__()
        self.max_seq_len = max_seq_len
        self.register_buffer("table", sinusoid_table(max_seq_len, dim), persistent=False)

    def forward(self, position_ids: Tensor, *, checked: bool = False) -> Tensor:
        """position_ids (..., T) integer -> (..., T, dim) (``checked``: the caller knows they fit)."""
        if not checked:
            check_positions(position_ids, self.max_seq_len)
        return self.table[position_ids]


class RotaryEmbedding(nn.Module):
    """RoPE angles for given positions: ``cos, sin`` of shape (..., T, rotary_dim).

    Args:
        head_dim: width of one attention head.
        base: the θ of the paper (10,000; Llama 3 uses 500,000).
        rotary_dim: how many leading dimensions of each head rotate (all by default).
    """

    def __init__(self, head_dim: int, *, base: float = 10000.0, rotary_dim: int | None = None) -> None:
        super().__init__()
        rotary_dim = rotary_dim or head_dim
        if rotary_dim % 2 or rotary_dim > head_dim:
            raise ValueError(f"rotary_dim {rotary_dim} must be even and at most head_dim {head_dim}")
        self.rotary_dim = rotary_dim
        self.base = base
        inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """position_ids (T,) or (B, T) -> cos, sin each (T, rotary_dim) or (B, T, rotary_dim), fp32."""
        freqs = position_ids.to(torch.float32)[..., None] * self.inv_freq  # (..., T, rotary_dim/2)
        angles = torch.cat((freqs, freqs), dim=-1)  # (..., T, rotary_dim): pairs (i, i + rotary_dim/2)
        return angles.cos(), angles.sin()


def rotate_half(x: Tensor) -> Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (B, H, T, D) by the angles cos/sin of shape (T, R) or (B, T, R), R <= D.

    Only the first R dimensions of each head rotate; the rest pass through (partial rotary).
    The arithmetic runs in x's dtype, as in Hugging Face Llama.
    """
    if cos.dim() == 3:  # (B, T, R) -> (B, 1, T, R): same angles for every head
        cos, sin = cos[:, None], sin[:, None]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    rotary_dim = cos.shape[-1]
    if rotary_dim == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)


def alibi_slopes(num_heads: int) -> Tensor:
    """The head-specific slopes m of ALiBi: a geometric sequence starting at 2^(-8/n).

    For a head count that is not a power of two, the paper's recipe: the slopes of the closest
    smaller power of two, then every other slope of the next power of two.
    """

    def power_of_two_slopes(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** math.floor(math.log2(num_heads))
    slopes = power_of_two_slopes(closest)
    if closest < num_heads:
        slopes += power_of_two_slopes(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


class ALiBi(nn.Module):
    """Attention with Linear Biases: score bias −m_h·|i − j| for query i, key j, head h."""

    def __init__(self, num_heads: int) -> None:
        super().__init__()
        self.register_buffer("slopes", alibi_slopes(num_heads), persistent=False)

    def forward(self, query_positions: Tensor, key_positions: Tensor) -> Tensor:
        """(T,), (S,) integer positions -> additive bias (1, H, T, S) in fp32."""
        distance = (query_positions[:, None] - key_positions[None, :]).abs().to(torch.float32)  # (T, S)
        return (-self.slopes[:, None, None] * distance)[None]  # (1, H, T, S)


def relative_position_bucket(
    relative_position: Tensor, *, bidirectional: bool, num_buckets: int, max_distance: int
) -> Tensor:
    """Map key−query offsets to T5's buckets: exact for small distances, log-spaced up to max_distance."""
    bucket = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        bucket += (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:  # a decoder only looks back: future offsets all share bucket 0
        distance = -torch.clamp(relative_position, max=0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    log_bucket = (
        max_exact
        + (
            torch.log(distance.float().clamp(min=1) / max_exact)
            / math.log(max_distance / max_exact)
            * (num_buckets - max_exact)
        ).long()
    )
    log_bucket = torch.clamp(log_bucket, max=num_buckets - 1)
    return bucket + torch.where(is_small, distance, log_bucket)


class RelativePositionBias(nn.Module):
    """T5's learned relative position bias: one scalar per (distance bucket, head)."""

    def __init__(
        self, num_heads: int, *, bidirectional: bool, num_buckets: int = 32, max_distance: int = 128
    ) -> None:
        super().__init__()
        self.bidirectional = bidirectional
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def forward(self, query_positions: Tensor, key_positions: Tensor) -> Tensor:
        """(T,), (S,) integer positions -> additive bias (1, H, T, S)."""
        relative = key_positions[None, :] - query_positions[:, None]  # (T, S)
        buckets = relative_position_bucket(
            relative,
            bidirectional=self.bidirectional,
            num_buckets=self.num_buckets,
            max_distance=self.max_distance,
        )
        return self.embedding(buckets).permute(2, 0, 1)[None]  # (T, S, H) -> (1, H, T, S)
