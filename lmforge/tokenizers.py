"""Tokenizers: character-level, byte-level BPE and WordPiece, trained with Hugging Face ``tokenizers``.

:class:`Tokenizer` wraps a ``tokenizers.Tokenizer`` (the Rust library behind Hugging Face fast
tokenizers) and knows the roles of its special tokens: pad, unk, bos, eos, cls, sep, mask.

- ``char``: one token per Unicode character (code point); the vocabulary is the distinct characters
  of the training text plus the specials (tinyshakespeare: 65 + 7). Unseen characters become unk.
- ``bpe``: byte-level BPE as in GPT-2 (Radford et al. 2019; Sennrich et al. 2016): every byte is in
  the base alphabet, so any Unicode text (Chinese, emoji) round-trips exactly.
- ``wordpiece``: WordPiece as in BERT (Schuster & Nakajima 2012; Devlin et al. 2019) with the BERT
  normalizer and pre-tokenizer: whitespace is normalized and punctuation/CJK characters become
  separate words, so ``decode(encode(text))`` equals ``text`` up to whitespace (e.g. ``"你好，世界"``
  decodes as ``"你 好 ， 世 界"``), and to lower case with ``lowercase=True``.

Trained tokenizers put the specials first, in the same order for every kind — ``[PAD]`` 0,
``[UNK]`` 1, ``[BOS]`` 2, ``[EOS]`` 3, ``[CLS]`` 4, ``[SEP]`` 5, ``[MASK]`` 6 — then T5 sentinels
``<extra_id_0>…`` when asked. ``encode(text, add_special_tokens=True)`` wraps a text as
``[BOS] … [EOS]`` (char, bpe) or ``[CLS] … [SEP]`` (wordpiece). Special-token strings inside
the text are matched as special tokens (the ``tokenizers`` default).

Any Hugging Face ``tokenizer.json`` loads as is (:meth:`Tokenizer.from_file`); roles come from the
``special_tokens`` argument, else from a ``tokenizer_config.json`` next to it, else from common
names (``[PAD]``/``<pad>``, ``<s>``/``</s>``, ``<|endoftext|>``, ``[CLS]``, ``[MASK]``/``<mask>``, ...).
A chat model's template (``chat_template`` in ``tokenizer_config.json``, or ``chat_template.jinja``)
is kept on the tokenizer and rendered by :meth:`Tokenizer.apply_chat_template` (see
:mod:`lmforge.chat_template`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, processors
from torch import Tensor

from .chat_template import encode_chat, render_chat
from .corpus import as_corpus
from .errors import LMForgeError
from .tokenizer_training import train_backend

if TYPE_CHECKING:
    from .chat_template import ChatEncoding, ChatTemplate
    from .corpus import Corpus

TokenizerKind = Literal["char", "bpe", "wordpiece"]

ROLES = ("pad", "unk", "bos", "eos", "cls", "sep", "mask")
DEFAULT_SPECIAL_TOKENS: dict[str, str] = {
    "pad": "[PAD]",
    "unk": "[UNK]",
    "bos": "[BOS]",
    "eos": "[EOS]",
    "cls": "[CLS]",
    "sep": "[SEP]",
    "mask": "[MASK]",
}
# Common names of each role in published tokenizers, most specific first.
ROLE_NAMES: dict[str, tuple[str, ...]] = {
    "pad": ("[PAD]", "<pad>", "<|pad|>", "<|padding|>", "<|endoftext|>"),
    "unk": ("[UNK]", "<unk>", "<|unk|>"),
    "bos": ("[BOS]", "<s>", "<bos>", "<|begin_of_text|>", "<|startoftext|>", "<|endoftext|>"),
    "eos": ("[EOS]", "</s>", "<eos>", "<|end_of_text|>", "<|endoftext|>"),
    "cls": ("[CLS]", "<cls>", "<s>"),
    "sep": ("[SEP]", "<sep>", "</s>"),
    "mask": ("[MASK]", "<mask>", "<|mask|>"),
}
_CONFIG_NAME = "tokenizer_config.json"  # Hugging Face's companion file: roles of the specials
_TEMPLATE_NAME = "chat_template.jinja"  # where newer transformers versions save the chat template


class Tokenizer:
    """A ``tokenizers.Tokenizer`` plus the roles of its special tokens.

    Args:
        backend: the Hugging Face ``tokenizers.Tokenizer``.
        special_tokens: role -> token string, for roles among pad, unk, bos, eos, cls, sep, mask.
            Roles not given are inferred from common token names.
        chat_template: the Jinja source of a chat model's template (saved in tokenizer_config.json).

    Raises:
        LMForgeError: a role names a token that is not in the vocabulary, or an unknown role.
    """

    def __init__(
        self,
        backend: Backend,
        special_tokens: dict[str, str] | None = None,
        *,
        chat_template: str | None = None,
    ) -> None:
        self.backend = backend
        self.chat_template = chat_template
        given = dict(special_tokens or {})
        for role, token in given.items():
            if role not in ROLES:
                raise LMForgeError(
                    f"unknown special-token role '{role}' (roles: {', '.join(ROLES)})", key=role
                )
            if backend.token_to_id(token) is None:
                raise LMForgeError(
                    f"special token {token!r} for role '{role}' is not in the vocabulary", key=role
                )
        inferred = {role: _infer_role(backend, role) for role in ROLES if role not in given}
        self.special_tokens: dict[str, str] = {
            role: token for role in ROLES if (token := given.get(role) or inferred.get(role)) is not None
        }
        self._word_tables: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def train(
        cls,
        sources: Corpus | str | Path | Sequence[str | Path] | Iterable[str],
        *,
        kind: TokenizerKind,
        vocab_size: int,
        min_frequency: int | None = None,
        special_tokens: dict[str, str] | None = None,
        num_sentinels: int = 0,
        lowercase: bool = False,
        field: str = "text",
        show_progress: bool = True,
    ) -> Tokenizer:
        """Train a tokenizer on files (text, JSONL, directories) or on an iterator of texts; the
        same corpus gives the same vocabulary in every run (see :mod:`lmforge.tokenizer_training`).

        Args:
            sources: a path, a list of paths, a :class:`~lmforge.data.Corpus`, or an iterator of
                texts (a list is read as paths; pass texts as ``iter(texts)``).
            kind: ``"char"``, ``"bpe"`` (byte-level) or ``"wordpiece"``.
            vocab_size: the size of the vocabulary, specials included (for ``char``, an upper
                bound: the most frequent characters are kept).
            min_frequency: how often a merge/word piece must occur to be learned (default 2; char: 1).
            special_tokens: role -> string, to rename specials (defaults: ``[PAD]``, ``[UNK]``, ...).
            num_sentinels: add ``<extra_id_0>`` … for span corruption (T5).
            lowercase: WordPiece only: lower-case the text (as uncased BERT).
            field: the JSON field of JSONL files.
            show_progress: a progress bar over the bytes read.
        """

        if kind not in ("char", "bpe", "wordpiece"):
            raise LMForgeError(f"kind = {kind!r}: must be one of char, bpe, wordpiece", key="kind")
        if lowercase and kind != "wordpiece":
            raise LMForgeError(f"lowercase applies to wordpiece only, not {kind}", key="lowercase")
        unknown = set(special_tokens or {}) - set(ROLES)
        if unknown:
            raise LMForgeError(f"unknown special-token role(s) {sorted(unknown)} (roles: {', '.join(ROLES)})")
        names = {**DEFAULT_SPECIAL_TOKENS, **(special_tokens or {})}
        specials = list(dict.fromkeys(names[role] for role in ROLES))
        specials += [f"<extra_id_{i}>" for i in range(num_sentinels)]
        if kind == "bpe" and vocab_size < 256 + len(specials):
            raise LMForgeError(
                f"vocab_size {vocab_size} is too small for byte-level BPE: it needs at least "
                f"{256 + len(specials)} (256 bytes + {len(specials)} special tokens)",
                key="vocab_size",
            )
        if vocab_size <= len(specials):
            raise LMForgeError(
                f"vocab_size {vocab_size} leaves no room beyond the {len(specials)} special tokens",
                key="vocab_size",
            )
        if min_frequency is None:
            min_frequency = 1 if kind == "char" else 2

        corpus = as_corpus(sources, field=field)
        backend = train_backend(
            kind, corpus, specials, names, vocab_size, min_frequency, lowercase, show_progress
        )
        first, last = (names["cls"], names["sep"]) if kind == "wordpiece" else (names["bos"], names["eos"])
        backend.post_processor = processors.TemplateProcessing(
            single=f"{first} $A {last}",
            pair=f"{first} $A {last} $B:1 {last}:1",
            special_tokens=[(first, backend.token_to_id(first)), (last, backend.token_to_id(last))],
        )
        return cls(backend, {role: names[role] for role in ROLES})

    @classmethod
    def from_file(cls, path: str | Path, special_tokens: dict[str, str] | None = None) -> Tokenizer:
        """Load any Hugging Face ``tokenizer.json`` (a file, or a folder holding one) as is.

        Roles come from ``special_tokens``, else from a ``tokenizer_config.json`` (or
        ``special_tokens_map.json``) beside it, else from common token names.
        """
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise LMForgeError("tokenizer file not found", file=path)
        try:
            backend = Backend.from_file(str(path))
        except Exception as err:  # the Rust library raises plain Exception on malformed JSON
            raise LMForgeError(f"not a Hugging Face tokenizer.json: {err}", file=path) from None
        roles = _roles_from_companion(path, backend)
        roles.update(special_tokens or {})
        return cls(backend, roles, chat_template=_chat_template_from_companion(path))

    def save(self, path: str | Path) -> None:
        """Write ``tokenizer.json``: to ``path`` when it ends in ``.json``, else into the folder
        ``path``. A file named ``tokenizer.json`` also gets a ``tokenizer_config.json`` beside it
        naming the roles (the Hugging Face convention, so ``transformers`` reads it too)."""
        path = Path(path)
        if path.is_dir() or path.suffix.lower() != ".json":
            path = path / "tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(path))
        if path.name == "tokenizer.json":
            config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
            config.update({f"{role}_token": token for role, token in self.special_tokens.items()})
            if self.chat_template:
                config["chat_template"] = self.chat_template
            (path.parent / _CONFIG_NAME).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    def add_sentinels(self, count: int) -> Tokenizer:
        """Make sure ``<extra_id_0>`` … ``<extra_id_{count-1}>`` exist (T5 span corruption); returns self."""
        missing = [
            f"<extra_id_{i}>" for i in range(count) if self.backend.token_to_id(f"<extra_id_{i}>") is None
        ]
        if missing:
            self.backend.add_special_tokens(missing)
            self._word_tables = None
        return self

    # ---- ids ----------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (the model's embedding needs at least this many rows)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def _role_id(self, role: str) -> int | None:
        token = self.special_tokens.get(role)
        return None if token is None else self.backend.token_to_id(token)

    @property
    def pad_id(self) -> int | None:
        return self._role_id("pad")

    @property
    def unk_id(self) -> int | None:
        return self._role_id("unk")

    @property
    def bos_id(self) -> int | None:
        return self._role_id("bos")

    @property
    def eos_id(self) -> int | None:
        return self._role_id("eos")

    @property
    def cls_id(self) -> int | None:
        return self._role_id("cls")

    @property
    def sep_id(self) -> int | None:
        return self._role_id("sep")

    @property
    def mask_id(self) -> int | None:
        return self._role_id("mask")

    @property
    def sentinel_ids(self) -> list[int]:
        """Ids of ``<extra_id_0>``, ``<extra_id_1>``, … in index order (contiguous from 0)."""
        ids = []
        while (token_id := self.backend.token_to_id(f"<extra_id_{len(ids)}>")) is not None:
            ids.append(token_id)
        return ids

    @property
    def special_ids(self) -> list[int]:
        """Ids of every special token: the roles, sentinels and other added special tokens."""
        ids = {self.backend.token_to_id(t) for t in self.special_tokens.values()}
        ids.update(i for i, tok in self.backend.get_added_tokens_decoder().items() if tok.special)
        return sorted(i for i in ids if i is not None)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    @property
    def kind(self) -> str:
        """``"char"``, ``"bpe"``, ``"wordpiece"``, ``"unigram"`` or ``"wordlevel"`` (from the model)."""
        model = type(self.backend.model).__name__
        if model == "WordLevel" and isinstance(self.backend.decoder, decoders.Fuse):
            return "char"
        return {"BPE": "bpe", "WordPiece": "wordpiece", "Unigram": "unigram"}.get(model, model.lower())

    @property
    def fingerprint(self) -> str:
        """A hash of the whole tokenizer (vocabulary, merges, normalization): token shards record
        it so that ids are never read with a different tokenizer."""
        canonical = json.dumps(json.loads(self.backend.to_str()), sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]

    # ---- encode / decode ----------------------------------------------------------------------

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text`` — **without special tokens by default**.

        A BERT-style encoder was trained on ``[CLS] … [SEP]``: to feed it a text yourself, pass
        ``add_special_tokens=True`` (the tokenizer's template wraps it: ``[CLS] … [SEP]``, or
        ``[BOS] … [EOS]`` for lmforge's BPE). lmforge's tasks, pipeline and evaluation add them
        where the model needs them; the plain default suits prompts a decoder continues."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_many(self, texts: list[str], *, add_special_tokens: bool = False) -> list[list[int]]:
        """Token ids of many texts, encoded in parallel by the Rust library."""
        if hasattr(self.backend, "encode_batch_fast"):  # tokenizers >= 0.20: no offsets computed
            encodings = self.backend.encode_batch_fast(texts, add_special_tokens=add_special_tokens)
        else:
            encodings = self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)
        return [e.ids for e in encodings]

    def decode(self, ids: Iterable[int] | Tensor, *, skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (a list or a 1-D tensor)."""
        if isinstance(ids, Tensor):
            ids = ids.tolist()
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def encode_batch(
        self,
        texts: Sequence[str],
        *,
        add_special_tokens: bool = False,
        max_length: int | None = None,
        padding_side: Literal["right", "left"] = "right",
    ) -> dict[str, Tensor]:
        """Encode texts into a padded batch: ``input_ids`` (B, T) long and ``attention_mask``
        (B, T) bool (True = real token). Left padding suits batched generation with a decoder.

        Args:
            texts: the texts.
            add_special_tokens: wrap each text with the tokenizer's template.
            max_length: truncate longer sequences to this many tokens (keeping the end specials).
            padding_side: where the padding goes.
        """
        if self.pad_id is None:
            raise LMForgeError("the tokenizer has no pad token: pass special_tokens={'pad': ...}", key="pad")
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        if max_length is not None:
            self.backend.enable_truncation(max_length)
        try:
            rows = self.encode_many(list(texts), add_special_tokens=add_special_tokens)
        finally:
            if max_length is not None:
                self.backend.no_truncation()
        T = max((len(r) for r in rows), default=0)
        input_ids = torch.full((len(rows), T), self.pad_id, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((len(rows), T), dtype=torch.bool)  # (B, T)
        for i, row in enumerate(rows):
            span = slice(0, len(row)) if padding_side == "right" else slice(T - len(row), T)
            input_ids[i, span] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, span] = True
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    # ---- chat ---------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        add_generation_prompt: bool = False,
        template: str | ChatTemplate | None = None,
        **variables: Any,
    ) -> str:
        """A conversation rendered as the model expects it (Hugging Face's ``apply_chat_template``
        with ``tokenize=False``): the tokenizer's chat template, or ``template`` (a built-in's
        name: chatml, llama-2, plain; or Jinja source). Encode the result with
        ``add_special_tokens=False``: the template writes the special tokens itself."""
        return render_chat(
            self, messages, add_generation_prompt=add_generation_prompt, template=template, **variables
        )

    def encode_chat(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        template: str | ChatTemplate | None = None,
        **variables: Any,
    ) -> ChatEncoding:
        """Token ids of a rendered conversation and a mask marking the tokens of assistant turns
        (for a loss on those only); see :func:`lmforge.chat_template.encode_chat`."""
        return encode_chat(self, messages, template=template, **variables)

    # ---- word boundaries (whole-word masking) -------------------------------------------------

    def word_ids(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """The word index of each token of a sequence (-1 for special tokens), from the tokenizer's
        own word boundaries: WordPiece ``##`` continuations, the leading space of byte-level BPE
        tokens (``Ġ``) or SentencePiece ``▁``, whitespace between characters.

        A whitespace-only token is a word of its own. Used by whole-word masking.
        """
        begins, space, special = self._word_boundary_tables()
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size == 0:
            return np.zeros(0, dtype=np.int64)
        new_word = begins[ids] | space[ids] | special[ids]
        new_word[1:] |= space[ids[:-1]] | special[ids[:-1]]
        new_word[0] = True
        word = np.cumsum(new_word) - 1
        word[special[ids]] = -1
        return word

    def _word_boundary_tables(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-id flags: begins a word, is whitespace only, is special."""
        if self._word_tables is not None:
            return self._word_tables
        V = self.vocab_size
        begins = np.zeros(V, dtype=bool)
        space = np.zeros(V, dtype=bool)
        special = np.zeros(V, dtype=bool)
        special[self.special_ids] = True
        model = self.backend.model
        prefix = (
            getattr(model, "continuing_subword_prefix", None) if isinstance(model, models.WordPiece) else None
        )
        byte_level = isinstance(self.backend.decoder, decoders.ByteLevel) or isinstance(
            self.backend.pre_tokenizer, pre_tokenizers.ByteLevel
        )
        joins_with_spaces = self.backend.decoder is None  # decode() puts spaces between all tokens
        for token, token_id in self.backend.get_vocab(with_added_tokens=True).items():
            if prefix is not None:
                begins[token_id] = not token.startswith(prefix)
                continue
            if joins_with_spaces:
                begins[token_id] = True
                continue
            text = _byte_level_text(token) if byte_level else token.replace("▁", " ")
            space[token_id] = bool(text) and text.isspace()
            begins[token_id] = text[:1].isspace()
        self._word_tables = (begins, space, special)
        return self._word_tables

    def __repr__(self) -> str:
        roles = ", ".join(f"{r}={t!r}" for r, t in self.special_tokens.items())
        return f"Tokenizer(kind={self.kind}, vocab_size={self.vocab_size}, {roles})"


# ---- helpers ------------------------------------------------------------------------------------


def _infer_role(backend: Backend, role: str) -> str | None:
    for name in ROLE_NAMES[role]:
        if backend.token_to_id(name) is not None:
            return name
    return None


def _roles_from_companion(path: Path, backend: Backend) -> dict[str, str]:
    """Roles named by Hugging Face's ``tokenizer_config.json`` / ``special_tokens_map.json``
    beside a ``tokenizer.json``."""
    roles: dict[str, str] = {}
    if path.name != "tokenizer.json":
        return roles
    for name in ("special_tokens_map.json", _CONFIG_NAME):  # the config wins
        companion = path.parent / name
        if not companion.is_file():
            continue
        try:
            data = json.loads(companion.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise LMForgeError(f"not valid JSON: {err}", file=companion) from None
        for role in ROLES:
            value = data.get(f"{role}_token")
            if isinstance(value, dict):  # {"content": "<s>", "lstrip": false, ...}
                value = value.get("content")
            if isinstance(value, str) and backend.token_to_id(value) is not None:
                roles[role] = value
    return roles


def _chat_template_from_companion(path: Path) -> str | None:
    """The chat template saved beside a ``tokenizer.json``: ``chat_template.jinja``, else
    ``chat_template`` in ``tokenizer_config.json`` (a string, or a list of named templates of
    which the one named "default" is taken)."""
    if path.name != "tokenizer.json":
        return None
    jinja_file = path.parent / _TEMPLATE_NAME
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    config_file = path.parent / _CONFIG_NAME
    if not config_file.is_file():
        return None
    try:
        value = json.loads(config_file.read_text(encoding="utf-8")).get("chat_template")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None  # _roles_from_companion has reported a bad file already
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    return value if isinstance(value, str) and value else None


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters (byte-level BPE)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_UNICODE_TO_BYTE = {char: byte for byte, char in _bytes_to_unicode().items()}


def _byte_level_text(token: str) -> str:
    """The text a byte-level token stands for (partial UTF-8 sequences become U+FFFD)."""
    if any(ch not in _UNICODE_TO_BYTE for ch in token):
        return token  # an added token, stored as plain text
    return bytes(_UNICODE_TO_BYTE[ch] for ch in token).decode("utf-8", errors="replace")
