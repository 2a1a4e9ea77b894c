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
  as int8 codes q ∈ [−127, 127] and one scale per group of ``group_size`` consecutive input
  columns of each output row (or of the widest group under that size that divides the layer's
  columns: SmolLM2's 576 take 192), w ≈ s_g · q with s_g = max|w_g| / 127 (symmetric absmax: the layout
  of GGUF's Q8_0, whose groups are 32 wide). Embeddings, norms and attention stay floating point.
  The product runs in PyTorch's int8-weight matmul (``torch._weight_int8pack_mm``), one call per
  group of columns, with the activations in bf16.

References: Dettmers et al. 2022, "LLM.int8()" (absmax int8 weights); ggml's Q8_0 block format
(llama.cpp); gpt-fast (int8 weight-only decoding in PyTorch). The quality cost is measured, not
assumed: ``benchmarks/generation.py`` reports the perplexity of each form on the Python-docs corpus.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "DTYPES",
    "DecodeLinear",
    "FusedDecodeLinear",
    "Int8Linear",
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


class FusedDecodeLinear(DecodeLinear):
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

    def covers(self, *modules: nn.Module) -> bool:
        """Whether ``modules`` are exactly the parts fused here, in order."""
        return len(modules) == len(self.parts) and all(m is p for m, p in zip(modules, self.parts, strict=True))


FUSED = {"qkv_decode": ("q_proj", "k_proj", "v_proj"), "gate_up_decode": ("gate_proj", "up_proj")}


def fuse_for_decoding(model: nn.Module) -> int:
    """In every attention layer, Q, K and V (its ``qkv_decode``), and in every gated MLP, the gate
    and up projections (``gate_up_decode``), when they are plain ``nn.Linear`` on the CPU with the
    same input width and bias layout: one :class:`FusedDecodeLinear`, the parts replaced by its
    views. Returns how many were fused."""
    count = 0
    holders = [m for m in model.modules() if any(hasattr(m, slot) for slot in FUSED)]  # not the layers
    for module in holders:
        for slot, names in FUSED.items():
            if not hasattr(module, slot):
                continue
            linears = [getattr(module, name, None) for name in names]
            if not all(type(p) is nn.Linear and p.weight.device.type == "cpu" for p in linears):
                continue
            if len({p.in_features for p in linears}) != 1 or len({p.bias is None for p in linears}) != 1:
                continue
            fused = FusedDecodeLinear.from_linears(linears)
            del linears
            for name, part in zip(names, fused.parts, strict=True):
                setattr(module, name, part)  # the nn.Linear goes, and its weight with it
            setattr(module, slot, fused)
            count += 1
    return count


def _replace_linears(model: nn.Module, make: Callable[[nn.Linear], nn.Module]) -> int:
    """Replace every plain ``nn.Linear`` child of ``model``'s modules by ``make(child)``, one at a
    time: only the parents and names are listed first, so each replaced layer's weight is freed
    before the next is made (the model is never held twice)."""
    count = 0
    slots = [
        (parent, name)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear
    ]
    for parent, name in slots:
        new = make(getattr(parent, name))
        if new is not getattr(parent, name):
            setattr(parent, name, new)
            count += 1
    return count


def quantize_linears(model: nn.Module, *, group_size: int = DEFAULT_GROUP_SIZE) -> int:
    """Replace every plain ``nn.Linear`` of ``model`` by an :class:`Int8Linear`, in place (a head
    tied to the token embedding gets its own int8 copy; the embedding table stays as it is).
    The base layer inside a PEFT wrapper is replaced like any other. Returns how many were replaced."""
    return _replace_linears(model, lambda linear: Int8Linear.from_linear(linear, group_size))


def transpose_linears(model: nn.Module) -> int:
    """Replace every plain ``nn.Linear`` of ``model`` on the CPU by a :class:`DecodeLinear`, in
    place (a tied head gets its own transposed copy). Returns how many were replaced."""
    return _replace_linears(
        model, lambda linear: DecodeLinear.from_linear(linear) if linear.weight.device.type == "cpu" else linear
    )


def for_decoding(model: nn.Module, dtype: str, *, group_size: int = DEFAULT_GROUP_SIZE) -> nn.Module:
    """``model`` (in place) in the form to decode with: ``fp32`` (float32; on a CPU the linear
    layers' weights transposed, :class:`DecodeLinear`, with Q/K/V and gate/up fused,
    :class:`FusedDecodeLinear`), ``bf16`` (every floating-point tensor in
    bfloat16) or ``int8`` (weight-only int8 linear layers, the rest float32). Meant for generation
    and evaluation, not for training.

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
        else:
            fuse_for_decoding(model)
            transpose_linears(model)
    return model
