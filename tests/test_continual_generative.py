"""Generative continual learning: a decoder learns SFT tasks in turn, each answered as text;
the scores by hand, forgetting under naive training and its absence under replay, the sequence
file's sft form (integer labels answered by name, per-task options and metrics, the probe), and
one-line errors for what does not apply."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from continual_data import one_thread  # noqa: F401 (an autouse fixture)
from tiny_runs import tiny_base

from lmforge import ModelConfig, Transformer
from lmforge.cli import main
from lmforge.continual import TaskSplit, make_strategy
from lmforge.continual.generative import GenerativeLearner, normalize_answer, score
from lmforge.continual.sequence import read_sequence
from lmforge.errors import LMForgeError
from lmforge.pipeline.continual import run_sequence
from lmforge.pipeline.finetuning import Base, build_task, examples_of
from lmforge.tokenizers import Tokenizer
from lmforge.training import TrainConfig

FILLER = ["the", "a", "it", "was", "so"]
TASKS = {  # task name -> (prompt word, cue word -> answer)
    "fruit": ("fruit", {"apple": "r", "lime": "g"}),
    "pets": ("pet", {"cat": "m", "dog": "w"}),
}



def word_tokenizer() -> Tokenizer:
    """Byte-level BPE that holds each word of the sequence as one token."""
    text = " ".join(FILLER) + " fruit pet apple lime cat dog r g m w fruit: pet: :\n"
    return Tokenizer.train(iter([text] * 20), kind="bpe", vocab_size=330, show_progress=False)


def records(cues: dict[str, str], n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        cue = rng.choice(sorted(cues))
        words = rng.sample(FILLER, 2) + [cue]  # the cue last: the answer follows it
        rows.append({"text": " ".join(words), "target": cues[cue]})
    return rows


def test_exact_match_ignores_case_quotes_and_final_punctuation() -> None:
    assert normalize_answer(' "Positive." ') == "positive" and normalize_answer("transfer") == "transfer"
    assert score("exact", ["Positive.", "negative", "balance"], ["positive", "positive", "balance"]) == pytest.approx(2 / 3)
    assert score("chrf", ["le chat noir"], ["le chat noir"]) == pytest.approx(1.0)
    assert 0.0 < score("chrf", ["le chien noir"], ["le chat noir"]) < 1.0
    with pytest.raises(LMForgeError, match="unknown metric 'bleu'"):
        score("bleu", ["a"], ["a"])


def learner(strategy: str, options: dict | None = None) -> GenerativeLearner:
    tokenizer = word_tokenizer()
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny-decoder", vocab_size=tokenizer.vocab_size, dropout=0.0))
    base = Base(model, tokenizer)
    tasks, splits = [], []
    for i, (name, (word, cues)) in enumerate(TASKS.items()):
        task = build_task("sft", base, options={"max_length": 48, "template": word + ": {text}", "max_target_length": 6})
        tasks.append(task)
        splits.append(
            TaskSplit(
                name,
                examples_of(task, records(cues, 64, 10 * i), training=True),
                examples_of(task, records(cues, 24, 10 * i + 1)),
            )
        )
    train = TrainConfig(
        max_steps=1, batch_size=8, lr=3e-3, warmup_steps=2, eval_every=0, save_every=0, log_every=1000,
        progress=False, device="cpu",
    )  # fmt: skip
    return GenerativeLearner(
        model,
        tasks,
        splits,
        metrics=["exact", "exact"],
        strategy=make_strategy(strategy, options),
        train=train,
        epochs=12,
        eval_batch_size=24,
        probe_windows=2,
    )


def test_naive_forgets_the_first_task_and_replay_keeps_it() -> None:
    naive = learner("naive").run()
    assert naive.rows[0][0] >= 0.9  # the first task is learned ...
    assert naive.rows[1][1] >= 0.9 and naive.rows[1][0] <= 0.5  # ... and lost to the second
    replay = learner("replay", {"memory": 32, "policy": "class_balanced"}).run()
    assert replay.rows[1][1] >= 0.9 and replay.rows[1][0] >= 0.9  # both kept
    assert replay.summary()["bwt"] > naive.summary()["bwt"] + 0.4


def test_the_general_probe_is_a_fixed_perplexity() -> None:
    run = learner("naive")
    first, again = run.general(), run.general()
    assert first is not None and first == again and first > 1.0  # tiny-decoder: 63 tokens of context, windows of 64
    assert run.probe_ids is not None and run.probe_ids.shape == (2, 64)


def test_strategies_on_class_logits_refuse_a_generative_sequence() -> None:
    with pytest.raises(LMForgeError, match="strategy lwf runs classification sequences only"):
        learner("lwf")


# ---- the sequence file ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny decoder run; a folder per task, the first with integer labels and labels.txt."""
    root = tmp_path_factory.mktemp("generative")
    tiny_base(root / "model", "tiny-decoder", word_tokenizer())
    names = {"fruit": ["r", "g"], "pets": ["m", "w"]}
    for i, (name, (_, cues)) in enumerate(TASKS.items()):
        folder = root / name
        folder.mkdir()
        for split, n, seed in (("train", 64, 10 * i), ("test", 24, 10 * i + 1)):
            rows = records(cues, n, seed)
            if name == "fruit":  # a classification folder: the answer is the label's name
                rows = [{"text": r["text"], "label": names[name].index(r["target"])} for r in rows]
            (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        if name == "fruit":
            (folder / "labels.txt").write_text("r\ng\n", encoding="utf-8")
    return root


def sequence(root: Path, extra: str = "", strategies: str = "naive: {}\n  olora: {}", scenario: str = "") -> Path:
    path = root / "seq.yaml"
    path.write_text(
        f"""model: {root / "model"}
task: sft
method: lora
peft: {{r: 4, alpha: 8, target_modules: all-linear}}
options: {{max_length: 48, max_target_length: 6}}
train: {{lr: 1.0e-2, batch_size: 8, warmup_steps: 2, device: cpu}}
epochs: 2
max_train: 32
max_test: 12
probe_windows: 2
{scenario}strategies:
  {strategies}
tasks:
  - {{name: fruit, data: {root / "fruit"}, columns: {{target: label}}, options: {{template: "fruit: {{text}}"}}}}
  - {{name: pets, data: {root / "pets"}, metric: chrf, options: {{template: "pet: {{text}}"}}}}
{extra}""",
        encoding="utf-8",
    )
    return path


def test_an_sft_sequence_file_runs_and_writes_scores_and_the_probe(world: Path, tmp_path: Path) -> None:
    spec = read_sequence(sequence(world))
    assert spec.task == "sft" and spec.scenario == "generative" and spec.tasks[1].metric == "chrf"
    lines: list[str] = []
    result = run_sequence(spec, out=tmp_path / "out", log=lines.append)
    naive, olora = result.results
    for record in (naive, olora):
        assert len(record["rows"]) == 2 and len(record["general"]) == 3 and record["metrics"] == ["exact", "chrf"]
        assert all(0.0 <= v <= 1.0 for row in record["rows"] for v in row)
    assert any("general perplexity" in line for line in lines)
    table = (tmp_path / "out" / "results.md").read_text()
    assert "a generative sequence, 2 tasks" in table and "score %, fruit: exact; pets: chrf" in table
    assert "General ability" in table and "general_after" in (tmp_path / "out" / "results.csv").read_text()
    # the folder's integer labels became the answers' names
    from lmforge.pipeline.continual import load_generative
    from lmforge.pipeline.finetuning import load_base

    loaded = load_generative(spec, load_base(spec.model))  # type: ignore[arg-type]
    assert {e.response for e in loaded.splits[0].train} == {"r", "g"}


def test_an_sft_sequence_resumes_with_the_same_rows(world: Path, tmp_path: Path) -> None:
    spec = read_sequence(sequence(world, strategies="olora: {}"))
    whole = run_sequence(spec, out=tmp_path / "whole").results[0]

    def kill_after_the_first_task(line: str) -> None:
        if "olora: stage 2/2" in line:
            raise KeyboardInterrupt  # as a Ctrl-C between tasks would

    assert run_sequence(spec, out=tmp_path / "cut", log=kill_after_the_first_task).interrupted
    assert json.loads((tmp_path / "cut" / "olora" / "progress.json").read_text())["done"] == 1
    resumed = run_sequence(spec, out=tmp_path / "cut", resume=True).results[0]
    assert resumed["rows"] == whole["rows"] and resumed["general"] == whole["general"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"strategies": "lwf: {}"}, "strategy lwf runs classification sequences only"),
        ({"scenario": "scenario: class\n"}, "scenario: does not apply to an sft sequence"),
        ({"extra": ""}, None),
    ],
)
def test_an_sft_sequence_file_refuses_what_does_not_apply(
    world: Path, change: dict[str, str], message: str | None, capsys: pytest.CaptureFixture[str]
) -> None:
    path = sequence(world, **change)
    if message is None:
        read_sequence(path)
        return
    assert main(["continual", str(path), "--out", str(world / "never")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and not (world / "never").exists()


def test_bad_metric_and_options_on_a_classification_task_are_one_line(world: Path) -> None:
    text = sequence(world).read_text()
    bad = world / "bad.yaml"
    bad.write_text(text.replace("metric: chrf", "metric: bleu"), encoding="utf-8")
    with pytest.raises(LMForgeError, match=r"unknown metric 'bleu'"):
        read_sequence(bad)
    bad.write_text(text.replace("task: sft\n", "").replace("method: lora", "method: full").replace("olora: {}", "replay: {memory: 4}"), encoding="utf-8")
    with pytest.raises(LMForgeError, match="options: and metric: are for sft sequences"):
        read_sequence(bad)


def test_ewc_reads_the_fisher_of_the_answers_log_likelihood() -> None:
    run = learner("ewc", {"fisher_samples": 4})
    run.epochs = 1
    stage = run.stages()[0]
    run.prepare(stage)
    run.train_stage(stage)
    fisher = run.strategy.fisher
    assert fisher and all(v.min() >= 0 for v in fisher.values()) and sum(float(v.sum()) for v in fisher.values()) > 0


def test_a_class_not_in_the_folders_labels_is_one_line(world: Path) -> None:
    bad = world / "bad-class.yaml"
    bad.write_text(sequence(world).read_text().replace("columns: {target: label},", "columns: {target: label}, classes: [gren],"))
    spec = read_sequence(bad)
    with pytest.raises(LMForgeError, match=r"label 'gren' is not in .*labels.txt"):
        run_sequence(spec, out=world / "never-class")
