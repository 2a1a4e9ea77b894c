"""Causal self-attention from the fused Q/K/V projection through the native kernel
(lmforge.kernels.causal, native.c section 7): forward and backward against float64 SDPA at every
shape it takes (odd lengths, head widths with a tail of 8, GQA and MQA), threads, refusals, and a
decoder's training against the same model on PyTorch's SDPA, with the cases the layer keeps on
SDPA. Skipped where the kernels cannot be built here, with the reason."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from lmforge import ModelConfig, Transformer
from lmforge.generation import generate
from lmforge.kernels import causal, kernel_problem
from lmforge.kernels.causal import causal_attention, native_causal_attention
from lmforge.model import attention as attention_module
from lmforge.model.positions import RotaryEmbedding, apply_rotary

pytestmark = pytest.mark.skipif(
    kernel_problem() is not None, reason=f"native kernels unavailable here: {kernel_problem()}"
)

SHAPES = [  # B, T, H, Hkv, D
    (1, 1, 1, 1, 8),
    (2, 5, 2, 1, 8),
    (1, 6, 1, 1, 16),
    (2, 7, 3, 3, 24),
    (2, 17, 2, 2, 40),
    (1, 33, 4, 1, 64),
    (3, 64, 4, 2, 32),
    (1, 130, 2, 2, 16),
]


def reference(qkv: torch.Tensor, H: int, Hkv: int, D: int, scale: float, rope=None) -> torch.Tensor:  # noqa: ANN001
    """SDPA over the split heads (rotated by lmforge's apply_rotary), joined again: (B, T, H·D)."""
    B, T, _ = qkv.shape
    q, k, v = qkv.split((H * D, Hkv * D, Hkv * D), dim=-1)
    q = q.reshape(B, T, H, D).transpose(1, 2)
    k = k.reshape(B, T, Hkv, D).transpose(1, 2)
    v = v.reshape(B, T, Hkv, D).transpose(1, 2)
    if rope is not None:
        q, k = apply_rotary(q, *(t.to(q.dtype) for t in rope)), apply_rotary(k, *(t.to(k.dtype) for t in rope))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=Hkv != H)
    return out.transpose(1, 2).reshape(B, T, H * D)


def angles(B: int, T: int, R: int, *, per_sequence: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE's cos, sin for positions 0..T-1 (T, R), or (B, T, R) with each sequence shifted."""
    positions = torch.arange(T)
    if per_sequence:
        positions = positions + 3 * torch.arange(B)[:, None]
    return RotaryEmbedding(R, base=500.0)(positions)


def both(shape: tuple[int, ...], seed: int = 0, rope=None):  # noqa: ANN001, ANN201
    """(output, qkv gradient) natively in float32 and by SDPA in float64."""
    B, T, H, Hkv, D = shape
    generator = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, T, (H + 2 * Hkv) * D, generator=generator) * 2
    dout = torch.randn(B, T, H * D, generator=generator)
    scale = 1 / math.sqrt(D)
    ours = qkv.clone().requires_grad_()
    out = causal_attention(ours, H, Hkv, D, scale, rope)
    assert type(out.grad_fn).__name__ == "_CausalAttentionBackward"
    out.backward(dout)
    theirs = qkv.double().requires_grad_()
    expected = reference(theirs, H, Hkv, D, scale, rope)
    expected.backward(dout.double())
    return (out.detach(), ours.grad), (expected.detach(), theirs.grad)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-T{}-H{}-Hkv{}-D{}".format(*s))
def test_matches_float64_sdpa(shape: tuple[int, ...]) -> None:
    (out, grad), (expected, expected_grad) = both(shape)
    assert out.shape == expected.shape and grad.shape == expected_grad.shape
    assert torch.allclose(out.double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.allclose(grad.double(), expected_grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "shape, R, per_sequence",
    [((2, 9, 2, 1, 16), 16, False), ((3, 40, 4, 2, 32), 32, True), ((1, 25, 3, 3, 24), 8, False), ((2, 70, 2, 2, 64), 64, True)],
    ids=["whole-heads", "per-sequence-angles", "partial-rotary", "long-heads"],
)
def test_rotary_positions_match_float64_sdpa(shape: tuple[int, ...], R: int, per_sequence: bool) -> None:
    """Queries and keys rotated by RoPE angles (all of each head, or its first R dimensions;
    one table for all sequences or one each) as lmforge's apply_rotary rotates them."""
    rope = angles(shape[0], shape[1], R, per_sequence=per_sequence)
    (out, grad), (expected, expected_grad) = both(shape, rope=rope)
    assert torch.allclose(out.double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.allclose(grad.double(), expected_grad, rtol=1e-4, atol=1e-5)
    (plain, _), _ = both(shape)
    assert not torch.allclose(out, plain, atol=1e-3)  # the angles did something


def test_each_position_sees_only_itself_and_before() -> None:
    """Changing a later position's key and value leaves every earlier output as it was."""
    B, T, H, Hkv, D = 2, 20, 2, 1, 16
    qkv = torch.randn(B, T, (H + 2 * Hkv) * D)
    changed = qkv.clone()
    changed[:, 12:, H * D :] = torch.randn(B, T - 12, 2 * Hkv * D)
    a = causal_attention(qkv, H, Hkv, D, 0.25)
    b = causal_attention(changed, H, Hkv, D, 0.25)
    assert torch.equal(a[:, :12], b[:, :12]) and not torch.allclose(a[:, 12:], b[:, 12:])


def test_threads_give_the_same_values() -> None:
    shape = (4, 40, 4, 2, 32)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = both(shape)[0]
        torch.set_num_threads(2)
        two = both(shape)[0]
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


def test_refusals() -> None:
    qkv = torch.randn(2, 8, 3 * 2 * 16)
    assert native_causal_attention(qkv, 2, 2, 16)
    cases = {
        "float64": (qkv.double(), 2, 2, 16),
        "head width not a multiple of 8": (torch.randn(2, 8, 3 * 2 * 12), 2, 2, 12),
        "widths that do not add up": (qkv, 2, 1, 16),
        "heads not a multiple of the key/value heads": (torch.randn(2, 8, 7 * 16), 3, 2, 16),
        "too long": (torch.randn(1, causal.MAX_LENGTH + 1, 3 * 8), 1, 1, 8),
        "bfloat16 past the low-precision work": (
            torch.randn(1, causal.LOW_PRECISION_WORK // 16 + 1, 3 * 16, dtype=torch.bfloat16),
            1,
            1,
            16,
        ),
        "no batch axis": (qkv[0], 2, 2, 16),
    }
    for why, (tensor, H, Hkv, D) in cases.items():
        assert not native_causal_attention(tensor, H, Hkv, D), why
        with pytest.raises(ValueError, match="does not apply"):
            causal_attention(tensor, H, Hkv, D, 0.25)
    cos, sin = angles(2, 8, 16)
    bad_angles = {
        "angles for another length": angles(2, 9, 16),
        "odd rotary width": (cos[:, :15], sin[:, :15]),
        "wider than a head": angles(2, 8, 24),
        "float64 angles": (cos.double(), sin.double()),
        "angles for another batch": angles(3, 8, 16, per_sequence=True),
    }
    for why, rope in bad_angles.items():
        assert not native_causal_attention(qkv, 2, 2, 16, rope), why
        with pytest.raises(ValueError, match="angles"):
            causal_attention(qkv, 2, 2, 16, 0.25, rope)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_input_is_computed_in_float32(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without AMX tiles (here: told so; tests/test_causal_amx.py has the tiles' kernel) a
    bfloat16/float16 projection (autocast's) runs natively up to T·D = LOW_PRECISION_WORK: the
    output and gradient in its dtype, equal to the float32 kernel's on the same (rounded) values,
    rounded once."""
    monkeypatch.setattr(causal, "_tiles", lambda qkv: False)
    torch.manual_seed(0)
    H, Hkv, D = 4, 2, 32
    qkv = torch.randn(2, 12, (H + 2 * Hkv) * D).to(dtype)
    dout = torch.randn(2, 12, H * D).to(dtype)
    assert native_causal_attention(qkv, H, Hkv, D)
    longest = causal.LOW_PRECISION_WORK // D
    assert native_causal_attention(torch.zeros(1, longest, (H + 2 * Hkv) * D, dtype=dtype), H, Hkv, D)
    assert not native_causal_attention(torch.zeros(1, longest + 1, (H + 2 * Hkv) * D, dtype=dtype), H, Hkv, D)
    assert native_causal_attention(torch.zeros(1, longest + 1, (H + 2 * Hkv) * D), H, Hkv, D)  # float32: any
    low = qkv.clone().requires_grad_()
    out = causal_attention(low, H, Hkv, D, 0.25, angles(2, 12, 8))
    out.backward(dout)
    full = qkv.float().requires_grad_()
    expected = causal_attention(full, H, Hkv, D, 0.25, angles(2, 12, 8))
    expected.backward(dout.float())
    assert out.dtype is dtype and low.grad.dtype is dtype
    assert torch.equal(out, expected.detach().to(dtype))
    assert torch.equal(low.grad, full.grad.to(dtype))


def test_second_derivatives_match_the_explicit_formula() -> None:
    """A gradient taken with ``create_graph`` (a gradient penalty) differentiates again, as the
    written-out formula does."""
    torch.manual_seed(0)
    H, Hkv, D = 2, 1, 8
    qkv = torch.randn(2, 6, (H + 2 * Hkv) * D, dtype=torch.float32)
    rope = angles(2, 6, 8)
    results = []
    for attend in (causal_attention, causal.explicit_causal_attention):
        x = qkv.clone().requires_grad_()
        out = attend(x, H, Hkv, D, 0.3, rope)
        (grad,) = torch.autograd.grad((out**2).sum(), x, create_graph=True)
        (second,) = torch.autograd.grad((grad**2).sum(), x)
        results.append((out.detach(), grad.detach(), second))
    for ours, theirs in zip(*results, strict=True):
        assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-5)


def counting(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the layer's calls of the native attention."""
    calls: list[int] = []

    def counted(*args: object, **options: object) -> torch.Tensor:
        calls.append(1)
        return causal_attention(*args, **options)

    monkeypatch.setattr(attention_module, "causal_attention", counted)
    return calls


def native_and_sdpa(monkeypatch: pytest.MonkeyPatch, config: ModelConfig, step):  # noqa: ANN201
    """``step(model)`` for a new decoder in training mode and for its copy with the native kernel
    refused (SDPA's path): both results and how many native calls the first made (the second
    makes none)."""
    ours = Transformer(config).train()
    theirs = copy.deepcopy(ours)
    calls = counting(monkeypatch)
    mine = step(ours)
    native = len(calls)
    monkeypatch.setattr(attention_module, "native_causal_attention", lambda *args: False)
    other = step(theirs)
    assert len(calls) == native  # none on SDPA's side
    return mine, other, native


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(num_kv_heads=1, bias=False, norm_bias=False),
        dict(activation="gelu_tanh"),
        dict(name="tiny-llama"),
    ],
    ids=["tiny-decoder", "mqa-nanogpt-like", "gpt2-like", "llama-rope-gqa"],
)
def test_training_matches_sdpa(monkeypatch: pytest.MonkeyPatch, overrides: dict) -> None:
    """A decoder's loss, gradients and three SGD steps natively and on SDPA (the layer told the
    kernel does not apply): the same to float32 rounding, every layer native."""
    torch.manual_seed(0)
    overrides = {"name": "tiny-decoder", **overrides}
    config = ModelConfig.from_name(overrides.pop("name"), dropout=0.0, **overrides)
    ids = torch.randint(0, config.vocab_size, (3, 24))

    def three_steps(model: Transformer) -> tuple[list[float], list[torch.Tensor]]:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        losses, gradients = [], []
        for step in range(3):
            logits = model(ids[:, :-1]).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
            loss.backward()
            if step == 0:
                gradients = [p.grad.clone() for p in model.parameters()]
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        return losses, gradients

    (ours, ours_grads), (theirs, theirs_grads), native = native_and_sdpa(monkeypatch, config, three_steps)
    assert native == 3 * config.num_layers
    assert ours == pytest.approx(theirs, rel=1e-5)
    for a, b in zip(ours_grads, theirs_grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["tiny-decoder", "tiny-llama"])
def test_bf16_autocast_training_runs_natively(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Training under bfloat16 autocast (``precision: bf16``): every layer on the native kernel
    (from the bf16 projection), loss and gradients those of bf16 SDPA to bf16's precision."""
    torch.manual_seed(0)
    config = ModelConfig.from_name(name, dropout=0.0)
    ids = torch.randint(0, config.vocab_size, (3, 24))

    def autocast_step(model: Transformer) -> tuple[float, torch.Tensor]:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(ids[:, :-1]).logits
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])

    (ours, ours_grads), (theirs, theirs_grads), native = native_and_sdpa(monkeypatch, config, autocast_step)
    assert native == config.num_layers
    assert ours == pytest.approx(theirs, rel=1e-2)
    assert F.cosine_similarity(ours_grads, theirs_grads, dim=0) > 0.99


@pytest.mark.parametrize("name", ["tiny-decoder", "tiny-llama"])
def test_right_padding_skipped_by_packing_runs_natively(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """A right-padded batch (the real tokens first, the padding rows dropped by packing): every
    layer native, and the loss and gradients those of SDPA with the padding mask."""
    torch.manual_seed(0)
    config = ModelConfig.from_name(name, dropout=0.0)
    lengths = (24, 17, 9)
    ids = torch.randint(0, config.vocab_size, (3, 24))
    mask = torch.zeros(3, 24, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    labels = ids.masked_fill(mask == 0, -100)
    models = []

    def padded_step(model: Transformer) -> tuple[torch.Tensor, float, list[torch.Tensor]]:
        models.append(model)
        logits = model(ids[:, :-1], attention_mask=mask[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        loss.backward()
        return logits.detach(), loss.item(), [p.grad for p in model.parameters()]

    ours, theirs, native = native_and_sdpa(monkeypatch, config, padded_step)
    (ours_logits, ours_loss, ours_grads), (theirs_logits, theirs_loss, theirs_grads) = ours, theirs
    assert native == config.num_layers
    assert ours_loss == pytest.approx(theirs_loss, rel=1e-5)
    assert torch.allclose(ours_logits, theirs_logits, atol=1e-5)  # padding positions: zeros on both
    for a, b in zip(ours_grads, theirs_grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    alone = models[0](ids[2:, : lengths[2]]).logits  # the shortest row on its own, no padding at all
    assert torch.allclose(alone[0], ours_logits[2, : lengths[2]], atol=1e-5)


@pytest.mark.parametrize("name", ["tiny-decoder", "tiny-llama"])
def test_evaluation_passes_run_natively(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Without gradients, a pass over at least as many tokens as the model is wide (an evaluation
    batch), plain or right-padded, fuses Q/K/V and takes the native kernel: the logits of SDPA's
    path to float rounding. Generation (a cache) keeps its own path."""
    torch.manual_seed(0)
    config = ModelConfig.from_name(name, dropout=0.0)
    model = Transformer(config).eval()
    ids = torch.randint(0, config.vocab_size, (4, 40))  # 160 tokens, 64 wide
    mask = torch.ones(4, 40, dtype=torch.long)
    mask[1, 25:] = 0
    calls = counting(monkeypatch)
    with torch.no_grad():
        native = [model(ids).logits, model(ids, attention_mask=mask).logits]
        assert len(calls) == 2 * config.num_layers
        generate(model, ids[:1, :8], max_new_tokens=4)
        assert len(calls) == 2 * config.num_layers
        monkeypatch.setattr(attention_module, "native_causal_attention", lambda *args: False)
        sdpa = [model(ids).logits, model(ids, attention_mask=mask).logits]
    assert len(calls) == 2 * config.num_layers  # none on SDPA's side
    for ours, theirs in zip(native, sdpa, strict=True):
        assert torch.allclose(ours, theirs, atol=1e-5)


def test_cases_the_layer_keeps_on_sdpa(monkeypatch: pytest.MonkeyPatch) -> None:
    """A left-padding mask, attention dropout while training, ALiBi, attention weights asked for,
    SDPA turned off, a short pass without gradients (fewer tokens than the model is wide: Q/K/V
    not fused): the layer's own path, same outputs."""
    torch.manual_seed(0)
    calls = counting(monkeypatch)
    ids = torch.randint(0, 100, (2, 12))
    model = Transformer(ModelConfig.from_name("tiny-decoder", dropout=0.0)).train()
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :3] = 0
    model(ids, attention_mask=mask)
    with torch.no_grad():
        model(ids)
    model(ids)
    assert len(calls) == model.config.num_layers  # only the last, plain call
    calls.clear()
    Transformer(ModelConfig.from_name("tiny-decoder", attn_dropout=0.1)).train()(ids)
    Transformer(ModelConfig.from_name("tiny-decoder", position="alibi")).train()(ids)
    assert not calls
    layer = attention_module.SelfAttention(32, 4, causal=True)
    x = torch.randn(2, 12, 32, requires_grad=True)
    out, weights = layer(x, need_weights=True)
    assert weights.shape == (2, 4, 12, 12) and not calls
    layer.use_sdpa = False
    explicit = layer(x)
    assert not calls
    layer.use_sdpa = True
    native = layer(x)
    assert len(calls) == 1 and torch.allclose(native, explicit, atol=1e-5) and torch.allclose(native, out, atol=1e-5)
