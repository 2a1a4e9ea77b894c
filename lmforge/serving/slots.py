"""Key/value cache slots for continuous batching: one row of the cache per running request.

A server decodes many requests at once, each at its own length: request A has 40 tokens in the
cache, request B, which joined later, 7. :class:`SlotCache` keeps per decoder layer one buffer
(slots, Hkv, capacity, D) and per slot its own length. The running requests hold the first
``active`` rows (a request that leaves gives its row to the last one, so the batch stays a
contiguous block and the attention reads plain views, no gathering). Each decoding step writes
every row's new key/value at that row's own position and attends with a mask that hides, per row,
the positions past its length. The buffers grow (in steps of ``GROWTH`` positions) as the longest
request grows, up to ``max_context``.

The views handed to the attention layers (:class:`SlotView`) have the shape of
:class:`lmforge.model.KVCache` (``length``, ``update``, ``get``), so the model runs unchanged. The
idea is Orca's iteration-level scheduling (Yu et al., OSDI 2022) with a contiguous cache per slot;
vLLM's PagedAttention (Kwon et al., SOSP 2023) pages the cache instead, which matters when memory,
not compute, is short.
"""

from __future__ import annotations

import torch
from torch import Tensor

GROWTH = 256  # positions added to every slot's buffer when the longest request needs more room


class SlotView:
    """What one attention layer sees of a :class:`SlotCache` during one forward pass.

    Prefill (one row, ``T`` prompt tokens after ``past`` positions already there, e.g. a shared
    prefix copied in): keys are written at positions ``past … past+T−1`` of that row.
    Decode (the first ``B`` rows, one token each): row b's key is written at position
    ``lengths[b]``; the keys returned cover positions ``0 … max(lengths)`` of the ``B`` rows (a
    row's positions past its own length are stale and must be masked by the caller).
    """

    def __init__(
        self, keys: Tensor, values: Tensor, rows: Tensor | None, lengths: Tensor | None, past: int
    ) -> None:
        self.keys = keys  # (B, Hkv, capacity, D): a view of the first B slots (or of one slot)
        self.values = values
        self.rows = rows  # (B,) 0 … B−1 for a decoding step; None for a prefill
        self.lengths = lengths  # (B,) positions each row holds before this step; None for a prefill
        self.length = past  # what the stack reads as "cached positions" (the longest row)

    @property
    def max_seq_len(self) -> int:
        return self.keys.shape[2]

    def update(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Write the new keys/values (B, Hkv, T, D); return the keys/values to attend to (B, Hkv, S, D)."""
        if self.rows is None:  # prefill: T tokens of one slot, after its `length` positions
            new = keys.shape[2]
            self.keys.narrow(2, self.length, new).copy_(keys)
            self.values.narrow(2, self.length, new).copy_(values)
            self.length += new
        else:  # one token per row, each at its own position
            assert self.lengths is not None and keys.shape[2] == 1
            self.keys[self.rows, :, self.lengths] = keys[:, :, 0]  # (B, Hkv, D) at (row, ·, position)
            self.values[self.rows, :, self.lengths] = values[:, :, 0]
            self.length += 1
        return self.get()

    def get(self) -> tuple[Tensor, Tensor]:
        return self.keys.narrow(2, 0, self.length), self.values.narrow(2, 0, self.length)


class SlotCache:
    """The key/value buffers of every decoder layer for ``num_slots`` requests.

    Args:
        num_layers, num_kv_heads, head_dim: the decoder's shape.
        num_slots: the most requests decoded at once.
        max_context: the most positions one request may hold (prompt + new tokens).
        dtype, device: of the buffers (the model's).
    """

    def __init__(
        self,
        *,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_slots: int,
        max_context: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        if num_slots < 1 or max_context < 1:
            raise ValueError(f"num_slots {num_slots} and max_context {max_context} must be positive")
        self.shape = (num_slots, num_kv_heads, 0, head_dim)  # (slots, Hkv, capacity, D)
        self.num_layers = num_layers
        self.max_context = max_context
        self.dtype = dtype
        self.device = device
        self.keys: list[Tensor] = []
        self.values: list[Tensor] = []
        self.lengths = [0] * num_slots  # positions each slot holds
        self.capacity = 0
        self.reserve(min(GROWTH, max_context))

    @property
    def num_slots(self) -> int:
        return self.shape[0]

    def bytes_per_position(self) -> int:
        """Memory one position of one slot takes over all layers (keys and values)."""
        _, heads, _, dim = self.shape
        return 2 * self.num_layers * heads * dim * torch.empty((), dtype=self.dtype).element_size()

    def reserve(self, positions: int) -> None:
        """Make room for ``positions`` positions per slot (grown in steps of GROWTH, kept)."""
        if positions <= self.capacity:
            return
        if positions > self.max_context:
            raise ValueError(f"{positions} positions asked, the slots hold at most {self.max_context}")
        capacity = min(self.max_context, -(-positions // GROWTH) * GROWTH)
        slots, heads, _, dim = self.shape
        grown_keys, grown_values = [], []
        for layer in range(self.num_layers):
            keys = torch.zeros(slots, heads, capacity, dim, dtype=self.dtype, device=self.device)
            values = torch.zeros_like(keys)
            if self.capacity:
                keys.narrow(2, 0, self.capacity).copy_(self.keys[layer])
                values.narrow(2, 0, self.capacity).copy_(self.values[layer])
            grown_keys.append(keys)
            grown_values.append(values)
        self.keys, self.values, self.capacity = grown_keys, grown_values, capacity

    def prefill_views(self, slot: int, *, past: int = 0) -> list[SlotView]:
        """Views that write a prompt into ``slot`` after its first ``past`` positions (0: its old
        content is dropped; more: a prefix put there by :meth:`write_prefix`)."""
        self.lengths[slot] = past
        return [
            SlotView(k.narrow(0, slot, 1), v.narrow(0, slot, 1), None, None, past)
            for k, v in zip(self.keys, self.values, strict=True)
        ]

    def read_prefix(self, slot: int, length: int) -> list[tuple[Tensor, Tensor]]:
        """A copy of the first ``length`` positions of ``slot``: per layer (keys, values), each
        (Hkv, length, D)."""
        return [
            (k[slot, :, :length].clone(), v[slot, :, :length].clone())
            for k, v in zip(self.keys, self.values, strict=True)
        ]

    def write_prefix(self, slot: int, prefix: list[tuple[Tensor, Tensor]], length: int) -> None:
        """Put the first ``length`` positions of a :meth:`read_prefix` copy into ``slot``."""
        for (keys, values), (k, v) in zip(prefix, zip(self.keys, self.values, strict=True), strict=True):
            k[slot, :, :length] = keys[:, :length]
            v[slot, :, :length] = values[:, :length]

    def decode_views(self, active: int) -> tuple[list[SlotView], Tensor, Tensor | None]:
        """Views for one decoding step of slots ``0 … active−1`` (one new token each).

        Returns:
            the views (one per layer); the position of each row's new token (B,), which is also
            its position id; and the (B, S) mask of the keys each row may see (True = attend),
            None when every row has the same length (nothing to hide).
        """
        lengths = torch.tensor(self.lengths[:active], dtype=torch.long, device=self.device)  # (B,)
        longest = max(self.lengths[:active])
        self.reserve(longest + 1)
        rows = torch.arange(active, device=self.device)
        views = [
            SlotView(k.narrow(0, 0, active), v.narrow(0, 0, active), rows, lengths, longest)
            for k, v in zip(self.keys, self.values, strict=True)
        ]
        mask = None
        if min(self.lengths[:active]) != longest:
            mask = torch.arange(longest + 1, device=self.device)[None, :] <= lengths[:, None]  # (B, S)
        return views, lengths, mask

    def advance(self, slot: int, positions: int = 1) -> None:
        """Record that ``slot`` holds ``positions`` more positions (after a step wrote them)."""
        self.lengths[slot] += positions

    def move(self, source: int, target: int) -> None:
        """Give slot ``target`` the content of slot ``source`` (a request changes rows)."""
        if source == target:
            return
        length = self.lengths[source]
        for keys, values in zip(self.keys, self.values, strict=True):
            keys[target, :, :length] = keys[source, :, :length]
            values[target, :, :length] = values[source, :, :length]
        self.lengths[target] = length
        self.lengths[source] = 0
