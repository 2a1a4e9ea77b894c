"""LayerNorm under CPU bf16 autocast for pre-norm blocks (lmforge.kernels.norm, native.c section
6b): the output is the float32 norm rounded to bfloat16 (a bf16 step at most, where float32's
own rounding differs), the gradients PyTorch's; with and without bias or affine parameters,
threads, second derivatives, hooks and post-norm models left alone, and a decoder's training
the same as on autocast's LayerNorm. Skipped where the kernels cannot be built here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmforge import ModelConfig, Transformer
from lmforge.kernels import kernel_problem
from lmforge.kernels import norm as norm_module
from lmforge.kernels.norm import applies, normed
from tests.test_add_norm import layer_norm

pytestmark = pytest.mark.skipif(
    kernel_problem() is not None, reason=f"native kernels unavailable here: {kernel_problem()}"
)


def autocast():  # noqa: ANN201
    return torch.autocast("cpu", dtype=torch.bfloat16)


def both(layer: nn.LayerNorm, x0: torch.Tensor, dy: torch.Tensor):  # noqa: ANN201
    """(y, dx, dweight, dbias) natively and by autocast's LayerNorm + the cast to bf16."""
    results = []
    for native in (True, False):
        x = x0.clone().requires_grad_()
        layer.zero_grad()
        with autocast():
            assert applies(layer, x)
            y = normed(layer, x) if native else layer(x).to(torch.bfloat16)
        y.backward(dy)
        grads = [None if p is None else p.grad.clone() for p in (layer.weight, layer.bias)]
        results.append((y, x.grad, *grads))
    return results


@pytest.mark.parametrize("affine", ["weight and bias", "weight", "none"])
@pytest.mark.parametrize("shape", [(2, 37, 64), (5, 384), (1, 1, 16)])
def test_matches_autocasts_layer_norm(affine: str, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    layer = layer_norm(shape[-1], affine)
    x0 = torch.randn(shape) * 3 + 1
    dy = torch.randn(shape).bfloat16()
    ours, theirs = both(layer, x0, dy)
    assert ours[0].dtype is torch.bfloat16 and ours[1].dtype is torch.float32
    step = 2.0**-7 * theirs[0].float().abs().clamp(min=2.0**-100)  # one bfloat16 step of each value
    assert torch.all((ours[0].float() - theirs[0].float()).abs() <= step)
    assert (ours[0] != theirs[0]).float().mean() < 0.01  # float32's rounding moves a few
    for a, b in zip(ours[1:], theirs[1:], strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())


def test_when_it_applies() -> None:
    layer = nn.LayerNorm(64)
    x = torch.randn(4, 64)
    assert not applies(layer, x)  # no autocast
    with autocast():
        assert applies(layer, x)
        assert not applies(layer, torch.randn(4, 72))  # width no multiple of 16
        assert not applies(layer, x.bfloat16())
        assert not applies(nn.LayerNorm((4, 64)), x[None])  # over two dimensions
        with torch.no_grad():  # evaluation keeps float32 (the fused Q/K/V evaluation path wants it)
            assert not applies(layer, x)
        handle = layer.register_forward_hook(lambda *args: None)
        assert not applies(layer, x)
        handle.remove()


def test_threads_give_the_same_values() -> None:
    torch.manual_seed(0)
    layer = nn.LayerNorm(128)
    x0, dy = torch.randn(300, 128), torch.randn(300, 128).bfloat16()
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            results.append(both(layer, x0, dy)[0])
    finally:
        torch.set_num_threads(threads)
    (y1, dx1, dw1, db1), (y3, dx3, dw3, db3) = results
    assert torch.equal(y1, y3) and torch.equal(dx1, dx3)
    assert torch.allclose(dw1, dw3, rtol=1e-5, atol=1e-5) and torch.allclose(db1, db3, rtol=1e-5, atol=1e-5)


def test_second_derivatives_through_pytorchs_formula() -> None:
    torch.manual_seed(0)
    layer = nn.LayerNorm(32)
    x0 = torch.randn(6, 32)
    seconds = []
    for native in (True, False):
        x = x0.clone().requires_grad_()
        with autocast():
            y = normed(layer, x) if native else layer(x).to(torch.bfloat16)
        (grad,) = torch.autograd.grad((y.float() ** 2).sum(), x, create_graph=True)
        (second,) = torch.autograd.grad((grad**2).sum(), x)
        seconds.append(second)
    assert torch.allclose(seconds[0], seconds[1], rtol=1e-2, atol=1e-3)


def count_native(monkeypatch: pytest.MonkeyPatch, function: type = norm_module._LayerNorm) -> list[int]:
    calls: list[int] = []
    original = function.apply
    monkeypatch.setattr(function, "apply", lambda *a: calls.append(1) or original(*a))
    return calls


def test_prenorm_training_matches_autocasts_layer_norm(monkeypatch: pytest.MonkeyPatch) -> None:
    calls, sums = count_native(monkeypatch), count_native(monkeypatch, norm_module._AddNorm)
    config = ModelConfig(arch="decoder", vocab_size=64, max_seq_len=32, embed_dim=64, num_layers=2, num_heads=4, dropout=0.0)
    ids = torch.randint(0, 64, (4, 33))
    results = {}
    for native in (True, False):
        if not native:  # neither the norm alone nor the residual sum with it natively
            monkeypatch.setattr(norm_module, "applies", lambda norm, x: False)
            monkeypatch.setattr(norm_module, "sum_applies", lambda *a: False)
        torch.manual_seed(0)
        model = Transformer(config)
        with autocast():
            logits = model(ids[:, :-1]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        results[native] = (loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()]))
    # the first layer's attention norm alone; every other norm with the residual sum before it
    # (tests/test_add_norm.py): the MLPs', the second layer's attention's, which adds the first
    # layer's MLP branch, and the final norm (float32 out), which adds the last
    assert len(calls) == 1 and len(sums) == 4
    assert results[True][0] == pytest.approx(results[False][0], rel=1e-3)
    assert F.cosine_similarity(results[True][1], results[False][1], dim=0) > 0.999


def test_post_norm_models_keep_their_norm(monkeypatch: pytest.MonkeyPatch) -> None:
    calls, sums = count_native(monkeypatch), count_native(monkeypatch, norm_module._AddNorm)
    config = ModelConfig.from_name("tiny-encoder", dropout=0.0)
    assert not config.prenorm
    model = Transformer(config)
    with autocast():
        out = model(torch.randint(0, config.vocab_size, (2, 16)))
    (out.logits if hasattr(out, "logits") else out[0]).float().sum().backward()
    assert calls == [] and sums == []
