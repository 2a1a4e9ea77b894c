"""Data: sources, streaming token shards, splits, batch sources and their resumable state."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer as Backend
from tokenizers import models, pre_tokenizers

from lmforge import LMForgeError
from lmforge.data import (
    Corpus,
    DocumentChunks,
    EvalWindows,
    MaskedLMCollator,
    RandomWindows,
    TokenShards,
    pretraining_batches,
    python_docs_corpus,
    write_shards,
)
from lmforge.tokenizers import Tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

DOCS = [
    "The quick brown fox jumps over the lazy dog.\nA second line, with punctuation!\n",
    "机器学习是人工智能的一个分支。你好，世界！\n换行之后 more text 😀👍🏽.",
    "Short one.",
    "   \n\t ",  # blank: filtered out
    "Numbers 3.14159 and code: def f(x):\n    return x ** 2  # comment\n\n\nend",
    "Emoji 😀 and accents: café naïve Straße — “quotes” … last document of the corpus.",
]
REAL = [d for d in DOCS if d.strip()]


@pytest.fixture(scope="module")
def tokenizers() -> dict[str, Tokenizer]:
    return {
        kind: Tokenizer.train(iter(DOCS * 3), kind=kind, vocab_size=320, show_progress=False)
        for kind in ("char", "bpe", "wordpiece")
    }


# ---- sources ------------------------------------------------------------------------------------


def test_text_file_document_modes(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("para one\nstill one\n\n  \npara two\n\n\n")
    assert list(Corpus.from_files(path)) == ["para one\nstill one\n\n  \npara two\n\n\n"]
    assert list(Corpus.from_files(path, documents="line")) == ["para one", "still one", "para two"]
    assert list(Corpus.from_files(path, documents="blank_line")) == ["para one\nstill one", "para two"]
    path.write_bytes("\ufeffwith a byte-order mark".encode())
    assert list(Corpus.from_files(path)) == ["with a byte-order mark"]


def test_directories_are_walked_recursively_in_sorted_order(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "2.txt").write_text("two")
    (tmp_path / "b" / "1.txt").write_text("one")
    (tmp_path / "a.txt").write_text("zero")
    (tmp_path / ".hidden").write_text("never")
    (tmp_path / "c.jsonl").write_text('{"text": "three"}\n\n{"text": "four"}\n')
    assert list(Corpus.from_files(tmp_path)) == ["zero", "one", "two", "three", "four"]


@pytest.mark.parametrize("chunk_chars", [1, 7, 50])
def test_pieces_rejoin_into_documents(tmp_path: Path, chunk_chars: int) -> None:
    path = tmp_path / "docs.txt"
    path.write_text("\n".join(d.replace("\n", " ") for d in REAL) + "\n")
    corpus = Corpus.from_files(path, documents="line")
    docs, parts = [], []
    for text, end in corpus.pieces(chunk_chars=chunk_chars):
        parts.append(text)
        if end:
            docs.append("".join(parts))
            parts = []
    assert docs == [d.replace("\n", " ") for d in REAL]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", r"a\.txt: file is empty"),
        (
            b"fine text \xe4\xb8\xad then \xff bad",
            r"a\.txt: not UTF-8 text: undecodable byte at byte offset 19",
        ),
    ],
)
def test_bad_text_files(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "a.txt"
    path.write_bytes(content)
    with pytest.raises(LMForgeError, match=message):
        list(Corpus.from_files(path))


def test_undecodable_byte_offset_across_blocks(tmp_path: Path) -> None:
    path = tmp_path / "big.txt"
    prefix = "é" * 40_000  # 80,000 bytes: the bad byte sits in the second 64 KiB block
    path.write_bytes(prefix.encode() + b"\xc3(")
    with pytest.raises(LMForgeError, match="byte offset 80000"):
        list(Corpus.from_files(path))


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ('{"text": "ok"}\n{"text": broken}\n', r"d\.jsonl:2: not valid JSON"),
        (
            '{"text": "ok"}\n\n{"body": "x"}\n',
            r"d\.jsonl:3: line has no field 'text' \(its keys: body\)",
        ),
        ('{"text": 3}\n', r"d\.jsonl:1: field 'text' must be a string"),
        ('["text"]\n', r"d\.jsonl:1: expected a JSON object"),
    ],
)
def test_bad_jsonl_lines(tmp_path: Path, lines: str, message: str) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(lines)
    with pytest.raises(LMForgeError, match=message):
        list(Corpus.from_files(path))


def test_missing_inputs(tmp_path: Path) -> None:
    with pytest.raises(LMForgeError, match="missing.txt: file not found"):
        Corpus.from_files(tmp_path / "missing.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LMForgeError, match="directory has no files"):
        Corpus.from_files(tmp_path / "empty")


# ---- shards -------------------------------------------------------------------------------------


def expected_stream(tokenizer: Tokenizer, docs: list[str]) -> list[int]:
    """Documents encoded whole, joined by eos: what the shards must hold."""
    stream: list[int] = []
    for i, doc in enumerate(docs):
        if i:
            stream.append(tokenizer.eos_id)
        stream.extend(tokenizer.encode(doc))
    return stream


@pytest.mark.parametrize("kind", ["char", "bpe", "wordpiece"])
def test_shards_equal_direct_encoding_and_streaming_is_exact(
    tokenizers: dict[str, Tokenizer], kind: str, tmp_path: Path
) -> None:
    tok = tokenizers[kind]
    whole = write_shards(iter(DOCS), tok, tmp_path / "whole", validation=0.0, show_progress=False)
    train = whole["train"]
    assert train.tokens.dtype == np.uint16 and isinstance(train.tokens, np.memmap)
    assert np.asarray(train.tokens).tolist() == expected_stream(tok, REAL)
    assert train.num_documents == len(REAL)
    for i, doc in enumerate(REAL):
        assert train.document(i).tolist() == tok.encode(doc)
        assert train.documents[i, 2] == len(doc.encode("utf-8"))
    assert train.num_bytes == sum(len(d.encode()) for d in REAL)
    tiny = write_shards(
        iter(DOCS), tok, tmp_path / "tiny", validation=0.0, chunk_chars=3, show_progress=False
    )
    assert np.array_equal(np.asarray(tiny["train"].tokens), np.asarray(train.tokens))
    assert np.array_equal(tiny["train"].documents, train.documents)


def test_large_vocabularies_use_uint32(tmp_path: Path) -> None:
    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, **{f"w{i}": i + 3 for i in range(70_000)}}
    backend = Backend(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = Tokenizer(backend)
    shards = write_shards(iter(["w5 w69999 w1", "w7"]), tok, tmp_path, validation=0.0, show_progress=False)
    assert shards["train"].tokens.dtype == np.uint32
    assert np.asarray(shards["train"].tokens).tolist() == [8, 70002, 4, 2, 10]
    assert TokenShards(tmp_path).index["dtype"] == "uint32"


def test_tail_split_cuts_at_the_character(tokenizers: dict[str, Tokenizer], tmp_path: Path) -> None:
    tok = tokenizers["char"]
    text = "".join(REAL)
    shards = write_shards(Corpus.from_texts([text]), tok, tmp_path, validation=0.1, show_progress=False)
    cut = int(len(text) * 0.9)
    assert np.asarray(shards["train"].tokens).tolist() == tok.encode(text[:cut])
    assert np.asarray(shards["validation"].tokens).tolist() == tok.encode(text[cut:])
    # across documents: the document holding the cut is split, later ones go to validation
    write_shards(Corpus.from_texts(REAL), tok, tmp_path, validation=0.5, show_progress=False)
    half = int(sum(map(len, REAL)) * 0.5)
    info = TokenShards(tmp_path).index["splits"]
    assert info["train"]["num_chars"] == half
    assert info["validation"]["num_chars"] == sum(map(len, REAL)) - half


@pytest.mark.skipif(
    not (SHARED / "tinyshakespeare").is_dir(), reason="../shared/data/tinyshakespeare is absent"
)
def test_tinyshakespeare_split_matches_nanogpt(tmp_path: Path) -> None:
    path = SHARED / "tinyshakespeare" / "input.txt"
    tok = Tokenizer.train(path, kind="char", vocab_size=1000, show_progress=False)
    shards = write_shards(path, tok, tmp_path, show_progress=False)
    text = path.read_text()
    n = len(text)
    assert shards["train"].num_tokens == int(n * 0.9) == 1_003_854
    assert shards["validation"].num_tokens == n - int(n * 0.9) == 111_540
    assert np.array_equal(np.asarray(shards["validation"].tokens), np.array(tok.encode(text[int(n * 0.9) :])))


def test_document_split_is_seeded(tokenizers: dict[str, Tokenizer], tmp_path: Path) -> None:
    docs = [f"document number {i} says hello." for i in range(40)]
    tok = tokenizers["bpe"]

    def held_out(seed: int) -> list[str]:
        shards = write_shards(
            Corpus.from_texts(docs),
            tok,
            tmp_path / str(seed),
            split="documents",
            seed=seed,
            show_progress=False,
        )
        val = shards["validation"]
        assert shards["train"].num_documents + val.num_documents == 40
        return [tok.decode(val.document(i)) for i in range(val.num_documents)]

    first = held_out(0)
    assert len(first) == 4 and set(first) <= set(docs)
    assert held_out(0) == first and held_out(1) != first


def test_shard_errors(tokenizers: dict[str, Tokenizer], tmp_path: Path) -> None:
    with pytest.raises(LMForgeError, match="empty corpus"):
        write_shards(iter(["  ", "\n"]), tokenizers["char"], tmp_path / "e", show_progress=False)
    with pytest.raises(LMForgeError, match="empty corpus after filtering"):
        write_shards(
            iter(["  ", "\n"]), tokenizers["char"], tmp_path / "e", validation=0.0, show_progress=False
        )
    with pytest.raises(LMForgeError, match="needs at least 2 documents"):
        write_shards(
            iter(["one"]), tokenizers["char"], tmp_path / "e", split="documents", show_progress=False
        )
    write_shards(iter(REAL), tokenizers["char"], tmp_path / "ok", show_progress=False)
    with pytest.raises(LMForgeError, match=r"index.json: key 'tokenizer_fingerprint': tokenizer mismatch"):
        TokenShards(tmp_path / "ok", tokenizer=tokenizers["bpe"])
    TokenShards(tmp_path / "ok", tokenizer=tokenizers["char"])  # the right one opens
    with pytest.raises(LMForgeError, match="index.json is missing"):
        TokenShards(tmp_path / "e")
    with pytest.raises(LMForgeError, match="no split 'test'"):
        TokenShards(tmp_path / "ok")["test"]
    tokens = tmp_path / "ok" / "validation.bin"
    tokens.write_bytes(tokens.read_bytes()[:-2])  # one token short
    with pytest.raises(LMForgeError, match="split 'validation' is truncated"):
        TokenShards(tmp_path / "ok")


# ---- batch sources ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bpe_shards(tokenizers: dict[str, Tokenizer], tmp_path_factory: pytest.TempPathFactory) -> TokenShards:
    docs = [f"{d} Copy {i}." for i in range(30) for d in REAL]
    path = tmp_path_factory.mktemp("shards")
    return write_shards(Corpus.from_texts(docs), tokenizers["bpe"], path, validation=0.1, show_progress=False)


def draw(source: object, n: int) -> list[dict[str, torch.Tensor]]:
    iterator = iter(source)  # type: ignore[call-overload]
    return [next(iterator) for _ in range(n)]


def same(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> bool:
    return all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b, strict=True)
    )


def test_random_windows_are_shifted_seeded_and_resumable(bpe_shards: TokenShards) -> None:
    split = bpe_shards["train"]
    source = RandomWindows(split, seq_len=16, batch_size=4, seed=3)
    batch = draw(source, 1)[0]
    assert batch["input_ids"].shape == (4, 16) and batch["attention_mask"].all()
    assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])  # labels are the next tokens
    assert same(draw(RandomWindows(split, seq_len=16, batch_size=4, seed=3), 1), [batch])
    assert not same(draw(RandomWindows(split, seq_len=16, batch_size=4, seed=4), 1), [batch])

    uninterrupted = draw(RandomWindows(split, seq_len=16, batch_size=4, seed=3), 6)
    first = RandomWindows(split, seq_len=16, batch_size=4, seed=3)
    assert same(draw(first, 3), uninterrupted[:3])
    state = json.loads(json.dumps(first.state_dict()))  # it goes into trainer_state.json
    resumed = RandomWindows(split, seq_len=16, batch_size=4, seed=3)
    resumed.load_state_dict(state)
    assert same(draw(resumed, 3), uninterrupted[3:])
    with pytest.raises(LMForgeError, match="fewer than seq_len"):
        RandomWindows(split, seq_len=split.num_tokens, batch_size=1)


def test_document_chunks_never_span_documents_and_resume(
    bpe_shards: TokenShards, tokenizers: dict[str, Tokenizer]
) -> None:
    split = bpe_shards["train"]
    tok = tokenizers["bpe"]

    class Rows:  # a collator that returns the raw rows, to inspect them
        def chunk_length(self, seq_len: int) -> int:
            return seq_len

        def __call__(self, rows: list[np.ndarray], rng: np.random.Generator) -> dict[str, torch.Tensor]:
            return {
                "input_ids": torch.from_numpy(np.concatenate(rows)),
                "sizes": torch.tensor([len(r) for r in rows]),
            }

    source = DocumentChunks(split, seq_len=8, batch_size=5, collator=Rows(), seed=1, epochs=1)
    docs = {tuple(split.document(i).tolist()) for i in range(split.num_documents)}
    seen = 0
    for batch in source:
        for row in torch.split(batch["input_ids"], batch["sizes"].tolist()):
            row = tuple(row.tolist())
            assert tok.eos_id not in row  # separators are outside documents
            assert any(_contains(doc, row) for doc in docs)
            seen += len(row)
    lengths = split.documents[:, 1] - split.documents[:, 0]
    assert seen == int(lengths.sum() - (lengths % 8 == 1).sum())  # all but 1-token tails

    masked = DocumentChunks(split, seq_len=12, batch_size=3, collator=MaskedLMCollator(tok), seed=7)
    per_epoch = len(masked)
    uninterrupted = draw(
        DocumentChunks(split, seq_len=12, batch_size=3, collator=MaskedLMCollator(tok), seed=7), per_epoch + 4
    )
    part = draw(masked, per_epoch - 2)
    assert same(part, uninterrupted[: per_epoch - 2])
    state = json.loads(json.dumps(masked.state_dict()))
    resumed = DocumentChunks(split, seq_len=12, batch_size=3, collator=MaskedLMCollator(tok), seed=7)
    resumed.load_state_dict(state)
    assert same(draw(resumed, 6), uninterrupted[per_epoch - 2 :])  # across the epoch boundary
    assert resumed.epoch == 1


def _contains(doc: tuple[int, ...], row: tuple[int, ...]) -> bool:
    return any(doc[i : i + len(row)] == row for i in range(len(doc) - len(row) + 1))


def test_eval_windows_predict_every_token_once(bpe_shards: TokenShards) -> None:
    split = bpe_shards["validation"]
    source = EvalWindows(split, seq_len=16, batch_size=3, pad_id=0)
    targets = []
    for batch in source:
        assert torch.equal(batch["attention_mask"], batch["labels"] != -100)
        targets.extend(batch["labels"][batch["labels"] != -100].tolist())
    assert targets == np.asarray(split.tokens[1:]).tolist()
    assert source.num_targets == split.num_tokens - 1
    assert same(draw(source, 2), draw(source, 2))  # each pass starts over
    few = EvalWindows(split, seq_len=16, batch_size=3, max_batches=2)
    assert len(few) == 2 and len(list(few)) == 2


def test_pretraining_batches_for_each_objective(
    bpe_shards: TokenShards, tokenizers: dict[str, Tokenizer]
) -> None:
    tok = Tokenizer(Backend.from_str(tokenizers["bpe"].backend.to_str())).add_sentinels(20)
    split = bpe_shards["train"]
    assert isinstance(
        pretraining_batches(split, tok, objective="causal_lm", seq_len=8, batch_size=2), RandomWindows
    )
    evaluation = pretraining_batches(
        split, tok, objective="masked_lm", seq_len=16, batch_size=4, evaluation=True
    )
    assert same(list(evaluation), list(evaluation))  # the same masks at every evaluation
    span = pretraining_batches(split, tok, objective="span_corruption", seq_len=16, batch_size=4)
    batch = draw(span, 1)[0]
    assert (
        batch["input_ids"].shape[1] <= 16 and {"decoder_input_ids", "decoder_attention_mask"} <= batch.keys()
    )
    with pytest.raises(LMForgeError, match="unknown objective"):
        pretraining_batches(split, tok, objective="mlm", seq_len=8, batch_size=2)


# ---- the embedded corpus ------------------------------------------------------------------------


def test_python_docs_corpus_is_real_english_of_the_right_size() -> None:
    corpus = python_docs_corpus()
    docs = list(corpus)
    size = sum(len(d.encode("utf-8")) for d in docs)
    assert 500_000 <= size <= 3_000_000
    assert docs == list(python_docs_corpus())  # deterministic
    joined = "\n".join(docs)
    assert "statement" in joined and "Return" in joined
    assert sum(joined.count(w) for w in (" the ", " of ", " and ")) > size / 200  # English prose
    small = list(python_docs_corpus(max_bytes=10_000))
    assert small == docs[: len(small)] and sum(len(d.encode()) for d in small[:-1]) < 10_000


@pytest.mark.parametrize("documents", ["file", "blank_line"])
def test_streaming_a_file_with_tiny_chunks_gives_identical_shards(
    tokenizers: dict[str, Tokenizer], tmp_path: Path, documents: str
) -> None:
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(REAL) + "\n")
    for kind in ("char", "bpe", "wordpiece"):
        tok = tokenizers[kind]
        corpus = Corpus.from_files(path, documents=documents)  # type: ignore[arg-type]
        whole = write_shards(corpus, tok, tmp_path / f"{kind}-whole", validation=0.2, show_progress=False)
        tiny = write_shards(
            corpus, tok, tmp_path / f"{kind}-tiny", validation=0.2, chunk_chars=2, show_progress=False
        )
        for split in ("train", "validation"):
            assert np.array_equal(np.asarray(whole[split].tokens), np.asarray(tiny[split].tokens)), (
                kind,
                split,
            )
            assert np.array_equal(whole[split].documents, tiny[split].documents)
        docs = list(corpus)
        assert len(docs) == (1 if documents == "file" else 6)  # REAL[3] holds a blank line too
        text = "".join(docs)
        cut = int(len(text) * 0.8) if documents == "file" else None
        if cut is not None:  # one document: the split is the character cut, encoded in two parts
            assert np.asarray(whole["train"].tokens).tolist() == tok.encode(text[:cut])


@pytest.mark.parametrize("documents", ["file", "line", "blank_line"])
def test_tiny_read_blocks_give_the_same_documents(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, documents: str
) -> None:
    import lmforge.corpus as sources

    path = tmp_path / "c.txt"
    path.write_text("\n\n".join(REAL) + "\r\nlast line \n\n \n  tail 你好\n")
    expected = list(Corpus.from_files(path, documents=documents))  # type: ignore[arg-type]
    monkeypatch.setattr(sources, "_BLOCK_BYTES", 3)  # characters and separators split across blocks
    assert list(Corpus.from_files(path, documents=documents)) == expected  # type: ignore[arg-type]
    assert len(expected) == {"file": 1, "line": 11, "blank_line": 7}[documents]


# ---- several processes: each rank its own share -------------------------------------------------


def test_ranks_draw_slices_of_one_global_batch_and_resume_only_in_a_job_of_the_same_size(
    bpe_shards: TokenShards,
) -> None:
    split = bpe_shards["train"]
    alone = draw(RandomWindows(split, seq_len=16, batch_size=8, seed=3), 3)  # one process, batch 8
    first, second = (
        draw(RandomWindows(split, seq_len=16, batch_size=4, seed=3, rank=r, world_size=2), 3) for r in (0, 1)
    )
    assert not same(first, second)  # two ranks never train on the same windows
    for whole, a, b in zip(alone, first, second, strict=True):  # 2 ranks × 4 = the batch of 8
        assert torch.equal(torch.cat([a["input_ids"], b["input_ids"]]), whole["input_ids"])
    source = RandomWindows(split, seq_len=16, batch_size=4, seed=3, rank=1, world_size=2)
    draw(source, 1)
    state = json.loads(json.dumps(source.state_dict()))
    with pytest.raises(LMForgeError, match="saved by 2 process.*this job has 1"):
        RandomWindows(split, seq_len=16, batch_size=4, seed=3).load_state_dict(state)

    class Rows:
        def chunk_length(self, seq_len: int) -> int:
            return seq_len

        def __call__(self, rows: list[np.ndarray], rng: np.random.Generator) -> dict[str, torch.Tensor]:
            return {"starts": torch.tensor([hash(r.tobytes()) for r in rows])}

    def chunks(rank: int, world: int, size: int) -> list[list[int]]:
        source = DocumentChunks(
            split, seq_len=8, batch_size=size, collator=Rows(), seed=1, epochs=1, rank=rank, world_size=world
        )
        return [[int(v) for v in batch["starts"]] for batch in source]

    everything = chunks(0, 1, 9)
    shares = [chunks(r, 3, 3) for r in range(3)]
    assert len(shares[0]) == len(shares[1]) == len(shares[2]) >= len(everything) - 1
    for step in range(len(shares[0])):  # three ranks × 3 = the batch of 9, step by step
        assert shares[0][step] + shares[1][step] + shares[2][step] == everything[step]
    served = sum(len(b) for share in shares for b in share)
    assert 0 <= sum(map(len, everything)) - served < 3  # at most a tail shorter than the ranks
