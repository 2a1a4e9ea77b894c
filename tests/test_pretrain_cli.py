"""``lmforge pretrain`` end to end (all three architectures, resume after Ctrl-C), its recipes,
its one-line errors, and ``lmforge demo``'s pieces at tiny size."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch

import lmforge
from lmforge.cli import main, resolve_arguments
from lmforge.commands.pretrain import pretrain
from lmforge.data import python_docs_corpus
from lmforge.training import Trainer

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "configs" / "pretrain").glob("*.yaml"))
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


@pytest.fixture(scope="module")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 60 kB of real English: the first documents of the embedded Python-docs corpus."""
    path = tmp_path_factory.mktemp("text") / "docs.txt"
    path.write_text("\n\n".join(python_docs_corpus(max_bytes=60_000)), encoding="utf-8")
    return path


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def tiny_args(text: Path, out: Path, *extra: str) -> list[str]:
    return [
        "pretrain",
        "--data.path",
        str(text),
        "--data.documents",
        "blank_line",
        "--data.seq_len",
        "32",
        "--train.batch_size",
        "8",
        "--train.lr",
        "3e-3",
        "--train.warmup_steps",
        "5",
        "--train.eval_batches",
        "4",
        "--train.progress",
        "false",
        "--out",
        str(out),
        *extra,
    ]


@pytest.mark.parametrize(
    ("preset", "kind", "vocab", "objective"),
    [
        ("tiny-decoder", "char", "200", "causal_lm"),
        ("tiny-encoder", "wordpiece", "400", "masked_lm"),
        ("tiny-encoder-decoder", "bpe", "400", "span_corruption"),
    ],
)
def test_pretrain_each_architecture_lowers_the_loss(
    text_file: Path, tmp_path: Path, preset: str, kind: str, vocab: str, objective: str, capsys
) -> None:
    out = tmp_path / "run"
    argv = tiny_args(text_file, out, "--model.preset", preset, "--tokenizer.kind", kind)
    argv += ["--tokenizer.vocab_size", vocab, "--train.max_steps", "40", "--train.eval_every", "20"]
    assert main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert f"objective {objective}" in printed and "validation loss" in printed
    logged = records(out)
    first = next(r["loss"] for r in logged if r["step"] == 1 and "loss" in r)
    evals = [r["eval_loss"] for r in logged if "eval_loss" in r]
    assert len(evals) == 2 and evals[-1] < first - 0.3, (first, evals)  # nats per target
    run = lmforge.load(out)
    assert run.config["objective"] == objective and run.model.config.arch == run.config["model"]["arch"]
    assert run.tokenizer is not None and run.tokenizer.vocab_size == run.model.config.vocab_size
    assert (out / "data" / "index.json").is_file() and (out / "trainer_state.json").is_file()


@pytest.mark.parametrize(("preset", "kind"), [("tiny-decoder", "char"), ("tiny-encoder", "wordpiece")])
def test_ctrl_c_then_resume_gives_the_losses_of_an_uninterrupted_run(
    text_file: Path, tmp_path: Path, preset: str, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One tokenizer for both runs: WordPiece training in the tokenizers library is not
    # deterministic (huggingface/tokenizers#1794), and this test is about the loop.
    from lmforge.tokenizers import Tokenizer

    Tokenizer.train(text_file, kind=kind, vocab_size=400, show_progress=False).save(
        tmp_path / "tok" / "tokenizer.json"
    )
    common = ["--model.preset", preset, "--tokenizer.path", str(tmp_path / "tok" / "tokenizer.json")]
    common += ["--train.max_steps", "16", "--train.eval_batches", "2"]
    common += [
        "--train.log_every",
        "1",
        "--train.eval_every",
        "8",
        "--train.save_every",
        "4",
        "--train.precision",
        "fp32",
    ]
    full, split = tmp_path / "full", tmp_path / "split"
    assert main(tiny_args(text_file, full, *common)) == 0

    original_save = Trainer.save

    def save_then_ctrl_c(self: Trainer) -> Path:  # Ctrl-C right after the step-4 checkpoint
        path = original_save(self)
        if self.state.step == 4:
            signal.raise_signal(signal.SIGINT)
        return path

    monkeypatch.setattr(Trainer, "save", save_then_ctrl_c)
    assert main(tiny_args(text_file, split, *common)) == 130  # interrupted, checkpoint saved
    monkeypatch.undo()
    assert json.loads((split / "trainer_state.json").read_text())["step"] == 5  # the step in flight
    assert main(tiny_args(text_file, split, *common, "--resume")) == 0
    losses = {r["step"]: r["loss"] for r in records(full) if "loss" in r}
    resumed = {r["step"]: r["loss"] for r in records(split) if "loss" in r}
    assert resumed == losses  # every step, before and after the interruption, bit for bit
    evals = [(r["step"], r["eval_loss"]) for r in records(split) if "eval_loss" in r]
    assert evals == [(r["step"], r["eval_loss"]) for r in records(full) if "eval_loss" in r]


def one_line_error(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmforge: error: ") and err.count("\n") == 1, err
    return err


def test_config_mistakes_are_one_line_with_file_line_and_key(tmp_path: Path, capsys) -> None:
    config = tmp_path / "recipe.yaml"
    config.write_text("model:\n  arch: decoder\ntrain:\n  max_steps: 10\n  lrr: 0.1\n")
    err = one_line_error(["pretrain", "--config", str(config)], capsys)
    assert f"{config}:5: unknown key 'train.lrr' (did you mean 'lr'?)" in err
    config.write_text("train:\n  max_steps: many\n")
    err = one_line_error(["pretrain", "--config", str(config)], capsys)
    assert f"{config}:2: key 'train.max_steps': expected int, got 'many'" in err
    config.write_text("model:\n  preset: tiny-lama\n")
    err = one_line_error(["pretrain", "--config", str(config)], capsys)
    assert f"{config}:2: key 'model.preset': unknown preset 'tiny-lama' (did you mean 'tiny-llama'?)" in err
    config.write_text("dataa:\n  path: x.txt\n")
    err = one_line_error(["pretrain", "--config", str(config)], capsys)
    assert f"{config}:1: unknown key 'dataa' (did you mean 'data'?)" in err
    err = one_line_error(["pretrain", "--train.lrr", "0.1"], capsys)
    assert "unknown option '--train.lrr' (did you mean '--train.lr'?)" in err
    err = one_line_error(["pretrain", "--model.num_heads", "3"], capsys)
    assert "key '--model.num_heads': num_heads = 3: must divide embed_dim 128" in err


def test_data_and_run_directory_mistakes(text_file: Path, tmp_path: Path, capsys) -> None:
    missing = tmp_path / "nope.txt"
    err = one_line_error(tiny_args(missing, tmp_path / "run"), capsys)
    assert f"{missing}: file not found" in err
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert f"{empty}: file is empty" in one_line_error(tiny_args(empty, tmp_path / "run"), capsys)
    err = one_line_error(tiny_args(text_file, tmp_path / "run", "--resume"), capsys)
    assert "nothing to resume" in err
    err = one_line_error(
        tiny_args(text_file, tmp_path / "run", "--model.arch", "encoder", "--objective", "causal_lm"), capsys
    )
    assert "objective causal_lm does not fit arch encoder" in err
    err = one_line_error(tiny_args(text_file, tmp_path / "run", "--model.max_seq_len", "16"), capsys)
    assert "key 'model.max_seq_len': model.max_seq_len 16 is shorter than data.seq_len 32" in err
    args = tiny_args(text_file, tmp_path / "run", "--tokenizer.kind", "char", "--train.max_steps", "2")
    assert main(args) == 0
    capsys.readouterr()
    assert "add --resume to continue a run there" in one_line_error(args, capsys)


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipes_resolve(recipe: Path) -> None:
    args, kwargs = resolve_arguments(pretrain, {"config": str(recipe)})
    assert not args
    model = kwargs["model"]
    config = model.build(vocab_size=kwargs["tokenizer"].vocab_size, max_seq_len=kwargs["data"].seq_len)
    assert config.max_seq_len >= kwargs["data"].seq_len
    assert str(kwargs["out"]).startswith("runs/")


def test_shakespeare_recipe_has_nanogpt_cpu_shape() -> None:
    _, kwargs = resolve_arguments(pretrain, {"config": str(REPO / "configs/pretrain/shakespeare-char.yaml")})
    config = kwargs["model"].build(vocab_size=65, max_seq_len=kwargs["data"].seq_len)
    train = kwargs["train"]
    assert (config.num_layers, config.num_heads, config.embed_dim, config.dropout) == (4, 4, 128, 0.0)
    assert (kwargs["data"].seq_len, train.batch_size, train.max_steps) == (64, 12, 2000)
    assert kwargs["tokenizer"].kind == "char"


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipes_run_as_they_are(recipe: Path, tmp_path: Path, monkeypatch) -> None:
    if recipe.stem.startswith("shakespeare") and not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} is absent (../shared/data not present)")
    monkeypatch.chdir(REPO)
    argv = ["pretrain", "--config", str(recipe), "--train.max_steps", "3", "--train.eval_batches", "2"]
    assert main([*argv, "--train.progress", "false", "--out", str(tmp_path / "run")]) == 0
    assert lmforge.load(tmp_path / "run").model is not None


# ---- lmforge demo ---------------------------------------------------------------------------------


def test_text_curve_puts_points_where_they_belong() -> None:
    from lmforge.pipeline.demo import text_curve

    plot = text_curve([(0, 8.0), (50, 6.0), (100, 4.0)], width=21, height=5).splitlines()
    assert plot[0].startswith("  8.000 ┤●") and plot[4].startswith("  4.000 ┤")
    assert plot[4].endswith("●") and plot[2][8 + 1 + 10] == "●"  # the middle point, middle row and column
    assert "step 0" in plot[-1] and plot[-1].rstrip().endswith("100")


def test_demo_replaces_only_an_earlier_demo_run(tmp_path: Path) -> None:
    from lmforge.pipeline.demo import is_demo_run, run_demo

    earlier = tmp_path / "run"
    (earlier / "data").mkdir(parents=True)
    (earlier / "config.yaml").write_text("model: {}\ndemo: {minutes: 3}\n")
    assert is_demo_run(earlier)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert not is_demo_run(other)
    with pytest.raises(lmforge.LMForgeError, match=r"not empty \(it holds notes.txt\).*--overwrite"):
        run_demo(out=other, max_steps=1, progress=False)
    assert (other / "notes.txt").read_text() == "mine"  # nothing touched


def test_validation_batches_are_the_same_at_every_evaluation(text_file: Path, tmp_path: Path) -> None:
    from lmforge.pipeline.pretraining import DataSection, ModelSection, TokenizerSection, build_pretraining
    from lmforge.training import TrainConfig

    run = build_pretraining(
        model=ModelSection(preset="tiny-encoder"),
        tokenizer=TokenizerSection(kind="wordpiece", vocab_size=400),
        data=DataSection(path=text_file, documents="blank_line", seq_len=32, val_fraction=0.3),
        train=TrainConfig(batch_size=4, eval_batches=2),
        run_dir=tmp_path,
        progress=False,
    )
    first, second = (list(run.eval_batches)[:2] for _ in range(2))  # a capped evaluation, then another
    for a, b in zip(first, second, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_demo_at_tiny_size(text_file: Path, tmp_path: Path) -> None:
    from lmforge.pipeline.demo import PROMPTS, demo_sections, run_demo
    from lmforge.pipeline.pretraining import DataSection

    model, tokenizer, _ = demo_sections(vocab_size=320, width=32, layers=1, seq_len=32)
    data = DataSection(
        path=text_file, documents="blank_line", seq_len=32, val_fraction=0.1, split="documents"
    )
    lines: list[str] = []
    result = run_demo(
        out=tmp_path / "demo",
        max_steps=30,
        sections=(model, tokenizer, data),
        batch_size=8,
        progress=False,
        log=lines.append,
    )
    assert result.curve[0][0] == 0 and result.curve[-1][0] == 30
    assert result.curve[-1][1] < result.curve[0][1] - 0.5  # the validation loss fell
    assert [s.split()[0] for s in result.samples_after] == [p.split()[0] for p in PROMPTS]
    assert result.samples_before != result.samples_after
    report = "\n".join(lines)
    assert "samples before training" in report and "samples after training" in report and "┤" in report
    loaded = lmforge.load(tmp_path / "demo")  # a run directory lmforge generate can use
    assert loaded.tokenizer.kind == "bpe" and loaded.model.config.position == "rope"
    assert (
        main(["generate", "--model", str(tmp_path / "demo"), "--prompt", "The", "--max_new_tokens", "5"]) == 0
    )


def test_demo_calibration_times_steps_without_touching_the_model(text_file: Path, tmp_path: Path) -> None:
    from lmforge.pipeline.demo import demo_sections, demo_train_config
    from lmforge.pipeline.pretraining import DataSection, build_pretraining, seconds_per_step

    model, tokenizer, _ = demo_sections(vocab_size=320, width=32, layers=1, seq_len=32)
    data = DataSection(path=text_file, documents="blank_line", seq_len=32)
    config = demo_train_config(max_steps=10, minutes=None, batch_size=4, progress=False)
    run = build_pretraining(
        model=model, tokenizer=tokenizer, data=data, train=config, run_dir=tmp_path, progress=False
    )
    before = [p.clone() for p in run.model.parameters()]
    seconds = seconds_per_step(run.model, run.objective, run.train_batches, config)
    assert 0 < seconds < 60
    assert all(torch.equal(a, b) for a, b in zip(before, run.model.parameters(), strict=True))


@pytest.mark.slow
def test_lmforge_demo_runs_whole(tmp_path: Path, capsys) -> None:
    assert main(["demo", "--out", str(tmp_path / "demo"), "--minutes", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "samples after training" in out and "validation loss" in out
    assert lmforge.load(tmp_path / "demo").tokenizer is not None


def test_pretrain_says_what_it_is_about_to_do_before_it_starts(text_file: Path, tmp_path: Path, capsys) -> None:
    argv = tiny_args(text_file, tmp_path / "run", "--model.preset", "tiny-decoder", "--tokenizer.kind", "char")
    assert main([*argv, "--train.max_steps", "6", "--train.progress", "true"]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    plan = next(line for line in printed.splitlines() if "steps of 8×1 sequences" in line)
    assert plan.startswith("pretrain: 6 steps") and "minutes of training on this machine (timed on 3 steps)" in plan
    before = printed[: printed.index(plan)]
    assert "decoder" in before and "objective causal_lm" in before  # the model and objective come first
