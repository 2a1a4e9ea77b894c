"""Generation tasks at tiny size: SFT (loss on the response only, packing without
cross-contamination) and seq2seq translation/summarization on an encoder-decoder and on a
decoder with a prompt template, end to end through finetune_run and lmforge.load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_runs import tiny_base

import lmforge
from lmforge import LMForgeError, ModelConfig, Transformer
from lmforge.objectives import IGNORE_INDEX
from lmforge.pipeline.finetuning import DataSpec, finetune_run
from lmforge.tasks import Columns, Seq2SeqOptions, SFTOptions, SFTTask, SummarizationTask, TranslationTask
from lmforge.tasks.data import Row
from lmforge.tokenizers import Tokenizer
from lmforge.training import TrainConfig

PAIRS = [  # targets of four words or more: BLEU counts up to 4-grams
    ("red apple", "der rote apfel ist gut"),
    ("green tree", "ein gruener baum steht da"),
    ("small dog", "der kleine hund bellt laut"),
    ("old house", "das alte haus ist leer"),
]


def char_tokenizer() -> Tokenizer:
    text = " ".join(s + " " + t for s, t in PAIRS) + " #:\n abcdefghijklmnopqrstuvwxyz"
    return Tokenizer.train(iter([text]), kind="char", vocab_size=100, show_progress=False)


def rows(pairs: list[tuple[str, str]], **names: str) -> list[Row]:
    source, target = names.get("source", "source"), names.get("target", "target")
    return [Row({source: s, target: t}, Path("d.jsonl"), i) for i, (s, t) in enumerate(pairs, 1)]


def test_sft_labels_count_the_response_and_end_token_only() -> None:
    tok = char_tokenizer()
    task = SFTTask(SFTOptions(max_length=64, template="Q: {source}\nA: "), tok)
    (example,), bad = task.examples(rows([("red apple", "rote apfel")]))  # any pair
    assert not bad and example.prompt == "Q: red apple\nA: "
    (feature,) = task.encode([example])
    ids, labels = feature["input_ids"], feature["labels"]
    prompt_len = 1 + len(tok.encode("Q: red apple\nA: "))  # [BOS] + prompt
    response = tok.encode("rote apfel") + [tok.eos_id]
    assert ids == [tok.bos_id, *tok.encode("Q: red apple\nA: "), *tok.encode("rote apfel"), tok.eos_id]
    # shifted: position t is scored on token t + 1, so the last prompt position predicts the response
    assert labels[: prompt_len - 1] == [IGNORE_INDEX] * (prompt_len - 1)
    assert labels[prompt_len - 1 : -1] == response and labels[-1] == IGNORE_INDEX


def test_sft_prompt_is_cut_from_the_start_to_fit() -> None:
    tok = char_tokenizer()
    task = SFTTask(SFTOptions(max_length=12, max_target_length=4, template="{source}"), tok)
    (feature,) = task.encode(task.examples(rows([("red apple green tree", "rote apfel")]))[0])
    assert feature["length"] == 12
    # [BOS] + 6 prompt characters (its end) + 4 response characters + [EOS]
    assert tok.decode(feature["input_ids"]) == "n tree" + "rote"


def test_packing_keeps_examples_apart() -> None:
    tok = char_tokenizer()
    task = SFTTask(SFTOptions(max_length=80, template="{source}:"), tok)
    examples = task.examples(rows(PAIRS))[0]
    plain = task.encode(examples)
    packed = SFTTask(SFTOptions(max_length=80, template="{source}:", packing=True), tok).encode(examples)
    assert task.encode(examples, packing=True) == packed
    assert len(packed) < len(plain) and sum(f["length"] for f in packed) == sum(f["length"] for f in plain)
    batch = task.collate(packed)
    assert batch["attention_mask"].dim() == 3  # (B, T, T) block-diagonal
    first = plain[0]["length"]
    assert batch["position_ids"][0, first].item() == 0  # the second example starts at position 0
    assert not batch["attention_mask"][0, first, first - 1]  # and does not see the first one
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny-decoder", vocab_size=tok.vocab_size)).eval()
    with torch.no_grad():
        packed_loss = task.objective(model, batch)
        task.options.packing = False
        plain_loss = task.objective(model, task.collate(plain))
    assert int(packed_loss.num_targets) == int(plain_loss.num_targets)
    torch.testing.assert_close(packed_loss.loss_sum, plain_loss.loss_sum, rtol=1e-4, atol=1e-4)


def test_template_slots_read_columns_and_report_missing_ones() -> None:
    task = SFTTask(
        SFTOptions(template="{instruction} / {input}"), char_tokenizer(), Columns({"target": "output"})
    )
    good = Row({"instruction": "say", "input": "red", "output": "rot"}, Path("d.jsonl"), 1)
    bad = Row({"instruction": "say", "output": "rot"}, Path("d.jsonl"), 2)
    examples, errors = task.examples([good, bad], training=True)
    assert examples[0].prompt == "say / red" and examples[0].response == "rot"
    assert errors[0].line == 2 and errors[0].reason.startswith("missing field 'input'")
    with pytest.raises(LMForgeError, match="bad template"):
        SFTTask(SFTOptions(template="{unclosed"), char_tokenizer()).examples([good])


def test_encoder_decoder_features_are_teacher_forced() -> None:
    tok = char_tokenizer()
    task = TranslationTask(Seq2SeqOptions(max_length=32, source_prefix="de: "), tok)
    task.check_arch("encoder_decoder")
    (feature,) = task.encode(task.examples(rows([("red apple", "rote apfel")]))[0])
    assert feature["input_ids"] == tok.encode("de: red apple") + [tok.eos_id]
    target = tok.encode("rote apfel")
    assert feature["decoder_input_ids"] == [tok.bos_id, *target] and feature["labels"] == [
        *target,
        tok.eos_id,
    ]
    batch = task.collate([feature])
    assert batch["decoder_input_ids"].shape == batch["labels"].shape


def write_pairs(folder: Path, pairs: list[tuple[str, str]], repeat: int = 8) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps({"en": s, "de": t}) + "\n" for s, t in pairs)
    (folder / "train.jsonl").write_text(lines * repeat, encoding="utf-8")
    (folder / "validation.jsonl").write_text(lines, encoding="utf-8")
    (folder / "test.jsonl").write_text(lines, encoding="utf-8")
    return folder


SETTINGS = {
    "tiny-encoder-decoder": {"lr": 5e-3, "batch_size": 4},
    "tiny-decoder": {"lr": 1e-2, "batch_size": 8},
}


@pytest.mark.parametrize("preset", ["tiny-encoder-decoder", "tiny-decoder"])
def test_translation_learns_small_pairs_and_reloads(tmp_path: Path, preset: str) -> None:
    tok = char_tokenizer()
    base = tiny_base(tmp_path / "base", preset, tok)
    result = finetune_run(
        model=str(base),
        data=DataSpec(write_pairs(tmp_path / "data", PAIRS), columns={"source": "en", "target": "de"}),
        task_name="translation",
        method="full",
        peft=None,
        options=Seq2SeqOptions(max_length=60, max_target_length=32, num_beams=3, template="{source} = "),
        train=TrainConfig(max_steps=150, warmup_steps=10, eval_every=75, progress=False, **SETTINGS[preset]),
        epochs=None,
        out=tmp_path / "run",
    )
    assert result.summary["main_metric"] == "bleu" and result.summary["validation"]["bleu"] > 50
    loaded = lmforge.load(tmp_path / "run")
    task = result.task
    examples, bad = task.examples(rows(PAIRS, source="en", target="de"))
    assert not bad
    greedy = task.evaluate(loaded.model, examples, final=False)
    beam = task.evaluate(loaded.model, examples, final=True)
    assert greedy.metrics["num_beams"] == 1 and beam.metrics["num_beams"] == 3
    assert beam.metrics["bleu"] > 50 and {"chrf", "loss", "perplexity"} <= set(beam.metrics)
    assert [p["prediction"] for p in greedy.predictions] == [t for _, t in PAIRS]
    assert greedy.predictions[0] == {
        "source": "red apple",
        "prediction": PAIRS[0][1],
        "reference": PAIRS[0][1],
    }


def test_summarization_scores_rouge() -> None:
    tok = char_tokenizer()
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny-encoder-decoder", vocab_size=tok.vocab_size)).eval()
    task = SummarizationTask(Seq2SeqOptions(max_target_length=6, num_beams=2), tok)
    result = task.evaluate(model, task.examples(rows(PAIRS[:2]))[0])
    assert {"rouge1", "rouge2", "rougeL", "rougeLsum"} <= set(result.metrics) and task.main_metric == "rougeL"
    assert len(result.predictions) == 2
    with pytest.raises(
        LMForgeError, match="needs a model of arch encoder_decoder or decoder, this one is encoder"
    ):
        task.check_arch("encoder")


def test_sft_with_packing_learns_the_responses(tmp_path: Path) -> None:
    tok = char_tokenizer()
    base = tiny_base(tmp_path / "base", "tiny-decoder", tok)
    folder = tmp_path / "data"
    folder.mkdir()
    lines = "".join(json.dumps({"q": s, "a": t}) + "\n" for s, t in PAIRS)
    (folder / "train.jsonl").write_text(lines * 8, encoding="utf-8")
    (folder / "validation.jsonl").write_text(lines, encoding="utf-8")
    result = finetune_run(
        model=str(base),
        data=DataSpec(folder, columns={"target": "a"}),
        task_name="sft",
        method="full",
        peft=None,
        options=SFTOptions(max_length=64, template="Q: {q}\nA: ", packing=True),
        train=TrainConfig(
            max_steps=80, batch_size=4, lr=1e-2, warmup_steps=10, eval_every=40, progress=False
        ),
        epochs=None,
        out=tmp_path / "run",
    )
    assert result.summary["main_metric"] == "loss" and result.summary["validation"]["loss"] < 0.5
    task = result.task
    out = task.evaluate(
        lmforge.load(tmp_path / "run").model, task.examples(rows(PAIRS, source="q", target="a"))[0]
    )
    assert out.metrics["exact_match"] >= 75.0 and out.predictions[0]["reference"] == PAIRS[0][1]
