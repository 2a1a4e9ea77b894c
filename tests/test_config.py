"""ModelConfig: presets, the depth dial, YAML round trip, and errors that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmforge import PRESETS, LMForgeError, ModelConfig
from lmforge.errors import ConfigError
from lmforge.model import parameter_count


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_yaml_round_trip(name: str, tmp_path: Path) -> None:
    config = ModelConfig.from_name(name)
    path = tmp_path / "model.yaml"
    config.to_yaml(path)
    assert ModelConfig.from_yaml(path) == config


def test_from_yaml_accepts_a_model_section(tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text("model:\n  arch: encoder\n  head: mlm\n  embed_dim: 96\n  num_heads: 3\n")
    config = ModelConfig.from_yaml(path)
    assert (config.arch, config.embed_dim, config.head_dim) == ("encoder", 96, 32)


def test_derived_fields() -> None:
    config = ModelConfig(embed_dim=96, num_heads=6)
    assert (config.head_dim, config.num_kv_heads, config.mlp_hidden_dim) == (16, 6, 384)
    gated = ModelConfig(embed_dim=96, num_heads=6, gated_mlp=True)
    assert gated.mlp_hidden_dim == 256  # 8/3 · 96 rounded up to a multiple of 64
    # replace() derives them again unless they were set by hand
    wider = config.replace(embed_dim=192)
    assert (wider.head_dim, wider.mlp_hidden_dim) == (32, 768)
    fixed = ModelConfig(embed_dim=96, num_heads=6, mlp_hidden_dim=100).replace(embed_dim=192)
    assert fixed.mlp_hidden_dim == 100


def test_depth_dial() -> None:
    config = ModelConfig.from_depth(6)
    assert (config.num_layers, config.embed_dim, config.num_heads, config.head_dim) == (6, 384, 6, 64)
    assert ModelConfig.from_depth(2, arch="encoder").head == "mlm"
    assert parameter_count(ModelConfig.from_depth(4)) < parameter_count(ModelConfig.from_depth(8))
    with pytest.raises(ConfigError, match="depth"):
        ModelConfig.from_depth(0)


@pytest.mark.parametrize(
    ("fields", "key", "words"),
    [
        ({"embed_dim": 100, "num_heads": 3}, "num_heads", "num_heads = 3: must divide embed_dim 100"),
        ({"num_heads": 4, "num_kv_heads": 3}, "num_kv_heads", "num_kv_heads = 3: must divide num_heads 4"),
        ({"arch": "decodr"}, "arch", "did you mean 'decoder'"),
        ({"position": "rotary"}, "position", "must be one of"),
        ({"dropout": 1.0}, "dropout", "[0, 1)"),
        ({"arch": "decoder", "head": "mlm"}, "head", "needs arch encoder"),
        ({"arch": "encoder", "head": "lm"}, "head", "uses head mlm"),
        ({"num_decoder_layers": 2}, "num_decoder_layers", "only applies"),
        ({"position": "rope", "embed_dim": 60, "num_heads": 4}, "head_dim", "even for RoPE"),
        ({"pad_token_id": 300}, "pad_token_id", "below vocab_size"),
    ],
)
def test_invalid_configs_name_the_field_and_why(fields: dict, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        ModelConfig(**fields)
    assert info.value.key == key
    assert words in str(info.value)


def test_unknown_key_and_wrong_type_from_yaml_name_file_line_and_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("arch: decoder\nembed_dim: 64\nnum_layer: 2\n")
    with pytest.raises(LMForgeError) as info:
        ModelConfig.from_yaml(path)
    assert str(info.value) == f"{path}:3: unknown key 'num_layer' (did you mean 'num_layers'?)"

    path.write_text("arch: decoder\nembed_dim: wide\n")
    with pytest.raises(LMForgeError) as info:
        ModelConfig.from_yaml(path)
    assert str(info.value) == f"{path}:2: key 'embed_dim': expected int, got 'wide'"

    path.write_text("arch: decoder\nembed_dim: 100\nnum_heads: 3\n")
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_yaml(path)
    assert str(info.value).startswith(f"{path}:3: key 'num_heads'")

    path.write_text("arch: [decoder\n")
    with pytest.raises(LMForgeError, match=r"bad.yaml:2: invalid YAML"):
        ModelConfig.from_yaml(path)


def test_values_are_coerced_like_yaml() -> None:
    config = ModelConfig.from_dict(
        {"norm_eps": "1e-6", "dropout": 0, "bias": "false", "num_kv_heads": "null"}
    )
    assert config.norm_eps == 1e-6 and config.dropout == 0.0 and config.bias is False
    with pytest.raises(LMForgeError, match="expected bool"):
        ModelConfig.from_dict({"bias": "maybe"})


def test_unknown_preset_suggests_the_nearest() -> None:
    with pytest.raises(ConfigError, match="did you mean 'gpt2-small'"):
        ModelConfig.from_name("gpt2-smal")
