"""``lmforge viz run``: curves from real metrics.jsonl files (two runs overlaid), AdaLoRA's rank
allocation, an eval's confusion matrix, and the index page that shows them."""

from __future__ import annotations

import json
import random
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from tiny_runs import tiny_base

from lmforge.cli import main
from lmforge.pipeline.evaluation import evaluate_run
from lmforge.pipeline.finetuning import DataSpec, finetune_run
from lmforge.pipeline.viz import run_figures
from lmforge.tokenizers import Tokenizer
from lmforge.training import TrainConfig
from lmforge.viz.curves import adalora_figure, confusion_figure, curves_figure, read_run
from lmforge.viz.figures import png_pixels

CUES = {"good": 1, "great": 1, "bad": 0, "awful": 0}
FILLER = ["the", "movie", "plot", "was", "very", "and", "it", "a"]


def write_data(folder: Path) -> Path:
    rng = random.Random(0)
    folder.mkdir(parents=True)
    for split, n in (("train", 160), ("validation", 40)):
        rows = []
        for _ in range(n):
            cue = rng.choice(list(CUES))
            words = [rng.choice(FILLER) for _ in range(5)]
            words.insert(rng.randint(0, 5), cue)
            rows.append({"text": " ".join(words), "label": CUES[cue]})
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (folder / "labels.txt").write_text("negative\npositive\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("viz-run")
    data = write_data(folder / "data")
    tokenizer = Tokenizer.train(iter([" ".join(FILLER + list(CUES))] * 10), kind="wordpiece", vocab_size=60, show_progress=False)
    base = tiny_base(folder / "base", "tiny-encoder", tokenizer)
    train = TrainConfig(max_steps=30, batch_size=16, lr=5e-3, warmup_steps=3, eval_every=10, log_every=2, progress=False, seed=0)
    out = {}
    for method, peft in (("full", None), ("adalora", {"init_r": 4, "target_r": 2, "tinit": 4, "tfinal": 6, "target_modules": "all-linear"})):
        out[method] = folder / method
        finetune_run(
            model=base, data=DataSpec(data), task_name="classification", method=method, peft=peft,
            options={"max_length": 16, "pooling": "mean"}, train=train, out=out[method],
        )
    task, result = evaluate_run(out["full"], split="validation")
    record = {"model": str(out["full"]), "split": "validation", "task": task.name, "metrics": result.metrics}
    (out["full"] / "eval-validation.json").write_text(json.dumps(record), encoding="utf-8")
    return out


def test_curves_are_the_logged_numbers(runs: dict[str, Path]) -> None:
    records = [read_run(runs["full"]), read_run(runs["adalora"])]
    logged = [json.loads(line) for line in (runs["full"] / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["loss"]) for r in logged if "loss" in r and "eval_loss" not in r]
    figure = curves_figure(records)
    loss_axes, quality_axes, lr_axes, speed_axes = figure.axes
    first = loss_axes.lines[0]
    assert first.get_label() == "full"
    assert list(zip(first.get_xdata(), first.get_ydata(), strict=True)) == losses
    evals = [(r["step"], r["eval_loss"]) for r in logged if "eval_loss" in r]
    assert len(evals) == 3 and list(zip(*[loss_axes.lines[1].get_xdata(), loss_axes.lines[1].get_ydata()], strict=True)) == evals
    assert len(lr_axes.lines) == 2 and len(speed_axes.lines) == 2  # both runs overlaid
    assert any("accuracy" in str(line.get_label()) for line in quality_axes.lines)
    assert max(lr_axes.lines[0].get_ydata()) == pytest.approx(5e-3)


def test_adalora_heatmap_holds_the_recorded_ranks(runs: dict[str, Path]) -> None:
    record = read_run(runs["adalora"])
    report = json.loads((runs["adalora"] / "adalora_ranks.json").read_text())
    names = list(report["final_ranks"])
    expected = np.array([[h["ranks"][n] for h in report["history"]] for n in names])
    shown = adalora_figure(record).axes[0].images[0].get_array()
    np.testing.assert_array_equal(np.asarray(shown), expected)
    assert expected[:, 0].max() == 4 and expected[:, -1].sum() < expected[:, 0].sum()  # ranks were cut


def test_confusion_matrix_of_the_eval(runs: dict[str, Path]) -> None:
    record = read_run(runs["full"])
    matrix = json.loads((runs["full"] / "eval-validation.json").read_text())["metrics"]["confusion_matrix"]
    figure = confusion_figure(record, "validation")
    assert figure is not None
    np.testing.assert_array_equal(np.asarray(figure.axes[0].images[0].get_array()), np.array(matrix))
    assert [t.get_text() for t in figure.axes[0].get_xticklabels()] == ["negative", "positive"]


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.sources.append(dict(attrs)["src"] or "")


def test_viz_run_writes_pngs_and_an_index(runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "both"
    assert main(["viz", "run", str(runs["full"]), str(runs["adalora"]), "--out", str(out)]) == 0
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == ["1-full-confusion-validation.png", "2-adalora-adalora-ranks.png", "curves.png"]
    parser = _Images()
    parser.feed((out / "index.html").read_text(encoding="utf-8"))
    assert sorted(parser.sources) == names
    both = png_pixels(out / "curves.png")
    assert both.shape[0] > 500 and both.shape[1] > 800
    one = run_figures([runs["full"]], out=tmp_path / "one").figures
    assert {p.name for p in one} == {"curves.png", "confusion-validation.png"}
    single = png_pixels(tmp_path / "one" / "curves.png")
    assert single.shape == both.shape and (single != both).any()  # the second run's lines are drawn
    # the default folder: RUN/viz
    assert main(["viz", "run", str(runs["adalora"])]) == 0
    assert (runs["adalora"] / "viz" / "index.html").is_file()


def test_nothing_to_draw_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["viz", "run", str(tmp_path / "empty")]) == 2
    assert "nothing to draw" in capsys.readouterr().err
    assert main(["viz", "run", str(tmp_path / "missing")]) == 2
    assert main(["viz", "run"]) == 2
    err = capsys.readouterr().err
    assert "run directory not found" in err and err.count("\n") == 2


def test_viz_run_draws_each_continual_strategys_accuracy_matrix(tmp_path: Path) -> None:
    """A folder written by lmforge continual (results.json): one heatmap of R per strategy."""
    from lmforge.continual.report import write_tables
    from lmforge.viz.curves import accuracy_matrix_figure

    tasks = ["banking", "travel", "home"]

    def result(strategy: str, rows: list[list[float]]) -> dict:
        summary = {"average_accuracy": sum(rows[-1]) / 3, "bwt": None, "fwt": None, "forgetting": None}
        stages = [{"train_time_s": 1.0} for _ in rows]
        return {"strategy": strategy, "tasks": tasks, "rows": rows, "initial": [0.3, 0.3, 0.3],
                "summary": summary, "stages": stages}  # fmt: skip

    naive = result("naive", [[0.9, 0.3, 0.35], [0.2, 0.8, 0.3], [0.1, 0.3, 0.9]])
    joint = result("joint", [[0.85, 0.8, 0.9]])
    folder = tmp_path / "continual"
    write_tables(folder, [naive, joint], title="three domains")
    assert (folder / "R_naive.png").is_file() and (folder / "R_joint.png").is_file()  # the report's own
    record = read_run(folder)
    assert [r["strategy"] for r in record.continual] == ["naive", "joint"]
    shown = np.asarray(accuracy_matrix_figure(naive).axes[0].images[0].get_array())
    np.testing.assert_allclose(shown, 100 * np.array(naive["rows"]))  # in percent, row by row
    figures = run_figures([folder], out=tmp_path / "viz").figures
    assert sorted(p.name for p in figures) == ["R-joint.png", "R-naive.png"]
    assert png_pixels(figures[0]).shape != png_pixels(figures[1]).shape  # 1 row (joint) against 3
