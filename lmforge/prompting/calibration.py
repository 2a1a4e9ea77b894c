"""Calibration of a prompted classifier: remove the label bias the prompt itself carries.

Small language models prompted with a few demonstrations lean toward some labels whatever the
input (the majority or the last label of the demonstrations, a frequent word). Contextual
calibration (Zhao et al. 2021, "Calibrate Before Use") measures that bias with *content-free*
inputs — ``"N/A"``, ``""``, ``"[MASK]"`` put where the input goes, with the same instruction and
demonstrations — and divides it out: with p̂_cf the mean label distribution of the content-free
inputs, W = diag(p̂_cf)⁻¹ and b = 0, the calibrated distribution is q ∝ W p̂. (The paper applies
a softmax to W p̂; renormalizing gives the same argmax and a distribution that reads as one.)

Domain-conditional calibration (Fei et al. 2023, "Mitigating Label Biases for In-context
Learning") estimates the bias with random *in-domain* words instead: strings of words drawn from
the task's unlabeled texts (here: the training texts, never the evaluated split), as long as an
average input, so the estimate also captures how the domain's vocabulary shifts the labels.

Batch calibration (Zhou et al. 2024, "Batch Calibration: Rethinking Calibration for In-Context
Learning and Prompt Engineering") estimates it with *real* inputs: the mean label distribution of
a batch of unlabeled inputs under the same prompt. Content-free strings are out of distribution
and can overshoot (a balanced set of demonstrations may carry almost no bias, and dividing by a
skewed "N/A" then creates one); the mean over real inputs is the bias the task's inputs meet. The
paper averages over the evaluated batch; here the inputs are unlabeled *training* examples held
out of the demonstration pool, each prompted as a query would be (with its own nearest
demonstrations under kNN selection), so nothing is read from the evaluated split.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from ..errors import LMForgeError

Calibration = Literal["none", "contextual", "domain", "batch"]
CALIBRATIONS = ("none", "contextual", "domain", "batch")
CONTENT_FREE = ("N/A", "", "[MASK]")  # Zhao et al. 2021
DOMAIN_SAMPLES = 20  # random in-domain strings per estimate (Fei et al. use 20)
BATCH_SAMPLES = 32  # held-out training inputs per batch-calibration estimate


def reference_distribution(content_free_probs: Tensor) -> Tensor:
    """(M, L) label distributions of the content-free inputs → their mean p̂_cf (L,)."""
    if content_free_probs.dim() != 2 or content_free_probs.shape[0] == 0:
        raise ValueError(f"expected (M, L) content-free distributions, got shape {tuple(content_free_probs.shape)}")
    mean = content_free_probs.mean(dim=0)
    return mean / mean.sum()


def calibrate(probs: Tensor, reference: Tensor) -> Tensor:
    """q ∝ diag(p̂_cf)⁻¹ p̂: each label's probability divided by its content-free probability,
    renormalized over the labels. ``probs`` (…, L), ``reference`` (L,) or (…, L)."""
    weighted = probs / reference.clamp_min(1e-12)
    return weighted / weighted.sum(dim=-1, keepdim=True)


def domain_texts(texts: Sequence[str], *, num_samples: int = DOMAIN_SAMPLES, seed: int = 0) -> list[str]:
    """Random strings of in-domain words: each as many words as an average text, drawn from the
    words of ``texts`` (Fei et al. 2023). Seeded."""
    words = [w for text in texts for w in text.split()]
    if not words:
        raise LMForgeError("domain-conditional calibration needs training texts with words", key="calibrate")
    length = max(1, round(len(words) / max(len(texts), 1)))
    rng = np.random.default_rng(seed)
    return [" ".join(words[i] for i in rng.integers(0, len(words), size=length)) for _ in range(num_samples)]


def content_free_texts(
    how: Calibration, *, texts: Sequence[str] = (), seed: int = 0, num_samples: int = DOMAIN_SAMPLES
) -> list[str]:
    """The inputs whose label distribution estimates the bias: Zhao et al.'s three content-free
    strings (contextual), random in-domain word strings (domain), none (none, and batch: its
    inputs are whole training examples, see :func:`lmforge.pipeline.prompting.in_context`)."""
    if how in ("none", "batch"):
        return []
    if how == "contextual":
        return list(CONTENT_FREE)
    if how == "domain":
        return domain_texts(texts, num_samples=num_samples, seed=seed)
    raise LMForgeError(f"unknown calibration '{how}' ({', '.join(CALIBRATIONS)})", key="calibrate")


def as_probabilities(log_probs: Tensor) -> Tensor:
    """Label log-probabilities → probabilities in float64 (the ratios of calibration stay exact)."""
    return torch.exp(log_probs.double())


__all__ = [
    "BATCH_SAMPLES",
    "CALIBRATIONS",
    "CONTENT_FREE",
    "Calibration",
    "as_probabilities",
    "calibrate",
    "content_free_texts",
    "domain_texts",
    "reference_distribution",
]
