"""GGUF in and out on tiny random models (no download): lmforge's writer, read back by lmforge's
reader, by the ``gguf`` package's own reader and by transformers' GGUF loader, in every dtype;
the RoPE permutation checked against llama.cpp's pairing; damaged and foreign files refused in one
line with exit status 2."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

import lmforge  # noqa: E402
from lmforge import ModelConfig, Transformer  # noqa: E402
from lmforge.chat_template import BUILTIN_TEMPLATES  # noqa: E402
from lmforge.cli import main  # noqa: E402
from lmforge.errors import LMForgeError  # noqa: E402
from lmforge.interop.gguf import from_interleaved, load_gguf, to_interleaved  # noqa: E402
from lmforge.interop.gguf_writer import save_gguf  # noqa: E402
from lmforge.tokenizers import Tokenizer  # noqa: E402

DTYPES = ("f32", "f16", "bf16", "q8_0")
# Largest logit difference against the unquantized model (logits of a tiny random model are
# about ±1): f32 is exact; f16 keeps 11 significant bits, bf16 8, Q8_0 8 bits per block of 32.
TOLERANCE = {"f32": 1e-5, "f16": 5e-3, "bf16": 5e-2, "q8_0": 5e-2}
TEXTS = [
    "def add(a, b):\n    return a + b  # sum\n",
    "The quick brown fox jumps over the lazy dog. 1234567890",
    "机器学习很有趣，你好世界！",
    "emoji 🤗🚀 and accents: café naïve",
] * 20
SAMPLES = ["Hello world", "x = 42\nprint(x)", "你好，机器", "🤗 ok", "  two  spaces", "<|im_end|>tail"]
CHATML = BUILTIN_TEMPLATES["chatml"]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    tok = Tokenizer.train(iter(TEXTS), kind="bpe", vocab_size=300, show_progress=False)
    tok.backend.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok.chat_template = CHATML
    return tok


def tiny(tokenizer: Tokenizer, *, qwen2: bool = False, tied: bool = False) -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig.from_name(
        "tiny-llama", vocab_size=tokenizer.vocab_size, qkv_bias=True if qwen2 else None, tie_embeddings=tied
    )
    model = Transformer(config).eval()
    with torch.no_grad():  # non-zero q/k/v biases, so a wrong bias permutation would show
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.5)
    return model


def batch(tokenizer: Tokenizer) -> torch.Tensor:
    ids = tokenizer.encode("The quick brown fox 123 你好 🤗")
    return torch.tensor([ids])


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, tokenizer: Tokenizer) -> dict[tuple[str, str], Path]:
    """One GGUF file per (shape, dtype)."""
    folder = tmp_path_factory.mktemp("gguf")
    out = {}
    for shape in ("llama", "qwen2", "llama-tied"):
        model = tiny(tokenizer, qwen2=shape == "qwen2", tied=shape.endswith("tied"))
        for dtype in DTYPES:
            path = folder / f"{shape}-{dtype}.gguf"
            save_gguf(model, tokenizer, path, dtype=dtype)
            out[shape, dtype] = path
    return out


@pytest.mark.parametrize("shape", ["llama", "qwen2", "llama-tied"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_written_files_load_back_with_the_same_logits(files, tokenizer, shape: str, dtype: str) -> None:
    model = tiny(tokenizer, qwen2=shape == "qwen2", tied=shape.endswith("tied"))
    run = lmforge.load(files[shape, dtype])
    assert run.model.config.tie_embeddings == shape.endswith("tied")
    assert (run.model.config.qkv_bias is True) == (shape == "qwen2")
    ids = batch(tokenizer)
    with torch.no_grad():
        expected, got = model(ids).logits, run.model(ids).logits
    torch.testing.assert_close(got, expected, atol=TOLERANCE[dtype], rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_weights_are_exactly_what_the_gguf_package_dequantizes(files, tokenizer, dtype: str) -> None:
    """Our writer quantizes with the gguf package; our reader returns its dequantized values, q/k
    rows restored to rotate-half order (llama.cpp's q/k rows are pairs: rows 0,1 are a pair)."""
    path = files["llama", dtype]
    reader = gguf.GGUFReader(path)
    stored = {t.name: t for t in reader.tensors}
    model = lmforge.load(path).model
    q = stored["blk.0.attn_q.weight"]
    assert q.tensor_type.name == dtype.upper()
    raw = torch.from_numpy(np.array(gguf.quants.dequantize(q.data, q.tensor_type)))
    heads = model.config.num_heads
    assert torch.equal(model.decoder.layers[0].self_attn.q_proj.weight, from_interleaved(raw, heads))
    assert stored["blk.0.attn_norm.weight"].tensor_type.name == "F32"  # 1-D tensors stay F32


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_other_quantizations_are_read(tmp_path: Path, tokenizer, monkeypatch, kind: str) -> None:
    """Files in the 4- and 5-bit types llama.cpp writes (made here with the gguf package's own
    quantizers) read back as exactly what the package dequantizes, q/k rows un-permuted."""
    from lmforge.interop import gguf_writer as ours

    monkeypatch.setitem(ours.WRITE_TYPES, kind.lower(), kind)
    monkeypatch.setitem(ours.FILE_TYPES, kind, 2)
    model = tiny(tokenizer)
    path = tmp_path / "m.gguf"
    assert save_gguf(model, tokenizer, path, dtype=kind.lower())[kind] == 2 * 7 + 2  # 7 a layer, embed, head
    stored = {t.name: t for t in gguf.GGUFReader(path).tensors}
    loaded = lmforge.load(path).model
    k = stored["blk.1.attn_k.weight"]
    assert k.tensor_type.name == kind
    raw = torch.from_numpy(np.array(gguf.quants.dequantize(k.data, k.tensor_type)))
    heads = model.config.num_kv_heads
    assert torch.equal(loaded.decoder.layers[1].self_attn.k_proj.weight, from_interleaved(raw, heads))
    ids = batch(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0.3, rtol=0)


@pytest.mark.parametrize("kind", ["Q4_K", "Q5_K"])
def test_k_quants_are_dequantized_by_the_gguf_package(tmp_path: Path, kind: str) -> None:
    """K-quant blocks (256 weights; the gguf package dequantizes but cannot write them): random
    blocks with valid half-precision scales read as the package dequantizes them."""
    from lmforge.interop.gguf import GGUFFile

    kind_enum = gguf.GGMLQuantizationType[kind]
    block, size = gguf.GGML_QUANT_SIZES[kind_enum]
    rows, cols = 3, 2 * block
    raw = np.random.default_rng(0).integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    raw[..., :4] = np.array([0.01, 0.002], dtype=np.float16).view(np.uint8)  # d, dmin lead each block
    writer = gguf.GGUFWriter(tmp_path / "k.gguf", "llama")
    writer.add_tensor("w", raw.reshape(rows, -1), raw_dtype=kind_enum)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    file = GGUFFile(tmp_path / "k.gguf")
    assert file.shape("w") == (rows, cols)
    expected = gguf.quants.dequantize(raw.reshape(rows, -1), kind_enum)
    assert np.isfinite(expected).all()
    assert torch.equal(file.tensor("w"), torch.from_numpy(np.array(expected)))


def test_the_gguf_package_reads_our_metadata(files, tokenizer) -> None:
    reader = gguf.GGUFReader(files["qwen2", "q8_0"])

    def value(key: str):
        return reader.fields[key].contents()

    config = tiny(tokenizer, qwen2=True).config
    assert value("general.architecture") == "qwen2"
    assert value("general.file_type") == 7  # MOSTLY_Q8_0
    assert value("qwen2.block_count") == config.num_layers
    assert value("qwen2.attention.head_count_kv") == config.num_kv_heads
    assert value("qwen2.rope.freq_base") == pytest.approx(config.rope_theta)
    assert value("tokenizer.ggml.model") == "gpt2"
    assert value("tokenizer.ggml.pre") == "gpt2"
    assert value("tokenizer.ggml.tokens") == [tokenizer.id_to_token(i) for i in range(tokenizer.vocab_size)]
    assert value("tokenizer.ggml.token_type")[tokenizer.token_to_id("<|im_end|>")] == 3  # control
    assert value("tokenizer.ggml.eos_token_id") == tokenizer.eos_id
    assert value("tokenizer.chat_template") == CHATML
    names = {t.name for t in reader.tensors}
    assert {"token_embd.weight", "output.weight", "blk.1.attn_q.bias", "output_norm.weight"} <= names
    assert (
        len(names) == 1 + 1 + 1 + config.num_layers * 12
    )  # embed, output, norm; 9 weights + 3 biases a layer


def test_tokenizer_and_chat_template_survive(files, tokenizer) -> None:
    loaded = lmforge.load(files["llama", "f16"]).tokenizer
    for text in SAMPLES + TEXTS[:4]:
        assert loaded.encode(text) == tokenizer.encode(text), text
        assert loaded.decode(loaded.encode(text)) == tokenizer.decode(tokenizer.encode(text))
    for role in ("bos", "eos", "pad", "unk"):
        assert getattr(loaded, f"{role}_id") == getattr(tokenizer, f"{role}_id")
    assert loaded.chat_template == CHATML
    messages = [{"role": "user", "content": "hi"}]
    assert loaded.apply_chat_template(messages, add_generation_prompt=True) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_rope_permutation_matches_llama_cpp_pairing() -> None:
    """RoPE on adjacent pairs (llama.cpp) with the permuted weights gives the same attention
    scores as lmforge's rotate-half RoPE with the original ones."""
    from lmforge.model.positions import RotaryEmbedding, apply_rotary

    torch.manual_seed(0)
    H, D, T, E = 2, 8, 5, 12
    wq, wk = torch.randn(H * D, E), torch.randn(H * D, E)
    x = torch.randn(T, E)
    cos, sin = RotaryEmbedding(D, base=10000.0)(torch.arange(T))

    def rotate_half(w: torch.Tensor) -> torch.Tensor:  # lmforge's: (H, T, D)
        return apply_rotary((x @ w.T).reshape(T, H, D).transpose(0, 1)[None], cos, sin)[0]

    def adjacent_pairs(w: torch.Tensor) -> torch.Tensor:  # llama.cpp's "normal" RoPE
        v = (x @ w.T).reshape(T, H, D // 2, 2)
        freqs = 10000.0 ** (-torch.arange(0, D, 2).float() / D)
        angle = torch.arange(T).float()[:, None] * freqs  # (T, D/2)
        cos, sin = angle.cos()[:, None], angle.sin()[:, None]
        out = torch.stack([v[..., 0] * cos - v[..., 1] * sin, v[..., 0] * sin + v[..., 1] * cos], dim=-1)
        return out.reshape(T, H, D).transpose(0, 1)

    ours = rotate_half(wq) @ rotate_half(wk).transpose(-1, -2)
    theirs = adjacent_pairs(to_interleaved(wq, H)) @ adjacent_pairs(to_interleaved(wk, H)).transpose(-1, -2)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-5)
    assert torch.equal(from_interleaved(to_interleaved(wq, H), H), wq)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ["llama", "qwen2"])
def test_transformers_gguf_loader_gives_our_logits(files, tokenizer, shape: str, dtype: str) -> None:
    pytest.importorskip("transformers")
    os.environ["HF_HUB_OFFLINE"] = "1"
    path = files[shape, dtype]
    theirs = hf_gguf_model(path)
    ours = lmforge.load(path).model
    ids = batch(tokenizer)
    with torch.no_grad():
        # the same dequantized weights on both sides: equal up to float32 summation order
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=1e-5, rtol=1e-5)


def hf_gguf_model(path: Path) -> torch.nn.Module:
    """transformers' own reading of a GGUF file, in float32 (``dtype`` was ``torch_dtype`` before 4.56)."""
    import transformers

    major = int(transformers.__version__.split(".")[0])
    dtype_key = "dtype" if major >= 5 else "torch_dtype"
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, **{dtype_key: torch.float32}
    ).eval()


def test_convert_command_and_folder_loading(tmp_path: Path, tokenizer, capsys) -> None:
    run_dir = lmforge.save_run(tmp_path / "run", model=tiny(tokenizer), tokenizer=tokenizer)
    out = tmp_path / "models" / "tiny.gguf"
    out.parent.mkdir()
    assert main(["convert", "--to", "gguf", str(run_dir), str(out), "--dtype", "q8_0"]) == 0
    assert "wrote a GGUF file (q8_0" in capsys.readouterr().out
    run = lmforge.load(out.parent)  # a folder holding one GGUF file
    assert run.path == out and run.tokenizer.chat_template == CHATML
    again = tmp_path / "again.gguf"  # GGUF in, GGUF out (re-quantized from the dequantized weights)
    assert main(["convert", "--to", "gguf", str(out), str(again), "--dtype", "f32"]) == 0
    shutil.copy(again, out.parent / "second.gguf")
    with pytest.raises(LMForgeError, match="2 GGUF files in the folder"):
        lmforge.load(out.parent)


def test_gguf_to_run_directory_and_back(files, tmp_path: Path, tokenizer) -> None:
    """convert --to lmforge reads a GGUF file into a run directory that keeps the chat template
    (tokenizer_config.json), and that directory converts back to the same GGUF tensors."""
    source = files["qwen2", "f32"]
    run_dir = tmp_path / "run"
    assert main(["convert", "--to", "lmforge", str(source), str(run_dir)]) == 0
    run = lmforge.load(run_dir)
    assert run.tokenizer.chat_template == CHATML
    assert run.tokenizer.encode(SAMPLES[2]) == tokenizer.encode(SAMPLES[2])
    back = tmp_path / "back.gguf"
    assert main(["convert", "--to", "gguf", str(run_dir), str(back), "--dtype", "f32"]) == 0
    first, second = gguf.GGUFReader(source), gguf.GGUFReader(back)
    for a, b in zip(first.tensors, second.tensors, strict=True):
        assert a.name == b.name and np.array_equal(a.data, b.data), a.name
    for key in (
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.merges",
        "tokenizer.chat_template",
        "qwen2.rope.freq_base",
    ):
        assert first.fields[key].contents() == second.fields[key].contents(), key


def test_generate_chat_streams_the_answer_only(files, capsys) -> None:
    code = main(["generate", "--model", str(files["llama", "f16"]), "--prompt", "hi", "--chat",
                 "--max_new_tokens", "5", "--device", "cpu"])  # fmt: skip
    assert code == 0
    assert "<|im_start|>" not in capsys.readouterr().out


def test_lora_applies_to_a_model_read_from_gguf(files, tokenizer) -> None:
    from lmforge import peft

    model = lmforge.load(files["llama", "f16"]).model
    ids = batch(tokenizer)
    with torch.no_grad():
        before = model(ids).logits
    peft.apply(model, "lora", r=4, target_modules=["q_proj", "v_proj"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora" in n for n in trainable)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before)  # B = 0: a no-op at step 0
    loss = model(ids).logits.float().logsumexp(-1).mean()
    loss.backward()
    assert all(model.get_parameter(n).grad is not None for n in trainable)


# ---- refusals: one line, exit status 2 ------------------------------------------------------------


def refused_by_cli(path: Path, capsys) -> str:
    code = main(["generate", "--model", str(path), "--prompt", "hi", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def test_truncated_file(files, tmp_path: Path, capsys) -> None:
    data = files["llama", "f16"].read_bytes()
    for cut in (len(data) // 2, 200, 10):
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(data[:cut])
        with pytest.raises(LMForgeError, match="truncated or damaged GGUF file"):
            lmforge.load(path)
        assert "truncated or damaged" in refused_by_cli(path, capsys)


def test_not_a_gguf_file(tmp_path: Path, capsys) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 this is a zip file, not a GGUF one" * 10)
    assert "not a GGUF file" in refused_by_cli(path, capsys)


def write_foreign(path: Path, architecture: str, **extra: object) -> Path:
    writer = gguf.GGUFWriter(path, architecture)
    writer.add_block_count(1)
    for key, value in extra.items():
        writer.add_uint32(key.format(arch=architecture), value)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_wrong_architecture_is_named(tmp_path: Path, capsys) -> None:
    path = write_foreign(tmp_path / "mamba.gguf", "mamba")
    err = refused_by_cli(path, capsys)
    assert "GGUF architecture 'mamba' is not supported" in err and "llama, qwen2" in err
    moe = write_foreign(tmp_path / "moe.gguf", "llama", **{"{arch}.expert_count": 8})
    assert "mixture-of-experts" in refused_by_cli(moe, capsys)


def test_missing_gguf_package_says_how_to_install(files, monkeypatch) -> None:
    monkeypatch.setitem(__import__("sys").modules, "gguf", None)
    with pytest.raises(LMForgeError, match=r"pip install 'lmforge\[gguf\]'"):
        lmforge.load(files["llama", "f16"])


def test_export_refuses_what_gguf_cannot_hold(tmp_path: Path, tokenizer) -> None:
    torch.manual_seed(0)
    gpt2 = Transformer(ModelConfig.from_name("tiny-decoder", vocab_size=tokenizer.vocab_size))
    with pytest.raises(LMForgeError, match="Llama-style decoder"):
        save_gguf(gpt2, tokenizer, tmp_path / "x.gguf")
    char = Tokenizer.train(iter(TEXTS), kind="char", vocab_size=100, show_progress=False)
    with pytest.raises(LMForgeError, match="byte-level BPE"):
        save_gguf(tiny(char), char, tmp_path / "x.gguf")
    with pytest.raises(LMForgeError, match="unknown GGUF dtype"):
        save_gguf(tiny(tokenizer), tokenizer, tmp_path / "x.gguf", dtype="q4_0")
    assert not (tmp_path / "x.gguf").exists()


def test_unsupported_tokenizers_are_named(files, tmp_path: Path) -> None:
    from lmforge.interop.gguf import GGUFFile
    from lmforge.interop.gguf_vocab import gguf_tokenizer

    fields = GGUFFile(files["llama", "f32"]).metadata("tokenizer.")
    with pytest.raises(LMForgeError, match="tokenizer.ggml.model 'llama'"):
        gguf_tokenizer({**fields, "tokenizer.ggml.model": "llama"}, file=tmp_path)
    with pytest.raises(LMForgeError, match="pre-tokenizer 'deepseek-coder' is not supported"):
        gguf_tokenizer({**fields, "tokenizer.ggml.pre": "deepseek-coder"}, file=tmp_path)
    loaded = load_gguf(files["llama", "f32"])
    assert loaded.config["gguf"]["general.architecture"] == "llama"


def test_pre_tokenizer_names_round_trip(tokenizer) -> None:
    """Each llama.cpp pre-tokenizer name lmforge reads is the name it writes for that splitting."""
    from tokenizers import Tokenizer as Backend

    from lmforge.interop.gguf_vocab import PRE_TOKENIZERS, byte_level_pre_tokenizer, pre_tokenizer_name

    for name, (split, digits, _) in PRE_TOKENIZERS.items():
        backend = Backend.from_str(tokenizer.backend.to_str())
        backend.pre_tokenizer = byte_level_pre_tokenizer(split, digits)
        assert PRE_TOKENIZERS[pre_tokenizer_name(backend)][:2] == (split, digits), name
    backend.pre_tokenizer = None
    with pytest.raises(LMForgeError, match="has no llama.cpp name"):
        pre_tokenizer_name(backend)


def test_embedding_rows_beyond_the_vocabulary_get_unused_tokens(tmp_path: Path, tokenizer) -> None:
    """llama.cpp wants one token per embedding row: a model padded past its tokenizer (a common
    rounding of vocab_size) is written with unused [PAD<id>] tokens, as llama.cpp's converter does."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny-llama", vocab_size=tokenizer.vocab_size + 6)).eval()
    path = tmp_path / "padded.gguf"
    save_gguf(model, tokenizer, path, dtype="f32")
    fields = gguf.GGUFReader(path).fields
    tokens, types = fields["tokenizer.ggml.tokens"].contents(), fields["tokenizer.ggml.token_type"].contents()
    assert len(tokens) == model.config.vocab_size
    assert tokens[-1] == f"[PAD{model.config.vocab_size - 1}]" and types[-6:] == [5] * 6
    run = lmforge.load(path)
    for text in SAMPLES:
        assert run.tokenizer.encode(text) == tokenizer.encode(text)
    ids = batch(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(run.model(ids).logits, model(ids).logits, atol=1e-5, rtol=0)
