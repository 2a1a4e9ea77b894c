"""Run directories: save_run / lmforge.load round trip, atomic writes, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

import lmforge
from lmforge import LMForgeError, ModelConfig, Transformer
from lmforge import runs as runs_module
from lmforge.tokenizers import Tokenizer

TEXT = [
    "the quick brown fox jumps over the lazy dog",
    "pack my box with five dozen liquor jugs",
    "héllo 世界",
]


def char_tokenizer() -> Tokenizer:
    return Tokenizer.train(iter(TEXT), kind="char", vocab_size=200, show_progress=False)


def model_for(tokenizer: Tokenizer, preset: str = "tiny-decoder") -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_name(preset, vocab_size=tokenizer.vocab_size))


@pytest.mark.parametrize("preset", ["tiny-decoder", "tiny-encoder", "tiny-encoder-decoder", "tiny-llama"])
def test_save_and_load_round_trip(tmp_path: Path, preset: str) -> None:
    tokenizer = char_tokenizer()
    model = model_for(tokenizer, preset).eval()
    path = lmforge.save_run(
        tmp_path / "run", model=model, tokenizer=tokenizer, config={"train": {"lr": 0.001}}
    )
    assert sorted(p.name for p in path.iterdir()) == [
        "config.yaml",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    loaded = lmforge.load(path)
    assert isinstance(loaded, lmforge.LoadedRun) and loaded.path == path
    assert loaded.config["train"] == {"lr": 0.001}
    assert loaded.config["model"] == model.config.to_dict()
    assert loaded.config["tokenizer"]["vocab_size"] == tokenizer.vocab_size
    assert loaded.model.config == model.config and not loaded.model.training
    ids = torch.tensor([tokenizer.encode("the lazy fox 世界")])
    kwargs = {"decoder_input_ids": ids} if preset == "tiny-encoder-decoder" else {}
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.model(ids, **kwargs).logits, model(ids, **kwargs).logits, rtol=0, atol=0
        )
    assert loaded.tokenizer.encode("héllo") == tokenizer.encode("héllo")
    assert loaded.tokenizer.special_tokens == tokenizer.special_tokens


def test_load_casts_dtype_and_keeps_ties(tmp_path: Path) -> None:
    tokenizer = char_tokenizer()
    lmforge.save_run(tmp_path, model=model_for(tokenizer), tokenizer=tokenizer)
    loaded = lmforge.load(tmp_path, dtype=torch.bfloat16)
    assert loaded.model.tok_embed.weight.dtype == torch.bfloat16
    assert loaded.model.head.proj.weight is loaded.model.tok_embed.weight


def test_a_new_run_directory_appears_whole_or_not_at_all(tmp_path: Path, monkeypatch) -> None:
    tokenizer = char_tokenizer()

    def fails(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(runs_module, "save_weights", fails)
    with pytest.raises(OSError):
        lmforge.save_run(tmp_path / "run", model=model_for(tokenizer), tokenizer=tokenizer)
    assert list(tmp_path.iterdir()) == []  # neither the run nor its temporary folder


def test_tokenizer_that_does_not_match_the_model_is_one_line(tmp_path: Path) -> None:
    tokenizer = char_tokenizer()
    lmforge.save_run(tmp_path, model=model_for(tokenizer), tokenizer=tokenizer)
    other = Tokenizer.train(iter(["only a few letters"]), kind="char", vocab_size=200, show_progress=False)
    other.save(tmp_path / "tokenizer.json")  # someone copied the wrong tokenizer in
    with pytest.raises(LMForgeError) as err:
        lmforge.load(tmp_path)
    message = err.value.one_line()
    assert "tokenizer.json" in message and "does not match the model" in message
    assert f"it has {other.vocab_size} tokens" in message and "\n" not in message


def test_tokenizer_larger_than_the_embedding_is_an_error(tmp_path: Path) -> None:
    tokenizer = char_tokenizer()
    model = Transformer(ModelConfig.from_name("tiny-decoder", vocab_size=tokenizer.vocab_size - 5))
    lmforge.save_run(tmp_path, model=model, tokenizer=tokenizer, config={})
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    del config["tokenizer"]["vocab_size"]  # nothing recorded: the embedding size still decides
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(LMForgeError, match=f"the model expects at most {tokenizer.vocab_size - 5}"):
        lmforge.load(tmp_path)


def test_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(LMForgeError, match="run directory not found"):
        lmforge.load(tmp_path / "nothing")
    with pytest.raises(LMForgeError, match="not a run directory: no config.yaml"):
        lmforge.load(tmp_path)
    tokenizer = char_tokenizer()
    lmforge.save_run(tmp_path / "run", model=model_for(tokenizer), tokenizer=tokenizer)
    config_path = tmp_path / "run" / "config.yaml"
    text = config_path.read_text().replace("num_layers: 2", "num_layers: 3")
    config_path.write_text(text)
    with pytest.raises(LMForgeError, match="missing tensor 'decoder.layers.2"):
        lmforge.load(tmp_path / "run")
    config_path.write_text(text.replace("num_layers: 3", "num_layers: two"))
    with pytest.raises(LMForgeError) as err:
        lmforge.load(tmp_path / "run")
    line = next(i for i, t in enumerate(text.splitlines(), 1) if "num_layers" in t)
    assert err.value.one_line().startswith(f"{config_path}:{line}: key 'model.num_layers': expected int")
    (tmp_path / "run" / "model.safetensors").write_bytes(b"not safetensors")
    config_path.write_text(text.replace("num_layers: 3", "num_layers: 2"))
    with pytest.raises(LMForgeError, match="cannot read safetensors weights"):
        lmforge.load(tmp_path / "run")


def test_weights_of_the_wrong_shape_name_the_tensor(tmp_path: Path) -> None:
    tokenizer = char_tokenizer()
    lmforge.save_run(tmp_path, model=model_for(tokenizer), tokenizer=tokenizer)
    config_path = tmp_path / "config.yaml"
    config = yaml.safe_load(config_path.read_text())
    config["model"]["mlp_hidden_dim"] = 128
    config_path.write_text(yaml.safe_dump(config))
    with pytest.raises(
        LMForgeError, match=r"key 'decoder.layers.0.mlp.*': weights do not fit the model: shape"
    ):
        lmforge.load(tmp_path)


def test_hugging_face_folder_goes_to_interop(tmp_path: Path) -> None:
    pytest.importorskip("lmforge.interop.hf", reason="Hugging Face interop (lmforge.interop.hf) not present")
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=128)
    torch.manual_seed(0)
    reference = transformers.GPT2LMHeadModel(config).eval()
    reference.save_pretrained(tmp_path)
    assert not (tmp_path / "config.yaml").exists() and json.loads((tmp_path / "config.json").read_text())
    loaded = lmforge.load(tmp_path)
    assert loaded.config == {} and loaded.tokenizer is None
    ids = torch.randint(0, 128, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)
