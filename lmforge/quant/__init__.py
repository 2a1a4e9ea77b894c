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
  which streams faster still. Where the native kernels are built (:mod:`lmforge.kernels`), a
  one-row product is one call that streams eight rows of the weight at a time and adds the bias
  in the same pass (faster again than the BLAS's one-row kernel, and without its separate bias
  copy), an RMSNorm is one call (:class:`DecodeRMSNorm`; PyTorch's LayerNorm is one
  operator already, faster than a native call through ``ctypes``), and a pre-norm block's whole
  step for one new token of one sequence is one call (:class:`DecodeStep`: its norms, products,
  attention, activation and residual sums). Same numbers to fp32 rounding.

The package: :mod:`.dense` (the fp32 layers and norms), :mod:`.step` (a pre-norm block's
one-token step in one native call, :class:`DecodeStep`), :mod:`.int8` (int8 codes and
:class:`Int8Linear`), :mod:`.blocks` (:class:`BlockLinear`); here, the conversions.

And two ways to read fewer of them:

- **bf16**: the fp32 form with every linear weight stored in bfloat16 (2 bytes per weight
  instead of 4; :func:`halve_linears`), widened to float32 as the native one-row kernel and each
  block's one-token step read it, so the arithmetic, the activations and the KV cache stay
  float32. (Running the whole model in PyTorch's bfloat16 operators instead read no faster here:
  0.7-1.0x fp32's speed.)
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

from collections.abc import Callable

import torch
from torch import nn

from ..kernels import BLOCK, block_kernels
from ..model.layers import RMSNorm, TransformerBlock
from .blocks import GRIDS, MANY_ROWS, BlockLinear, FusedBlockLinear, find_blocks
from .dense import DecodeLinear, DecodeRMSNorm, Fused, FusedDecodeLinear
from .int8 import DEFAULT_GROUP_SIZE, Int8Linear, fitting_group, quantize_int8
from .step import DecodeStep

__all__ = [
    "DEFAULT_GROUP_SIZE",
    "DTYPES",
    "GRIDS",
    "MANY_ROWS",
    "BlockLinear",
    "DecodeLinear",
    "DecodeRMSNorm",
    "DecodeStep",
    "Fused",
    "FusedBlockLinear",
    "FusedDecodeLinear",
    "Int8Linear",
    "block_linears",
    "find_blocks",
    "fitting_group",
    "for_decoding",
    "fuse_for_decoding",
    "halve_linears",
    "quantize_int8",
    "quantize_linears",
    "transpose_linears",
]

DTYPES = ("fp32", "bf16", "int8")


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


def halve_linears(model: nn.Module) -> int:
    """Store every :class:`DecodeLinear`'s weight in bfloat16, in place (bf16 decoding: half the
    bytes a token reads; the products stay float32 arithmetic): a fused layer's buffer is
    converted once and its parts pointed at their columns of the new one. Returns how many
    buffers were converted."""
    count, halved_parts = 0, set()
    for fused in [m for m in model.modules() if isinstance(m, FusedDecodeLinear)]:
        fused.weight_t = fused.weight_t.to(torch.bfloat16)
        start = 0
        for part in fused.parts:
            part.weight_t = fused.weight_t[:, start : start + part.out_features]
            start += part.out_features
            halved_parts.add(id(part))
        count += 1
    for layer in model.modules():
        if type(layer) is DecodeLinear and id(layer) not in halved_parts and layer.weight_t.dtype is torch.float32:
            layer.weight_t = layer.weight_t.to(torch.bfloat16)
            count += 1
    return count


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
    - ``bf16``: as ``fp32``, every transposed linear weight then stored in bfloat16
      (:func:`halve_linears`); norms, embeddings, biases, the KV cache and all arithmetic float32.
      A model on an accelerator is cast to bfloat16 whole (its own bf16 kernels read half the
      bytes).
    - ``int8``: weight-only int8 linear layers (:func:`quantize_linears`: blocks of 32 columns
      where the kernels are built, Q/K/V and gate/up fused), the rest float32.

    In every form on a CPU, where the native kernels are built, RMSNorm layers become
    :class:`DecodeRMSNorm` (one call each), and each pre-norm block whose products are all
    :class:`DecodeLinear` or :class:`BlockLinear` gets its one-token step in one call
    (:class:`DecodeStep`, its ``decode_step``).

    Raises:
        ValueError: an unknown ``dtype``.
    """
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype '{dtype}' (one of {', '.join(DTYPES)})")
    model.eval()
    if dtype == "bf16" and any(p.device.type != "cpu" for p in model.parameters()):
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
            if dtype == "bf16":
                halve_linears(model)
        if block_kernels() is not None:  # the norms in one native call each
            _replace_children(model, DecodeRMSNorm.from_norm, kind=RMSNorm)
            for block in model.modules():  # and each block's one-token step in one
                if isinstance(block, TransformerBlock) and DecodeStep.parts(block) is not None:
                    block.decode_step = DecodeStep()
    return model
