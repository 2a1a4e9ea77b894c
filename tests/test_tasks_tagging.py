"""Token classification (tagging): first-sub-token labels, tag sets, bad rows, and a tiny model
learning BIO entities end to end (entity F1)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from tiny_runs import tiny_base

import lmforge
from lmforge.objectives import IGNORE_INDEX
from lmforge.pipeline.finetuning import DataSpec, finetune_run
from lmforge.tasks import TaggingTask, TaskOptions
from lmforge.tasks.data import Row
from lmforge.tokenizers import Tokenizer
from lmforge.training import TrainConfig

WORDS = ["we", "saw", "a", "near", "the", "river", "and", "then", "went", "home", "with"]
ANIMALS = [["polar", "bear"], ["fox"], ["snow", "leopard"], ["owl"]]


def tokenizer() -> Tokenizer:
    text = " ".join(WORDS + [w for a in ANIMALS for w in a]) + " unbelievably"
    return Tokenizer.train(iter([text] * 5), kind="wordpiece", vocab_size=90, show_progress=False)


def test_only_the_first_sub_token_of_a_word_is_labeled() -> None:
    tok = tokenizer()
    task = TaggingTask(TaskOptions(max_length=32), tok)
    task.set_labels(["O", "B-ANI", "I-ANI"], "test")
    row = Row(
        {"tokens": ["we", "saw", "unbelievably", "polar", "bear"], "tags": ["O", "O", "O", "B-ANI", "I-ANI"]},
        Path("d"),
        1,
    )
    (example,), bad = task.examples([row])
    (feature,) = task.encode([example])
    pieces = [tok.id_to_token(i) for i in feature["input_ids"]]
    assert pieces[0] == "[CLS]" and pieces[-1] == "[SEP]" and any(p.startswith("##") for p in pieces)
    labeled = [
        (p, label) for p, label in zip(pieces, feature["labels"], strict=True) if label != IGNORE_INDEX
    ]
    assert [p for p, _ in labeled] == ["we", "saw", pieces[3], "polar", "bear"]  # one per word
    assert [label for _, label in labeled] == [0, 0, 0, 1, 2]
    assert all(
        label == IGNORE_INDEX
        for p, label in zip(pieces, feature["labels"], strict=True)
        if p.startswith("##")
    )


def test_tag_rows_are_checked() -> None:
    task = TaggingTask(TaskOptions(), tokenizer())
    task.set_labels(["O", "B-ANI", "I-ANI"], "test")
    rows = [
        Row({"tokens": "we saw fox", "tags": "O O B-ANI"}, Path("d"), 1),  # strings split at spaces
        Row({"tokens": ["we", "saw"], "tags": ["O"]}, Path("d"), 2),
        Row({"tokens": ["fox"], "tags": ["B-ANIMAL"]}, Path("d"), 3),
        Row({"tokens": ["fox"], "tags": [7]}, Path("d"), 4),
        Row({"tokens": [], "tags": []}, Path("d"), 5),
    ]
    examples, bad = task.examples(rows)
    assert len(examples) == 1 and examples[0].words == ["we", "saw", "fox"]
    assert [b.reason for b in bad] == [
        "1 tags for 2 words",
        "tag 'B-ANIMAL' is not in the tag set (did you mean 'B-ANI'?)",
        "tag 7 is not in the tag set (0 to 2)",
        "field 'tokens' must be a non-empty list of words",
    ]
    inferred = TaggingTask(TaskOptions(), None)
    inferred.fit(inferred.examples(rows[:1])[0])
    assert inferred.labels == ["B-ANI", "O"] and inferred.bio and inferred.main_metric == "span_f1"


def write_tagged(folder: Path, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", n), ("validation", 40)):
        lines = []
        for _ in range(count):
            words, tags = [], []
            for _ in range(rng.randint(4, 9)):
                if rng.random() < 0.25:
                    animal = rng.choice(ANIMALS)
                    words += animal
                    tags += ["B-ANI"] + ["I-ANI"] * (len(animal) - 1)
                else:
                    words.append(rng.choice(WORDS))
                    tags.append("O")
            lines.append(json.dumps({"words": words, "ner": tags}))
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def test_tiny_tagger_learns_entities(tmp_path: Path) -> None:
    tok = tokenizer()
    base = tiny_base(tmp_path / "base", "tiny-encoder", tok)
    result = finetune_run(
        model=str(base),
        data=DataSpec(
            write_tagged(tmp_path / "data", 200, seed=0), columns={"tokens": "words", "tags": "ner"}
        ),
        task_name="tagging",
        method="full",
        peft=None,
        options=TaskOptions(max_length=32),
        train=TrainConfig(
            max_steps=60, batch_size=16, lr=5e-3, warmup_steps=5, eval_every=30, progress=False
        ),
        epochs=None,
        out=tmp_path / "run",
    )
    assert result.model.config.head == "token_classification" and result.model.config.num_labels == 3
    assert result.summary["main_metric"] == "span_f1" and result.summary["validation"]["span_f1"] >= 0.9
    loaded = lmforge.load(tmp_path / "run")
    examples = result.task.examples(
        [Row({"words": ["we", "saw", "snow", "leopard"], "ner": ["O", "O", "B-ANI", "I-ANI"]}, Path("d"), 1)]
    )[0]
    out = result.task.evaluate(loaded.model, examples)
    assert out.predictions[0]["prediction"] == ["O", "O", "B-ANI", "I-ANI"] and out.metrics["span_f1"] == 1.0
