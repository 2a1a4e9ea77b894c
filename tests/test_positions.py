"""Position modules: the properties that define them."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.model.positions import (
    ALiBi,
    RelativePositionBias,
    RotaryEmbedding,
    SinusoidalPositions,
    alibi_slopes,
    apply_rotary,
    relative_position_bucket,
)


def rotate(x: torch.Tensor, position: int, rope: RotaryEmbedding) -> torch.Tensor:
    cos, sin = rope(torch.tensor([position]))
    return apply_rotary(x.view(1, 1, 1, -1), cos, sin).flatten()


def test_rope_scores_depend_only_on_the_relative_offset() -> None:
    rope = RotaryEmbedding(16)
    q, k = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    rope = rope.double()
    for m, n in [(0, 0), (5, 2), (2, 5), (40, 7)]:
        base = rotate(q, m, rope) @ rotate(k, n, rope)
        for shift in (1, 13, 100):
            shifted = rotate(q, m + shift, rope) @ rotate(k, n + shift, rope)
            torch.testing.assert_close(shifted, base, atol=1e-9, rtol=1e-9)
    # and they do depend on the offset
    assert not torch.allclose(
        rotate(q, 3, rope) @ rotate(k, 0, rope), rotate(q, 4, rope) @ rotate(k, 0, rope)
    )


def test_rope_is_a_rotation_by_position_times_frequency() -> None:
    """As complex numbers, pair j = (x_j, x_{j+D/2}) is multiplied by e^{i·m·θ^(-2j/D)}."""
    D, m = 8, 7
    rope = RotaryEmbedding(D, base=10000.0)
    x = torch.randn(D)
    rotated = rotate(x, m, rope)
    pairs = torch.complex(x[: D // 2], x[D // 2 :])
    angles = m * 10000.0 ** (-torch.arange(0, D, 2).float() / D)
    expected = pairs * torch.polar(torch.ones(D // 2), angles)
    torch.testing.assert_close(rotated, torch.cat((expected.real, expected.imag)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rotated.norm(), x.norm())  # rotations keep length


def test_partial_rotary_leaves_the_tail_untouched() -> None:
    rope = RotaryEmbedding(8, rotary_dim=4)
    x = torch.randn(1, 1, 1, 8)
    cos, sin = rope(torch.tensor([5]))
    out = apply_rotary(x, cos, sin)
    torch.testing.assert_close(out[..., 4:], x[..., 4:])
    assert not torch.allclose(out[..., :4], x[..., :4])


def test_alibi_slopes_follow_the_paper() -> None:
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    # 6 heads: the 4 slopes of 4 heads, then every other slope of 8 heads
    expected = [2 ** (-2 * (i + 1)) for i in range(4)] + [2.0**-1, 2.0**-3]
    torch.testing.assert_close(alibi_slopes(6), torch.tensor(expected))


def test_alibi_bias_is_linear_in_distance() -> None:
    bias = ALiBi(4)(torch.arange(5), torch.arange(5))[0]  # (H, T, S)
    slopes = alibi_slopes(4)
    for h in range(4):
        for i in range(5):
            for j in range(5):
                assert math.isclose(bias[h, i, j].item(), -slopes[h].item() * abs(i - j), rel_tol=1e-6)


def test_relative_buckets_exact_when_close_log_spaced_when_far() -> None:
    offsets = torch.arange(-200, 201)
    buckets = relative_position_bucket(offsets, bidirectional=True, num_buckets=32, max_distance=128)
    assert buckets.min() >= 0 and buckets.max() <= 31
    # small distances each get a bucket of their own, on each side
    assert [int(buckets[200 + d]) for d in range(8)] == [0, 17, 18, 19, 20, 21, 22, 23]
    assert [int(buckets[200 - d]) for d in range(1, 8)] == list(range(1, 8))
    # far distances saturate at the last bucket of their side
    assert buckets[0] == 15 and buckets[-1] == 31
    causal = relative_position_bucket(offsets, bidirectional=False, num_buckets=32, max_distance=128)
    assert (causal[201:] == 0).all()  # a decoder never looks ahead: all future offsets share bucket 0
    assert torch.all(causal[:200].flip(0).diff() >= 0)  # monotone in distance


def test_relative_bias_depends_only_on_the_offset() -> None:
    bias = RelativePositionBias(3, bidirectional=True)(torch.arange(6), torch.arange(6))[0]
    for shift in range(1, 4):
        torch.testing.assert_close(bias[:, shift:, shift:], bias[:, :-shift, :-shift])


@pytest.mark.parametrize("dim", [8, 9])
def test_sinusoidal_table(dim: int) -> None:
    table = SinusoidalPositions(50, dim)(torch.arange(50))
    assert table.shape == (50, dim)
    p, i = 13, 2
    assert math.isclose(table[p, 2 * i].item(), math.sin(p / 10000 ** (2 * i / dim)), rel_tol=1e-5)
    assert math.isclose(table[p, 2 * i + 1].item(), math.cos(p / 10000 ** (2 * i / dim)), rel_tol=1e-5)
