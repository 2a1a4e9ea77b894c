"""Tokenizers in GGUF metadata (``tokenizer.ggml.*``) <-> lmforge's :class:`~lmforge.tokenizers.Tokenizer`.

A GGUF file has no ``tokenizer.json``: llama.cpp stores the vocabulary as metadata (the GGUF
specification, docs/gguf.md in the ggml repository, section "Tokenizer"):

- ``tokenizer.ggml.model``: the algorithm; ``gpt2`` is byte-level BPE (Radford et al. 2019), the
  only kind read and written here (SentencePiece ``llama`` vocabularies are refused by name);
- ``tokenizer.ggml.pre``: which pre-tokenizer (the regular expression that cuts text into words
  before BPE) the merges were learned with, as a name llama.cpp knows (``gpt2``, ``smollm``,
  ``llama-bpe``, ``qwen2``, …);
- ``tokenizer.ggml.tokens`` / ``token_type`` / ``merges``: the vocabulary in id order, each
  token's kind (1 normal, 3 control = special, 4 user-defined = added, not special) and the
  merge rules (``"a b"``) in priority order;
- ``tokenizer.ggml.{bos,eos,unknown,padding}_token_id``, ``add_bos_token``/``add_eos_token``;
- ``tokenizer.chat_template``: the Jinja chat template.

Reading builds a Hugging Face ``tokenizers`` BPE model with the pre-tokenizer that the ``pre``
name stands for in llama.cpp (``smollm``: every digit alone, then GPT-2's expression), so ids
are those of the model's original ``tokenizer.json``. Writing goes the other way and names the
pre-tokenizer; one that has no llama.cpp name is refused, since llama.cpp would cut text
differently from what the model was trained on.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from ..errors import LMForgeError
from ..tokenizers import Tokenizer

if TYPE_CHECKING:
    from pathlib import Path


NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5  # tokenizer.ggml.token_type values (gguf.TokenType)

# The word-splitting expressions of llama.cpp's pre-tokenizer names (llama-vocab.cpp), those
# published with the models' own tokenizer.json files.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# pre name -> (split expression or None for GPT-2's own, digits one by one, BPE ignore_merges)
PRE_TOKENIZERS: dict[str, tuple[str | None, bool, bool]] = {
    "gpt2": (None, False, False),
    "default": (None, False, False),
    "smollm": (None, True, False),
    "llama-bpe": (LLAMA3_SPLIT, False, True),
    "llama3": (LLAMA3_SPLIT, False, True),
    "qwen2": (QWEN2_SPLIT, False, False),
}


def gguf_tokenizer(fields: dict[str, Any], *, file: Path) -> Tokenizer:
    """lmforge's tokenizer from a GGUF file's metadata (``fields``: key -> value).

    Raises:
        LMForgeError: a tokenizer kind or pre-tokenizer lmforge does not build, or missing
            vocabulary entries, one line naming the key.
    """

    kind = fields.get("tokenizer.ggml.model")
    if kind is None:
        raise LMForgeError("the GGUF file has no tokenizer (tokenizer.ggml.model)", file=file)
    if kind != "gpt2":
        raise LMForgeError(
            f"tokenizer.ggml.model {kind!r} is not supported by lmforge (byte-level BPE 'gpt2' only)",
            file=file,
            key="tokenizer.ggml.model",
        )
    pre = fields.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise LMForgeError(
            f"pre-tokenizer {pre!r} is not supported by lmforge (supported: {', '.join(PRE_TOKENIZERS)})",
            file=file,
            key="tokenizer.ggml.pre",
        )
    tokens: list[str] = fields.get("tokenizer.ggml.tokens") or []
    merges: list[str] = fields.get("tokenizer.ggml.merges") or []
    types: list[int] = fields.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if not tokens or len(types) != len(tokens):
        raise LMForgeError("tokenizer.ggml.tokens/token_type are missing or of different lengths", file=file)
    vocab = {token: index for index, token in enumerate(tokens)}
    pairs = []
    for merge in merges:
        left, space, right = merge.partition(" ")
        if not space or " " in right:
            raise LMForgeError(
                f"merge rule {merge!r} is not two tokens", file=file, key="tokenizer.ggml.merges"
            )
        pairs.append((left, right))

    split, digits, ignore_merges = PRE_TOKENIZERS[pre]
    options = {"ignore_merges": True} if ignore_merges else {}  # (tokenizers >= 0.19 knows it)
    backend = Backend(models.BPE(vocab, pairs, **options))
    backend.pre_tokenizer = byte_level_pre_tokenizer(split, digits)
    backend.decoder = decoders.ByteLevel()
    added = [
        AddedToken(token, special=token_type == CONTROL, normalized=False)
        for token, token_type in zip(tokens, types, strict=True)
        if token_type in (CONTROL, USER_DEFINED)
    ]
    backend.add_special_tokens([t for t in added if t.special])
    backend.add_tokens([t for t in added if not t.special])

    roles = {}
    for role, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        token_id = fields.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None:
            if not 0 <= token_id < len(tokens):
                raise LMForgeError(f"token id {token_id} is outside the vocabulary", file=file, key=key)
            roles[role] = tokens[token_id]
    add_bos = bool(fields.get("tokenizer.ggml.add_bos_token", False)) and "bos" in roles
    add_eos = bool(fields.get("tokenizer.ggml.add_eos_token", False)) and "eos" in roles
    if add_bos or add_eos:  # what encode(text, add_special_tokens=True) adds, as llama.cpp does
        first = [f"{roles['bos']}"] if add_bos else []
        last = [f"{roles['eos']}"] if add_eos else []
        backend.post_processor = processors.TemplateProcessing(
            single=" ".join([*first, "$A", *last]),
            pair=" ".join([*first, "$A", *last, *first, "$B:1", *last]),
            special_tokens=[(t, vocab[t]) for t in dict.fromkeys(first + last)],
        )
    template = fields.get("tokenizer.chat_template")
    return Tokenizer(backend, roles, chat_template=template if isinstance(template, str) else None)


def byte_level_pre_tokenizer(split: str | None, digits: bool) -> Any:
    """GPT-2's byte-level pre-tokenizer; after single digits are split off when ``digits``; or
    with another split expression in front of a byte mapping that splits no more."""
    if split is not None:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if digits:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    return byte_level


def pre_tokenizer_name(backend: Backend) -> str:
    """The llama.cpp name of a byte-level BPE tokenizer's pre-tokenizer.

    Raises:
        LMForgeError: no llama.cpp pre-tokenizer cuts text the same way.
    """
    state = json.loads(backend.to_str()).get("pre_tokenizer") or {}
    steps = state.get("pretokenizers", [state]) if state.get("type") == "Sequence" else [state]
    kinds = [step.get("type") for step in steps]

    def plain_byte_level(step: dict[str, Any], regex: bool) -> bool:
        return (
            step.get("type") == "ByteLevel"
            and not step.get("add_prefix_space", False)
            and step.get("use_regex", True) == regex
        )

    if len(steps) == 1 and plain_byte_level(steps[0], True):
        return "gpt2"
    if (
        kinds == ["Digits", "ByteLevel"]
        and steps[0].get("individual_digits")
        and plain_byte_level(steps[1], True)
    ):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and plain_byte_level(steps[1], False):
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        behavior = steps[0].get("behavior")
        for name, (split, _, _) in PRE_TOKENIZERS.items():
            if split is not None and pattern == split and behavior == "Isolated":
                return name
    raise LMForgeError(
        f"the tokenizer's pre-tokenizer ({' + '.join(str(k) for k in kinds) or 'none'}) has no llama.cpp "
        "name: llama.cpp would cut text differently (byte-level BPE as in GPT-2 or SmolLM2, Llama 3 and "
        "Qwen2 are supported)",
        key="tokenizer",
    )


def tokenizer_metadata(tokenizer: Tokenizer, vocab_size: int | None = None) -> dict[str, Any]:
    """The ``tokenizer.ggml.*`` (and ``tokenizer.chat_template``) entries describing ``tokenizer``.

    ``add_eos_token`` is always written false: llama.cpp would end every prompt with eos, which a
    causal language model reads as the end of its text. When the model's embedding has more rows
    (``vocab_size``) than the tokenizer has tokens, the list is padded with unused ``[PAD<id>]``
    tokens, as llama.cpp's converter does: llama.cpp wants one token per row.

    Raises:
        LMForgeError: not a byte-level BPE tokenizer, a pre-tokenizer llama.cpp has no name for,
            or ids with gaps.
    """
    backend = tokenizer.backend
    state = json.loads(backend.to_str())
    model = state.get("model") or {}
    byte_level = (state.get("decoder") or {}).get("type") == "ByteLevel"
    if model.get("type") != "BPE" or not byte_level:
        raise LMForgeError(
            f"GGUF files carry byte-level BPE tokenizers (as GPT-2, Llama 3, Qwen2); this one is {tokenizer.kind}"
            + ("" if tokenizer.kind != "bpe" else " without a byte-level decoder"),
            key="tokenizer",
        )
    pre = pre_tokenizer_name(backend)
    by_id = {index: token for token, index in backend.get_vocab(with_added_tokens=True).items()}
    size = len(by_id)
    if sorted(by_id) != list(range(size)):
        raise LMForgeError("the tokenizer's ids are not 0 … N-1 without gaps", key="tokenizer")
    tokens = [by_id[i] for i in range(size)]
    types = [NORMAL] * size
    for token_id in range(size, vocab_size or size):
        tokens.append(f"[PAD{token_id}]")
        types.append(UNUSED)
    for token_id, added in backend.get_added_tokens_decoder().items():
        types[token_id] = CONTROL if added.special else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    def role_id(role: str) -> int | None:
        return getattr(tokenizer, f"{role}_id")

    probe = backend.encode("a", add_special_tokens=True).ids
    bos = role_id("bos")
    out: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.add_bos_token": bos is not None and len(probe) > 1 and probe[0] == bos,
        "tokenizer.ggml.add_eos_token": False,
    }
    for role, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        if role_id(role) is not None:
            out[f"tokenizer.ggml.{key}_token_id"] = role_id(role)
    if tokenizer.chat_template:
        out["tokenizer.chat_template"] = tokenizer.chat_template
    return out
