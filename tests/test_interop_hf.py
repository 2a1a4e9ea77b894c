"""Hugging Face interop, family by family: a small random-weight reference model built by
``transformers`` from a config object is saved to disk, loaded by lmforge (no transformers
involved), and must give the same logits and hidden states on a right-padded batch (fp32,
atol 1e-5), the same greedy generation, and survive the export back to transformers."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")

from lmforge import Transformer, load  # noqa: E402
from lmforge.generation import generate  # noqa: E402
from lmforge.interop import load_hf_model, save_hf  # noqa: E402

VOCAB = 101
ATOL = 1e-5


@dataclass
class Case:
    id: str
    make: Callable[[], object]  # a transformers model
    kind: str  # "decoder", "encoder", "bert" (an encoder with token types) or "seq2seq"


def hf(cls: str, config_cls: str, **config) -> Callable[[], object]:
    def make() -> object:
        torch.manual_seed(0)
        return getattr(transformers, cls)(getattr(transformers, config_cls)(**config)).eval()

    return make


def untied_t5() -> object:
    model = hf("T5ForConditionalGeneration", "T5Config", **T5_SMALL, tie_word_embeddings=False)()
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.shared.weight))  # a head of its own
    return model


GPT2 = dict(vocab_size=VOCAB, n_positions=40, n_embd=30, n_layer=2, n_head=3, bos_token_id=1, eos_token_id=2)
LLAMA = dict(
    vocab_size=VOCAB, hidden_size=40, intermediate_size=56, num_hidden_layers=2, max_position_embeddings=64
)
BERT = dict(
    vocab_size=VOCAB, hidden_size=30, num_hidden_layers=2, num_attention_heads=3, intermediate_size=48
)
T5_SMALL = dict(
    vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, decoder_start_token_id=0
)

CASES = [
    Case("gpt2-tied-3heads", hf("GPT2LMHeadModel", "GPT2Config", **GPT2), "decoder"),
    Case(
        "gpt2-untied-5heads-gelu",
        hf(
            "GPT2LMHeadModel",
            "GPT2Config",
            **{**GPT2, "n_head": 5, "n_embd": 40},
            n_inner=72,
            activation_function="gelu",
            tie_word_embeddings=False,
        ),
        "decoder",
    ),
    Case("gpt2-base", hf("GPT2Model", "GPT2Config", **GPT2), "decoder"),
    Case(
        "gpt2-classification",
        hf("GPT2ForSequenceClassification", "GPT2Config", **GPT2, num_labels=3, pad_token_id=0),
        "decoder",
    ),
    Case(
        "llama-mqa-5heads-untied",
        hf("LlamaForCausalLM", "LlamaConfig", **LLAMA, num_attention_heads=5, num_key_value_heads=1),
        "decoder",
    ),
    Case(
        "llama-gqa-biases-tied-theta",
        hf(
            "LlamaForCausalLM",
            "LlamaConfig",
            **LLAMA,
            num_attention_heads=4,
            num_key_value_heads=2,
            attention_bias=True,
            mlp_bias=True,
            tie_word_embeddings=True,
            rope_theta=500000.0,
        ),
        "decoder",
    ),
    Case(
        "mistral-head_dim-16",
        hf(
            "MistralForCausalLM",
            "MistralConfig",
            **LLAMA,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            sliding_window=None,
        ),
        "decoder",
    ),
    Case(
        "qwen2-qkv-bias-tied-gqa",
        hf(
            "Qwen2ForCausalLM",
            "Qwen2Config",
            **{**LLAMA, "hidden_size": 48},
            num_attention_heads=6,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        ),
        "decoder",
    ),
    Case(
        "llama-classification",
        hf(
            "LlamaForSequenceClassification",
            "LlamaConfig",
            **LLAMA,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_labels=4,
            pad_token_id=0,
        ),
        "decoder",
    ),
    Case("bert-mlm-3heads", hf("BertForMaskedLM", "BertConfig", **BERT), "bert"),
    Case(
        "bert-mlm-untied-gelu_new",
        hf("BertForMaskedLM", "BertConfig", **BERT, tie_word_embeddings=False, hidden_act="gelu_new"),
        "bert",
    ),
    Case(
        "bert-base-5heads",
        hf("BertModel", "BertConfig", **{**BERT, "hidden_size": 40, "num_attention_heads": 5}),
        "bert",
    ),
    Case(
        "bert-classification",
        hf("BertForSequenceClassification", "BertConfig", **BERT, num_labels=3),
        "bert",
    ),
    Case(
        "bert-token-classification",
        hf("BertForTokenClassification", "BertConfig", **BERT, num_labels=5),
        "bert",
    ),
    Case("bert-qa", hf("BertForQuestionAnswering", "BertConfig", **BERT), "bert"),
    Case(
        "roberta-mlm",
        hf("RobertaForMaskedLM", "RobertaConfig", **BERT, max_position_embeddings=40, type_vocab_size=1),
        "encoder",
    ),
    Case(
        "roberta-classification",
        hf(
            "RobertaForSequenceClassification",
            "RobertaConfig",
            **BERT,
            max_position_embeddings=40,
            type_vocab_size=1,
            num_labels=2,
        ),
        "encoder",
    ),
    Case("t5-relu-tied-scaled", hf("T5ForConditionalGeneration", "T5Config", **T5_SMALL), "seq2seq"),
    Case(
        "t5-v1.1-gated-gelu-3heads",
        hf(
            "T5ForConditionalGeneration",
            "T5Config",
            **{**T5_SMALL, "num_heads": 3, "d_kv": 10},
            num_decoder_layers=1,
            feed_forward_proj="gated-gelu",
            tie_word_embeddings=False,
        ),
        "seq2seq",
    ),
    Case("t5-untied-head", untied_t5, "seq2seq"),
    Case("t5-model", hf("T5Model", "T5Config", **T5_SMALL), "seq2seq"),
    Case("t5-encoder", hf("T5EncoderModel", "T5Config", **T5_SMALL), "encoder"),
]


def batch(kind: str, *, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """A right-padded batch of 3 (lengths 9, 6, 1): real ids avoid the pad id."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 1:] = 0
    ids = ids.masked_fill(mask == 0, pad_id)
    out = {"input_ids": ids, "attention_mask": mask}
    if kind == "bert":
        out["token_type_ids"] = (torch.arange(9) >= 4).long().expand(3, 9) * mask
    if kind == "seq2seq":
        dec = torch.randint(3, VOCAB, (3, 5), generator=g)
        dec_mask = torch.ones(3, 5, dtype=torch.long)
        dec_mask[2, 3:] = 0
        out.update(decoder_input_ids=dec.masked_fill(dec_mask == 0, pad_id), decoder_attention_mask=dec_mask)
    return out


def reference(model: object, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(logits or None, last hidden states) of a transformers model."""
    name = type(model).__name__
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    if name.startswith(("T5", "MT5")) and name != "T5EncoderModel":
        hidden = out.decoder_hidden_states[-1]
    elif hasattr(out, "last_hidden_state"):
        hidden = out.last_hidden_state
    else:
        base = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        with torch.no_grad():
            hidden = model.base_model(**base).last_hidden_state
    if hasattr(out, "start_logits"):
        return torch.stack((out.start_logits, out.end_logits), dim=-1), hidden
    return getattr(out, "logits", None), hidden


def ours(model: Transformer, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor | None, torch.Tensor]:
    kwargs = {k: v.bool() if k.endswith("attention_mask") else v for k, v in inputs.items()}
    with torch.no_grad():
        out = model(**kwargs)
    return out.logits, out.hidden_states


def assert_same(a: tuple, b: tuple, inputs: dict[str, torch.Tensor]) -> None:
    """Logits and hidden states equal at the real (unpadded) positions."""
    real = inputs.get("decoder_attention_mask", inputs["attention_mask"]).bool()
    (logits_a, hidden_a), (logits_b, hidden_b) = a, b
    torch.testing.assert_close(hidden_a[real], hidden_b[real], atol=ATOL, rtol=1e-5)
    assert (logits_a is None) == (logits_b is None)
    if logits_a is not None:
        if logits_a.dim() == 2:  # sequence classification: one row per sequence
            torch.testing.assert_close(logits_a, logits_b, atol=ATOL, rtol=1e-5)
        else:
            torch.testing.assert_close(logits_a[real], logits_b[real], atol=ATOL, rtol=1e-5)


@pytest.fixture(params=CASES, ids=[c.id for c in CASES])
def case(request: pytest.FixtureRequest, tmp_path: Path):
    c: Case = request.param
    ref = c.make()
    ref.save_pretrained(tmp_path / "hf")
    pad = 1 if "roberta" in c.id else 0
    return c, ref, tmp_path, batch(c.kind, pad_id=pad)


def test_logits_and_hidden_states_match_transformers(case) -> None:
    c, ref, tmp_path, inputs = case
    model = load_hf_model(tmp_path / "hf")
    assert not model.training and all(p.dtype == torch.float32 for p in model.parameters())
    assert_same(reference(ref, inputs), ours(model, inputs), inputs)


def test_export_loads_in_transformers_with_identical_outputs(case) -> None:
    c, ref, tmp_path, inputs = case
    model = load_hf_model(tmp_path / "hf")
    # lmforge's config does not remember RoBERTa's position offset: name the model type to get
    # RoBERTa back (by default the same network is written as an equivalent BERT).
    model_type = "roberta" if "roberta" in c.id else None
    save_hf(model, None, tmp_path / "out", model_type=model_type)
    again = type(ref).from_pretrained(tmp_path / "out").eval()
    assert_same(reference(ref, inputs), reference(again, inputs), inputs)
    # and lmforge reads its own export back to the same model
    reread = load_hf_model(tmp_path / "out")
    for (name, a), (_, b) in zip(model.state_dict().items(), reread.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


GENERATE = ["gpt2-tied-3heads", "llama-mqa-5heads-untied", "qwen2-qkv-bias-tied-gqa", "mistral-head_dim-16"]


@pytest.mark.parametrize("case_id", GENERATE + ["t5-relu-tied-scaled", "t5-v1.1-gated-gelu-3heads"])
def test_greedy_generation_matches_transformers(case_id: str, tmp_path: Path) -> None:
    c = next(c for c in CASES if c.id == case_id)
    ref = c.make()
    ref.generation_config.eos_token_id = None  # random weights: generate the full length
    ref.generation_config.pad_token_id = 0
    ref.save_pretrained(tmp_path)
    model = load_hf_model(tmp_path)
    g = torch.Generator().manual_seed(2)
    if c.kind == "seq2seq":
        ids = torch.randint(3, VOCAB, (2, 7), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 5:] = 0
    else:  # left-padded prompts, as generation wants them
        ids = torch.randint(3, VOCAB, (2, 6), generator=g)
        mask = torch.ones_like(ids)
        mask[1, :2] = 0
    ids = ids.masked_fill(mask == 0, 0)
    with torch.no_grad():
        expected = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    got = generate(model, ids, attention_mask=mask.bool(), max_new_tokens=10, decoder_start_token_id=0)
    assert got.tolist() == expected.tolist()


def test_sharded_safetensors_and_pytorch_bin_folders(tmp_path: Path) -> None:
    ref = CASES[4].make()  # llama, untied
    inputs = batch("decoder")
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 2
    assert_same(reference(ref, inputs), ours(load_hf_model(tmp_path / "sharded"), inputs), inputs)

    for legacy in (False, True):  # the zip format (memory-mapped) and the pre-1.6 format
        folder = tmp_path / f"bin-{legacy}"
        ref.config.save_pretrained(folder)
        torch.save(ref.state_dict(), folder / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy)
        assert not (folder / "model.safetensors").exists()
        assert_same(reference(ref, inputs), ours(load_hf_model(folder), inputs), inputs)


def test_head_override_keeps_backbone_and_starts_a_new_head(tmp_path: Path) -> None:
    ref = hf("BertForMaskedLM", "BertConfig", **BERT)()
    ref.save_pretrained(tmp_path)
    model = load_hf_model(tmp_path, head="classification", num_labels=3)
    assert model.config.head == "classification" and model.config.num_labels == 3
    inputs = batch("bert")
    with torch.no_grad():
        hidden = ref.bert(**inputs).last_hidden_state
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(ours(model, inputs)[1][real], hidden[real], atol=ATOL, rtol=1e-5)
    assert ours(model, inputs)[0].shape == (3, 3)
    # the new head (BertForMaskedLM has no pooler) starts from lmforge's initialization
    for layer in (model.head.dense, model.head.classifier):
        torch.testing.assert_close(layer.bias, torch.zeros_like(layer.bias))
        assert 0.01 < layer.weight.std() < 0.03
    mlm = load_hf_model(tmp_path, head="mlm")  # the checkpoint's own head when asked for it
    torch.testing.assert_close(mlm.head.bias, ref.cls.predictions.bias)

    base = hf("BertModel", "BertConfig", **BERT)()  # has a pooler: it becomes the head's dense layer
    base.save_pretrained(tmp_path / "base")
    model = load_hf_model(tmp_path / "base", head="classification", num_labels=2)
    torch.testing.assert_close(model.head.dense.weight, base.pooler.dense.weight)


def test_lmforge_load_reads_a_hugging_face_folder(tmp_path: Path) -> None:
    ref = CASES[0].make()
    ref.save_pretrained(tmp_path)
    run = load(tmp_path)
    assert run.config == {} and run.path == tmp_path and run.tokenizer is None
    inputs = batch("decoder")
    assert_same(reference(ref, inputs), ours(run.model, inputs), inputs)


def test_export_of_a_model_built_from_scratch(tmp_path: Path) -> None:
    """A freshly built lmforge model (not loaded from anywhere) exports to transformers too."""
    from lmforge import ModelConfig

    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny-llama", vocab_size=VOCAB)).eval()
    save_hf(model, None, tmp_path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    inputs = batch("decoder")
    assert_same(reference(ref, inputs), ours(model, inputs), inputs)


EXPECTED_CONFIG = {
    "gpt2-tied-3heads": dict(
        arch="decoder", num_heads=3, activation="gelu_tanh", tie_embeddings=True, head="lm"
    ),
    "gpt2-untied-5heads-gelu": dict(num_heads=5, mlp_hidden_dim=72, activation="gelu", tie_embeddings=False),
    "gpt2-classification": dict(head="classification", num_labels=3, pooling="last"),
    "llama-mqa-5heads-untied": dict(num_heads=5, num_kv_heads=1, tie_embeddings=False, bias=False),
    "llama-gqa-biases-tied-theta": dict(num_kv_heads=2, bias=True, tie_embeddings=True, rope_theta=500000.0),
    "mistral-head_dim-16": dict(head_dim=16, num_heads=4, embed_dim=40),
    "qwen2-qkv-bias-tied-gqa": dict(bias=False, qkv_bias=True, tie_embeddings=True, num_kv_heads=2),
    "bert-mlm-3heads": dict(arch="encoder", prenorm=False, embed_norm=True, type_vocab_size=2, head="mlm"),
    "bert-mlm-untied-gelu_new": dict(tie_embeddings=False, activation="gelu_tanh"),
    "bert-base-5heads": dict(head="none", num_heads=5),
    "bert-classification": dict(head="classification", pooler=True, pooling="cls", num_labels=3),
    "roberta-mlm": dict(max_seq_len=40 - 2, pad_token_id=1, type_vocab_size=1),
    "t5-relu-tied-scaled": dict(
        arch="encoder_decoder", attn_scale=1.0, logit_scale=32**-0.5, tie_embeddings=True
    ),
    # transformers 5 ties a v1.1 head built from a config object, and does not scale it
    "t5-v1.1-gated-gelu-3heads": dict(gated_mlp=True, head_dim=10, num_decoder_layers=1, logit_scale=1.0),
    "t5-untied-head": dict(tie_embeddings=False, logit_scale=1.0),
    "t5-encoder": dict(arch="encoder", head="none", position="relative"),
}


@pytest.mark.parametrize("case_id", list(EXPECTED_CONFIG))
def test_config_translation(case_id: str, tmp_path: Path) -> None:
    c = next(c for c in CASES if c.id == case_id)
    c.make().save_pretrained(tmp_path)
    config = load_hf_model(tmp_path).config
    for field, value in EXPECTED_CONFIG[case_id].items():
        expected = pytest.approx(value) if isinstance(value, float) else value
        assert getattr(config, field) == expected, field


def test_loaded_weights_are_the_models_own(tmp_path: Path) -> None:
    """Parameters taken from the memory-mapped file without a copy are still the model's own:
    training does not write to the file, and the folder can be overwritten while the model lives."""
    import hashlib

    CASES[5].make().save_pretrained(tmp_path)  # llama with biases, tied
    digest = hashlib.sha256((tmp_path / "model.safetensors").read_bytes()).hexdigest()
    model = load_hf_model(tmp_path).train()
    assert model.head.proj.weight is model.tok_embed.weight
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randint(0, VOCAB, (2, 7))).logits.square().mean().backward()
    optimizer.step()
    assert hashlib.sha256((tmp_path / "model.safetensors").read_bytes()).hexdigest() == digest
    save_hf(model, None, tmp_path)  # replaces the file the parameters were mapped from
    reread = load_hf_model(tmp_path)
    for (name, a), b in zip(model.named_parameters(), reread.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
