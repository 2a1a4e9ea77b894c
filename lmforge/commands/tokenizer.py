"""``lmforge tokenizer train``: train a character, byte-level BPE or WordPiece tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from ..pipeline.tokenizer import train_tokenizer


def tokenizer_train(
    files: list[Path],
    *,
    kind: Literal["char", "bpe", "wordpiece"] = "bpe",
    vocab_size: int = 8000,
    out: Path = Path("runs/tokenizer"),
    field: str = "text",
    documents: Literal["file", "line", "blank_line"] = "file",
    min_frequency: int | None = None,
    lowercase: bool = False,
    num_sentinels: int = 0,
    progress: bool = True,
    overwrite: bool = False,
) -> int:
    """Train a tokenizer on text files, JSONL files or directories and save it as tokenizer.json.

    Special tokens come first with the same ids for every kind: [PAD] 0, [UNK] 1, [BOS] 2,
    [EOS] 3, [CLS] 4, [SEP] 5, [MASK] 6. Prints the vocabulary size and the tokens per byte on
    the input.

    Args:
        files: text files, .jsonl files (the text in --field) or directories (read recursively).
        kind: char (one token per character), bpe (byte-level BPE, GPT-2 style) or wordpiece (BERT style).
        vocab_size: vocabulary size, special tokens included (for char: an upper bound).
        out: a folder to write tokenizer.json into (new or empty), or a .json file to write.
        field: the JSON field holding the text in .jsonl files.
        documents: how a text file splits into documents: file, line or blank_line.
        min_frequency: minimum count of a learned merge/piece (default 2; char: 1).
        lowercase: wordpiece only: lower-case the text (uncased BERT).
        num_sentinels: add <extra_id_0>… tokens for T5 span corruption.
        progress: show progress bars.
        overwrite: replace an existing OUT (a folder as a whole; without it, an error and nothing touched).
    """
    report = train_tokenizer(
        files,
        out,
        kind=kind,
        vocab_size=vocab_size,
        field=field,
        documents=documents,
        progress=progress,
        overwrite=overwrite,
        min_frequency=min_frequency,
        lowercase=lowercase,
        num_sentinels=num_sentinels,
    )
    tokenizer = report.tokenizer
    specials = len(tokenizer.special_ids)
    print(f"trained a {kind} tokenizer: {tokenizer.vocab_size:,} tokens ({specials} special) -> {report.path}")
    print(
        f"input: {report.num_bytes:,} bytes in {report.num_documents:,} document(s) -> {report.num_tokens:,} "
        f"tokens: {report.tokens_per_byte:.3f} tokens per byte "
        f"({report.num_bytes / max(report.num_tokens, 1):.2f} bytes per token)"
    )
    return 0
