"""The three architectures: causality, padding invariance, exact KV-cache decoding for every
position type, heads, and every preset building and training at tiny size."""

from __future__ import annotations

import pytest
import torch

from lmforge import PRESETS, ModelConfig, Transformer
from lmforge.model import flops_per_token, parameter_count
from lmforge.model.heads import pool

POSITIONS = ["learned", "sinusoidal", "rope", "alibi", "relative", "none"]


def tiny(arch: str = "decoder", **overrides) -> Transformer:
    torch.manual_seed(0)
    base = {"decoder": "tiny-decoder", "encoder": "tiny-encoder", "encoder_decoder": "tiny-encoder-decoder"}[
        arch
    ]
    return Transformer(ModelConfig.from_name(base, **overrides)).eval()


def run(
    model: Transformer, ids: torch.Tensor, mask: torch.Tensor | None = None, dec: torch.Tensor | None = None
):
    if model.config.arch == "encoder_decoder":
        return model(ids, attention_mask=mask, decoder_input_ids=dec if dec is not None else ids).logits
    return model(ids, attention_mask=mask).logits


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("config", ["tiny-decoder", "tiny-llama"])
def test_decoder_is_causal(position: str, config: str) -> None:
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name(config, position=position)).eval()
    ids = torch.randint(0, 256, (2, 12))
    changed = ids.clone()
    changed[:, 7:] = torch.randint(0, 256, (2, 5))
    torch.testing.assert_close(run(model, ids)[:, :7], run(model, changed)[:, :7])
    assert not torch.allclose(run(model, ids)[:, 7:], run(model, changed)[:, 7:])


def test_encoder_decoder_decoder_side_is_causal_and_encoder_is_not() -> None:
    model = tiny("encoder_decoder")
    src, tgt = torch.randint(0, 256, (2, 9)), torch.randint(0, 256, (2, 8))
    changed_tgt = tgt.clone()
    changed_tgt[:, 5:] = (tgt[:, 5:] + 1) % 256
    out = run(model, src, dec=tgt)
    torch.testing.assert_close(out[:, :5], run(model, src, dec=changed_tgt)[:, :5])
    changed_src = src.clone()
    changed_src[:, -1] = (src[:, -1] + 1) % 256  # the last source token reaches every target position
    assert not torch.allclose(out[:, 0], run(model, changed_src, dec=tgt)[:, 0])


@pytest.mark.parametrize("arch", ["decoder", "encoder", "encoder_decoder"])
@pytest.mark.parametrize("position", POSITIONS)
def test_padded_batch_equals_each_sequence_alone(arch: str, position: str) -> None:
    model = tiny(arch, position=position)
    lengths = [10, 6, 3]
    ids = torch.randint(1, 256, (3, 10))
    mask = torch.arange(10)[None] < torch.tensor(lengths)[:, None]
    ids = ids.masked_fill(~mask, 0)
    batched = run(model, ids, mask)
    for i, n in enumerate(lengths):
        alone = run(model, ids[i : i + 1, :n])
        torch.testing.assert_close(batched[i : i + 1, :n], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("position", POSITIONS)
def test_left_padding_with_position_ids_equals_each_sequence_alone(position: str) -> None:
    """Generation pads on the left; position ids count only real tokens."""
    model = tiny("decoder", position=position)
    ids = torch.randint(1, 256, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, :3] = False
    position_ids = (mask.long().cumsum(1) - 1).clamp(min=0)
    batched = model(ids, attention_mask=mask, position_ids=position_ids).logits
    torch.testing.assert_close(batched[1, 3:], model(ids[1:, 3:]).logits[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("config", ["tiny-decoder", "tiny-llama"])
def test_kv_cache_token_by_token_equals_full_forward(position: str, config: str) -> None:
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name(config, position=position)).eval()
    ids = torch.randint(0, 256, (2, 11))
    full = model(ids).logits
    cache = model.new_cache(2, 16)
    steps = [model(ids[:, :4], cache=cache).logits]
    steps += [model(ids[:, t : t + 1], cache=cache).logits for t in range(4, 11)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("position", POSITIONS)
def test_encoder_decoder_kv_cache_equals_full_forward(position: str) -> None:
    model = tiny("encoder_decoder", position=position)
    src = torch.randint(1, 256, (2, 9))
    src_mask = torch.ones(2, 9, dtype=torch.bool)
    src_mask[1, 6:] = False
    tgt = torch.randint(1, 256, (2, 7))
    full = model(src, attention_mask=src_mask, decoder_input_ids=tgt).logits
    memory = model.encode(src, attention_mask=src_mask)[0]
    cache = model.new_cache(2, 8, memory_len=9)
    steps = [
        model(
            attention_mask=src_mask,
            decoder_input_ids=tgt[:, t : t + 1],
            encoder_hidden_states=memory,
            cache=cache,
        ).logits
        for t in range(7)
    ]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_cache_with_left_padding_and_mask_equals_full_forward() -> None:
    model = tiny("decoder", position="rope")
    ids = torch.randint(1, 256, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, :2] = False
    pos = (mask.long().cumsum(1) - 1).clamp(min=0)
    full = model(ids, attention_mask=mask, position_ids=pos).logits
    cache = model.new_cache(2, 9)
    first = model(ids[:, :5], attention_mask=mask[:, :5], position_ids=pos[:, :5], cache=cache).logits
    rest = [
        model(
            ids[:, t : t + 1], attention_mask=mask[:, : t + 1], position_ids=pos[:, t : t + 1], cache=cache
        ).logits
        for t in range(5, 9)
    ]
    out = torch.cat([first, *rest], 1)
    torch.testing.assert_close(out[mask], full[mask], atol=1e-5, rtol=1e-5)


def test_attention_weights_per_layer() -> None:
    model = tiny("encoder_decoder")
    src, tgt = torch.randint(0, 256, (1, 6)), torch.randint(0, 256, (1, 4))
    out = model(src, decoder_input_ids=tgt, need_weights=True)
    assert len(out.attentions) == 4  # 2 encoder + 2 decoder layers
    assert out.attentions[0].shape == (1, 4, 6, 6) and out.attentions[-1].shape == (1, 4, 4, 4)
    assert len(out.cross_attentions) == 2 and out.cross_attentions[0].shape == (1, 4, 4, 6)
    torch.testing.assert_close(out.logits, model(src, decoder_input_ids=tgt).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("head", "arch", "shape"),
    [
        ("lm", "decoder", (2, 7, 256)),
        ("mlm", "encoder", (2, 7, 256)),
        ("classification", "encoder", (2, 5)),
        ("classification", "decoder", (2, 5)),
        ("token_classification", "encoder", (2, 7, 5)),
        ("qa", "encoder", (2, 7, 2)),
        ("none", "decoder", None),
    ],
)
def test_heads(head: str, arch: str, shape: tuple | None) -> None:
    model = tiny(arch, head=head, num_labels=5, pooler=head == "classification")
    out = model(torch.randint(0, 256, (2, 7)), attention_mask=torch.ones(2, 7, dtype=torch.bool))
    assert (out.logits.shape if out.logits is not None else None) == shape
    assert out.hidden_states.shape == (2, 7, 64)


def test_tied_embeddings_share_one_tensor() -> None:
    model = tiny("decoder")
    assert model.head.proj.weight is model.tok_embed.weight
    untied = tiny("decoder", tie_embeddings=False)
    assert untied.head.proj.weight is not untied.tok_embed.weight
    assert untied.num_params() == model.num_params() + 256 * 64


def test_a_scaled_tied_head_starts_with_the_logit_spread_of_a_plain_head() -> None:
    # T5 scales hidden states by width^-1/2 before its tied head. Started at N(0, 0.02) like a GPT
    # table, that head's logits are 16× too small at width 256 and a small T5 trained on Multi30k
    # ignored its source; the table now starts at init_std / logit_scale.
    settings = dict(arch="encoder_decoder", vocab_size=512, embed_dim=256, num_layers=1, num_heads=4)
    torch.manual_seed(0)
    plain = Transformer(ModelConfig(**settings, tie_embeddings=False))
    torch.manual_seed(0)
    scaled = Transformer(ModelConfig(**settings, tie_embeddings=True, logit_scale=256**-0.5))
    assert scaled.tok_embed.weight.std().item() == pytest.approx(0.02 * 16, rel=0.05)
    assert plain.tok_embed.weight.std().item() == pytest.approx(0.02, rel=0.05)
    hidden = torch.nn.functional.rms_norm(torch.randn(64, 256), (256,))
    spread = scaled.head(hidden).std() / plain.head(hidden).std()
    assert 0.8 < spread.item() < 1.25


def test_pooling() -> None:
    hidden = torch.arange(2 * 4 * 1, dtype=torch.float32).view(2, 4, 1)
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    left = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])
    assert pool(hidden, right, "cls").flatten().tolist() == [0, 4]
    assert pool(hidden, right, "mean").flatten().tolist() == [1, 4.5]
    assert pool(hidden, right, "last").flatten().tolist() == [2, 5]
    assert pool(hidden, left, "last").flatten().tolist() == [3, 7]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_at_tiny_size_and_trains(name: str) -> None:
    config = ModelConfig.from_name(name)
    shrink = {
        "vocab_size": 128,
        "max_seq_len": 32,
        "num_layers": 2,
        "embed_dim": 32,
        "num_heads": 4,
        "num_kv_heads": 4 // (config.num_heads // config.num_kv_heads) or 1,
        "head_dim": None,
        "mlp_hidden_dim": None,
        "pad_token_id": 0,
    }
    if config.arch == "encoder_decoder":
        shrink["num_decoder_layers"] = 1
    small = config.replace(**shrink)
    assert small.position == config.position and small.norm == config.norm and small.arch == config.arch
    torch.manual_seed(0)
    model = Transformer(small)
    ids = torch.randint(0, 128, (2, 16))
    out = model(ids, decoder_input_ids=ids) if small.arch == "encoder_decoder" else model(ids)
    out.logits.float().pow(2).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient reached {missing}"


def test_param_count_matches_known_models() -> None:
    """Counted on the meta device, equal to the published sizes."""
    assert parameter_count(ModelConfig.from_name("gpt2-small")) == 124_439_808
    assert parameter_count(ModelConfig.from_name("t5-small")) == 60_506_624
    assert parameter_count(ModelConfig.from_name("llama-1b")) == 1_235_814_400


def test_flops_per_token_is_six_n_plus_attention() -> None:
    config = ModelConfig.from_name("tiny-decoder")
    n = parameter_count(config, non_embedding=True)
    assert flops_per_token(config, 32) == 6 * n + 12 * 2 * 4 * 16 * 32
    assert n == parameter_count(config) - 64 * 64  # the learned position table is lookup-only


def test_activation_checkpointing_gives_the_same_gradients() -> None:
    model = tiny("decoder").train()
    ids = torch.randint(0, 256, (2, 12))
    model(ids).logits.sum().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.decoder.activation_checkpointing = True
    model(ids).logits.sum().backward()
    for a, p in zip(plain, model.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad, atol=1e-5, rtol=1e-5)


def test_encoder_has_no_cache_and_learned_positions_have_a_limit() -> None:
    with pytest.raises(ValueError, match="no KV cache"):
        tiny("encoder").new_cache(1, 4)
    with pytest.raises(ValueError, match="max_seq_len 64"):
        tiny("decoder")(torch.zeros(1, 65, dtype=torch.long))


@pytest.mark.parametrize("arch", ["decoder", "encoder"])
def test_logits_at_gives_the_selected_rows_of_the_full_logits_and_their_gradients(arch: str) -> None:
    torch.manual_seed(0)
    head = "mlm" if arch == "encoder" else "lm"
    config = ModelConfig(arch=arch, vocab_size=50, embed_dim=16, num_layers=2, num_heads=2, max_seq_len=12, head=head)
    model = Transformer(config)
    ids = torch.randint(0, 50, (3, 10))
    at = torch.rand(3, 10) < 0.3
    full = model(ids).logits[at]  # (N, V)
    picked = model(ids, logits_at=at).logits
    torch.testing.assert_close(picked, full)
    grads = []
    for logits in (model(ids).logits[at], model(ids, logits_at=at).logits):
        model.zero_grad()
        logits.logsumexp(-1).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)
    classifier = Transformer(ModelConfig(arch="encoder", vocab_size=50, embed_dim=16, num_layers=1, num_heads=2,
                                         head="classification", num_labels=2))  # fmt: skip
    with pytest.raises(ValueError, match="language-model head only"):
        classifier(ids, logits_at=at)
