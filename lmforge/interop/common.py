"""The machinery shared by every Hugging Face family: reading ``config.json`` strictly, reading
checkpoint tensors safely, and moving tensors between lmforge's parameters and Hugging Face's
names through a table of :class:`Rule` s.

A family (GPT-2, BERT, Llama, T5) is described by data: which ``config.json`` keys it reads,
and one rule per tensor saying which lmforge parameter(s) it fills and how (as is, transposed,
split, sliced). The same rules run in both directions, so loading and exporting cannot drift
apart. Reference for the Hugging Face side: the checkpoints ``transformers`` writes with
``save_pretrained`` (safetensors, sharded with ``model.safetensors.index.json``, or
``pytorch_model.bin``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..config import ModelConfig
from ..errors import ConfigError, LMForgeError, did_you_mean

# Keys of any config.json that do not change what a model computes at inference: bookkeeping,
# generation defaults, token ids, training-time knobs. Everything else must be read by a family
# (or it is reported as unsupported).
BENIGN_KEYS = frozenset(
    """
    _name_or_path _commit_hash _attn_implementation _attn_implementation_autoset attn_implementation
    architectures model_type transformers_version torch_dtype dtype use_cache use_bfloat16 torchscript
    return_dict output_hidden_states output_attentions output_scores return_dict_in_generate
    gradient_checkpointing initializer_range initializer_factor tf_legacy_loss bos_token_id eos_token_id
    pad_token_id sep_token_id cls_token_id unk_token_id mask_token_id decoder_start_token_id
    forced_bos_token_id forced_eos_token_id id2label label2id num_labels problem_type finetuning_task
    task_specific_params tokenizer_class prefix max_length min_length do_sample early_stopping num_beams
    num_beam_groups diversity_penalty temperature top_k top_p typical_p repetition_penalty
    length_penalty no_repeat_ngram_size encoder_no_repeat_ngram_size bad_words_ids num_return_sequences
    remove_invalid_values exponential_decay_length_penalty suppress_tokens begin_suppress_tokens
    chunk_size_feed_forward cross_attention_hidden_size classifier_dropout is_encoder_decoder
    """.split()  # noqa: SIM905 (a word list reads better as text)
)

# HF activation name -> lmforge activation (see transformers.activations.ACT2FN).
ACTIVATIONS_FROM_HF = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}


class HFConfig:
    """A ``config.json`` read key by key, so that any key no family reads is reported.

    A value of ``null`` in the file counts as absent (Hugging Face writes ``"n_inner": null`` for
    "use the default"). Every getter checks the type and names the key when it is wrong.
    """

    def __init__(self, data: dict[str, Any], *, file: Path) -> None:
        self.data = data
        self.file = file
        self.used: set[str] = set()

    @classmethod
    def read(cls, path: Path) -> HFConfig:
        """Parse ``path`` (a config.json); a missing or invalid file is a one-line error."""
        if not path.is_file():
            raise LMForgeError("no config.json: not a Hugging Face model folder", file=path.parent)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            line = getattr(err, "lineno", None)
            raise LMForgeError(f"invalid JSON: {err}".split(": line")[0], file=path, line=line) from None
        if not isinstance(data, dict):
            raise LMForgeError("config.json must hold a JSON object", file=path)
        return cls(data, file=path)

    def error(self, key: str, message: str) -> LMForgeError:
        return LMForgeError(message, file=self.file, key=key)

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def get(self, key: str, default: Any = None, *, kind: type | tuple[type, ...] | None = None) -> Any:
        """The value of ``key`` (``default`` when absent or null), type-checked against ``kind``."""
        self.used.add(key)
        value = self.data.get(key)
        if value is None:
            return default
        if kind is not None:
            kinds = kind if isinstance(kind, tuple) else (kind,)
            ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
            if float in kinds and isinstance(value, int) and not isinstance(value, bool):
                ok = True
            if not ok:
                names = " or ".join(k.__name__ for k in kinds)
                raise self.error(key, f"expected {names}, got {value!r}")
        return value

    def int(self, key: str, default: int | None = None) -> int:
        value = self.get(key, default, kind=int)
        if value is None:
            raise self.error(key, "missing (lmforge needs it to build the model)")
        return value

    def float(self, key: str, default: float | None = None) -> float:
        value = self.get(key, default, kind=float)
        if value is None:
            raise self.error(key, "missing (lmforge needs it to build the model)")
        return float(value)

    def bool(self, key: str, default: bool) -> bool:
        return self.get(key, default, kind=bool)

    def expect(self, key: str, allowed: Sequence[Any], default: Any = None) -> Any:
        """The value of ``key``, which must be one of ``allowed`` (what lmforge implements)."""
        value = self.get(key, default)
        if value not in allowed:
            shown = ", ".join(repr(a) for a in allowed)
            raise self.error(key, f"{value!r} is not supported by lmforge (supported: {shown})")
        return value

    def activation(self, key: str, default: str) -> str:
        name = self.get(key, default, kind=str)
        if name not in ACTIVATIONS_FROM_HF:
            raise self.error(
                key,
                f"activation {name!r} is not supported by lmforge (supported: {', '.join(ACTIVATIONS_FROM_HF)})"
                + did_you_mean(name, ACTIVATIONS_FROM_HF),
            )
        return ACTIVATIONS_FROM_HF[name]

    def check_generic(self) -> None:
        """Generic PretrainedConfig switches that would change the model if set."""
        self.expect("add_cross_attention", [False], False)
        self.expect("tie_encoder_decoder", [False], False)
        pruned = self.get("pruned_heads", {}, kind=dict)
        if pruned:
            raise self.error("pruned_heads", "pruned attention heads are not supported by lmforge")

    def finish(self, family: str) -> None:
        """Raise on the first key that no reader used and that is not known to be harmless."""
        for key, value in self.data.items():
            if key not in self.used and key not in BENIGN_KEYS:
                raise self.error(
                    key, f"unsupported {family} setting {key} = {value!r}: lmforge cannot honour it"
                )


# ---- checkpoint files ----------------------------------------------------------------------------

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


class Checkpoint:
    """The tensors of a Hugging Face model folder, read lazily by name.

    Looks for, in order: ``model.safetensors``, ``model.safetensors.index.json`` (shards),
    ``pytorch_model.bin`` (loaded with ``torch.load(weights_only=True)``: never unpickles code),
    ``pytorch_model.bin.index.json``.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._files: dict[str, Path] = {}  # tensor name -> file holding it
        self._open: dict[Path, Any] = {}  # file -> safetensors handle or loaded dict
        present = [name for name in WEIGHT_FILES if (folder / name).is_file()]
        if not present:
            raise LMForgeError(f"no weights found (expected one of {', '.join(WEIGHT_FILES)})", file=folder)
        name = present[0]
        if name.endswith(".index.json"):
            index_path = folder / name
            try:
                weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise LMForgeError(f"invalid shard index ({err})", file=index_path) from None
            for key, shard in weight_map.items():
                path = folder / shard
                if not path.is_file():
                    raise LMForgeError(
                        f"shard {shard!r} named in the index is missing", file=index_path, key=key
                    )
                self._files[key] = path
        else:
            path = folder / name
            for key in self._handle(path).keys():  # noqa: SIM118 (safetensors handles are not dicts)
                self._files[key] = path
        self.renames: dict[str, str] = {}  # canonical name -> name in the file

    def _handle(self, path: Path) -> Any:
        if path not in self._open:
            if path.suffix == ".safetensors":

                try:
                    self._open[path] = safe_open(str(path), framework="pt")
                except (SafetensorError, OSError) as err:
                    raise LMForgeError(f"not a readable safetensors file ({err})", file=path) from None
            else:
                state = None
                for mmap in (True, False):  # files in the legacy (pre-zip) format cannot be mapped
                    try:
                        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
                        break
                    except Exception as err:  # noqa: BLE001 (pickle refusals come in many types)
                        text = str(err).strip()
                        first = text.splitlines()[0] if text else type(err).__name__
                if state is None:
                    raise LMForgeError(f"cannot read as a weights-only PyTorch file ({first})", file=path)
                if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
                    raise LMForgeError("expected a flat mapping of tensor names to tensors", file=path)
                self._open[path] = state
        return self._open[path]

    def canonicalize(self, rename: Callable[[str], str]) -> None:
        """Give every tensor a canonical name (e.g. strip a head model's backbone prefix)."""
        files: dict[str, Path] = {}
        for raw, path in self._files.items():
            key = rename(raw)
            if key in files:
                raise LMForgeError(f"tensors {self.renames.get(key, key)!r} and {raw!r} clash", key=raw)
            files[key] = path
            self.renames[key] = raw
        self._files = files

    def keys(self) -> list[str]:
        return list(self._files)

    def __contains__(self, key: str) -> bool:
        return key in self._files

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def raw_name(self, key: str) -> str:
        return self.renames.get(key, key)

    def shape(self, key: str) -> tuple[int, ...]:
        path = self._files[key]
        handle = self._handle(path)
        if isinstance(handle, dict):
            return tuple(handle[self.raw_name(key)].shape)
        return tuple(handle.get_slice(self.raw_name(key)).get_shape())

    def get(self, key: str) -> Tensor:
        path = self._files[key]
        handle = self._handle(path)
        raw = self.raw_name(key)
        return handle[raw] if isinstance(handle, dict) else handle.get_tensor(raw)


# ---- rules: lmforge parameters <-> Hugging Face tensors --------------------------------------------


def _identity_to_lm(tensor: Tensor) -> tuple[Tensor, ...]:
    return (tensor,)


def _identity_to_hf(tensors: Sequence[Tensor]) -> Tensor:
    return tensors[0]


@dataclass(frozen=True)
class Rule:
    """One Hugging Face tensor and the lmforge parameter(s) it becomes.

    hf: canonical tensor name (the backbone prefix of head models stripped, see ``Family``).
    lm: lmforge parameter names it fills (several when Hugging Face fuses them, e.g. GPT-2 c_attn).
    to_lm / to_hf: the conversions (default: as is); to_hf(to_lm(t)) == t.
    aliases: other names that hold the same tensor in some checkpoints (read if hf is absent,
        ignored as duplicates otherwise).
    zero: no Hugging Face tensor: the lmforge parameter is zero on load and must be zero to export
        (e.g. the classifier bias of a head that Hugging Face builds without one).
    """

    hf: str
    lm: tuple[str, ...]
    to_lm: Callable[[Tensor], tuple[Tensor, ...]] = _identity_to_lm
    to_hf: Callable[[Sequence[Tensor]], Tensor] = _identity_to_hf
    aliases: tuple[str, ...] = ()
    zero: bool = False

    @property
    def as_is(self) -> bool:
        """One lmforge parameter stored unchanged under one Hugging Face name (not fused,
        transposed or left out): what a per-tensor export such as PEFT's can name directly."""
        return len(self.lm) == 1 and self.to_lm is _identity_to_lm and not self.zero


def same(hf: str, lm: str, *, aliases: Iterable[str] = ()) -> Rule:
    """A tensor with the same layout on both sides."""
    return Rule(hf, (lm,), aliases=tuple(aliases))


def transposed(hf: str, lm: str) -> Rule:
    """GPT-2's Conv1D stores (in, out); nn.Linear stores (out, in)."""
    return Rule(hf, (lm,), to_lm=lambda t: (t.t(),), to_hf=lambda ts: ts[0].t())


def fused(hf: str, lm: Sequence[str], *, transpose: bool = False) -> Rule:
    """One tensor holding several parameters stacked along the output dimension (GPT-2's c_attn:
    q, k and v projections side by side, in Conv1D layout when ``transpose``)."""
    count = len(lm)

    def to_lm(t: Tensor) -> tuple[Tensor, ...]:
        t = t.t() if transpose and t.dim() == 2 else t
        return tuple(t.chunk(count, dim=0))

    def to_hf(ts: Sequence[Tensor]) -> Tensor:
        t = torch.cat(list(ts), dim=0)
        return t.t() if transpose and t.dim() == 2 else t

    return Rule(hf, tuple(lm), to_lm=to_lm, to_hf=to_hf)


def offset_rows(hf: str, lm: str, offset: int) -> Rule:
    """A position table whose first ``offset`` rows are never used by real tokens (RoBERTa)."""
    return Rule(
        hf,
        (lm,),
        to_lm=lambda t: (t[offset:],),
        to_hf=lambda ts: torch.cat((ts[0].new_zeros(offset, ts[0].shape[1]), ts[0])),
    )


def zero(lm: str, why: str) -> Rule:
    """An lmforge parameter with no Hugging Face counterpart that must stay zero (``why`` names it)."""
    return Rule(why, (lm,), zero=True)


def expected_hf_shape(rule: Rule, params: Sequence[Tensor]) -> tuple[int, ...]:
    """The shape the Hugging Face tensor must have to fill ``params`` (computed on the meta device)."""
    return tuple(rule.to_hf([torch.empty(p.shape, device="meta") for p in params]).shape)


def fill_model(
    model: nn.Module,
    rules: Sequence[Rule],
    checkpoint: Checkpoint,
    *,
    ignored: Sequence[str] = (),
    optional: Callable[[str], bool] = lambda name: False,
    display: Callable[[str], str] = lambda key: key,
) -> list[str]:
    """Copy the checkpoint's tensors into ``model``'s parameters through ``rules``, strictly.

    Every parameter must be filled by a rule (or be ``optional``: a new head keeps its fresh
    initialization), every tensor of the checkpoint must be used, a duplicate (alias), or match
    one of the ``ignored`` regular expressions, and shapes must agree. ``display`` gives the
    name a missing tensor would have in the file (for the error message).

    Returns:
        the names of the lmforge parameters left at their initialization (optional ones absent
        from the checkpoint).
    """
    params = dict(model.named_parameters())
    used: set[str] = set()
    filled: set[str] = set()
    fresh: list[str] = []
    # A bar on a terminal for big checkpoints (disable=None: off when stderr is not a terminal).
    bar = tqdm(
        rules, desc="loading weights", unit="tensor", leave=False, disable=None if len(rules) > 200 else True
    )
    with torch.no_grad():
        for rule in bar:
            targets = [params[name] for name in rule.lm]
            if rule.zero:
                for target in targets:
                    target.zero_()
                filled.update(rule.lm)
                continue
            present = [key for key in (rule.hf, *rule.aliases) if key in checkpoint]
            if not present:
                if all(optional(name) for name in rule.lm):
                    fresh.extend(rule.lm)
                    filled.update(rule.lm)
                    continue
                raise LMForgeError(
                    f"missing tensor '{display(rule.hf)}' in the checkpoint", file=checkpoint.folder
                )
            key = present[0]
            used.update(present)
            want = expected_hf_shape(rule, targets)
            have = checkpoint.shape(key)
            if have != want:
                raise LMForgeError(
                    f"tensor '{checkpoint.raw_name(key)}' has shape {list(have)} but config.json implies {list(want)}",
                    file=checkpoint.folder,
                )
            pieces = rule.to_lm(checkpoint.get(key))
            for target, piece in zip(targets, pieces, strict=True):
                if adoptable(piece, target):
                    target.data = piece  # the file's tensor itself (memory-mapped, copy-on-write)
                else:
                    target.copy_(piece.to(target.dtype))
            filled.update(rule.lm)

    patterns = [re.compile(p) for p in ignored]
    for key in checkpoint:
        if key not in used and not any(p.search(key) for p in patterns):
            raise LMForgeError(
                f"unexpected tensor '{checkpoint.raw_name(key)}' in the checkpoint: lmforge has no place for it",
                file=checkpoint.folder,
            )
    unfilled = [name for name in params if name not in filled]
    if unfilled:
        raise LMForgeError(f"no checkpoint tensor fills lmforge parameter '{unfilled[0]}'", key=unfilled[0])
    return fresh


def adoptable(piece: Tensor, target: Tensor) -> bool:
    """Whether a checkpoint tensor can become the parameter's data without a copy: same dtype,
    device and shape, and sole owner of its memory (a slice of a fused tensor is copied, so that
    no two parameters share storage)."""
    return (
        piece.dtype == target.dtype
        and piece.device == target.device
        and piece.shape == target.shape
        and piece.is_contiguous()
        and piece.storage_offset() == 0
        and piece.untyped_storage().nbytes() == piece.numel() * piece.element_size()
    )


def model_tensors(model: nn.Module, rules: Sequence[Rule], *, name: str) -> dict[str, Tensor]:
    """Hugging Face tensors (canonical names) from ``model``'s parameters: ``fill_model`` reversed.

    Raises:
        LMForgeError: a ``zero`` parameter is not zero (the Hugging Face model has no place for it).
    """
    params = dict(model.named_parameters())
    state = dict(model.state_dict(keep_vars=True))
    out: dict[str, Tensor] = {}
    covered: set[str] = set()
    with torch.no_grad():
        for rule in rules:
            tensors = [state[n] if n in state else params[n] for n in rule.lm]
            covered.update(rule.lm)
            if rule.zero:
                if any(bool(t.detach().any()) for t in tensors):
                    raise LMForgeError(
                        f"cannot export as {name}: parameter '{rule.lm[0]}' is not zero but {rule.hf}",
                        key=rule.lm[0],
                    )
                continue
            out[rule.hf] = rule.to_hf([t.detach() for t in tensors]).contiguous()
    missing = [n for n in params if n not in covered]
    if missing:
        raise LMForgeError(f"cannot export as {name}: no place for parameter '{missing[0]}'", key=missing[0])
    return out


def check_config(config: ModelConfig, field: str, allowed: Sequence[Any], family: str) -> None:
    """Export guard: ``config.field`` must be one of ``allowed`` for ``family``."""
    value = getattr(config, field)
    if value not in allowed:
        shown = ", ".join(repr(a) for a in allowed)
        raise LMForgeError(
            f"cannot export as {family}: {field} = {value!r} has no Hugging Face equivalent (needs {shown})",
            key=field,
        )


# ---- a family of Hugging Face models -------------------------------------------------------------


class Family:
    """How one Hugging Face model family maps onto lmforge: config keys, tensor names, heads.

    An instance serves one ``model_type`` of the family (e.g. ``Bert("roberta")``). Subclasses
    fill the class attributes and the methods that raise ``NotImplementedError``. Tensor names in
    rules are canonical: a head model's backbone prefix (``transformer.`` of
    ``GPT2LMHeadModel``) is stripped on load and put back on export.
    """

    name: str = ""
    model_types: tuple[str, ...] = ()
    base_prefix: str = ""  # backbone prefix inside head models, e.g. "transformer."
    # Hugging Face class name -> lmforge head; for export, the first class of each head is written.
    architectures: dict[str, str] = {}
    ignored: tuple[str, ...] = ()  # regexes of tensors never used (buffers such as masks)
    embedding_key: str = ""  # canonical name of the token embedding
    lm_head_key: str | None = "lm_head.weight"  # the output matrix that may be tied to it
    tie_default: bool = True  # tie_word_embeddings when config.json does not say
    # lmforge field -> config.json key, to name the file's key when ModelConfig rejects a value
    field_keys: dict[str, str] = {}

    def __init__(self, model_type: str | None = None) -> None:
        self.model_type = model_type or self.model_types[0]

    def canonical(self, key: str) -> str:
        """The canonical name of a checkpoint tensor (backbone prefix stripped)."""
        if self.base_prefix and key.startswith(self.base_prefix):
            return key[len(self.base_prefix) :]
        return key

    def read(self, hf: HFConfig, *, head: str, tie: bool, num_labels: int) -> ModelConfig:
        """ModelConfig from config.json (every key read, unsupported values rejected)."""
        raise NotImplementedError

    def backbone_rules(self, config: ModelConfig) -> list[Rule]:
        raise NotImplementedError

    def head_rules(self, config: ModelConfig) -> list[Rule]:
        raise NotImplementedError

    @classmethod
    def matches(cls, config: ModelConfig) -> bool:
        """Whether this family is the one to export ``config`` as (its distinctive fields)."""
        raise NotImplementedError

    @classmethod
    def model_type_for(cls, config: ModelConfig) -> str:
        """The ``model_type`` to export ``config`` as when none is asked for."""
        return cls.model_types[0]

    def write(self, config: ModelConfig) -> dict[str, Any]:
        """config.json entries for ``config`` (raises when a field has no equivalent)."""
        raise NotImplementedError

    def architecture(self, config: ModelConfig) -> str:
        """The Hugging Face class to export ``config`` as (the first one listed with its head)."""
        for cls, head in self.architectures.items():
            if head == config.head and cls.lower().startswith(self.model_type.replace("_", "")):
                return cls
        raise LMForgeError(
            f"cannot export as {self.model_type}: Hugging Face has no {self.model_type} class "
            f"with a {config.head!r} head",
            key="head",
        )

    def rules(self, config: ModelConfig) -> list[Rule]:
        return self.backbone_rules(config) + self.head_rules(config)

    def wants_tie(self, hf: HFConfig) -> bool:
        """What config.json says about tying the head to the embedding."""
        return hf.bool("tie_word_embeddings", self.tie_default)

    def extra_tensors(self, config: ModelConfig, tensors: dict[str, Tensor]) -> None:
        """Add tensors a Hugging Face folder needs beyond the rules' (export only)."""

    def build(self, hf: HFConfig, fields: dict[str, Any]) -> ModelConfig:
        """ModelConfig(**fields), with a rejected value reported under its config.json key."""

        try:
            return ModelConfig(**fields)
        except ConfigError as err:
            key = self.field_keys.get(err.key or "", err.key)
            raise LMForgeError(f"{err.message} (as lmforge's {err.key})", file=hf.file, key=key) from None


def linear(hf: str, lm: str, *, bias: bool) -> list[Rule]:
    """weight (and bias) of a linear layer with the same layout on both sides."""
    rules = [same(hf + ".weight", lm + ".weight")]
    if bias:
        rules.append(same(hf + ".bias", lm + ".bias"))
    return rules


def layer_norm(hf: str, lm: str, *, bias: bool = True) -> list[Rule]:
    """A LayerNorm (weight, bias) or RMSNorm (weight only)."""
    return linear(hf, lm, bias=bias)
