"""Continual-learning metrics on the accuracy matrix (Lopez-Paz & Ranzato 2017, GEM; Chaudhry et
al. 2018 for forgetting).

    R[i][j]  accuracy on task j's test split after training tasks 0..i (T × T)
    b[j]     accuracy on task j of the model before any training (for forward transfer)

    average accuracy  A   = 1/T Σ_j R[T-1][j]
    backward transfer BWT = 1/(T-1) Σ_{j<T-1} (R[T-1][j] − R[j][j])      (< 0: forgetting)
    forward transfer  FWT = 1/(T-1) Σ_{j>0} (R[j-1][j] − b[j])          (> 0: earlier tasks help)
    forgetting        F   = 1/(T-1) Σ_{j<T-1} max_{l<T-1} (R[l][j] − R[T-1][j])

With a single task BWT, FWT and forgetting are undefined (None); FWT needs ``b``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Matrix = Sequence[Sequence[float]]


def as_matrix(accuracy: Matrix) -> np.ndarray:
    """``accuracy`` as a square float array.

    Raises:
        ValueError: not square, or empty.
    """
    matrix = np.asarray(accuracy, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
        raise ValueError(f"the accuracy matrix must be square and non-empty, got shape {matrix.shape}")
    return matrix


def average_accuracy(accuracy: Matrix, *, after: int | None = None) -> float:
    """Mean accuracy over the tasks seen so far after training task ``after`` (default: the last)."""
    matrix = as_matrix(accuracy)
    i = matrix.shape[0] - 1 if after is None else after
    return float(matrix[i, : i + 1].mean())


def backward_transfer(accuracy: Matrix) -> float | None:
    """BWT: how much training later tasks changed the accuracy on earlier ones (negative: forgot)."""
    matrix = as_matrix(accuracy)
    tasks = matrix.shape[0]
    if tasks < 2:
        return None
    return float(np.mean([matrix[-1, j] - matrix[j, j] for j in range(tasks - 1)]))


def forward_transfer(accuracy: Matrix, initial: Sequence[float] | None) -> float | None:
    """FWT: accuracy on each task just before training it, above the untrained model's."""
    matrix = as_matrix(accuracy)
    tasks = matrix.shape[0]
    if tasks < 2 or initial is None:
        return None
    if len(initial) != tasks:
        raise ValueError(f"{len(initial)} initial accuracies for {tasks} tasks")
    return float(np.mean([matrix[j - 1, j] - initial[j] for j in range(1, tasks)]))


def forgetting(accuracy: Matrix) -> float | None:
    """Average forgetting: for each earlier task, its best accuracy before the last task minus its
    final accuracy."""
    matrix = as_matrix(accuracy)
    tasks = matrix.shape[0]
    if tasks < 2:
        return None
    return float(np.mean([matrix[: tasks - 1, j].max() - matrix[-1, j] for j in range(tasks - 1)]))


@dataclass
class Summary:
    """All the metrics of one sequence's accuracy matrix."""

    average_accuracy: float
    bwt: float | None
    fwt: float | None
    forgetting: float | None
    curve: list[float]  # average accuracy over the tasks seen so far, after each task

    def to_dict(self) -> dict[str, float | None | list[float]]:
        return {
            "average_accuracy": self.average_accuracy,
            "bwt": self.bwt,
            "fwt": self.fwt,
            "forgetting": self.forgetting,
            "curve": self.curve,
        }


def summarize(accuracy: Matrix, initial: Sequence[float] | None = None) -> Summary:
    """Average accuracy, BWT, FWT (with ``initial``), forgetting and the average-accuracy curve."""
    matrix = as_matrix(accuracy)
    return Summary(
        average_accuracy=average_accuracy(matrix),
        bwt=backward_transfer(matrix),
        fwt=forward_transfer(matrix, initial),
        forgetting=forgetting(matrix),
        curve=[average_accuracy(matrix, after=i) for i in range(matrix.shape[0])],
    )
