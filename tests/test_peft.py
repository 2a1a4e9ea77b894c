"""Every PEFT method × every property of the contract, on every architecture."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmforge import ModelConfig, Transformer, peft
from lmforge.errors import LMForgeError

ARCHS = ["tiny-decoder", "tiny-encoder", "tiny-encoder-decoder", "tiny-llama"]
# The matrix: one row per method (or variant of one): case -> (method, options). Adding a method
# to lmforge.peft adds its row here; every registered method must have one (tested below).
OPTIONS = {
    "lora": ("lora", {"r": 4}),
    "rslora": ("lora", {"r": 4, "use_rslora": True}),
    "dora": ("lora", {"r": 4, "use_dora": True, "target_modules": "all-linear"}),
    "adalora": ("adalora", {"init_r": 6, "target_r": 3}),
    "adapter": ("adapter", {"bottleneck": 8}),
    "pfeiffer": ("adapter", {"style": "pfeiffer", "bottleneck": 8}),
    "ia3": ("ia3", {}),
    "bitfit": ("bitfit", {}),
    "loha": ("loha", {"r": 2, "alpha": 4}),
    "prefix": ("prefix", {"num_virtual_tokens": 3}),
    "prefix-mlp": ("prefix", {"num_virtual_tokens": 3, "projection": True, "projection_hidden": 16}),
    "prompt": ("prompt", {"num_virtual_tokens": 3}),
    "ptuning": ("ptuning", {"num_virtual_tokens": 3, "hidden": 16}),
}
PROMPT_METHODS = ["prefix", "prefix-mlp", "prompt", "ptuning"]  # they add inputs, not layers
LAYER_METHODS = [case for case in OPTIONS if case not in PROMPT_METHODS]
METHODS = list(OPTIONS)
# What each record declares; test_merge_unmerge_or_clear_error holds every method to it.
MERGEABLE = {case for case, (method, _) in OPTIONS.items() if peft.get_method(method).mergeable}


def build(arch: str, *, head: str | None = None, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    overrides = {"head": head, "num_labels": 3} if head else {}
    return Transformer(ModelConfig.from_name(arch, **overrides)).eval()


def inputs(arch: str) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 256, (2, 7), generator=g)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 5:] = False
    batch = {"input_ids": ids, "attention_mask": mask}
    if "encoder-decoder" in arch:
        batch["decoder_input_ids"] = torch.randint(1, 256, (2, 5), generator=g)
    return batch


def outputs(model: Transformer, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def applied(model: Transformer, method: str, name: str = "default") -> Transformer:
    kind, options = OPTIONS[method]
    return peft.apply(model, kind, adapter_name=name, **options)


def skip_unsupported(arch: str, method: str) -> None:
    if method == "bitfit" and arch == "tiny-llama":
        pytest.skip("tiny-llama has no bias terms (BitFit refuses it: tested separately)")


@torch.no_grad()
def perturb(model: Transformer, name: str = "default", scale: float = 0.3) -> None:
    """Give the adapter non-trivial values, as training would."""
    g = torch.Generator().manual_seed(7)
    for key, parameter in peft.base.adapter_parameters(model, name).items():
        if ".head." in f".{key}":
            continue
        parameter.add_(torch.randn(parameter.shape, generator=g) * scale)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", LAYER_METHODS)
def test_layer_methods_are_a_no_op_at_init(arch: str, method: str) -> None:
    skip_unsupported(arch, method)
    model, batch = build(arch), inputs(arch)
    before = outputs(model, batch)
    applied(model, method)
    torch.testing.assert_close(outputs(model, batch), before, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", PROMPT_METHODS)
def test_prompt_methods_change_only_what_they_add(arch: str, method: str) -> None:
    """Outputs keep their shape (the virtual tokens' own outputs are dropped), the base weights are
    untouched, and without the adapter the model is the base model again."""
    model, batch = build(arch), inputs(arch)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    before = outputs(model, batch)
    applied(model, method)
    after = outputs(model, batch)
    assert after.shape == before.shape
    assert not torch.allclose(after, before)  # the virtual tokens are attended to
    with peft.disable_adapters(model):
        torch.testing.assert_close(outputs(model, batch), before)
    for key, value in base_state.items():
        torch.testing.assert_close(model.state_dict()[key], value)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", METHODS)
def test_only_adapter_and_head_parameters_train(arch: str, method: str) -> None:
    skip_unsupported(arch, method)
    head = "classification" if arch != "tiny-encoder-decoder" else None
    model, batch = build(arch, head=head), inputs(arch)
    applied(model, method)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    own = set(peft.base.adapter_parameters(model, "default"))
    assert trainable == own and trainable
    if head:
        assert any(".head." in f".{n}" or n.startswith("head.") for n in trainable), (
            "the task head trains too"
        )
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1
    )
    for _ in range(2):
        out = model(**batch).logits
        out.float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, parameter in model.named_parameters():
        changed = not torch.equal(parameter.detach(), snapshot[name])
        if name in trainable:
            assert changed or method == "adalora", f"{name} should have trained"
        else:
            assert not changed, f"frozen {name} changed"
            assert parameter.grad is None


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", METHODS)
def test_save_load_round_trip(arch: str, method: str, tmp_path: Path) -> None:
    skip_unsupported(arch, method)
    head = "classification" if arch == "tiny-encoder" else None
    model, batch = build(arch, head=head), inputs(arch)
    applied(model, method)
    perturb(model)
    expected = outputs(model, batch)
    peft.save_adapter(model, tmp_path / "adapter")
    fresh = build(arch, head=head)
    if head:  # the head is saved with the adapter: a fresh head must not matter
        torch.nn.init.normal_(fresh.head.classifier.weight)
    peft.load_adapter(fresh, tmp_path / "adapter", name="reloaded")
    torch.testing.assert_close(outputs(fresh, batch), expected)
    size = (tmp_path / "adapter" / "adapter.safetensors").stat().st_size
    assert size < sum(p.numel() for p in fresh.parameters()) * 4 / 2  # adapter-only: much smaller


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", METHODS)
def test_merge_unmerge_or_clear_error(arch: str, method: str) -> None:
    skip_unsupported(arch, method)
    model, batch = build(arch), inputs(arch)
    base = outputs(model, batch)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    applied(model, method)
    perturb(model)
    adapted = outputs(model, batch)
    if method not in MERGEABLE:
        with pytest.raises(LMForgeError, match="cannot merge"):
            peft.merge(model)
        torch.testing.assert_close(outputs(model, batch), adapted)  # nothing changed
        return
    peft.merge(model)
    torch.testing.assert_close(outputs(model, batch), adapted, atol=2e-5, rtol=1e-4)
    peft.unmerge(model)
    torch.testing.assert_close(outputs(model, batch), adapted, atol=2e-5, rtol=1e-4)
    with peft.disable_adapters(model):
        torch.testing.assert_close(outputs(model, batch), base, atol=2e-5, rtol=1e-4)
    restored = base_weights(model)
    assert set(restored) == set(base_state)
    for key, value in base_state.items():  # unmerge gave the base weights back
        torch.testing.assert_close(restored[key], value, atol=1e-5, rtol=1e-5)


def base_weights(model: Transformer) -> dict[str, torch.Tensor]:
    """The base model's tensors under their original names (wrappers keep them under ``.base``)."""
    return {
        key.replace(".base.", "."): value
        for key, value in model.state_dict().items()
        if ".adapters." not in key and not key.startswith("peft_modules.")
    }


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", METHODS)
def test_disable_equals_base(arch: str, method: str) -> None:
    skip_unsupported(arch, method)
    model, batch = build(arch), inputs(arch)
    base = outputs(model, batch)
    applied(model, method)
    perturb(model)
    assert not torch.allclose(outputs(model, batch), base)
    with peft.disable_adapters(model):
        torch.testing.assert_close(outputs(model, batch), base)
    assert not torch.allclose(outputs(model, batch), base)  # back on after the block


@pytest.mark.parametrize("arch", ["tiny-decoder", "tiny-llama", "tiny-encoder-decoder"])
@pytest.mark.parametrize("method", METHODS)
def test_kv_cache_decoding_equals_full_forward(arch: str, method: str) -> None:
    skip_unsupported(arch, method)
    model = build(arch)
    applied(model, method)
    perturb(model)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 256, (2, 9), generator=g)
    with torch.no_grad():
        if model.config.arch == "encoder_decoder":
            src = torch.randint(1, 256, (2, 6), generator=g)
            full = model(src, decoder_input_ids=ids).logits
            memory = model.encode(src)[0]
            cache = model.new_cache(2, 9, memory_len=memory.shape[1])
            steps = [
                model(decoder_input_ids=ids[:, t : t + 1], encoder_hidden_states=memory, cache=cache).logits
                for t in range(9)
            ]
        else:
            full = model(ids).logits
            cache = model.new_cache(2, 32)
            steps = [model(ids[:, :4], cache=cache).logits]
            steps += [model(ids[:, t : t + 1], cache=cache).logits for t in range(4, 9)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_every_registered_method_is_in_the_matrix() -> None:
    assert set(peft.method_names()) <= {method for method, _ in OPTIONS.values()}


@pytest.mark.parametrize("method", METHODS)
def test_two_adapters_of_one_method_switch_and_delete(method: str) -> None:
    skip_unsupported("tiny-decoder", method)
    model, batch = build("tiny-decoder"), inputs("tiny-decoder")
    base = outputs(model, batch)
    applied(model, method, name="a")
    perturb(model, "a")
    out_a = outputs(model, batch)
    applied(model, method, name="b")
    perturb(model, "b", scale=0.5)
    out_b = outputs(model, batch)
    assert not torch.allclose(out_a, out_b)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(
        peft.base.adapter_parameters(model, "b")
    )
    peft.set_adapter(model, "a")
    torch.testing.assert_close(outputs(model, batch), out_a)
    peft.delete_adapter(model, "a")
    assert peft.active_adapter(model) == "b"
    torch.testing.assert_close(outputs(model, batch), out_b)
    peft.delete_adapter(model, "b")
    torch.testing.assert_close(outputs(model, batch), base)


def test_several_adapters_add_switch_disable_delete() -> None:
    model, batch = build("tiny-decoder"), inputs("tiny-decoder")
    base = outputs(model, batch)
    applied(model, "lora", name="a")
    perturb(model, "a")
    out_a = outputs(model, batch)
    applied(model, "ia3", name="b")  # a second adapter, of another method, on the same layers
    perturb(model, "b", scale=0.5)
    assert peft.active_adapter(model) == "b"
    out_b = outputs(model, batch)
    assert not torch.allclose(out_a, out_b)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(
        peft.base.adapter_parameters(model, "b")
    )
    peft.set_adapter(model, "a")
    torch.testing.assert_close(outputs(model, batch), out_a)
    with peft.disable_adapters(model):
        torch.testing.assert_close(outputs(model, batch), base)
    peft.delete_adapter(model, "a")
    assert peft.active_adapter(model) == "b"
    torch.testing.assert_close(outputs(model, batch), out_b)
    peft.delete_adapter(model, "b")
    assert not list(peft.base.adapted_modules(model))  # wrappers gone: the plain model is back
    torch.testing.assert_close(outputs(model, batch), base)
    with pytest.raises(LMForgeError, match="no adapter named 'a'"):
        peft.set_adapter(model, "a")


def test_adapted_module_does_not_forward_attributes() -> None:
    m = build("tiny-decoder")
    peft.apply(m, "lora")
    wrapped = m.get_submodule("decoder.layers.0.self_attn.q_proj")
    assert isinstance(wrapped, peft.AdaptedModule)
    with pytest.raises(AttributeError):
        wrapped.weight  # noqa: B018
    assert peft.unwrap(wrapped) is wrapped.base
    assert peft.unwrap(wrapped).weight.shape == (64, 64)
    plain = torch.nn.Linear(2, 3)
    assert peft.unwrap(plain) is plain


def test_merge_and_unload_gives_a_plain_model() -> None:
    model, batch = build("tiny-llama"), inputs("tiny-llama")
    applied(model, "lora")
    perturb(model)
    adapted = outputs(model, batch)
    plain = peft.merge_and_unload(model)
    assert not list(peft.base.adapted_modules(plain))
    assert set(plain.state_dict()) == set(build("tiny-llama").state_dict())
    torch.testing.assert_close(outputs(plain, batch), adapted, atol=2e-5, rtol=1e-4)


def test_clear_errors() -> None:
    model = build("tiny-llama")
    with pytest.raises(LMForgeError, match="unknown PEFT method 'lorra' \\(did you mean 'lora'"):
        peft.apply(model, "lorra")
    with pytest.raises(LMForgeError, match=r"lora has no option 'rank' \(did you mean 'r'\?\) \(options: alpha, dropout"):
        peft.apply(model, "lora", rank=4)
    with pytest.raises(LMForgeError, match="target module 'query' matches nothing"):
        peft.apply(model, "lora", target_modules=["query"])
    with pytest.raises(LMForgeError, match="BitFit needs bias terms"):
        peft.apply(model, "bitfit")
    with pytest.raises(LMForgeError, match="the rank must be at least 1"):
        peft.apply(model, "lora", r=0)
    peft.apply(model, "lora")
    with pytest.raises(LMForgeError, match="already exists"):
        peft.apply(model, "lora")
    with pytest.raises(LMForgeError, match="prompt tuning adds input embeddings"):
        peft.apply(model, "prompt", adapter_name="p")
        peft.merge(model, "p")


def test_load_refuses_a_different_base(tmp_path: Path) -> None:
    model = build("tiny-decoder")
    applied(model, "lora")
    peft.save_adapter(model, tmp_path)
    other = Transformer(ModelConfig.from_name("tiny-decoder", embed_dim=32))
    with pytest.raises(LMForgeError, match="trained on a base with embed_dim = 64"):
        peft.load_adapter(other, tmp_path)


def test_trainable_report_and_rank_scaling() -> None:
    model = build("tiny-decoder")
    applied(model, "lora")
    report = peft.trainable_report(model)
    # r · (in + out) per adapted matrix: q and v in 2 layers, 64 → 64
    assert report["trainable"] == 2 * 2 * 4 * (64 + 64)
    assert 0 < report["percent"] < 5
    assert "trainable parameters: 2,048 of" in peft.format_report(report)
    assert peft.LoraConfig(r=4, alpha=8).scaling == 2.0
    assert peft.LoraConfig(r=4, alpha=8, use_rslora=True).scaling == 4.0


def test_prompt_tuning_text_initialization() -> None:
    model = build("tiny-decoder")

    class Chars:
        def encode(self, text: str) -> list[int]:
            return [ord(c) for c in text]

    peft.apply(model, "prompt", num_virtual_tokens=5, init_text="ab", tokenizer=Chars())
    prompts = model.peft_modules["default"].embedding
    table = model.tok_embed.weight
    for i, token in enumerate([97, 98, 97, 98, 97]):
        torch.testing.assert_close(prompts[i], table[token])


def test_naming_part_of_the_head_keeps_the_rest_frozen() -> None:
    """modules_to_save=["head.classifier"] trains the classifier only (BERT's pooler stays frozen, as
    Hugging Face PEFT's SEQ_CLS default does); without it the whole task head trains."""
    model = Transformer(
        ModelConfig.from_name("tiny-encoder", head="classification", num_labels=3, pooler=True)
    )
    peft.apply(model, "lora", r=2, modules_to_save=["head.classifier"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("head.classifier" in n for n in trainable)
    assert not any("head.dense" in n for n in trainable)
    whole = Transformer(
        ModelConfig.from_name("tiny-encoder", head="classification", num_labels=3, pooler=True)
    )
    peft.apply(whole, "lora", r=2)
    assert any(
        "head.adapters.default.module.dense" in n for n, p in whole.named_parameters() if p.requires_grad
    )
