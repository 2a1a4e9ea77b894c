"""Float32 layers in the form decoding reads fastest on a CPU (:mod:`lmforge.quant`): linear
weights stored transposed, layers that read the same input fused into one, and norms in one
native call."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..kernels import block_kernels, dense_row, rms_norm
from ..model.layers import RMSNorm
from ..model.layers import rms_norm as torch_rms_norm

# bfloat16 weights: up to this many rows go through the one-row kernel one by one (each reads the
# 2-byte weights once) rather than widening the whole weight to float32 for one product
FEW_ROWS = 4


class DecodeLinear(nn.Module):
    """A linear layer whose weight is stored transposed, (K, N) row-major, the layout one-row
    products read fastest on a CPU: y = x Wᵀ + b as one ``addmm`` over it, or, for one row in
    fp32 where the native kernels are built, one call of :func:`lmforge.kernels.dense_row`
    (eight rows of the weight streamed at a time, the bias added in the same pass; the same
    products, summed in another order). The weight may be bfloat16 (bf16 decoding: half the
    bytes to read), the arithmetic float32 either way: widened as the native kernel reads it (a
    few rows, :data:`FEW_ROWS`, one call each), or for more rows widened once for their ``addmm``.

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
        # A one-token step calls this for every layer (48 times a GPT-2 token): each attribute read
        # once; one row in fp32 on the CPU goes to the native kernel, which needs its rows contiguous.
        weight_t, bias = self.weight_t, self.bias
        rows = x.numel() // self.in_features
        if (
            (rows == 1 or (0 < rows <= FEW_ROWS and weight_t.dtype is torch.bfloat16))
            and x.dtype is torch.float32
            and weight_t.dtype in (torch.float32, torch.bfloat16)
            and (bias is None or (bias.dtype is torch.float32 and bias.is_contiguous()))
            and x.is_cpu
            and weight_t.is_cpu
            and weight_t.stride(1) == 1
            and not (torch.is_grad_enabled() and x.requires_grad)
            and not torch.compiler.is_compiling()
            and block_kernels() is not None
        ):
            if rows == 1:
                out = dense_row(x.reshape(-1).contiguous(), weight_t, bias, checked=True)
            else:  # a few rows (beams, a small batch) over bfloat16 weights: each row reads them once
                each = x.reshape(rows, -1).contiguous()
                out = torch.stack([dense_row(row, weight_t, bias, checked=True) for row in each])
            return out.view(*x.shape[:-1], self.out_features)
        matrix = x.reshape(-1, self.in_features)
        if weight_t.dtype is not matrix.dtype:  # bfloat16 weights, many float32 rows (a prompt): widened once
            weight_t = weight_t.to(matrix.dtype)
        out = matrix @ weight_t if bias is None else torch.addmm(bias, matrix, weight_t)
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, layout=(in, out)"


class Fused:
    """What a fused layer (:class:`FusedDecodeLinear`, :class:`FusedBlockLinear`) adds: the
    parts it stands for, which the model uses it for only while they are still its parts."""

    parts: tuple[nn.Module, ...]

    def covers(self, *modules: nn.Module) -> bool:
        """Whether ``modules`` are exactly the parts fused here, in order (modules compare by
        identity)."""
        return modules == self.parts


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
