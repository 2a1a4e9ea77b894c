"""Continual-learning metrics computed by hand on a fixed 3-task accuracy matrix."""

from __future__ import annotations

import pytest

from lmforge.continual.metrics import (
    average_accuracy,
    backward_transfer,
    forgetting,
    forward_transfer,
    summarize,
)

# R[i][j]: accuracy on task j after training task i.
R = [
    [0.90, 0.20, 0.10],
    [0.60, 0.80, 0.30],
    [0.50, 0.70, 0.95],
]
INITIAL = [0.10, 0.15, 0.05]


def test_average_accuracy_is_the_mean_of_the_last_row_and_the_curve_of_the_seen_tasks() -> None:
    assert average_accuracy(R) == pytest.approx((0.50 + 0.70 + 0.95) / 3)
    assert average_accuracy(R, after=0) == pytest.approx(0.90)
    assert average_accuracy(R, after=1) == pytest.approx((0.60 + 0.80) / 2)
    assert summarize(R).curve == pytest.approx([0.90, 0.70, 2.15 / 3])


def test_backward_transfer_by_hand() -> None:
    # task 0: 0.50 - 0.90 = -0.40; task 1: 0.70 - 0.80 = -0.10 -> mean -0.25
    assert backward_transfer(R) == pytest.approx(-0.25)


def test_forward_transfer_by_hand() -> None:
    # task 1: R[0][1] - b1 = 0.20 - 0.15 = 0.05; task 2: R[1][2] - b2 = 0.30 - 0.05 = 0.25 -> 0.15
    assert forward_transfer(R, INITIAL) == pytest.approx(0.15)
    assert forward_transfer(R, None) is None


def test_forgetting_uses_the_best_earlier_accuracy() -> None:
    # task 0: max(0.90, 0.60) - 0.50 = 0.40; task 1: max(0.20, 0.80) - 0.70 = 0.10 -> 0.25
    assert forgetting(R) == pytest.approx(0.25)
    improving = [[0.5, 0.0], [0.9, 0.8]]  # task 0 got better: negative forgetting, positive BWT
    assert forgetting(improving) == pytest.approx(-0.4)
    assert backward_transfer(improving) == pytest.approx(0.4)


def test_one_task_has_no_transfer_and_a_bad_matrix_is_refused() -> None:
    summary = summarize([[0.7]], [0.1])
    assert summary.average_accuracy == pytest.approx(0.7)
    assert summary.bwt is None and summary.fwt is None and summary.forgetting is None
    with pytest.raises(ValueError, match="square"):
        summarize([[0.1, 0.2]])
    with pytest.raises(ValueError, match="3 initial accuracies for 2 tasks"):
        forward_transfer([[1, 0], [0, 1]], [0, 0, 0])
