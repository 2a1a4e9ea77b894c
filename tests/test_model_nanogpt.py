"""lmforge built with nanoGPT's wiring is nanoGPT's model: same parameter count, same logits and
gradients given the same weights. This is what makes the benchmarks' "equal architecture"
comparison (benchmarks/pretrain_throughput.py, time_to_quality.py) an implementation comparison.

nanoGPT's ``model.py`` is read from ``../shared/peers/nanogpt`` (MIT, never copied into the
repository); the test is skipped when that folder is absent."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

from lmforge import ModelConfig, Transformer

NANOGPT = Path(__file__).resolve().parents[2] / "shared" / "peers" / "nanogpt"


@pytest.fixture(scope="module")
def nano():  # noqa: ANN201
    if not (NANOGPT / "model.py").is_file():
        pytest.skip(f"nanoGPT not found at {NANOGPT} (../shared/peers/nanogpt is absent)")
    sys.dont_write_bytecode = True
    sys.path.insert(0, str(NANOGPT))
    try:
        return importlib.import_module("model")
    finally:
        sys.path.remove(str(NANOGPT))


def nanogpt_to_lmforge(state: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """nanoGPT's names → lmforge's; its c_attn holds Q, K and V stacked: split."""
    out = {
        "tok_embed.weight": state["transformer.wte.weight"],
        "head.proj.weight": state["lm_head.weight"],
        "decoder.pos_embed.weight": state["transformer.wpe.weight"],
        "decoder.norm.weight": state["transformer.ln_f.weight"],
    }
    for i in range(layers):
        src, dst = f"transformer.h.{i}.", f"decoder.layers.{i}."
        out[dst + "attn_norm.weight"] = state[src + "ln_1.weight"]
        out[dst + "mlp_norm.weight"] = state[src + "ln_2.weight"]
        q, k, v = state[src + "attn.c_attn.weight"].chunk(3)
        out[dst + "self_attn.q_proj.weight"] = q
        out[dst + "self_attn.k_proj.weight"] = k
        out[dst + "self_attn.v_proj.weight"] = v
        out[dst + "self_attn.out_proj.weight"] = state[src + "attn.c_proj.weight"]
        out[dst + "mlp.up_proj.weight"] = state[src + "mlp.c_fc.weight"]
        out[dst + "mlp.down_proj.weight"] = state[src + "mlp.c_proj.weight"]
    return out


def test_nanogpt_wiring_matches_nanogpt(nano) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    layers, width, heads, context, vocab = 2, 64, 4, 16, 65
    peer = nano.GPT(
        nano.GPTConfig(
            block_size=context,
            vocab_size=vocab,
            n_layer=layers,
            n_head=heads,
            n_embd=width,
            dropout=0.0,
            bias=False,
        )
    )
    config = ModelConfig(
        vocab_size=vocab,
        max_seq_len=context,
        embed_dim=width,
        num_layers=layers,
        num_heads=heads,
        bias=False,
        norm_bias=False,
        activation="gelu",
    )
    model = Transformer(config)
    assert model.num_params() == sum(p.numel() for p in peer.parameters())
    for p in peer.parameters():  # away from the init's zeros and ones
        torch.nn.init.normal_(p, 0.0, 0.2)
    model.load_state_dict(nanogpt_to_lmforge(peer.state_dict(), layers))
    x = torch.randint(0, vocab, (3, context))
    y = torch.randint(0, vocab, (3, context))
    peer_logits, peer_loss = peer(x, y)
    logits = model(x).logits
    torch.testing.assert_close(logits, peer_logits, rtol=1e-5, atol=1e-5)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
    torch.testing.assert_close(loss, peer_loss)
    loss.backward()
    peer_loss.backward()
    grads = nanogpt_to_lmforge(
        {n: p.grad for n, p in peer.named_parameters()} | {"lm_head.weight": peer.lm_head.weight.grad}, layers
    )
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.grad, grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_layernorm_without_bias_and_its_export_guard(tmp_path: Path) -> None:
    from lmforge.errors import LMForgeError
    from lmforge.interop import save_hf

    config = ModelConfig.from_name("tiny-decoder", norm_bias=False)
    model = Transformer(config)
    assert not [n for n in dict(model.named_parameters()) if "norm" in n and n.endswith(".bias")]
    assert ModelConfig.from_dict(config.to_dict()).norm_bias is False  # survives the YAML round trip
    with pytest.raises(LMForgeError, match="norm_bias"):
        save_hf(model, None, tmp_path / "hf")
