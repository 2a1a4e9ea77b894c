"""SelfAttention: the fast path equals the explicit path, both equal the textbook and PyTorch's own
MultiheadAttention, masks do what they say, and the KV cache is exact."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from lmforge import KVCache, SelfAttention
from lmforge.model.attention import causal_mask

torch.manual_seed(0)

HEAD_LAYOUTS = {"mha": 4, "gqa": 2, "mqa": 1}  # num_kv_heads for 4 query heads


def make_layer(num_kv_heads: int, *, causal: bool = False, seed: int = 0, **kwargs) -> SelfAttention:
    torch.manual_seed(seed)
    layer = SelfAttention(32, 4, num_kv_heads=num_kv_heads, causal=causal, **kwargs)
    for p in layer.parameters():  # non-zero biases too
        nn.init.normal_(p, std=0.3)
    return layer


def run_both(layer: SelfAttention, x: torch.Tensor, memory=None, **kwargs):
    """Outputs and input gradients of the fast and the explicit path."""
    results = []
    for use_sdpa in (True, False):
        layer.use_sdpa = use_sdpa
        layer.zero_grad()
        xi = x.clone().requires_grad_(True)
        mi = memory.clone().requires_grad_(True) if memory is not None else None
        y = layer(xi, mi, **kwargs)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        grads = (
            [xi.grad] + ([mi.grad] if mi is not None else []) + [p.grad.clone() for p in layer.parameters()]
        )
        results.append((y.detach(), grads))
    layer.use_sdpa = True
    return results


def padding_mask(lengths: list[int], total: int) -> torch.Tensor:
    return torch.arange(total)[None, :] < torch.tensor(lengths)[:, None]


MASK_CASES = ["none", "causal", "padding", "causal+padding", "float", "bias", "causal+bias+padding"]


@pytest.mark.parametrize("layout", HEAD_LAYOUTS)
@pytest.mark.parametrize("case", MASK_CASES)
def test_sdpa_equals_explicit_self_attention(layout: str, case: str) -> None:
    B, T = 3, 7
    layer = make_layer(HEAD_LAYOUTS[layout], causal="causal" in case)
    x = torch.randn(B, T, 32)
    kwargs = {}
    if "padding" in case:
        kwargs["attention_mask"] = padding_mask([7, 4, 1], T)
    if case == "float":
        kwargs["attention_mask"] = torch.randn(B, 1, T, T)
    if "bias" in case:
        kwargs["position_bias"] = torch.randn(1, 4, T, T)
    (y_fast, g_fast), (y_ref, g_ref) = run_both(layer, x, **kwargs)
    torch.testing.assert_close(y_fast, y_ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(g_fast, g_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layout", HEAD_LAYOUTS)
@pytest.mark.parametrize("masked", [False, True])
def test_sdpa_equals_explicit_cross_attention(layout: str, masked: bool) -> None:
    layer = make_layer(HEAD_LAYOUTS[layout])
    x, memory = torch.randn(2, 5, 32), torch.randn(2, 9, 32)
    kwargs = {"attention_mask": padding_mask([9, 3], 9)} if masked else {}
    (y_fast, g_fast), (y_ref, g_ref) = run_both(layer, x, memory, **kwargs)
    torch.testing.assert_close(y_fast, y_ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(g_fast, g_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_rows_with_no_visible_key_give_zero_not_nan() -> None:
    """Left padding under a causal mask leaves the padding queries nothing to see."""
    layer = make_layer(2, causal=True, bias=False)
    x = torch.randn(2, 6, 32)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    (y_fast, g_fast), (y_ref, g_ref) = run_both(layer, x, attention_mask=mask)
    assert torch.isfinite(y_ref).all() and torch.isfinite(y_fast).all()
    assert all(torch.isfinite(g).all() for g in g_ref + g_fast)
    torch.testing.assert_close(y_fast, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y_ref[0, :2], torch.zeros(2, 32))  # bias-free: output 0 where α = 0


def test_weights_are_returned_rows_sum_to_one_and_respect_the_mask() -> None:
    layer = make_layer(2, causal=True)
    x = torch.randn(2, 5, 32)
    y, weights = layer(x, attention_mask=padding_mask([5, 3], 5), need_weights=True)
    assert weights.shape == (2, 4, 5, 5)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 5))
    assert (weights[:, :, causal_mask(5, 5).logical_not()] == 0).all()  # no look-ahead
    assert (weights[1, :, :, 3:] == 0).all()  # padding keys of the short sequence
    torch.testing.assert_close(y, layer(x, attention_mask=padding_mask([5, 3], 5)), atol=1e-5, rtol=1e-5)


def test_matches_torch_multihead_attention() -> None:
    torch.manual_seed(1)
    E, H, B, T, S = 24, 3, 2, 5, 6
    reference = nn.MultiheadAttention(E, H, batch_first=True)
    nn.init.normal_(reference.in_proj_bias)
    nn.init.normal_(reference.out_proj.bias)
    layer = SelfAttention(E, H)
    w_q, w_k, w_v = reference.in_proj_weight.chunk(3)
    b_q, b_k, b_v = reference.in_proj_bias.chunk(3)
    with torch.no_grad():
        for proj, w, b in ((layer.q_proj, w_q, b_q), (layer.k_proj, w_k, b_k), (layer.v_proj, w_v, b_v)):
            proj.weight.copy_(w)
            proj.bias.copy_(b)
        layer.out_proj.load_state_dict(reference.out_proj.state_dict())
    x, memory = torch.randn(B, T, E), torch.randn(B, S, E)
    keep = padding_mask([6, 4], S)
    ours, our_weights = layer(x, memory, attention_mask=keep, need_weights=True)
    theirs, their_weights = reference(x, memory, memory, key_padding_mask=~keep, average_attn_weights=False)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(our_weights, their_weights, atol=1e-6, rtol=1e-5)
    # causal self-attention against the same module with a float mask
    layer.causal = True
    future = torch.full((T, T), float("-inf")).triu(1)
    theirs_causal, _ = reference(x, x, x, attn_mask=future)
    torch.testing.assert_close(layer(x), theirs_causal, atol=1e-5, rtol=1e-5)


def test_matches_numpy_on_a_hand_checkable_input() -> None:
    """Batch of 2 rows × 4 features, one head of width 8, output width 4, against NumPy."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(2, 4)).round(1)
    W_Q, W_K, W_V = (rng.normal(size=(4, 8)).round(1) for _ in range(3))
    W_O = rng.normal(size=(8, 4)).round(1)

    # The textbook, in NumPy.
    Q, K, V = X @ W_Q, X @ W_K, X @ W_V
    A = Q @ K.T / math.sqrt(8)
    alpha = np.exp(A - A.max(axis=1, keepdims=True))
    alpha /= alpha.sum(axis=1, keepdims=True)
    Y = (alpha @ V) @ W_O

    layer = SelfAttention(4, 1, head_dim=8, bias=False).double()
    with torch.no_grad():  # nn.Linear stores W transposed: y = x Wᵀ
        layer.q_proj.weight.copy_(torch.from_numpy(W_Q.T))
        layer.k_proj.weight.copy_(torch.from_numpy(W_K.T))
        layer.v_proj.weight.copy_(torch.from_numpy(W_V.T))
        layer.out_proj.weight.copy_(torch.from_numpy(W_O.T))
    x = torch.from_numpy(X)[None]
    for use_sdpa in (True, False):
        layer.use_sdpa = use_sdpa
        y = layer(x)[0].detach().numpy()
        np.testing.assert_allclose(y, Y, rtol=1e-10, atol=1e-12)
    _, weights = layer(x, need_weights=True)
    np.testing.assert_allclose(weights[0, 0].detach().numpy(), alpha, rtol=1e-10)


def test_prefix_keys_are_seen_by_every_query() -> None:
    """The prefix seam (prefix tuning) equals attending over concatenated keys/values by hand."""
    layer = make_layer(2, causal=True)
    B, T, P = 2, 4, 3
    prefix_k, prefix_v = torch.randn(B, 2, P, 8), torch.randn(B, 2, P, 8)

    class Prefix(nn.Module):
        def forward(self, batch_size: int):
            return prefix_k, prefix_v

    x = torch.randn(B, T, 32)
    mask = padding_mask([4, 2], T)
    layer.prefix = Prefix()
    outputs = []
    for use_sdpa in (True, False):
        layer.use_sdpa = use_sdpa
        outputs.append(layer(x, attention_mask=mask))
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-5)
    y, weights = layer(x, attention_mask=mask, need_weights=True)
    assert weights.shape == (B, 4, T, P + T)
    assert (weights[..., :P] > 0).all()  # the prefix is visible to every query, even the first
    # by hand: q against [prefix; own keys]
    layer.prefix = None
    q = layer.q_proj(x).view(B, T, 4, 8).transpose(1, 2)
    k = torch.cat((prefix_k, layer.k_proj(x).view(B, T, 2, 8).transpose(1, 2)), 2).repeat_interleave(2, 1)
    v = torch.cat((prefix_v, layer.v_proj(x).view(B, T, 2, 8).transpose(1, 2)), 2).repeat_interleave(2, 1)
    visible = torch.cat(
        (torch.ones(T, P, dtype=torch.bool).expand(B, 1, T, P), causal_mask(T, T) & mask[:, None, None, :]),
        dim=-1,
    )
    scores = (q @ k.transpose(-1, -2) / math.sqrt(8)).masked_fill(~visible, float("-inf"))
    expected = layer.out_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, 32))
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", HEAD_LAYOUTS)
def test_kv_cache_decoding_equals_full_forward(layout: str) -> None:
    layer = make_layer(HEAD_LAYOUTS[layout], causal=True).eval()
    B, T = 2, 9
    x = torch.randn(B, T, 32)
    full = layer(x)
    cache = KVCache(B, 16, HEAD_LAYOUTS[layout], 8)
    steps = [layer(x[:, :3], kv_cache=cache)]  # a prompt of 3, then one token at a time
    steps += [layer(x[:, t : t + 1], kv_cache=cache) for t in range(3, T)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == T


def test_kv_cache_buffers_update_reset_reorder_and_overflow() -> None:
    cache = KVCache(3, 4, 2, 5)
    k, v = torch.randn(3, 2, 3, 5), torch.randn(3, 2, 3, 5)
    keys, values = cache.update(k, v)
    assert keys.shape == (3, 2, 3, 5) and cache.length == 3
    torch.testing.assert_close(values, v)
    cache.reorder(torch.tensor([2, 2, 0]))
    torch.testing.assert_close(cache.get()[0], k[[2, 2, 0]])
    with pytest.raises(ValueError, match="full"):
        cache.update(torch.randn(3, 2, 2, 5), torch.randn(3, 2, 2, 5))
    cache.reset()
    assert cache.length == 0 and cache.get()[0].shape[2] == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(embed_dim=100, num_heads=3), "embed_dim 100 is not divisible by num_heads 3"),
        (dict(embed_dim=64, num_heads=4, num_kv_heads=3), "num_heads 4 is not divisible by num_kv_heads 3"),
        (dict(embed_dim=64, num_heads=0), "must be positive"),
        (dict(embed_dim=64, num_heads=4, dropout=1.5), "dropout 1.5"),
    ],
)
def test_constructor_explains_impossible_shapes(kwargs: dict, message: str) -> None:
    embed_dim, num_heads = kwargs.pop("embed_dim"), kwargs.pop("num_heads")
    with pytest.raises(ValueError, match=message):
        SelfAttention(embed_dim, num_heads, **kwargs)


def test_bad_masks_are_explained() -> None:
    layer = make_layer(4)
    with pytest.raises(ValueError, match="does not match"):
        layer(torch.randn(2, 5, 32), attention_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="cannot attend to a memory"):
        make_layer(4, causal=True)(torch.randn(2, 5, 32), torch.randn(2, 3, 32))


@pytest.mark.parametrize("layout", HEAD_LAYOUTS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("packed", [False, True])
def test_fused_qkv_equals_three_projections(layout: str, bias: bool, packed: bool) -> None:
    """One matmul over the stacked Q/K/V weights gives the outputs and every gradient of three
    separate projections, the parameter names stay q_proj/k_proj/v_proj, and it runs only
    while gradients are on."""
    from lmforge.model.packing import Packing

    layer = make_layer(HEAD_LAYOUTS[layout], causal=True, bias=bias)
    x = torch.randn(2, 7, 32)
    mask = torch.tensor([[True] * 7, [False] * 2 + [True] * 5])
    results = []
    for fuse in (True, False):
        layer.fuse_qkv = fuse
        layer.zero_grad()
        xi = x.clone().requires_grad_(True)
        if packed:
            packing = Packing.from_mask(mask)
            y = layer(packing.unpad(xi), attention_mask=mask, packing=packing)
        else:
            y = layer(xi)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        results.append([y.detach(), xi.grad] + [p.grad.clone() for p in layer.parameters()])
    for fused, separate in zip(*results, strict=True):
        torch.testing.assert_close(fused, separate, rtol=1e-5, atol=1e-5)
    names = {n.split(".")[0] for n, _ in layer.named_parameters()}
    assert names == {"q_proj", "k_proj", "v_proj", "out_proj"}
    layer.fuse_qkv = True
    plain = (None, None, None, None, False)  # no mask, packing, position bias, cache; no weights
    assert layer._fuse_qkv_now(x, *plain)
    with torch.no_grad():
        assert not layer._fuse_qkv_now(x, *plain)  # 14 tokens, 32 wide: three plain projections
        long = torch.randn(2, 16, 32)  # an evaluation pass: fused for the native causal attention
        assert layer._fuse_qkv_now(long, *plain)
        assert not layer._fuse_qkv_now(long, None, None, None, KVCache(2, 16, 4, 8), False)  # generation
        assert not layer._fuse_qkv_now(long, None, None, None, None, True)  # weights asked for
        left = torch.tensor([[True] * 16, [False] * 3 + [True] * 13])  # left padding: SDPA with the mask
        assert not layer._fuse_qkv_now(long, left, Packing.from_mask(left), None, None, False)
        right = left.flip(-1)  # right padding, which packing drops: native
        assert layer._fuse_qkv_now(long, right, Packing.from_mask(right), None, None, False)


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_peft_on_the_projections_takes_the_separate_path_and_matches_the_merged_fused_model(method: str) -> None:
    """LoRA on q/v (IA3 on k/v) wraps those projections: attention falls back to three matmuls,
    and the adapted model equals its merged copy, which runs the fused matmul again."""
    from lmforge import ModelConfig, Transformer, peft

    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny-decoder"))
    peft.apply(model, method)
    for name, parameter in model.named_parameters():
        if ".adapters." in name:
            nn.init.normal_(parameter, 1.0 if method == "ia3" else 0.0, 0.3)  # away from the no-op start
    attn = model.decoder.layers[0].self_attn
    x = torch.randint(0, 256, (2, 9))
    assert not attn._fuse_qkv_now(x, None, None, None, None, False)
    adapted = model(x).logits
    merged = peft.merge_and_unload(model)
    assert merged.decoder.layers[0].self_attn._fuse_qkv_now(x, None, None, None, None, False)
    torch.testing.assert_close(merged(x).logits, adapted, rtol=1e-4, atol=1e-4)
