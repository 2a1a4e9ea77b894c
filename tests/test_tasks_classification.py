"""Sequence classification end to end at tiny size: encoder (first-token pooling) and decoder
(last-token pooling), text pairs, out-of-scope metrics, and the task head saved and restored with
an adapter (finetune with LoRA → lmforge.load → the same predictions)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import yaml
from tiny_runs import tiny_base

import lmforge
from lmforge import ModelConfig, Transformer
from lmforge.pipeline.finetuning import DataSpec, finetune_run
from lmforge.tasks import ClassificationOptions, ClassificationTask, Columns, TaskOptions
from lmforge.tasks.data import Row
from lmforge.tokenizers import Tokenizer
from lmforge.training import TrainConfig

WORDS = [
    "the",
    "a",
    "movie",
    "film",
    "plot",
    "story",
    "actor",
    "scene",
    "was",
    "is",
    "very",
    "quite",
    "rather",
    "and",
    "but",
    "it",
    "this",
]
CUES = {"good": "pos", "great": "pos", "fine": "pos", "bad": "neg", "awful": "neg", "dull": "neg"}


def sentence(rng: random.Random, cue: str) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(3, 8))]
    words.insert(rng.randint(0, len(words)), cue)
    return " ".join(words)


def write_sentiment(folder: Path, *, n_train: int = 240, n_val: int = 60, seed: int = 0) -> Path:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("validation", n_val)):
        rows = []
        for _ in range(n):
            cue = rng.choice(list(CUES))
            rows.append({"review": sentence(rng, cue), "stars": CUES[cue]})
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return folder


def base_run(tmp_path: Path, preset: str, *, kind: str = "wordpiece") -> Path:
    texts = [" ".join(WORDS + list(CUES))] * 20 + ["extra words for the tokenizer sentences"]
    tokenizer = Tokenizer.train(
        iter(texts), kind=kind, vocab_size=300 if kind == "bpe" else 120, show_progress=False
    )
    return tiny_base(tmp_path / f"base-{preset}", preset, tokenizer)


def fast(**changes: object) -> TrainConfig:
    values = dict(max_steps=45, batch_size=16, lr=3e-3, warmup_steps=5, eval_every=15, progress=False, seed=0)
    values.update(changes)
    return TrainConfig(**values)


def run(
    tmp_path: Path, base: Path, data: Path, *, method: str = "full", peft: dict | None = None, **kw: object
):
    return finetune_run(
        model=str(base),
        data=DataSpec(data, columns={"text": "review", "label": "stars"}),
        task_name="classification",
        method=method,
        peft=peft,
        options=ClassificationOptions(max_length=24, **kw.pop("options", {})),
        train=kw.pop("train", fast()),
        epochs=None,
        out=tmp_path / f"run-{method}",
    )


@pytest.mark.parametrize("preset", ["tiny-encoder", "tiny-decoder"])
def test_classifier_learns_with_the_pooling_that_fits(tmp_path: Path, preset: str) -> None:
    data = write_sentiment(tmp_path / "data")
    result = run(tmp_path, base_run(tmp_path, preset), data)
    config = result.model.config
    assert config.head == "classification" and config.num_labels == 2
    assert config.pooling == ("cls" if preset == "tiny-encoder" else "last")
    assert result.task.labels == ["neg", "pos"]  # inferred from the training rows, sorted
    assert result.summary["validation"]["accuracy"] >= 0.9, result.summary
    saved = yaml.safe_load((tmp_path / "run-full" / "config.yaml").read_text())
    assert saved["task_state"]["labels"] == ["neg", "pos"] and saved["data"]["columns"]["text"] == "review"
    loaded = lmforge.load(tmp_path / "run-full")  # full fine-tuning: model.safetensors with the head
    features = result.task.encode(
        result.task.examples([Row({"review": "it was good", "stars": "pos"}, data, 1)])[0]
    )
    torch.testing.assert_close(
        result.task.logits(loaded.model, features, batch_size=4),
        result.task.logits(result.model, features, batch_size=4),
    )


def test_lora_run_keeps_the_head_with_the_adapter_and_reloads_identically(tmp_path: Path) -> None:
    data = write_sentiment(tmp_path / "data")
    base = base_run(tmp_path, "tiny-encoder")
    result = run(
        tmp_path,
        base,
        data,
        method="lora",
        peft={"r": 4, "target_modules": "all-linear"},
        train=fast(lr=1e-2, max_steps=100, eval_every=25),
        options={"pooling": "mean"},  # the cue word reaches the head directly from a random backbone
    )
    out = tmp_path / "run-lora"
    names = {p.name for p in out.iterdir()}
    assert {"adapter.safetensors", "adapter_config.json", "tokenizer.json", "config.yaml"} <= names
    assert "model.safetensors" not in names  # the base is not copied
    from safetensors.torch import load_file

    saved = load_file(str(out / "adapter.safetensors"))
    assert any(key.startswith("head.") for key in saved)  # the task head travels with the adapter
    assert result.summary["trainable_percent"] < 50 and result.summary["validation"]["accuracy"] >= 0.85

    loaded = lmforge.load(out)
    assert yaml.safe_load((out / "config.yaml").read_text())["base_model"] == str(base.resolve())
    task = result.task
    examples = task.examples(
        [
            Row({"review": sentence(random.Random(i), c), "stars": CUES[c]}, data, i)
            for i, c in enumerate(CUES)
        ]
    )[0]
    features = task.encode(examples)
    torch.testing.assert_close(
        task.logits(loaded.model, features, batch_size=8), task.logits(result.model, features, batch_size=8)
    )
    # without the adapter, the base model's fresh head gives other outputs
    from lmforge.peft import disable_adapters

    with disable_adapters(loaded.model):
        assert not torch.allclose(
            task.logits(loaded.model, features, batch_size=8),
            task.logits(result.model, features, batch_size=8),
        )


def test_best_checkpoint_by_validation_accuracy_is_kept(tmp_path: Path) -> None:
    data = write_sentiment(tmp_path / "data")
    # a learning rate that wrecks training after a while: the best evaluation is an early one
    result = run(
        tmp_path,
        base_run(tmp_path, "tiny-encoder"),
        data,
        train=fast(lr=3e-3, max_steps=60, schedule="constant"),
    )
    summary = result.summary
    history = json.loads((tmp_path / "run-full" / "finetune.json").read_text())
    assert summary["kept"] == "best" and history["best_step"] == summary["best_step"]
    evals = [json.loads(line) for line in (tmp_path / "run-full" / "metrics.jsonl").read_text().splitlines()]
    accuracies = {e["step"]: e["eval_accuracy"] for e in evals if "eval_accuracy" in e}
    assert max(accuracies.values()) == summary["validation"]["accuracy"]
    assert accuracies[summary["best_step"]] == max(accuracies.values())
    rerun = result.task.evaluate(
        result.model,
        result.task.examples(
            [
                Row(json.loads(line), data / "validation.jsonl", i)
                for i, line in enumerate((data / "validation.jsonl").read_text().splitlines(), 1)
            ]
        )[0],
    )
    assert rerun.metrics["accuracy"] == pytest.approx(summary["validation"]["accuracy"])


def test_text_pairs_use_token_types_and_out_of_scope_metrics() -> None:
    texts = ["is this about money", "yes it is", "no", "book a table", "cancel it"]
    tokenizer = Tokenizer.train(iter(texts * 5), kind="wordpiece", vocab_size=80, show_progress=False)
    task = ClassificationTask(
        ClassificationOptions(max_length=16, oos_label="oos"), tokenizer, Columns({"text_pair": "answer"})
    )
    task.set_labels(["book", "cancel", "oos"], "test")
    rows = [
        Row({"text": "is this about money", "answer": "yes it is", "label": "oos"}, Path("d.jsonl"), 1),
        Row({"text": "book a table", "label": 0}, Path("d.jsonl"), 2),
    ]
    examples, bad = task.examples(rows)
    assert not bad
    features = task.encode(examples)
    assert features[0]["token_type_ids"][-1] == 1 and "token_type_ids" not in features[1]
    batch = task.collate(features)
    assert batch["token_type_ids"].shape == batch["input_ids"].shape and batch["labels"].tolist() == [2, 0]
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig.from_name(
            "tiny-encoder", vocab_size=tokenizer.vocab_size, head="classification", num_labels=3
        )
    )
    result = task.evaluate(model.eval(), examples)
    assert {"in_scope_accuracy", "oos_recall", "oos_precision", "mcc", "macro_f1"} <= set(result.metrics)
    assert result.predictions[0]["label"] == "oos" and result.predictions[0]["prediction"] in task.labels
    with pytest.raises(lmforge.LMForgeError, match="out-of-scope label 'OOS' is not in the label set"):
        ClassificationTask(ClassificationOptions(oos_label="OOS"), tokenizer).set_labels(["a", "oos"], "test")


def test_task_evaluation_keeps_and_restores_the_best_weights() -> None:
    from types import SimpleNamespace

    from lmforge.tasks import EvalResult, Task, TaskEvaluation

    class Scripted(Task):  # validation accuracy read from the weight itself
        main_metric = "accuracy"

        def evaluate(self, model, examples, *, batch_size=32, final=True):  # noqa: ANN001, ANN201
            return EvalResult({"accuracy": float(model.weight.detach().sum())})

    model = torch.nn.Linear(1, 1, bias=False)
    callback = TaskEvaluation(Scripted(TaskOptions(), None), [1, 2, 3], batch_size=4)
    trainer = SimpleNamespace(model=model, state=SimpleNamespace(step=0))
    for step, value in enumerate([0.5, 0.9, 0.7], 1):
        with torch.no_grad():
            model.weight.fill_(value)
        trainer.state.step = step
        metrics: dict[str, float] = {}
        callback.on_evaluate(trainer, metrics)
        assert metrics["eval_accuracy"] == pytest.approx(value)
    assert callback.best_step == 2 and callback.restore_best(model)
    assert float(model.weight.detach()) == pytest.approx(0.9)
    assert not TaskEvaluation(Scripted(TaskOptions(), None), [1], batch_size=4, keep_best=False).restore_best(
        model
    )


def test_base_model_gets_the_task_head_and_a_dropout_override(tmp_path: Path) -> None:
    from lmforge.pipeline.finetuning import build_task, fit_head, load_base

    tokenizer = Tokenizer.train(
        iter([" ".join(WORDS)] * 5), kind="wordpiece", vocab_size=60, show_progress=False
    )
    torch.manual_seed(0)
    pretrained = Transformer(
        ModelConfig.from_name("tiny-encoder", vocab_size=tokenizer.vocab_size, dropout=0.1)
    )
    base = lmforge.save_run(tmp_path / "base", model=pretrained, tokenizer=tokenizer)
    loaded = load_base(base)
    task = build_task("classification", loaded, options={"dropout": 0.0, "pooling": "mean"})
    task.set_labels(["a", "b", "c"], "test")
    model = fit_head(loaded, task)
    config = model.config
    assert (config.head, config.num_labels, config.pooling) == ("classification", 3, "mean")
    assert (
        config.dropout == 0.0 and config.attn_dropout == 0.0 and task.options.max_length == 64
    )  # the context
    backbone = {k: v for k, v in pretrained.state_dict().items() if not k.startswith("head.")}
    for key, value in backbone.items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)
    assert not any(k.startswith("head.dense") for k in model.state_dict())  # the MLM head is gone


@pytest.mark.parametrize(
    ("method", "peft"),
    [
        ("lora", {"r": 2}),
        ("adalora", {"init_r": 4, "target_r": 2, "tinit": 2, "tfinal": 2}),
        ("adapter", {"style": "pfeiffer", "bottleneck": 4}),
        ("prefix", {"num_virtual_tokens": 3}),
        ("prompt", {"num_virtual_tokens": 3}),
        ("ptuning", {"num_virtual_tokens": 3}),
        ("ia3", {}),
        ("bitfit", {}),
    ],
)
def test_every_peft_method_finetunes_and_reloads_with_its_head(
    tmp_path: Path, method: str, peft: dict
) -> None:
    data = write_sentiment(tmp_path / "data", n_train=64, n_val=16)
    result = run(
        tmp_path,
        base_run(tmp_path, "tiny-encoder"),
        data,
        method=method,
        peft=peft,
        train=fast(max_steps=8, eval_every=4),
    )
    out = tmp_path / f"run-{method}"
    assert (out / "adapter.safetensors").is_file() and not (out / "model.safetensors").exists()
    assert result.summary["kept"] == ("last" if method == "adalora" else "best")
    if method == "adalora":
        assert json.loads((out / "adalora_ranks.json").read_text())["final_ranks"]
    loaded = lmforge.load(out)
    task = result.task
    features = task.encode(
        task.examples([Row({"review": f"it was {c}", "stars": CUES[c]}, data, 1) for c in CUES])[0]
    )
    torch.testing.assert_close(
        task.logits(loaded.model, features, batch_size=8), task.logits(result.model, features, batch_size=8)
    )


def test_loading_an_adapter_run_whose_base_or_adapter_is_missing_is_one_line(tmp_path: Path) -> None:
    data = write_sentiment(tmp_path / "data", n_train=32, n_val=8)
    base = base_run(tmp_path, "tiny-encoder")
    run(tmp_path, base, data, method="ia3", train=fast(max_steps=2, eval_every=0))
    out = tmp_path / "run-ia3"
    moved = base.rename(tmp_path / "moved-base")
    with pytest.raises(
        lmforge.LMForgeError,
        match=r"config.yaml:\d+: key 'base_model': the base model of this adapter run is not found",
    ):
        lmforge.load(out)
    moved.rename(base)
    (out / "adapter_config.json").unlink()
    with pytest.raises(lmforge.LMForgeError, match="adapter_config.json is missing"):
        lmforge.load(out)
