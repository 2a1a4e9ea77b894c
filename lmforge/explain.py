"""A printed walk through self-attention on a small input, checked against the real layer.

``lmforge attention`` builds a tiny :class:`~lmforge.SelfAttention`, feeds it one row per
character of a short text, and prints every intermediate of the textbook computation
(Q, K, V, A, the mask, α, O, Y) for each head, then confirms the layer's own output equals the
step-by-step result. The arithmetic here is deliberately separate from the layer's, so the check
means something.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .model.attention import SelfAttention


def _matrix(name: str, m: Tensor, rows: list[str] | None = None, cols: list[str] | None = None) -> list[str]:
    """A small matrix as aligned text lines, with optional row and column labels."""
    rows = rows or [""] * m.shape[0]
    width = max(len(r) for r in rows)
    header = " " * (width + 2) + " ".join(f"{c:>7}" for c in cols) if cols else None
    lines = [f"{name}  ({m.shape[0]}×{m.shape[1]})"]
    if header:
        lines.append(header)
    for label, row in zip(rows, m.tolist(), strict=True):
        cells = " ".join("   -inf" if v == float("-inf") else f"{v:7.3f}" for v in row)
        lines.append(f"{label:>{width}}  {cells}")
    return lines


def explain_attention(
    text: str = "cat",
    *,
    embed_dim: int = 4,
    num_heads: int = 2,
    causal: bool = True,
    explain: bool = False,
    seed: int = 0,
) -> tuple[str, float]:
    """Walk through one self-attention layer on ``text`` (one token per character).

    Returns:
        The printable walk-through and the largest difference between the step-by-step result and
        the layer's own forward pass (≈1e-7: the two agree).
    """
    if not text:
        raise ValueError("text must have at least one character")
    torch.manual_seed(seed)
    layer = SelfAttention(embed_dim, num_heads, causal=causal, bias=False).eval()
    tokens = [repr(c)[1:-1] or " " for c in text]
    T, E, H, D = len(text), embed_dim, num_heads, layer.head_dim
    x = torch.randn(T, E)  # one random feature vector per character: the input rows X
    out: list[str] = []

    def say(line: str) -> None:
        if explain:
            out.append("   " + line)

    out.append(f"Self-attention on {text!r}: T={T} tokens, E={E} features, H={H} heads of width D={D}")
    out.append(f"{'causal' if causal else 'bidirectional'} mask; weights W are random (seed {seed})")
    out.append("")
    out += _matrix("X: one row per token", x, tokens)
    say("Each row of X stands for one token; a trained model would look these up in an embedding table.")
    heads = []
    for h in range(H):
        rows = slice(h * D, (h + 1) * D)  # this head's slice of the projection weights
        w_q, w_k, w_v = (p.weight[rows].T.detach() for p in (layer.q_proj, layer.k_proj, layer.v_proj))
        q, k, v = x @ w_q, x @ w_k, x @ w_v
        scores = q @ k.T / math.sqrt(D)
        mask = torch.zeros(T, T)
        if causal:
            mask = mask.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        weights = torch.softmax(scores + mask, dim=-1)
        o = weights @ v
        heads.append(o)
        out += ["", f"── head {h + 1} of {H} " + "─" * 40]
        out += _matrix("Q = X W_Q", q, tokens)
        say("Queries: what each token is looking for.")
        out += _matrix("K = X W_K", k, tokens)
        say("Keys: what each token offers to be found by.")
        out += _matrix("V = X W_V", v, tokens)
        say("Values: what each token hands over when it is attended to.")
        out += _matrix(f"A = Q Kᵀ / √{D}", scores, tokens, tokens)
        say("Scores: row i, column j = how well query i matches key j, scaled so softmax stays soft.")
        if causal:
            out += _matrix("mask (0 = may attend, -inf = may not)", mask, tokens, tokens)
            say("Causal: a token may not look at tokens after it.")
        out += _matrix("α = softmax(A + mask)", weights, tokens, tokens)
        say("Each row is a probability distribution over the keys: it sums to 1.")
        out += _matrix("O = α V", o, tokens)
        say("Each output row is the α-weighted mix of the value rows.")
    joined = torch.cat(heads, dim=-1)  # (T, H·D)
    y = joined @ layer.out_proj.weight.detach().T
    out += ["", "── all heads " + "─" * 40]
    out += _matrix("Y = concat(O_1 … O_H) W_O", y, tokens)
    say("The heads are placed side by side and projected back to E features.")
    with torch.no_grad():
        y_layer = layer(x[None])[0]
    diff = float((y - y_layer).abs().max())
    out += ["", f"check: SelfAttention(x) equals the steps above (max |difference| = {diff:.1e})"]
    return "\n".join(out), diff
