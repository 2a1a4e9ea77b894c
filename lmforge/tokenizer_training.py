"""Training a tokenizer's backend with Hugging Face ``tokenizers``, the same vocabulary every run.

The Rust trainers give the same vocabulary for the same corpus in every process but in one case:
WordPiece, which learns BPE merges over ``##``-prefixed continuation pieces. Its trainer numbers
each continuation character ``##c`` as it first meets it while walking its word counts, a hash map
whose order changes from process to process, and breaks ties between equally frequent merges by
those numbers: the same corpus gave different vocabularies (and token ids) in different runs.
:func:`train_backend` therefore reads a WordPiece corpus twice: first to collect the characters that
continue a word, which it hands to the trainer numbered in sorted order (as extra special tokens,
dropped from the added tokens afterwards: they stay plain vocabulary entries), then to train. A
one-shot iterator of texts is kept in memory for the second reading.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as Backend
from tqdm.auto import tqdm

from .corpus import Corpus
from .errors import LMForgeError

CHUNK_CHARS = 1 << 16  # the pieces the trainer is fed
CONTINUATION = "##"  # WordPiece's prefix of a piece that continues a word (BERT's)
_WORD_START = re.compile(r"(?:^| )[^ ]")  # a word's first character, words cut at spaces


def train_backend(
    kind: str,
    corpus: Corpus,
    specials: list[str],
    names: dict[str, str],
    vocab_size: int,
    min_frequency: int,
    lowercase: bool,
    show_progress: bool,
) -> Backend:
    """A backend of ``kind`` trained on ``corpus``: ``specials`` first, then what the trainer
    learns; ``names`` maps roles to their special tokens (unk for WordPiece and char)."""
    backend, trainer = new_backend(kind, specials, vocab_size, min_frequency, lowercase, names)
    pinned: list[str] = []
    if kind == "wordpiece":
        if not corpus.reiterable:
            corpus = Corpus.from_texts(
                [text for text, _ in corpus.pieces(chunk_chars=CHUNK_CHARS)], name=corpus.name
            )
        pinned = [CONTINUATION + c for c in sorted(_continuing_characters(backend, corpus, show_progress))]
        pinned = [piece for piece in pinned if piece not in specials]
        trainer.special_tokens = specials + pinned
    read = [0]  # characters the trainer saw
    backend.train_from_iterator(
        _groups(corpus, show_progress, read, "training tokenizer on"), trainer=trainer
    )
    if read[0] == 0:
        raise LMForgeError(f"empty corpus: no text to train on in {corpus.name}")
    if pinned:
        state = json.loads(backend.to_str())
        kept = set(pinned)
        state["added_tokens"] = [token for token in state["added_tokens"] if token["content"] not in kept]
        backend = Backend.from_str(json.dumps(state))
    return backend


def new_backend(
    kind: str,
    specials: list[str],
    vocab_size: int,
    min_frequency: int,
    lowercase: bool,
    names: dict[str, str],
) -> tuple[Backend, Any]:
    """An untrained backend and its trainer for ``kind``."""
    if kind == "char":
        backend = Backend(models.WordLevel(unk_token=names["unk"]))
        # (?m) makes "." match a newline too (Oniguruma's Ruby syntax): one piece per character.
        backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"(?m)."), behavior="isolated")
        backend.decoder = decoders.Fuse()
        trainer = trainers.WordLevelTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials, show_progress=False
        )
    elif kind == "bpe":
        backend = Backend(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    else:
        backend = Backend(models.WordPiece(unk_token=names["unk"]))
        backend.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase
        )
        backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        backend.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials, show_progress=False
        )
    return backend, trainer


def _groups(corpus: Corpus, show_progress: bool, read: list[int], what: str) -> Iterator[list[str]]:
    """Pieces of the corpus in groups (the Rust trainer takes batches), with a progress bar
    described as ``what`` the corpus; counts the characters into ``read[0]``."""

    total = corpus.num_bytes
    with tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        desc=f"{what} {corpus.name}",
        disable=not show_progress,
    ) as bar:
        group: list[str] = []
        for text, _ in corpus.pieces(chunk_chars=CHUNK_CHARS):
            group.append(text)
            read[0] += len(text)
            bar.update(len(text.encode("utf-8")))
            if len(group) == 256:
                yield group
                group = []
        if group:
            yield group


def _continuing_characters(backend: Backend, corpus: Corpus, show_progress: bool) -> set[str]:
    """The characters that occur after the first of a word, words cut as the trainer cuts them.

    Each new character is asked of the pre-tokenizer once (does it cut ``a?a``: whitespace,
    punctuation); the text is then read with the cutting characters turned into spaces, in C
    (a pre-tokenized list of words costs several times the training itself)."""
    normalizer, pre_tokenizer = backend.normalizer, backend.pre_tokenizer
    seen: set[str] = set()
    cuts: dict[int, str] = {}  # a character the pre-tokenizer cuts at -> a space
    found: set[str] = set()
    for group in _groups(corpus, show_progress, [0], "reading the characters of"):
        for text in group:
            text = normalizer.normalize_str(text)
            for char in set(text) - seen:
                seen.add(char)
                if len(pre_tokenizer.pre_tokenize_str(f"a{char}a")) != 1:
                    cuts[ord(char)] = " "
            found.update(_WORD_START.sub(" ", text.translate(cuts)))
    found.discard(" ")
    return found
