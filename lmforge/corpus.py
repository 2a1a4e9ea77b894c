"""Text sources: files, JSONL fields, directories and in-memory texts, read as a stream of documents.

A :class:`Corpus` yields *pieces* ``(text, end_of_document)``: a document arrives as one or more
consecutive pieces, so a corpus larger than memory never has to be held at once. Long documents
are cut only at *safe points* — a single whitespace character between two non-space characters —
where the character, byte-level BPE (GPT-2 pre-tokenizer regex) and WordPiece (BERT pre-tokenizer)
tokenizers of :mod:`lmforge.tokenizers` split anyway, so tokenizing piece by piece gives exactly
the tokens of the whole document (a test holds this for tiny chunk sizes). Text with no safe point
for 16 chunks and at least 4 Mi characters (e.g. megabytes of unspaced CJK text) is cut hard, and
that exactness is lost there.

Mistakes are reported as :class:`~lmforge.errors.LMForgeError` naming the file and where in it: a
missing or empty file, undecodable bytes (byte offset), a JSONL line that is not JSON or lacks the
field (file:line).
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Literal

from .errors import LMForgeError

DocumentMode = Literal["file", "line", "blank_line"]
Piece = tuple[str, bool]  # (text, True when this piece ends its document)

JSONL_SUFFIXES = (".jsonl", ".ndjson")
DEFAULT_CHUNK_CHARS = 1 << 20  # about 1 MiB of text per piece
_BLOCK_BYTES = 1 << 16
_HARD_CUT_CHARS = 1 << 22  # text with no safe point for this long is cut anyway
_SAFE_CUT = re.compile(r"(?<=\S)\s(?=\S)")  # one whitespace character between two non-space ones
_ONLY_SPACE_LEFT = re.compile(r"\s*\Z")
_SEPARATORS = {"line": re.compile(r"\r?\n"), "blank_line": re.compile(r"\n\s*\n")}


class Corpus:
    """Documents from files (text, JSONL, directories) or from texts in memory.

    Use :meth:`from_files` or :meth:`from_texts`. Iterating a corpus yields whole documents (each
    held in memory); :meth:`pieces` streams them in bounded pieces.

    Args:
        paths: files and directories (directories are walked recursively, in sorted order).
        texts: documents as strings (any iterable; a one-shot iterator can be read only once).
        field: the JSON field holding the text in ``.jsonl``/``.ndjson`` files.
        documents: how a plain text file splits into documents: ``"file"`` (the whole file),
            ``"line"`` (each line) or ``"blank_line"`` (paragraphs separated by blank lines).
        name: a label for messages and progress bars.
    """

    def __init__(
        self,
        *,
        paths: Sequence[str | Path] = (),
        texts: Iterable[str] | None = None,
        field: str = "text",
        documents: DocumentMode = "file",
        name: str | None = None,
    ) -> None:
        if documents not in ("file", "line", "blank_line"):
            raise LMForgeError(
                f"documents = {documents!r}: must be one of file, line, blank_line", key="documents"
            )
        if (texts is None) == (not paths):
            raise ValueError("give either paths or texts")
        self.field = field
        self.document_mode: DocumentMode = documents
        self.texts = texts
        self.files = _expand_paths(paths) if paths else []
        self.name = name or (", ".join(str(p) for p in paths) if paths else "texts")

    @classmethod
    def from_files(
        cls,
        paths: str | Path | Sequence[str | Path],
        *,
        field: str = "text",
        documents: DocumentMode = "file",
    ) -> Corpus:
        """A corpus read from files and directories; checks that each exists and is not empty."""
        if isinstance(paths, str | Path):
            paths = [paths]
        if not paths:
            raise LMForgeError("no input files given")
        return cls(paths=list(paths), field=field, documents=documents)

    @classmethod
    def from_texts(cls, texts: Iterable[str], *, name: str = "texts") -> Corpus:
        """A corpus of in-memory documents, one per string."""
        return cls(texts=texts, name=name)

    @property
    def reiterable(self) -> bool:
        """False for a one-shot iterator of texts (it can be read only once)."""
        return self.texts is None or iter(self.texts) is not self.texts

    @property
    def num_bytes(self) -> int | None:
        """Size of the input in bytes when cheap to know (files, or a list of texts), else None."""
        if self.texts is None:
            return sum(f.stat().st_size for f in self.files)
        if isinstance(self.texts, list | tuple):
            return sum(len(t.encode("utf-8")) for t in self.texts)
        return None

    def __iter__(self) -> Iterator[str]:
        """Whole documents (non-empty ones), each joined from its pieces."""
        parts: list[str] = []
        for text, end in self.pieces():
            parts.append(text)
            if end:
                yield "".join(parts)
                parts = []

    def pieces(self, *, chunk_chars: int = DEFAULT_CHUNK_CHARS) -> Iterator[Piece]:
        """Stream ``(text, end_of_document)`` pieces of at most about ``chunk_chars`` characters.

        Documents that are empty or only whitespace are skipped.
        """
        if chunk_chars < 1:
            raise ValueError(f"chunk_chars must be positive, got {chunk_chars}")
        if self.texts is not None:
            for text in self.texts:
                if not isinstance(text, str):
                    raise LMForgeError(f"expected text (str) documents, got {type(text).__name__}")
                yield from _skip_blank(_chunk_document(text, chunk_chars))
            return
        for path in self.files:
            if path.suffix.lower() in JSONL_SUFFIXES:
                for text in _read_jsonl(path, self.field):
                    yield from _skip_blank(_chunk_document(text, chunk_chars))
            else:
                blocks = _decoded_blocks(path)
                yield from _skip_blank(
                    _split_stream(blocks, _SEPARATORS.get(self.document_mode), chunk_chars)
                )

    def __repr__(self) -> str:
        return f"Corpus({self.name!r})"


def as_corpus(
    sources: Corpus | str | Path | Sequence[str | Path] | Iterable[str], *, field: str = "text"
) -> Corpus:
    """Interpret what a user passed as a corpus.

    A :class:`Corpus` stays as it is; a path, or a list/tuple of paths, is read from disk; any other
    iterable (a generator, an iterator, a set) is taken as texts, one document per string. Pass
    in-memory texts as ``Corpus.from_texts(list_of_texts)`` or ``iter(list_of_texts)``.
    """
    if isinstance(sources, Corpus):
        return sources
    if isinstance(sources, str | Path | list | tuple):
        return Corpus.from_files(sources, field=field)
    return Corpus.from_texts(sources)


# ---- files --------------------------------------------------------------------------------------


def _expand_paths(paths: Sequence[str | Path]) -> list[Path]:
    """Files in order: each path as given, directories expanded recursively and sorted."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not found:
                raise LMForgeError("directory has no files", file=path)
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise LMForgeError("file not found", file=path)
    for path in files:
        if path.stat().st_size == 0:
            raise LMForgeError("file is empty", file=path)
    return files


def _decoded_blocks(path: Path) -> Iterator[str]:
    """Decode a UTF-8 file block by block; undecodable bytes are reported with their byte offset."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
    offset = 0  # bytes read before this block
    with path.open("rb") as handle:
        first = True
        while True:
            block = handle.read(_BLOCK_BYTES)
            pending = len(decoder.getstate()[0])  # bytes of a character split across blocks
            try:
                text = decoder.decode(block, final=not block)
            except UnicodeDecodeError as err:
                raise LMForgeError(
                    f"not UTF-8 text: undecodable byte at byte offset {offset - pending + err.start} "
                    f"({err.reason})",
                    file=path,
                ) from None
            if first and text.startswith("\ufeff"):  # a byte-order mark is not text
                text = text[1:]
            first = False
            offset += len(block)
            if text:
                yield text
            if not block:
                return


def _read_jsonl(path: Path, field: str) -> Iterator[str]:
    """The ``field`` of every JSON object in a JSONL file (blank lines are skipped)."""
    offset = 0
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise LMForgeError(
                    f"not UTF-8 text: undecodable byte at byte offset {offset + err.start}",
                    file=path,
                    line=number,
                ) from None
            offset += len(raw)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise LMForgeError(
                    f"not valid JSON: {err.msg} (column {err.colno})", file=path, line=number
                ) from None
            if not isinstance(record, dict):
                raise LMForgeError(
                    f"expected a JSON object, got {type(record).__name__}", file=path, line=number
                )
            if field not in record:
                keys = ", ".join(map(str, record)) or "none"
                raise LMForgeError(
                    f"line has no field '{field}' (its keys: {keys})", file=path, line=number, key=field
                )
            value = record[field]
            if not isinstance(value, str):
                raise LMForgeError(
                    f"field '{field}' must be a string, got {type(value).__name__}", file=path, line=number
                )
            yield value


# ---- splitting ----------------------------------------------------------------------------------


def _safe_cut(text: str, limit: int) -> int:
    """Where to cut ``text`` (longer than ``limit``): the last safe point within ``limit``
    characters, else the first one after it; a hard cut at ``limit`` when none comes within
    the horizon (16 chunks, at least 4 Mi characters); 0 when none is visible yet (read on)."""
    cut = 0
    for match in _SAFE_CUT.finditer(text, 0, min(len(text), limit + 1)):
        cut = match.start()
    if cut:
        return cut
    horizon = max(16 * limit, _HARD_CUT_CHARS)
    match = _SAFE_CUT.search(text, limit, min(len(text), horizon + 1))
    if match is not None:
        return match.start()
    return limit if len(text) > horizon else 0


def _chunk_document(text: str, chunk_chars: int) -> Iterator[Piece]:
    """One in-memory document as safe pieces."""
    while len(text) > chunk_chars:
        cut = _safe_cut(text, chunk_chars)
        if cut == 0:
            break
        yield text[:cut], False
        text = text[cut:]
    yield text, True


def _split_stream(
    blocks: Iterable[str], separator: re.Pattern[str] | None, chunk_chars: int
) -> Iterator[Piece]:
    """Split a stream of text blocks into documents (at ``separator``; None = one document) and
    the documents into safe pieces of about ``chunk_chars`` characters."""
    buffer = ""
    for block in blocks:
        buffer += block
        if separator is not None:
            start = 0
            for match in separator.finditer(buffer):
                if _ONLY_SPACE_LEFT.match(buffer, match.end()):  # it may go on in the next block
                    break
                yield from _chunk_document(buffer[start : match.start()], chunk_chars)
                start = match.end()
            buffer = buffer[start:]
        while len(buffer) > chunk_chars:
            cut = _safe_cut(buffer, chunk_chars)
            if cut == 0:
                break
            yield buffer[:cut], False
            buffer = buffer[cut:]
    if separator is not None:  # the end of the stream: every separator left is complete
        start = 0
        for match in separator.finditer(buffer):
            yield from _chunk_document(buffer[start : match.start()], chunk_chars)
            start = match.end()
        buffer = buffer[start:]
    yield from _chunk_document(buffer, chunk_chars)


def _skip_blank(pieces: Iterable[Piece]) -> Iterator[Piece]:
    """Drop documents that are empty or whitespace only, holding back leading blank pieces."""
    held: list[str] = []
    seen_text = False
    for text, end in pieces:
        if not seen_text:
            if text.strip():
                seen_text = True
                for blank in held:
                    yield blank, False
            else:
                held.append(text)
        if seen_text:
            yield text, end
        if end:
            held, seen_text = [], False
