"""A linear layer under bfloat16 autocast on a CPU with AMX tiles whose weight gradient is
computed faster than autocast's own: PyTorch's bf16 product for dW = dYᵀ X (both operands read
down their columns, the tokens being the sum) runs at 430-520 GFLOP/s on an AMX Xeon core, and
at 790-870 once its narrower operand is transposed first (``native.c``'s ``transpose_bf16``, at
the memory's speed): dW at 2048 tokens × 384 × 1152 in 3.1 ms against 4.2 (with the cast to
float32), and a 6 layers/384 train step about 4% faster. Forward and the input's gradient are
autocast's products; the weight's gradient comes back in the weight's own dtype (float32), as
autocast's cast of it would give it. Only for products large enough (:data:`WORK`): the small
ones keep ``F.linear``, whose own path is faster there.

:func:`project` is what the model's layers call in place of ``layer(x)``: a plain ``nn.Linear``
(no PEFT wrapper, no hooks) whose product qualifies takes this path, anything else is called as
it is; :func:`project_unbiased` leaves such a layer's bias to the caller (a pre-norm block's
"add & norm" adds it)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import amx_tiles, block_kernels

# tokens × in × out from which the transposed weight gradient pays. Measured on an AMX Xeon, one
# thread, in a 6 layers/384 bf16 train step (2,048 tokens; min/median of 6 rounds): 455/470 ms
# with F.linear everywhere, 437/445 from 2^29 (the Q/K/V and MLP products), 438/450 from 2^27
# (the output projection too); alone, a 2048 × 384 × 384 or 128-wide product is faster plain.
WORK = 1 << 29
ALIGN = 16  # widths the transpose takes in whole register blocks


def bf16_autocast() -> bool:
    """Whether CPU autocast is on in bfloat16 (the native bf16 training paths' first condition)."""
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") is torch.bfloat16


def applies(x: Tensor, weight: Tensor) -> bool:
    """Whether :func:`linear` takes ``x @ weightᵀ``: CPU bf16 autocast on a CPU with AMX tiles,
    gradients wanted, a float32 or bf16 weight (out, in) with both widths multiples of 16, and
    tokens × in × out at least :data:`WORK`."""
    if not bf16_autocast():
        return False
    out_features, in_features = weight.shape if weight.dim() == 2 else (0, 0)
    return (
        torch.is_grad_enabled()
        and (x.requires_grad or weight.requires_grad)
        and x.device.type == "cpu"
        and weight.device.type == "cpu"
        and weight.dtype in (torch.float32, torch.bfloat16)
        and x.shape[-1] == in_features
        and in_features % ALIGN == 0
        and out_features % ALIGN == 0
        and x.numel() // max(in_features, 1) * in_features * out_features >= WORK
        and not torch.compiler.is_compiling()
        and amx_tiles()
    )


def _transposed(x: Tensor) -> Tensor:
    """(rows, cols) bfloat16, contiguous -> (cols, rows), by the native kernel."""
    rows, cols = x.shape
    out = torch.empty(cols, rows, dtype=torch.bfloat16)
    block_kernels().transpose_bf16(x.data_ptr(), rows, cols, out.data_ptr(), torch.get_num_threads())
    return out


class _AutocastLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:  # noqa: ANN001
        x16, w16 = x.to(torch.bfloat16), weight.to(torch.bfloat16)
        ctx.save_for_backward(x16, w16)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return F.linear(x16, w16, None if bias is None else bias.to(torch.bfloat16))

    @staticmethod
    def backward(ctx, dy: Tensor):  # noqa: ANN001, ANN205
        x16, w16 = ctx.saved_tensors
        x_dtype, weight_dtype, bias_dtype = ctx.dtypes
        out_features, in_features = w16.shape
        dy2 = dy.to(torch.bfloat16).reshape(-1, out_features).contiguous()
        dx = dweight = dbias = None
        if ctx.needs_input_grad[0]:
            dx = (dy2 @ w16).view(x16.shape).to(x_dtype)
        if ctx.needs_input_grad[1]:
            x2 = x16.reshape(-1, in_features).contiguous()
            if in_features <= out_features:  # Xᵀ dY = dWᵀ, then turned
                dweight = _transposed(torch.mm(_transposed(x2), dy2))
            else:
                dweight = torch.mm(_transposed(dy2), x2)
            dweight = dweight.to(weight_dtype)
        if ctx.needs_input_grad[2]:
            dbias = dy2.sum(0, dtype=torch.float32).to(bias_dtype)
        return dx, dweight, dbias


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)`` under CPU bf16 autocast, its weight gradient through the
    transposed product where :func:`applies` says so (else ``F.linear`` itself)."""
    if not applies(x, weight):
        return F.linear(x, weight, bias)
    return _AutocastLinear.apply(x, weight, bias)


def hooked(layer: nn.Module) -> bool:
    """Whether forward hooks would run around ``layer``: its own or those registered for every
    module (``nn.modules.module``'s), which a native path must not skip."""
    module = nn.modules.module
    return bool(
        layer._forward_hooks
        or layer._forward_pre_hooks
        or module._global_forward_hooks
        or module._global_forward_pre_hooks
    )


def project(layer: nn.Module, x: Tensor) -> Tensor:
    """``layer(x)``, through :func:`linear` for a plain ``nn.Linear`` without hooks (a PEFT
    wrapper, a quantized layer or a hooked one is called as it is)."""
    if type(layer) is nn.Linear and not hooked(layer):
        return linear(x, layer.weight, layer.bias)
    return layer(x)


class Pending(NamedTuple):
    """A residual branch whose projection's bias is still to be added: the branch is h + bias."""

    h: Tensor
    bias: Tensor


def settled(branch: Tensor | Pending) -> Tensor:
    """The branch's value: h + bias for a :class:`Pending` one, else the branch itself."""
    return branch.h + branch.bias if isinstance(branch, Pending) else branch


def project_unbiased(layer: nn.Module, x: Tensor) -> Tensor | Pending:
    """``Pending(x Wᵀ, b)`` for a plain ``nn.Linear`` with a bias and without hooks, the bias left
    for the caller to add (:func:`lmforge.kernels.norm.added_normed` adds it in its own pass); else
    ``project(layer, x)``, the bias (if any) already in."""
    if type(layer) is nn.Linear and layer.bias is not None and not hooked(layer):
        return Pending(linear(x, layer.weight), layer.bias)
    return project(layer, x)
