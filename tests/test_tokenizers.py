"""Tokenizers: training of each kind, Unicode round trips, specials, HF tokenizer.json loaded as is."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from lmforge import LMForgeError
from lmforge.data import Corpus
from lmforge.tokenizer_training import _continuing_characters, new_backend
from lmforge.tokenizers import DEFAULT_SPECIAL_TOKENS, ROLES, Tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

TEXTS = [
    "First Citizen: Before we proceed any further, hear me speak.\nAll: Speak, speak.\n",
    "机器学习是人工智能的一个分支。你好，世界！",
    "Emoji 😀👍🏽 and accents: café, naïve, Straße — “quotes” …\ttabs\n\n  spaces  ",
    "Numbers 3.14159 and code: def f(x): return x ** 2  # comment",
] * 4
UNSEEN = "完全没见过的字 🦜 and ẞ"


@pytest.fixture(scope="module")
def trained() -> dict[str, Tokenizer]:
    return {
        kind: Tokenizer.train(iter(TEXTS), kind=kind, vocab_size=400, show_progress=False)
        for kind in ("char", "bpe", "wordpiece")
    }


@pytest.mark.parametrize("kind", ["char", "bpe", "wordpiece"])
def test_specials_come_first_with_the_same_ids(trained: dict[str, Tokenizer], kind: str) -> None:
    tok = trained[kind]
    for index, role in enumerate(ROLES):
        assert getattr(tok, f"{role}_id") == index
        assert tok.special_tokens[role] == DEFAULT_SPECIAL_TOKENS[role]
    assert tok.kind == kind
    assert tok.pad_id == 0  # ModelConfig.pad_token_id's default


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_exact_round_trip_on_unicode(trained: dict[str, Tokenizer], kind: str) -> None:
    tok = trained[kind]
    for text in TEXTS[:4]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert all(i not in tok.special_ids for i in ids)
    # byte-level BPE covers text it never saw; char maps unseen characters to [UNK]
    if kind == "bpe":
        assert tok.decode(tok.encode(UNSEEN)) == UNSEEN
    else:
        assert tok.unk_id in tok.encode(UNSEEN)


def test_wordpiece_round_trip_modulo_normalization(trained: dict[str, Tokenizer]) -> None:
    tok = trained["wordpiece"]
    for text in TEXTS[:4]:
        decoded = tok.decode(tok.encode(text))
        assert "".join(decoded.split()) == "".join(text.split())  # equal up to whitespace
    assert tok.decode(tok.encode("你好，世界")) == "你 好 ， 世 界"  # CJK characters are words
    lower = Tokenizer.train(
        iter(TEXTS), kind="wordpiece", vocab_size=300, lowercase=True, show_progress=False
    )
    assert lower.decode(lower.encode("First Citizen")) == "first citizen"


def test_char_vocabulary_is_the_distinct_characters_plus_specials(tmp_path: Path) -> None:
    text = "hello world\nhow are you?\n"
    path = tmp_path / "input.txt"
    path.write_text(text)
    tok = Tokenizer.train(path, kind="char", vocab_size=10_000, show_progress=False)
    assert tok.vocab_size == len(set(text)) + len(ROLES)
    assert len(tok.encode(text)) == len(text)
    capped = Tokenizer.train(path, kind="char", vocab_size=len(ROLES) + 3, show_progress=False)
    assert capped.vocab_size == len(ROLES) + 3  # the most frequent characters: 'o', ' ', 'l'
    assert capped.decode(capped.encode("lo ol")) == "lo ol"
    assert capped.encode("e") == [capped.unk_id]


@pytest.mark.skipif(
    not (SHARED / "tinyshakespeare").is_dir(), reason="../shared/data/tinyshakespeare is absent"
)
def test_char_tokenizer_on_tinyshakespeare() -> None:
    path = SHARED / "tinyshakespeare" / "input.txt"
    tok = Tokenizer.train(path, kind="char", vocab_size=1000, show_progress=False)
    assert tok.vocab_size == 65 + len(ROLES)  # nanoGPT's 65 characters plus the specials
    text = path.read_text()[:5000]
    assert tok.decode(tok.encode(text)) == text


def test_add_special_tokens_templates(trained: dict[str, Tokenizer]) -> None:
    assert trained["bpe"].encode("hello", add_special_tokens=True)[0] == trained["bpe"].bos_id
    assert trained["bpe"].encode("hello", add_special_tokens=True)[-1] == trained["bpe"].eos_id
    wordpiece = trained["wordpiece"].encode("hello", add_special_tokens=True)
    assert (wordpiece[0], wordpiece[-1]) == (trained["wordpiece"].cls_id, trained["wordpiece"].sep_id)
    assert trained["char"].decode(trained["char"].encode("ab", add_special_tokens=True)) == "ab"


def test_save_load_keeps_roles_ids_and_fingerprint(trained: dict[str, Tokenizer], tmp_path: Path) -> None:
    tok = Tokenizer.train(
        iter(TEXTS),
        kind="bpe",
        vocab_size=300,
        special_tokens={"eos": "<|endoftext|>", "pad": "<|pad|>"},
        num_sentinels=3,
        show_progress=False,
    )
    tok.save(tmp_path)  # a folder: tokenizer.json + tokenizer_config.json
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["eos_token"] == "<|endoftext|>"
    loaded = Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert loaded.special_tokens == tok.special_tokens
    assert loaded.sentinel_ids == tok.sentinel_ids == [7, 8, 9]
    assert loaded.fingerprint == tok.fingerprint
    assert loaded.encode(TEXTS[1]) == tok.encode(TEXTS[1])
    assert trained["bpe"].fingerprint != tok.fingerprint
    # explicit roles win over the companion file
    assert Tokenizer.from_file(tmp_path, {"eos": "[SEP]"}).eos_id == tok.sep_id


def test_sentinels_can_be_added_later(trained: dict[str, Tokenizer]) -> None:
    tok = Tokenizer(Backend.from_str(trained["char"].backend.to_str()))
    before = tok.vocab_size
    tok.add_sentinels(4).add_sentinels(2)
    assert tok.sentinel_ids == list(range(before, before + 4))
    assert set(tok.sentinel_ids) <= set(tok.special_ids)
    assert tok.decode(tok.encode("a<extra_id_1>b"), skip_special_tokens=False) == "a<extra_id_1>b"


def bert_style_tokenizer_json(path: Path) -> None:
    """A BERT-uncased-style tokenizer.json built with the `tokenizers` library itself."""
    backend = Backend(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    backend.train_from_iterator(
        TEXTS, trainers.WordPieceTrainer(vocab_size=200, special_tokens=specials, show_progress=False)
    )
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 3), ("[SEP]", 4)],
    )
    backend.save(str(path))


def test_hugging_face_tokenizer_json_loads_as_is(tmp_path: Path) -> None:
    path = tmp_path / "bert.json"
    bert_style_tokenizer_json(path)
    reference = Backend.from_file(str(path))
    tok = Tokenizer.from_file(path)
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 2, 3, 4, 5)
    assert tok.bos_id is None and tok.eos_id is None
    text = "Speak, speak! 你好"
    assert tok.encode(text, add_special_tokens=True) == reference.encode(text).ids
    assert tok.vocab_size == reference.get_vocab_size()
    batch = tok.encode_batch(["speak", "hear me speak"], add_special_tokens=True)
    assert batch["input_ids"][0, 0] == 3 and batch["input_ids"][0, -1] == 0  # [CLS] ... [PAD]
    # GPT-2 style names: <|endoftext|> is bos, eos and pad
    gpt = Tokenizer.train(
        iter(TEXTS),
        kind="bpe",
        vocab_size=300,
        special_tokens={r: "<|endoftext|>" for r in ("pad", "bos", "eos")},
        show_progress=False,
    )
    gpt_path = tmp_path / "gpt.json"
    gpt.backend.save(str(gpt_path))  # no companion file: roles from names
    loaded = Tokenizer.from_file(gpt_path)
    assert loaded.bos_id == loaded.eos_id == loaded.pad_id == loaded.token_to_id("<|endoftext|>")


def test_encode_batch_pads_and_truncates(trained: dict[str, Tokenizer]) -> None:
    tok = trained["char"]
    batch = tok.encode_batch(["abc", "a"], add_special_tokens=True)
    assert batch["input_ids"].shape == (2, 5) and batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"].tolist() == [[True] * 5, [True] * 3 + [False] * 2]
    left = tok.encode_batch(["abc", "a"], padding_side="left")
    assert left["attention_mask"][1].tolist() == [False, False, True]
    assert left["input_ids"][1, -1].item() == tok.encode("a")[0]
    short = tok.encode_batch(["abcdef"], add_special_tokens=True, max_length=4)
    assert short["input_ids"][0].tolist()[-1] == tok.eos_id and short["input_ids"].shape == (1, 4)
    assert tok.encode("abcdef") == tok.encode("abcdef")  # truncation does not stick


def test_word_ids_follow_each_kinds_boundaries(trained: dict[str, Tokenizer]) -> None:
    text = "speak hear proceed"
    for kind, tok in trained.items():
        ids = tok.encode(text, add_special_tokens=True)
        words = tok.word_ids(ids)
        assert words[0] == -1 and words[-1] == -1  # specials belong to no word
        pieces: dict[int, str] = {}
        for token_id, word in zip(ids, words, strict=True):
            if word >= 0:
                pieces[word] = pieces.get(word, "") + tok.decode([token_id]).replace("##", "")
        names = [p.strip() for p in pieces.values() if p.strip()]
        assert names == ["speak", "hear", "proceed"], kind


def test_training_errors(tmp_path: Path) -> None:
    with pytest.raises(LMForgeError, match="too small for byte-level BPE"):
        Tokenizer.train(iter(TEXTS), kind="bpe", vocab_size=100, show_progress=False)
    with pytest.raises(LMForgeError, match="must be one of char, bpe, wordpiece"):
        Tokenizer.train(iter(TEXTS), kind="unigram", vocab_size=100, show_progress=False)  # type: ignore[arg-type]
    for kind in ("char", "bpe", "wordpiece"):
        with pytest.raises(LMForgeError, match="empty corpus"):
            Tokenizer.train(iter(["   ", "\n"]), kind=kind, vocab_size=300, show_progress=False)  # type: ignore[arg-type]
    with pytest.raises(LMForgeError, match="lowercase applies to wordpiece only"):
        Tokenizer.train(iter(TEXTS), kind="bpe", vocab_size=300, lowercase=True, show_progress=False)
    with pytest.raises(LMForgeError, match="file not found"):
        Tokenizer.train(tmp_path / "missing.txt", kind="char", vocab_size=100, show_progress=False)
    with pytest.raises(LMForgeError, match="not in the vocabulary"):
        Tokenizer(Backend(models.WordLevel({"a": 0}, unk_token="a")), {"pad": "[PAD]"})
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(LMForgeError, match="not a Hugging Face tokenizer.json"):
        Tokenizer.from_file(bad)


def test_train_from_jsonl_field_and_corpus(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps({"body": t}, ensure_ascii=False) for t in TEXTS) + "\n")
    tok = Tokenizer.train(path, kind="char", vocab_size=1000, field="body", show_progress=False)
    assert tok.decode(tok.encode(TEXTS[1])) == TEXTS[1]
    same = Tokenizer.train(Corpus.from_texts(TEXTS), kind="char", vocab_size=1000, show_progress=False)
    assert same.fingerprint == tok.fingerprint


def test_every_kind_trains_the_same_vocabulary_in_every_process() -> None:
    # Hugging Face's WordPiece trainer numbered its ## pieces in a hash map's order, new in every
    # process, and broke ties between merges by those numbers: this corpus (many equal counts)
    # gave a different vocabulary almost every run before train_backend pinned them.
    script = (
        "import hashlib, sys\n"
        "from lmforge.tokenizers import Tokenizer\n"
        "words = 'the a it was very and so then apple banana cat dog red blue'.split()\n"
        "texts = [' '.join(words)] * 10 + [' '.join(reversed(words))] * 10\n"
        "for kind, size in (('char', 40), ('bpe', 300), ('wordpiece', 60)):\n"
        "    tok = Tokenizer.train(iter(texts), kind=kind, vocab_size=size, show_progress=False)\n"
        "    print(kind, hashlib.sha256(tok.backend.to_str().encode()).hexdigest())\n"
    )
    runs = [
        subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
        for _ in range(3)
    ]
    assert len(runs[0].splitlines()) == 3
    assert runs[1] == runs[0] and runs[2] == runs[0]


@pytest.mark.parametrize("lowercase", [False, True])
def test_wordpiece_pins_exactly_the_characters_that_continue_a_word(lowercase: bool) -> None:
    backend, _ = new_backend("wordpiece", ["[UNK]"], 100, 2, lowercase, {"unk": "[UNK]"})
    texts = [*TEXTS, UNSEEN, "x\u00a0y a\u2003b e\u0301t z\u200bw tab\tthen ÉCOLE"]
    expected: set[str] = set()
    for text in texts:  # the words as the trainer cuts them, the slow way
        words = backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(text))
        expected.update("".join(word[1:] for word, _ in words))
    assert _continuing_characters(backend, Corpus.from_texts(texts), False) == expected
    assert {"p", "e", "a"} <= expected and not expected & {" ", ",", "好", "#"}
    assert ("\u0301" in expected) != lowercase  # uncased BERT strips accents


def test_pinned_pieces_stay_plain_vocabulary(trained: dict[str, Tokenizer]) -> None:
    tok = trained["wordpiece"]
    added = {token.content for token in tok.backend.get_added_tokens_decoder().values()}
    assert added == set(DEFAULT_SPECIAL_TOKENS.values())
    assert tok.backend.token_to_id("##p") is not None  # a piece, not a special token: in a text
    assert tok.backend.encode("##p", add_special_tokens=False).tokens == ["#", "#", "p"]  # not matched whole


# ---- the command ----------------------------------------------------------------------------------


def test_tokenizer_train_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from lmforge.cli import main

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("".join(TEXTS))
    (corpus / "b.jsonl").write_text("\n".join(json.dumps({"body": t}, ensure_ascii=False) for t in TEXTS))
    out = tmp_path / "tok"
    argv = ["tokenizer", "train", str(corpus), "--kind", "bpe", "--vocab_size", "300", "--out", str(out)]
    assert main([*argv, "--field", "body", "--progress", "false"]) == 0
    printed = capsys.readouterr().out
    tok = Tokenizer.from_file(out)
    assert (
        f"trained a bpe tokenizer: {tok.vocab_size:,} tokens (7 special) -> {out / 'tokenizer.json'}"
        in printed
    )
    size = 2 * len("".join(TEXTS).encode())
    assert f"input: {size:,} bytes in {1 + len(TEXTS)} document(s)" in printed
    tokens = len(tok.encode("".join(TEXTS))) + sum(len(tok.encode(t)) for t in TEXTS)
    assert f"-> {tokens:,} tokens: {tokens / size:.3f} tokens per byte" in printed


@pytest.mark.parametrize(
    ("name", "content", "extra", "message"),
    [
        (None, None, [], "missing required FILES"),
        ("missing.txt", None, [], "missing.txt: file not found"),
        ("empty.txt", b"", [], "empty.txt: file is empty"),
        ("blank.txt", b"  \n\n\t\n", [], "empty corpus: no text to train on"),
        (
            "latin1.txt",
            "caf\u00e9 ok".encode("latin-1"),
            [],
            "latin1.txt: not UTF-8 text: undecodable byte at byte offset 3",
        ),
        ("d.jsonl", b'{"text": "fine"}\n{oops}\n', [], "d.jsonl:2: not valid JSON"),
        (
            "d.jsonl",
            b'{"text": "fine"}\n',
            ["--field", "body"],
            "d.jsonl:1: line has no field 'body' (its keys: text)",
        ),
        (
            "ok.txt",
            b"some text",
            ["--kind", "bpe", "--vocab_size", "100"],
            "key 'vocab_size': vocab_size 100 is too small",
        ),
        ("ok.txt", b"some text", ["--kind", "sentencepiece"], "expected one of char, bpe, wordpiece"),
    ],
)
def test_tokenizer_train_bad_input(
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    name: str | None,
    content: bytes | None,
    extra: list[str],
    message: str,
) -> None:
    from lmforge.cli import main

    files = []
    if name is not None:
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
        files.append(str(path))
    argv = [
        "tokenizer",
        "train",
        *files,
        "--kind",
        "char",
        "--out",
        str(tmp_path / "t"),
        "--progress",
        "false",
    ]
    assert main([*argv, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmforge: error: ") and err.count("\n") == 1
    assert message in err
