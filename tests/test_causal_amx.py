"""Causal self-attention in bfloat16 on AMX tiles (native.c section 8, lmforge.kernels.causal):
forward and backward against float64 attention on the same bfloat16 values at every shape it takes
(odd lengths, head widths that are no multiple of 32, GQA and MQA, RoPE), threads, causality,
every gradient element written, lengths past the float32 kernel's low-precision limit, and
autocast training. Skipped where this CPU (or its kernels) has no AMX tiles, with the reason."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from lmforge import ModelConfig, Transformer
from lmforge.kernels import amx_tiles, block_kernels, kernel_problem
from lmforge.kernels.causal import (
    LOW_PRECISION_WORK,
    causal_attention,
    explicit_causal_attention,
    native_causal_attention,
)
from tests.test_causal_kernel import SHAPES as FLOAT32_SHAPES
from tests.test_causal_kernel import angles

pytestmark = pytest.mark.skipif(
    kernel_problem() is not None or not amx_tiles(),
    reason=f"no AMX tiles here ({kernel_problem() or 'CPU without AMX-BF16, or LMFORGE_NO_AMX set'})",
)

# the float32 kernel's shapes (odd lengths, widths with a tail of 8, GQA, MQA) and wider heads
SHAPES = [*FLOAT32_SHAPES, (2, 200, 3, 3, 96), (1, 129, 2, 2, 128)]
TOLERANCE = 0.02  # of the largest reference value: bfloat16 keeps 8 bits (2^-8 = 0.004 a rounding)


def close(ours: torch.Tensor, reference: torch.Tensor) -> bool:
    return (ours.double() - reference).abs().max().item() <= TOLERANCE * reference.abs().max().item()


def against_float64(shape: tuple[int, ...], rope=None, seed: int = 0) -> None:  # noqa: ANN001
    B, T, H, Hkv, D = shape
    torch.manual_seed(seed)
    qkv = torch.randn(B, T, (H + 2 * Hkv) * D).bfloat16()
    dout = torch.randn(B, T, H * D).bfloat16()
    scale = D**-0.5
    assert native_causal_attention(qkv, H, Hkv, D, rope)
    x = qkv.clone().requires_grad_()
    out = causal_attention(x, H, Hkv, D, scale, rope)
    out.backward(dout)
    exact = qkv.double().requires_grad_()
    wide = None if rope is None else tuple(t.double() for t in rope)
    expected = explicit_causal_attention(exact, H, Hkv, D, scale, wide)
    expected.backward(dout.double())
    assert out.dtype is torch.bfloat16 and x.grad.dtype is torch.bfloat16
    assert close(out, expected)
    for ours, theirs in zip(x.grad.split((H * D, Hkv * D, Hkv * D), -1), exact.grad.split((H * D, Hkv * D, Hkv * D), -1), strict=True):
        assert close(ours, theirs)  # dq, dk, dv each


@pytest.mark.parametrize("shape", SHAPES)
def test_matches_float64(shape: tuple[int, ...]) -> None:
    against_float64(shape)


@pytest.mark.parametrize(("shape", "R", "per_sequence"), [((2, 37, 4, 2, 40), 40, False), ((3, 64, 2, 1, 64), 32, True)])
def test_rotary_positions_match_float64(shape: tuple[int, ...], R: int, per_sequence: bool) -> None:
    against_float64(shape, angles(shape[0], shape[1], R, per_sequence=per_sequence))


def test_each_position_sees_only_itself_and_before() -> None:
    torch.manual_seed(0)
    qkv = torch.randn(2, 70, 3 * 2 * 32).bfloat16()
    later = qkv.clone()
    later[:, 40:] = torch.randn_like(later[:, 40:])
    first, second = (causal_attention(x, 2, 2, 32, 0.2) for x in (qkv, later))
    assert torch.equal(first[:, :40], second[:, :40])
    assert not torch.equal(first[:, 40:], second[:, 40:])


def test_threads_give_the_same_values() -> None:
    torch.manual_seed(0)
    qkv = torch.randn(4, 50, (4 + 2 * 2) * 32).bfloat16()
    dout = torch.randn(4, 50, 4 * 32).bfloat16()
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            x = qkv.clone().requires_grad_()
            causal_attention(x, 4, 2, 32, 0.17).backward(dout)
            results.append((causal_attention(qkv, 4, 2, 32, 0.17), x.grad))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


def test_every_gradient_element_is_written() -> None:
    """The kernel writes all of dqkv (here over a buffer of NaN): a key/value head's gradient,
    summed over its query heads, and every query head's, to the last position and dimension."""
    torch.manual_seed(0)
    B, T, H, Hkv, D = 2, 45, 4, 2, 24
    qkv = torch.randn(B, T, (H + 2 * Hkv) * D).bfloat16()
    out = causal_attention(qkv, H, Hkv, D, 0.2)
    lse = torch.empty(B, H, T)
    dout = torch.randn_like(out)
    lib = block_kernels()
    assert lib.causal_attention_forward_bf16(qkv.data_ptr(), B, T, H, Hkv, D, 0.2, None, None, 0, 0, out.data_ptr(), lse.data_ptr(), 1) == 0
    dqkv = torch.full_like(qkv, float("nan"))
    assert lib.causal_attention_backward_bf16(
        qkv.data_ptr(), out.data_ptr(), dout.data_ptr(), lse.data_ptr(), B, T, H, Hkv, D, 0.2, None, None, 0, 0, dqkv.data_ptr(), 1
    ) == 0
    assert not dqkv.isnan().any()
    x = qkv.clone().requires_grad_()
    causal_attention(x, H, Hkv, D, 0.2).backward(dout)
    assert torch.equal(dqkv, x.grad)


def test_lengths_past_the_float32_kernels_limit() -> None:
    """Without tiles a bfloat16 projection longer than LOW_PRECISION_WORK / D keeps PyTorch's
    kernel; with them it runs here."""
    T = LOW_PRECISION_WORK // 64 + 40
    against_float64((1, T, 2, 1, 64), seed=1)


def test_autocast_training_learns() -> None:
    """A decoder trained under bfloat16 autocast with this kernel in every layer: the loss falls
    as it does with the float32 model on PyTorch's attention."""
    torch.manual_seed(0)
    config = ModelConfig.from_name("tiny-decoder", dropout=0.0)
    ids = torch.randint(0, config.vocab_size, (4, 33))
    losses = {}
    for autocast in (True, False):
        torch.manual_seed(1)
        model = Transformer(config)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        history = []
        for _ in range(30):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                logits = model(ids[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            history.append(loss.item())
        losses[autocast] = history
    assert losses[True][-1] < 0.5 * losses[True][0]
    assert losses[True][-1] == pytest.approx(losses[False][-1], rel=0.1)


def test_no_amx_variable_keeps_the_float32_kernels() -> None:
    environment = {**os.environ, "LMFORGE_NO_AMX": "1"}
    done = subprocess.run(
        [sys.executable, "-c", "from lmforge.kernels import amx_tiles; print(amx_tiles())"],
        capture_output=True, text=True, env=environment, timeout=120,
    )  # fmt: skip
    assert done.stdout.strip() == "False", done.stderr
