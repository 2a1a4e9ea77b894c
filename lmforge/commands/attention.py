"""``lmforge attention``: self-attention step by step on a short text (the showcase, explained)."""

from __future__ import annotations

from ..errors import LMForgeError
from ..explain import explain_attention


def attention(
    *,
    text: str = "cat",
    embed_dim: int = 4,
    num_heads: int = 2,
    causal: bool = True,
    explain: bool = False,
    seed: int = 0,
) -> int:
    """Show self-attention step by step on a short text (Q, K, V, scores, mask, α, output).

    Every intermediate of Q = XW_Q, K = XW_K, V = XW_V, A = QKᵀ/√d, α = softmax(A + mask),
    O = αV, Y = OW_O is printed for each head, then checked against the real layer.

    Args:
        text: the input, one token per character (keep it short: one row per character).
        embed_dim: features per token (E).
        num_heads: attention heads (H); embed_dim must be divisible by it.
        causal: mask future tokens, as a decoder does.
        explain: add a sentence of explanation to every step.
        seed: random seed for the input rows and the weights.
    """
    if not text or len(text) > 16:
        raise LMForgeError(f"--text must have 1 to 16 characters, got {len(text)}", key="text")
    try:
        report, diff = explain_attention(
            text, embed_dim=embed_dim, num_heads=num_heads, causal=causal, explain=explain, seed=seed
        )
    except ValueError as err:
        raise LMForgeError(str(err)) from None
    print(report)
    return 0 if diff < 1e-5 else 1
