"""What every objective returns, and the token-level cross-entropy they share.

An objective is a callable ``objective(model, batch) -> ObjectiveOutput``. It returns the loss
*summed* over its counted targets plus their number, so the training loop can normalize by the
target count of a whole gradient-accumulation window (every micro-batch weighs by its tokens,
not by its share of the batches). Its ``metrics`` are per-target means of quantities that are
linear in the loss or counts (loss, accuracy, bits per byte), so the loop can average them
weighted by ``num_targets``; perplexity is exp of the *aggregated* loss
(:func:`lmforge.metrics.perplexity`), never an average of per-batch perplexities.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..metrics import bits_per_byte

IGNORE_INDEX = -100  # labels with this value are not predicted (padding, unmasked tokens, prompts)
# The one batch type of lmforge: named tensors ("input_ids", "attention_mask", "labels", ...) as the
# batch sources and task collators make them, the objectives and the loop read them.
Batch = dict[str, Any]


@dataclass
class ObjectiveOutput:
    """The result of one objective call.

    loss_sum: scalar, the cross-entropy summed over the counted targets (differentiable).
    num_targets: scalar long, how many targets were counted (labels != -100).
    metrics: per-target means: ``loss``, ``accuracy`` and, when the bytes per token are known,
        ``bits_per_byte``.
    """

    loss_sum: Tensor
    num_targets: Tensor
    metrics: dict[str, float] = field(default_factory=dict)


def num_targets(batch: Batch) -> int:
    """How many targets a batch counts: its labels that are not -100."""
    return int((batch["labels"] != IGNORE_INDEX).sum())


def token_cross_entropy(
    logits: Tensor, labels: Tensor, *, bytes_per_token: float | None = None
) -> ObjectiveOutput:
    """Cross-entropy of ``logits`` (..., V) against ``labels`` (...), -100 ignored, in float32.

    Only the counted positions are gathered before the softmax, so masked-LM batches with 15%
    targets do not pay for the other 85%.
    """
    counted = labels != IGNORE_INDEX  # (...)
    count = counted.sum()
    n = int(count)
    if n == labels.numel():  # every position counts (causal LM windows): no gather, no copy
        target_logits = logits.reshape(n, logits.shape[-1]).float()  # (N, V)
        targets = labels.reshape(n)  # (N,)
    else:
        target_logits = logits[counted].float()  # (N, V)
        targets = labels[counted]  # (N,)
    loss_sum = F.cross_entropy(target_logits, targets, reduction="sum")
    metrics: dict[str, float] = {}
    if n:
        with torch.no_grad():
            mean = float(loss_sum.detach()) / n
            metrics["loss"] = mean
            metrics["accuracy"] = float((target_logits.argmax(-1) == targets).sum()) / n
            if bytes_per_token:
                metrics["bits_per_byte"] = bits_per_byte(float(loss_sum.detach()), n * bytes_per_token)
    else:
        metrics["loss"] = math.nan
    return ObjectiveOutput(loss_sum=loss_sum, num_targets=count, metrics=metrics)


def model_inputs(batch: Batch, *names: str) -> dict[str, Tensor]:
    """The optional model inputs present in ``batch``; an all-True attention mask is dropped so
    the attention layer can take its unmasked (causal) fast path."""
    inputs = {name: batch[name] for name in names if name in batch}
    for key in ("attention_mask", "decoder_attention_mask"):
        mask = inputs.get(key)
        if mask is not None and mask.dtype == torch.bool and bool(mask.all()):
            del inputs[key]
    return inputs
