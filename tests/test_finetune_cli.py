"""``lmforge finetune`` and ``lmforge eval`` on the command line: a LoRA run with a YAML recipe and
column mapping, the eval report, eval-SPLIT.json and predictions, lmforge predict, and one-line
errors with exit status 2."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from tiny_runs import tiny_base

from lmforge.cli import main
from lmforge.tokenizers import Tokenizer

WORDS = ["the", "a", "movie", "plot", "was", "is", "very", "and", "but", "it"]
CUES = {"good": "pos", "great": "pos", "bad": "neg", "awful": "neg"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cli")
    tokenizer = Tokenizer.train(
        iter([" ".join(WORDS + list(CUES))] * 10), kind="wordpiece", vocab_size=60, show_progress=False
    )
    base = tiny_base(root / "base", "tiny-encoder", tokenizer)
    rng = random.Random(0)
    data = root / "data"
    data.mkdir()
    for split, n in (("train", 160), ("validation", 40), ("test", 30)):
        lines = []
        for _ in range(n):
            cue = rng.choice(list(CUES))
            words = [rng.choice(WORDS) for _ in range(4)] + [cue]
            rng.shuffle(words)
            lines.append(f'"{" ".join(words)}",{CUES[cue]}')
        (data / f"{split}.csv").write_text("review,sentiment\n" + "\n".join(lines) + "\n", encoding="utf-8")
    (data / "labels.txt").write_text("neg\npos\n", encoding="utf-8")
    return base, data


def run_cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("lmforge: error: "), (code, err)
    return lines[0].removeprefix("lmforge: error: ")


def test_lora_recipe_then_eval_with_table_json_and_predictions(
    setup: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    base, data = setup
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"task: classification\ndata: {data}\nmethod: lora\npeft:\n  r: 4\n  target_modules: all-linear\n"
        "columns:\n  text: review\n  label: sentiment\noptions:\n  max_length: 16\n  pooling: mean\n"
        "train:\n  max_steps: 40\n  batch_size: 16\n  lr: 1.0e-2\n  warmup_steps: 4\n  eval_every: 20\n  progress: false\n",
        encoding="utf-8",
    )
    out = tmp_path / "run"
    code, stdout, _ = run_cli(
        ["finetune", "--config", recipe, "--model", base, "--out", out, "--peft.alpha", 8], capsys
    )
    assert code == 0, stdout
    assert "method lora: trainable parameters:" in stdout and "validation accuracy" in stdout
    assert json.loads((out / "adapter_config.json").read_text())["adapter"]["alpha"] == 8  # flag over recipe
    predictions = tmp_path / "pred.jsonl"
    code, stdout, _ = run_cli(
        ["eval", "--model", out, "--split", "test", "--predictions", predictions], capsys
    )
    assert code == 0
    assert "eval: classification into 2 classes (neg, pos), test split" in stdout and "accuracy" in stdout
    assert "confusion matrix" in stdout and "precision  recall" in stdout
    report = json.loads((out / "eval-test.json").read_text())
    assert report["split"] == "test" and report["metrics"]["examples"] == 30
    assert report["metrics"]["accuracy"] >= 0.8 and len(report["metrics"]["confusion_matrix"]) == 2
    lines = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert len(lines) == 30 and set(lines[0]) == {"prediction", "score", "probabilities", "label"}
    code, _, err = run_cli(["finetune", "--config", recipe, "--model", base, "--out", out], capsys)
    assert "add --resume to continue a run there" in one_line_error(code, err)
    code, stdout, _ = run_cli(["eval", "--model", out, "--split", "validation"], capsys)
    assert code == 0 and (out / "eval-validation.json").is_file()
    assert json.loads((out / "eval-test.json").read_text())["split"] == "test"  # not overwritten
    # predict answers as eval did, row for row (the first five test reviews)
    texts = [line.split('"')[1] for line in (data / "test.csv").read_text().splitlines()[1:6]]
    code, stdout, _ = run_cli(["predict", "--model", out, "--text", *texts], capsys)
    assert code == 0 and len(texts) == 5 and len(stdout.splitlines()) >= 5
    for text, shown, evaluated in zip(texts, stdout.splitlines(), lines[:5], strict=False):
        assert shown.startswith(f"{text} → {evaluated['prediction']}  (")


def test_bad_rows_stop_with_file_and_line_or_are_skipped(
    setup: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    base, data = setup
    broken = tmp_path / "broken"
    broken.mkdir()
    train = (data / "train.csv").read_text().splitlines()
    train[3] = '"the plot was very",meh'  # label outside labels.txt
    train[7] = '"",pos'  # empty text
    (broken / "train.csv").write_text("\n".join(train) + "\n", encoding="utf-8")
    (broken / "validation.csv").write_text((data / "validation.csv").read_text(), encoding="utf-8")
    (broken / "labels.txt").write_text("neg\npos\n", encoding="utf-8")
    args = ["finetune", "--model", base, "--data", broken, "--task", "classification", "--columns.text", "review",
            "--columns.label", "sentiment", "--train.max_steps", 2, "--train.progress", "false", "--out", tmp_path / "run"]  # fmt: skip
    code, _, err = run_cli(args, capsys)
    message = one_line_error(code, err)
    assert message.startswith(f"{broken / 'train.csv'}:4: label 'meh' is not in the label set (neg, pos)")
    assert message.endswith("(2 bad rows in the train split; --skip_bad_rows skips them)")
    code, stdout, _ = run_cli([*args, "--skip_bad_rows"], capsys)
    assert code == 0 and "data: skipped 2 bad row(s) of the train split, kept 158" in stdout


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (
            ["--task", "clasification"],
            "expected one of classification, sft, translation, summarization, qa, tagging",
        ),
        (
            ["--task", "classification", "--method", "lora", "--peft.alpah", 4],
            "lora has no option 'alpah' (did you mean 'alpha'?)",
        ),
        (
            ["--task", "classification", "--peft.r", 4],
            "PEFT options were given (--peft.*) but --method is full",
        ),
        (
            ["--task", "classification", "--columns.txt", "review"],
            "unknown field 'txt' (did you mean 'text'?)",
        ),
        (["--task", "classification", "--split_ratio", "0.5,0.2"], "split_ratio [0.5, 0.2] must add up to 1"),
        (["--task", "translation"], "task translation needs a model of arch encoder_decoder or decoder"),
        (["--task", "classification", "--options.max_lenght", 64], "did you mean 'max_length'"),
        (["--task", "classification", "--options.packing", "true"], "task classification has no option 'packing'"),
        (
            ["--task", "classification", "--options.max_length", 100],
            "max_length 100 is longer than the model's position table",
        ),
    ],
)
def test_finetune_mistakes_are_one_line(
    setup: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture, extra: list, expected: str
) -> None:
    base, data = setup
    args = ["finetune", "--model", base, "--data", data, "--columns.text", "review", "--columns.label", "sentiment",
            "--train.max_steps", 1, "--train.progress", "false", "--out", tmp_path / "run", *extra]  # fmt: skip
    code, _, err = run_cli(args, capsys)
    assert expected in one_line_error(code, err)


def test_missing_paths_and_eval_mistakes_are_one_line(
    setup: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    base, data = setup
    code, _, err = run_cli(
        ["finetune", "--model", tmp_path / "nope", "--data", data, "--task", "classification"], capsys
    )
    assert "model not found (a run directory, a Hugging Face folder or a GGUF file)" in one_line_error(code, err)
    code, _, err = run_cli(
        ["finetune", "--model", base, "--data", tmp_path / "nodata", "--task", "classification"], capsys
    )
    assert "data folder or file not found" in one_line_error(code, err)
    code, _, err = run_cli(["eval", "--model", base], capsys)
    assert "this run was not fine-tuned on a task (config.yaml has no 'task')" in one_line_error(code, err)
    code, _, err = run_cli(["eval", "--model", base, "--batch_size", 0], capsys)
    assert "--batch_size must be positive" in one_line_error(code, err)


def test_a_flag_beats_the_recipe_even_through_another_key(
    setup: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    base, data = setup
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"task: classification\ndata: {data}\nepochs: 4\ncolumns:\n  text: review\n  label: sentiment\n"
        "train:\n  progress: false\n  eval_every: 0\n",
        encoding="utf-8",
    )
    out = tmp_path / "run"
    code, _, err = run_cli(["finetune", "--config", recipe, "--model", base, "--out", out, "--train.max_steps", 5], capsys)
    assert code == 0
    assert f"--train.max_steps 5 (command line) wins over epochs: 4 ({recipe}:3)" in err
    assert json.loads((out / "finetune.json").read_text())["steps"] == 5


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--method", "lora", "--peft.rank", 8], "lora has no option 'rank' (did you mean 'r'?)"),
        (["--train.learning_rate", "1e-3"], "unknown option '--train.learning_rate' (did you mean '--train.lr'?)"),
        (["--train.wandb", "true"], "wandb logging needs the wandb package"),
    ],
)
def test_other_toolkits_spellings_get_lmforge_names_before_any_work(
    setup: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture, extra: list, expected: str
) -> None:
    pytest.importorskip("tokenizers")
    if "--train.wandb" in extra and __import__("importlib").util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    base, _ = setup
    missing_data = tmp_path / "no-such-data"  # never read: the mistake is reported first
    args = ["finetune", "--model", base, "--data", missing_data, "--task", "classification", "--out", tmp_path / "r", *extra]
    code, _, err = run_cli(args, capsys)
    assert expected in one_line_error(code, err)
