"""Token shards: a corpus tokenized once into flat memory-mapped arrays, with a JSON index.

The layout follows nanoGPT's ``train.bin``/``val.bin`` (flat ``uint16`` token arrays read with
``np.memmap``), plus what the objectives need: document boundaries and the UTF-8 bytes each
document covers (for bits per byte), and the tokenizer's fingerprint (so ids are never read with
another tokenizer)::

    out_dir/
      index.json                 format, dtype, vocab size, tokenizer fingerprint, split, counts
      train.bin  validation.bin  token ids, uint16 when the vocabulary fits, else uint32
      train.docs.bin ...         int64 (D, 3): first token, end token (exclusive), UTF-8 bytes

Documents of one split are packed back to back with the tokenizer's eos token between them (the
separator belongs to no document). Tokenization streams: a corpus is read in bounded pieces
(:mod:`lmforge.corpus`) and written as it goes, so it never has to fit in memory; a tiny
chunk size gives the same shards (tested).

Validation split: ``"tail"`` keeps the last ``validation`` fraction of the *characters* (the
usual tinyshakespeare split: first 90% / last 10%; the document holding the cut is cut in two),
``"documents"`` sends a seeded random ``validation`` fraction of whole documents.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ..corpus import DEFAULT_CHUNK_CHARS, Corpus, as_corpus
from ..errors import LMForgeError

if TYPE_CHECKING:
    from ..tokenizers import Tokenizer

FORMAT = "lmforge-token-shards"
VERSION = 1
SplitMethod = Literal["tail", "documents"]


@dataclass
class ShardSplit:
    """One split of a shard folder.

    tokens: (N,) memory-mapped token ids.
    documents: (D, 3) int64: first token, end token (exclusive), UTF-8 bytes of the document.
    """

    name: str
    tokens: np.ndarray
    documents: np.ndarray

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_documents(self) -> int:
        return int(self.documents.shape[0])

    @property
    def num_bytes(self) -> int:
        """UTF-8 bytes of the text behind the tokens."""
        return int(self.documents[:, 2].sum())

    @property
    def bytes_per_token(self) -> float:
        """Average UTF-8 bytes per token (separators included): turns a loss into bits per byte."""
        return self.num_bytes / max(self.num_tokens, 1)

    def document(self, index: int) -> np.ndarray:
        """The token ids of document ``index``."""
        start, end, _ = self.documents[index]
        return np.asarray(self.tokens[start:end])

    def __repr__(self) -> str:
        return (
            f"ShardSplit({self.name!r}, {self.num_tokens:,} tokens, {self.num_documents:,} documents, "
            f"{self.num_bytes:,} bytes)"
        )


class TokenShards:
    """A shard folder written by :func:`write_shards`, opened read-only (memory-mapped).

    Args:
        path: the folder holding ``index.json``.
        tokenizer: when given, its fingerprint must match the one the shards were written with.

    Raises:
        LMForgeError: no index, an index of another format, or a tokenizer mismatch.
    """

    def __init__(self, path: str | Path, *, tokenizer: Tokenizer | None = None) -> None:
        self.path = Path(path)
        index_path = self.path / "index.json"
        if not index_path.is_file():
            raise LMForgeError("no token shards here (index.json is missing)", file=self.path)
        try:
            self.index: dict[str, Any] = json.loads(index_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise LMForgeError(f"not valid JSON: {err}", file=index_path) from None
        if self.index.get("format") != FORMAT:
            raise LMForgeError(
                f"not an lmforge shard index (format {self.index.get('format')!r})", file=index_path
            )
        if tokenizer is not None:
            self.check_tokenizer(tokenizer)
        self.dtype = np.dtype(self.index["dtype"])
        self.splits: dict[str, ShardSplit] = {}
        for name, info in self.index["splits"].items():
            tokens = np.memmap(self.path / info["tokens"], dtype=self.dtype, mode="r")
            docs_path = self.path / info["documents"]
            docs = (
                np.memmap(docs_path, dtype=np.int64, mode="r").reshape(-1, 3)
                if docs_path.stat().st_size
                else np.zeros((0, 3), dtype=np.int64)
            )
            if tokens.shape[0] != info["num_tokens"] or docs.shape[0] != info["num_documents"]:
                raise LMForgeError(
                    f"split '{name}' is truncated: its files disagree with the index", file=index_path
                )
            self.splits[name] = ShardSplit(name, tokens, docs)

    def check_tokenizer(self, tokenizer: Tokenizer) -> None:
        """Raise LMForgeError unless ``tokenizer`` is the one these shards were written with."""
        expected = self.index.get("tokenizer_fingerprint")
        if expected != tokenizer.fingerprint:
            raise LMForgeError(
                f"tokenizer mismatch: the shards were written with tokenizer {expected}, "
                f"this tokenizer is {tokenizer.fingerprint} (re-tokenize the corpus with it)",
                file=self.path / "index.json",
                key="tokenizer_fingerprint",
            )

    @property
    def vocab_size(self) -> int:
        return int(self.index["vocab_size"])

    def __getitem__(self, name: str) -> ShardSplit:
        if name not in self.splits:
            raise LMForgeError(
                f"no split '{name}' in these shards (splits: {', '.join(self.splits)})",
                file=self.path,
                key=name,
            )
        return self.splits[name]

    def __contains__(self, name: str) -> bool:
        return name in self.splits

    def __repr__(self) -> str:
        return f"TokenShards({str(self.path)!r}, {', '.join(map(repr, self.splits.values()))})"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocabularies up to 65,536), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


# ---- writing ------------------------------------------------------------------------------------


class _SplitWriter:
    """Appends documents of one split to its token and document files."""

    def __init__(self, directory: Path, name: str, dtype: np.dtype, separator_id: int | None) -> None:
        self.name = name
        self.dtype = dtype
        self.separator_id = separator_id
        self.token_path = directory / f"{name}.bin"
        self.doc_path = directory / f"{name}.docs.bin"
        self.tokens = open(self.token_path.with_suffix(".bin.tmp"), "wb")  # noqa: SIM115 closed in close()
        self.docs = open(self.doc_path.with_suffix(".bin.tmp"), "wb")  # noqa: SIM115
        self.num_tokens = 0
        self.num_documents = 0
        self.num_chars = 0
        self.doc_start: int | None = None  # first token of the open document (None: none open)
        self.doc_bytes = 0

    def add(self, ids: list[int], *, end: bool, num_bytes: int, num_chars: int) -> None:
        if ids:
            if self.doc_start is None:  # the document's first tokens: separate it from the last
                if self.num_documents and self.separator_id is not None:
                    self._write([self.separator_id])
                self.doc_start = self.num_tokens
            self._write(ids)
        self.doc_bytes += num_bytes
        self.num_chars += num_chars
        if end:
            if self.doc_start is not None:
                row = np.array([self.doc_start, self.num_tokens, self.doc_bytes], dtype=np.int64)
                self.docs.write(row.tobytes())
                self.num_documents += 1
            self.doc_start, self.doc_bytes = None, 0

    def _write(self, ids: list[int]) -> None:
        self.tokens.write(np.asarray(ids, dtype=self.dtype).tobytes())
        self.num_tokens += len(ids)

    def close(self, *, keep: bool) -> dict[str, Any]:
        self.tokens.close()
        self.docs.close()
        if not keep:
            for path in (self.token_path, self.doc_path):
                path.with_suffix(".bin.tmp").unlink(missing_ok=True)
            return {}
        os.replace(self.token_path.with_suffix(".bin.tmp"), self.token_path)
        os.replace(self.doc_path.with_suffix(".bin.tmp"), self.doc_path)
        return {
            "tokens": self.token_path.name,
            "documents": self.doc_path.name,
            "num_tokens": self.num_tokens,
            "num_documents": self.num_documents,
            "num_chars": self.num_chars,
        }


def write_shards(
    sources: Corpus | str | Path | Sequence[str | Path] | Iterable[str],
    tokenizer: Tokenizer,
    out_dir: str | Path,
    *,
    validation: float = 0.1,
    split: SplitMethod = "tail",
    seed: int = 0,
    separator: bool = True,
    field: str = "text",
    chunk_chars: int = DEFAULT_CHUNK_CHARS,
    show_progress: bool = True,
) -> TokenShards:
    """Tokenize a corpus into token shards with a train/validation split.

    Args:
        sources: paths, a :class:`~lmforge.data.Corpus` or an iterator of texts (see
            :func:`~lmforge.data.as_corpus`).
        tokenizer: the tokenizer; its fingerprint is recorded.
        out_dir: the folder to write (created; previous shards there are replaced).
        validation: the share held out for validation (0: train only).
        split: ``"tail"`` (the last characters) or ``"documents"`` (random whole documents).
        seed: seeds the ``"documents"`` split.
        separator: put the tokenizer's eos token between packed documents.
        field: the JSON field of JSONL files.
        chunk_chars: the streaming piece size, in characters.
        show_progress: a progress bar.

    Returns:
        The written shards, opened.

    Raises:
        LMForgeError: bad input files, an empty corpus, or a split too small to hold any text.
    """
    from tqdm.auto import tqdm

    if not 0.0 <= validation < 1.0:
        raise LMForgeError(f"validation = {validation}: must be in [0, 1)", key="validation")
    if split not in ("tail", "documents"):
        raise LMForgeError(f"split = {split!r}: must be 'tail' or 'documents'", key="split")
    corpus = as_corpus(sources, field=field)
    if not corpus.reiterable:  # counting needs a first pass: keep one-shot texts in memory
        corpus = Corpus.from_texts(list(corpus.texts or []), name=corpus.name)

    num_docs, num_chars = _count(corpus, chunk_chars, show_progress) if validation > 0 else (0, 0)
    if validation > 0 and num_chars == 0:
        raise LMForgeError(f"empty corpus: no non-blank text in {corpus.name}")
    held_out: np.ndarray | None = None
    cut_char = num_chars
    if validation > 0 and split == "documents":
        if num_docs < 2:
            raise LMForgeError(
                f"a 'documents' split needs at least 2 documents, {corpus.name} has {num_docs}", key="split"
            )
        count = min(max(round(num_docs * validation), 1), num_docs - 1)
        held_out = np.zeros(num_docs, dtype=bool)
        held_out[np.random.default_rng(seed).permutation(num_docs)[:count]] = True
    elif validation > 0:
        cut_char = int(num_chars * (1.0 - validation))

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "index.json").unlink(missing_ok=True)  # no index = no (complete) shards
    dtype = token_dtype(tokenizer.vocab_size)
    separator_id = tokenizer.eos_id if separator else None
    writers = {"train": _SplitWriter(out, "train", dtype, separator_id)}
    if validation > 0:
        writers["validation"] = _SplitWriter(out, "validation", dtype, separator_id)

    ok = False
    try:
        routed = _route(
            corpus.pieces(chunk_chars=chunk_chars),
            held_out,
            cut_char if split == "tail" and validation > 0 else None,
        )
        with tqdm(
            total=num_chars or None,
            unit="char",
            unit_scale=True,
            desc="tokenizing",
            disable=not show_progress,
        ) as bar:
            for group in _groups(routed, max_items=1024, max_chars=chunk_chars):
                ids = tokenizer.encode_many([text for _, text, _ in group])
                for (name, text, end), piece_ids in zip(group, ids, strict=True):
                    writers[name].add(
                        piece_ids, end=end, num_bytes=len(text.encode("utf-8")), num_chars=len(text)
                    )
                    bar.update(len(text))
        for name, writer in writers.items():
            if writer.num_tokens == 0:
                what = "empty corpus after filtering" if name == "train" else f"the {name} split is empty"
                raise LMForgeError(
                    f"{what}: no tokens from {corpus.name}", key=None if name == "train" else "validation"
                )
        ok = True
    finally:
        infos = {name: writer.close(keep=ok) for name, writer in writers.items()}

    index = {
        "format": FORMAT,
        "version": VERSION,
        "dtype": dtype.name,
        "vocab_size": tokenizer.vocab_size,
        "tokenizer_fingerprint": tokenizer.fingerprint,
        "tokenizer_kind": tokenizer.kind,
        "separator_id": separator_id,
        "source": corpus.name,
        "split": {"method": split, "validation": validation, "seed": seed},
        "splits": infos,
    }
    temporary = out / "index.json.tmp"
    temporary.write_text(json.dumps(index, indent=2, ensure_ascii=False) + "\n")
    os.replace(temporary, out / "index.json")
    return TokenShards(out)


def _count(corpus: Corpus, chunk_chars: int, show_progress: bool) -> tuple[int, int]:
    """Documents and characters of a corpus (a first, cheap pass without tokenizing)."""
    from tqdm.auto import tqdm

    docs = chars = 0
    with tqdm(
        total=corpus.num_bytes, unit="B", unit_scale=True, desc="counting", disable=not show_progress
    ) as bar:
        for text, end in corpus.pieces(chunk_chars=chunk_chars):
            chars += len(text)
            docs += end
            bar.update(len(text.encode("utf-8")))
    return docs, chars


def _route(
    pieces: Iterable[tuple[str, bool]], held_out: np.ndarray | None, cut_char: int | None
) -> Iterator[tuple[str, str, bool]]:
    """``(split, text, end_of_document)``: each piece sent to its split; with a character cut,
    the piece holding it is cut in two and ends the last training document there."""
    doc = 0
    seen = 0
    for text, end in pieces:
        if held_out is not None:
            yield ("validation" if held_out[doc] else "train"), text, end
        elif cut_char is None:
            yield "train", text, end
        elif seen + len(text) <= cut_char:
            yield "train", text, end or seen + len(text) == cut_char
        elif seen >= cut_char:
            yield "validation", text, end
        else:
            cut = cut_char - seen
            yield "train", text[:cut], True
            yield "validation", text[cut:], end
        seen += len(text)
        doc += end


def _groups(items: Iterable[tuple[str, str, bool]], *, max_items: int, max_chars: int) -> Iterator[list[Any]]:
    """Pieces in groups of at most ``max_items`` and about ``max_chars`` characters: one call of
    the (parallel) Rust encoder per group."""
    group: list[Any] = []
    chars = 0
    for item in items:
        group.append(item)
        chars += len(item[1])
        if len(group) == max_items or chars >= max_chars:
            yield group
            group, chars = [], 0
    if group:
        yield group
