"""A pre-norm block's one-token step in one native call (lmforge.quant.DecodeStep over
lmforge.kernels.step.decode_block): the plain model's tokens, logits and cache, every step taken
natively where it applies, the block's modules where it does not."""

from __future__ import annotations

import copy

import pytest
import torch
from decoding import decode_alongside

from lmforge import ModelConfig, Transformer, peft
from lmforge.generation import generate
from lmforge.kernels import kernel_problem
from lmforge.kernels import step as step_module
from lmforge.kernels.step import Product, block_weights, decode_block
from lmforge.model.kv_cache import KVCache
from lmforge.quant import BlockLinear, DecodeLinear, DecodeStep, FusedBlockLinear, for_decoding

pytestmark = pytest.mark.skipif(kernel_problem() is not None, reason=f"no native kernels: {kernel_problem()}")

VARIANTS = {  # each norm, activation, bias layout and position kind the step reads
    "layernorm-gelu": dict(name="tiny-decoder"),
    "gpt2-like": dict(name="tiny-decoder", activation="gelu_tanh"),
    "nanogpt-like": dict(name="tiny-decoder", norm_bias=False, bias=False),
    "relu": dict(name="tiny-decoder", activation="relu", position="none"),
    "llama": dict(name="tiny-llama"),
    "qwen-like": dict(name="tiny-llama", qkv_bias=True, num_kv_heads=1),
    "gated-gelu": dict(name="tiny-llama", activation="gelu_tanh", norm="layernorm"),
}


def pair(variant: str) -> tuple[Transformer, Transformer]:
    options = dict(VARIANTS[variant])
    torch.manual_seed(0)
    plain = Transformer(ModelConfig.from_name(options.pop("name"), init_std=0.2, **options)).eval()
    return plain, for_decoding(copy.deepcopy(plain), "fp32")


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the native block steps taken."""
    counted: list[int] = []
    real = step_module.decode_block
    monkeypatch.setattr("lmforge.quant.step.decode_block", lambda *a: counted.append(1) or real(*a))
    return counted


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_step_is_native_with_the_plain_models_tokens_logits_and_cache(variant: str, calls: list[int]) -> None:
    plain, model = pair(variant)
    layers = model.config.num_layers
    assert all(isinstance(block.decode_step, DecodeStep) for block in model.decoder.layers)
    prompt = torch.randint(0, 256, (1, 7))
    tokens = generate(model, prompt, max_new_tokens=20)
    assert len(calls) == 19 * layers  # every one-token step of every block
    assert torch.equal(tokens, generate(plain, prompt, max_new_tokens=20))
    calls.clear()
    steps = decode_alongside(model, plain, prompt, tokens)  # the same logits and cache, a full cache refused
    assert len(calls) == steps * layers


@pytest.mark.parametrize("variant", ["gpt2-like", "llama"])
def test_bfloat16_weights_take_the_step_too(variant: str, calls: list[int]) -> None:
    """bf16 decoding (every linear weight stored in bfloat16, widened as read): every one-token
    step native, with the tokens of the fp32 form whose weights were rounded to bfloat16."""
    plain, rounded = pair(variant)
    with torch.no_grad():
        for layer in rounded.modules():
            if isinstance(layer, DecodeLinear):
                layer.weight_t.copy_(layer.weight_t.bfloat16().float())
    model = for_decoding(copy.deepcopy(plain), "bf16")
    prompt = torch.randint(0, 256, (1, 7))
    tokens = generate(model, prompt, max_new_tokens=20)
    assert len(calls) == 19 * model.config.num_layers
    assert torch.equal(tokens, generate(rounded, prompt, max_new_tokens=20))


def test_where_the_step_does_not_apply_the_modules_run(calls: list[int]) -> None:
    plain, model = pair("llama")
    prompt = torch.randint(0, 256, (1, 6))
    expected = generate(plain, prompt, max_new_tokens=5)

    two = torch.randint(0, 256, (2, 5))  # two sequences: the modules, with the native attention
    assert torch.equal(generate(model, two, max_new_tokens=4), generate(plain, two, max_new_tokens=4))
    assert not calls

    hooked = copy.deepcopy(model)  # a hook on a module the step would skip
    seen: list[int] = []
    handle = hooked.decoder.layers[1].mlp.register_forward_hook(lambda *_: seen.append(1))
    assert torch.equal(generate(hooked, prompt, max_new_tokens=5), expected)
    assert len(calls) == 4 and len(seen) == 5  # block 0 native, block 1 its modules, hook called
    handle.remove()
    calls.clear()

    wider = copy.deepcopy(model).double()  # another dtype: the step's weights are refused
    assert generate(wider, prompt, max_new_tokens=5).shape == (1, 11) and not calls

    replaced = copy.deepcopy(model)  # a product replaced since: that block runs its modules
    down = replaced.decoder.layers[0].mlp.down_proj
    replaced.decoder.layers[0].mlp.down_proj = torch.nn.Linear(down.in_features, down.out_features, bias=False)
    replaced.decoder.layers[0].mlp.down_proj.weight.data.copy_(down.weight)
    assert torch.equal(generate(replaced, prompt, max_new_tokens=5), expected)
    assert len(calls) == 4  # block 1 only
    calls.clear()

    adapted = copy.deepcopy(plain)  # LoRA on q and v: no fused Q/K/V, no step
    peft.apply(adapted, "lora", r=2, target_modules=["q_proj", "v_proj"])
    for_decoding(adapted, "fp32")
    assert all(block.decode_step is None for block in adapted.decoder.layers)
    assert torch.equal(generate(adapted, prompt, max_new_tokens=5), expected)  # B starts at zero
    assert not calls


def test_a_copy_and_changed_weights_are_read_anew(calls: list[int]) -> None:
    plain, model = pair("gpt2-like")
    prompt = torch.randint(0, 256, (1, 6))
    copied = copy.deepcopy(model)  # its own tensors: the step gathers their addresses itself
    del model
    assert torch.equal(generate(copied, prompt, max_new_tokens=6), generate(plain, prompt, max_new_tokens=6))
    assert len(calls) == 5 * 2
    with torch.no_grad():  # a norm's weight replaced by another tensor (not written in place)
        for mine, theirs in zip(copied.decoder.layers, plain.decoder.layers, strict=True):
            theirs.mlp_norm.weight.mul_(1.5)
            mine.mlp_norm.weight = torch.nn.Parameter(mine.mlp_norm.weight * 1.5)
    assert torch.equal(generate(copied, prompt, max_new_tokens=6), generate(plain, prompt, max_new_tokens=6))


def test_training_with_dropout_runs_the_modules(calls: list[int]) -> None:
    torch.manual_seed(0)
    model = for_decoding(Transformer(ModelConfig.from_name("tiny-decoder", dropout=0.1)), "fp32")
    cache = model.new_cache(1, 8)
    model.train()
    with torch.no_grad():
        model(torch.randint(0, 256, (1, 1)), cache=cache)
    assert not calls and cache.length == 1


def test_the_kernel_refuses_what_it_cannot_read() -> None:
    E, H, D, F = 16, 2, 8, 32
    dense = lambda k, n: Product(torch.randn(k, n), torch.randn(n))  # noqa: E731
    norm = (torch.ones(E), torch.zeros(E))
    parts = dict(qkv=dense(E, 3 * H * D), out=dense(H * D, E), up=dense(E, F), down=dense(F, E))
    common = dict(heads=H, kv_heads=H, head_dim=D, norm="layernorm", eps=1e-5, activation="gelu", gated=False,
                  scale=D**-0.5, norms=(norm, norm))  # fmt: skip
    weights = block_weights(**common, **parts)
    cache = KVCache(1, 4, H, D)
    y = decode_block(weights, torch.randn(E), None, cache.keys, cache.values, 0)
    assert y.shape == (E,) and cache.keys[0, :, 0].abs().sum() > 0
    with pytest.raises(ValueError, match="no native form"):
        block_weights(**{**common, "activation": "tanh"}, **parts)
    with pytest.raises(ValueError, match="no native attention"):
        block_weights(**{**common, "head_dim": 6}, **parts)
    with pytest.raises(ValueError, match="up: expected a float32 or bfloat16 CPU weight"):
        block_weights(**common, **{**parts, "up": dense(E, F + 1)})
    with pytest.raises(ValueError, match="down: expected a float32 or bfloat16 CPU weight"):
        block_weights(**common, **{**parts, "down": Product(parts["down"].weight_t.double())})
    with pytest.raises(ValueError, match="out: bias"):
        block_weights(**common, **{**parts, "out": Product(parts["out"].weight_t, torch.zeros(3))})
    with pytest.raises(ValueError, match="down: no weight"):
        block_weights(**common, **{**parts, "down": Product()})
    with pytest.raises(ValueError, match="qkv: expected codes"):
        block_weights(**common, **{**parts, "qkv": Product(codes=torch.zeros(3 * H * D, E + 32, dtype=torch.int8))})
    with pytest.raises(ValueError, match="norm 2"):
        block_weights(**{**common, "norms": (norm, (torch.ones(E + 1), None))}, **parts)
    with pytest.raises(ValueError, match="one row"):
        decode_block(weights, torch.randn(E + 1), None, cache.keys, cache.values, 1)
    with pytest.raises(ValueError, match="outside a cache"):
        decode_block(weights, torch.randn(E), None, cache.keys, cache.values, 4)
    with pytest.raises(ValueError, match="caches"):
        decode_block(weights, torch.randn(E), None, torch.zeros(2, H, 4, D), torch.zeros(2, H, 4, D), 0)
    with pytest.raises(ValueError, match="rotary angles"):
        decode_block(weights, torch.randn(E), (torch.ones(10), torch.ones(10)), cache.keys, cache.values, 1)
    with pytest.raises(ValueError, match="contiguous CPU tensor of torch.float32"):
        decode_block(weights, torch.randn(E).double(), None, cache.keys, cache.values, 1)


def test_weights_kept_in_gguf_blocks_take_the_step_too(calls: list[int]) -> None:
    gguf = pytest.importorskip("gguf")
    torch.manual_seed(0)
    plain = Transformer(ModelConfig.from_name("tiny-llama", init_std=0.2, mlp_hidden_dim=192)).eval()
    with torch.no_grad():  # the values a model read from a GGUF file holds: Q8_0 attention, Q4_1 MLP
        for name, module in plain.decoder.named_modules():
            if isinstance(module, torch.nn.Linear):
                qtype = gguf.GGMLQuantizationType.Q4_1 if "mlp" in name else gguf.GGMLQuantizationType.Q8_0
                grid = gguf.quants.dequantize(gguf.quants.quantize(module.weight.numpy(), qtype), qtype)
                module.weight.copy_(torch.from_numpy(grid.astype("float32")))
    model = for_decoding(copy.deepcopy(plain), "fp32")
    block = model.decoder.layers[0]
    assert isinstance(block.self_attn.qkv_decode, FusedBlockLinear) and block.mlp.down_proj.offsets is not None
    prompt = torch.randint(0, 256, (1, 6))
    tokens = generate(model, prompt, max_new_tokens=16)
    assert len(calls) == 15 * model.config.num_layers
    assert torch.equal(tokens, generate(plain, prompt, max_new_tokens=16))
    calls.clear()
    quantized = for_decoding(copy.deepcopy(plain), "int8")  # lmforge's own blocks of 32 columns
    assert isinstance(quantized.decoder.layers[0].mlp.down_proj, BlockLinear)
    reference = copy.deepcopy(quantized)
    for layer in reference.decoder.layers:
        layer.decode_step = None
    assert torch.equal(generate(quantized, prompt, max_new_tokens=16), generate(reference, prompt, max_new_tokens=16))
    assert len(calls) == 15 * model.config.num_layers


def test_two_threads_split_the_products_to_the_same_tokens(calls: list[int]) -> None:
    plain, model = pair("gpt2-like")
    prompt = torch.randint(0, 256, (1, 6))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        tokens = generate(model, prompt, max_new_tokens=10)
    finally:
        torch.set_num_threads(threads)
    assert len(calls) == 9 * model.config.num_layers
    assert torch.equal(tokens, generate(plain, prompt, max_new_tokens=10))
