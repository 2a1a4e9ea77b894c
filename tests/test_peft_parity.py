"""Numeric parity with Hugging Face PEFT for LoRA, IA3 and LoHa given the same weights, and equal
trainable-parameter counts for equal configurations (no download: small random models)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from lmforge import peft
from lmforge.interop.hf import load_hf_model

transformers = pytest.importorskip("transformers", reason="transformers is a test extra")
hf_peft = pytest.importorskip("peft", reason="peft is a test extra")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def llama_pair(tmp_path: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    config = transformers.LlamaConfig(
        vocab_size=97,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    reference = transformers.LlamaForCausalLM(config).eval()
    reference.save_pretrained(tmp_path)
    ours = load_hf_model(tmp_path).eval()
    return reference, ours


def bert_pair(tmp_path: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    config = transformers.BertConfig(
        vocab_size=97,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=3,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    reference = transformers.BertModel(config, add_pooling_layer=False).eval()
    reference.save_pretrained(tmp_path)
    ours = load_hf_model(tmp_path).eval()
    return reference, ours


# lmforge module name (suffix) -> (Llama name, BERT name)
NAMES = {
    "q_proj": ("q_proj", "query"),
    "k_proj": ("k_proj", "key"),
    "v_proj": ("v_proj", "value"),
    "down_proj": ("down_proj", "output.dense"),
}


def hf_module_for(ours_name: str, family: str) -> str:
    """decoder.layers.1.self_attn.q_proj -> model.layers.1.self_attn.q_proj (Llama) or
    encoder.layer.1.attention.self.query (BERT)."""
    parts = ours_name.split(".")
    layer, leaf = parts[2], parts[-1]
    if family == "llama":
        block = "self_attn" if leaf.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
        return f"model.layers.{layer}.{block}.{leaf}"
    leaf = NAMES[leaf][1]
    return (
        f"encoder.layer.{layer}.attention.self.{leaf}"
        if leaf in ("query", "key", "value")
        else f"encoder.layer.{layer}.{leaf}"
    )


def inputs() -> dict:
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(5))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("variant", ["lora", "rslora"])
def test_lora_matches_hf_peft(family: str, variant: str, tmp_path: Path) -> None:
    reference, ours = (llama_pair if family == "llama" else bert_pair)(tmp_path)
    targets = ["q_proj", "v_proj"]
    hf_targets = targets if family == "llama" else ["query", "value"]
    rslora = variant == "rslora"
    reference = hf_peft.get_peft_model(
        reference,
        hf_peft.LoraConfig(
            r=4, lora_alpha=12, target_modules=hf_targets, lora_dropout=0.0, use_rslora=rslora
        ),
    ).eval()
    peft.apply(ours, "lora", r=4, alpha=12, target_modules=targets, use_rslora=rslora)
    assert peft.trainable_report(ours)["trainable"] == reference.get_nb_trainable_parameters()[0]

    g = torch.Generator().manual_seed(2)
    hf_modules = dict(reference.named_modules())
    for name, module in peft.base.adapted_modules(ours):
        adapter = module.adapters["default"]
        hf = hf_modules["base_model.model." + hf_module_for(name, family)]
        with torch.no_grad():
            adapter.lora_A.copy_(torch.randn(adapter.lora_A.shape, generator=g) * 0.3)
            adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=g) * 0.3)
            hf.lora_A["default"].weight.copy_(adapter.lora_A)
            hf.lora_B["default"].weight.copy_(adapter.lora_B)
    batch = inputs()
    with torch.no_grad():
        theirs = reference(**batch)
        mine = ours(batch["input_ids"], attention_mask=batch["attention_mask"].bool())
    real = batch["attention_mask"].bool()  # outputs at padding positions are not compared
    if family == "llama":
        torch.testing.assert_close(mine.logits[real], theirs.logits[real], atol=1e-5, rtol=1e-4)
    else:
        torch.testing.assert_close(
            mine.hidden_states[real], theirs.last_hidden_state[real], atol=1e-5, rtol=1e-4
        )


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_ia3_matches_hf_peft(family: str, tmp_path: Path) -> None:
    reference, ours = (llama_pair if family == "llama" else bert_pair)(tmp_path)
    if family == "llama":
        hf_targets, hf_ff = ["k_proj", "v_proj", "down_proj"], ["down_proj"]
    else:
        # "output.dense" alone would also match attention.output.dense: name the FFN one exactly
        hf_ff = r".*layer\.\d+\.output\.dense"
        hf_targets = r".*\.(key|value)|" + hf_ff
    reference = hf_peft.get_peft_model(
        reference, hf_peft.IA3Config(target_modules=hf_targets, feedforward_modules=hf_ff)
    ).eval()
    peft.apply(ours, "ia3")  # defaults: k_proj, v_proj, down_proj (input-scaled)
    hf_counted = reference.get_nb_trainable_parameters()[0]
    g = torch.Generator().manual_seed(3)
    hf_modules = dict(reference.named_modules())
    for name, module in peft.base.adapted_modules(ours):
        adapter = module.adapters["default"]
        hf = hf_modules["base_model.model." + hf_module_for(name, family)]
        with torch.no_grad():
            adapter.scale.copy_(1 + torch.randn(adapter.scale.shape, generator=g) * 0.3)
            hf.ia3_l["default"].copy_(adapter.scale.view_as(hf.ia3_l["default"]))
    assert peft.trainable_report(ours)["trainable"] == hf_counted
    batch = inputs()
    with torch.no_grad():
        theirs = reference(**batch)
        mine = ours(batch["input_ids"], attention_mask=batch["attention_mask"].bool())
    real = batch["attention_mask"].bool()  # outputs at padding positions are not compared
    if family == "llama":
        torch.testing.assert_close(mine.logits[real], theirs.logits[real], atol=1e-5, rtol=1e-4)
    else:
        torch.testing.assert_close(
            mine.hidden_states[real], theirs.last_hidden_state[real], atol=1e-5, rtol=1e-4
        )


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_loha_matches_hf_peft(family: str, tmp_path: Path) -> None:
    reference, ours = (llama_pair if family == "llama" else bert_pair)(tmp_path)
    hf_targets = ["q_proj", "v_proj"] if family == "llama" else ["query", "value"]
    reference = hf_peft.get_peft_model(
        reference, hf_peft.LoHaConfig(r=3, alpha=5, target_modules=hf_targets)
    ).eval()
    peft.apply(ours, "loha", r=3, alpha=5, target_modules=["q_proj", "v_proj"])
    assert peft.trainable_report(ours)["trainable"] == reference.get_nb_trainable_parameters()[0]
    g = torch.Generator().manual_seed(4)
    hf_modules = dict(reference.named_modules())
    factors = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    for name, module in peft.base.adapted_modules(ours):
        adapter = module.adapters["default"]
        hf = hf_modules["base_model.model." + hf_module_for(name, family)]
        with torch.no_grad():
            for factor in factors:
                mine = getattr(adapter, factor)
                theirs = getattr(hf, factor)["default"]
                assert mine.shape == theirs.shape, factor
                mine.copy_(torch.randn(mine.shape, generator=g) * 0.3)
                theirs.copy_(mine)
    batch = inputs()
    real = batch["attention_mask"].bool()  # outputs at padding positions are not compared

    def compare() -> None:
        with torch.no_grad():
            theirs = reference(**batch)
            mine = ours(batch["input_ids"], attention_mask=real)
        if family == "llama":
            torch.testing.assert_close(mine.logits[real], theirs.logits[real], atol=1e-5, rtol=1e-4)
        else:
            torch.testing.assert_close(
                mine.hidden_states[real], theirs.last_hidden_state[real], atol=1e-5, rtol=1e-4
            )

    compare()
    peft.merge(ours)  # merged on both sides: the same folded weights
    reference.merge_adapter()
    compare()
