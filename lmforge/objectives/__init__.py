"""Pretraining objectives: ``objective(model, batch) -> ObjectiveOutput``.

- :class:`CausalLM` — next-token prediction for decoders (labels already shifted in the batch).
- :class:`MaskedLM` — BERT's masked LM for encoders (80/10/10, whole-word option).
- :class:`SpanCorruption` — T5's span corruption for encoder-decoders.

The random parts (which tokens are masked, which spans dropped) happen when batches are built
(:mod:`lmforge.data.collate`), with the batch source's seeded generator.
"""

from __future__ import annotations

from typing import Literal

from ..errors import LMForgeError, did_you_mean
from .base import IGNORE_INDEX, Batch, ObjectiveOutput, num_targets, token_cross_entropy
from .causal_lm import CausalLM, shift_labels
from .masked_lm import MaskedLM, mask_tokens
from .span_corruption import (
    SpanCorruption,
    corrupt_spans,
    decoder_start_id,
    random_spans_noise_mask,
    restore_spans,
)

ObjectiveName = Literal["causal_lm", "masked_lm", "span_corruption"]
OBJECTIVES = {"causal_lm": CausalLM, "masked_lm": MaskedLM, "span_corruption": SpanCorruption}
DEFAULT_OBJECTIVE: dict[str, ObjectiveName] = {
    "decoder": "causal_lm",
    "encoder": "masked_lm",
    "encoder_decoder": "span_corruption",
}


def make_objective(
    name: ObjectiveName, *, bytes_per_token: float | None = None
) -> CausalLM | MaskedLM | SpanCorruption:
    """The objective called ``name`` (see ``DEFAULT_OBJECTIVE`` for each architecture's)."""
    if name not in OBJECTIVES:

        raise LMForgeError(
            f"unknown objective '{name}'"
            + did_you_mean(name, OBJECTIVES)
            + f" (one of {', '.join(OBJECTIVES)})",
            key="objective",
        )
    return OBJECTIVES[name](bytes_per_token=bytes_per_token)


__all__ = [
    "DEFAULT_OBJECTIVE",
    "IGNORE_INDEX",
    "OBJECTIVES",
    "Batch",
    "CausalLM",
    "MaskedLM",
    "ObjectiveName",
    "ObjectiveOutput",
    "SpanCorruption",
    "corrupt_spans",
    "decoder_start_id",
    "make_objective",
    "mask_tokens",
    "num_targets",
    "random_spans_noise_mask",
    "restore_spans",
    "shift_labels",
    "token_cross_entropy",
]
