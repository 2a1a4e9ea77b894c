"""Adapters exported to the Hugging Face PEFT format load with ``peft.PeftModel.from_pretrained``
onto the exported base and give the same outputs; every method whose record has a layer export is
tested with its default options, every method without one is refused with its record's reason."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

from lmforge import ModelConfig, Transformer, peft
from lmforge.errors import LMForgeError
from lmforge.interop.hf import save_hf
from lmforge.peft.hf_export import base_model_copy, export_hf_peft

transformers = pytest.importorskip("transformers", reason="transformers is a test extra")
hf_peft = pytest.importorskip("peft", reason="peft is a test extra")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

LLAMA = dict(
    arch="decoder",
    vocab_size=97,
    max_seq_len=64,
    embed_dim=48,
    num_layers=2,
    num_heads=6,
    num_kv_heads=2,
    mlp_hidden_dim=80,
    position="rope",
    norm="rmsnorm",
    activation="silu",
    gated_mlp=True,
    bias=False,
    tie_embeddings=False,
)
BERT = dict(
    arch="encoder",
    vocab_size=97,
    max_seq_len=64,
    embed_dim=48,
    num_layers=2,
    num_heads=3,
    mlp_hidden_dim=80,
    prenorm=False,
    embed_norm=True,
    type_vocab_size=2,
    norm_eps=1e-12,
    head="classification",
    num_labels=3,
    pooler=True,
)


def build(fields: dict) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(**fields)).eval()


@torch.no_grad()
def perturb(model: Transformer) -> None:
    g = torch.Generator().manual_seed(4)
    for parameter in peft.base.adapter_parameters(model, "default").values():
        parameter.add_(torch.randn(parameter.shape, generator=g) * 0.2)


def export(model: Transformer, tmp_path: Path):
    save_hf(base_model_copy(model), None, tmp_path / "base")
    export_hf_peft(model, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    auto = (
        transformers.AutoModelForCausalLM
        if model.config.head == "lm"
        else transformers.AutoModelForSequenceClassification
    )
    base = auto.from_pretrained(tmp_path / "base")
    return hf_peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()


def batch() -> dict:
    ids = torch.randint(1, 97, (2, 8), generator=torch.Generator().manual_seed(6))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize(
    ("fields", "method", "options"),
    [
        (LLAMA, "lora", {"r": 4, "alpha": 8, "target_modules": "all-linear"}),
        (LLAMA, "lora", {"r": 4, "alpha": 8, "use_rslora": True}),
        (LLAMA, "ia3", {}),
        (BERT, "lora", {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}),
        (BERT, "ia3", {}),
    ],
)
def test_layer_adapters_load_in_hf_peft_with_identical_outputs(
    fields: dict, method: str, options: dict, tmp_path: Path
) -> None:
    model = build(fields)
    peft.apply(model, method, **options)
    perturb(model)
    reference = export(model, tmp_path)
    inputs = batch()
    with torch.no_grad():
        ours = model(inputs["input_ids"], attention_mask=inputs["attention_mask"].bool()).logits
        theirs = reference(**inputs).logits
    if fields["arch"] == "decoder":
        real = inputs["attention_mask"].bool()
        torch.testing.assert_close(ours[real], theirs[real], atol=1e-5, rtol=1e-4)
    else:  # the classification head (and BERT's pooler) came along as modules_to_save
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


LAYER_EXPORTS = [
    name
    for name in peft.method_names()
    if getattr(peft.get_method(name).hf_export, "layer_tensors", None) is not None
]
NO_EXPORT = [name for name in peft.method_names() if peft.get_method(name).hf_export is None]


@pytest.mark.parametrize("fields", [LLAMA, BERT], ids=["llama", "bert"])
@pytest.mark.parametrize("method", LAYER_EXPORTS)
def test_every_layer_export_loads_with_identical_outputs(fields: dict, method: str, tmp_path: Path) -> None:
    model = build(fields)
    peft.apply(model, method)
    perturb(model)
    reference = export(model, tmp_path)
    inputs = batch()
    with torch.no_grad():
        ours = model(inputs["input_ids"], attention_mask=inputs["attention_mask"].bool()).logits
        theirs = reference(**inputs).logits
    if fields["arch"] == "decoder":
        real = inputs["attention_mask"].bool()
        torch.testing.assert_close(ours[real], theirs[real], atol=1e-5, rtol=1e-4)
    else:  # one row per sequence from the classification head (saved as modules_to_save)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", NO_EXPORT)
def test_methods_without_an_export_say_why(method: str, tmp_path: Path) -> None:
    model = build(BERT)
    peft.apply(model, method)
    reason = peft.get_method(method).no_hf_export_reason
    with pytest.raises(LMForgeError, match=re.escape(reason)):
        export_hf_peft(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_prompt_tuning_loads_in_hf_peft_with_identical_outputs(tmp_path: Path) -> None:
    model = build(LLAMA)
    peft.apply(model, "prompt", num_virtual_tokens=4)
    perturb(model)
    reference = export(model, tmp_path)
    ids = batch()["input_ids"]
    with torch.no_grad():
        ours = model(ids).logits
        theirs = reference(input_ids=ids).logits  # (B, P + T, V): the virtual tokens come first
    torch.testing.assert_close(ours, theirs[:, 4:], atol=1e-5, rtol=1e-4)


def test_what_the_format_cannot_hold_is_refused(tmp_path: Path) -> None:
    model = build(LLAMA)
    peft.apply(model, "lora", use_dora=True)
    with pytest.raises(LMForgeError, match="cannot export DoRA"):
        export_hf_peft(model, tmp_path / "a")
    gpt2 = Transformer(ModelConfig.from_name("tiny-decoder", activation="gelu_tanh"))
    peft.apply(gpt2, "lora")
    with pytest.raises(LMForgeError, match="no plain counterpart"):
        export_hf_peft(gpt2, tmp_path / "b")
    bert = build(BERT)
    peft.apply(bert, "prompt", num_virtual_tokens=2)
    with pytest.raises(LMForgeError, match="CLS"):
        export_hf_peft(bert, tmp_path / "c")
