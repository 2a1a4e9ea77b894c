"""Weight-only int8 and bf16 for decoding (lmforge.quant): codes and scales as specified, layers
that compute what their dequantized weights say, models that still generate, and the
``lmforge generate --dtype`` option."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from lmforge import ModelConfig, Transformer, save_run
from lmforge.cli import main
from lmforge.generation import generate
from lmforge.kernels import kernel_problem
from lmforge.quant import (
    BlockLinear,
    DecodeLinear,
    FusedDecodeLinear,
    Int8Linear,
    fitting_group,
    for_decoding,
    quantize_int8,
)
from lmforge.tokenizers import Tokenizer


@pytest.mark.parametrize("group_size", [32, 64])
def test_codes_and_scales_are_absmax_per_group(group_size: int) -> None:
    torch.manual_seed(0)
    weight = torch.randn(48, 128)
    codes, scales = quantize_int8(weight, group_size)
    G = 128 // group_size
    assert codes.dtype == torch.int8 and codes.shape == (G, 48, group_size) and scales.shape == (G, 48)
    groups = weight.view(48, G, group_size).transpose(0, 1)  # (G, N, g)
    torch.testing.assert_close(scales, groups.abs().amax(-1) / 127)
    assert int(codes.abs().max()) == 127  # the largest weight of each group takes the full range
    error = (codes.float() * scales[..., None] - groups).abs()
    assert bool((error <= scales[..., None] / 2 + 1e-7).all())  # rounding: at most half a step


def test_a_group_size_must_divide_the_columns() -> None:
    with pytest.raises(ValueError, match="group_size 48 must divide the 128 input columns"):
        quantize_int8(torch.randn(4, 128), 48)


def test_each_layer_takes_the_widest_group_that_divides_its_columns() -> None:
    assert fitting_group(576, 256) == 192 and fitting_group(1536, 256) == 256 and fitting_group(128, 256) == 128
    assert fitting_group(97, 32) == 1  # a prime width: one scale per weight, still correct
    layer = Int8Linear.from_linear(nn.Linear(576, 8), 256)  # SmolLM2's width: no group of 256 fits
    assert (layer.num_groups, layer.group_size) == (3, 192)
    with pytest.raises(ValueError, match="must be positive"):
        fitting_group(64, 0)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("group_size", [32, 256])
def test_int8_linear_computes_its_dequantized_weight(bias: bool, group_size: int) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(128, 96, bias=bias)
    layer = Int8Linear.from_linear(linear, group_size)
    assert layer.group_size == min(group_size, 128)
    x = torch.randn(3, 5, 128)
    with torch.no_grad():
        reference = nn.functional.linear(x, layer.dequantized_weight(), linear.bias)
        out = layer(x)
        exact = linear(x)
    assert out.shape == (3, 5, 96) and out.dtype == torch.float32
    scale = reference.abs().mean()
    assert float((out - reference).abs().max() / scale) < 0.05  # bf16 activations in the kernel
    assert float((out - exact).norm() / exact.norm()) < 0.02


def test_int8_model_generates_close_to_fp32_and_leaves_the_embedding_alone() -> None:
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny-decoder", init_std=0.1)).eval()
    table = model.tok_embed.weight.detach().clone()
    x = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        reference = model(x).logits
    for_decoding(model, "int8")
    assert not [m for m in model.modules() if type(m) is nn.Linear]
    # the tied head gets its own int8 copy: blocks of 32 columns where the native kernel is built
    assert isinstance(model.head.proj, Int8Linear if kernel_problem() else BlockLinear)
    assert model.tok_embed.weight.dtype == torch.float32 and torch.equal(model.tok_embed.weight, table)
    with torch.no_grad():
        logits = model(x).logits
    assert float((logits - reference).norm() / reference.norm()) < 0.03
    out = generate(model, x[:1], max_new_tokens=8)
    assert out.shape == (1, 20)


def test_fp32_decoding_layout_gives_the_same_numbers_and_tokens() -> None:
    """fp32 for_decoding stores each linear weight transposed (one copy, the tied head its own) and
    computes the same logits to fp32 rounding, hence the same greedy tokens."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny-llama", init_std=0.1)).eval()
    plain = copy.deepcopy(model)
    x = torch.randint(0, 256, (2, 12))
    for_decoding(model, "fp32")
    assert not [m for m in model.modules() if type(m) is nn.Linear]
    head = model.head.proj
    assert isinstance(head, DecodeLinear) and head.weight_t.is_contiguous()
    assert head.weight_t.shape == (plain.config.embed_dim, plain.config.vocab_size)
    assert torch.equal(head.weight, plain.head.proj.weight)  # a transposed copy, not new numbers
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, plain(x).logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(generate(model, x[:1], max_new_tokens=16), generate(plain, x[:1], max_new_tokens=16))
    # Q/K/V and gate/up run as one product each, their weights held once (the parts are views)
    attn, mlp = model.decoder.layers[0].self_attn, model.decoder.layers[0].mlp
    assert isinstance(attn.qkv_decode, FusedDecodeLinear) and isinstance(mlp.gate_up_decode, FusedDecodeLinear)
    fused = attn.qkv_decode.weight_t
    assert attn.k_proj.weight_t.data_ptr() == fused[:, attn.q_proj.out_features :].data_ptr()
    with torch.no_grad():
        attn.k_proj.weight += 1.0  # a change to a part (merging an adapter) is a change to the fused weight
        assert torch.equal(fused[:, attn.q_proj.out_features : attn.q_proj.out_features + attn.k_proj.out_features],
                           attn.k_proj.weight_t)  # fmt: skip
        attn.k_proj.weight -= 1.0
        attn.q_proj = DecodeLinear(attn.q_proj.weight_t.clone() * 0, None)  # a part replaced: fusion off
        assert not attn._fuse_qkv_now(x, None, None, None, None, False)
        changed = model(x).logits
        attn_plain = plain.decoder.layers[0].self_attn
        attn_plain.q_proj.weight.zero_()
        torch.testing.assert_close(changed, plain(x).logits, rtol=1e-5, atol=1e-5)
    layer = DecodeLinear.from_linear(nn.Linear(6, 4))  # a bias, and any number of leading dims
    with torch.no_grad():
        rows = torch.randn(2, 3, 6)
        torch.testing.assert_close(layer(rows), rows @ layer.weight.T + layer.bias)
        before, delta = layer.weight.clone(), torch.randn(4, 6)
        layer.weight += delta  # as merging a LoRA into its base does
        torch.testing.assert_close(layer.weight_t, (before + delta).T)
        layer.weight = before  # and setting it
        assert torch.equal(layer.weight, before)


@pytest.mark.parametrize("name", ["tiny-decoder", "tiny-llama"])
def test_bf16_decoding_is_fp32_decoding_with_bfloat16_weights(name: str) -> None:
    """``bf16``: the fp32 decoding form with every linear weight stored in bfloat16 (a fused
    layer's parts views of its one buffer), everything else float32: the logits of that form with
    the weights rounded to bfloat16 and kept in float32, and the same greedy tokens (each block's
    one-token step native: tests/test_decode_step.py)."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name(name)).eval()
    ours = for_decoding(copy.deepcopy(model), "bf16")
    reference = for_decoding(copy.deepcopy(model), "fp32")
    with torch.no_grad():
        for layer in reference.modules():
            if isinstance(layer, DecodeLinear):
                layer.weight_t.copy_(layer.weight_t.bfloat16().float())
    linears = [m for m in ours.modules() if isinstance(m, DecodeLinear)]
    assert linears and all(m.weight_t.dtype is torch.bfloat16 for m in linears)
    for fused in (m for m in ours.modules() if isinstance(m, FusedDecodeLinear)):
        assert all(part.weight_t.untyped_storage().data_ptr() == fused.weight_t.untyped_storage().data_ptr() for part in fused.parts)
    others = [p for m in ours.modules() if not isinstance(m, DecodeLinear) for p in m.parameters(recurse=False)]
    assert others and all(p.dtype is torch.float32 for p in others)
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)
    prompt = ids[:1]
    assert torch.equal(generate(ours, prompt, max_new_tokens=8), generate(reference, prompt, max_new_tokens=8))
    layer, rows = linears[0], torch.randn(3, 1, linears[0].in_features)  # a few rows (beams): one call each
    expected = rows @ layer.weight_t.float() + (0 if layer.bias is None else layer.bias)
    torch.testing.assert_close(layer(rows), expected, rtol=1e-5, atol=1e-5)
    assert layer(rows[:0]).shape == (0, 1, layer.out_features)


def test_bf16_model_generates_and_hands_out_float32_logits() -> None:
    torch.manual_seed(0)
    model = for_decoding(Transformer(ModelConfig.from_name("tiny-llama")), "bf16")
    out = generate(model, torch.randint(0, 256, (1, 5)), max_new_tokens=6, num_beams=2)
    assert out.shape[1] <= 11
    assert model(torch.randint(0, 256, (1, 5))).logits.dtype is torch.float32
    with pytest.raises(ValueError, match="unknown dtype 'int4'"):
        for_decoding(model, "int4")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokenizer = Tokenizer.train(
        iter(["the cat sat on the mat"] * 4), kind="char", vocab_size=64, show_progress=False
    )
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny-decoder", vocab_size=tokenizer.vocab_size))
    return save_run(tmp_path_factory.mktemp("runs") / "tiny", model=model, tokenizer=tokenizer)


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
def test_cli_generate_dtype(run_dir: Path, dtype: str, capsys: pytest.CaptureFixture) -> None:
    argv = ["generate", "--model", str(run_dir), "--prompt", "the", "--max_new_tokens", "6", "--dtype", dtype]
    assert main(argv) == 0
    assert capsys.readouterr().out.startswith("the")


def test_cli_generate_rejects_an_unknown_dtype(run_dir: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["generate", "--model", str(run_dir), "--prompt", "the", "--dtype", "int4"]) == 2
    assert "int4" in capsys.readouterr().err
