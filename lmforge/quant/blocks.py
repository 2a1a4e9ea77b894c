"""Weights kept in the blocks GGUF files keep them in (:mod:`lmforge.quant`): found exactly in a
float weight, multiplied by the native kernel without ever being widened."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels import (
    BLOCK,
    block_dequantize,
    block_find,
    block_kernels,
    block_matmul,
    block_matmul_op,
    check_blocks,
)
from .dense import Fused
from .int8 import quantize_int8

# From this many rows of x on, a block layer multiplies its dequantized weight with BLAS. Measured on
# SmolLM2's layers, one pass: the native kernel wins below (16 rows 80 ms, against 208 ms for
# dequantizing and BLAS; 64 rows 303 against 415 ms), and loses above (96 rows: 608 against 506 ms).
MANY_ROWS = 80
# The grids of GGUF's block formats: weights w = d·q (+ m) per block of 32 columns, q integer.
# (format, the largest |q| (no offset) or q's span (with an offset), offset or not)
GRIDS = (
    ("q8_0", 127, False),
    ("q4_0", 8, False),
    ("q5_0", 16, False),
    ("q4_1", 15, True),
    ("q5_1", 31, True),
)


class BlockLinear(nn.Module):
    """A linear layer whose weight is kept as GGUF block formats keep it: an int8 code per weight
    and, per block of 32 columns of a row, a scale d (and an offset m), w = d·q (+ m). Found
    exactly in a float weight (:meth:`from_linear`: the values a Q8_0/Q4_0/Q5_0/Q4_1/Q5_1 file
    was dequantized to), it is the same weight in 1.13–1.25 bytes per weight instead of 4: the
    native kernel (:mod:`lmforge.kernels`) multiplies in float32 without ever widening it, which
    makes one-row products (decoding) faster. Many rows at once (a long prompt) use BLAS on the weight
    dequantized for the call. Inference only: with gradients wanted it multiplies the
    dequantized weight with ``F.linear``.

    Args:
        codes: (N, K) int8.
        scales: (N, K / 32) float32.
        offsets: (N, K / 32) float32, or None.
        bias: (N,) or None.
        kind: the block format found (``q4_1`` …), for the layer's description.
    """

    def __init__(
        self, codes: Tensor, scales: Tensor, offsets: Tensor | None, bias: Tensor | None, kind: str
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.kind = kind
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)
        self.register_buffer("offsets", offsets)
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())
        check_blocks(self.codes, self.scales, self.offsets, self.bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> BlockLinear | None:
        """The layer in blocks when its weight lies exactly on one of GGUF's block grids
        (:data:`GRIDS`) and the kernels are built here; else None."""
        found = find_blocks(linear.weight)
        return None if found is None else cls(*found[1:], linear.bias, found[0])

    @classmethod
    def quantized(cls, linear: nn.Linear) -> BlockLinear:
        """An ``nn.Linear`` quantized to int8 blocks (GGUF's Q8_0 layout: one absmax scale per 32
        columns, kept in float32; :func:`quantize_int8`). Its input width must divide by 32."""
        N, K = linear.weight.shape
        codes, scales = quantize_int8(linear.weight, BLOCK)  # (G, N, 32), (G, N)
        codes = codes.transpose(0, 1).reshape(N, K).contiguous()
        return cls(codes, scales.t().contiguous(), None, linear.bias, "int8")

    @property
    def weight(self) -> Tensor:
        """The (N, K) float32 weight, dequantized: a new tensor (changing it changes nothing)."""
        return block_dequantize(self.codes, self.scales, self.offsets)

    def forward(self, x: Tensor) -> Tensor:
        # A one-token step calls this for every layer: each attribute read once, no needless casts.
        codes, scales, offsets, bias = self.codes, self.scales, self.offsets, self.bias
        rows = x.reshape(-1, self.in_features)
        if (torch.is_grad_enabled() and x.requires_grad) or rows.shape[0] >= MANY_ROWS:
            out = F.linear(rows, block_dequantize(codes, scales, offsets), bias)
        else:
            rows = (rows if rows.dtype is torch.float32 else rows.float()).contiguous()
            if torch.compiler.is_compiling():
                out = block_matmul_op(rows, codes, scales, offsets, bias)
            else:
                if scales.dtype is not torch.float32 or not codes.is_cpu:  # moved since checked: refused
                    check_blocks(codes, scales, offsets, bias)
                out = block_matmul(rows, codes, scales, offsets, bias, checked=True)
        out = out.view(*x.shape[:-1], self.out_features)
        return out if out.dtype is x.dtype else out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, blocks={self.kind}"


class FusedBlockLinear(Fused, BlockLinear):
    """:class:`BlockLinear` layers that read the same input as one (Q/K/V; gate/up): their rows
    stacked, each part a :class:`BlockLinear` over its rows (views), used while
    :meth:`covers` holds, as :class:`FusedDecodeLinear` is."""

    def __init__(self, parts: Sequence[BlockLinear]) -> None:
        offsets = None if parts[0].offsets is None else torch.cat([p.offsets for p in parts])
        biases = [p.bias for p in parts]
        bias = None if biases[0] is None else torch.cat(biases)
        kinds = sorted({p.kind for p in parts})
        super().__init__(
            torch.cat([p.codes for p in parts]),
            torch.cat([p.scales for p in parts]),
            offsets,
            bias,
            "+".join(kinds),
        )
        views, start = [], 0
        for part in parts:
            rows = slice(start, start + part.out_features)
            view_offsets = None if self.offsets is None else self.offsets[rows]
            views.append(BlockLinear(self.codes[rows], self.scales[rows], view_offsets, part.bias, part.kind))
            start += part.out_features
        self.parts = tuple(views)


def find_blocks(weight: Tensor) -> tuple[str, Tensor, Tensor, Tensor | None] | None:
    """``weight`` (N, K) as (format, codes, scales, offsets) when every block of 32 columns is
    exactly d·q (+ m) on one of :data:`GRIDS` (:func:`lmforge.kernels.block_find`: GGUF files
    keep d and m in float16 and put a block's largest |w| on q = ±span, or its smallest on q = 0
    and its largest on q = span); None when it is not (a trained float weight never is, and fails
    at its first weight), when K is no multiple of 32 or the kernels are not built here."""
    N, K = weight.shape
    if K % BLOCK or weight.dtype != torch.float32 or weight.device.type != "cpu" or block_kernels() is None:
        return None
    w = weight.detach().contiguous()
    for kind, span, offset in GRIDS:
        found = block_find(w, span, offset)
        if found is not None:
            return (kind, *found)
    return None
