"""Causal self-attention over whole sequences, read straight from the fused Q/K/V projection,
forward and backward in native passes (``native.c``, section 7), for
:class:`lmforge.model.attention.SelfAttention` while training (and in long evaluation passes): queries and keys rotated by RoPE
angles as they are read, the output with the heads already joined for the output projection, and
the gradient in the fused projection's own layout, so neither the rotation's operators, the
heads' transposes nor the split's concatenation run."""

from __future__ import annotations

import torch
from torch import Tensor

from . import amx_tiles, block_kernels

DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # the kernel's arithmetic is float32
# bfloat16/float16 input: the native kernel (cast to float32 and back) while T·D stays at most
# this; above it, PyTorch's own low-precision kernel comes close or passes it. Measured on an AMX
# Xeon (AVX-512), one thread, training (forward and backward) against bf16 SDPA: 1.8-4.2x at
# T·D <= 8192, 1.3-1.4x at T 192-256 and D 64, 1.1x at T 512, D 64 and 0.96x at T 256, D 128.
LOW_PRECISION_WORK = 16384  # (a bfloat16 qkv on a CPU with AMX tiles: section 8's kernel, any T·D)
MAX_LENGTH = 1024  # longer sequences keep PyTorch's tiled kernel (the scores of a head stay in cache here)

Angles = tuple[Tensor, Tensor]  # RoPE's cos, sin: (T, R) or (B, T, R), R even, R <= D


def _angles_fit(rope: Angles | None, B: int, T: int, head_dim: int) -> bool:
    if rope is None:
        return True
    cos, sin = rope
    R = cos.shape[-1]
    return (
        cos.shape == sin.shape
        and cos.shape[-2:] == (T, R)
        and (cos.dim() == 2 or (cos.dim() == 3 and cos.shape[0] == B))
        and 0 < R <= head_dim
        and R % 2 == 0
        and all(t.dtype is torch.float32 and t.device.type == "cpu" for t in rope)
    )


def native_causal_attention(
    qkv: Tensor, heads: int, kv_heads: int, head_dim: int, rope: Angles | None = None
) -> bool:
    """Whether :func:`causal_attention` runs natively for ``qkv`` (B, T, (H + 2·Hkv)·D): float32
    on the CPU (bfloat16 on a CPU with AMX tiles; else bfloat16/float16 up to T·D =
    :data:`LOW_PRECISION_WORK`), laid out as such, D
    a multiple of 8, the query heads a multiple of the key/value heads, T up to
    :data:`MAX_LENGTH`, RoPE angles (if any) float32 of shape (T, R) or (B, T, R), the kernels
    built, and not traced by ``torch.compile``."""
    return (
        qkv.dtype in DTYPES
        and qkv.device.type == "cpu"
        and qkv.dim() == 3
        and qkv.shape[-1] == (heads + 2 * kv_heads) * head_dim
        and 0 < qkv.shape[1] <= MAX_LENGTH
        and head_dim % 8 == 0
        and heads % kv_heads == 0
        and _angles_fit(rope, qkv.shape[0], qkv.shape[1], head_dim)
        and not torch.compiler.is_compiling()
        and block_kernels() is not None
        and (qkv.dtype is torch.float32 or _tiles(qkv) or qkv.shape[1] * head_dim <= LOW_PRECISION_WORK)
    )


def _tiles(qkv: Tensor) -> bool:
    """Whether ``qkv`` takes the bfloat16 kernel on AMX tiles (``native.c``, section 8)."""
    return qkv.dtype is torch.bfloat16 and amx_tiles()


def _kernel(name: str, dtype: torch.dtype):  # noqa: ANN202
    """Section 7's native function ``name`` (float32), or section 8's for a bfloat16 qkv."""
    return getattr(block_kernels(), f"{name}_bf16" if dtype is torch.bfloat16 else name)


def _angle_args(cos: Tensor | None, sin: Tensor | None) -> tuple[int, int, int, int]:
    """cos, sin, R and the stride between sequences' tables, as the kernel takes them."""
    if cos is None or sin is None:
        return 0, 0, 0, 0
    R = cos.shape[-1]
    stride = cos.shape[-2] * R if cos.dim() == 3 else 0
    return cos.data_ptr(), sin.data_ptr(), R, stride


class _CausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(  # noqa: ANN205
        ctx,  # noqa: ANN001
        qkv: Tensor,
        cos: Tensor | None,
        sin: Tensor | None,
        heads: int,
        kv_heads: int,
        head_dim: int,
        scale: float,
    ):
        qkv = qkv.contiguous()
        B, T, _ = qkv.shape
        out = qkv.new_empty(B, T, heads * head_dim)
        lse = torch.empty(B, heads, T, dtype=torch.float32)
        failed = _kernel("causal_attention_forward", qkv.dtype)(
            qkv.data_ptr(), B, T, heads, kv_heads, head_dim, scale, *_angle_args(cos, sin),
            out.data_ptr(), lse.data_ptr(), torch.get_num_threads(),
        )
        if failed:
            raise MemoryError(f"causal attention: no memory for the scores of {T} positions")
        ctx.save_for_backward(qkv, cos, sin, out, lse)
        ctx.shape = (heads, kv_heads, head_dim, scale)
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):  # noqa: ANN001, ANN205
        qkv, cos, sin, out, lse = ctx.saved_tensors
        heads, kv_heads, head_dim, scale = ctx.shape
        nothing = (None,) * 6
        if torch.is_grad_enabled():  # a gradient to differentiate again (create_graph): PyTorch's operators
            rope = None if cos is None else (cos, sin)
            with torch.enable_grad():
                again = explicit_causal_attention(qkv, heads, kv_heads, head_dim, scale, rope)
                (dqkv,) = torch.autograd.grad(again, qkv, dout, create_graph=True)
            return (dqkv, *nothing)
        dout = dout.to(qkv.dtype).contiguous()
        B, T, _ = qkv.shape
        dqkv = torch.empty_like(qkv)
        failed = _kernel("causal_attention_backward", qkv.dtype)(
            qkv.data_ptr(), out.data_ptr(), dout.data_ptr(), lse.data_ptr(), B, T, heads, kv_heads, head_dim,
            scale, *_angle_args(cos, sin), dqkv.data_ptr(), torch.get_num_threads(),
        )
        if failed:
            raise MemoryError(f"causal attention backward: no memory for the scores of {T} positions")
        return (dqkv, *nothing)


def _rotated(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, H, T, D) with its first R dimensions rotated, pairs (i, i + R/2), as RoPE does."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    R = cos.shape[-1]
    x1, x2, rest = x[..., : R // 2], x[..., R // 2 : R], x[..., R:]
    turned = torch.cat((-x2, x1), dim=-1)
    return torch.cat((x[..., :R] * cos + turned * sin, rest), dim=-1)


def explicit_causal_attention(
    qkv: Tensor, heads: int, kv_heads: int, head_dim: int, scale: float, rope: Angles | None = None
) -> Tensor:
    """What :func:`causal_attention` computes, by PyTorch's differentiable operators (the scores
    written out, as :class:`~lmforge.model.attention.SelfAttention`'s explicit path does)."""
    B, T, _ = qkv.shape
    q, k, v = qkv.split((heads * head_dim, kv_heads * head_dim, kv_heads * head_dim), dim=-1)
    q = q.reshape(B, T, heads, head_dim).transpose(1, 2)  # (B, H, T, D)
    k = k.reshape(B, T, kv_heads, head_dim).transpose(1, 2)
    if rope is not None:
        q, k = _rotated(q, *rope), _rotated(k, *rope)
    k = k.repeat_interleave(heads // kv_heads, dim=1)
    v = v.reshape(B, T, kv_heads, head_dim).transpose(1, 2).repeat_interleave(heads // kv_heads, dim=1)
    scores = (q @ k.transpose(-2, -1)) * scale
    later = torch.ones(T, T, dtype=torch.bool, device=qkv.device).triu(1)
    out = scores.masked_fill(later, float("-inf")).softmax(dim=-1) @ v  # (B, H, T, D)
    return out.transpose(1, 2).reshape(B, T, heads * head_dim)


def causal_attention(
    qkv: Tensor,
    heads: int,
    kv_heads: int,
    head_dim: int,
    scale: float,
    rope: Angles | None = None,
    *,
    checked: bool = False,
) -> Tensor:
    """softmax(Q Kᵀ·scale, causal) V with every head joined: (B, T, H·D), for the fused projection
    ``qkv`` (B, T, (H + 2·Hkv)·D) holding each position's H query heads, then its Hkv key heads,
    then its Hkv value heads (query head h reads key/value head h // (H / Hkv)); with ``rope``
    (cos, sin), queries and keys rotated first. A bfloat16 ``qkv`` (autocast's projection) on a
    CPU with AMX tiles runs there: the products in bfloat16 with float32 sums, the scores and
    softmax in float32, P and dS rounded to bfloat16 for their products (as flash attention on a
    GPU); otherwise a bfloat16 or float16 ``qkv`` is read as float32 and the output comes back in
    its dtype. Differentiable with respect to ``qkv`` (the angles are constants); a gradient
    taken with ``create_graph`` comes from :func:`explicit_causal_attention`, so it can be
    differentiated again. Only where
    :func:`native_causal_attention` says so (``checked=True``: the caller has just asked it).

    Raises:
        ValueError: where it does not apply.
    """
    if not checked and not native_causal_attention(qkv, heads, kv_heads, head_dim, rope):
        shapes = "" if rope is None else f", angles {tuple(rope[0].shape)}"
        raise ValueError(
            f"native causal attention does not apply to {qkv.dtype} {tuple(qkv.shape)} on {qkv.device} "
            f"with {heads} heads, {kv_heads} key/value heads of {head_dim}{shapes}"
        )
    cos, sin = (None, None) if rope is None else (t.detach().contiguous() for t in rope)
    if qkv.dtype is torch.float32 or _tiles(qkv):
        return _CausalAttention.apply(qkv, cos, sin, heads, kv_heads, head_dim, float(scale))
    # bfloat16 (autocast's matmuls) or float16: the scores and softmax in float32, one cast each way
    out = _CausalAttention.apply(qkv.float(), cos, sin, heads, kv_heads, head_dim, float(scale))
    return out.to(qkv.dtype)
