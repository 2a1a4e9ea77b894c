"""A pre-norm block's "add & norm" in one native pass each way (lmforge.kernels.norm.added_normed,
native.c section 6b): s = x + h and LayerNorm(s) with PyTorch's values and gradients in float32;
under CPU bf16 autocast with a bf16 branch h, the norm the same as normed(norm, x + h) and h's
gradient x's rounded to bf16; second derivatives, an unused sum, threads, when it applies, and
decoders and encoder-decoders (dropout on) training the same with and without it; a branch whose
projection's bias is pending (GPT-2's wiring): the bias added in the pass and its gradient summed
there, models training the same, and where the bias stays in its projection. Skipped where the
kernels cannot be built here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmforge import ModelConfig, Transformer
from lmforge.kernels import kernel_problem
from lmforge.kernels import norm as norm_module
from lmforge.kernels.linear import Pending, settled
from lmforge.kernels.norm import added_normed, normed, sum_applies

pytestmark = pytest.mark.skipif(
    kernel_problem() is not None, reason=f"native kernels unavailable here: {kernel_problem()}"
)


def autocast():  # noqa: ANN201
    return torch.autocast("cpu", dtype=torch.bfloat16)


def layer_norm(dim: int, affine: str) -> nn.LayerNorm:
    """A LayerNorm of width dim with "weight and bias", "weight" or "none", its parameters random."""
    layer = nn.LayerNorm(dim, bias=affine == "weight and bias", elementwise_affine=affine != "none")
    if layer.weight is not None:
        with torch.no_grad():
            layer.weight.normal_()
            if layer.bias is not None:
                layer.bias.normal_()
    return layer


def run(layer: nn.LayerNorm, x0: torch.Tensor, h0: torch.Tensor, ds: torch.Tensor, dy: torch.Tensor, *, native: bool, bf16: bool = False):  # noqa: ANN201
    """(s, y, dx, dh, dweight, dbias) fused or as x + h and then the norm."""
    x, h = x0.clone().requires_grad_(), h0.clone().requires_grad_()
    layer.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        if native:
            assert sum_applies(layer, x, h)
            s, y = added_normed(layer, x, h)
        else:
            s = x + h
            y = normed(layer, s) if bf16 else layer(s)
    torch.autograd.backward([s, y], [ds, dy.to(y.dtype)])
    grads = [None if p is None else p.grad.clone() for p in (layer.weight, layer.bias)]
    return s, y, x.grad, h.grad, *grads


@pytest.mark.parametrize("affine", ["weight and bias", "weight", "none"])
@pytest.mark.parametrize("shape", [(2, 37, 64), (5, 384), (1, 1, 16)])
def test_float32_matches_pytorch(affine: str, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    layer = layer_norm(shape[-1], affine)
    x0, h0 = torch.randn(shape) * 3 + 1, torch.randn(shape)
    ds, dy = torch.randn(shape), torch.randn(shape)
    ours = run(layer, x0, h0, ds, dy, native=True)
    theirs = run(layer, x0, h0, ds, dy, native=False)
    assert all(t is None or t.dtype is torch.float32 for t in ours)
    assert torch.equal(ours[0], theirs[0])  # the sum itself, exactly
    assert torch.allclose(ours[1], theirs[1], rtol=1e-5, atol=1e-5)
    for a, b in zip(ours[2:], theirs[2:], strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())


@pytest.mark.parametrize("affine", ["weight and bias", "weight"])
def test_bf16_branch_under_autocast(affine: str) -> None:
    """The norm as normed() gives it for x + h; x's gradient the unfused one's, h's the same
    rounded to bf16 (autograd's cast of it)."""
    torch.manual_seed(0)
    shape = (3, 40, 128)
    layer = layer_norm(128, affine)
    x0, h0 = torch.randn(shape) * 2, torch.randn(shape).bfloat16()
    ds, dy = torch.randn(shape), torch.randn(shape).bfloat16()
    ours = run(layer, x0, h0, ds, dy, native=True, bf16=True)
    theirs = run(layer, x0, h0, ds, dy, native=False, bf16=True)
    assert ours[1].dtype is torch.bfloat16 and ours[3].dtype is torch.bfloat16
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
    assert torch.allclose(ours[2], theirs[2], rtol=1e-5, atol=1e-5)
    assert torch.equal(ours[3], ours[2].bfloat16())
    assert (ours[3] != theirs[3]).float().mean() < 0.01  # a bf16 step where float32's sums round apart
    for a, b in zip(ours[4:], theirs[4:], strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())


def test_float32_branch_under_autocast() -> None:
    torch.manual_seed(0)
    layer = layer_norm(64, "weight and bias")
    x0, h0, ds, dy = (torch.randn(4, 64) for _ in range(4))
    ours = run(layer, x0, h0, ds, dy, native=True, bf16=True)
    theirs = run(layer, x0, h0, ds, dy, native=False, bf16=True)
    assert ours[1].dtype is torch.bfloat16 and ours[3].dtype is torch.float32
    assert torch.equal(ours[1], theirs[1])
    assert torch.allclose(ours[3], theirs[3], rtol=1e-5, atol=1e-5)


def test_when_it_applies() -> None:
    layer = nn.LayerNorm(64)
    x, h = torch.randn(4, 64), torch.randn(4, 64)
    assert sum_applies(layer, x, h)  # float32, no autocast
    assert not sum_applies(layer, x, h.bfloat16())  # a bf16 branch only under bf16 autocast
    assert not sum_applies(layer, x, h[:2])  # shapes differ (broadcasting stays PyTorch's)
    assert not sum_applies(layer, torch.randn(4, 72), torch.randn(4, 72))  # width no multiple of 16
    assert not sum_applies(nn.RMSNorm(64), x, h)
    with autocast():
        assert sum_applies(layer, x, h.bfloat16()) and sum_applies(layer, x, h)
    with torch.autocast("cpu", dtype=torch.float16):
        assert not sum_applies(layer, x, h)
    with torch.no_grad():
        assert not sum_applies(layer, x, h)
    handle = layer.register_forward_pre_hook(lambda *args: None)
    assert not sum_applies(layer, x, h)
    handle.remove()
    s, y = added_normed(layer, x, h[:1])  # where it does not apply: x + h and the norm, as PyTorch
    assert torch.equal(s, x + h[:1]) and torch.allclose(y, layer(x + h[:1]))


def test_unused_sum_and_threads() -> None:
    torch.manual_seed(0)
    layer = layer_norm(128, "weight and bias")
    x0, h0, dy = torch.randn(300, 128), torch.randn(300, 128), torch.randn(300, 128)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            x, h = x0.clone().requires_grad_(), h0.clone().requires_grad_()
            layer.zero_grad()
            _, y = added_normed(layer, x, h)
            y.backward(dy)  # the sum itself unused: its gradient counts as zeros
            results.append((y, x.grad, h.grad, layer.weight.grad.clone()))
    finally:
        torch.set_num_threads(threads)
    x = x0.clone().requires_grad_()
    reference = layer(x + h0)
    (dx,) = torch.autograd.grad(reference, x, dy)
    assert torch.allclose(results[0][0], reference, atol=1e-5)
    assert torch.allclose(results[0][1], dx, rtol=1e-4, atol=1e-5)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert torch.equal(results[0][1], results[0][2])
    assert torch.allclose(results[0][3], results[1][3], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bf16", [False, True])
def test_second_derivatives_through_pytorchs_formula(bf16: bool) -> None:
    torch.manual_seed(0)
    layer = layer_norm(32, "weight and bias")
    x0, h0 = torch.randn(6, 32), torch.randn(6, 32)
    seconds = []
    for native in (True, False):
        x, h = x0.clone().requires_grad_(), h0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if native:
                s, y = added_normed(layer, x, h)
            else:
                s = x + h
                y = normed(layer, s) if bf16 else layer(s)
        loss = (y.float() ** 2).sum() + (s**3).sum()
        gx, gh = torch.autograd.grad(loss, (x, h), create_graph=True)
        seconds.append(torch.autograd.grad((gx**2).sum() + (gh * x).sum(), (x, h)))
    for a, b in zip(*seconds, strict=True):
        assert torch.allclose(a, b, rtol=1e-2 if bf16 else 1e-4, atol=1e-3 if bf16 else 1e-5)


def count(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    calls: list[int] = []
    function = getattr(norm_module, name)
    original = function.apply
    monkeypatch.setattr(function, "apply", lambda *a: calls.append(1) or original(*a))
    return calls


@pytest.mark.parametrize(
    ("name", "bf16"),
    [("decoder", False), ("decoder", True), ("encoder-decoder", False)],
)
def test_training_the_same_without_it(monkeypatch: pytest.MonkeyPatch, name: str, bf16: bool) -> None:
    fused = count(monkeypatch, "_AddNorm")
    kwargs = dict(vocab_size=64, max_seq_len=32, embed_dim=64, num_layers=2, num_heads=4, dropout=0.1)
    if name == "encoder-decoder":
        config = ModelConfig(arch="encoder_decoder", prenorm=True, **kwargs)
    else:
        config = ModelConfig(arch="decoder", **kwargs)
    ids = torch.randint(0, 64, (4, 17))
    results = {}
    for native in (True, False):
        if not native:
            monkeypatch.setattr(norm_module, "sum_applies", lambda *a: False)
        torch.manual_seed(0)
        model = Transformer(config)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if name == "encoder-decoder":
                logits = model(ids[:, :8], decoder_input_ids=ids[:, 8:-1]).logits
                target = ids[:, 9:]
            else:
                logits = model(ids[:, :-1]).logits
                target = ids[:, 1:]
        loss = F.cross_entropy(logits.float().flatten(0, 1), target.flatten())
        loss.backward()
        results[native] = (loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()]))
    # a sum for every sublayer's norm but a stack's first, and for its final norm: 2 layers × 2
    # sublayers in a decoder or encoder, 2 × 3 in a decoder with cross-attention
    assert len(fused) == (4 if name == "decoder" else 4 + 6)
    assert results[True][0] == pytest.approx(results[False][0], rel=1e-3 if bf16 else 1e-5)
    assert F.cosine_similarity(results[True][1], results[False][1], dim=0) > (0.999 if bf16 else 0.99999)


def test_blocks_called_whole_where_their_output_is_watched(monkeypatch: pytest.MonkeyPatch) -> None:
    """A forward hook on a block sees its whole output (x with its last branch added); without
    gradients each block is called whole too; activation checkpointing recomputes the same
    deferred sums; the model's outputs are the same either way."""
    fused = count(monkeypatch, "_AddNorm")
    config = ModelConfig(arch="decoder", vocab_size=64, max_seq_len=32, embed_dim=64, num_layers=2, num_heads=4, dropout=0.0)
    torch.manual_seed(0)
    model = Transformer(config)
    ids = torch.randint(0, 64, (2, 16))
    hidden = []
    handle = model.decoder.register_forward_hook(lambda module, args, out: hidden.append(out[0]))
    reference = model(ids).logits
    assert len(fused) == 4  # across the blocks, and the final norm
    with autocast():
        model(ids)
    handle.remove()
    assert hidden[1].dtype is torch.float32  # the final norm's output stays float32 under autocast
    assert torch.allclose(hidden[1], hidden[0], atol=0.1)
    fused.clear()

    seen = []
    first, second = model.decoder.layers
    handle = first.register_forward_hook(lambda module, args, out: seen.append(out[0]))
    fused.clear()
    hooked_logits = model(ids).logits
    assert len(fused) == 2  # within each block only
    assert torch.allclose(hooked_logits, reference, atol=1e-5)
    handle.remove()
    handle = second.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    model(ids)
    handle.remove()
    assert torch.equal(seen[0], seen[1])  # what the hook saw is what the next block took: all of x

    fused.clear()
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, reference, atol=1e-5)
    assert fused == []

    model.decoder.activation_checkpointing = True
    fused.clear()
    logits = model(ids).logits
    assert torch.equal(logits, reference)
    assert len(fused) == 4
    logits.sum().backward()  # the blocks run again for their activations (not the final norm)
    assert len(fused) == 4 + 3


def run_pending(layer: nn.LayerNorm, x0: torch.Tensor, h0: torch.Tensor, b0: torch.Tensor, ds: torch.Tensor, dy: torch.Tensor, *, native: bool, bf16: bool = False):  # noqa: ANN201
    """(s, y, dx, dh, dbias of the branch, dweight, dbias) with h's bias pending or added first."""
    x, h, b = x0.clone().requires_grad_(), h0.clone().requires_grad_(), b0.clone().requires_grad_()
    layer.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        if native:
            assert sum_applies(layer, x, h, b)
            s, y = added_normed(layer, x, Pending(h, b))
        else:
            s = x + h + b
            y = normed(layer, s) if bf16 else layer(s)
    torch.autograd.backward([s, y], [ds, dy.to(y.dtype)])
    return s, y, x.grad, h.grad, b.grad, layer.weight.grad.clone(), layer.bias.grad.clone()


@pytest.mark.parametrize("bf16", [False, True])
def test_pending_bias_added_in_the_same_pass(bf16: bool) -> None:
    """A branch whose projection's bias is pending: s = x + h + b, the norm of s, and the bias's
    gradient (the column sums of s's gradient) as PyTorch gives them."""
    torch.manual_seed(0)
    shape = (3, 21, 64)
    layer = layer_norm(64, "weight and bias")
    x0, b0 = torch.randn(shape) * 2, torch.randn(64)
    h0 = torch.randn(shape).bfloat16() if bf16 else torch.randn(shape)
    ds, dy = torch.randn(shape), torch.randn(shape)
    ours = run_pending(layer, x0, h0, b0, ds, dy, native=True, bf16=bf16)
    theirs = run_pending(layer, x0, h0, b0, ds, dy, native=False, bf16=bf16)
    assert torch.allclose(ours[0], theirs[0], rtol=0, atol=1e-6)  # x + h + b, added in another order
    assert ours[1].dtype is theirs[1].dtype
    if bf16:
        assert (ours[1] != theirs[1]).float().mean() < 0.01  # bf16 steps where the sums round apart
    else:
        assert torch.allclose(ours[1], theirs[1], rtol=1e-5, atol=1e-5)
    assert ours[3].dtype is h0.dtype and ours[4].dtype is torch.float32
    for a, b in zip(ours[2:], theirs[2:], strict=True):
        scale = b.float().abs().max().item()
        assert torch.allclose(a.float(), b.float(), rtol=1e-2 if bf16 else 1e-4, atol=1e-2 * scale if bf16 else 1e-5 * scale)


def test_pending_bias_where_it_does_not_apply() -> None:
    layer = nn.LayerNorm(64)
    x, h, b = torch.randn(4, 64), torch.randn(4, 64), torch.randn(64)
    assert sum_applies(layer, x, h, b)
    assert not sum_applies(layer, x, h, b.double()) and not sum_applies(layer, x, h, torch.randn(32))
    with torch.no_grad():  # PyTorch's x + h + b and the norm
        s, y = added_normed(layer, x, Pending(h, b))
    assert torch.equal(s, x + h + b) and torch.allclose(y, layer(x + h + b))
    assert torch.equal(settled(Pending(h, b)), h + b) and settled(h) is h


def test_pending_bias_second_derivatives() -> None:
    torch.manual_seed(0)
    layer = layer_norm(32, "weight and bias")
    x0, h0, b0 = torch.randn(6, 32), torch.randn(6, 32), torch.randn(32)
    seconds = []
    for native in (True, False):
        x, h, b = (t.clone().requires_grad_() for t in (x0, h0, b0))
        s, y = added_normed(layer, x, Pending(h, b)) if native else (x + h + b, layer(x + h + b))
        gx, gb = torch.autograd.grad((y**2).sum() + (s**3).sum(), (x, b), create_graph=True)
        seconds.append(torch.autograd.grad((gx**2).sum() + (gb**2).sum(), (x, h, b)))
    for a, b in zip(*seconds, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def biased_model(**overrides: object) -> Transformer:
    """GPT-2's wiring (a decoder unless told): biased projections, pre-norm, learned positions, tanh
    GELU, no dropout; the biases random (they start at zero), so that leaving one out would show."""
    settings = dict(
        arch="decoder", vocab_size=64, max_seq_len=32, embed_dim=64, num_layers=2, num_heads=4,
        dropout=0.0, attn_dropout=0.0, bias=True, activation="gelu_tanh", position="learned",
    )  # fmt: skip
    settings.update(overrides)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**settings))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0.0, 0.5)
    return model


def deferred(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the output projections whose bias was left to the "add & norm"."""
    from lmforge.model import attention as attention_module
    from lmforge.model import layers as layers_module

    calls: list[int] = []
    original = layers_module.project_unbiased

    def counted(layer: nn.Module, x: torch.Tensor):  # noqa: ANN202
        out = original(layer, x)
        calls.extend([1] if isinstance(out, Pending) else [])
        return out

    monkeypatch.setattr(layers_module, "project_unbiased", counted)
    monkeypatch.setattr(attention_module, "project_unbiased", counted)
    return calls


def biased_step(model: Transformer, ids: torch.Tensor, *, bf16: bool = False) -> tuple[float, torch.Tensor]:
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        if model.config.arch == "encoder_decoder":
            logits, target = model(ids[:, :8], decoder_input_ids=ids[:, 8:-1]).logits, ids[:, 9:]
        else:
            logits, target = model(ids[:, :-1]).logits, ids[:, 1:]
    loss = F.cross_entropy(logits.float().flatten(0, 1), target.flatten())
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize(("arch", "bf16"), [("decoder", False), ("decoder", True), ("encoder_decoder", False)])
def test_biased_model_trains_the_same_with_its_biases_pending(monkeypatch: pytest.MonkeyPatch, arch: str, bf16: bool) -> None:
    """The attention's (self and cross) and the MLP's output projections leave their biases to the
    next "add & norm" (the final norm's for a stack's last block): the same loss and gradients as
    with the biases added by the projections."""
    from lmforge.model import attention as attention_module
    from lmforge.model import layers as layers_module

    ids = torch.randint(0, 64, (3, 17))
    calls = deferred(monkeypatch)
    extra = {"arch": arch, "prenorm": True}
    pending = biased_step(biased_model(**extra), ids, bf16=bf16)
    # 2 blocks × (attention, MLP); an encoder-decoder's decoder blocks add cross-attention's
    assert len(calls) == (4 if arch == "decoder" else 4 + 6)
    plain = layers_module.project
    monkeypatch.setattr(layers_module, "project_unbiased", plain)
    monkeypatch.setattr(attention_module, "project_unbiased", plain)
    added = biased_step(biased_model(**extra), ids, bf16=bf16)
    assert pending[0] == pytest.approx(added[0], rel=1e-3 if bf16 else 1e-6)
    assert F.cosine_similarity(pending[1], added[1], dim=0) > (0.999 if bf16 else 0.999999)


def test_biases_stay_in_their_projections_where_they_must(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not pending with dropout on, without gradients, where a hook watches a projection or a
    sublayer (it sees the whole output), or for a wrapped (PEFT-style) or subclassed projection;
    a block called whole returns its whole output."""
    ids = torch.randint(0, 64, (2, 16))
    calls = deferred(monkeypatch)
    model = biased_model()
    reference = model(ids).logits
    assert len(calls) == 4
    calls.clear()
    biased_model(dropout=0.1)(ids)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, reference, atol=1e-5)
    assert calls == []

    first = model.decoder.layers[0]
    for module in (first.self_attn.out_proj, first.mlp, first.self_attn):
        seen: list[torch.Tensor] = []
        handle = module.register_forward_hook(lambda m, args, out, seen=seen: seen.append(out))
        calls.clear()
        assert torch.allclose(model(ids).logits, reference, atol=1e-5)
        handle.remove()
        assert len(calls) == 3 and isinstance(seen[0], torch.Tensor)  # the hooked one's bias stays in

    class Scaled(nn.Linear):  # a projection of another kind: called as it is
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * 1.0

    down = first.mlp.down_proj
    first.mlp.down_proj = Scaled(down.in_features, down.out_features)
    first.mlp.down_proj.load_state_dict(down.state_dict())
    calls.clear()
    assert torch.allclose(model(ids).logits, reference, atol=1e-5)
    assert len(calls) == 3
    first.mlp.down_proj = down

    x = torch.randn(2, 16, 64)
    calls.clear()
    whole, _, _ = first(x)
    assert len(calls) == 2  # both of the block's biases pending, the last one added before returning
    with torch.no_grad():
        assert torch.allclose(whole, first(x)[0], atol=1e-5)
