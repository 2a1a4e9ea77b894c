"""``lmforge tokenizer train``: train a character, byte-level BPE or WordPiece tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from ..data.sources import Corpus
from ..tokenizers import Tokenizer


def tokenizer_train(
    files: list[Path],
    *,
    kind: Literal["char", "bpe", "wordpiece"] = "bpe",
    vocab_size: int = 8000,
    out: Path = Path("tokenizer.json"),
    field: str = "text",
    documents: Literal["file", "line", "blank_line"] = "file",
    min_frequency: int | None = None,
    lowercase: bool = False,
    num_sentinels: int = 0,
    progress: bool = True,
) -> int:
    """Train a tokenizer on text files, JSONL files or directories and save it as tokenizer.json.

    Special tokens come first with the same ids for every kind: [PAD] 0, [UNK] 1, [BOS] 2,
    [EOS] 3, [CLS] 4, [SEP] 5, [MASK] 6. Prints the vocabulary size and the tokens per byte on
    the input.

    Args:
        files: text files, .jsonl files (the text in --field) or directories (read recursively).
        kind: char (one token per character), bpe (byte-level BPE, GPT-2 style) or wordpiece (BERT style).
        vocab_size: vocabulary size, special tokens included (for char: an upper bound).
        out: the .json file to write, or a folder to write tokenizer.json into.
        field: the JSON field holding the text in .jsonl files.
        documents: how a text file splits into documents: file, line or blank_line.
        min_frequency: minimum count of a learned merge/piece (default 2; char: 1).
        lowercase: wordpiece only: lower-case the text (uncased BERT).
        num_sentinels: add <extra_id_0>… tokens for T5 span corruption.
        progress: show progress bars.
    """
    from tqdm.auto import tqdm

    corpus = Corpus.from_files(files, field=field, documents=documents)
    tokenizer = Tokenizer.train(
        corpus,
        kind=kind,
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        lowercase=lowercase,
        num_sentinels=num_sentinels,
        show_progress=progress,
    )
    saved = out if out.suffix.lower() == ".json" and not out.is_dir() else out / "tokenizer.json"
    tokenizer.save(saved)

    num_tokens = num_bytes = num_docs = 0
    with tqdm(
        total=corpus.num_bytes, unit="B", unit_scale=True, desc="measuring", disable=not progress
    ) as bar:
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

    specials = len(tokenizer.special_ids)
    print(f"trained a {kind} tokenizer: {tokenizer.vocab_size:,} tokens ({specials} special) -> {saved}")
    print(
        f"input: {num_bytes:,} bytes in {num_docs:,} document(s) -> {num_tokens:,} tokens: "
        f"{num_tokens / max(num_bytes, 1):.3f} tokens per byte ({num_bytes / max(num_tokens, 1):.2f} bytes per token)"
    )
    return 0
