"""Hugging Face folders lmforge must refuse — unknown families, config values it cannot honour,
missing, unexpected or misshapen tensors, pickles — each with one line naming the key or
tensor (exit status 2 on the command line), and models export cannot represent."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")

from lmforge import LMForgeError, ModelConfig, Transformer  # noqa: E402
from lmforge.cli import main  # noqa: E402
from lmforge.interop import load_hf_model, save_hf  # noqa: E402

GPT2 = dict(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2)
LLAMA = dict(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)


def folder(tmp_path: Path, cls: str, config_cls: str, **config) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "hf"
    getattr(transformers, cls)(getattr(transformers, config_cls)(**config)).save_pretrained(path)
    return path


@pytest.fixture
def gpt2(tmp_path: Path) -> Path:
    return folder(tmp_path, "GPT2LMHeadModel", "GPT2Config", **GPT2)


def edit_config(path: Path, **changes) -> None:
    data = json.loads((path / "config.json").read_text())
    data.update(changes)
    (path / "config.json").write_text(json.dumps(data))


def edit_weights(path: Path, fn: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(path / "model.safetensors")
    fn(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def refused(path: Path, *needles: str, **kwargs) -> str:
    """load_hf_model raises one line containing every needle; the CLI prints it and exits 2."""
    with pytest.raises(LMForgeError) as info:
        load_hf_model(path, **kwargs)
    message = info.value.one_line()
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


@pytest.mark.parametrize(
    ("changes", "needles"),
    [
        ({"model_type": "gptj"}, ["key 'model_type'", "'gptj' is not supported"]),
        ({"architectures": ["GPT2DoubleHeadsModel"]}, ["key 'architectures'", "GPT2DoubleHeadsModel"]),
        ({"scale_attn_by_inverse_layer_idx": True}, ["key 'scale_attn_by_inverse_layer_idx'"]),
        ({"scale_attn_weights": False}, ["key 'scale_attn_weights'"]),
        ({"add_cross_attention": True}, ["key 'add_cross_attention'"]),
        ({"my_new_feature": 3}, ["key 'my_new_feature'", "unsupported gpt2 setting"]),
        ({"n_layer": "two"}, ["key 'n_layer'", "expected int, got 'two'"]),
        ({"n_head": 3}, ["key 'n_head'", "must divide embed_dim 16"]),
        ({"activation_function": "quick_gelu"}, ["key 'activation_function'", "quick_gelu"]),
    ],
)
def test_unsupported_config_values_name_the_key(gpt2: Path, changes: dict, needles: list[str]) -> None:
    edit_config(gpt2, **changes)
    message = refused(gpt2, *needles)
    assert str(gpt2 / "config.json") in message


@pytest.mark.parametrize(
    ("config", "needles"),
    [
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, ["key 'rope_scaling'", "'linear'"]),
        (
            {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
            ["'rope_parameters'", "'yarn'"],
        ),
        ({"attention_bias": False, "mlp_bias": True}, ["key 'mlp_bias'"]),
        ({"partial_rotary_factor": 0.5}, ["key 'partial_rotary_factor'"]),
    ],
)
def test_llama_settings_lmforge_cannot_honour(tmp_path: Path, config: dict, needles: list[str]) -> None:
    path = folder(tmp_path, "LlamaForCausalLM", "LlamaConfig", **LLAMA)
    edit_config(path, **config)
    refused(path, *needles)


def test_qwen2_sliding_window_and_bert_relative_positions_are_refused(tmp_path: Path) -> None:
    path = folder(tmp_path, "Qwen2ForCausalLM", "Qwen2Config", **LLAMA)
    edit_config(path, use_sliding_window=True)
    refused(path, "key 'use_sliding_window'")
    bert = folder(
        tmp_path / "b",
        "BertModel",
        "BertConfig",
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
    )
    edit_config(bert, position_embedding_type="relative_key")
    refused(bert, "key 'position_embedding_type'", "'relative_key'")
    edit_config(bert, position_embedding_type="absolute", is_decoder=True)
    refused(bert, "key 'is_decoder'")


def test_missing_unexpected_and_misshapen_tensors_are_named(gpt2: Path) -> None:
    original = load_file(gpt2 / "model.safetensors")
    edit_weights(gpt2, lambda t: t.pop("transformer.h.1.mlp.c_fc.bias"))
    refused(gpt2, "missing tensor 'transformer.h.1.mlp.c_fc.bias'")

    save_file(original, gpt2 / "model.safetensors", metadata={"format": "pt"})
    edit_weights(gpt2, lambda t: t.update({"transformer.h.0.attn.rotary.weight": torch.zeros(2)}))
    refused(gpt2, "unexpected tensor 'transformer.h.0.attn.rotary.weight'")

    save_file(original, gpt2 / "model.safetensors", metadata={"format": "pt"})
    edit_weights(gpt2, lambda t: t.update({"transformer.wpe.weight": t["transformer.wpe.weight"][:10]}))
    refused(gpt2, "tensor 'transformer.wpe.weight' has shape [10, 16] but config.json implies [16, 16]")

    save_file(original, gpt2 / "model.safetensors", metadata={"format": "pt"})
    edit_weights(gpt2, lambda t: t.update({"transformer.h.0.attn.bias": torch.ones(1, 1, 16, 16)}))
    load_hf_model(gpt2)  # an old checkpoint's causal-mask buffer is deliberately ignored


def test_untied_config_without_a_head_matrix_is_missing_lm_head(tmp_path: Path) -> None:
    path = folder(tmp_path, "GPT2LMHeadModel", "GPT2Config", **GPT2)
    edit_config(path, tie_word_embeddings=False)
    refused(path, "missing tensor 'lm_head.weight'")


class Exploit:
    """A pickle that would create a file when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickled_code_in_pytorch_model_bin_is_never_run(gpt2: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    (gpt2 / "model.safetensors").unlink()
    torch.save({"transformer.wte.weight": Exploit(marker)}, gpt2 / "pytorch_model.bin")
    refused(gpt2, "pytorch_model.bin", "cannot read as a weights-only PyTorch file")
    assert not marker.exists()


def test_folders_that_are_not_checkpoints(tmp_path: Path, gpt2: Path) -> None:
    refused(tmp_path / "nowhere", "not a folder")
    (tmp_path / "empty").mkdir()
    refused(tmp_path / "empty", "no config.json")
    (gpt2 / "model.safetensors").unlink()
    refused(gpt2, "no weights found", "model.safetensors")
    (gpt2 / "config.json").write_text('{"model_type": "gpt2",\n "n_layer": }')
    refused(gpt2, "invalid JSON", "config.json:2")


def test_cli_convert_reports_one_line_and_exit_2(
    gpt2: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    edit_config(gpt2, rope_scaling={"type": "dynamic"})
    assert main(["convert", "--to", "lmforge", str(gpt2), str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lmforge: error: ")
    assert "key 'rope_scaling'" in err and not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        (ModelConfig.from_name("tiny-decoder", position="alibi"), "no Hugging Face family has arch=decoder"),
        (
            ModelConfig.from_name("tiny-decoder", prenorm=False),
            "prenorm = False has no Hugging Face equivalent",
        ),
        (ModelConfig.from_name("tiny-llama", logit_scale=0.5), "logit_scale = 0.5"),
        (ModelConfig.from_name("tiny-encoder", head="classification", pooling="mean"), "this classification head pools by 'mean'"),
        (
            ModelConfig.from_name(
                "tiny-encoder-decoder",
                position="relative",
                norm="rmsnorm",
                bias=False,
                attn_scale=1.0,
                scale_embeddings=False,
                activation="gelu",
                gated_mlp=True,
            ),
            "gated MLP with exact GELU",
        ),
    ],
)
def test_export_refuses_what_transformers_cannot_represent(
    tmp_path: Path, config: ModelConfig, needle: str
) -> None:
    with pytest.raises(LMForgeError) as info:
        save_hf(Transformer(config), None, tmp_path)
    assert needle in info.value.one_line()
    assert not (tmp_path / "model.safetensors").exists()


def test_export_of_a_decoder_classifier_with_a_bias(tmp_path: Path) -> None:
    plain = Transformer(ModelConfig.from_name("tiny-decoder", head="classification", pooling="last"))
    assert plain.head.classifier.bias is None  # decoders classify without a bias by default, as HF does
    save_hf(plain, None, tmp_path / "plain")
    model = Transformer(
        ModelConfig.from_name("tiny-decoder", head="classification", pooling="last", classifier_bias=True)
    )
    save_hf(model, None, tmp_path / "zero")  # a zero bias is exactly the bias-free score layer
    with torch.no_grad():
        model.head.classifier.bias.fill_(0.5)
    with pytest.raises(LMForgeError, match="head.classifier.bias' is not zero"):
        save_hf(model, None, tmp_path / "trained")
    with pytest.raises(LMForgeError, match="cannot export as qwen2"):
        save_hf(Transformer(ModelConfig.from_name("tiny-llama")), None, tmp_path / "q", model_type="qwen2")
