"""`lmforge merge` (a PEFT run → a plain run with the same outputs, a clear error where the math
does not allow it) and `lmforge convert --to hf-peft` on real fine-tuning runs at tiny size."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import lmforge
from lmforge import peft
from lmforge.cli import main
from tests.test_tasks_classification import base_run, fast, run, write_sentiment


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("peft-runs")
    base = base_run(tmp, "tiny-llama", kind="bpe")
    data = write_sentiment(tmp / "data", n_train=64, n_val=16)
    out = {}
    for method, options in (
        ("lora", {"r": 4, "target_modules": "all-linear"}),
        ("adapter", {"bottleneck": 8}),
    ):
        out[method] = (
            run(
                tmp / method, base, data, method=method, peft=options, train=fast(max_steps=6, eval_every=0)
            ).summary
            and tmp / method / f"run-{method}"
        )
    out["base"] = base
    return out


def probe(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(ids, attention_mask=torch.ones_like(ids, dtype=torch.bool)).logits


def test_merge_writes_a_plain_run_with_the_same_outputs(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    adapted = lmforge.load(runs["lora"]).model
    assert peft.active_adapter(adapted) == "default"
    assert main(["merge", str(runs["lora"]), str(tmp_path / "merged")]) == 0
    assert "merged the lora adapter" in capsys.readouterr().out
    merged = lmforge.load(tmp_path / "merged")
    assert peft.active_adapter(merged.model) is None
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert not (tmp_path / "merged" / "adapter.safetensors").exists()
    torch.testing.assert_close(probe(merged.model), probe(adapted), atol=1e-5, rtol=1e-4)
    assert merged.config["merged_from"]["method"] == "lora"


def test_merge_refuses_adapters_it_cannot_fold(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["merge", str(runs["adapter"]), str(tmp_path / "merged")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot merge" in err and "nonlinearity" in err
    assert not (tmp_path / "merged").exists()
    assert main(["merge", str(runs["base"]), str(tmp_path / "m2")]) == 2
    assert "no adapter to merge" in capsys.readouterr().err


def test_convert_hf_peft_loads_in_peft(runs: dict[str, Path], tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers", reason="transformers is a test extra")
    hf_peft = pytest.importorskip("peft", reason="peft is a test extra")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    assert main(["convert", "--to", "hf", str(runs["lora"]), str(tmp_path / "plain")]) == 2  # adapter run
    assert main(["convert", "--to", "hf-peft", str(runs["lora"]), str(tmp_path / "out")]) == 0
    base = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "out" / "base")
    reference = hf_peft.PeftModel.from_pretrained(base, tmp_path / "out" / "adapter").eval()
    ours = lmforge.load(runs["lora"]).model
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = reference(input_ids=ids).logits
    torch.testing.assert_close(probe(ours), theirs, atol=1e-5, rtol=1e-4)
