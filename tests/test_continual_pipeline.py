"""``lmforge continual`` from files: the sequence file, the tables, resume between tasks, and
one-line errors for bad input."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
from continual_data import LABELS, TASKS, make_tokenizer, one_thread, records  # noqa: F401 (one_thread: an autouse fixture)
from tiny_runs import tiny_base

from lmforge.cli import main
from lmforge.continual.sequence import read_sequence, strategy_setup
from lmforge.errors import LMForgeError
from lmforge.pipeline.continual import run_sequence


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")



@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model run, one data folder holding all three tasks' rows, a domains file."""
    root = tmp_path_factory.mktemp("continual")
    tiny_base(root / "model", "tiny-encoder", make_tokenizer())
    data = root / "data"
    data.mkdir()
    train, test = [], []
    for i, cues in enumerate(TASKS.values()):
        train += records(cues, 96, 10 * i)
        test += records(cues, 30, 10 * i + 1)
    write_jsonl(data / "train.jsonl", train)
    write_jsonl(data / "test.jsonl", test)
    (data / "labels.txt").write_text("\n".join(LABELS) + "\n", encoding="utf-8")
    domains = {name: sorted(cues.values()) for name, cues in TASKS.items()}
    (root / "domains.json").write_text(json.dumps(domains), encoding="utf-8")
    return root


def sequence_file(
    root: Path, name: str, extra: str = "", strategies: str = "naive: {}\n  replay: {memory: 48}"
) -> Path:
    path = root / name
    path.write_text(
        f"""model: {root / "model"}
scenario: class
options: {{max_length: 16}}
domains: {{file: {root / "domains.json"}, data: {root / "data"}}}
train: {{lr: 3.0e-3, batch_size: 16, warmup_steps: 2, device: cpu}}
epochs: 5
strategies:
  {strategies}
quick: {{max_train_per_class: 8, max_test_per_class: 4, epochs: 1, tasks: 2}}
{extra}""",
        encoding="utf-8",
    )
    return path


def test_a_sequence_file_runs_every_strategy_and_writes_the_tables(world: Path, tmp_path: Path) -> None:
    spec = read_sequence(sequence_file(world, "seq.yaml"))
    assert [t.name for t in spec.tasks] == list(TASKS) and spec.tasks[1].classes == ["cat_class", "dog_class"]
    lines: list[str] = []
    result = run_sequence(spec, out=tmp_path / "out", log=lines.append)
    naive, replay = result.results
    assert len(naive["rows"]) == 3 and len(naive["initial"]) == 3
    assert naive["summary"]["bwt"] < -0.5 < replay["summary"]["bwt"]  # forgetting, and replay's cure
    assert replay["summary"]["average_accuracy"] > naive["summary"]["average_accuracy"] + 0.3
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| naive |" in table and "| replay |" in table and "R for replay" in table
    csv_lines = (tmp_path / "out" / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("strategy,average_accuracy,bwt,fwt,forgetting") and len(csv_lines) == 3
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["strategies"][1]["rows"] == replay["rows"]
    assert any("stage 3/3" in line for line in lines)
    if importlib.util.find_spec("matplotlib") is not None:  # a dependency; the heatmap of each R
        assert (tmp_path / "out" / "R_replay.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_between_tasks_reproduces_the_uninterrupted_matrix(world: Path, tmp_path: Path) -> None:
    strategies = "ewc: {fisher_samples: 8}\n  lwf: {}"
    spec = read_sequence(sequence_file(world, "seq.yaml", strategies=strategies))
    whole = run_sequence(spec, out=tmp_path / "whole")

    def kill_after_the_first_task(line: str) -> None:
        if "lwf: stage 2/3" in line:
            raise KeyboardInterrupt  # as a Ctrl-C between tasks would

    stopped = run_sequence(spec, out=tmp_path / "cut", log=kill_after_the_first_task)
    assert stopped.interrupted and [r["strategy"] for r in stopped.results] == ["ewc"]
    assert json.loads((tmp_path / "cut" / "lwf" / "progress.json").read_text())["done"] == 1
    lines: list[str] = []
    resumed = run_sequence(spec, out=tmp_path / "cut", resume=True, log=lines.append)
    assert any("lwf: resumed after stage 1" in line for line in lines)
    for before, after in zip(whole.results, resumed.results, strict=True):
        assert after["rows"] == before["rows"], before["strategy"]
    with pytest.raises(LMForgeError, match="add --resume"):
        run_sequence(spec, out=tmp_path / "cut")


def test_quick_is_smaller_and_a_strategy_can_bring_its_own_method_and_loop(world: Path) -> None:
    strategies = "naive: {}\n  olora: {method: lora, peft: {r: 2}, train: {lr: 0.01}, lam_orth: 0.1}"
    spec = read_sequence(sequence_file(world, "seq.yaml", strategies=strategies))
    quick = spec.quick_version()
    assert len(quick.tasks) == 2 and quick.max_train_per_class == 8 and quick.epochs == 1
    naive, olora = strategy_setup(spec, "naive"), strategy_setup(spec, "olora")
    assert (naive.method, naive.train.lr) == ("full", 3.0e-3)
    assert (olora.method, olora.peft, olora.train.lr, olora.options) == (
        "lora",
        {"r": 2},
        0.01,
        {"lam_orth": 0.1},
    )
    assert olora.train.batch_size == spec.train.batch_size  # the rest of the loop is the sequence's


@pytest.mark.parametrize(
    ("extra", "strategies", "message"),
    [
        ("", "adapters: {}", "strategy adapters needs a PEFT method, not method full"),
        ("", "olora: {method: ia3}", "strategy olora needs lora, not method ia3"),
        ("", "replay: {budget: 3}", "strategy replay has no option 'budget'"),
        ("", "rehearsal: {}", "unknown strategy 'rehearsal'"),
        ("scenario: classes\n", "naive: {}", "unknown key 'scenario'|unknown scenario 'classes'"),
        ("epoch: 3\n", "naive: {}", "unknown key 'epoch'.*did you mean 'epochs'"),
        ("", "naive: {train: {lr: fast}}", "strategies.naive.train.lr"),
    ],
)
def test_bad_sequence_files_are_one_line_exit_2(
    world: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: str, strategies: str, message: str
) -> None:
    path = sequence_file(world, "bad.yaml", extra=extra, strategies=strategies)
    if extra.startswith("scenario"):
        path.write_text(path.read_text().replace("scenario: class\n", ""), encoding="utf-8")
    assert main(["continual", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad.yaml" in err
    assert re.search(message, err), err


def test_the_command_runs_quick_and_lists_the_strategies_in_help(
    world: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = sequence_file(world, "seq.yaml", strategies="naive: {}\n  adapters: {method: lora, peft: {r: 2}}")
    assert main(["continual", str(path), "--out", str(tmp_path / "q"), "--quick", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "adapters: average accuracy" in out and (tmp_path / "q" / "results.md").is_file()
    result = json.loads((tmp_path / "q" / "results.json").read_text())
    assert [len(s["rows"]) for s in result["strategies"]] == [2, 2]  # quick: two tasks
    with pytest.raises(SystemExit):
        main(["continual", "--help"])
    shown = capsys.readouterr().out
    for name in ("naive", "joint", "replay", "ewc", "lwf", "adapters", "olora"):
        assert f"  {name}: " in shown
