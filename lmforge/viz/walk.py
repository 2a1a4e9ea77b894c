"""The step-by-step walk of ``lmforge attention`` on a real model: one layer, one head, real tokens.

The input rows X of the chosen layer's self-attention are caught on their way in (a forward
pre-hook on the layer's :class:`~lmforge.model.attention.SelfAttention`), together with the masks
and position terms the model passes it. The textbook steps Q = XW_Q, K = XW_K, V = XW_V,
A = QKᵀ/√d, α = softmax(A + mask), O = αV, Y = concat(O_1 … O_H) W_O are then redone here with
plain tensor arithmetic, separate from the layer's code, and checked against α and Y of the
layer's own forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..model import Transformer
from ..model.attention import SelfAttention
from ..model.positions import apply_rotary
from ..tokenizers import Tokenizer
from .attention import encode_for, token_labels

MAX_COLUMNS = 8  # feature columns printed of Q, K, V, O and Y (the rest is summarized as "…")


@dataclass
class Walk:
    """The printable walk and how far the step-by-step results are from the layer's own."""

    text: str
    weights_diff: float  # max |α by hand − α of the layer|
    output_diff: float  # max |Y by hand − Y of the layer|


def format_matrix(name: str, m: Tensor, rows: list[str], cols: list[str] | None = None) -> list[str]:
    """A matrix as aligned lines: row labels, at most :data:`MAX_COLUMNS` value columns."""
    width = max(len(r) for r in rows)
    shown = m[:, :MAX_COLUMNS] if cols is None else m
    more = m.shape[1] - shown.shape[1]
    lines = [f"{name}  ({m.shape[0]}×{m.shape[1]}" + (f", first {shown.shape[1]} columns" if more else "") + ")"]
    if cols is not None:
        lines.append(" " * (width + 2) + " ".join(f"{c[:7]:>7}" for c in cols))
    for label, row in zip(rows, shown.tolist(), strict=True):
        cells = " ".join("   -inf" if v == float("-inf") else f"{v:7.3f}" for v in row)
        lines.append(f"{label:>{width}}  {cells}" + (" …" if more else ""))
    return lines


def _self_attention(model: Transformer, layer: int) -> SelfAttention:
    stack = model.decoder if model.config.arch == "decoder" else model.encoder
    assert stack is not None
    if not 0 <= layer < len(stack.layers):
        raise ValueError(f"layer {layer} is out of range: the model has {len(stack.layers)} (0..{len(stack.layers) - 1})")
    return stack.layers[layer].self_attn


def _heads(attn: SelfAttention, x: Tensor, rope: Any) -> tuple[Tensor, Tensor, Tensor]:
    """Q (H, T, D), K and V (Hkv, T, D) of one sequence x (T, E), by hand."""
    H, Hkv, D = attn.num_heads, attn.num_kv_heads, attn.head_dim

    def project(linear: torch.nn.Linear, heads: int) -> Tensor:
        y = x @ linear.weight.T + (linear.bias if linear.bias is not None else 0)
        return y.view(x.shape[0], heads, D).transpose(0, 1)  # (T, heads·D) -> (heads, T, D)

    q, k, v = project(attn.q_proj, H), project(attn.k_proj, Hkv), project(attn.v_proj, Hkv)
    if rope is not None:
        q, k = apply_rotary(q[None], *rope)[0], apply_rotary(k[None], *rope)[0]
    return q, k, v


@torch.no_grad()
def walk_attention(
    model: Transformer, tokenizer: Tokenizer, text: str, *, layer: int = 0, head: int = 0, explain: bool = False
) -> Walk:
    """Walk through self-attention head ``head`` of layer ``layer`` of ``model`` on ``text``.

    Raises:
        ValueError: a layer or head outside the model, or a layer with a PEFT prefix (its virtual
            keys are not part of this walk).
        LMForgeError: see :func:`~lmforge.viz.attention.encode_for`.
    """
    attn = _self_attention(model, layer)
    if not 0 <= head < attn.num_heads:
        raise ValueError(f"head {head} is out of range: the layer has {attn.num_heads} (0..{attn.num_heads - 1})")
    if attn.prefix is not None:
        raise ValueError("this layer carries a PEFT prefix: the walk covers plain self-attention only")
    ids = encode_for(model, tokenizer, text)
    caught: dict[str, Any] = {}

    def before(module: SelfAttention, args: tuple, kwargs: dict) -> None:
        caught["x"], caught["kwargs"] = args[0].detach().clone(), dict(kwargs)

    def after(module: SelfAttention, args: tuple, kwargs: dict, output: Any) -> None:
        caught["y"], caught["alpha"] = output[0].detach().clone(), output[1].detach().clone()

    handles = [
        attn.register_forward_pre_hook(before, with_kwargs=True),
        attn.register_forward_hook(after, with_kwargs=True),
    ]
    was_training = model.training
    model.eval()
    try:
        input_ids = torch.tensor([ids], device=next(model.parameters()).device)
        if model.config.arch == "decoder":
            model(input_ids, need_weights=True)
        else:
            model.encode(input_ids, need_weights=True)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    if caught["kwargs"].get("packing") is not None:
        raise ValueError("the layer saw a packed batch: the walk needs the padded layout")
    x = caught["x"][0].float()  # (T, E): this text's rows entering the layer
    tokens = token_labels(tokenizer, ids)
    T, H, Hkv, D = x.shape[0], attn.num_heads, attn.num_kv_heads, attn.head_dim
    rope = caught["kwargs"].get("rope")
    bias = caught["kwargs"].get("position_bias")
    q, k, v = _heads(attn, x, rope)
    mask = torch.zeros(T, T)
    if attn.causal:
        mask = mask.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    outputs, alphas = [], []
    for h in range(H):
        kv = h // (H // Hkv)  # the key/value head this query head shares (GQA/MQA)
        scores = q[h] @ k[kv].T * attn.scale  # A = QKᵀ/√d: (T, D) @ (D, T) -> (T, T)
        if bias is not None:
            scores = scores + bias[0, h].float()
        alpha = torch.softmax(scores + mask, dim=-1)  # α = softmax(A + mask)
        alphas.append(alpha)
        outputs.append(alpha @ v[kv])  # O = αV: (T, T) @ (T, D) -> (T, D)
    joined = torch.cat(outputs, dim=-1)  # (T, H·D)
    y = joined @ attn.out_proj.weight.T.float() + (attn.out_proj.bias if attn.out_proj.bias is not None else 0)

    out: list[str] = []

    def say(line: str) -> None:
        if explain:
            out.append("   " + line)

    config = model.config
    out.append(
        f"Self-attention of a real model on {text!r}: layer {layer} of {len(_stack_layers(model))} "
        f"({model.config.arch}), head {head} of {H}"
    )
    out.append(
        f"T={T} tokens (as the tokenizer splits them), E={config.embed_dim} features, D={D} per head"
        + (f", {Hkv} key/value heads" if Hkv != H else "")
        + (", rotary positions applied to Q and K" if rope is not None else "")
        + (", a position bias added to A" if bias is not None else "")
    )
    out.append("")
    out += format_matrix("X: the rows entering this layer's attention", x, tokens)
    say("Each row is a token's hidden state after the layers below (and the norm, in a pre-norm model).")
    kv = head // (H // Hkv)
    out += ["", f"── head {head} " + "─" * 40]
    out += format_matrix("Q = X W_Q", q[head], tokens)
    say("Queries: what each token is looking for.")
    out += format_matrix("K = X W_K", k[kv], tokens)
    say("Keys: what each token offers to be found by.")
    out += format_matrix("V = X W_V", v[kv], tokens)
    say("Values: what each token hands over when it is attended to.")
    scores = q[head] @ k[kv].T * attn.scale + (bias[0, head].float() if bias is not None else 0)
    out += format_matrix(f"A = Q Kᵀ × {attn.scale:.4g}" + (" + bias" if bias is not None else ""), scores, tokens, tokens)
    say("Scores: row i, column j = how well query i matches key j.")
    if attn.causal:
        out += format_matrix("mask (0 = may attend, -inf = may not)", mask, tokens, tokens)
        say("Causal: a token may not look at tokens after it.")
    out += format_matrix("α = softmax(A + mask)", alphas[head], tokens, tokens)
    say("Each row is a probability distribution over the keys: it sums to 1.")
    out += format_matrix("O = α V", outputs[head], tokens)
    say("Each output row is the α-weighted mix of the value rows.")
    out += ["", "── all heads " + "─" * 40]
    out += format_matrix("Y = concat(O_1 … O_H) W_O", y, tokens)
    say("The heads are placed side by side and projected back to E features.")
    weights_diff = float((torch.stack(alphas) - caught["alpha"][0].float()).abs().max())
    output_diff = float((y - caught["y"][0].float()).abs().max())
    out += [
        "",
        f"check: the layer's own α equals the steps above (max |difference| = {weights_diff:.1e}), "
        f"and its output Y too ({output_diff:.1e})",
    ]
    return Walk("\n".join(out), weights_diff, output_diff)


def _stack_layers(model: Transformer) -> Any:
    stack = model.decoder if model.config.arch == "decoder" else model.encoder
    assert stack is not None
    return stack.layers
