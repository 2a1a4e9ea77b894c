"""Int8 weight-only quantization with per-group scales, symmetric absmax (:mod:`lmforge.quant`
says where it is used): the codes and scales, and the layer PyTorch's int8-weight matmul
multiplies where the native block kernel is not built."""

from __future__ import annotations

import torch
from torch import Tensor, nn

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
