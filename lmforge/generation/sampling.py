"""Choosing the next token from the logits of the last position.

The steps, applied in this order to the logits (B, V) of one decoding step:

1. repetition penalty (Keskar et al. 2019, "CTRL", §4.1): for every token already present in the
   sequence, a positive logit is divided by the penalty θ and a negative one multiplied by it, so
   θ > 1 always makes a repeat less likely;
2. temperature: logits / T (T → 0 is greedy decoding, T = 1 the model's own distribution);
3. top-k (Fan et al. 2018): keep the k highest logits (all tokens tied with the k-th too);
4. top-p, nucleus sampling (Holtzman et al. 2020): keep the smallest set of most likely tokens
   whose probabilities add up to at least p;
5. draw from softmax of what is left, with an optional seeded ``torch.Generator``, or take the
   argmax when the temperature is 0 (greedy).

Removed tokens get a logit of −∞. The same order as Hugging Face's ``generate`` so settings carry
over.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ConfigError


def check_sampling(
    *,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    repetition_penalty: float,
) -> None:
    """Raise a :class:`~lmforge.errors.ConfigError` naming the setting that cannot work."""
    if not temperature >= 0.0:  # also rejects NaN
        raise ConfigError(f"temperature {temperature} must be 0 (greedy) or positive", key="temperature")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"top_k {top_k} must be at least 1 (or unset)", key="top_k")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ConfigError(f"top_p {top_p} must be in (0, 1] (or unset)", key="top_p")
    if not repetition_penalty > 0.0:
        raise ConfigError(
            f"repetition_penalty {repetition_penalty} must be positive (1 = no penalty)",
            key="repetition_penalty",
        )


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL's penalty on tokens already present.

    Args:
        logits: (B, V) scores of the next token.
        seen: (B, V) boolean, True for the tokens present in each sequence so far.
        penalty: θ; a positive logit of a seen token becomes logit / θ, a negative one logit · θ.

    Returns:
        New logits (B, V); ``logits`` is left as it was.
    """
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the k highest logits of each row (and any tied with the k-th); the rest become −∞."""
    if k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1) the k-th highest value
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus filter: keep, per row, the most likely tokens until their probability reaches p.

    A token is kept when the probability of the tokens ranked above it is still below p, so the
    kept set is the smallest whose mass is at least p (the most likely token always stays).
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # (B, V) probability ranked above each token
    remove_sorted = mass_before >= p
    remove = torch.zeros_like(remove_sorted).scatter_(-1, order, remove_sorted)  # back to vocab order
    return logits.masked_fill(remove, float("-inf"))


def next_tokens(
    logits: Tensor,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The chosen token of each row: logits (B, V) → ids (B,).

    Temperature 0 takes the argmax (top-k/top-p then change nothing); otherwise the filters are
    applied to logits / temperature and one token is drawn per row from the softmax.
    """
    if temperature == 0.0:  # max(dim).indices: the first maximum, as argmax, but faster on CPU
        return logits.max(dim=-1).indices
    logits = logits.float() / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
