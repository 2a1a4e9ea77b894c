"""Weights laid out for decoding: fp32 in the layout the CPU streams fastest, bf16, and int8
weight-only quantization with per-group scales.

Generating one token at a time reads every weight once per token and does two FLOPs with it, so
decoding at batch 1 is bound by the bytes the weights take, not by arithmetic. How fast they are
read depends on their layout:

- **fp32**: on a CPU every ``nn.Linear`` keeps its weight transposed, (in, out) row-major, and
  multiplies with ``x @ Wᵀ`` as one ``addmm`` over it (:class:`DecodeLinear`). A one-row product
  then streams the weight as the BLAS's axpy-style kernel, which reads memory faster than the
  dot-product kernel ``F.linear`` uses on the (out, in) layout: 18–24 against 11–18 GB/s on one
  core here (``benchmarks/generation.py`` measures both). Layers that read the same input (Q, K
  and V; a gated MLP's gate and up) are fused into one wider product (:class:`FusedDecodeLinear`),
  which streams faster still. Same numbers to fp32 rounding.

And two ways to read fewer of them:

- **bf16**: the whole model in bfloat16 (2 bytes per weight instead of 4; the KV cache too).
- **int8, weight-only**: every ``nn.Linear`` of the model (the LM head included) keeps its weight
  as int8 codes q ∈ [−127, 127] and one scale per group of consecutive input columns of each
  output row, w ≈ s_g · q with s_g = max|w_g| / 127 (symmetric absmax). Where the native block
  kernel is built (:mod:`lmforge.kernels`), the groups are 32 wide, GGUF's Q8_0 layout, and the
  product is :class:`BlockLinear`'s, in fp32 arithmetic. Elsewhere they are ``group_size`` wide
  (or the widest group under that size that divides the layer's columns: SmolLM2's 576 take
  192) and the product runs in PyTorch's int8-weight matmul (``torch._weight_int8pack_mm``, one
  call per group, activations in bf16: :class:`Int8Linear`). Embeddings, norms and attention
  stay floating point.

And, without changing a single value, the blocks a GGUF file keeps its weights in:

- **blocks**: a linear weight whose values lie exactly on a Q8_0/Q4_0/Q5_0/Q4_1/Q5_1 grid (a
  model read from such a file) is kept as int8 codes with the blocks' scales and offsets
  (:class:`BlockLinear`) under ``fp32`` too: 1.13–1.25 bytes per weight instead of 4, the same
  weight, multiplied in fp32 arithmetic.

References: Dettmers et al. 2022, "LLM.int8()" (absmax int8 weights); ggml's Q8_0 block format
(llama.cpp); gpt-fast (int8 weight-only decoding in PyTorch). The quality cost is measured, not
assumed: ``benchmarks/generation.py`` reports the perplexity of each form on the Python-docs corpus.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .kernels import (
    BLOCK,
    block_dequantize,
    block_find,
    block_kernels,
    block_matmul,
    block_matmul_op,
    check_blocks,
    rms_norm,
)
from .model.layers import RMSNorm
from .model.layers import rms_norm as torch_rms_norm

__all__ = [
    "DTYPES",
    "BlockLinear",
    "DecodeLinear",
    "DecodeRMSNorm",
    "Fused",
    "FusedBlockLinear",
    "FusedDecodeLinear",
    "Int8Linear",
    "block_linears",
    "find_blocks",
    "fitting_group",
    "for_decoding",
    "fuse_for_decoding",
    "quantize_int8",
    "quantize_linears",
    "transpose_linears",
]

DTYPES = ("fp32", "bf16", "int8")
DEFAULT_GROUP_SIZE = 256  # columns per scale; Q8_0 uses 32 (the same code, slower with PyTorch's kernel here)


def quantize_int8(weight: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """Symmetric absmax int8 codes and scales of ``weight`` (N, K), one scale per ``group_size``
    columns of a row: codes (G, N, g) int8 and scales (G, N) float32, G = K / g groups of g columns.

    Raises:
        ValueError: ``group_size`` does not divide the K input columns.
    """
    N, K = weight.shape
    if group_size <= 0 or K % group_size:
        raise ValueError(f"group_size {group_size} must divide the {K} input columns")
    groups = weight.detach().float().reshape(N, K // group_size, group_size)  # (N, G, g)
    scales = groups.abs().amax(dim=-1) / 127.0  # (N, G)
    codes = torch.round(groups / scales.clamp(min=torch.finfo(torch.float32).tiny)[..., None])
    codes = codes.clamp(-127, 127).to(torch.int8)
    return codes.transpose(0, 1).contiguous(), scales.t().contiguous()  # (G, N, g), (G, N)


def fitting_group(columns: int, group_size: int) -> int:
    """The widest group of at most ``group_size`` columns that divides ``columns``: a width of
    576 (SmolLM2) with groups of 256 takes groups of 192, 1,536 columns take 256."""
    if group_size <= 0:
        raise ValueError(f"group_size must be positive, got {group_size}")
    return next(g for g in range(min(group_size, columns), 0, -1) if columns % g == 0)


class Int8Linear(nn.Module):
    """A linear layer with int8 weights and per-group scales: y = Σ_g s_g ⊙ (x_g q_gᵀ) + b.

    Args:
        codes: (G, N, g) int8, group-major (each group's (N, g) block contiguous for the kernel).
        scales: (G, N) per-group scales.
        bias: (N,) or None, kept in floating point.
    """

    def __init__(self, codes: Tensor, scales: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.num_groups, self.out_features, self.group_size = codes.shape
        self.in_features = self.num_groups * self.group_size
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales.to(torch.bfloat16))  # the kernel takes the activations' dtype
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = DEFAULT_GROUP_SIZE) -> Int8Linear:
        """Quantize an ``nn.Linear`` (its weight is read, not kept), in groups of the widest size
        up to ``group_size`` that divides its input columns (:func:`fitting_group`)."""
        codes, scales = quantize_int8(linear.weight, fitting_group(linear.in_features, group_size))
        return cls(codes, scales, linear.bias)

    def dequantized_weight(self) -> Tensor:
        """The weight these codes stand for, (N, K) float32 (for checks and export)."""
        weight = self.codes.float() * self.scales.float()[..., None]  # (G, N, g)
        return weight.transpose(0, 1).reshape(self.out_features, self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)  # (M, K)
        g = self.group_size
        out = None
        for i in range(self.num_groups):  # x_g q_gᵀ · s_g, one group of columns at a time
            part = torch._weight_int8pack_mm(
                rows[:, i * g : (i + 1) * g].contiguous(), self.codes[i], self.scales[i]
            )
            out = part if out is None else out + part  # (M, N)
        assert out is not None
        out = out.to(x.dtype)
        if self.bias is not None:
            out = out + self.bias.to(x.dtype)
        return out.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"
        )


class DecodeLinear(nn.Module):
    """A linear layer whose weight is stored transposed, (K, N) row-major: y = x Wᵀ + b as one
    ``addmm`` over it, the layout one-row products read fastest on a CPU.

    Args:
        weight_t: (K, N), the transposed weight (contiguous).
        bias: (N,) or None.
    """

    def __init__(self, weight_t: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = weight_t.shape
        self.register_buffer("weight_t", weight_t)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> DecodeLinear:
        """A transposed copy of an ``nn.Linear``'s weight (a tied head gets its own)."""
        return cls(linear.weight.detach().t().contiguous(), linear.bias)

    @property
    def weight(self) -> Tensor:
        """The (N, K) weight, as a view (for code that reads a linear layer's ``weight``, or
        changes it in place, as merging an adapter does: ``layer.weight += delta``)."""
        return self.weight_t.t()

    @weight.setter
    def weight(self, value: Tensor) -> None:
        if value.data_ptr() != self.weight_t.data_ptr():  # ``+=`` on the view has written it already
            with torch.no_grad():
                self.weight_t.copy_(value.t())

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, self.in_features)
        out = rows @ self.weight_t if self.bias is None else torch.addmm(self.bias, rows, self.weight_t)
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, layout=(in, out)"


class Fused:
    """What a fused layer (:class:`FusedDecodeLinear`, :class:`FusedBlockLinear`) adds: the
    parts it stands for, which the model uses it for only while they are still its parts."""

    parts: tuple[nn.Module, ...]

    def covers(self, *modules: nn.Module) -> bool:
        """Whether ``modules`` are exactly the parts fused here, in order."""
        return len(modules) == len(self.parts) and all(
            m is p for m, p in zip(modules, self.parts, strict=True)
        )


class FusedDecodeLinear(Fused, DecodeLinear):
    """Several linear layers that read the same input, as one: their transposed weights side by
    side in one (K, N₁ + N₂ + …) buffer, one ``addmm`` for all (a wider product streams faster
    than several narrow ones: Q, K, V; a gated MLP's gate and up). Each part is a
    :class:`DecodeLinear` whose ``weight_t`` is a view of its columns, so the weights are held
    once, and a change to a part's weight (merging an adapter) is a change to the fused one.

    A model uses it only while its parts are still the modules fused (:meth:`covers`): a part
    wrapped or replaced since (by a PEFT method, say) turns it off.

    Args:
        weight_t: (K, N₁ + N₂ + …), the parts' transposed weights side by side.
        bias: the parts' biases end to end, or None.
        parts: the parts, each with its columns of ``weight_t`` as its own weight.
    """

    def __init__(self, weight_t: Tensor, bias: Tensor | None, parts: Sequence[DecodeLinear]) -> None:
        super().__init__(weight_t, bias)
        self.parts = tuple(parts)  # a plain tuple: not registered as submodules a second time

    @classmethod
    def from_linears(cls, linears: Sequence[nn.Linear]) -> FusedDecodeLinear:
        """Each weight transposed straight into its columns of one new buffer (the ``nn.Linear``
        layers are read, not kept: replace them by the returned ``parts``)."""
        first = linears[0].weight
        weight_t = first.new_empty(first.shape[1], sum(linear.out_features for linear in linears))
        parts, start = [], 0
        for linear in linears:
            columns = weight_t[:, start : start + linear.out_features]
            columns.copy_(linear.weight.detach().t())
            parts.append(DecodeLinear(columns, linear.bias))
            start += linear.out_features
        biases = [linear.bias for linear in linears]
        bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
        return cls(weight_t, bias, parts)


# From this many rows of x on, a block layer multiplies its dequantized weight with BLAS. Measured on
# SmolLM2's layers, one pass: the native kernel wins below (16 rows 80 ms, against 208 ms for
# dequantizing and BLAS; 64 rows 303 against 415 ms), and loses above (96 rows: 608 against 506 ms).
MANY_ROWS = 80
# The grids of GGUF's block formats: weights w = d·q (+ m) per block of 32 columns, q integer.
# (format, the largest |q| (no offset) or q's span (with an offset), offset or not)
GRIDS = (
    ("q8_0", 127, False),
    ("q4_0", 8, False),
    ("q5_0", 16, False),
    ("q4_1", 15, True),
    ("q5_1", 31, True),
)


class BlockLinear(nn.Module):
    """A linear layer whose weight is kept as GGUF block formats keep it: an int8 code per weight
    and, per block of 32 columns of a row, a scale d (and an offset m), w = d·q (+ m). Found
    exactly in a float weight (:meth:`from_linear`: the values a Q8_0/Q4_0/Q5_0/Q4_1/Q5_1 file
    was dequantized to), it is the same weight in 1.13–1.25 bytes per weight instead of 4: the
    native kernel (:mod:`lmforge.kernels`) multiplies in float32 without ever widening it, which
    makes one-row products (decoding) faster. Many rows at once (a long prompt) use BLAS on the weight
    dequantized for the call. Inference only: with gradients wanted it multiplies the
    dequantized weight with ``F.linear``.

    Args:
        codes: (N, K) int8.
        scales: (N, K / 32) float32.
        offsets: (N, K / 32) float32, or None.
        bias: (N,) or None.
        kind: the block format found (``q4_1`` …), for the layer's description.
    """

    def __init__(
        self, codes: Tensor, scales: Tensor, offsets: Tensor | None, bias: Tensor | None, kind: str
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.kind = kind
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)
        self.register_buffer("offsets", offsets)
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())
        check_blocks(self.codes, self.scales, self.offsets, self.bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> BlockLinear | None:
        """The layer in blocks when its weight lies exactly on one of GGUF's block grids
        (:data:`GRIDS`) and the kernels are built here; else None."""
        found = find_blocks(linear.weight)
        return None if found is None else cls(*found[1:], linear.bias, found[0])

    @classmethod
    def quantized(cls, linear: nn.Linear) -> BlockLinear:
        """An ``nn.Linear`` quantized to int8 blocks (GGUF's Q8_0 layout: one absmax scale per 32
        columns, kept in float32; :func:`quantize_int8`). Its input width must divide by 32."""
        N, K = linear.weight.shape
        codes, scales = quantize_int8(linear.weight, BLOCK)  # (G, N, 32), (G, N)
        codes = codes.transpose(0, 1).reshape(N, K).contiguous()
        return cls(codes, scales.t().contiguous(), None, linear.bias, "int8")

    @property
    def weight(self) -> Tensor:
        """The (N, K) float32 weight, dequantized: a new tensor (changing it changes nothing)."""
        return block_dequantize(self.codes, self.scales, self.offsets)

    def forward(self, x: Tensor) -> Tensor:
        # A one-token step calls this for every layer: each attribute read once, no needless casts.
        codes, scales, offsets, bias = self.codes, self.scales, self.offsets, self.bias
        rows = x.reshape(-1, self.in_features)
        if (torch.is_grad_enabled() and x.requires_grad) or rows.shape[0] >= MANY_ROWS:
            out = F.linear(rows, block_dequantize(codes, scales, offsets), bias)
        else:
            rows = (rows if rows.dtype is torch.float32 else rows.float()).contiguous()
            if torch.compiler.is_compiling():
                out = block_matmul_op(rows, codes, scales, offsets, bias)
            else:
                if scales.dtype is not torch.float32 or not codes.is_cpu:  # moved since checked: refused
                    check_blocks(codes, scales, offsets, bias)
                out = block_matmul(rows, codes, scales, offsets, bias, checked=True)
        out = out.view(*x.shape[:-1], self.out_features)
        return out if out.dtype is x.dtype else out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, blocks={self.kind}"


class FusedBlockLinear(Fused, BlockLinear):
    """:class:`BlockLinear` layers that read the same input as one (Q/K/V; gate/up): their rows
    stacked, each part a :class:`BlockLinear` over its rows (views), used while
    :meth:`covers` holds, as :class:`FusedDecodeLinear` is."""

    def __init__(self, parts: Sequence[BlockLinear]) -> None:
        offsets = None if parts[0].offsets is None else torch.cat([p.offsets for p in parts])
        biases = [p.bias for p in parts]
        bias = None if biases[0] is None else torch.cat(biases)
        kinds = sorted({p.kind for p in parts})
        super().__init__(
            torch.cat([p.codes for p in parts]),
            torch.cat([p.scales for p in parts]),
            offsets,
            bias,
            "+".join(kinds),
        )
        views, start = [], 0
        for part in parts:
            rows = slice(start, start + part.out_features)
            view_offsets = None if self.offsets is None else self.offsets[rows]
            views.append(BlockLinear(self.codes[rows], self.scales[rows], view_offsets, part.bias, part.kind))
            start += part.out_features
        self.parts = tuple(views)


def find_blocks(weight: Tensor) -> tuple[str, Tensor, Tensor, Tensor | None] | None:
    """``weight`` (N, K) as (format, codes, scales, offsets) when every block of 32 columns is
    exactly d·q (+ m) on one of :data:`GRIDS` (:func:`lmforge.kernels.block_find`: GGUF files
    keep d and m in float16 and put a block's largest |w| on q = ±span, or its smallest on q = 0
    and its largest on q = span); None when it is not (a trained float weight never is, and fails
    at its first weight), when K is no multiple of 32 or the kernels are not built here."""
    N, K = weight.shape
    if K % BLOCK or weight.dtype != torch.float32 or weight.device.type != "cpu" or block_kernels() is None:
        return None
    w = weight.detach().contiguous()
    for kind, span, offset in GRIDS:
        found = block_find(w, span, offset)
        if found is not None:
            return (kind, *found)
    return None


class DecodeRMSNorm(nn.Module):
    """An :class:`~lmforge.model.layers.RMSNorm` computed by the native kernel in one call (the
    same formula in fp32; PyTorch runs it as six small operators on a CPU, and a one-token step of
    a 30-layer model pays for 61 norms). Inference only: with gradients wanted, or under
    ``torch.compile`` (which fuses the operators itself), it is RMSNorm's own
    :func:`~lmforge.model.layers.rms_norm`."""

    def __init__(self, weight: Tensor, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", weight.detach().float().contiguous())

    @classmethod
    def from_norm(cls, norm: RMSNorm) -> DecodeRMSNorm:
        return cls(norm.weight, norm.eps)

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight
        if (
            x.dtype is not torch.float32
            or not x.is_cpu
            or (torch.is_grad_enabled() and x.requires_grad)
            or torch.compiler.is_compiling()
        ):
            return torch_rms_norm(x, weight, self.eps)
        return rms_norm(x.contiguous(), weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


FUSED = {"qkv_decode": ("q_proj", "k_proj", "v_proj"), "gate_up_decode": ("gate_proj", "up_proj")}


def fuse_for_decoding(model: nn.Module) -> int:
    """In every attention layer, Q, K and V (its ``qkv_decode``), and in every gated MLP, the gate
    and up projections (``gate_up_decode``), when they are all plain ``nn.Linear`` on the CPU
    (one :class:`FusedDecodeLinear`) or all :class:`BlockLinear` with the same layout (one
    :class:`FusedBlockLinear`), with the same input width and bias layout; the parts are replaced
    by the fused layer's views. Returns how many were fused."""
    count = 0
    holders = [m for m in model.modules() if any(hasattr(m, slot) for slot in FUSED)]  # not the layers
    for module in holders:
        for slot, names in FUSED.items():
            if not hasattr(module, slot):
                continue
            linears = [getattr(module, name, None) for name in names]
            kind = {type(p) for p in linears}
            if kind not in ({nn.Linear}, {BlockLinear}):  # wrapped by a PEFT method, absent, mixed
                continue
            if len({p.in_features for p in linears}) != 1 or len({p.bias is None for p in linears}) != 1:
                continue
            if kind == {nn.Linear} and all(p.weight.device.type == "cpu" for p in linears):
                fused = FusedDecodeLinear.from_linears(linears)
            elif kind == {BlockLinear} and len({p.offsets is None for p in linears}) == 1:
                fused = FusedBlockLinear(linears)
            else:
                continue
            del linears
            for name, part in zip(names, fused.parts, strict=True):
                setattr(module, name, part)  # the old layer goes, and its weight with it
            setattr(module, slot, fused)
            count += 1
    return count


def _replace_children(
    model: nn.Module,
    make: Callable[[nn.Module], nn.Module],
    skip: Callable[[nn.Module, str], bool] | None = None,
    kind: type[nn.Module] = nn.Linear,
) -> int:
    """Replace every child of ``model``'s modules of exactly type ``kind`` (a plain ``nn.Linear``)
    by ``make(child)`` (not where ``skip(parent, name)``), one at a time: only the parents and
    names are listed first, so each replaced layer's weight is freed before the next is made (the
    model is never held twice)."""
    count = 0
    slots = [
        (parent, name)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is kind and not (skip is not None and skip(parent, name))
    ]
    for parent, name in slots:
        new = make(getattr(parent, name))
        if new is not getattr(parent, name):
            setattr(parent, name, new)
            count += 1
    return count


def quantize_linears(model: nn.Module, *, group_size: int = DEFAULT_GROUP_SIZE) -> int:
    """Replace every plain ``nn.Linear`` of ``model`` by an int8 weight-only layer, in place: on
    a CPU with the block kernels built, a :class:`BlockLinear` with one scale per 32 columns (when
    the columns divide by 32); else an :class:`Int8Linear` with groups of up to ``group_size``
    columns. A head tied to the token embedding gets its own int8 copy; the embedding table stays
    as it is. The base layer inside a PEFT wrapper is replaced like any other. Returns how many
    were replaced."""
    blocks = block_kernels() is not None

    def make(linear: nn.Linear) -> nn.Module:
        if blocks and linear.in_features % BLOCK == 0 and linear.weight.device.type == "cpu":
            return BlockLinear.quantized(linear)
        return Int8Linear.from_linear(linear, group_size)

    return _replace_children(model, make)


def transpose_linears(model: nn.Module) -> int:
    """Replace every plain ``nn.Linear`` of ``model`` on the CPU by a :class:`DecodeLinear`, in
    place (a tied head gets its own transposed copy). Returns how many were replaced."""
    return _replace_children(
        model,
        lambda linear: DecodeLinear.from_linear(linear) if linear.weight.device.type == "cpu" else linear,
    )


def block_linears(model: nn.Module) -> int:
    """Replace every plain ``nn.Linear`` of ``model`` whose weight lies exactly on a GGUF block
    grid by a :class:`BlockLinear`, in place (a tied head gets its own blocks); not the base
    layer under a PEFT method's adapters (merging writes into that weight). Returns how many
    were replaced: none where the kernels are not built (:func:`lmforge.kernels.kernel_problem`)."""
    if block_kernels() is None:
        return 0
    return _replace_children(
        model,
        lambda linear: BlockLinear.from_linear(linear) or linear,
        skip=lambda parent, name: hasattr(parent, "adapters"),
    )


def for_decoding(
    model: nn.Module, dtype: str, *, group_size: int = DEFAULT_GROUP_SIZE, blocks: bool = True
) -> nn.Module:
    """``model`` (in place) in the form to decode with, meant for generation and evaluation,
    not for training:

    - ``fp32``: float32 weights. On a CPU, a linear layer whose weight lies exactly on a GGUF
      block grid (a model read from a Q8_0/Q4_1/… file) keeps it in blocks
      (:class:`BlockLinear`, the same values; ``blocks=False``: not), every other one is stored
      transposed (:class:`DecodeLinear`); Q/K/V and gate/up are fused
      (:class:`FusedDecodeLinear`, :class:`FusedBlockLinear`).
    - ``bf16``: every floating-point tensor in bfloat16.
    - ``int8``: weight-only int8 linear layers (:func:`quantize_linears`: blocks of 32 columns
      where the kernels are built, Q/K/V and gate/up fused), the rest float32.

    Raises:
        ValueError: an unknown ``dtype``.
    """
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype '{dtype}' (one of {', '.join(DTYPES)})")
    model.eval()
    if dtype == "bf16":
        return model.to(torch.bfloat16)
    model.float()
    with torch.no_grad():
        if dtype == "int8":
            quantize_linears(model, group_size=group_size)
            fuse_for_decoding(model)
        else:
            if blocks:
                block_linears(model)
            fuse_for_decoding(model)
            transpose_linears(model)
        if block_kernels() is not None:  # the norms in one native call each
            _replace_children(model, DecodeRMSNorm.from_norm, kind=RMSNorm)
    return model
