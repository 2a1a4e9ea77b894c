"""LayerNorm for training in one native pass each way (``native.c``, section 6b), in two forms:

- :func:`normed`, a pre-norm block's ``norm(x)`` under CPU bfloat16 autocast: the residual stream
  stays float32 and the normalized rows go straight to bfloat16 for the projection that reads
  them, the gradient coming back from bfloat16 to float32 in the norm's own pass. Autocast runs
  LayerNorm in float32 and the next product casts its output to bfloat16 (and its gradient
  back): a second pass over the rows each way.
- :func:`added_normed`, the block's "add & norm" between its sublayers: ``s = x + h`` and
  ``norm(s)`` in one pass, in float32 or under bf16 autocast (h the bf16 output of a projection,
  the norm's output bf16 as above). Backward, one pass a row gives ``ds + dnorm(s)``, the
  gradient of x, and for a bf16 h the same rounded to bf16; PyTorch would add h (cast to
  float32 first under autocast), read the sum again for the norm, and on the way back add the
  two gradients and cast the branch's copy, each a pass of its own.

A branch may come as :class:`~lmforge.kernels.linear.Pending` (h, bias): the output of a projection whose bias is still
to be added. The pass adds it into the sum, and its gradient (the column sums of the sum's
gradient) comes out of the backward pass: the projection then runs as a plain product, not as
``addmm``, whose bias is first copied into its output and read again, and no separate sum over the
rows runs for the bias's gradient (GPT-2's biased projections: about 2% of a float32 train step).

The values are the float32 norm's (rounded to bfloat16 where the output is bf16, as autocast's
cast rounds them). A norm whose output is the residual stream (post-norm) keeps its own call;
a pre-norm stack's final norm takes the last block's branch with ``low=False``, its output
float32."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import block_kernels
from .linear import Pending, bf16_autocast, hooked

MULTIPLE = 16  # the widths the kernel takes: whole vectors of either width (8 or 16 floats)


def _fits(norm: nn.Module, x: Tensor) -> bool:
    """The conditions both forms share: a plain ``nn.LayerNorm`` over the last dimension (a
    multiple of 16) without hooks, float32 parameters and input on the CPU, gradients on
    (training), the kernels built, not traced by ``torch.compile``."""
    if type(norm) is not nn.LayerNorm or hooked(norm):
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


def applies(norm: nn.Module, x: Tensor) -> bool:
    """Whether :func:`normed` takes ``norm(x)``: CPU bf16 autocast, and the shared conditions (a
    plain ``nn.LayerNorm`` over a last dimension that is a multiple of 16, float32 on the CPU,
    training, the kernels built)."""
    return bf16_autocast() and _fits(norm, x)


def sum_applies(norm: nn.Module, x: Tensor, h: Tensor, bias: Tensor | None = None) -> bool:
    """Whether :func:`added_normed` takes ``x + h`` (``+ bias``) and its norm in one pass: the
    shared conditions, h of x's shape on the CPU, a bias (if any) float32 of one row's width on the
    CPU, and either no CPU autocast with a float32 h or CPU bf16 autocast with a float32 or bf16 h."""
    if h.shape != x.shape or h.device.type != "cpu":
        return False
    if bias is not None and (
        bias.dtype is not torch.float32 or bias.device.type != "cpu" or bias.shape != x.shape[-1:]
    ):
        return False
    if bf16_autocast():
        dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16)
    elif torch.is_autocast_enabled("cpu"):
        return False
    else:
        dtypes = (torch.float32,)
    return h.dtype in dtypes and _fits(norm, x)


def _forward(  # noqa: ANN202
    x: Tensor, h: Tensor | None, weight: Tensor | None, bias: Tensor | None, eps: float, half: bool,
    h_bias: Tensor | None = None,
):  # fmt: skip
    """(s or None, y, mean, rstd) from the kernel; s = x + h (+ h_bias) when h is given."""
    dim = x.shape[-1]
    rows = x.numel() // dim
    s = torch.empty(x.shape, dtype=torch.float32) if h is not None else None
    y = torch.empty(x.shape, dtype=torch.bfloat16 if half else torch.float32)
    mean, rstd = torch.empty(rows, dtype=torch.float32), torch.empty(rows, dtype=torch.float32)
    block_kernels().layer_norm_forward(
        x.data_ptr(), None if h is None else h.data_ptr(), h is not None and h.dtype is torch.bfloat16,
        None if h_bias is None else h_bias.data_ptr(), None if weight is None else weight.data_ptr(), None if bias is None else bias.data_ptr(),
        None if s is None else s.data_ptr(), y.data_ptr(), half, mean.data_ptr(), rstd.data_ptr(),
        rows, dim, eps, torch.get_num_threads(),
    )  # fmt: skip
    return s, y, mean, rstd


def _backward(saved: tuple, dy: Tensor, ds: Tensor | None, h_half: bool, wants: tuple[bool, bool, bool]):  # noqa: ANN202
    """(dx, dh or None, dweight, dbias, dh_bias) in one pass from the saved (s, weight, bias, mean,
    rstd); dh in bf16 when h_half, else None (dx is h's gradient too); wants: the weight's, the
    bias's and the branch bias's gradients asked for (the last: dx's column sums)."""
    s, weight, bias, mean, rstd = saved
    dim = s.shape[-1]
    rows = s.numel() // dim
    dy = dy.contiguous()
    ds = None if ds is None else ds.contiguous()
    dx = torch.empty(s.shape, dtype=torch.float32)
    dh = torch.empty(s.shape, dtype=torch.bfloat16) if h_half else None
    dweight = torch.zeros(dim, dtype=torch.float32) if weight is not None and wants[0] else None
    dbias = torch.zeros(dim, dtype=torch.float32) if bias is not None and wants[1] else None
    dh_bias = torch.zeros(dim, dtype=torch.float32) if wants[2] else None
    failed = block_kernels().layer_norm_backward(
        dy.data_ptr(), dy.dtype is torch.bfloat16, None if ds is None else ds.data_ptr(), s.data_ptr(),
        None if weight is None else weight.data_ptr(), mean.data_ptr(), rstd.data_ptr(), dx.data_ptr(),
        None if dh is None else dh.data_ptr(), None if dweight is None else dweight.data_ptr(),
        None if dbias is None else dbias.data_ptr(), None if dh_bias is None else dh_bias.data_ptr(),
        rows, dim, torch.get_num_threads(),
    )  # fmt: skip
    if failed:
        raise MemoryError("LayerNorm backward: out of memory")
    return dx, dh, dweight, dbias, dh_bias


def _again(outputs: list[Tensor], grads: list[Tensor], inputs: tuple[Tensor | None, ...]) -> tuple:
    """Gradients of ``outputs`` (rebuilt with PyTorch's operators from the saved inputs, which
    keep their place in the graph) for the inputs that want them, differentiable again: the
    create_graph (second-derivative) path."""
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    found = iter(torch.autograd.grad(outputs, wanted, grads, create_graph=True, allow_unused=True))
    return tuple(next(found) if t is not None and t.requires_grad else None for t in inputs)


class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:  # noqa: ANN001
        x = x.contiguous()
        _, y, mean, rstd = _forward(x, None, weight, bias, eps, half=True)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):  # noqa: ANN001, ANN205
        if torch.is_grad_enabled():  # a gradient to differentiate again: PyTorch's operators
            x, weight, bias = ctx.saved_tensors[:3]
            with torch.enable_grad():
                y = F.layer_norm(x, (x.shape[-1],), weight, bias, ctx.eps).to(torch.bfloat16)
                return (*_again([y], [dy], (x, weight, bias)), None)
        wants = (ctx.needs_input_grad[1], ctx.needs_input_grad[2], False)
        dx, _, dweight, dbias, _ = _backward(ctx.saved_tensors, dy.to(torch.bfloat16), None, False, wants)
        return dx, dweight, dbias, None


class _AddNorm(torch.autograd.Function):
    @staticmethod
    def forward(  # noqa: ANN205
        ctx,  # noqa: ANN001
        x: Tensor,
        h: Tensor,
        h_bias: Tensor | None,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        half: bool,
    ):
        s, y, mean, rstd = _forward(x.contiguous(), h.contiguous(), weight, bias, eps, half, h_bias)
        ctx.save_for_backward(s, weight, bias, mean, rstd, x, h, h_bias)  # x, h, h_bias for create_graph only
        ctx.eps, ctx.half = eps, half
        return s, y

    @staticmethod
    def backward(ctx, ds: Tensor, dy: Tensor):  # noqa: ANN001, ANN205
        s, weight, bias, mean, rstd, x, h, h_bias = ctx.saved_tensors
        if torch.is_grad_enabled():  # a gradient to differentiate again: PyTorch's operators
            with torch.enable_grad():
                again = x + h if h_bias is None else x + h + h_bias
                y = F.layer_norm(again, (again.shape[-1],), weight, bias, ctx.eps)
                y = y.to(torch.bfloat16) if ctx.half else y
                return (*_again([again, y], [ds, dy], (x, h, h_bias, weight, bias)), None, None)
        h_half = h.dtype is torch.bfloat16
        wants = (ctx.needs_input_grad[3], ctx.needs_input_grad[4], h_bias is not None and ctx.needs_input_grad[2])
        dx, dh, dweight, dbias, dh_bias = _backward((s, weight, bias, mean, rstd), dy, ds, h_half, wants)
        return dx, dh if h_half else dx, dh_bias, dweight, dbias, None, None


def normed(norm: nn.Module, x: Tensor) -> Tensor:
    """``norm(x)``, in one native pass with a bfloat16 output where :func:`applies` says so."""
    if not applies(norm, x):
        return norm(x)
    return _LayerNorm.apply(x, norm.weight, norm.bias, float(norm.eps))


def added_normed(norm: nn.Module, x: Tensor, branch: Tensor | Pending, *, low: bool = True) -> tuple[Tensor, Tensor]:
    """``(x + h, normed(norm, x + h))``, in one native pass each way where :func:`sum_applies`
    says so: the norm's output in bf16 under CPU bf16 autocast, as :func:`normed` gives it, or
    in float32 with ``low=False`` (``norm(x + h)``: a stack's final norm). A :class:`~lmforge.kernels.linear.Pending`
    branch (h, bias) is h + bias, the bias added in the same pass."""
    h, h_bias = branch if isinstance(branch, Pending) else (branch, None)
    if not sum_applies(norm, x, h, h_bias):
        s = x + h if h_bias is None else x + h + h_bias  # (x + h) + b, the kernel's order
        return s, normed(norm, s) if low else norm(s)
    return _AddNorm.apply(x, h, h_bias, norm.weight, norm.bias, float(norm.eps), low and bf16_autocast())
