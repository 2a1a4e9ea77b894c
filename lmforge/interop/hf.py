"""Hugging Face model folders <-> lmforge: the folder-level API.

- :func:`load_hf_model` / :func:`load_hf_tokenizer` read a local folder as ``transformers`` writes
  it (``config.json`` + ``model.safetensors``, shards with ``model.safetensors.index.json``, or
  ``pytorch_model.bin`` read with ``weights_only=True``) into lmforge's own
  :class:`~lmforge.model.Transformer`, plus its tokenizer (``tokenizer.json``, or ``vocab.txt``
  for BERT). No ``transformers`` import: the families in this package map config keys and
  tensor names by hand.
- :func:`save_hf` writes an lmforge model (and tokenizer) back as such a folder, which
  ``transformers``' ``AutoModel*.from_pretrained`` loads with the same outputs.

Loading is strict: an unknown ``model_type`` or architecture, a config value lmforge cannot
honour, a missing, unexpected or misshapen tensor each raise a one-line
:class:`~lmforge.errors.LMForgeError` naming the key or tensor, never a silently different model.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..config import HEADS, ModelConfig
from ..errors import LMForgeError, did_you_mean
from ..files import atomic_write, atomic_write_text
from ..files import save_tokenizer as save_run_tokenizer
from ..model import Transformer
from ..model.layers import RMSNorm
from ..tokenizers import Tokenizer
from .bert import Bert
from .common import Checkpoint, Family, HFConfig, fill_model, model_tensors
from .gpt2 import GPT2
from .llama import Llama
from .t5 import T5
from .vocab import special_token_roles, wordpiece_from_vocab

FAMILIES: tuple[type[Family], ...] = (GPT2, Bert, Llama, T5)
MODEL_TYPES = {model_type: family for family in FAMILIES for model_type in family.model_types}
# Special-token roles of lmforge's Tokenizer and their names in tokenizer_config.json.
TOKEN_ROLES = ("pad", "bos", "eos", "mask", "cls", "sep", "unk")


def is_hf_folder(path: str | Path) -> bool:
    """A folder with a ``config.json`` and no lmforge ``config.yaml``."""
    path = Path(path)
    return (path / "config.json").is_file() and not (path / "config.yaml").is_file()


def family_for(model_type: str, *, file: Path | None = None) -> Family:
    """The family instance that reads ``model_type`` (one-line error naming it otherwise)."""
    if model_type not in MODEL_TYPES:
        raise LMForgeError(
            f"model_type {model_type!r} is not supported (supported: {', '.join(MODEL_TYPES)})"
            + did_you_mean(model_type, MODEL_TYPES),
            file=file,
            key="model_type",
        )
    return MODEL_TYPES[model_type](model_type)


# ---- loading -----------------------------------------------------------------------------------


def load_hf_model(
    path: str | Path,
    *,
    head: str | None = None,
    num_labels: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Transformer:
    """An lmforge :class:`Transformer` holding the weights of a local Hugging Face model folder.

    Args:
        path: the folder (config.json + weights).
        head: lmforge head to build instead of the checkpoint's own (from ``architectures``:
            ``*LMHeadModel``/``*ForCausalLM``/``T5ForConditionalGeneration`` → "lm",
            ``BertForMaskedLM`` → "mlm", ``*Model`` → "none", ``*ForSequenceClassification`` →
            "classification", ...). A head the checkpoint lacks starts freshly initialized (as
            for fine-tuning a pretrained backbone); the checkpoint's own head is then left out.
        num_labels: classes of a classification head (default: from ``id2label``).
        device: where to build the model (default: CPU).
        dtype: parameter dtype (default: float32, whatever the checkpoint's dtype).

    Returns:
        the model, in eval mode.

    Raises:
        LMForgeError: unsupported model type, architecture or config value; missing,
            unexpected or misshapen tensors — one line naming the key or tensor.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise LMForgeError("not a folder", file=folder)
    hf = HFConfig.read(folder / "config.json")
    model_type = hf.get("model_type", kind=str)
    if model_type is None:
        raise hf.error("model_type", "missing: cannot tell which model family this is")
    family = family_for(model_type, file=hf.file)
    native_head = checkpoint_head(hf, family)
    chosen = head or native_head
    if chosen not in HEADS:
        raise LMForgeError(f"unknown head {chosen!r} (one of {', '.join(HEADS)})", key="head")
    labels = hf.get("id2label", {}, kind=dict)
    num_labels = num_labels or len(labels) or hf.get("num_labels", 2, kind=int)

    checkpoint = Checkpoint(folder)
    checkpoint.canonicalize(family.canonical)
    tie = decide_tie(hf, family, checkpoint)
    config = family.read(hf, head=chosen, tie=tie, num_labels=num_labels)
    hf.check_generic()
    hf.finish(family.model_type)

    ignored = list(family.ignored) + list(head_ignored(family, config))
    if tie and family.lm_head_key and family.lm_head_key in checkpoint:
        ignored.append(exact(family.lm_head_key))  # the duplicate of a tied embedding
    overridden = chosen != native_head
    if overridden:  # the checkpoint's own head tensors are deliberately left out
        native = family.read(hf, head=native_head, tie=tie, num_labels=num_labels)
        kept = {rule.hf for rule in family.rules(config)}
        ignored += [exact(r.hf) for r in family.head_rules(native) if r.hf not in kept and not r.zero]

    backbone = {rule.hf for rule in family.backbone_rules(config)}
    prefixed = family.base_prefix and any(
        checkpoint.raw_name(key) != key and key in backbone for key in checkpoint
    )

    def display(name: str) -> str:  # a missing tensor under the name the file would use
        return family.base_prefix + name if prefixed and name in backbone else name

    model = empty_model(config, device=torch.device(device or "cpu"))
    fresh = fill_model(
        model,
        family.rules(config),
        checkpoint,
        ignored=ignored,
        optional=(lambda name: name.startswith("head.")) if overridden else (lambda name: False),
        display=display,
    )
    initialize(model, fresh)
    return model.to(dtype=dtype or torch.float32).eval()


def initialize(model: Transformer, names: list[str]) -> None:
    """Give the parameters a new head starts with their initial values (lmforge's own
    initialization: N(0, init_std) weights, zero biases, unit norm scales)."""
    std = model.config.init_std
    with torch.no_grad():
        for name in names:
            owner, _, attr = name.rpartition(".")
            module = model.get_submodule(owner)
            param = getattr(module, attr)
            if attr == "bias":
                param.zero_()
            elif isinstance(module, torch.nn.LayerNorm | RMSNorm):
                param.fill_(1.0)
            else:
                param.normal_(0.0, std)


def empty_model(config: ModelConfig, *, device: torch.device) -> Transformer:
    """The model with uninitialized parameters, which the checkpoint then fills: no time spent
    drawing random weights (seconds for a billion parameters) that would be overwritten.

    Built on the meta device, then given real memory. The computed buffers (RoPE frequencies,
    sinusoid tables, ALiBi slopes) depend on neither depth nor vocabulary, so they are taken
    from a one-layer twin built normally; should a buffer have no twin, the model is built the
    ordinary way instead. Tied weights are tied again (memory allocation unties them).
    """
    with torch.device("meta"):
        model = Transformer(config)
    model.to_empty(device=device)
    twin_config = config.replace(
        num_layers=1,
        num_decoder_layers=1 if config.arch == "encoder_decoder" else None,
        vocab_size=config.pad_token_id + 1,
        head="none",
    )
    with torch.device(device):
        twin_buffers = dict(Transformer(twin_config).named_buffers())
    buffers = dict(model.named_buffers())
    if any(name not in twin_buffers or twin_buffers[name].shape != b.shape for name, b in buffers.items()):
        with torch.device(device):
            return Transformer(config)
    with torch.no_grad():
        for name, buffer in buffers.items():
            buffer.copy_(twin_buffers[name])
    proj = getattr(model.head, "proj", None)
    if config.tie_embeddings and proj is not None:
        proj.weight = model.tok_embed.weight
    return model


def checkpoint_head(hf: HFConfig, family: Family) -> str:
    """The lmforge head of the checkpoint's class (``architectures`` in config.json)."""
    architectures = hf.get("architectures", [], kind=list)
    if not architectures:
        base = [cls for cls, head in family.architectures.items() if head == "none"]
        return family.architectures[base[0]] if base else "none"
    name = str(architectures[0])
    if name not in family.architectures:
        raise hf.error(
            "architectures",
            f"architecture {name!r} is not supported (supported: {', '.join(family.architectures)})",
        )
    return family.architectures[name]


def decide_tie(hf: HFConfig, family: Family, checkpoint: Checkpoint) -> bool:
    """Whether the head reuses the embedding matrix, as transformers decides it: the config's
    ``tie_word_embeddings``, unless the checkpoint holds a head matrix that differs."""
    wants = family.wants_tie(hf)
    head_key, embed_key = family.lm_head_key, family.embedding_key
    if wants and head_key and head_key in checkpoint and embed_key in checkpoint:
        return torch.equal(checkpoint.get(head_key), checkpoint.get(embed_key))
    return wants


def head_ignored(family: Family, config: Any) -> tuple[str, ...]:
    """Tensors a head model carries that the chosen lmforge head does not use (BERT's pooler
    outside sequence classification: lmforge keeps it only inside that head)."""
    if isinstance(family, Bert) and (config.head != "classification" or family.roberta):
        return (r"^pooler\.dense\.(weight|bias)$",)
    return ()


def exact(name: str) -> str:
    return "^" + re.escape(name) + "$"


def load_hf_tokenizer(path: str | Path) -> Tokenizer | None:
    """The folder's tokenizer: ``tokenizer.json`` as is, or a WordPiece tokenizer built from a
    BERT ``vocab.txt``; special-token roles from ``tokenizer_config.json`` /
    ``special_tokens_map.json``. None when the folder has neither file."""
    folder = Path(path)
    if (folder / "tokenizer.json").is_file():  # roles: Tokenizer.from_file reads the companion files
        tokenizer = Tokenizer.from_file(folder / "tokenizer.json")
        # A fixed padding/truncation saved in the file is a batching choice, not part of the
        # vocabulary; transformers switches it off too (lmforge's collators pad batches).
        tokenizer.backend.no_padding()
        tokenizer.backend.no_truncation()
        return tokenizer
    if (folder / "vocab.txt").is_file():
        backend, roles = wordpiece_from_vocab(folder, special_token_roles(folder))
        return Tokenizer(backend, special_tokens=roles)
    return None


# ---- saving ------------------------------------------------------------------------------------


def export_family(config: Any, model_type: str | None = None) -> Family:
    """The family (and model_type) to export ``config`` as."""
    if model_type is not None:
        family = family_for(model_type)
        if not family.matches(config):
            raise LMForgeError(
                f"cannot export as {model_type}: arch={config.arch}, position={config.position}, "
                f"norm={config.norm} is not a {model_type} model",
                key="model_type",
            )
        return family
    for cls in FAMILIES:
        if cls.matches(config):
            return cls(cls.model_type_for(config))
    raise LMForgeError(
        f"no Hugging Face family has arch={config.arch}, position={config.position}, norm={config.norm} "
        "(gpt2: decoder/learned/layernorm, llama: decoder/rope/rmsnorm, bert: encoder/learned/layernorm, "
        "t5: encoder_decoder/relative/rmsnorm)",
        key="arch",
    )


def save_hf(
    model: Transformer,
    tokenizer: Tokenizer | None,
    out_dir: str | Path,
    *,
    model_type: str | None = None,
    dtype: torch.dtype | None = None,
    labels: list[str] | None = None,
) -> Path:
    """Write ``model`` (and ``tokenizer``) as a Hugging Face folder: config.json,
    model.safetensors, tokenizer.json + tokenizer_config.json + special_tokens_map.json.

    Args:
        model: an lmforge model whose shape one of the families covers (GPT-2, BERT/RoBERTa,
            Llama/Qwen2/Mistral, T5/mT5).
        tokenizer: written alongside when given.
        out_dir: created if needed; files in it are replaced atomically.
        model_type: force a model type of the matching family (e.g. "roberta", "mistral");
            default: gpt2, bert, llama or qwen2 (q/k/v biases only), t5.
        dtype: tensor dtype in the file (default: the model's).
        labels: class names of a classification head (``id2label``).

    Returns:
        the folder.
    """
    config = model.config
    family = export_family(config, model_type)
    hf_config: dict[str, Any] = {"architectures": [family.architecture(config)], **family.write(config)}
    if config.head in ("classification", "token_classification"):
        names = labels or [f"LABEL_{i}" for i in range(config.num_labels)]
        if len(names) != config.num_labels:
            raise LMForgeError(
                f"{len(names)} labels for a head with {config.num_labels} classes", key="labels"
            )
        hf_config["id2label"] = {str(i): name for i, name in enumerate(names)}
        hf_config["label2id"] = {name: i for i, name in enumerate(names)}
    if tokenizer is not None:
        for role in ("bos", "eos"):
            token_id = getattr(tokenizer, f"{role}_id", None)
            if token_id is not None:
                hf_config[f"{role}_token_id"] = token_id
    tensors = model_tensors(model, family.rules(config), name=family.model_type)
    family.extra_tensors(config, tensors)
    base = config.head == "none"  # *Model classes hold the backbone without a prefix
    backbone = {rule.hf for rule in family.backbone_rules(config)}
    prefix = "" if base else family.base_prefix
    out_dtype = dtype or next(model.parameters()).dtype
    state = {
        (prefix + k if k in backbone else k): t.to("cpu", out_dtype).contiguous() for k, t in tensors.items()
    }
    hf_config["torch_dtype"] = str(out_dtype).removeprefix("torch.")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)


    atomic_write(out / "model.safetensors", lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    write_json(out / "config.json", hf_config)
    if tokenizer is not None:
        save_tokenizer(tokenizer, out)
    return out


def save_tokenizer(tokenizer: Tokenizer, out: Path) -> None:
    """tokenizer.json + tokenizer_config.json (the run directory's files, which transformers
    reads as a ``PreTrainedTokenizerFast``) and special_tokens_map.json."""
    save_run_tokenizer(tokenizer, out)
    roles = {
        f"{role}_token": token for role, token in tokenizer.special_tokens.items() if role in TOKEN_ROLES
    }
    write_json(out / "special_tokens_map.json", roles)


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
