"""Weights kept in GGUF's blocks for decoding (lmforge.kernels, lmforge.quant.BlockLinear): the
native kernel is built and cached, finds exactly the weights that lie on a block grid, multiplies
as the dequantized weight does, and a model read from a GGUF file decodes with it to the same
tokens as with its weights widened to fp32. Skipped where the kernel cannot be built here (no C
compiler or no AVX2), with the reason."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from decoding import decode_alongside
from torch import nn

import lmforge
from lmforge import ModelConfig, Transformer, kernels, peft, quant
from lmforge.generation import generate
from lmforge.interop.gguf_writer import save_gguf
from lmforge.kernels import block_dequantize, block_matmul, decode_attention, dense_row, kernel_problem
from lmforge.model import attention as attention_module
from lmforge.model.kv_cache import KVCache
from lmforge.model.layers import RMSNorm
from lmforge.model.positions import apply_rotary
from lmforge.quant import (
    BlockLinear,
    DecodeLinear,
    DecodeRMSNorm,
    FusedBlockLinear,
    FusedDecodeLinear,
    find_blocks,
    for_decoding,
)
from lmforge.tokenizers import Tokenizer

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.skipif(
    kernel_problem() is not None, reason=f"block kernels unavailable here: {kernel_problem()}"
)

FORMATS = ["q8_0", "q4_0", "q5_0", "q4_1", "q5_1"]


def on_grid(kind: str, rows: int = 24, columns: int = 96, seed: int = 0) -> torch.Tensor:
    """A random weight quantized by the gguf package to ``kind`` and dequantized again: the
    values a float model read from such a file holds."""
    w = np.random.default_rng(seed).standard_normal((rows, columns)).astype(np.float32) * 0.1
    qtype = getattr(gguf.GGMLQuantizationType, kind.upper())
    return torch.from_numpy(np.array(gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype), dtype=np.float32))


@pytest.mark.parametrize("kind", FORMATS)
def test_a_weight_on_a_block_grid_is_found_exactly(kind: str) -> None:
    w = on_grid(kind)
    found = find_blocks(w)
    assert found is not None
    assert found[0] == kind
    codes, scales, offsets = found[1:]
    assert codes.dtype == torch.int8 and scales.shape == (24, 3)
    assert (offsets is not None) == kind.endswith("_1")
    assert torch.equal(block_dequantize(codes, scales, offsets), w)  # bit for bit: the same weight


def test_a_float_weight_is_not_on_a_grid() -> None:
    torch.manual_seed(0)
    assert find_blocks(torch.randn(16, 64)) is None  # trained weights never are
    assert find_blocks(on_grid("q8_0", columns=96)[:, :80]) is None  # 80 columns: no 32-wide blocks
    w = on_grid("q4_1")
    w[5, 7] += 1e-3  # one weight off the grid, past the first row
    assert find_blocks(w) is None
    assert find_blocks(on_grid("q8_0").double()) is None


@pytest.mark.parametrize("rows", [1, 3, 4, 5, 9, 17, quant.MANY_ROWS + 1])
@pytest.mark.parametrize("kind", ["q8_0", "q4_1"])
def test_block_linear_computes_what_its_weight_says(kind: str, rows: int) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(96, 24)
    with torch.no_grad():
        linear.weight.copy_(on_grid(kind))
    layer = BlockLinear.from_linear(linear)
    assert layer is not None and layer.kind == kind
    x = torch.randn(rows, 96)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, linear.weight, linear.bias), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer(x.view(rows, 1, 96)), layer(x).view(rows, 1, 24))
    # two threads split the rows: the same numbers
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad():
            torch.testing.assert_close(layer(x), F.linear(x, linear.weight, linear.bias), rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(threads)


def test_block_linear_passes_gradients_to_its_input() -> None:
    linear = nn.Linear(64, 8, bias=False)
    with torch.no_grad():
        linear.weight.copy_(on_grid("q8_0", rows=8, columns=64))
    layer = BlockLinear.from_linear(linear)
    x = torch.randn(1, 64, requires_grad=True)
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, linear.weight.sum(0, keepdim=True))


def test_the_kernel_refuses_tensors_it_cannot_read() -> None:
    codes, scales = torch.zeros(8, 64, dtype=torch.int8), torch.ones(8, 2)
    with pytest.raises(ValueError, match="contiguous CPU tensor of torch.float32"):
        block_matmul(torch.zeros(1, 64, dtype=torch.float64), codes, scales, None, None)
    with pytest.raises(ValueError, match="columns"):
        block_matmul(torch.zeros(1, 32), codes, scales, None, None)
    with pytest.raises(ValueError, match="scales/offsets"):
        block_matmul(torch.zeros(1, 64), codes, torch.ones(8, 3), None, None)
    with pytest.raises(ValueError, match="contiguous"):
        block_matmul(torch.zeros(1, 64), codes, torch.ones(2, 8).t(), None, None)


def test_the_kernel_is_built_once_and_a_missing_compiler_is_a_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))
    lib, problem = kernels._build()
    assert lib is not None and problem is None
    (built,) = (tmp_path / "kernels").glob("native-*.so")
    stamp = built.stat().st_mtime_ns
    assert kernels._build()[0] is not None and built.stat().st_mtime_ns == stamp  # loaded, not rebuilt
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    monkeypatch.setenv("LMFORGE_CACHE", str(blocked))  # a cache that cannot be written: a reason too
    lib, problem = kernels._build()
    assert lib is None and "failed" in problem and str(blocked) in problem
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    lib, problem = kernels._build()
    assert lib is None and "no-such-cc" in problem


def test_without_the_kernel_decoding_keeps_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quant, "block_kernels", lambda: None)
    linear = nn.Linear(64, 8)
    with torch.no_grad():
        linear.weight.copy_(on_grid("q8_0", rows=8, columns=64))
    model = nn.Sequential(linear)
    for_decoding(model, "fp32")
    assert isinstance(model[0], DecodeLinear)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("K", "N"), [(64, 96), (77, 13), (5, 300), (768, 2304), (8, 8)])
def test_a_dense_row_is_the_product_with_the_transposed_weight(K: int, N: int, threads: int) -> None:
    torch.manual_seed(K + N)
    weight_t, bias, x = torch.randn(K, N), torch.randn(N), torch.randn(K)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.testing.assert_close(dense_row(x, weight_t, bias), x @ weight_t + bias, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(dense_row(x, weight_t, None), x @ weight_t, rtol=1e-5, atol=1e-4)
        wider = torch.randn(K, N + 40)
        columns = wider[:, 17 : 17 + N]  # a view of some columns: rows N + 40 floats apart
        torch.testing.assert_close(dense_row(x, columns, bias), x @ columns + bias, rtol=1e-5, atol=1e-4)
        # bfloat16 weights: widened exactly, the same float32 arithmetic (the same order: equal)
        half = columns.bfloat16()
        assert torch.equal(dense_row(x, half, bias), dense_row(x, half.float(), bias))
        torch.testing.assert_close(dense_row(x, half, None), x @ half.float(), rtol=1e-5, atol=1e-4)
    finally:
        torch.set_num_threads(previous)


def test_a_dense_row_refuses_what_it_cannot_read() -> None:
    weight_t = torch.randn(16, 8)
    with pytest.raises(ValueError, match="one row"):
        dense_row(torch.randn(2, 16), weight_t, None)
    with pytest.raises(ValueError, match="float32 or bfloat16 on the CPU"):
        dense_row(torch.randn(16), weight_t.double(), None)
    with pytest.raises(ValueError, match="rows contiguous"):
        dense_row(torch.randn(8), weight_t.t(), None)
    with pytest.raises(ValueError, match="bias"):
        dense_row(torch.randn(16), weight_t, torch.randn(9))
    with pytest.raises(ValueError, match="contiguous CPU tensor of torch.float32"):
        dense_row(torch.randn(16, dtype=torch.float64), weight_t, None)


def test_a_decode_linear_takes_one_row_through_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    linears = [nn.Linear(96, 40), nn.Linear(96, 24)]
    fused = FusedDecodeLinear.from_linears(linears)
    calls = []
    real = quant.dense.dense_row
    monkeypatch.setattr(quant.dense, "dense_row", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(1, 1, 96)
    with torch.no_grad():
        expected = torch.cat([linear(x) for linear in linears], dim=-1)
        torch.testing.assert_close(fused(x), expected, rtol=1e-5, atol=1e-5)
        for linear, part in zip(linears, fused.parts, strict=True):  # parts: views of columns
            torch.testing.assert_close(part(x), linear(x), rtol=1e-5, atol=1e-5)
        assert len(calls) == 3
        assert fused(torch.randn(2, 3, 96)).shape == (2, 3, 64)  # several rows: addmm
        assert len(calls) == 3
    y = fused(x.clone().requires_grad_())  # gradients wanted: PyTorch's product, and they flow
    y.sum().backward()
    assert len(calls) == 3
    with torch.no_grad():
        fused.double()(x.double())  # another dtype: PyTorch's product
    assert len(calls) == 3


@pytest.fixture(scope="module")
def gguf_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen2-style decoder (q/k/v biases, a tied head) written as a Q8_0 GGUF file."""
    tokenizer = Tokenizer.train(iter(["the quick brown fox jumps over the lazy dog"] * 8), kind="bpe",
                                vocab_size=280, show_progress=False)  # fmt: skip
    torch.manual_seed(0)
    config = ModelConfig.from_name("tiny-llama", vocab_size=tokenizer.vocab_size, qkv_bias=True, tie_embeddings=True)
    model = Transformer(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.5)
    path = tmp_path_factory.mktemp("gguf") / "tiny-q8_0.gguf"
    save_gguf(model, tokenizer, path, dtype="q8_0")
    return path


def test_a_model_read_from_gguf_decodes_with_its_blocks_to_the_same_tokens(gguf_run: Path) -> None:
    blocks = lmforge.load(gguf_run).model
    widened = copy.deepcopy(blocks)
    for_decoding(blocks, "fp32")
    for_decoding(widened, "fp32", blocks=False)
    layers = [m for m in blocks.modules() if isinstance(m, BlockLinear)]
    assert layers and not [m for m in blocks.modules() if type(m) in (nn.Linear, DecodeLinear)]
    assert isinstance(blocks.head.proj, BlockLinear)  # the tied head: its own blocks
    assert isinstance(blocks.tok_embed.weight, nn.Parameter)  # the embedding table stays as it was
    attn, mlp = blocks.decoder.layers[0].self_attn, blocks.decoder.layers[0].mlp
    assert isinstance(attn.qkv_decode, FusedBlockLinear) and isinstance(mlp.gate_up_decode, FusedBlockLinear)
    assert attn.decode_qkv() is attn.qkv_decode  # the parts are still the fused ones: used
    start = attn.q_proj.out_features
    assert attn.k_proj.codes.data_ptr() == attn.qkv_decode.codes[start].data_ptr()  # views: held once
    assert torch.equal(attn.k_proj.weight, widened.decoder.layers[0].self_attn.k_proj.weight)
    x = torch.randint(0, blocks.config.vocab_size, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(blocks(x).logits, widened(x).logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(blocks(x[:, :1]).logits, widened(x[:, :1]).logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(generate(blocks, x, max_new_tokens=20), generate(widened, x, max_new_tokens=20))
    assert torch.equal(
        generate(blocks, x, max_new_tokens=8, compile=True), generate(widened, x, max_new_tokens=8)
    )  # torch.compile keeps the kernel in its graph (an operator)


def test_the_base_layer_under_an_adapter_stays_mergeable(gguf_run: Path) -> None:
    model = lmforge.load(gguf_run).model
    peft.apply(model, "lora", r=2, target_modules=["q_proj", "v_proj"])
    for_decoding(model, "fp32")
    attn = model.decoder.layers[0].self_attn
    assert isinstance(attn.q_proj.base, DecodeLinear)  # merging writes into it
    assert isinstance(attn.k_proj, BlockLinear) and isinstance(model.decoder.layers[0].mlp.down_proj, BlockLinear)


def test_int8_decoding_takes_blocks_of_32_columns() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(96, 24)
    layer = BlockLinear.quantized(linear)
    assert layer.kind == "int8" and layer.offsets is None and layer.scales.shape == (24, 3)
    blocks = linear.weight.detach().reshape(24, 3, 32)
    torch.testing.assert_close(layer.scales, blocks.abs().amax(-1) / 127)
    assert float((layer.weight - linear.weight).abs().max()) <= float(layer.scales.max()) / 2 + 1e-7
    model = Transformer(ModelConfig.from_name("tiny-llama", init_std=0.1)).eval()
    x = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        reference = model(x).logits
        for_decoding(model, "int8")
        logits = model(x).logits
    assert isinstance(model.decoder.layers[0].self_attn.qkv_decode, FusedBlockLinear)  # fused as in fp32
    assert float((logits - reference).norm() / reference.norm()) < 0.03  # as int8 in groups of 256


def test_decoding_norms_are_one_native_call_with_the_same_numbers() -> None:
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny-llama", init_std=0.1)).eval()
    with torch.no_grad():
        for norm in [m for m in model.modules() if isinstance(m, RMSNorm)]:
            norm.weight.normal_(1.0, 0.2)
    plain = copy.deepcopy(model)
    for_decoding(model, "fp32")
    norms = [m for m in model.modules() if isinstance(m, DecodeRMSNorm)]
    assert len(norms) == 2 * model.config.num_layers + 1 and not any(isinstance(m, RMSNorm) for m in model.modules())
    x = torch.randn(3, 5, 64) * 3
    reference = plain.decoder.norm
    with torch.no_grad():
        torch.testing.assert_close(model.decoder.norm(x), reference(x), rtol=1e-6, atol=1e-6)
        ids = torch.randint(0, 256, (1, 10))
        torch.testing.assert_close(model(ids).logits, plain(ids).logits, rtol=1e-5, atol=1e-5)
    y = model.decoder.norm(x.requires_grad_())  # gradients wanted: PyTorch's own operators
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "rotary", "rows"),
    [(4, 2, 16, 16, 1), (6, 6, 64, 0, 1), (9, 3, 64, 32, 1), (2, 1, 8, 8, 1), (4, 2, 16, 16, 3), (9, 3, 64, 64, 5)],
)
def test_one_tokens_attention_over_its_cache_is_sdpas(
    heads: int, kv_heads: int, head_dim: int, rotary: int, rows: int
) -> None:
    torch.manual_seed(heads + head_dim + rows)
    cache = KVCache(rows, 48, kv_heads, head_dim)
    cache.update(torch.randn(rows, kv_heads, 40, head_dim), torch.randn(rows, kv_heads, 40, head_dim))
    # each row at its own position (not multiples of 8: the exp's tail runs too); one row: 29
    positions = torch.tensor([29, 17, 38, 0, 23][:rows]) if rows > 1 else 29
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * head_dim) * 2
    angles = torch.rand(rows, rotary) * 6 if rotary else None  # each row its own angles
    rope = (angles.cos(), angles.sin()) if angles is not None else None
    before_keys, before_values = cache.keys.clone(), cache.values.clone()
    out = decode_attention(qkv.clone(), rope, cache.keys, cache.values, positions, heads, 0.3)
    for b in range(rows):
        at = positions if isinstance(positions, int) else int(positions[b])
        q, k, v = qkv[b].view(1, 1, -1).split((heads * head_dim, kv_heads * head_dim, kv_heads * head_dim), dim=-1)
        q, k, v = (t.view(1, 1, -1, head_dim).transpose(1, 2) for t in (q, k, v))
        if rope is not None:
            cos, sin = rope[0][b : b + 1], rope[1][b : b + 1]
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        keys = torch.cat((before_keys[b : b + 1, :, :at], k), dim=2)
        values = torch.cat((before_values[b : b + 1, :, :at], v), dim=2)
        expected = F.scaled_dot_product_attention(q, keys, values, scale=0.3, enable_gqa=heads != kv_heads)
        torch.testing.assert_close(out[b], expected.reshape(-1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cache.keys[b, :, at], k[0, :, 0])  # the rotated key, cached at its position
        assert torch.equal(cache.values[b, :, at], v[0, :, 0])
        assert torch.equal(cache.keys[b, :, at + 1 :], before_keys[b, :, at + 1 :])  # nothing else written
        assert torch.equal(cache.keys[b, :, :at], before_keys[b, :, :at])


def test_one_tokens_attention_refuses_what_it_cannot_read() -> None:
    cache = KVCache(1, 8, 2, 16)
    qkv = torch.randn(1, 8 * 16)
    with pytest.raises(ValueError, match="outside a cache"):
        decode_attention(qkv, None, cache.keys, cache.values, 8, 4, 1.0)
    with pytest.raises(ValueError, match="outside a cache"):
        decode_attention(qkv, None, cache.keys, cache.values, torch.tensor([-1]), 4, 1.0)
    with pytest.raises(ValueError, match="positions"):
        decode_attention(qkv, None, cache.keys, cache.values, torch.tensor([1, 2]), 4, 1.0)
    with pytest.raises(ValueError, match="heads"):
        decode_attention(torch.randn(1, 7 * 16), None, cache.keys, cache.values, 0, 4, 1.0)
    with pytest.raises(ValueError, match="differ"):
        decode_attention(qkv, None, cache.keys, torch.zeros(1, 2, 9, 16), 0, 4, 1.0)
    with pytest.raises(ValueError, match="rotary angles"):
        decode_attention(qkv, (torch.ones(20), torch.ones(20)), cache.keys, cache.values, 0, 4, 1.0)
    with pytest.raises(ValueError, match="rotary angles"):
        decode_attention(qkv, (torch.ones(3, 8), torch.ones(3, 8)), cache.keys, cache.values, 0, 4, 1.0)
    with pytest.raises(ValueError, match="contiguous CPU tensor of torch.float32"):
        decode_attention(qkv.double(), None, cache.keys, cache.values, 0, 4, 1.0)
    with pytest.raises(ValueError, match="contiguous CPU tensor of torch.int64"):
        decode_attention(qkv, None, cache.keys, cache.values, torch.tensor([1], dtype=torch.int32), 4, 1.0)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-decoder"])
def test_decoding_takes_the_native_attention_with_the_same_tokens(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    plain = Transformer(ModelConfig.from_name(name, init_std=0.2)).eval()
    model = for_decoding(copy.deepcopy(plain), "fp32")
    for block in model.decoder.layers:  # the attention alone (the whole block's step: test_decode_step.py)
        assert block.decode_step is not None
        block.decode_step = None
    calls = []
    real = attention_module.decode_attention
    monkeypatch.setattr(attention_module, "decode_attention", lambda *a: calls.append(1) or real(*a))
    prompt = torch.randint(0, 256, (1, 7))
    tokens = generate(model, prompt, max_new_tokens=20)
    assert len(calls) == 19 * model.config.num_layers  # every one-token step of every layer
    assert torch.equal(tokens, generate(plain, prompt, max_new_tokens=20))
    calls.clear()
    steps = decode_alongside(model, plain, prompt, tokens)  # the same logits and cache, a full cache refused
    assert len(calls) == steps * model.config.num_layers
    calls.clear()
    two = torch.randint(0, 256, (2, 5))
    assert torch.equal(generate(model, two, max_new_tokens=6), generate(plain, two, max_new_tokens=6))
    assert len(calls) == 5 * model.config.num_layers  # two sequences at one position: native too
    calls.clear()
    padded = generate(model, two, attention_mask=torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]), max_new_tokens=3)
    assert not calls and padded.shape == (2, 8)  # left padding, a mask: the general path
