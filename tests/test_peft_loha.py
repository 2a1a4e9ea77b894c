"""LoHa beyond the contract matrix: the update's formula, its training-time dropouts, its options."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lmforge import ModelConfig, Transformer, peft
from lmforge.errors import LMForgeError
from lmforge.peft.loha import LoHaConfig, LoHaLinear


def layer(**options: float) -> tuple[nn.Linear, LoHaLinear]:
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    adapter = LoHaLinear(base, LoHaConfig(r=2, alpha=3.0, **options))
    with torch.no_grad():
        adapter.hada_w2_b.normal_()  # leave the no-op start
    return base, adapter


def test_the_update_is_a_scaled_hadamard_product_of_two_low_rank_matrices() -> None:
    base, adapter = layer()
    x = torch.randn(4, 6)
    w1 = adapter.hada_w1_a @ adapter.hada_w1_b
    w2 = adapter.hada_w2_a @ adapter.hada_w2_b
    expected = base(x) + x @ (1.5 * w1 * w2).T  # alpha / r = 3 / 2
    torch.testing.assert_close(adapter(base, x), expected)
    assert torch.linalg.matrix_rank(adapter.delta_weight()) > 2  # beyond rank r


def test_rank_dropout_drops_output_rows_in_training_only() -> None:
    base, adapter = layer(rank_dropout=0.5)
    x = torch.randn(3, 6)
    full = adapter.eval()(base, x) - base(x)  # eval mode: no dropout
    torch.testing.assert_close(full, x @ adapter.delta_weight().T)
    adapter.train()
    torch.manual_seed(1)
    dropped = adapter(base, x) - base(x)
    kept = ~torch.isclose(dropped, torch.zeros_like(dropped)).all(dim=0)  # (out,)
    assert 0 < int(kept.sum()) < 5
    scale = 5 / int(kept.sum())  # kept rows rescaled by the inverse of the kept share
    torch.testing.assert_close(dropped[:, kept], full[:, kept] * scale)


def test_module_dropout_skips_the_whole_update_in_training_only() -> None:
    base, adapter = layer(module_dropout=0.5)
    x = torch.randn(3, 6)
    adapter.train()
    torch.manual_seed(2)
    outs = [adapter(base, x) for _ in range(20)]
    skipped = [torch.equal(out, base(x)) for out in outs]
    assert any(skipped) and not all(skipped)
    adapter.eval()
    assert not torch.equal(adapter(base, x), base(x))


def test_bad_options_are_named() -> None:
    model = Transformer(ModelConfig.from_name("tiny-decoder"))
    with pytest.raises(LMForgeError, match="r = 0: the rank must be at least 1"):
        peft.apply(model, "loha", r=0)
    with pytest.raises(LMForgeError, match="rank_dropout = 1.0: must be in"):
        peft.apply(model, "loha", rank_dropout=1.0)
    with pytest.raises(LMForgeError, match="LoHa adapts nn.Linear layers, not Embedding"):
        LoHaLinear(nn.Embedding(4, 6), LoHaConfig())
