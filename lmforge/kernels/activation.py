"""GELU's tanh form in one native pass forward and one backward (``native.c``, section 6), for
:class:`lmforge.model.layers.GELU`: PyTorch's ``tanh`` is its slowest elementwise kernel on an
AVX2 build, and GPT-2's wiring calls GELU on every MLP row of every step."""

from __future__ import annotations

import torch
from torch import Tensor

from . import block_kernels

PARALLEL_FROM = 1 << 16  # values below which one thread does the whole pass


def _threads(n: int) -> int:
    return torch.get_num_threads() if n >= PARALLEL_FROM else 1


def native_gelu_tanh(x: Tensor) -> bool:
    """Whether :func:`gelu_tanh` runs natively for ``x``: float32 on the CPU, the kernels built, and
    not being traced by ``torch.compile`` (which keeps PyTorch's own operators)."""
    return (
        x.dtype is torch.float32
        and x.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and block_kernels() is not None
    )


class _GeluTanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: ANN001
        x = x.contiguous()
        y = torch.empty_like(x)
        block_kernels().gelu_tanh_forward(x.data_ptr(), y.data_ptr(), x.numel(), _threads(x.numel()))
        ctx.save_for_backward(x)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor) -> Tensor:  # noqa: ANN001
        (x,) = ctx.saved_tensors
        if torch.is_grad_enabled() or dy.dtype is not torch.float32:
            # a gradient of the gradient (create_graph), or an unusual dtype: PyTorch's own formula
            return torch.ops.aten.gelu_backward(dy, x, approximate="tanh")
        dy = dy.contiguous()
        dx = torch.empty_like(x)
        block_kernels().gelu_tanh_backward(
            dy.data_ptr(), x.data_ptr(), dx.data_ptr(), x.numel(), _threads(x.numel())
        )
        return dx


def gelu_tanh(x: Tensor) -> Tensor:
    """GELU's tanh form, ``x (1 + tanh(sqrt(2/pi) (x + 0.044715 x³))) / 2``, differentiable, as
    ``F.gelu(x, approximate="tanh")`` to float32 rounding; natively where
    :func:`native_gelu_tanh` says so, else PyTorch's."""
    if not native_gelu_tanh(x):
        return torch.nn.functional.gelu(x, approximate="tanh")
    return _GeluTanh.apply(x)
