"""The LM head and its cross-entropy fused, over chunks of rows: no (N, V) logits kept.

For N target positions and a vocabulary of V tokens, ``F.cross_entropy(h Wᵀ, y)`` materializes
the logits (N, V) in the forward pass and their gradient (N, V) in the backward pass: with
GPT-2's 50,257 tokens and a batch of 8 × 1,024 positions that is 1.6 GB each in float32, far more
than the rest of the activations. Here the rows go through in chunks, and while one chunk's
logits exist (n, V) they are turned into the loss and, when training, straight into the gradients
of the hidden states and of the head's weight:

    ℓ_i = logsumexp_v(h_i · w_v) − h_i · w_{y_i}
    ∂ℓ/∂h_i = Σ_v (p_iv − [v = y_i]) w_v        ∂ℓ/∂W = Σ_i (p_i − onehot(y_i))ᵀ h_i

so the backward pass only scales them. The same FLOPs as the unfused path; the memory of one
chunk's logits instead of all of them. The idea of Liger Kernel's fused linear cross-entropy
(computing the gradients in the forward pass) in plain PyTorch; Wijmans et al. 2024, "Cut Your
Losses in Large-Vocabulary Language Models", for the analysis.
"""

from __future__ import annotations

import torch
from torch import Tensor

IGNORE_INDEX = -100


class _ChunkedLMCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and, when gradients are wanted, the gradients too (the softmax of
    a chunk is at hand then); backward only scales them by the incoming gradient."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        hidden: Tensor,
        weight: Tensor,
        labels: Tensor,
        chunk_rows: int,
        compute_dtype: torch.dtype,
        want_grads: bool,
    ) -> Tensor:
        total = hidden.new_zeros((), dtype=torch.float32)
        w = weight.to(compute_dtype)
        grad_hidden = torch.empty_like(hidden) if want_grads else None
        grad_weight = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_grads else None
        )
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk_rows):
                rows = slice(start, start + chunk_rows)
                h = hidden[rows].to(compute_dtype)  # (n, E)
                logits = (h @ w.t()).float()  # (n, V), the only logits alive at a time
                y = labels[rows]
                valid = y != IGNORE_INDEX
                lse = torch.logsumexp(logits, dim=-1)  # (n,)
                target = logits.gather(1, y.clamp(min=0)[:, None]).squeeze(1)  # (n,)
                total += ((lse - target) * valid).sum()
                if grad_hidden is not None and grad_weight is not None:
                    probs = torch.exp(logits.sub_(lse[:, None]))  # softmax, in place of the logits
                    probs.scatter_add_(1, y.clamp(min=0)[:, None], -valid.float()[:, None])  # p − onehot(y)
                    grad_logits = probs.mul_(valid[:, None]).to(compute_dtype)  # ignored rows: no gradient
                    grad_hidden[rows] = (grad_logits @ w).to(hidden.dtype)  # (n, E)
                    grad_weight += (grad_logits.t() @ h).float()  # (V, E)
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype) if grad_weight is not None else None)
        return total

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_total: Tensor):  # type: ignore[override]
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_total, grad_weight * grad_total, None, None, None, None


def chunked_lm_cross_entropy(
    hidden: Tensor, weight: Tensor, labels: Tensor, *, chunk_rows: int = 1024
) -> Tensor:
    """Σ_i cross-entropy(h_i Wᵀ, y_i) over the rows whose label is not -100, without the (N, V)
    logits: hidden (..., E), weight (V, E) (the LM head's), labels (...). Returns the sum (a
    float32 scalar); gradients flow to ``hidden`` and ``weight``. Under autocast the products run
    in the autocast dtype, the softmax in float32, as in the unfused path."""
    if chunk_rows <= 0:
        raise ValueError(f"chunk_rows {chunk_rows} must be positive")
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    rows = hidden.reshape(-1, hidden.shape[-1])  # (N, E)
    want_grads = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _ChunkedLMCrossEntropy.apply(rows, weight, labels.reshape(-1), chunk_rows, dtype, want_grads)
