"""GELU, its tanh and erf forms, through the native kernel (lmforge.kernels.activation, native.c
section 6): forward and backward against float64, every length and layout, threads, the cases that
keep PyTorch's operators, and GPT-2- and nanoGPT-wired models' training steps against the same
models with ``nn.GELU``. Skipped where the kernels cannot be built here, with the reason."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmforge import ModelConfig, Transformer
from lmforge.kernels import activation, kernel_problem
from lmforge.kernels.activation import FORMS, gelu, native_gelu
from lmforge.model.layers import GELU

pytestmark = pytest.mark.skipif(
    kernel_problem() is not None, reason=f"native kernels unavailable here: {kernel_problem()}"
)


def reference(x: torch.Tensor, dy: torch.Tensor, form: str) -> tuple[torch.Tensor, torch.Tensor]:
    """GELU and its input gradient in float64 by PyTorch."""
    x64 = x.detach().double().requires_grad_()
    y = F.gelu(x64, approximate=form)
    y.backward(dy.double())
    return y.detach(), x64.grad


def native(x: torch.Tensor, dy: torch.Tensor, form: str) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().clone().requires_grad_()
    y = gelu(x, form)
    assert type(y.grad_fn).__name__ == "_GeluBackward"  # the native path, not PyTorch's
    y.backward(dy)
    return y.detach(), x.grad


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("n", [1, 7, 8, 9, 64, 1001])
def test_matches_float64_at_every_length(n: int, form: str) -> None:
    torch.manual_seed(n)
    x = torch.randn(n) * 4
    x[0] = 0.0
    dy = torch.randn(n)
    y, dx = native(x, dy, form)
    y64, dx64 = reference(x, dy, form)
    assert torch.allclose(y.double(), y64, rtol=1e-6, atol=1e-6)
    assert torch.allclose(dx.double(), dx64, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("form", FORMS)
def test_whole_range_including_both_tails(form: str) -> None:
    """From -30 to 30: the far negative side (GELU and slope near 0, no cancellation) and the far
    positive side (GELU = x, slope 1); at least as close to float64 as PyTorch's own float32."""
    x = torch.linspace(-30, 30, 60_001)
    dy = torch.ones_like(x)
    y, dx = native(x, dy, form)
    y64, dx64 = reference(x, dy, form)
    torch_y = F.gelu(x, approximate=form).double()
    torch_dx = torch.ops.aten.gelu_backward(dy, x, approximate=form).double()
    ours_y, ours_dx = (y.double() - y64).abs().max(), (dx.double() - dx64).abs().max()
    assert ours_y < 1e-6 and ours_dx < 1e-6
    assert ours_y <= 2 * (torch_y - y64).abs().max() and ours_dx <= 2 * (torch_dx - dx64).abs().max()
    assert torch.equal(y[x > 10], x[x > 10]) and torch.all(y[x < -10].abs() < 1e-20)
    assert torch.all((dx[x > 10] - 1).abs() < 1e-6) and torch.all(dx[x < -10].abs() < 1e-20)


@pytest.mark.parametrize("form", FORMS)
def test_far_values_nan_and_infinities(form: str) -> None:
    """Huge finite inputs give the limits (GELU x or 0, slope 1 or 0), not e^-87 times x or zero
    times an overflowed term, in the vector part and the scalar tail alike (18 values: 16 + 2);
    NaN stays NaN both ways; the infinities go forward as PyTorch's float64 GELU takes them (the
    formula's values: +inf, and NaN from -inf times 0; its float32 erf form on an AVX-512 CPU
    gives NaN for +inf as well, on AVX2 +inf)."""
    far = torch.tensor([1e20, 3.4e38, -1e20, -3.4e38, 60.0, -60.0]).repeat(3)
    y, dx = native(far, torch.ones_like(far), form)
    positive = far > 0
    assert torch.equal(y[positive], far[positive]) and torch.all(y[~positive] == 0)
    assert torch.equal(dx, positive.float())
    nan = torch.full((18,), float("nan"))
    y, dx = native(nan, torch.ones_like(nan), form)
    assert y.isnan().all() and dx.isnan().all()
    inf = torch.tensor([float("inf"), -float("inf")]).repeat(9)
    ours, theirs = gelu(inf, form), F.gelu(inf.double(), approximate=form).float()
    assert torch.equal(ours.isnan(), theirs.isnan()) and torch.equal(ours[~ours.isnan()], theirs[~theirs.isnan()])


@pytest.mark.parametrize("form", FORMS)
def test_layouts_and_shapes(form: str) -> None:
    x = torch.randn(6, 40, 24) * 3
    dy = torch.randn(6, 24, 40)
    strided = x.transpose(1, 2)  # not contiguous: the kernel reads a contiguous copy
    y, dx = native(strided, dy, form)
    y64, dx64 = reference(strided, dy, form)
    assert y.shape == dx.shape == strided.shape
    assert torch.allclose(y.double(), y64, rtol=1e-6, atol=1e-6)
    assert torch.allclose(dx.double(), dx64, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("n", [1, 7, 8, 9, 64, 1001])
def test_bfloat16_is_the_float32_result_rounded(n: int, form: str) -> None:
    """bfloat16 in and out (autocast's MLP): the float32 kernel's values on the same inputs,
    rounded to the nearest bfloat16 as PyTorch rounds (ties to even), at every length (the last
    n % 8 values through the same formulas); so within half a bfloat16 step of float64."""
    torch.manual_seed(n)
    x, dy = (torch.randn(n) * 4).bfloat16(), torch.randn(n).bfloat16()
    y, dx = native(x, dy, form)
    assert y.dtype is torch.bfloat16 and dx.dtype is torch.bfloat16
    padded = -(-n // 16) * 16  # float32's last n % 16 (or % 8) values take the C library's erfc: pad them away
    y32, dx32 = native(F.pad(x.float(), (0, padded - n)), F.pad(dy.float(), (0, padded - n)), form)
    assert torch.equal(y, y32[:n].bfloat16()) and torch.equal(dx, dx32[:n].bfloat16())
    y64, dx64 = reference(x, dy, form)
    step = 2.0**-8  # half a bfloat16 step (8 significant bits), plus float32's own error
    assert torch.all((y.double() - y64).abs() <= step * y64.abs() + 1e-6)
    assert torch.all((dx.double() - dx64).abs() <= step * dx64.abs() + 1e-6)


@pytest.mark.parametrize("form", FORMS)
def test_bfloat16_special_values(form: str) -> None:
    """NaN stays NaN both ways; the infinities as in float32; the largest bfloat16 stays finite."""
    big = torch.finfo(torch.bfloat16).max
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), big, -big, 0.0, -0.0, 1e-30] * 3).bfloat16()
    dy = torch.ones_like(x)
    y, dx = native(x, dy, form)
    y32, dx32 = native(x.float(), dy.float(), form)
    for ours, full in ((y, y32.bfloat16()), (dx, dx32.bfloat16())):
        assert torch.equal(ours.isnan(), full.isnan())
        assert torch.equal(ours[~ours.isnan()], full[~full.isnan()])
    assert y.isnan()[0] and dx.isnan()[0] and y[1] == float("inf") and y[3] == big and y[4] == 0


@pytest.mark.parametrize("form", FORMS)
def test_threads_give_the_same_values(form: str) -> None:
    x = torch.randn(3, activation.PARALLEL_FROM) * 3
    dy = torch.randn_like(x)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native(x, dy, form)
        torch.set_num_threads(2)
        two = native(x, dy, form)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


@pytest.mark.parametrize("form", FORMS)
def test_cases_that_keep_pytorchs_operators(monkeypatch: pytest.MonkeyPatch, form: str) -> None:
    x64 = torch.randn(16, dtype=torch.float64, requires_grad=True)
    assert not native_gelu(x64) and type(gelu(x64, form).grad_fn).__name__ == "GeluBackward0"
    assert torch.autograd.gradcheck(lambda t: gelu(t, form), (x64,))
    half = torch.randn(16).half()
    assert not native_gelu(half)
    assert torch.equal(gelu(half, form), F.gelu(half, approximate=form))
    monkeypatch.setattr(activation, "block_kernels", lambda: None)  # no kernels built here
    x = torch.randn(16, requires_grad=True)
    assert not native_gelu(x) and type(gelu(x, form).grad_fn).__name__ == "GeluBackward0"


def test_unknown_form_is_refused() -> None:
    with pytest.raises(ValueError, match="GELU approximate must be one of"):
        gelu(torch.randn(4), "sigmoid")


@pytest.mark.parametrize("form", FORMS)
def test_second_derivative_is_pytorchs(form: str) -> None:
    """A gradient of the gradient (create_graph) goes through PyTorch's differentiable formula."""
    x = (torch.randn(50) * 2).requires_grad_()
    (g,) = torch.autograd.grad(gelu(x, form).sum(), x, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), x)
    x2 = x.detach().clone().requires_grad_()
    (g2,) = torch.autograd.grad(F.gelu(x2, approximate=form).sum(), x2, create_graph=True)
    (h2,) = torch.autograd.grad(g2.sum(), x2)
    assert torch.allclose(g, g2, atol=1e-6) and torch.allclose(h, h2, atol=1e-5)


def test_module_runs_native_for_both_forms() -> None:
    x = torch.randn(4, 32, requires_grad=True)
    for module in (GELU(), GELU(approximate="tanh")):
        y = module(x)
        assert type(y.grad_fn).__name__ == "_GeluBackward"
        assert torch.allclose(y, F.gelu(x, approximate=module.approximate), rtol=1e-6, atol=1e-6)
    assert isinstance(GELU(), nn.GELU) and "approximate='tanh'" in repr(GELU(approximate="tanh"))


@pytest.mark.parametrize("activation_name", ["gelu_tanh", "gelu"])
def test_wired_training_matches_nn_gelu(activation_name: str) -> None:
    """A GPT-2-wired model (tanh GELU) and a nanoGPT/BERT-style one (erf GELU) with the native
    GELU and with ``nn.GELU``: the same loss and gradients to float32 rounding, and the same
    losses over three SGD steps."""
    torch.manual_seed(0)
    config = ModelConfig.from_name("tiny-decoder", activation=activation_name, dropout=0.0)
    ours = Transformer(config).train()
    theirs = copy.deepcopy(ours)
    acts = [name for name, module in ours.named_modules() if isinstance(module, GELU)]
    assert len(acts) == config.num_layers
    for name in acts:
        theirs.set_submodule(name, nn.GELU(approximate=ours.get_submodule(name).approximate))
    assert not any(isinstance(module, GELU) for module in theirs.modules())
    ids = torch.randint(0, config.vocab_size, (3, 24))
    losses = {}
    for name, model in (("ours", ours), ("theirs", theirs)):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        losses[name] = []
        for step in range(3):
            logits = model(ids[:, :-1]).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
            loss.backward()
            if step == 0:
                grads = [p.grad.clone() for p in model.parameters()]
                losses[name + " gradients"] = grads
            optimizer.step()
            optimizer.zero_grad()
            losses[name].append(loss.item())
    assert losses["ours"] == pytest.approx(losses["theirs"], rel=1e-5)
    for a, b in zip(losses["ours gradients"], losses["theirs gradients"], strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
