"""Task data: JSONL / CSV / TSV with column mapping, shards, splits by name or ratio, labels files,
bad rows with file:line — on synthetic files, and on ../shared/data slices when present."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge import LMForgeError
from lmforge.tasks import ClassificationTask, TaskOptions
from lmforge.tasks.data import (
    BadRow,
    Columns,
    Row,
    RowError,
    SplitPlan,
    check_bad_rows,
    data_files,
    read_label_file,
    read_rows,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def texts(rows: list) -> list[str]:
    return [r.values["text"] for r in rows if isinstance(r, Row)]


def test_jsonl_csv_and_tsv_rows_keep_their_line_numbers(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a.jsonl", [{"text": "one"}, {"text": "two"}])
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n', encoding="utf-8")
    (tmp_path / "b.csv").write_text(
        'text,label\n"hello, world",1\n"multi\nline",0\nlast,1\n', encoding="utf-8"
    )
    (tmp_path / "c.tsv").write_text('sentence\tlabel\nit \'s "quoted"\t1\n', encoding="utf-8")
    rows = list(read_rows([tmp_path / "a.jsonl"]))
    assert [(r.values["text"], r.line) for r in rows] == [("one", 1), ("two", 3)]
    rows = list(read_rows([tmp_path / "b.csv"]))
    assert [(r.values["text"], r.line) for r in rows] == [
        ("hello, world", 2),
        ("multi\nline", 3),
        ("last", 5),
    ]
    (row,) = read_rows([tmp_path / "c.tsv"])
    assert row.values == {"sentence": 'it \'s "quoted"', "label": "1"} and row.where.endswith("c.tsv:2")


def test_bad_json_and_ragged_csv_become_bad_rows(tmp_path: Path) -> None:
    (tmp_path / "x.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n[1, 2]\n', encoding="utf-8")
    rows = list(read_rows([tmp_path / "x.jsonl"]))
    assert isinstance(rows[0], Row)
    assert isinstance(rows[1], BadRow) and rows[1].line == 2 and rows[1].reason.startswith("bad JSON")
    assert isinstance(rows[2], BadRow) and "expected a JSON object, got list" in rows[2].reason
    (tmp_path / "y.csv").write_text("text,label\nfine,1\ntoo,many,cells\n", encoding="utf-8")
    bad = list(read_rows([tmp_path / "y.csv"]))[1]
    assert isinstance(bad, BadRow) and bad.line == 3 and "3 cells, the header has 2" in bad.reason


def test_column_mapping_reads_fields_from_other_columns() -> None:
    columns = Columns({"text": "sentence", "label": "polarity"})
    row = Row({"sentence": "great film", "polarity": "pos"}, Path("d.jsonl"), 4)
    assert columns.text(row, "text") == "great film" and columns.get(row, "label") == "pos"
    with pytest.raises(RowError, match=r"missing field 'sentence' \(the text field\); the row has: text"):
        columns.text(Row({"text": "x"}, Path("d.jsonl"), 5), "text")
    with pytest.raises(RowError, match="empty text in field 'sentence'"):
        columns.text(Row({"sentence": "  "}, Path("d.jsonl"), 6), "text")
    with pytest.raises(LMForgeError, match="unknown field 'txt' \\(did you mean 'text'\\?\\)"):
        Columns({"txt": "sentence"})


def test_shards_are_read_in_index_order_and_a_missing_shard_is_an_error(tmp_path: Path) -> None:
    for index in (1, 0, 2):  # written out of order
        write_jsonl(tmp_path / f"train-{index:05d}-of-00003.jsonl", [{"text": f"shard {index}"}])
    write_jsonl(tmp_path / "dev.jsonl", [{"text": "validation row"}])
    files = data_files(tmp_path)
    assert [f.name for f in files["train"]] == [f"train-{i:05d}-of-00003.jsonl" for i in range(3)]
    assert [f.name for f in files["validation"]] == ["dev.jsonl"]  # "dev" names the validation split
    assert texts(SplitPlan().train_rows(tmp_path)) == ["shard 0", "shard 1", "shard 2"]
    (tmp_path / "train-00001-of-00003.jsonl").unlink()
    with pytest.raises(LMForgeError, match=r"split 'train' has 2 of 3 shards \(shard 00001 is missing\)"):
        data_files(tmp_path)


def test_split_ratio_with_a_seed_is_reproducible_disjoint_and_complete(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "all.jsonl", [{"text": f"row {i}"} for i in range(100)])
    plan = SplitPlan([0.8, 0.1, 0.1], seed=3)
    train, val, test = (
        texts(plan.train_rows(path)),
        texts(plan.rows(path, "validation")),
        texts(plan.rows(path, "test")),
    )
    assert (len(train), len(val), len(test)) == (80, 10, 10)
    assert set(train) | set(val) | set(test) == {f"row {i}" for i in range(100)}
    assert not (set(train) & set(val)) and not (set(val) & set(test))
    assert texts(SplitPlan([0.8, 0.1, 0.1], seed=3).rows(path, "validation")) == val  # same seed, same split
    assert texts(SplitPlan([0.8, 0.1, 0.1], seed=4).rows(path, "validation")) != val
    assert train == sorted(train, key=lambda t: int(t.split()[1]))  # file order kept inside a split


def test_a_lone_train_file_gives_its_validation_share(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", [{"text": f"row {i}"} for i in range(50)])
    plan = SplitPlan([0.8, 0.2], seed=0)
    train, val = texts(plan.train_rows(tmp_path)), texts(plan.rows(tmp_path, "validation"))
    assert len(val) == 10 and len(train) == 40 and not set(train) & set(val)
    assert len(texts(SplitPlan().rows(tmp_path, "validation"))) == 5  # default: 10%
    with pytest.raises(LMForgeError, match=r"no test split in this data \(splits found: train\)"):
        plan.rows(tmp_path, "test")
    with pytest.raises(LMForgeError, match="split_ratio \\[0.5, 0.2\\] must add up to 1"):
        SplitPlan([0.5, 0.2])


def test_labels_file(tmp_path: Path) -> None:
    path = tmp_path / "labels.txt"
    path.write_text("negative\npositive\n\n", encoding="utf-8")
    assert read_label_file(path) == ["negative", "positive"]
    path.write_text("a\nb\na\n", encoding="utf-8")
    with pytest.raises(LMForgeError, match=r"labels.txt:3: label 'a' is listed twice \(first on line 1\)"):
        read_label_file(path)
    path.write_text("a\n\nb\n", encoding="utf-8")
    with pytest.raises(LMForgeError, match="labels.txt:2: empty label name"):
        read_label_file(path)


def test_bad_rows_stop_with_the_first_one_and_a_count_or_are_skipped(capsys: pytest.CaptureFixture) -> None:
    bad = [BadRow(Path("d/train.jsonl"), 7, "missing field 'label'"), BadRow(Path("d/train.jsonl"), 9, "x")]
    with pytest.raises(LMForgeError) as err:
        check_bad_rows(bad, skip=False, split="train", used=10)
    assert err.value.one_line() == (
        "d/train.jsonl:7: missing field 'label' (2 bad rows in the train split; --skip_bad_rows skips them)"
    )
    check_bad_rows(bad, skip=True, split="train", used=10)
    assert (
        "skipped 2 bad row(s) of the train split, kept 10 (first: d/train.jsonl:7" in capsys.readouterr().out
    )


def test_classification_rows_labels_inferred_sorted_and_checked(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "train.jsonl",
        [{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"}, {"text": "c", "label": "neutral"}],
    )
    task = ClassificationTask(TaskOptions(), tokenizer=None)
    examples, bad = task.examples(list(read_rows([path])), training=True)
    task.fit(examples)
    assert task.labels == ["neg", "neutral", "pos"] and not bad
    rows = [Row({"text": "d", "label": "positive"}, path, 4), Row({"text": "e", "label": -1}, path, 5)]
    examples, bad = task.examples(rows)
    assert [b.reason for b in bad] == [
        "label 'positive' is not in the label set (neg, neutral, pos) (did you mean 'pos'?)"
    ]
    assert examples[0].label is None  # -1: unlabeled, fine outside training
    _, bad = task.examples([Row({"text": "e", "label": -1}, path, 5)], training=True)
    assert "missing label" in bad[0].reason
    numbers = ClassificationTask(TaskOptions(), tokenizer=None)
    numbers.fit(
        numbers.examples([Row({"text": "x", "label": v}, path, i) for i, v in enumerate([10, 2, 2])])[0]
    )
    assert numbers.labels == ["2", "10"] and numbers.label_index(10) == 1  # sparse integers are names


@pytest.mark.skipif(not (SHARED / "sst2").is_dir(), reason="../shared/data/sst2 is not present")
def test_sst2_shards_read_in_order_with_their_labels() -> None:
    rows = SplitPlan().train_rows(SHARED / "sst2")
    assert len(rows) == 67_349 and all(isinstance(r, Row) for r in rows)
    assert (
        rows[0].file.name == "train-00000-of-00002.jsonl"
        and rows[-1].file.name == "train-00001-of-00002.jsonl"
    )
    task = ClassificationTask(TaskOptions(), tokenizer=None)
    task.set_labels(read_label_file(SHARED / "sst2" / "labels.txt"), "labels.txt")
    examples, bad = task.examples(rows[:500], training=True)
    assert not bad and {e.label for e in examples} == {0, 1}
    test, bad = task.examples(SplitPlan().rows(SHARED / "sst2", "test"))
    assert not bad and all(e.label is None for e in test)  # label -1: unlabeled
