"""Output folders are never clobbered: every command that writes a folder writes into a new or
empty one (or its own run, with --resume); anything else is one line, exit 2, nothing touched —
unless --overwrite, which replaces the folder as a whole. A --out that is a file, or inside one,
is one line too."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

import lmforge
from lmforge import ModelConfig, Transformer
from lmforge.cli import main
from lmforge.tokenizers import Tokenizer

WORDS = ["the", "movie", "plot", "was", "very", "good", "bad", "and", "it"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inputs")
    tokenizer = Tokenizer.train(iter([" ".join(WORDS)] * 10), kind="wordpiece", vocab_size=60, show_progress=False)
    torch.manual_seed(0)
    config = ModelConfig.from_name("tiny-encoder", vocab_size=tokenizer.vocab_size, pooler=True)  # BERT-like
    base = lmforge.save_run(root / "base", model=Transformer(config), tokenizer=tokenizer)
    data = root / "data"
    data.mkdir()
    rng = random.Random(0)
    for split in ("train", "validation"):
        rows = [{"text": " ".join(rng.sample(WORDS, 4)), "label": rng.choice(["pos", "neg"])} for _ in range(24)]
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = root / "text.txt"
    text.write_text("the plot was very good and it was fun. " * 40)
    quiet = ["--train.progress", "false", "--train.max_steps", "2", "--train.eval_every", "0"]
    adapter = root / "adapter-run"
    argv = ["finetune", "--model", base, "--data", data, "--task", "classification", "--method", "lora",
            "--out", adapter, *quiet]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    hf = root / "hf"
    assert main(["convert", str(base), str(hf), "--to", "hf"]) == 0
    return {"base": base, "data": data, "text": text, "adapter": adapter, "hf": hf}


def commands(inputs: dict[str, Path], out: Path) -> dict[str, list[str]]:
    quiet = ["--train.progress", "false", "--train.max_steps", "2", "--train.eval_every", "0"]
    return {
        "pretrain": ["pretrain", "--model.preset", "tiny-decoder", "--tokenizer.kind", "char", "--data.path",
                     str(inputs["text"]), "--data.seq_len", "16", "--out", str(out), *quiet],
        "finetune": ["finetune", "--model", str(inputs["base"]), "--data", str(inputs["data"]), "--task",
                     "classification", "--out", str(out), *quiet],
        "merge": ["merge", str(inputs["adapter"]), str(out)],
        "convert --to hf": ["convert", str(inputs["base"]), str(out), "--to", "hf"],
        "convert --to hf-peft": ["convert", str(inputs["adapter"]), str(out), "--to", "hf-peft"],
        "convert --to lmforge": ["convert", str(inputs["hf"]), str(out), "--to", "lmforge"],
        "tokenizer train": ["tokenizer", "train", str(inputs["text"]), "--kind", "char", "--out", str(out),
                            "--progress", "false"],
        "demo": ["demo", "--out", str(out), "--minutes", "0.1"],
    }  # fmt: skip


NAMES = ["pretrain", "finetune", "merge", "convert --to hf", "convert --to hf-peft", "convert --to lmforge",
         "tokenizer train", "demo"]  # fmt: skip


def one_line(capsys: pytest.CaptureFixture) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("lmforge: error: "), err
    return err[0]


@pytest.mark.parametrize("name", NAMES)
def test_an_occupied_folder_is_refused_and_left_alone(
    inputs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture, name: str
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(commands(inputs, out)[name]) == 2
    line = one_line(capsys)
    assert "not empty (it holds notes.txt)" in line and "--overwrite" in line
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("name", NAMES)
def test_an_out_that_is_a_file_or_inside_one_is_one_line(
    inputs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture, name: str
) -> None:
    afile = tmp_path / "a-file"
    afile.write_text("x")
    assert main(commands(inputs, afile)[name]) == 2
    assert "is a file, not a folder" in one_line(capsys)
    assert main(commands(inputs, afile / "sub")[name]) == 2
    assert "inside a file" in one_line(capsys)
    assert afile.read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere: an unwritable folder needs another user")
@pytest.mark.parametrize("name", ["finetune", "merge", "tokenizer train"])
def test_an_unwritable_place_is_one_line(
    inputs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture, name: str
) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert main(commands(inputs, locked / "out")[name]) == 2
        assert "is not writable" in one_line(capsys)
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize("name", [n for n in NAMES if n != "demo"])
def test_overwrite_replaces_the_folder_as_a_whole(
    inputs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture, name: str
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("old run")
    assert main([*commands(inputs, out)[name], "--overwrite"]) == 0, capsys.readouterr().err
    assert not (out / "notes.txt").exists() and any(out.iterdir())  # the new output only, never a mix
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_resume_needs_a_run_and_a_run_needs_resume(
    inputs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    argv = commands(inputs, out)["finetune"]
    assert main([*argv, "--resume"]) == 2
    assert "nothing to resume" in one_line(capsys)
    assert main(argv) == 0
    capsys.readouterr()
    assert main(argv) == 2
    assert "--resume to continue a run there" in one_line(capsys)
    assert main([*argv, "--resume"]) == 0


def test_the_help_says_what_overwrite_does(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    assert "--overwrite" in capsys.readouterr().out


def test_label_names_go_to_hugging_face_and_come_back(
    inputs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    merged = tmp_path / "merged"
    assert main(["merge", str(inputs["adapter"]), str(merged)]) == 0
    hf = tmp_path / "hf"
    assert main(["convert", str(merged), str(hf), "--to", "hf"]) == 0
    config = json.loads((hf / "config.json").read_text())
    assert config["id2label"] == {"0": "neg", "1": "pos"} and config["label2id"] == {"neg": 0, "pos": 1}
    back = tmp_path / "back"
    assert main(["convert", str(hf), str(back), "--to", "lmforge"]) == 0
    capsys.readouterr()
    assert main(["predict", "--model", str(back), "--text", "the movie was good"]) == 0
    assert capsys.readouterr().out.split(" → ")[1].split()[0] in ("neg", "pos")  # names, not LABEL_0
