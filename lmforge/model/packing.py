"""Skipping padding: run the position-wise layers on the real tokens only.

A padded batch (B, T) with a padding mask spends most of its compute in position-wise layers
(the Q/K/V/output projections, the MLP, norms, adapters): each row is handled on its own, so
padding rows are pure waste. On short-sentence data such as SST-2, two thirds of a batch can be
padding. :class:`Packing` remembers where the real tokens sit, so the stack can keep them as
rows (N, E), N = number of real tokens, and lay them out padded again only where tokens meet:
inside attention, where queries and keys need their (B, T) places.

    x (B, T, E) ──unpad──► (N, E) ──► norm, projections, MLP on N rows
                                       └─pad─► attention over (B, H, T, D) ─unpad─┘

The idea is the one behind "padding-free" training (e.g. FlashAttention's varlen kernels and
PyTorch's nested tensors); here attention itself still runs padded, on SDPA with the padding mask.
When every row's real tokens come first (right padding), a causal layer needs no mask at all: a
real query sees only keys at or before it, all real; the rows at padding positions are dropped
again by ``unpad``. Training then takes lmforge's native causal attention (see
:mod:`lmforge.kernels.causal`) as it does on an unpadded batch. Outputs at padding positions come
back as zeros.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from torch import Tensor


@dataclass
class Packing:
    """Where the real tokens of a padded batch are.

    mask: (B, T) boolean, True = a real token.
    index: (N,) flat positions b·T + t of the real tokens, in order.
    batch, length: B and T of the padded layout.
    """

    mask: Tensor
    index: Tensor
    batch: int
    length: int

    @classmethod
    def from_mask(cls, mask: Tensor) -> Packing:
        """From a (B, T) padding mask, True/1 = a real token."""
        B, T = mask.shape
        mask = mask.bool()
        return cls(mask, mask.reshape(-1).nonzero().squeeze(1), B, T)

    @cached_property
    def tokens_first(self) -> bool:
        """Whether every row's real tokens come before its padding (right padding); asked only
        by causal layers, once per batch."""
        return bool((self.mask[:, :-1] | ~self.mask[:, 1:]).all())  # no padding before a real token

    def unpad(self, x: Tensor) -> Tensor:
        """(B, T, ...) -> (N, ...): the real tokens' rows."""
        return x.reshape(self.batch * self.length, *x.shape[2:]).index_select(0, self.index)

    def pad(self, x: Tensor) -> Tensor:
        """(N, ...) -> (B, T, ...), zeros at the padding positions."""
        rows = x.new_zeros(self.batch * self.length, *x.shape[1:])
        return rows.index_copy(0, self.index, x).view(self.batch, self.length, *x.shape[1:])
