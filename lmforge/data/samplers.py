"""Batch sources over token shards: random windows, document chunks, sequential evaluation.

- :class:`RandomWindows` — causal LM training as nanoGPT's ``get_batch``: B windows of T + 1
  tokens at uniformly random offsets of the packed token stream (documents joined by eos).
- :class:`DocumentChunks` — masked LM and span corruption: each sequence comes from *one*
  document (long documents are cut into consecutive chunks, never joined with the next one),
  shuffled per epoch, turned into a batch by a collator.
- :class:`EvalWindows` — validation loss: consecutive windows that predict every token of the
  split exactly once (the last window padded), in order.

Every source is an iterable of batches with ``state_dict()`` / ``load_state_dict()``: the state is
its position and random state, small and JSON-serializable, so a run resumed at step k draws
exactly the batches an uninterrupted run would. The state is read and advanced by each batch
drawn, so save it between batches (the training loop does).

The training sources are rank-aware (:mod:`lmforge.runtime`): in a job of N processes every rank
draws the same *global* batch of N × batch_size sequences and keeps its own slice of it, so N
ranks with batch b train on exactly the rows one process with batch N·b would (the same numbers,
to float rounding). A saved position can only be resumed by a job of the same size.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from ..errors import LMForgeError
from ..objectives.base import IGNORE_INDEX, Batch
from ..runtime import rank as current_rank
from ..runtime import world_size as current_world_size
from .collate import MaskedLMCollator, SpanCorruptionCollator
from .shards import ShardSplit

if TYPE_CHECKING:
    from ..tokenizers import Tokenizer


class Collator(Protocol):
    def chunk_length(self, seq_len: int) -> int: ...

    def __call__(self, rows: list[np.ndarray], rng: np.random.Generator) -> Batch: ...


def _check_positive(**values: int) -> None:
    for key, value in values.items():
        if value < 1:
            raise LMForgeError(f"{key} = {value}: must be at least 1", key=key)


def ranks(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world size): the given values, else this process's (:mod:`lmforge.runtime`)."""
    r = current_rank() if rank is None else rank
    n = current_world_size() if world_size is None else world_size
    if not 0 <= r < n:
        raise ValueError(f"rank {r} is outside a world of {n} processes")
    return r, n


def check_same_world(state: dict[str, Any], world_size: int) -> None:
    """A data position saved by a job of another size cannot be resumed: one clear line."""
    saved = int(state.get("world_size", 1))
    if saved != world_size:
        raise LMForgeError(
            f"the checkpoint's data position was saved by {saved} process(es), this job has {world_size}: "
            "resume with the same number of processes"
        )


class RandomWindows:
    """Endless causal-LM batches: ``input_ids`` = window[:T], ``labels`` = window[1:] (shifted).

    Args:
        split: the tokens to sample from.
        seq_len: T, tokens per sequence.
        batch_size: B, sequences per batch.
        seed: seeds the offsets.
        rank, world_size: this process's place in the job (default: :mod:`lmforge.runtime`'s);
            every rank draws the same world_size × B offsets and keeps its B of them.
    """

    def __init__(
        self,
        split: ShardSplit,
        *,
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        _check_positive(seq_len=seq_len, batch_size=batch_size)
        if split.num_tokens < seq_len + 1:
            raise LMForgeError(
                f"the {split.name} split has {split.num_tokens} tokens, fewer than seq_len + 1 = {seq_len + 1}",
                key="seq_len",
            )
        self.split = split
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.rank, self.world_size = ranks(rank, world_size)
        self.rng = np.random.default_rng(seed)
        self.batches = 0  # batches drawn so far

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next_batch()

    def next_batch(self) -> Batch:
        T = self.seq_len
        B = self.batch_size
        everyone = self.rng.integers(0, self.split.num_tokens - T, size=B * self.world_size)  # (N·B,)
        starts = everyone[self.rank * B : (self.rank + 1) * B]  # (B,) this rank's slice
        windows = np.stack([self.split.tokens[s : s + T + 1] for s in starts]).astype(np.int64)  # (B, T+1)
        self.batches += 1
        windows_t = torch.from_numpy(windows)
        return {
            "input_ids": windows_t[:, :-1],
            "attention_mask": torch.ones(self.batch_size, T, dtype=torch.bool),
            "labels": windows_t[:, 1:],
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "random_windows",
            "seed": self.seed,
            "batches": self.batches,
            "rng": self.rng.bit_generator.state,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "random_windows":
            raise LMForgeError(f"the saved data position is for {state.get('kind')!r}, not random_windows")
        check_same_world(state, self.world_size)
        self.seed = state["seed"]
        self.batches = state["batches"]
        self.rng.bit_generator.state = state["rng"]


class DocumentChunks:
    """Batches of document chunks: no sequence spans two documents.

    Documents are cut into consecutive chunks of ``collator.chunk_length(seq_len)`` tokens; an
    epoch visits every chunk once (shuffled with ``shuffle``); the collator builds each batch
    with a generator seeded by (seed, epoch, position), so masks are reproducible.

    Args:
        split: the documents.
        seq_len: the longest sequence the collator may produce.
        batch_size: chunks per batch (an epoch's last batch may be smaller).
        collator: e.g. :class:`~lmforge.data.MaskedLMCollator`.
        seed: seeds the order and the collator.
        shuffle: a new random order each epoch (False: document order).
        epochs: stop after this many epochs (None: endless); a finished source starts over
            when iterated again (for repeated evaluations).
        min_tokens: shorter chunks (a document's tail) are left out.
        rank, world_size: this process's place in the job (default: :mod:`lmforge.runtime`'s);
            a training source (``shuffle``) deals each global batch of world_size × batch_size
            chunks out in slices, one per rank (an epoch's tail with fewer chunks than ranks is
            left out); an evaluation source (no ``shuffle``) serves every chunk to every rank.
    """

    def __init__(
        self,
        split: ShardSplit,
        *,
        seq_len: int,
        batch_size: int,
        collator: Collator,
        seed: int = 0,
        shuffle: bool = True,
        epochs: int | None = None,
        min_tokens: int = 2,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        _check_positive(seq_len=seq_len, batch_size=batch_size)
        self.split = split
        self.batch_size = batch_size
        self.collator = collator
        self.seed = seed
        self.shuffle = shuffle
        self.epochs = epochs
        self.rank, self.world_size = ranks(rank, world_size) if shuffle else (0, 1)
        self.chunk_len = collator.chunk_length(seq_len)
        docs = split.documents[:, :2]
        lengths = docs[:, 1] - docs[:, 0]
        counts = -(-lengths // self.chunk_len)  # chunks per document
        first = np.repeat(docs[:, 0], counts)
        index_in_doc = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        starts = first + index_in_doc * self.chunk_len
        ends = np.minimum(starts + self.chunk_len, np.repeat(docs[:, 1], counts))
        keep = ends - starts >= min_tokens
        self.chunks = np.stack([starts[keep], ends[keep]], axis=1)  # (N, 2) token ranges
        if len(self.chunks) == 0:
            raise LMForgeError(f"the {split.name} split has no document of at least {min_tokens} tokens")
        self.epoch = 0
        self.position = 0  # chunks of this epoch already served
        self._order: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        """Batches per epoch."""
        return -(-self._served() // (self.batch_size * self.world_size))

    def _served(self) -> int:
        """Chunks an epoch serves: all, less a tail too short to give every rank one."""
        n = len(self.chunks)
        tail = n % (self.batch_size * self.world_size)
        return n - tail if 0 < tail < self.world_size else n

    def _epoch_order(self) -> np.ndarray:
        if self._order is None or self._order[0] != self.epoch:
            order = (
                np.random.default_rng([self.seed, self.epoch]).permutation(len(self.chunks))
                if self.shuffle
                else np.arange(len(self.chunks))
            )
            self._order = (self.epoch, order[: self._served()])
        return self._order[1]

    def __iter__(self) -> Iterator[Batch]:
        if self.epochs is not None and self.epoch >= self.epochs:
            self.epoch, self.position = 0, 0
        while self.epochs is None or self.epoch < self.epochs:
            yield self.next_batch()

    def next_batch(self) -> Batch:
        order = self._epoch_order()
        everyone = order[self.position : self.position + self.batch_size * self.world_size]
        picked = np.array_split(everyone, self.world_size)[self.rank]
        seed = [self.seed, self.epoch, self.position, 1] + ([self.rank] if self.world_size > 1 else [])
        rng = np.random.default_rng(seed)
        rows = [np.asarray(self.split.tokens[s:e], dtype=np.int64) for s, e in self.chunks[picked]]
        self.position += len(everyone)
        if self.position >= len(order):
            self.epoch, self.position = self.epoch + 1, 0
        return self.collator(rows, rng)

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "document_chunks",
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self.position,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "document_chunks":
            raise LMForgeError(f"the saved data position is for {state.get('kind')!r}, not document_chunks")
        check_same_world(state, self.world_size)
        self.seed, self.epoch, self.position = state["seed"], state["epoch"], state["position"]


class EvalWindows:
    """Sequential causal-LM batches covering a split: every token but the first is a target
    exactly once. Finite; each iteration starts from the beginning.

    Args:
        split: the tokens.
        seq_len: T, tokens per window.
        batch_size: windows per batch.
        pad_id: the id written into the padding of the last window (masked, never a target).
        max_batches: evaluate on this many batches of evenly spaced windows instead of all.
    """

    def __init__(
        self,
        split: ShardSplit,
        *,
        seq_len: int,
        batch_size: int,
        pad_id: int = 0,
        max_batches: int | None = None,
    ) -> None:
        _check_positive(seq_len=seq_len, batch_size=batch_size)
        if split.num_tokens < 2:
            raise LMForgeError(f"the {split.name} split has fewer than 2 tokens", key="seq_len")
        self.split = split
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.pad_id = pad_id
        starts = np.arange(0, split.num_tokens - 1, seq_len)  # window s predicts tokens s+1 … s+T
        if max_batches is not None and max_batches * batch_size < len(starts):
            pick = np.unique(
                np.linspace(0, len(starts) - 1, max_batches * batch_size).round().astype(np.int64)
            )
            starts = starts[pick]
        self.starts = starts
        self.position = 0

    def __len__(self) -> int:
        return -(-len(self.starts) // self.batch_size)

    @property
    def num_targets(self) -> int:
        """Targets over one full pass."""
        n = self.split.num_tokens
        return int(sum(min(self.seq_len, n - 1 - s) for s in self.starts.tolist()))

    def __iter__(self) -> Iterator[Batch]:
        self.position = 0
        while self.position < len(self.starts):
            yield self.next_batch()

    def next_batch(self) -> Batch:
        T, n = self.seq_len, self.split.num_tokens
        picked = self.starts[self.position : self.position + self.batch_size]
        self.position += len(picked)
        input_ids = np.full((len(picked), T), self.pad_id, dtype=np.int64)
        labels = np.full((len(picked), T), IGNORE_INDEX, dtype=np.int64)
        attention_mask = np.zeros((len(picked), T), dtype=bool)
        for i, s in enumerate(picked.tolist()):
            length = min(T, n - 1 - s)
            window = np.asarray(self.split.tokens[s : s + length + 1], dtype=np.int64)
            input_ids[i, :length] = window[:-1]
            labels[i, :length] = window[1:]
            attention_mask[i, :length] = True
        return {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(attention_mask),
            "labels": torch.from_numpy(labels),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "eval_windows", "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = state["position"]


def pretraining_batches(
    split: ShardSplit,
    tokenizer: Tokenizer,
    *,
    objective: str,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    evaluation: bool = False,
    whole_word: bool = False,
    max_batches: int | None = None,
) -> RandomWindows | DocumentChunks | EvalWindows:
    """The batch source an objective trains (or evaluates) on.

    ``causal_lm``: :class:`RandomWindows` (training) or :class:`EvalWindows` (evaluation, every
    token once); ``masked_lm`` / ``span_corruption``: :class:`DocumentChunks` with the matching
    collator, shuffled and endless for training, in order, one epoch and a fixed seed for
    evaluation (the same masks every time).
    """
    if objective == "causal_lm":
        if evaluation:
            pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
            return EvalWindows(
                split, seq_len=seq_len, batch_size=batch_size, pad_id=pad, max_batches=max_batches
            )
        return RandomWindows(split, seq_len=seq_len, batch_size=batch_size, seed=seed)
    if objective == "masked_lm":
        collator: Collator = MaskedLMCollator(tokenizer, whole_word=whole_word)
    elif objective == "span_corruption":
        collator = SpanCorruptionCollator(tokenizer)
    else:
        raise LMForgeError(
            f"unknown objective '{objective}' (one of causal_lm, masked_lm, span_corruption)", key="objective"
        )
    return DocumentChunks(
        split,
        seq_len=seq_len,
        batch_size=batch_size,
        collator=collator,
        seed=seed,
        shuffle=not evaluation,
        epochs=1 if evaluation else None,
    )
