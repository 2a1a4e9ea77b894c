"""Span corruption for encoder-decoders (Raffel et al. 2020, T5, §3.1.4 and §3.3.4).

About 15% of the tokens (``noise_density``) are dropped in spans of mean length 3
(``mean_span_length``). The encoder input keeps the other tokens and puts one sentinel
(``<extra_id_0>``, ``<extra_id_1>``, …) where each span was; the decoder target lists each
sentinel followed by the tokens it replaced, and ends with one more sentinel::

    tokens   The cute dog walks in the park
    inputs   The <extra_id_0> walks in <extra_id_1> park
    targets  <extra_id_0> cute dog <extra_id_1> the <extra_id_2>

The corruption is invertible (:func:`restore_spans` rebuilds the tokens from inputs and
targets). Spans are drawn as T5 does: the noise and non-noise token counts are each split into
``num_spans`` random positive parts, interleaved starting with non-noise. Corruption happens
when batches are built (:class:`lmforge.data.SpanCorruptionCollator`); the objective is the
decoder's cross-entropy on the targets.
"""

from __future__ import annotations

import numpy as np
from torch import nn

from ..tokenizers import Tokenizer
from .base import Batch, ObjectiveOutput, model_inputs, token_cross_entropy


def num_noise_spans(
    length: int, *, noise_density: float = 0.15, mean_span_length: float = 3.0
) -> tuple[int, int]:
    """``(noise_tokens, spans)`` for a sequence of ``length`` tokens (both 0 when too short)."""
    if length < 2:
        return 0, 0
    noise = min(max(round(length * noise_density), 1), length - 1)
    spans = max(round(noise / mean_span_length), 1)
    return noise, min(spans, noise, length - noise)


def random_spans_noise_mask(
    length: int, *, rng: np.random.Generator, noise_density: float = 0.15, mean_span_length: float = 3.0
) -> np.ndarray:
    """A (length,) bool mask, True on the tokens to drop, in spans (T5's ``random_spans_noise_mask``)."""
    if not 0.0 < noise_density < 1.0:
        raise ValueError(f"noise_density must be in (0, 1), got {noise_density}")
    if mean_span_length < 1.0:
        raise ValueError(f"mean_span_length must be at least 1, got {mean_span_length}")
    noise, spans = num_noise_spans(length, noise_density=noise_density, mean_span_length=mean_span_length)
    mask = np.zeros(length, dtype=bool)
    if spans == 0:
        return mask
    noise_lengths = _random_parts(noise, spans, rng)
    keep_lengths = _random_parts(length - noise, spans, rng)
    position = 0
    for keep, drop in zip(keep_lengths, noise_lengths, strict=True):
        position += keep
        mask[position : position + drop] = True
        position += drop
    return mask


def _random_parts(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
    """``total`` split into ``parts`` random positive integers (uniform over compositions)."""
    cuts = np.sort(rng.choice(np.arange(1, total), size=parts - 1, replace=False)) if parts > 1 else []
    return np.diff(np.concatenate([[0], cuts, [total]])).astype(np.int64)


def corrupt_spans(
    tokens: np.ndarray, noise_mask: np.ndarray, sentinel_ids: list[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Replace each noise span of ``tokens`` (L,) by a sentinel: returns ``(inputs, targets)``.

    ``targets`` = for each span: its sentinel then its tokens; then one final sentinel.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    starts = noise_mask & ~np.concatenate([[False], noise_mask[:-1]])  # first token of each span
    spans = int(starts.sum())
    if spans + 1 > len(sentinel_ids):
        raise ValueError(
            f"{spans} spans need {spans + 1} sentinel tokens, the tokenizer has {len(sentinel_ids)}"
        )
    sentinels = np.asarray(sentinel_ids[: spans + 1], dtype=np.int64)
    span_index = np.cumsum(starts) - 1  # (L,) which span a noise token belongs to
    keep = ~noise_mask | starts
    inputs = np.where(starts, sentinels[np.maximum(span_index, 0)], tokens)[keep]

    dropped = tokens[noise_mask]
    # each dropped token moves right by the number of sentinels written before it (its span + 1)
    positions = np.arange(dropped.size) + span_index[noise_mask] + 1
    targets = np.empty(dropped.size + spans + 1, dtype=np.int64)
    targets[positions] = dropped
    targets[positions[starts[noise_mask]] - 1] = sentinels[:spans]
    targets[-1] = sentinels[spans]
    return inputs, targets


def restore_spans(inputs: np.ndarray, targets: np.ndarray, sentinel_ids: list[int]) -> np.ndarray:
    """Invert :func:`corrupt_spans`: put each sentinel's target tokens back into the inputs."""
    sentinel_set = set(sentinel_ids)
    spans: dict[int, list[int]] = {}
    current: list[int] | None = None
    for token in np.asarray(targets).tolist():
        if token in sentinel_set:
            current = spans.setdefault(token, [])
        elif current is not None:
            current.append(token)
    restored: list[int] = []
    for token in np.asarray(inputs).tolist():
        restored.extend(spans.get(token, []) if token in sentinel_set else [token])
    return np.asarray(restored, dtype=np.int64)


def decoder_start_id(tokenizer: Tokenizer) -> int:
    """The id that starts every decoder input (and generation): bos when the tokenizer has one,
    else pad (T5's convention)."""
    start = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.pad_id
    if start is None:
        raise ValueError("the tokenizer has neither a bos nor a pad token to start the decoder with")
    return start


class SpanCorruption:
    """Decoder cross-entropy on span-corruption targets (inputs: the corrupted text).

    The batch carries ``input_ids``/``attention_mask`` (encoder), ``decoder_input_ids``/
    ``decoder_attention_mask`` and ``labels`` (decoder side, -100 on padding).
    """

    name = "span_corruption"

    def __init__(self, *, bytes_per_token: float | None = None) -> None:
        self.bytes_per_token = bytes_per_token

    def __call__(self, model: nn.Module, batch: Batch) -> ObjectiveOutput:
        out = model(
            batch["input_ids"],
            decoder_input_ids=batch["decoder_input_ids"],
            **model_inputs(batch, "attention_mask", "decoder_attention_mask"),
        )
        return token_cross_entropy(out.logits, batch["labels"], bytes_per_token=self.bytes_per_token)

    def __repr__(self) -> str:
        return "SpanCorruption()"
