"""The pipeline layer without the command line: each function takes objects or folders, returns
its result, prints nothing, and works in memory (no folder) where that makes sense."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from tiny_runs import tiny_base

import lmforge
from lmforge import LMForgeError, ModelConfig, Transformer, peft
from lmforge.pipeline.evaluation import evaluate_run, load_task_run, predict
from lmforge.pipeline.export import merge_adapter_run
from lmforge.pipeline.finetuning import (
    Base,
    DataSpec,
    TaskData,
    build_task,
    examples_of,
    finetune,
    finetune_run,
)
from lmforge.pipeline.generation import Sampling, generate_text, prompt_ids, room
from lmforge.pipeline.pretraining import DataSection, ModelSection, TokenizerSection, pretrain
from lmforge.pipeline.tokenizer import train_tokenizer
from lmforge.tokenizers import Tokenizer
from lmforge.training import TrainConfig

WORDS = ["the", "movie", "plot", "was", "very", "and", "it", "a"]
CUES = {"good": "pos", "great": "pos", "bad": "neg", "awful": "neg"}


def records(n: int, seed: int, cues: dict[str, str] = CUES) -> list[dict[str, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        cue = rng.choice(list(cues))
        words = rng.sample(WORDS, 3) + [cue]
        rng.shuffle(words)
        out.append({"text": " ".join(words), "label": cues[cue]})
    return out


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    text = " ".join(WORDS + list(CUES) + ["fine", "poor", "topic", "sport", "music"])
    return Tokenizer.train(iter([text] * 10), kind="wordpiece", vocab_size=80, show_progress=False)


def fast(**changes: object) -> TrainConfig:
    values = dict(max_steps=40, batch_size=16, lr=3e-3, warmup_steps=4, eval_every=20, progress=False, seed=0)
    return TrainConfig(**{**values, **changes})


def test_finetune_in_memory_writes_nothing_and_a_second_task_trains_the_same_model(
    tokenizer: Tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny-encoder", vocab_size=tokenizer.vocab_size))
    base = Base(model, tokenizer)
    task = build_task("classification", base, options={"max_length": 16})
    data = TaskData(examples_of(task, records(128, 0), training=True), examples_of(task, records(32, 1)))
    lines: list[str] = []
    first = finetune(base, task, data, train=fast(), out=None, log=lines.append)
    assert first.summary["validation"]["accuracy"] >= 0.9 and first.summary["model"] == "(in memory)"
    assert list(tmp_path.iterdir()) == []  # no folder, no checkpoint, nothing
    assert any("trainable parameters" in line for line in lines)

    # The next task of a sequence starts from the model the first one returned.
    second_cues = {"fine": "pos", "poor": "neg"}
    base2 = Base(first.model, tokenizer)
    task2 = build_task("classification", base2, options={"max_length": 16})
    data2 = TaskData(
        examples_of(task2, records(128, 2, second_cues), training=True), examples_of(task2, records(32, 3, second_cues))
    )
    backbone_before = first.model.encoder.layers[0].mlp.up_proj.weight.detach().clone()
    lora = {"r": 8, "target_modules": "all-linear"}
    second = finetune(base2, task2, data2, method="lora", peft=lora, train=fast(lr=1e-2, max_steps=60), out=None)
    assert second.summary["validation"]["accuracy"] >= 0.9
    frozen = peft.base.unwrap(second.model.encoder.layers[0].mlp.up_proj).weight
    torch.testing.assert_close(frozen, backbone_before, rtol=0, atol=0)  # LoRA left the backbone alone


def test_examples_of_names_the_record_it_cannot_use(tokenizer: Tokenizer) -> None:
    task = build_task("classification", Base(Transformer(ModelConfig.from_name("tiny-encoder", vocab_size=80)), tokenizer))
    with pytest.raises(LMForgeError, match="<memory> record 2: missing field 'text'"):
        examples_of(task, [{"text": "a", "label": "pos"}, {"label": "neg"}], training=True)


def test_finetune_evaluate_predict_and_merge_from_folders(tokenizer: Tokenizer, tmp_path: Path) -> None:
    base = tiny_base(tmp_path / "base", "tiny-encoder", tokenizer)
    data = tmp_path / "data"
    data.mkdir()
    for split, (n, seed) in {"train": (128, 0), "validation": (32, 1), "test": (32, 2)}.items():
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records(n, seed)))
    result = finetune_run(model=base, data=DataSpec(data), task_name="classification", method="lora",
                          peft={"r": 8, "target_modules": "all-linear"}, options={"max_length": 16},
                          train=fast(lr=1e-2, max_steps=60), out=tmp_path / "run")  # fmt: skip
    task, evaluated = evaluate_run(tmp_path / "run", split="validation")
    assert evaluated.metrics["accuracy"] == pytest.approx(result.summary["validation"]["accuracy"])
    loaded = load_task_run(tmp_path / "run")
    predictions = predict(loaded, [{"text": "the movie was great"}, {"text": "awful plot"}])
    assert [p["prediction"] for p in predictions] == ["pos", "neg"]
    with pytest.raises(LMForgeError, match="input record 1: missing field 'text'"):
        predict(loaded, [{"review": "no text field"}])
    merged = merge_adapter_run(tmp_path / "run", tmp_path / "merged")
    assert merged.method == "lora" and merged.max_difference is not None and merged.max_difference < 1e-4
    plain = lmforge.load(tmp_path / "merged")
    assert peft.active_adapter(plain.model) is None


def test_pretrain_and_generate_return_results(tmp_path: Path) -> None:
    text = tmp_path / "text.txt"
    text.write_text("the cat sat on the mat. " * 300, encoding="utf-8")
    lines: list[str] = []
    result = pretrain(
        model=ModelSection(preset="tiny-decoder"),
        tokenizer=TokenizerSection(kind="char", vocab_size=64),
        data=DataSection(path=text, seq_len=32),
        train=TrainConfig(max_steps=30, batch_size=8, lr=3e-3, warmup_steps=3, eval_every=15, progress=False),
        out=tmp_path / "run",
        log=lines.append,
    )
    assert result.state.step == 30 and result.last_eval["eval_loss"] < 2.5
    assert lines and "objective causal_lm" in lines[0]
    out = generate_text(result.model.eval(), result.tokenizer, "the cat", Sampling(max_new_tokens=12))
    assert len(out.new_ids) == 12 and out.prompt_ids == result.tokenizer.encode("the cat")
    assert out.text == result.tokenizer.decode(out.new_ids) and not out.limited_by_context
    config = result.model.config
    assert room(config, config.max_seq_len - 5, 100) == 5  # a position table limits what fits
    assert prompt_ids(result.tokenizer, "", arch="decoder") == [result.tokenizer.eos_id]


def test_train_tokenizer_measures_what_it_wrote(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("hello world, hello tokens\n" * 50, encoding="utf-8")
    report = train_tokenizer([corpus], tmp_path / "tok", kind="bpe", vocab_size=300, progress=False)
    assert report.path == tmp_path / "tok" / "tokenizer.json" and report.path.is_file()
    assert report.num_bytes == corpus.stat().st_size and 0 < report.tokens_per_byte < 1
