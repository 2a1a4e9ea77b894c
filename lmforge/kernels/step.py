"""A pre-norm Transformer block's step for one new token of one sequence in one native call
(``native.c``, section 5: the norms, the products, the attention over the cache, the activation
and both residual sums), for :class:`lmforge.quant.DecodeStep`."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from . import _pointer, block_kernels, check_blocks, kernel_problem

NORMS = {"layernorm": 0, "rmsnorm": 1}  # native.c's codes (section 5)
ACTIVATIONS = {"gelu": 0, "gelu_tanh": 1, "relu": 2, "silu": 3}


class _Product(ctypes.Structure):
    """``Product`` of ``native.c`` (section 5), field for field."""

    _fields_ = [
        ("w", ctypes.c_void_p),
        ("ld", ctypes.c_long),
        *[(name, ctypes.c_void_p) for name in ("codes", "scales", "offsets", "bias", "w16")],
    ]


class _Block(ctypes.Structure):
    """``Block`` of ``native.c`` (section 5), field for field."""

    _fields_ = [
        *[(name, ctypes.c_long) for name in ("width", "heads", "kv_heads", "head_dim", "hidden")],
        *[(name, ctypes.c_int) for name in ("norm", "activation", "gated")],
        *[(name, ctypes.c_float) for name in ("eps", "scale")],
        *[(name, ctypes.c_void_p) for name in ("norm1_w", "norm1_b", "norm2_w", "norm2_b")],
        *[(name, _Product) for name in ("qkv", "out", "up", "down")],
    ]


class Product(NamedTuple):
    """One product of a block: a float32 or bfloat16 weight stored transposed, ``weight_t``
    (K, N) with its rows contiguous (:class:`~lmforge.quant.DecodeLinear`), or a weight kept in blocks,
    ``codes`` (N, K) with its ``scales`` and ``offsets`` (:class:`~lmforge.quant.BlockLinear`;
    :func:`lmforge.kernels.check_blocks` says the layout); and its ``bias`` (N,) or None."""

    weight_t: Tensor | None = None
    bias: Tensor | None = None
    codes: Tensor | None = None
    scales: Tensor | None = None
    offsets: Tensor | None = None

    def native(self, name: str, shape: tuple[int, int]) -> _Product:
        """The C struct, once the tensors are checked to be a (K, N) product C can read."""
        K, N = shape
        if self.codes is not None:
            if self.scales is None or tuple(self.codes.shape) != (N, K):
                raise ValueError(
                    f"{name}: expected codes {(N, K)} with scales, got {tuple(self.codes.shape)}"
                )
            check_blocks(self.codes, self.scales, self.offsets, self.bias)
            return _Product(
                codes=self.codes.data_ptr(),
                scales=self.scales.data_ptr(),
                offsets=_pointer(self.offsets, torch.float32),
                bias=_pointer(self.bias, torch.float32),
            )
        weight = self.weight_t
        if (
            weight is None
            or tuple(weight.shape) != shape
            or weight.dtype not in (torch.float32, torch.bfloat16)
            or not weight.is_cpu
            or weight.stride(1) != 1
        ):
            got = "nothing" if weight is None else f"{weight.dtype} {tuple(weight.shape)}"
            raise ValueError(
                f"{name}: expected a float32 or bfloat16 CPU weight {shape}, rows contiguous, got {got}"
            )
        if self.bias is not None and self.bias.shape != (N,):
            raise ValueError(f"{name}: bias {tuple(self.bias.shape)} for {N} outputs")
        bias, ld = _pointer(self.bias, torch.float32), weight.stride(0)
        if weight.dtype is torch.bfloat16:
            return _Product(w16=weight.data_ptr(), ld=ld, bias=bias)
        return _Product(w=weight.data_ptr(), ld=ld, bias=bias)


@dataclass(frozen=True)
class BlockWeights:
    """A pre-norm block's weights as :func:`decode_block` reads them: ``struct`` holds their
    addresses, ``tensors`` keeps them alive. Made by :func:`block_weights`."""

    struct: _Block
    tensors: tuple[Tensor | None, ...]
    width: int
    kv_heads: int
    head_dim: int


Norm = tuple[Tensor, Tensor | None]  # a norm's weight and bias (None: none)


def block_weights(
    *,
    heads: int,
    kv_heads: int,
    head_dim: int,
    norm: str,
    eps: float,
    activation: str,
    gated: bool,
    scale: float,
    norms: tuple[Norm, Norm],
    qkv: Product,
    out: Product,
    up: Product,
    down: Product,
) -> BlockWeights:
    """The weights of a pre-norm block for :func:`decode_block`: the two norms' (weight, bias)
    ((E,), the bias None for RMSNorm or a LayerNorm without one) and the four products (K, N):
    ``qkv`` (E, (H + 2·Hkv)·D) fused [Q | K | V], ``out`` (H·D, E), ``up`` (E, F), or (E, 2F)
    [gate | up] when ``gated``, ``down`` (F, E). Float32 on the CPU, but for block codes.

    Raises:
        ValueError: an unknown norm or activation, or a tensor of another dtype, layout or shape.
    """
    if norm not in NORMS or activation not in ACTIVATIONS:
        raise ValueError(f"norm '{norm}' or activation '{activation}' has no native form")
    if head_dim % 8 or heads % kv_heads:
        raise ValueError(
            f"{heads} heads, {kv_heads} key/value heads of width {head_dim}: no native attention"
        )
    width = norms[0][0].shape[0]
    if down.codes is not None:
        hidden = down.codes.shape[1]
    elif down.weight_t is not None:
        hidden = down.weight_t.shape[0]
    else:
        raise ValueError("down: no weight")
    shapes = {
        "qkv": (qkv, (width, (heads + 2 * kv_heads) * head_dim)),
        "out": (out, (heads * head_dim, width)),
        "up": (up, (width, 2 * hidden if gated else hidden)),
        "down": (down, (hidden, width)),
    }
    fields: dict[str, int | None | _Product] = {}
    tensors: list[Tensor | None] = []
    for name, (product, shape) in shapes.items():
        fields[name] = product.native(name, shape)
        tensors += product
    for i, (weight, bias) in enumerate(norms, start=1):
        for tensor in (weight, bias):
            if tensor is not None and tensor.shape != (width,):
                raise ValueError(f"norm {i}: {tuple(tensor.shape)} for a width of {width}")
        fields[f"norm{i}_w"], fields[f"norm{i}_b"] = (
            _pointer(weight, torch.float32),
            _pointer(bias, torch.float32),
        )
        tensors += [weight, bias]
    struct = _Block(
        width=width, heads=heads, kv_heads=kv_heads, head_dim=head_dim, hidden=hidden, norm=NORMS[norm],
        activation=ACTIVATIONS[activation], gated=int(gated), eps=eps, scale=scale, **fields,
    )  # fmt: skip
    return BlockWeights(struct, tuple(tensors), width, kv_heads, head_dim)


def decode_block(
    weights: BlockWeights,
    x: Tensor,
    rope: tuple[Tensor, Tensor] | None,
    keys: Tensor,
    values: Tensor,
    position: int,
) -> Tensor:
    """A pre-norm block's step for one new token of one sequence, in one call (``native.c``,
    section 5): ``x`` (E,) -> (E,), float32. Its key and value are written into ``keys``/``values``
    (1, Hkv, capacity, D) at ``position``, rotated first by ``rope``'s cos/sin ((R,) each, R ≤ D;
    None: no rotation), and it attends to positions 0..``position``.

    Raises:
        ValueError: tensors of another dtype, device, layout or shape, or a position outside the cache.
    """
    lib = block_kernels()
    assert lib is not None, kernel_problem()
    if x.shape != (weights.width,):
        raise ValueError(f"x {tuple(x.shape)} is not one row of {weights.width}")
    if (
        keys.shape != values.shape
        or keys.shape[:2] != (1, weights.kv_heads)
        or keys.shape[3] != weights.head_dim
    ):
        raise ValueError(
            f"caches {tuple(keys.shape)} and {tuple(values.shape)} for {weights.kv_heads} heads of {weights.head_dim}"
        )
    capacity = keys.shape[2]
    if not 0 <= position < capacity:
        raise ValueError(f"position {position} is outside a cache of {capacity}")
    cos = sin = None
    angles = 0
    if rope is not None:
        cos, sin = rope
        angles = cos.shape[-1]
        if cos.shape != (angles,) or sin.shape != (angles,) or angles > weights.head_dim or angles % 2:
            raise ValueError(
                f"rotary angles {tuple(cos.shape)} and {tuple(sin.shape)} for heads of {weights.head_dim}"
            )
    y = torch.empty(weights.width, dtype=torch.float32)
    status = lib.decode_block(
        ctypes.addressof(weights.struct), _pointer(x, torch.float32), y.data_ptr(), _pointer(cos, torch.float32),
        _pointer(sin, torch.float32), angles, _pointer(keys, torch.float32), _pointer(values, torch.float32),
        capacity, position, torch.get_num_threads(),
    )  # fmt: skip
    if status != 0:
        raise MemoryError("decode_block: out of memory")
    return y
