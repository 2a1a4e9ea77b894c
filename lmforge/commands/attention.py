"""``lmforge attention``: self-attention step by step on a short text (the showcase, explained),
on a random toy layer or on one layer and head of a real model (``--model``)."""

from __future__ import annotations

from ..errors import LMForgeError
from ..explain import explain_attention
from ..pipeline.viz import attention_walk


def attention(
    *,
    text: str = "cat",
    model: str | None = None,
    layer: int = 0,
    head: int = 0,
    embed_dim: int = 4,
    num_heads: int = 2,
    causal: bool = True,
    explain: bool = False,
    seed: int = 0,
) -> int:
    """Show self-attention step by step on a short text (Q, K, V, scores, mask, α, output).

    Every intermediate of Q = XW_Q, K = XW_K, V = XW_V, A = QKᵀ/√d, α = softmax(A + mask),
    O = αV, Y = OW_O is printed for each head, then checked against the real layer. Without
    --model: a random toy layer, one token per character. With --model: the real model's tokens
    and the rows entering its layer --layer, head --head shown, checked against that layer's own α
    and output.

    Args:
        text: the input (toy layer: one token per character, at most 16).
        model: a run directory, Hugging Face folder or GGUF file: walk through its attention instead.
        layer: with --model: the layer to walk through (from 0).
        head: with --model: the head to show (from 0).
        embed_dim: toy layer: features per token (E).
        num_heads: toy layer: attention heads (H); embed_dim must be divisible by it.
        causal: toy layer: mask future tokens, as a decoder does.
        explain: add a sentence of explanation to every step.
        seed: toy layer: random seed for the input rows and the weights.
    """
    if model is not None:
        walk = attention_walk(model, text, layer=layer, head=head, explain=explain)
        print(walk.text)
        return 0 if max(walk.weights_diff, walk.output_diff) < 1e-4 else 1
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
