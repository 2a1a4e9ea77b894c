"""Norms, MLPs and the Transformer block.

- LayerNorm (Ba et al. 2016) and RMSNorm (Zhang & Sennrich 2019: no mean, no bias; Llama, T5).
- The position-wise MLP of Vaswani et al. 2017, and its gated form (Shazeer 2020, "GLU Variants
  Improve Transformer": SwiGLU = silu(x W_gate) ⊙ x W_up, as in Llama).
- The block: self-attention, optional cross-attention (encoder-decoder), MLP, each wrapped in a
  residual connection, with the norm before the sublayer (pre-norm: GPT-2, Llama) or after the
  residual sum (post-norm: the original Transformer, BERT).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig
from ..kernels.activation import gelu
from ..kernels.linear import Pending, hooked, project, project_unbiased, settled
from ..kernels.norm import added_normed, normed
from .attention import SelfAttention, one_new_token
from .kv_cache import KVCache
from .packing import Packing


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x / rms(x) · weight over the last dimension, the normalizing in fp32 (as Llama and T5 do)."""
    if x.dtype is torch.float32 and weight.dtype is torch.float32:  # one call: fewer ops per token
        return F.rms_norm(x, (x.shape[-1],), weight, eps=eps)
    normed = F.rms_norm(x.float(), (x.shape[-1],), eps=eps)
    return weight * normed.to(x.dtype)


class RMSNorm(nn.Module):
    """x / rms(x) · weight, computed in fp32 (as Llama and T5 do): :func:`rms_norm`."""

    def __init__(self, dim: int, *, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def make_norm(kind: str, dim: int, eps: float, *, bias: bool = True) -> nn.Module:
    """A LayerNorm (with or without its bias) or RMSNorm of width ``dim``."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps, bias=bias)
    if kind == "rmsnorm":
        return RMSNorm(dim, eps=eps)
    raise ValueError(f"unknown norm '{kind}' (layernorm or rmsnorm)")


class GELU(nn.GELU):
    """``nn.GELU`` that runs lmforge's native kernel forward and backward, both forms
    (:func:`lmforge.kernels.activation.gelu`: float32 or bfloat16 on a CPU with the kernels
    built; the tanh form three to five times PyTorch's speed there, the erf form's backward pass
    1.2-2.5 times); every other case is ``nn.GELU``'s own."""

    def forward(self, x: Tensor) -> Tensor:
        return gelu(x, self.approximate)


ACTIVATIONS = {
    "gelu": GELU,
    "gelu_tanh": lambda: GELU(approximate="tanh"),
    "relu": nn.ReLU,
    "silu": nn.SiLU,
}


class MLP(nn.Module):
    """Position-wise feed-forward network: down(act(up(x))), or down(act(gate(x)) ⊙ up(x)) gated.

    Args:
        dim: input/output width.
        hidden_dim: inner width.
        activation: "gelu", "gelu_tanh", "relu" or "silu".
        gated: GLU-style (adds ``gate_proj``).
        bias: bias terms in the projections.
        dropout: dropout on the inner activations.
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        *,
        activation: str = "gelu",
        gated: bool = False,
        bias: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation '{activation}' (one of {', '.join(ACTIVATIONS)})")
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=bias) if gated else None
        self.up_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.act = ACTIVATIONS[activation]()
        self.dropout = nn.Dropout(dropout)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=bias)
        # gate and up already fused for decoding (lmforge.quant.for_decoding), used while the two
        # projections are still the ones it fused.
        self.gate_up_decode: nn.Module | None = None

    def forward(self, x: Tensor) -> Tensor:
        return project(self.down_proj, self._hidden(x))

    def branch(self, x: Tensor) -> Tensor | Pending:
        """``forward(x)``, or as :class:`~lmforge.kernels.linear.Pending` (x W_downᵀ, b_down) where
        the down projection is a plain biased ``nn.Linear``: its bias for the block's "add & norm"
        to add."""
        return project_unbiased(self.down_proj, self._hidden(x))

    def _hidden(self, x: Tensor) -> Tensor:
        if self.gate_proj is not None:
            fused = self.gate_up_decode
            if fused is not None and fused.covers(self.gate_proj, self.up_proj):
                gate, up = fused(x).chunk(2, dim=-1)  # [gate | up] = X [W_gate | W_up], one matmul
            else:
                gate, up = project(self.gate_proj, x), project(self.up_proj, x)
            hidden = self.act(gate) * up
        else:
            hidden = self.act(project(self.up_proj, x))
        if self.dropout.p:
            hidden = self.dropout(hidden)
        return hidden


class TransformerBlock(nn.Module):
    """Self-attention (+ cross-attention) + MLP, each with a residual connection and a norm.

    Args:
        config: the model config (widths, norm, MLP kind, pre/post-norm).
        causal: self-attention masks future positions (decoder blocks).
        cross_attention: add a cross-attention sublayer over an encoder memory.
    """

    def __init__(self, config: ModelConfig, *, causal: bool, cross_attention: bool = False) -> None:
        super().__init__()
        self.prenorm = config.prenorm

        def attention(is_causal: bool) -> SelfAttention:
            return SelfAttention(
                config.embed_dim,
                config.num_heads,
                num_kv_heads=config.num_kv_heads,
                head_dim=config.head_dim,
                bias=config.bias,
                qkv_bias=config.qkv_bias,
                dropout=config.attn_dropout,
                causal=is_causal,
                scale=config.attn_scale,
            )

        self.attn_norm = make_norm(config.norm, config.embed_dim, config.norm_eps, bias=config.norm_bias)
        self.self_attn = attention(causal)
        self.cross_norm = (
            make_norm(config.norm, config.embed_dim, config.norm_eps, bias=config.norm_bias)
            if cross_attention
            else None
        )
        self.cross_attn = attention(False) if cross_attention else None
        self.mlp_norm = make_norm(config.norm, config.embed_dim, config.norm_eps, bias=config.norm_bias)
        assert config.mlp_hidden_dim is not None
        self.mlp = MLP(
            config.embed_dim,
            config.mlp_hidden_dim,
            activation=config.activation,
            gated=config.gated_mlp,
            bias=config.bias,
        )
        self.dropout = nn.Dropout(config.dropout)
        # The one-token step in one native call (lmforge.quant.DecodeStep, set by for_decoding):
        # called with (self, x, rope, kv_cache, attention_mask), it returns the block's output,
        # or None where it does not apply (then the modules below run).
        self.decode_step: Callable[..., Tensor | None] | None = None

    def forward(self, x: Tensor, **kwargs: object) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """x (B, T, E) -> (x, self-attention α or None, cross-attention α or None); the keyword
        arguments are :meth:`run`'s (masks, positions, memory, caches, packing)."""
        x, branch, self_weights, cross_weights = self.run(x, None, **kwargs)  # type: ignore[arg-type]
        return (x if branch is None else x + settled(branch)), self_weights, cross_weights

    def run(
        self,
        x: Tensor,
        branch: Tensor | Pending | None,
        *,
        attention_mask: Tensor | None = None,
        rope: tuple[Tensor, Tensor] | None = None,
        position_bias: Tensor | None = None,
        memory: Tensor | None = None,
        memory_mask: Tensor | None = None,
        kv_cache: KVCache | None = None,
        cross_kv_cache: KVCache | None = None,
        need_weights: bool = False,
        packing: Packing | None = None,
    ) -> tuple[Tensor, Tensor | Pending | None, Tensor | None, Tensor | None]:
        """(x, branch) -> (x, branch, self-attention α or None, cross-attention α or None): the
        block on x + branch (x alone when branch is None), its last residual branch returned
        unadded (None after a post-norm block): a stack of pre-norm blocks adds it together with
        the next block's first norm, in one pass (:func:`~lmforge.kernels.norm.added_normed`).
        A branch may be :class:`~lmforge.kernels.linear.Pending`: its projection's bias still to be
        added, by that same pass (pre-norm blocks in training, without dropout).

        With ``packing``, x holds the real tokens' rows (N, E) and keeps that shape.
        """
        step = self.decode_step
        if (
            step is not None
            and branch is None
            and kv_cache is not None
            and one_new_token(x, memory, packing, position_bias, need_weights)
        ):
            y = step(self, x, rope, kv_cache, attention_mask)
            if y is not None:
                return y, None, None, None
        self_weights = cross_weights = None
        # the sublayers' output projections may leave their biases to the "add & norm" after them
        # (a training step without dropout; not where hooks or weights want the whole output)
        unbiased = (
            self.prenorm
            and not self.dropout.p
            and torch.is_grad_enabled()
            and kv_cache is None
            and cross_kv_cache is None
            and not need_weights
        )

        def leaves_bias(module: nn.Module | None, kind: type) -> dict[str, bool]:
            """``unbiased=True`` for a sublayer of its own kind without hooks (else nothing: a
            replaced module may not take the keyword)."""
            return {"unbiased": True} if unbiased and type(module) is kind and not hooked(module) else {}

        def self_attention(h: Tensor) -> Tensor | Pending:
            nonlocal self_weights
            out = self.self_attn(
                h,
                attention_mask=attention_mask,
                rope=rope,
                position_bias=position_bias,
                kv_cache=kv_cache,
                need_weights=need_weights,
                packing=packing,
                **leaves_bias(self.self_attn, SelfAttention),
            )
            if need_weights:
                out, self_weights = out
            return out

        def cross_attention(h: Tensor) -> Tensor | Pending:
            nonlocal cross_weights
            assert self.cross_attn is not None
            out = self.cross_attn(
                h,
                memory,
                attention_mask=memory_mask,
                kv_cache=cross_kv_cache,
                need_weights=need_weights,
                packing=packing,
                **leaves_bias(self.cross_attn, SelfAttention),
            )
            if need_weights:
                out, cross_weights = out
            return out

        def mlp(h: Tensor) -> Tensor | Pending:
            return self.mlp.branch(h) if leaves_bias(self.mlp, MLP) else self.mlp(h)

        if self.cross_attn is not None and memory is None:
            raise ValueError("this block has cross-attention: pass the encoder output as memory")
        sublayers: list[tuple[nn.Module, Callable[[Tensor], Tensor | Pending]]] = [(self.attn_norm, self_attention)]
        if self.cross_attn is not None:
            sublayers.append((self.cross_norm, cross_attention))
        sublayers.append((self.mlp_norm, mlp))
        x, branch = self._residuals(x, branch, sublayers)
        return x, branch, self_weights, cross_weights

    def _residuals(
        self,
        x: Tensor,
        branch: Tensor | Pending | None,
        sublayers: list[tuple[nn.Module, Callable[[Tensor], Tensor | Pending]]],
    ) -> tuple[Tensor, Tensor | Pending | None]:
        """The sublayers (norm, f) with their residual connections on x + branch: pre-norm
        x + f(norm(x)) each, the last sum left to the caller (x, its branch); post-norm
        norm(x + f(x)) each (x, None)."""
        dropout = self.dropout if self.dropout.p else None  # no call at all when it is off
        if not self.prenorm:
            x = x if branch is None else x + settled(branch)
            for norm, fn in sublayers:
                h = settled(fn(x))
                x = norm(x + (dropout(h) if dropout is not None else h))
            return x, None
        # a residual sum and the next norm in one pass (added_normed); under CPU bf16 autocast
        # the norms come out in bf16 for the projections
        if branch is None:
            h = normed(sublayers[0][0], x)
        else:
            x, h = added_normed(sublayers[0][0], x, branch)
        for i, (_, fn) in enumerate(sublayers):
            branch = fn(h)
            if dropout is not None:
                branch = dropout(settled(branch))
            if i + 1 < len(sublayers):
                x, h = added_normed(sublayers[i + 1][0], x, branch)
        return x, branch
