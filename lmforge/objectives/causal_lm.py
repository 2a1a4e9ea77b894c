"""Causal language modelling: predict every next token (Radford et al. 2018/2019; nanoGPT).

**Labels are shifted in the batch, not here**: ``labels[:, t]`` is the target of position ``t``,
i.e. the token at ``t + 1`` (nanoGPT's ``x = w[:-1], y = w[1:]``). A window of T + 1 tokens thus
gives T inputs and T targets. Batch builders that start from unshifted labels (e.g. a prompt
mask over ``input_ids``) use :func:`shift_labels`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import IGNORE_INDEX, Batch, ObjectiveOutput, model_inputs, token_cross_entropy


class CausalLM:
    """Next-token cross-entropy for decoders: ``logits[:, t]`` against ``labels[:, t]``.

    Args:
        bytes_per_token: UTF-8 bytes per token of the data (from the shard index), to report
            bits per byte; None leaves that metric out.
    """

    name = "causal_lm"

    def __init__(self, *, bytes_per_token: float | None = None) -> None:
        if bytes_per_token is not None and bytes_per_token <= 0:
            raise ValueError(f"bytes_per_token must be positive, got {bytes_per_token}")
        self.bytes_per_token = bytes_per_token

    def __call__(self, model: nn.Module, batch: Batch) -> ObjectiveOutput:
        out = model(batch["input_ids"], **model_inputs(batch, "attention_mask", "position_ids"))
        return token_cross_entropy(out.logits, batch["labels"], bytes_per_token=self.bytes_per_token)

    def __repr__(self) -> str:
        return f"CausalLM(bytes_per_token={self.bytes_per_token})"


def shift_labels(labels: Tensor) -> Tensor:
    """(B, T) labels aligned with ``input_ids`` → labels aligned with the *next* token: position
    ``t`` gets ``labels[:, t + 1]``, the last position gets -100."""
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    return shifted
