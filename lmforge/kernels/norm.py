"""LayerNorm under CPU bfloat16 autocast for the pre-norm blocks (``native.c``, section 6b): the
residual stream stays float32, the normalized rows go straight to bfloat16 for the projection
that reads them, and the gradient comes back from bfloat16 to float32, each in the same pass as
the norm. Autocast runs LayerNorm in float32 and the next product casts its output to bfloat16
(and its gradient back): a second pass over the rows each way. The values are the float32
norm's rounded to bfloat16, as that cast rounds them.

:func:`normed` is what a pre-norm block calls in place of ``norm(x)``; a norm whose output is
the residual stream (post-norm, the final norm) keeps its own call."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import block_kernels
from .linear import bf16_autocast, hooked

MULTIPLE = 16  # the widths the kernel takes: whole vectors of either width (8 or 16 floats)


def applies(norm: nn.Module, x: Tensor) -> bool:
    """Whether :func:`normed` takes ``norm(x)``: a plain ``nn.LayerNorm`` over the last dimension
    (a multiple of 16) without hooks, float32 parameters and input on the CPU, under CPU bf16
    autocast with gradients on (training), the kernels built, not traced by ``torch.compile``."""
    if type(norm) is not nn.LayerNorm or hooked(norm):
        return False
    if not bf16_autocast():
        return False
    parameters = [p for p in (norm.weight, norm.bias) if p is not None]
    return (
        torch.is_grad_enabled()
        and len(norm.normalized_shape) == 1
        and x.shape[-1] == norm.normalized_shape[0]
        and x.shape[-1] % MULTIPLE == 0
        and x.dtype is torch.float32
        and x.device.type == "cpu"
        and all(p.dtype is torch.float32 and p.device.type == "cpu" for p in parameters)
        and not torch.compiler.is_compiling()
        and block_kernels() is not None
    )


class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:  # noqa: ANN001
        x = x.contiguous()
        dim = x.shape[-1]
        rows = x.numel() // dim
        y = torch.empty(x.shape, dtype=torch.bfloat16)
        mean, rstd = torch.empty(rows, dtype=torch.float32), torch.empty(rows, dtype=torch.float32)
        block_kernels().layer_norm_bf16_forward(
            x.data_ptr(), None if weight is None else weight.data_ptr(), None if bias is None else bias.data_ptr(),
            y.data_ptr(), mean.data_ptr(), rstd.data_ptr(), rows, dim, eps, torch.get_num_threads(),
        )  # fmt: skip
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):  # noqa: ANN001, ANN205
        x, weight, bias, mean, rstd = ctx.saved_tensors
        dim = x.shape[-1]
        rows = x.numel() // dim
        if torch.is_grad_enabled():  # a gradient to differentiate again (create_graph): PyTorch's operators
            inputs = [t for t in (x, weight, bias) if t is not None and t.requires_grad]
            with torch.enable_grad():
                again = torch.nn.functional.layer_norm(x, (dim,), weight, bias, ctx.eps).to(torch.bfloat16)
                found = iter(torch.autograd.grad(again, inputs, dy, create_graph=True))
            return (*(next(found) if t is not None and t.requires_grad else None for t in (x, weight, bias)), None)
        dy = dy.to(torch.bfloat16).contiguous()
        dx = torch.empty(x.shape, dtype=torch.float32)
        dweight = torch.zeros(dim, dtype=torch.float32) if weight is not None and ctx.needs_input_grad[1] else None
        dbias = torch.zeros(dim, dtype=torch.float32) if bias is not None and ctx.needs_input_grad[2] else None
        failed = block_kernels().layer_norm_bf16_backward(
            dy.data_ptr(), x.data_ptr(), None if weight is None else weight.data_ptr(), mean.data_ptr(),
            rstd.data_ptr(), dx.data_ptr(), None if dweight is None else dweight.data_ptr(),
            None if dbias is None else dbias.data_ptr(), rows, dim, torch.get_num_threads(),
        )  # fmt: skip
        if failed:
            raise MemoryError("LayerNorm backward: out of memory")
        return dx, dweight, dbias, None


def normed(norm: nn.Module, x: Tensor) -> Tensor:
    """``norm(x)``, in one native pass with a bfloat16 output where :func:`applies` says so."""
    if not applies(norm, x):
        return norm(x)
    return _LayerNorm.apply(x, norm.weight, norm.bias, float(norm.eps))
