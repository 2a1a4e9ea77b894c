"""Evaluation metrics as plain functions.

Language modelling: perplexity and bits-per-byte. Perplexity exp(mean NLL) depends on the
tokenizer (a token may be a character or a word); bits-per-byte divides the total negative
log-likelihood, converted to bits, by the UTF-8 bytes of the text the predicted tokens cover, so
models with different tokenizers compare on one scale (Gao et al. 2020, "The Pile", §5).
"""

from __future__ import annotations

import math


def perplexity(mean_loss: float) -> float:
    """exp(mean negative log-likelihood in nats per token); ``inf`` when that overflows."""
    if math.isnan(mean_loss):
        return float("nan")
    return math.exp(mean_loss) if mean_loss < 700.0 else float("inf")


def bits_per_byte(loss_sum: float, num_bytes: float) -> float:
    """Total NLL in nats over some tokens → bits per byte of the text those tokens cover.

    ``loss_sum / (ln 2 · num_bytes)``. Example: 4 tokens covering 8 bytes with a total NLL of
    8·ln 2 nats cost 8 bits, i.e. 1 bit per byte.
    """
    if num_bytes <= 0:
        raise ValueError(f"num_bytes must be positive, got {num_bytes}")
    return loss_sum / (math.log(2.0) * num_bytes)
