"""Whatever a PEFT run trains comes back exactly: for every method and every form of
``modules_to_save`` (the default, the whole head, a part of the head, a named layer), the
validation metrics finetune reports equal those of the saved run evaluated afresh, metric for
metric — including a head whose frozen part (BERT's pooler) was made for the task."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

import lmforge
from lmforge import ModelConfig, Transformer, peft
from lmforge.files import HEAD_FILE
from lmforge.pipeline.evaluation import evaluate_run
from lmforge.pipeline.finetuning import DataSpec, finetune_run
from lmforge.tokenizers import Tokenizer
from lmforge.training import TrainConfig

WORDS = ["the", "movie", "plot", "was", "very", "and", "it", "a"]
CUES = {"good": "pos", "great": "pos", "bad": "neg", "awful": "neg"}
FORMS = {
    "default": None,  # the task head is added on its own
    "whole head": ["head"],
    "part of the head": ["head.classifier"],  # the pooler stays frozen as built
    "a named layer": ["encoder.layers.1.mlp_norm"],  # plus the head, added on its own
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("reload")
    tokenizer = Tokenizer.train(
        iter([" ".join(WORDS + list(CUES))] * 10), kind="wordpiece", vocab_size=60, show_progress=False
    )
    torch.manual_seed(0)
    config = ModelConfig.from_name("tiny-encoder", vocab_size=tokenizer.vocab_size, pooler=True)
    base = lmforge.save_run(root / "base", model=Transformer(config), tokenizer=tokenizer)
    data = root / "data"
    data.mkdir()
    rng = random.Random(0)
    for split, n in (("train", 64), ("validation", 24)):
        rows = []
        for _ in range(n):
            cue = rng.choice(list(CUES))
            words = rng.sample(WORDS, 3) + [cue]
            rng.shuffle(words)
            rows.append({"text": " ".join(words), "label": CUES[cue]})
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return base, data


def options_for(method: str, form: list[str] | None) -> dict:
    options: dict = {"prefix": {"num_virtual_tokens": 4}, "prompt": {"num_virtual_tokens": 4},
                     "ptuning": {"num_virtual_tokens": 4}}.get(method, {})  # fmt: skip
    if form is not None:
        options["modules_to_save"] = form
    return options


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("method", sorted(peft.METHODS))
def test_the_reported_validation_equals_the_saved_run_evaluated_again(
    setup: tuple[Path, Path], tmp_path: Path, method: str, form: str
) -> None:
    base, data = setup
    out = tmp_path / "run"
    train = TrainConfig(max_steps=8, batch_size=16, lr=1e-2, warmup_steps=1, eval_every=4, progress=False, seed=0)
    result = finetune_run(model=base, data=DataSpec(data), task_name="classification", method=method,
                          peft=options_for(method, FORMS[form]), options={"max_length": 12}, train=train,
                          out=out)  # fmt: skip
    reported = result.summary["validation"]
    _, evaluated = evaluate_run(out, split="validation")
    assert evaluated.metrics["accuracy"] == reported["accuracy"]
    assert evaluated.metrics["loss"] == pytest.approx(reported["loss"], rel=1e-5, abs=1e-6)
    assert (out / HEAD_FILE).is_file()  # the head as built, frozen parts included


def test_the_head_file_is_what_makes_the_frozen_pooler_come_back(setup: tuple[Path, Path], tmp_path: Path) -> None:
    base, data = setup
    out = tmp_path / "run"
    train = TrainConfig(max_steps=8, batch_size=16, lr=1e-2, warmup_steps=1, eval_every=4, progress=False, seed=0)
    result = finetune_run(model=base, data=DataSpec(data), task_name="classification", method="lora",
                          peft={"modules_to_save": ["head.classifier"]}, options={"max_length": 12},
                          train=train, out=out)  # fmt: skip
    trained_pooler = result.model.head.dense.weight.detach().clone()
    torch.testing.assert_close(lmforge.load(out).model.head.dense.weight, trained_pooler, rtol=0, atol=0)
    (out / HEAD_FILE).unlink()  # without it the pooler would be a new random one
    assert not torch.equal(lmforge.load(out).model.head.dense.weight, trained_pooler)


def test_modules_to_save_cannot_name_what_the_method_adapts(setup: tuple[Path, Path]) -> None:
    base, _ = setup
    model = lmforge.load(base).model
    with pytest.raises(lmforge.LMForgeError, match="modules_to_save names 'encoder.layers.1.mlp.down_proj', which the ia3"):
        peft.apply(model, "ia3", modules_to_save=["encoder.layers.1.mlp.down_proj"])
