"""A Transformer block's one-token step in one native call, for decoding one sequence in float32
on a CPU (:class:`DecodeStep`)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..kernels.step import BlockWeights, block_weights, decode_block
from ..model.kv_cache import KVCache
from ..model.layers import RMSNorm, TransformerBlock
from .dense import DecodeLinear, DecodeRMSNorm, FusedDecodeLinear

PRODUCTS = (DecodeLinear, FusedDecodeLinear)
ACTIVATIONS = {nn.ReLU: "relu", nn.SiLU: "silu"}  # and nn.GELU, by its approximate


def activation_name(act: nn.Module) -> str | None:
    """The native kernels' name of an MLP's activation module (None: none)."""
    if type(act) is nn.GELU:
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
    form: float32 weights stored transposed (:class:`~lmforge.quant.DecodeLinear`), Q/K/V (and a
    gated MLP's gate and up) fused, LayerNorm or RMSNorm, no forward hooks; a module wrapped or
    replaced since (by a PEFT method), or another dtype, turns it off. The weights' addresses are
    gathered once and again only when a weight is another tensor."""

    def __init__(self) -> None:
        self._key: tuple[int, ...] | None = None
        self._weights: BlockWeights | None = None

    def __getstate__(self) -> dict:
        return {}  # addresses are of this process's tensors: a copy gathers its own

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    @staticmethod
    def parts(block: TransformerBlock) -> tuple[nn.Module, ...] | None:
        """The modules the step reads (attention norm, Q/K/V, output product, MLP norm, up or
        [gate | up], down), or None where the block is not in a form it serves."""
        attn, mlp = block.self_attn, block.mlp
        qkv = attn.decode_qkv()
        if mlp.gate_proj is not None:
            up = mlp.gate_up_decode
            if up is None or not up.covers(mlp.gate_proj, mlp.up_proj):
                return None
        else:
            up = mlp.up_proj
        parts = (block.attn_norm, qkv, attn.out_proj, block.mlp_norm, up, mlp.down_proj)
        if (
            not block.prenorm
            or block.cross_attn is not None
            or type(parts[0]) is not type(parts[3])
            or type(parts[0]) not in (nn.LayerNorm, RMSNorm, DecodeRMSNorm)
            or parts[0].weight is None  # a LayerNorm without its affine weights
            or parts[3].weight is None
            or any(type(p) not in PRODUCTS for p in parts[1:3] + parts[4:])
            or activation_name(mlp.act) is None
            or any(m._forward_hooks or m._forward_pre_hooks for m in (block, attn, mlp, *parts))
        ):
            return None
        return parts

    def weights(self, block: TransformerBlock) -> BlockWeights | None:
        """The block's weights for the native call, or None where the step does not apply now."""
        parts = self.parts(block)
        if parts is None:
            return None
        norm1, qkv, out, norm2, up, down = parts
        tensors = (
            norm1.weight, norm1.bias if isinstance(norm1, nn.LayerNorm) else None,
            norm2.weight, norm2.bias if isinstance(norm2, nn.LayerNorm) else None,
            qkv.weight_t, qkv.bias, out.weight_t, out.bias, up.weight_t, up.bias, down.weight_t, down.bias,
        )  # fmt: skip
        key = tuple(0 if t is None else t.data_ptr() for t in tensors)
        if key == self._key:
            return self._weights
        attn, mlp = block.self_attn, block.mlp
        if norm1.eps != norm2.eps or any(t is not None and t.dtype is not torch.float32 for t in tensors):
            return None
        try:
            weights = block_weights(
                heads=attn.num_heads,
                kv_heads=attn.num_kv_heads,
                head_dim=attn.head_dim,
                norm="layernorm" if isinstance(norm1, nn.LayerNorm) else "rmsnorm",
                eps=norm1.eps,
                activation=activation_name(mlp.act),  # type: ignore[arg-type]  # parts() checked it
                gated=mlp.gate_proj is not None,
                scale=attn.scale,
                norms=((tensors[0], tensors[1]), (tensors[2], tensors[3])),
                qkv=(tensors[4], tensors[5]),
                out=(tensors[6], tensors[7]),
                up=(tensors[8], tensors[9]),
                down=(tensors[10], tensors[11]),
            )
        except ValueError:  # a layout the kernel does not read (a weight's rows apart, say)
            return None
        self._key, self._weights = key, weights
        return weights

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
