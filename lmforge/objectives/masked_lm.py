"""Masked language modelling for encoders (Devlin et al. 2019, BERT, §3.1 and appendix A.1).

15% of the non-special tokens of each sequence are selected as targets; of those, 80% are
replaced by ``[MASK]``, 10% by a random (non-special) token and 10% are left unchanged; the
model predicts the original token at the selected positions only (labels are -100 elsewhere).
Whole-word masking (the later BERT release; Cui et al. 2021) selects whole words, using the
tokenizer's word boundaries (:meth:`lmforge.tokenizers.Tokenizer.word_ids`), so all pieces of a
selected word become targets together.

Masking happens when batches are built (:class:`lmforge.data.MaskedLMCollator`), with the batch
source's seeded generator, so a resumed run masks exactly as an uninterrupted one; the objective
itself is the cross-entropy at the selected positions.
"""

from __future__ import annotations

import numpy as np
from torch import nn

from .base import IGNORE_INDEX, Batch, ObjectiveOutput, model_inputs, token_cross_entropy


def mask_tokens(
    input_ids: np.ndarray,
    *,
    eligible: np.ndarray,
    mask_id: int,
    random_ids: np.ndarray,
    rng: np.random.Generator,
    probability: float = 0.15,
    mask_fraction: float = 0.8,
    random_fraction: float = 0.1,
    word_ids: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """BERT's masking of a (B, T) array of token ids.

    Args:
        input_ids: (B, T) token ids.
        eligible: (B, T) bool, True where a token may be selected (not special, not padding).
        mask_id: the ``[MASK]`` id.
        random_ids: ids a selected token may be replaced with (the non-special vocabulary).
        rng: the generator (numpy), for reproducible masks.
        probability: share of eligible tokens selected per sequence (rounded, at least one).
        mask_fraction / random_fraction: of the selected tokens, the shares replaced by
            ``[MASK]`` / by a random token; the rest stay unchanged.
        word_ids: (B, T) word index per token (-1 = not in a word) for whole-word masking: words
            are selected whole, until the sequence's share of tokens is reached.

    Returns:
        ``(inputs, labels)``: corrupted ids and (B, T) labels, the original id at selected
        positions and -100 elsewhere.
    """
    if not 0.0 < probability < 1.0:
        raise ValueError(f"probability must be in (0, 1), got {probability}")
    if mask_fraction < 0 or random_fraction < 0 or mask_fraction + random_fraction > 1:
        raise ValueError(
            f"mask_fraction {mask_fraction} + random_fraction {random_fraction} must be in [0, 1]"
        )
    input_ids = np.asarray(input_ids, dtype=np.int64)
    selected = np.zeros(input_ids.shape, dtype=bool)  # (B, T)
    for row in range(input_ids.shape[0]):
        candidates = np.flatnonzero(eligible[row])
        if candidates.size == 0:
            continue
        budget = max(1, round(probability * candidates.size))
        if word_ids is None:
            selected[row, rng.choice(candidates, size=budget, replace=False)] = True
            continue
        words = word_ids[row, candidates]
        taken = 0
        for word in rng.permutation(np.unique(words[words >= 0])):
            pieces = candidates[words == word]
            if taken and taken + pieces.size > budget:
                continue  # a word that would overshoot; a shorter one may still fit
            selected[row, pieces] = True
            taken += pieces.size
            if taken >= budget:
                break

    labels = np.where(selected, input_ids, IGNORE_INDEX)
    draw = rng.random(input_ids.shape)  # one uniform number per position decides 80/10/10
    to_mask = selected & (draw < mask_fraction)
    to_random = selected & (draw >= mask_fraction) & (draw < mask_fraction + random_fraction)
    inputs = input_ids.copy()
    inputs[to_mask] = mask_id
    inputs[to_random] = rng.choice(np.asarray(random_ids, dtype=np.int64), size=int(to_random.sum()))
    return inputs, labels


class MaskedLM:
    """Cross-entropy at the masked positions of an encoder with an MLM head.

    Args:
        bytes_per_token: UTF-8 bytes per token of the data, to report bits per byte (None: not
            reported). For MLM it measures the masked tokens only: a diagnostic, not comparable
            with a causal model's.
    """

    name = "masked_lm"

    def __init__(self, *, bytes_per_token: float | None = None) -> None:
        self.bytes_per_token = bytes_per_token

    def __call__(self, model: nn.Module, batch: Batch) -> ObjectiveOutput:
        counted = batch["labels"] != IGNORE_INDEX  # the masked positions: the head runs there only
        inputs = model_inputs(batch, "attention_mask", "token_type_ids")
        out = model(batch["input_ids"], **inputs, logits_at=counted)
        return token_cross_entropy(out.logits, batch["labels"][counted], bytes_per_token=self.bytes_per_token)

    def __repr__(self) -> str:
        return "MaskedLM()"
