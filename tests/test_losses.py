"""The chunked LM-head cross-entropy equals the unfused one: loss and both gradients, with
ignored rows, any chunk size, under no_grad, and under bf16 autocast within bf16's precision."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmforge.model.losses import chunked_lm_cross_entropy


def unfused(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = (hidden @ weight.t()).float()
    return F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("chunk_rows", [1, 5, 64])
def test_loss_and_gradients_equal_the_unfused_path(chunk_rows: int) -> None:
    torch.manual_seed(0)
    hidden = torch.randn(3, 7, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    labels = torch.randint(0, 50, (3, 7))
    labels[0, :3] = -100  # prompt positions, padding: not predicted
    expected = unfused(hidden, weight, labels)
    expected.backward(torch.tensor(0.5))
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    loss = chunked_lm_cross_entropy(hidden, weight, labels, chunk_rows=chunk_rows)
    loss.backward(torch.tensor(0.5))
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(hidden.grad, grads[0])
    torch.testing.assert_close(weight.grad, grads[1])
    assert float(hidden.grad[0, :3].abs().sum()) == 0.0


def test_no_grad_computes_the_loss_only() -> None:
    hidden, weight, labels = torch.randn(4, 8), torch.randn(20, 8), torch.randint(0, 20, (4,))
    with torch.no_grad():
        loss = chunked_lm_cross_entropy(hidden, weight, labels, chunk_rows=3)
    torch.testing.assert_close(loss, unfused(hidden, weight, labels))
    with pytest.raises(ValueError, match="chunk_rows 0"):
        chunked_lm_cross_entropy(hidden, weight, labels, chunk_rows=0)


def test_bf16_autocast_runs_the_products_in_bf16() -> None:
    torch.manual_seed(0)
    hidden = torch.randn(6, 32, requires_grad=True)
    weight = (torch.randn(40, 32) * 0.2).requires_grad_()
    labels = torch.randint(0, 40, (6,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = unfused(hidden, weight, labels)
        loss = chunked_lm_cross_entropy(hidden, weight, labels, chunk_rows=4)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=2e-2, atol=2e-2)
    loss.backward()
    assert hidden.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32
