"""Training a tokenizer on a user's text and measuring it: what ``lmforge tokenizer train`` runs.

    files ──Corpus──► Tokenizer.train (char | byte-level BPE | WordPiece) ──► tokenizer.json
          ──measure──► tokens per byte on the same text
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..corpus import Corpus
from ..errors import LMForgeError
from ..files import TOKENIZER_FILE, check_output, check_writable, replace_folder, save_tokenizer
from ..tokenizers import Tokenizer


@dataclass
class TokenizerReport:
    """What :func:`train_tokenizer` made and measured."""

    tokenizer: Tokenizer
    path: Path  # where tokenizer.json was written
    num_bytes: int
    num_tokens: int
    num_documents: int

    @property
    def tokens_per_byte(self) -> float:
        return self.num_tokens / max(self.num_bytes, 1)


def measure(tokenizer: Tokenizer, corpus: Corpus, *, progress: bool = True) -> tuple[int, int, int]:
    """(bytes, tokens, documents) of ``corpus`` under ``tokenizer``, read in pieces."""
    num_tokens = num_bytes = num_docs = 0
    with tqdm(total=corpus.num_bytes, unit="B", unit_scale=True, desc="measuring", disable=not progress) as bar:
        batch: list[str] = []
        for text, end in corpus.pieces(chunk_chars=1 << 16):
            batch.append(text)
            num_docs += end
            if len(batch) == 256:
                num_tokens += sum(map(len, tokenizer.encode_many(batch)))
                batch = []
            size = len(text.encode("utf-8"))
            num_bytes += size
            bar.update(size)
        num_tokens += sum(map(len, tokenizer.encode_many(batch)))
    return num_bytes, num_tokens, num_docs


def train_tokenizer(
    files: Sequence[Path],
    out: Path,
    *,
    kind: str = "bpe",
    vocab_size: int = 8000,
    field: str = "text",
    documents: str = "file",
    progress: bool = True,
    overwrite: bool = False,
    **options: Any,
) -> TokenizerReport:
    """Train a ``kind`` tokenizer on ``files``, write it to ``out`` (a new or empty folder to hold
    tokenizer.json, or a .json file) and measure it on the same text. ``options``:
    min_frequency, lowercase, num_sentinels (see :meth:`Tokenizer.train`).

    Raises:
        LMForgeError: an occupied ``out`` (without ``overwrite``), bad input files.
    """
    as_file = out.suffix.lower() == ".json" and not out.is_dir()
    if as_file:
        check_writable(out.parent)
        if out.exists() and not overwrite:
            raise LMForgeError("the tokenizer file exists: choose another --out, or add --overwrite", file=out)
    else:
        check_output(out, overwrite=overwrite)
    corpus = Corpus.from_files(list(files), field=field, documents=documents)  # type: ignore[arg-type]
    tokenizer = Tokenizer.train(corpus, kind=kind, vocab_size=vocab_size, show_progress=progress, **options)
    if as_file:
        path = out
        tokenizer.save(path)
    else:
        replace_folder(out, lambda tmp: save_tokenizer(tokenizer, tmp))
        path = out / TOKENIZER_FILE
    num_bytes, num_tokens, num_docs = measure(tokenizer, corpus, progress=progress)
    return TokenizerReport(tokenizer, path, num_bytes, num_tokens, num_docs)
