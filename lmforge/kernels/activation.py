"""GELU in one native pass forward and one backward (``native.c``, section 6), both forms, for
:class:`lmforge.model.layers.GELU`. The tanh form (GPT-2's): PyTorch's ``tanh`` is its slowest
elementwise kernel on an AVX2 build. The erf form (BERT's, nanoGPT's, lmforge's default): PyTorch's
backward pass takes two exponentials per value where one gives both the normal CDF and density.
Under bfloat16 autocast (the MLP's first projection gives bfloat16) both forms read and write
bfloat16 natively, the formulas in float32; with AVX-512 the bfloat16 passes look the formulas'
values up in tables of all 65,536 bfloat16 inputs (filled once when the kernels load), the same
values at about the memory's speed: forward and backward of the erf form together 1.3x PyTorch's
bfloat16 speed on an AMX Xeon (it had been 0.75x to 1.0x by formula there).
Every decoder and encoder MLP calls GELU on each of its rows in every step."""

from __future__ import annotations

import torch
from torch import Tensor

from . import block_kernels

PARALLEL_FROM = 1 << 16  # values below which one thread does the whole pass
FORMS = ("none", "tanh")  # nn.GELU's ``approximate``: the erf form, the tanh form
DTYPES = (torch.float32, torch.bfloat16)


def _threads(n: int) -> int:
    return torch.get_num_threads() if n >= PARALLEL_FROM else 1


def native_gelu(x: Tensor) -> bool:
    """Whether :func:`gelu` runs natively for ``x``: float32 or bfloat16 on the CPU, the kernels
    built, and not being traced by ``torch.compile`` (which keeps PyTorch's own operators)."""
    return (
        x.dtype in DTYPES
        and x.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and block_kernels() is not None
    )


class _Gelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, approximate: str) -> Tensor:  # noqa: ANN001
        x = x.contiguous()
        y = torch.empty_like(x)
        lib, tanh_form = block_kernels(), approximate == "tanh"
        if x.dtype is torch.bfloat16:
            lib.gelu_bf16_forward(x.data_ptr(), y.data_ptr(), x.numel(), tanh_form, _threads(x.numel()))
        else:
            kernel = lib.gelu_tanh_forward if tanh_form else lib.gelu_erf_forward
            kernel(x.data_ptr(), y.data_ptr(), x.numel(), _threads(x.numel()))
        ctx.save_for_backward(x)
        ctx.approximate = approximate
        return y

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor, None]:  # noqa: ANN001
        (x,) = ctx.saved_tensors
        if torch.is_grad_enabled() or dy.dtype is not x.dtype:
            # a gradient of the gradient (create_graph), or an unusual dtype: PyTorch's own formula
            return torch.ops.aten.gelu_backward(dy, x, approximate=ctx.approximate), None
        dy = dy.contiguous()
        dx = torch.empty_like(x)
        lib, tanh_form = block_kernels(), ctx.approximate == "tanh"
        if x.dtype is torch.bfloat16:
            lib.gelu_bf16_backward(dy.data_ptr(), x.data_ptr(), dx.data_ptr(), x.numel(), tanh_form, _threads(x.numel()))
        else:
            kernel = lib.gelu_tanh_backward if tanh_form else lib.gelu_erf_backward
            kernel(dy.data_ptr(), x.data_ptr(), dx.data_ptr(), x.numel(), _threads(x.numel()))
        return dx, None


def gelu(x: Tensor, approximate: str = "none") -> Tensor:
    """GELU, differentiable, as ``F.gelu(x, approximate=approximate)``: the erf form
    ``x Φ(x)`` (``"none"``) or the tanh form ``x (1 + tanh(sqrt(2/π) (x + 0.044715 x³))) / 2``
    (``"tanh"``); natively where :func:`native_gelu` says so, else PyTorch's. The native erf form
    evaluates Φ with the approximation PyTorch's vectorized ``erf`` uses (|error| ≤ 1.5e-7), so
    both agree with float64 to the same few 1e-7; the tanh form to float32 rounding. A bfloat16
    ``x`` gives the float32 result rounded to bfloat16 (ties to even), as PyTorch's does."""
    if approximate not in FORMS:
        raise ValueError(f"GELU approximate must be one of {FORMS}, not {approximate!r}")
    if not native_gelu(x):
        return torch.nn.functional.gelu(x, approximate=approximate)
    return _Gelu.apply(x, approximate)
