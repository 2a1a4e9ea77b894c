"""The command line: generated options, --config files, one-line errors with exit status 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any, Literal

import pytest

from lmforge import LMForgeError, ModelConfig
from lmforge.cli import build_parser, main, resolve_arguments


def test_attention_walkthrough_checks_itself(capsys: pytest.CaptureFixture) -> None:
    assert main(["attention", "--text", "hello", "--embed_dim", "8", "--num-heads", "2", "--explain"]) == 0
    out = capsys.readouterr().out
    for step in (
        "Q = X W_Q",
        "K = X W_K",
        "V = X W_V",
        "A = Q Kᵀ / √4",
        "α = softmax(A + mask)",
        "O = α V",
        "Y = concat(O_1 … O_H) W_O",
        "Causal: a token may not look",
    ):
        assert step in out
    assert "check: SelfAttention(x) equals the steps above" in out


def test_presets_lists_every_preset(capsys: pytest.CaptureFixture) -> None:
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "gpt2-small" in out and "124.4M" in out and "t5-small" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["atention"], "unknown command 'atention' (did you mean 'attention'?)"),
        (["attention", "--num_head", "3"], "unknown option '--num_head' (did you mean '--num_heads'?)"),
        (["attention", "--num_heads", "three"], "key '--num_heads': expected int, got 'three'"),
        (["attention", "--num_heads", "3"], "embed_dim 4 is not divisible by num_heads 3"),
        (["attention", "--causal", "perhaps"], "expected bool"),
        (["attention", "--config", "missing.yaml"], "missing.yaml: config file not found"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lmforge: error: ")
    assert message in err


def test_config_file_and_flags(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "explain.yaml"
    path.write_text("text: dog\nembed_dim: 6\nnum_heads: 3\n")
    assert main(["attention", "--config", str(path)]) == 0
    assert "T=3 tokens, E=6 features, H=3 heads of width D=2" in capsys.readouterr().out
    assert main(["attention", "--config", str(path), "--num_heads", "2"]) == 0  # the flag wins
    assert "H=2 heads of width D=3" in capsys.readouterr().out
    path.write_text("text: dog\nembed_dims: 6\n")
    assert main(["attention", "--config", str(path)]) == 2
    assert f"{path}:2: unknown key 'embed_dims' (did you mean 'embed_dim'?)" in capsys.readouterr().err


def toy_command(
    source: Path,
    *,
    model: ModelConfig = ModelConfig.from_name("tiny-decoder"),  # noqa: B008
    steps: int = 10,
    schedule: Literal["cosine", "linear"] = "cosine",
    tags: list[str] | None = None,
) -> dict:
    """A command with every kind of parameter, to test the generated options.

    Args:
        source: a positional path.
        model: a dataclass: --model.FIELD options and a `model:` section.
        steps: an int.
        schedule: a choice.
        tags: a list.
    """
    return {"source": source, "model": model, "steps": steps, "schedule": schedule, "tags": tags}


def resolve(argv: list[str]) -> dict:
    from lmforge.cli import _add_command, _Parser

    parser = _Parser(prog="t")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    _add_command(sub, "toy", toy_command)
    parsed = vars(parser.parse_args(["toy", *argv]))
    parsed.pop("command")
    args, kwargs = resolve_arguments(toy_command, parsed)
    return toy_command(*args, **kwargs)


def test_dataclass_parameters_take_sections_and_dotted_flags(tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text("steps: 50\nschedule: linear\nmodel:\n  embed_dim: 128\n  num_heads: 8\ntags: [a, b]\n")
    result = resolve(["data.txt", "--config", str(path), "--model.num_layers", "3"])
    model = result["model"]
    assert (model.embed_dim, model.num_heads, model.num_layers, model.head_dim) == (128, 8, 3, 16)
    assert model.vocab_size == 256  # from the default preset
    assert result["steps"] == 50 and result["schedule"] == "linear" and result["tags"] == ["a", "b"]
    assert result["source"] == Path("data.txt")
    assert resolve(["x", "--tags", "p,q"])["tags"] == ["p", "q"]

    path.write_text("model:\n  embed_dim: 128\n  num_hedas: 8\n")
    with pytest.raises(
        LMForgeError, match=r"recipe.yaml:3: unknown key 'model.num_hedas' \(did you mean 'num_heads'"
    ):
        resolve(["x", "--config", str(path)])
    with pytest.raises(
        LMForgeError, match=r"key '--model.num_heads': num_heads = 5: must divide embed_dim 64"
    ):
        resolve(["x", "--model.num_heads", "5"])
    with pytest.raises(
        LMForgeError, match="expected one of cosine, linear, got 'cosin' \\(did you mean 'cosine'"
    ):
        resolve(["x", "--schedule", "cosin"])
    with pytest.raises(LMForgeError, match="missing required SOURCE"):
        resolve([])


def test_help_is_generated_from_the_docstring() -> None:
    help_text = build_parser()._subparsers._group_actions[0].choices["attention"].format_help()
    assert "features per token (E)" in help_text and "--config FILE.yaml" in help_text


def test_python_dash_m_and_console_script() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lmforge", "attention", "--text", "ab"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0 and "check:" in result.stdout
    result = subprocess.run(
        [sys.executable, "-m", "lmforge", "attention", "--text", ""],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_group_commands(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """A table name with a space ("group command") becomes a second level of subcommands."""
    import lmforge.cli as cli

    seen = {}

    def train(files: list[str] | None = None, *, vocab_size: int = 100) -> int:
        """Train something.

        Args:
            files: inputs.
            vocab_size: a size.
        """
        seen.update(files=files, vocab_size=vocab_size)
        return 0

    monkeypatch.setattr(cli, "_commands", lambda: {"thing train": train, "attention": cli_attention})
    assert main(["thing", "train", "a.txt", "b.txt", "--vocab_size", "7"]) == 0
    assert seen == {"files": ["a.txt", "b.txt"], "vocab_size": 7}
    assert main(["thing", "train", "--vocab_sise", "7"]) == 2
    assert "unknown option '--vocab_sise' (did you mean '--vocab_size'?)" in capsys.readouterr().err
    assert main(["thing"]) == 2
    assert "'thing' needs a command: one of train" in capsys.readouterr().err


def cli_attention() -> int:
    return 0


def test_mapping_parameters_take_free_form_keys(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A dict parameter (e.g. a PEFT method's options) takes a YAML section and --name.KEY flags."""
    import lmforge.cli as cli

    seen = {}

    def tune(*, method: str = "lora", peft: dict[str, Any] | None = None) -> int:
        """Tune.

        Args:
            method: a method.
            peft: its options.
        """
        seen.update(method=method, peft=peft)
        return 0

    monkeypatch.setattr(cli, "_commands", lambda: {"tune": tune})
    path = tmp_path / "tune.yaml"
    path.write_text("method: ia3\npeft:\n  r: 4\n  target_modules: [q_proj]\n")
    assert main(["tune", "--config", str(path), "--peft.alpha", "16", "--peft.use_rslora=true"]) == 0
    assert seen == {
        "method": "ia3",
        "peft": {"r": 4, "target_modules": ["q_proj"], "alpha": 16, "use_rslora": True},
    }
    assert main(["tune"]) == 0 and seen["peft"] is None
    assert main(["tune", "--peftt.r", "3"]) == 2
