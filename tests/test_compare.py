"""``lmforge compare``: methods through the same pipeline with the same seeds and budget, a report
(Markdown, CSV, chart) whose numbers are the runs', and a second call that reruns nothing finished."""

from __future__ import annotations

import csv
import json
import random
import shutil
import statistics
from pathlib import Path

import pytest
import yaml
from tiny_runs import tiny_base

from lmforge.cli import main
from lmforge.pipeline.compare import Comparison, compare, peft_sections
from lmforge.pipeline.finetuning import DataSpec
from lmforge.tokenizers import Tokenizer
from lmforge.training import TrainConfig
from lmforge.viz.figures import png_pixels

CUES = {"good": 1, "great": 1, "bad": 0, "awful": 0}
FILLER = ["the", "movie", "plot", "was", "very", "and", "it", "a"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("compare")
    rng = random.Random(0)
    data = folder / "data"
    data.mkdir()
    for split, n in (("train", 120), ("validation", 40)):
        rows = []
        for _ in range(n):
            cue = rng.choice(list(CUES))
            words = [rng.choice(FILLER) for _ in range(4)]
            words.insert(rng.randint(0, 4), cue)
            rows.append({"text": " ".join(words), "label": CUES[cue]})
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tokenizer = Tokenizer.train(iter([" ".join(FILLER + list(CUES))] * 10), kind="wordpiece", vocab_size=60, show_progress=False)
    return tiny_base(folder / "base", "tiny-encoder", tokenizer), data


def comparison(setup: tuple[Path, Path], methods: list[str], **changes: object) -> Comparison:
    base, data = setup
    train = TrainConfig(max_steps=8, batch_size=16, lr=5e-3, warmup_steps=2, eval_every=0, save_every=0, progress=False)
    values: dict = dict(
        model=base, data=DataSpec(data), methods=methods, options={"max_length": 12, "pooling": "mean"},
        train=train, seeds=[0, 1], lr={"full": 1e-3}, peft={"lora": {"r": 2, "target_modules": "all-linear"}},
    )
    values.update(changes)
    values["lr"] = {m: v for m, v in values["lr"].items() if m in methods}
    values["peft"] = {m: v for m, v in values["peft"].items() if m in methods}
    return Comparison(**values)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_report_holds_the_runs_numbers_and_a_rerun_reuses_them(setup: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    lines: list[str] = []
    result = compare(comparison(setup, ["full", "lora"]), out=out, isolate=False, log=lines.append)
    assert not result.failures and len(result.records) == 4 and not result.skipped
    runs = read_csv(out / "runs.csv")
    assert [(r["method"], r["seed"]) for r in runs] == [("full", "0"), ("full", "1"), ("lora", "0"), ("lora", "1")]
    for row in runs:  # each run's record is its run folder's own summary
        summary = json.loads((out / "runs" / f"{row['method']}-seed{row['seed']}" / "finetune.json").read_text())
        assert float(row["score"]) == summary["validation"]["accuracy"]
        assert int(row["steps"]) == summary["steps"] == 8
        assert row["memory_isolated"] == "False"
        assert float(row["tokens_per_s"]) > 0
    assert {r["lr"] for r in runs if r["method"] == "full"} == {"0.001"} and {r["lr"] for r in runs if r["method"] == "lora"} == {"0.005"}
    table = {r["method"]: r for r in read_csv(out / "report.csv")}
    for method in ("full", "lora"):
        scores = [float(r["score"]) for r in runs if r["method"] == method]
        assert float(table[method]["mean"]) == pytest.approx(statistics.fmean(scores))
        assert float(table[method]["std"]) == pytest.approx(statistics.stdev(scores))
    assert int(table["lora"]["trainable_parameters"]) < int(table["full"]["trainable_parameters"])
    assert float(table["lora"]["weights_mb"]) < float(table["full"]["weights_mb"])
    assert float(table["full"]["trainable_percent"]) == pytest.approx(100.0)
    # the two seeds are two different runs
    seeds = [yaml.safe_load((out / "runs" / f"lora-seed{s}" / "config.yaml").read_text())["train"]["seed"] for s in (0, 1)]
    assert seeds == [0, 1]
    report = (out / "report.md").read_text()
    assert "| full |" in report and "| lora |" in report and "n=2" in report
    assert {p.name for p in result.files} == {"report.md", "report.csv", "runs.csv", "compare.png", "curves.png"}
    pixels = png_pixels(out / "compare.png")
    assert pixels.shape[0] > 400 and pixels.shape[1] > 800

    finished = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/compare.json")}
    again = compare(comparison(setup, ["full", "lora", "bitfit"], seeds=[0, 1]), out=out, isolate=False, log=lines.append)
    assert sorted(again.skipped) == ["full-seed0", "full-seed1", "lora-seed0", "lora-seed1"]
    assert {p: p.stat().st_mtime_ns for p in finished} == finished  # not run again
    assert [r["method"] for r in read_csv(out / "report.csv")] == ["full", "lora", "bitfit"]
    assert "finished earlier, not run again" in "\n".join(lines)
    # a run redone in the middle: the report still holds the finished runs after it
    shutil.rmtree(out / "runs" / "full-seed1")
    redone = compare(comparison(setup, ["full", "lora", "bitfit"], seeds=[0, 1]), out=out, isolate=False)
    assert "full-seed1" not in redone.skipped and len(redone.records) == 6
    assert [(r["method"], r["seed"]) for r in read_csv(out / "runs.csv")] == [
        (m, s) for m in ("full", "lora", "bitfit") for s in ("0", "1")
    ]


def test_each_run_in_its_own_process_has_its_own_peak_memory(setup: tuple[Path, Path], tmp_path: Path) -> None:
    result = compare(comparison(setup, ["lora"], seeds=[0]), out=tmp_path / "iso")
    (record,) = result.records
    assert record["memory_isolated"] is True and record["steps"] == 8
    # the run's process started with Python + torch only; training a model took more
    assert record["peak_memory_mb"] > record["runtime_memory_mb"] > 50
    assert "not in a process of its own" not in (tmp_path / "iso" / "report.md").read_text()


def test_budget_is_shared_and_stops_training(setup: tuple[Path, Path], tmp_path: Path) -> None:
    spec = comparison(setup, ["lora", "bitfit"], seeds=[0], budget_minutes=0.2)
    spec.train = TrainConfig(max_steps=100_000, batch_size=16, lr=5e-3, warmup_steps=2, eval_every=0, save_every=0, progress=False)
    assert spec.train_minutes() == pytest.approx(0.2 / 2 * 0.75)  # 4.5 s of training each
    result = compare(spec, out=tmp_path / "budget", isolate=False)
    for record in result.records:
        assert 1 <= record["steps"] < 100_000
        # stopped near its 4.5 s (the step in flight finishes: on a loaded CPU a step can take seconds)
        assert record["train_time_s"] < 0.2 * 60


def test_peft_options_per_method() -> None:
    assert peft_sections({"lora.r": 8, "ia3": {"target_modules": "all-linear"}}) == {
        "lora": {"r": 8},
        "ia3": {"target_modules": "all-linear"},
    }


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--methods", "full,lorra"], "unknown PEFT method 'lorra'"),
        (["--methods", "lora,lora"], "names a method twice"),
        (["--methods", "lora", "--lr.ia3", "1e-3"], "--lr.ia3 is given but ia3 is not in --methods"),
        (["--methods", "lora", "--peft.lora.rank", "4"], "lora has no option 'rank'"),
        (["--methods", "lora", "--budget_minutes", "0"], "--budget_minutes must be positive"),
        (["--methods", "lora", "--peft.r", "4"], "--peft.r: name the method"),
    ],
)
def test_bad_input_is_one_line(
    setup: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture, extra: list[str], message: str
) -> None:
    base, data = setup
    argv = ["compare", "--model", str(base), "--data", str(data), "--out", str(tmp_path / "x"), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not (tmp_path / "x" / "runs").exists()


def test_a_folder_it_did_not_make_is_refused(setup: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base, data = setup
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("mine")
    argv = ["compare", "--model", str(base), "--data", str(data), "--out", str(tmp_path / "x"), "--methods", "lora"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not an earlier lmforge compare" in err
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["notes.txt"]
