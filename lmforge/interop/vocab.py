"""A BERT tokenizer from a bare ``vocab.txt`` (folders without a ``tokenizer.json``).

Rebuilds what BERT's original tokenizer does (Devlin et al. 2019; Wu et al. 2016 for
WordPiece) with the Hugging Face ``tokenizers`` building blocks: the BERT normalizer (clean
control characters, space around CJK characters, strip accents and lower-case when
``do_lower_case``), split on whitespace and punctuation, greedy longest-match WordPiece with
``##`` continuations, and ``[CLS] … [SEP]`` around a text (``[CLS] A [SEP] B [SEP]`` for pairs).
Settings come from ``tokenizer_config.json`` when the folder has one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

from ..errors import LMForgeError

ROLES = ("pad", "unk", "bos", "eos", "cls", "sep", "mask")
BERT_DEFAULTS = {"unk": "[UNK]", "sep": "[SEP]", "pad": "[PAD]", "cls": "[CLS]", "mask": "[MASK]"}


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LMForgeError(f"not valid JSON: {err}", file=path) from None
    if not isinstance(data, dict):
        raise LMForgeError("expected a JSON object", file=path)
    return data


def special_token_roles(folder: Path) -> dict[str, str]:
    """Role -> token string from ``special_tokens_map.json`` then ``tokenizer_config.json``
    (which wins); entries may be plain strings or ``{"content": ...}`` objects."""
    roles: dict[str, str] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        data = read_json(folder / name)
        for role in ROLES:
            value = data.get(f"{role}_token")
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                roles[role] = value
    return roles


def wordpiece_from_vocab(folder: Path, roles: dict[str, str]) -> tuple[Backend, dict[str, str]]:
    """A WordPiece backend built from ``folder/vocab.txt`` and the roles present in it.

    Returns:
        the ``tokenizers.Tokenizer`` and the special-token roles it has.
    """
    path = folder / "vocab.txt"
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as err:
        raise LMForgeError(f"not UTF-8 text ({err.reason} at byte {err.start})", file=path) from None
    if lines and lines[-1] == "":
        lines.pop()
    vocab = {token: index for index, token in enumerate(lines)}  # a repeated token: the last id wins
    if not vocab:
        raise LMForgeError("empty vocabulary", file=path)
    roles = {role: token for role, token in {**BERT_DEFAULTS, **roles}.items() if token in vocab}
    if "unk" not in roles:
        raise LMForgeError("the vocabulary has no unknown token ([UNK])", file=path)
    settings = read_json(folder / "tokenizer_config.json")
    lowercase = bool(settings.get("do_lower_case", True))
    strip_accents = settings.get("strip_accents")  # None: follow lowercase, as BERT does

    backend = Backend(models.WordPiece(vocab, unk_token=roles["unk"], max_input_chars_per_word=100))
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True,
        handle_chinese_chars=bool(settings.get("tokenize_chinese_chars", True)),
        strip_accents=strip_accents if isinstance(strip_accents, bool) else None,
        lowercase=lowercase,
    )
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    backend.add_special_tokens(list(dict.fromkeys(roles.values())))
    if "cls" in roles and "sep" in roles:
        cls, sep = roles["cls"], roles["sep"]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{cls}:0 $A:0 {sep}:0",
            pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
            special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])],
        )
    return backend, roles
