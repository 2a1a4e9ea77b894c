"""Collators: lists of token sequences (numpy) → padded batches of tensors.

A batch is a ``dict[str, Tensor]``: ``input_ids`` (B, T) long, ``attention_mask`` (B, T) bool
(True = real token), ``labels`` long with -100 where nothing is predicted; encoder-decoder batches
add ``decoder_input_ids`` and ``decoder_attention_mask``, with ``labels`` on the decoder side.

A collator is called as ``collator(rows, rng)`` with the batch source's generator (masking and
span choices are random and must be reproducible) and says, via ``chunk_length(seq_len)``, how
many raw tokens of a document it turns into a sequence of at most ``seq_len``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from ..errors import LMForgeError
from ..objectives.base import IGNORE_INDEX, Batch
from ..objectives.masked_lm import mask_tokens
from ..objectives.span_corruption import (
    corrupt_spans,
    decoder_start_id,
    num_noise_spans,
    random_spans_noise_mask,
)

if TYPE_CHECKING:
    from ..tokenizers import Tokenizer


def pad_rows(rows: Sequence[np.ndarray], value: int, *, length: int | None = None) -> np.ndarray:
    """Right-pad 1-D integer arrays into a (B, T) int64 array (T: the longest row, or ``length``)."""
    T = length if length is not None else max((len(r) for r in rows), default=0)
    out = np.full((len(rows), T), value, dtype=np.int64)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def _mask_of(rows: Sequence[np.ndarray], T: int) -> Tensor:
    lengths = torch.tensor([len(r) for r in rows])
    return torch.arange(T)[None, :] < lengths[:, None]  # (B, T) True = real token


def _require(tokenizer: Tokenizer, role: str, what: str) -> int:
    token_id = getattr(tokenizer, f"{role}_id")
    if token_id is None:
        raise LMForgeError(f"{what} needs a {role} token, the tokenizer has none", key=role)
    return token_id


class CausalLMCollator:
    """Next-token batches from whole document chunks (no window crosses a document): a chunk of
    T + 1 tokens gives ``input_ids`` = its first T, ``labels`` = its last T (shifted, see
    :mod:`lmforge.objectives.causal_lm`); padding is masked and ignored."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.pad_id = _require(tokenizer, "pad", "causal LM padding")

    def chunk_length(self, seq_len: int) -> int:
        return seq_len + 1

    def __call__(self, rows: Sequence[np.ndarray], rng: np.random.Generator) -> Batch:
        inputs = [r[:-1] for r in rows]
        T = max(len(r) for r in inputs)
        input_ids = pad_rows(inputs, self.pad_id, length=T)
        labels = pad_rows([r[1:] for r in rows], IGNORE_INDEX, length=T)
        return {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": _mask_of(inputs, T),
            "labels": torch.from_numpy(labels),
        }


class MaskedLMCollator:
    """BERT masked-LM batches: ``[CLS] chunk [SEP]`` (when the tokenizer has both), padded,
    then 15% of the non-special tokens selected and replaced 80/10/10.

    Args:
        tokenizer: needs mask and pad tokens.
        probability: share of tokens selected per sequence.
        mask_fraction / random_fraction: replacement shares (the rest stay unchanged).
        whole_word: select whole words (all their pieces) using the tokenizer's word boundaries.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        probability: float = 0.15,
        mask_fraction: float = 0.8,
        random_fraction: float = 0.1,
        whole_word: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.mask_id = _require(tokenizer, "mask", "masked LM")
        self.pad_id = _require(tokenizer, "pad", "masked LM padding")
        self.cls_id, self.sep_id = tokenizer.cls_id, tokenizer.sep_id
        self.probability = probability
        self.mask_fraction = mask_fraction
        self.random_fraction = random_fraction
        self.whole_word = whole_word
        special = np.zeros(tokenizer.vocab_size, dtype=bool)
        special[tokenizer.special_ids] = True
        self.special = special
        self.random_ids = np.flatnonzero(~special)

    def chunk_length(self, seq_len: int) -> int:
        added = 2 if self.cls_id is not None and self.sep_id is not None else 0
        if seq_len <= added:
            raise LMForgeError(f"seq_len {seq_len} leaves no room for text", key="seq_len")
        return seq_len - added

    def __call__(self, rows: Sequence[np.ndarray], rng: np.random.Generator) -> Batch:
        if self.cls_id is not None and self.sep_id is not None:
            rows = [np.concatenate([[self.cls_id], r, [self.sep_id]]).astype(np.int64) for r in rows]
        T = max(len(r) for r in rows)
        input_ids = pad_rows(rows, self.pad_id, length=T)
        attention_mask = _mask_of(rows, T)
        eligible = attention_mask.numpy() & ~self.special[input_ids]
        word_ids = None
        if self.whole_word:
            word_ids = np.full((len(rows), T), -1, dtype=np.int64)
            for i, row in enumerate(rows):
                word_ids[i, : len(row)] = self.tokenizer.word_ids(row)
        inputs, labels = mask_tokens(
            input_ids,
            eligible=eligible,
            mask_id=self.mask_id,
            random_ids=self.random_ids,
            rng=rng,
            probability=self.probability,
            mask_fraction=self.mask_fraction,
            random_fraction=self.random_fraction,
            word_ids=word_ids,
        )
        return {
            "input_ids": torch.from_numpy(inputs),
            "attention_mask": attention_mask,
            "labels": torch.from_numpy(labels),
        }


class SpanCorruptionCollator:
    """T5 span-corruption batches: inputs with sentinels (+ eos) for the encoder; the decoder
    reads ``[start] + targets[:-1]`` and predicts ``targets`` (sentinels, dropped spans, eos).

    Args:
        tokenizer: needs sentinels (``Tokenizer.add_sentinels`` or ``num_sentinels`` when
            training), pad and eos tokens.
        noise_density: share of tokens dropped.
        mean_span_length: mean length of a dropped span.
    """

    def __init__(
        self, tokenizer: Tokenizer, *, noise_density: float = 0.15, mean_span_length: float = 3.0
    ) -> None:
        self.sentinel_ids = tokenizer.sentinel_ids
        self.pad_id = _require(tokenizer, "pad", "span corruption padding")
        self.eos_id = _require(tokenizer, "eos", "span corruption")
        self.start_id = decoder_start_id(tokenizer)
        self.noise_density = noise_density
        self.mean_span_length = mean_span_length

    def _input_length(self, length: int) -> int:
        noise, spans = num_noise_spans(
            length, noise_density=self.noise_density, mean_span_length=self.mean_span_length
        )
        return length - noise + spans + 1

    def chunk_length(self, seq_len: int) -> int:
        """The longest raw chunk whose corrupted input (+ eos) fits in ``seq_len`` (T5 likewise
        reads more raw tokens than the encoder takes)."""
        if seq_len < 3:
            raise LMForgeError(f"seq_len {seq_len} is too short for span corruption", key="seq_len")
        length = seq_len - 1
        while self._input_length(length + 1) <= seq_len:
            length += 1
        _, spans = num_noise_spans(
            length, noise_density=self.noise_density, mean_span_length=self.mean_span_length
        )
        if spans + 1 > len(self.sentinel_ids):
            raise LMForgeError(
                f"span corruption of {length}-token chunks needs {spans + 1} sentinel tokens, the tokenizer has "
                f"{len(self.sentinel_ids)}: use Tokenizer.add_sentinels({spans + 1}) or train with num_sentinels",
                key="num_sentinels",
            )
        return length

    def __call__(self, rows: Sequence[np.ndarray], rng: np.random.Generator) -> Batch:
        inputs, targets = [], []
        for row in rows:
            noise = random_spans_noise_mask(
                len(row), rng=rng, noise_density=self.noise_density, mean_span_length=self.mean_span_length
            )
            source, target = corrupt_spans(row, noise, self.sentinel_ids)
            inputs.append(np.append(source, self.eos_id))
            targets.append(np.append(target, self.eos_id))
        T = max(len(r) for r in inputs)
        S = max(len(t) for t in targets)
        decoder_inputs = [np.concatenate([[self.start_id], t[:-1]]) for t in targets]
        return {
            "input_ids": torch.from_numpy(pad_rows(inputs, self.pad_id, length=T)),
            "attention_mask": _mask_of(inputs, T),
            "decoder_input_ids": torch.from_numpy(pad_rows(decoder_inputs, self.pad_id, length=S)),
            "decoder_attention_mask": _mask_of(targets, S),
            "labels": torch.from_numpy(pad_rows(targets, IGNORE_INDEX, length=S)),
        }
