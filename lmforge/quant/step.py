"""A Transformer block's one-token step in one native call, for decoding one sequence in float32
on a CPU (:class:`DecodeStep`)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..kernels.step import BlockWeights, Product, block_weights, decode_block
from ..model.kv_cache import KVCache
from ..model.layers import GELU, RMSNorm, TransformerBlock
from .blocks import BlockLinear, FusedBlockLinear
from .dense import DecodeLinear, DecodeRMSNorm, FusedDecodeLinear

PRODUCTS = (DecodeLinear, FusedDecodeLinear, BlockLinear, FusedBlockLinear)
ACTIVATIONS = {nn.ReLU: "relu", nn.SiLU: "silu"}  # and nn.GELU, by its approximate


def activation_name(act: nn.Module) -> str | None:
    """The native kernels' name of an MLP's activation module (None: none)."""
    if type(act) in (nn.GELU, GELU):
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    return ACTIVATIONS.get(type(act))


class DecodeStep:
    """A pre-norm :class:`~lmforge.model.layers.TransformerBlock`'s step for one new token of one
    sequence as one call of :func:`lmforge.kernels.step.decode_block`: both norms, the fused Q/K/V
    product, rotation, the cache's append, attention, the output product, the MLP and both
    residual sums; the same formulas as the block's modules, without the twenty-odd operators
    and module calls a layer costs a token in PyTorch.

    :func:`~lmforge.quant.for_decoding` gives one to every block it can serve (``decode_step``);
    the block calls it for a single new token and runs its modules where it answers None. It reads
    the block's modules at each call, so it applies only while they are those of the decoding
    form: float32 weights stored transposed (:class:`~lmforge.quant.DecodeLinear`) or kept in
    GGUF's blocks (:class:`~lmforge.quant.BlockLinear`), Q/K/V (and a gated MLP's gate and up)
    fused, LayerNorm or RMSNorm, no forward hooks; a module wrapped or replaced since (by a PEFT
    method), or another dtype, turns it off. The weights' addresses are gathered once, and again
    only when a module or tensor it reads (or the attention's scale) is another one."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._weights: BlockWeights | None = None

    def __getstate__(self) -> dict:
        return {}  # addresses are of this process's tensors: a copy gathers its own

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    @staticmethod
    def _find(block: TransformerBlock) -> tuple[nn.Module, ...] | None:
        """The block's attention, MLP and the modules the step reads (attention norm, Q/K/V fused,
        output product, MLP norm, up or [gate | up] fused, down, activation), read from the
        modules' own dictionaries (an attribute read of a submodule costs about a microsecond,
        and this runs for every block at every token); None where Q/K/V or gate/up are not fused
        or no longer stand for the projections."""
        children = block._modules
        attn, mlp = children["self_attn"], children["mlp"]
        a, m = attn._modules, mlp._modules
        qkv = a.get("qkv_decode")
        if qkv is None or not qkv.covers(a["q_proj"], a["k_proj"], a["v_proj"]):
            return None
        up = m["up_proj"]
        if m.get("gate_proj") is not None:
            up = m.get("gate_up_decode")
            if up is None or not up.covers(m["gate_proj"], m["up_proj"]):
                return None
        norm1, norm2 = children["attn_norm"], children["mlp_norm"]
        return attn, mlp, norm1, qkv, a["out_proj"], norm2, up, m["down_proj"], m["act"]

    @classmethod
    def parts(cls, block: TransformerBlock) -> tuple[nn.Module, ...] | None:
        """The modules the step reads (attention norm, Q/K/V, output product, MLP norm, up or
        [gate | up], down), or None where the block is not in a form it serves. (Forward hooks,
        which may come and go, are looked for at each call: :meth:`weights`.)"""
        found = cls._find(block)
        if found is None:
            return None
        _, _, *parts = found
        norm1, _, _, norm2, _, _, act = parts
        if (
            not block.prenorm
            or block.cross_attn is not None
            or type(norm1) is not type(norm2)
            or type(norm1) not in (nn.LayerNorm, RMSNorm, DecodeRMSNorm)
            or norm1.weight is None  # a LayerNorm without its affine weights
            or norm2.weight is None
            or norm1.eps != norm2.eps
            or any(type(p) not in PRODUCTS for p in parts[1:3] + parts[4:6])
            or activation_name(act) is None
        ):
            return None
        return tuple(parts[:6])

    def weights(self, block: TransformerBlock) -> BlockWeights | None:
        """The block's weights for the native call, or None where the step does not apply now.
        Gathered (and checked) again only when a module the step reads, or one of their
        tensors, is another one than last time."""
        found = self._find(block)
        if found is None:
            return None
        hooked = any(m._forward_hooks or m._forward_pre_hooks for m in (block, *found))
        key = (
            found,
            found[0].scale,
            tuple(
                0 if t is None else t.data_ptr()
                for m in found
                for t in (*m._parameters.values(), *m._buffers.values())
            ),
        )
        if key != self._key:
            self._key, self._weights = key, self._gather(block)
        return None if hooked else self._weights

    def _gather(self, block: TransformerBlock) -> BlockWeights | None:
        parts = self.parts(block)
        if parts is None:
            return None
        norm1, qkv, out, norm2, up, down = parts
        norms = tuple((n.weight, n.bias if isinstance(n, nn.LayerNorm) else None) for n in (norm1, norm2))
        products = [
            Product(p.weight_t, p.bias)
            if isinstance(p, DecodeLinear)
            else Product(None, p.bias, p.codes, p.scales, p.offsets)
            for p in (qkv, out, up, down)
        ]
        floats = [*norms[0], *norms[1], *(t for p in products for t in (p.bias, p.scales, p.offsets))]
        weights = [p.weight_t for p in products if p.weight_t is not None]  # float32, or bfloat16 (bf16 decoding)
        if any(t is not None and t.dtype is not torch.float32 for t in floats) or any(
            w.dtype not in (torch.float32, torch.bfloat16) for w in weights
        ):
            return None
        attn, mlp = block.self_attn, block.mlp
        try:
            return block_weights(
                heads=attn.num_heads,
                kv_heads=attn.num_kv_heads,
                head_dim=attn.head_dim,
                norm="layernorm" if isinstance(norm1, nn.LayerNorm) else "rmsnorm",
                eps=norm1.eps,
                activation=activation_name(mlp.act),  # type: ignore[arg-type]  # parts() checked it
                gated=mlp.gate_proj is not None,
                scale=attn.scale,
                norms=norms,  # type: ignore[arg-type]  # two pairs
                qkv=products[0],
                out=products[1],
                up=products[2],
                down=products[3],
            )
        except ValueError:  # a layout the kernel does not read (a weight's rows apart, say)
            return None

    def __call__(
        self,
        block: TransformerBlock,
        x: Tensor,
        rope: tuple[Tensor, Tensor] | None,
        kv_cache: KVCache,
        attention_mask: Tensor | None,
    ) -> Tensor | None:
        """The block's output for x (1, 1, E), its key and value appended to ``kv_cache``; None
        (nothing done) where the step does not apply."""
        if x.shape[0] != 1 or (block.training and (block.dropout.p or block.mlp.dropout.p)):
            return None
        position = block.self_attn.native_positions(x, kv_cache, attention_mask)
        if position is None:
            return None
        weights = self.weights(block)
        if weights is None:
            return None
        if rope is not None:
            if rope[0].dtype is not torch.float32:
                return None
            rope = (rope[0].reshape(-1), rope[1].reshape(-1))
        y = decode_block(weights, x.reshape(-1), rope, kv_cache.keys, kv_cache.values, int(position))
        kv_cache.length += 1
        return y.view(1, 1, -1)
