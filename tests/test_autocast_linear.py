"""The linear layer under CPU bf16 autocast whose weight gradient multiplies a transposed operand
(lmforge.kernels.linear, native.c's transpose_bf16): when it applies, the same forward and input
gradient as autocast's own linear, the weight and bias gradients to bf16 precision against
float64, in the weight's dtype; PEFT wrappers and hooked layers called as they are; a model's
autocast training the same as with autocast's linear. Skipped without AMX tiles, with the reason."""

from __future__ import annotations

import ctypes

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmforge import ModelConfig, Transformer
from lmforge.kernels import amx_tiles, block_kernels, kernel_problem
from lmforge.kernels import linear as linear_module
from lmforge.kernels.linear import WORK, applies, linear, project

pytestmark = pytest.mark.skipif(
    kernel_problem() is not None or not amx_tiles(),
    reason=f"no AMX tiles here ({kernel_problem() or 'CPU without AMX-BF16, or LMFORGE_NO_AMX set'})",
)


def autocast():  # noqa: ANN201
    return torch.autocast("cpu", dtype=torch.bfloat16)


@pytest.mark.parametrize(("rows", "cols"), [(2048, 384), (37, 20), (64, 16), (33, 17), (1, 5), (96, 1536)])
def test_transpose_kernel(rows: int, cols: int) -> None:
    x = torch.randn(rows, cols).bfloat16()
    out = torch.full((cols, rows), float("nan"), dtype=torch.bfloat16)
    block_kernels().transpose_bf16(x.data_ptr(), rows, cols, out.data_ptr(), 1)
    assert torch.equal(out, x.t())


def test_when_it_applies() -> None:
    weight = torch.randn(384, 384, requires_grad=True)
    x = torch.randn(4096, 384)
    assert WORK <= 4096 * 384 * 384
    assert not applies(x, weight)  # no autocast
    with autocast():
        assert applies(x, weight)
        assert applies(x.view(4, 1024, 384), weight)
        assert not applies(x[:8], weight)  # too little work: F.linear
        assert not applies(torch.randn(4096, 392), torch.randn(392, 392, requires_grad=True))  # widths % 16
        assert not applies(x, weight.detach())  # no gradient wanted
        with torch.no_grad():
            assert not applies(x, weight)
    with torch.autocast("cpu", dtype=torch.float16):
        assert not applies(x, weight)


@pytest.mark.parametrize(("in_features", "out_features"), [(384, 1152), (1536, 384), (384, 384)])
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
def test_gradients(in_features: int, out_features: int, input_dtype: torch.dtype) -> None:
    """Forward and the input's gradient those of autocast's linear; the weight and bias gradients
    float32 (the weight's dtype) within bf16 rounding of float64's."""
    torch.manual_seed(0)
    tokens = -(-WORK // (in_features * out_features))
    x0 = torch.randn(2, (tokens + 1) // 2, in_features).to(input_dtype)
    layer = nn.Linear(in_features, out_features)
    dy = torch.randn(2, (tokens + 1) // 2, out_features).bfloat16()
    results = []
    for function in (linear, F.linear):
        x = x0.clone().requires_grad_()
        layer.zero_grad()
        with autocast():
            assert applies(x, layer.weight)
            y = function(x, layer.weight, layer.bias)
        y.backward(dy)
        results.append((y, x.grad, layer.weight.grad.clone(), layer.bias.grad.clone()))
    (y, dx, dw, db), (y_ref, dx_ref, dw_ref, db_ref) = results
    assert y.dtype is torch.bfloat16 and dx.dtype is input_dtype and dw.dtype is torch.float32
    assert torch.equal(y, y_ref) and torch.equal(dx, dx_ref)
    exact_dw = dy.double().flatten(0, 1).t() @ x0.bfloat16().double().flatten(0, 1)
    for ours, exact in ((dw, exact_dw), (dw_ref, exact_dw), (db, dy.double().sum((0, 1)))):
        assert (ours.double() - exact).abs().max() <= 2**-7 * exact.abs().max()
    assert torch.allclose(db, db_ref, rtol=1e-2, atol=1e-2)


def test_bfloat16_weights_get_bfloat16_gradients() -> None:
    torch.manual_seed(0)
    weight = torch.randn(512, 256, dtype=torch.bfloat16, requires_grad=True)
    x = torch.randn(4096, 256, requires_grad=True)
    with autocast():
        y = linear(x, weight)
    y.float().sum().backward()
    assert weight.grad.dtype is torch.bfloat16 and x.grad.dtype is torch.float32


def test_project_calls_wrapped_and_hooked_layers_as_they_are(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(linear_module._AutocastLinear, "apply", lambda *a: calls.append(1) or F.linear(*a))
    layer = nn.Linear(384, 384)
    x = torch.randn(4096, 384, requires_grad=True)
    with autocast():
        project(layer, x)
        assert len(calls) == 1
        seen = []
        handle = layer.register_forward_hook(lambda module, args, out: seen.append(out.shape))
        project(layer, x)
        handle.remove()
        assert len(calls) == 1 and seen == [(4096, 384)]

        class Wrapped(nn.Linear):
            pass

        wrapped = Wrapped(384, 384)
        project(wrapped, x)
        assert len(calls) == 1


def test_training_matches_autocasts_linear(monkeypatch: pytest.MonkeyPatch) -> None:
    """A decoder wide enough for the path, trained under bf16 autocast: the same losses and
    gradients as with autocast's own linear, to bf16 rounding."""
    config = ModelConfig(
        arch="decoder", vocab_size=96, max_seq_len=128, embed_dim=384, num_layers=2, num_heads=6, dropout=0.0
    )
    ids = torch.randint(0, 96, (16, 129))
    tokens, E = 16 * 128, config.embed_dim
    taken = sum(tokens * i * o >= WORK for i, o in ((E, 3 * E), (E, E), (E, 4 * E), (4 * E, E)))
    assert taken >= 2
    results = {}
    counted = []
    original = linear_module._AutocastLinear.apply
    monkeypatch.setattr(linear_module._AutocastLinear, "apply", lambda *a: counted.append(1) or original(*a))
    for custom in (True, False):
        if not custom:
            monkeypatch.setattr(linear_module, "applies", lambda x, weight: False)
        torch.manual_seed(0)
        model = Transformer(config)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses = []
        for _ in range(3):
            with autocast():
                logits = model(ids[:, :-1]).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
            loss.backward()
            grads = torch.cat([p.grad.flatten() for p in model.parameters()])
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        results[custom] = (losses, grads)
    assert len(counted) == 3 * 2 * taken  # steps x layers x the products large enough
    assert results[True][0] == pytest.approx(results[False][0], rel=1e-3)
    assert F.cosine_similarity(results[True][1], results[False][1], dim=0) > 0.999


def test_transpose_symbol_is_typed() -> None:
    assert block_kernels().transpose_bf16.argtypes[0] is ctypes.c_void_p
