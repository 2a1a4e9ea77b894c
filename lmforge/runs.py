"""Run directories: a trained model saved as a self-describing folder, and ``lmforge.load``.

A run directory (PRODUCT.md) holds everything needed to use or resume a run::

    config.yaml         the whole resolved config (model, tokenizer, data, train sections)
    tokenizer.json      the tokenizer, a Hugging Face ``tokenizers`` file
    model.safetensors   the weights (a tied tensor stored once, re-tied on load)
    adapter.safetensors, adapter_config.json   instead of model.safetensors for a PEFT run:
                        the adapter (and task head) only; config.yaml's ``base_model`` names
                        the base model's folder, loaded first
    trainer_state.json  step, RNG states, data position, schedule (written by the training loop)
    metrics.jsonl       one JSON line per logged step / evaluation
    checkpoints/        resumable checkpoints (weights + optimizer + trainer state) of the loop

Every file is written atomically: into a temporary file in the same folder, flushed to disk
(fsync), then renamed over the old one, so a crash leaves either the old or the new file, never a
torn one. No pickle is ever loaded: weights are safetensors, YAML is read with the safe loader.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import ModelConfig
from .errors import LMForgeError
from .files import (
    ADAPTER_CONFIG_FILE,
    BASE_MODEL_KEY,
    CONFIG_FILE,
    HEAD_FILE,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    check_output,
    load_weights,
    read_weights,
    replace_folder,
    save_weights,
    write_run_metadata,
)
from .interop.gguf import is_gguf, load_gguf
from .interop.hf import load_hf_model, load_hf_tokenizer
from .model import Transformer
from .peft import load_adapter
from .settings import dataclass_from_dict, load_yaml
from .tokenizers import Tokenizer
from .training import distributed
from .training.checkpoint import latest_checkpoint

# ---- run directories ---------------------------------------------------------------------------


@dataclass
class LoadedRun:
    """What :func:`load` returns: the model (eval mode), its tokenizer, the run's config, the path."""

    model: Transformer
    tokenizer: Tokenizer | None
    config: dict[str, Any] = field(default_factory=dict)  # the whole resolved config ({} for HF folders)
    path: Path = Path(".")


def _write_run_files(
    folder: Path, model: Transformer, tokenizer: Tokenizer | None, config: dict[str, Any]
) -> None:
    write_run_metadata(folder, model=model, tokenizer=tokenizer, config=config)
    save_weights(model, folder / WEIGHTS_FILE)


def save_run(
    path: str | Path,
    *,
    model: Transformer,
    tokenizer: Tokenizer | None = None,
    config: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a run directory that :func:`load` (and ``lmforge generate --model``) can use.

    Args:
        path: the folder: new or empty. It is built under a temporary name beside it and renamed
            into place, so it is whole or absent, never half written.
        model: the trained model; its config becomes the ``model`` section of config.yaml.
        tokenizer: written as tokenizer.json (its size and special tokens go into config.yaml).
        config: the rest of the resolved config (tokenizer, data, train sections, ...).
        overwrite: replace an occupied folder as a whole (else: a one-line error, nothing touched).

    Returns:
        The path of the run directory.
    """
    path = Path(path)
    check_output(path, overwrite=overwrite)
    resolved = dict(config or {})
    return replace_folder(path, lambda tmp: _write_run_files(tmp, model, tokenizer, resolved))


def model_config_of(config: dict[str, Any], *, file: Path, lines: dict[str, int]) -> ModelConfig:
    """The ``model`` section of a run's config.yaml as a ModelConfig (errors name file:line:key)."""
    section = config.get("model")
    if not isinstance(section, dict):
        raise LMForgeError("config.yaml has no 'model' section", file=file, line=lines.get("model"))
    section = {k: v for k, v in section.items() if k != "preset"}
    return dataclass_from_dict(ModelConfig, section, file=file, lines=lines, prefix="model.")


def load(
    path: str | Path, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> LoadedRun:
    """Load a run directory (or a Hugging Face folder: config.json + safetensors; or a GGUF file) for use.

    Args:
        path: a folder written by :func:`save_run` or by ``lmforge pretrain``; a folder with a
            ``config.json`` and no ``config.yaml`` is read as a Hugging Face checkpoint; a
            ``.gguf`` file (or a folder holding one) as llama.cpp's format (``lmforge.interop.gguf``).
        device: where to put the model (default: CPU).
        dtype: cast floating-point weights to this dtype (default: as saved).

    Returns:
        A :class:`LoadedRun` with the model in eval mode.

    Raises:
        LMForgeError: not a run directory, missing or damaged files, weights that do not fit the
            config, or a tokenizer that does not belong to the model.
    """
    path = Path(path)
    if is_gguf(path):
        found = load_gguf(path, device=device, dtype=dtype)
        return LoadedRun(model=found.model, tokenizer=found.tokenizer, config=found.config, path=found.path)
    if not path.is_dir():
        raise LMForgeError("run directory not found", file=path)
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        if (path / "config.json").is_file():
            model = load_hf_model(path, device=device, dtype=dtype)
            return LoadedRun(model=model, tokenizer=load_hf_tokenizer(path), config={}, path=path)
        raise LMForgeError("not a run directory: no config.yaml (nor a Hugging Face config.json)", file=path)
    config, lines = load_yaml(config_path)
    model_config = model_config_of(config, file=config_path, lines=lines)
    if config.get(BASE_MODEL_KEY) is not None:
        model = _load_adapter_run(path, config, model_config, config_path=config_path, lines=lines)
    else:
        model = Transformer(model_config)
        sharded = _sharded_checkpoint(path)
        if sharded is not None:  # an FSDP run stopped before its weights were consolidated
            distributed.read_sharded_weights(sharded, model)
        else:
            load_weights(model, path / WEIGHTS_FILE)
    model.to(device=device or "cpu", dtype=dtype)
    model.eval()

    tokenizer = None
    tokenizer_path = path / TOKENIZER_FILE
    if tokenizer_path.is_file():
        tokenizer = load_tokenizer(tokenizer_path, config, model_config, lines=lines, config_path=config_path)
    return LoadedRun(model=model, tokenizer=tokenizer, config=config, path=path)


def _sharded_checkpoint(path: Path) -> Path | None:
    """The newest checkpoint's sharded weights of a run that has no whole weights file, if any."""
    latest = latest_checkpoint(path)
    if (path / WEIGHTS_FILE).is_file() or latest is None:
        return None
    folder = latest / distributed.SHARDED_DIR
    return folder if folder.is_dir() else None


def base_model_path(run_dir: Path, value: Any, *, config_path: Path, line: int | None = None) -> Path:
    """Where the base model of a PEFT run is (a folder, or a GGUF file): ``value`` as given
    (absolute, or relative to the working directory), else relative to the run directory."""
    if not isinstance(value, str) or not value:
        raise LMForgeError(
            "expected the path of the base model", file=config_path, line=line, key=BASE_MODEL_KEY
        )
    for candidate in (Path(value), run_dir / value):
        if candidate.is_dir() or is_gguf(candidate):
            return candidate
    raise LMForgeError(
        f"the base model of this adapter run is not found: {value}",
        file=config_path,
        line=line,
        key=BASE_MODEL_KEY,
    )


def _load_adapter_run(
    path: Path, config: dict[str, Any], model_config: ModelConfig, *, config_path: Path, lines: dict[str, int]
) -> Transformer:
    """The base model (a run directory or a Hugging Face folder) with the run's task head as it
    was built for training (``head.safetensors``: its frozen parts too, e.g. a pooler), and the
    run's adapter applied (its trained copies of the head or of any other module included)."""
    if not (path / ADAPTER_CONFIG_FILE).is_file():
        raise LMForgeError(
            f"config.yaml names a base model, but {ADAPTER_CONFIG_FILE} is missing (was training finished?)",
            file=path,
        )
    base_path = base_model_path(
        path, config[BASE_MODEL_KEY], config_path=config_path, line=lines.get(BASE_MODEL_KEY)
    )
    base = load(base_path).model
    model = transplant(base, model_config)
    if (path / HEAD_FILE).is_file():
        load_head(model, path / HEAD_FILE)
    load_adapter(model, path)
    return model


def load_head(model: Transformer, path: Path) -> None:
    """Put the head tensors of ``path`` (keys ``head.…``) into ``model``'s head, strictly."""
    tensors, _ = read_weights(path)
    head = {k.removeprefix("head."): v for k, v in tensors.items()}
    expected = model.head.state_dict()
    if set(head) != set(expected) or any(head[k].shape != expected[k].shape for k in head):
        raise LMForgeError("the saved task head does not fit the model's head", file=path)
    model.head.load_state_dict(head, strict=True)


def transplant(source: nn.Module, config: ModelConfig) -> Transformer:
    """A new :class:`Transformer` of ``config`` holding ``source``'s weights (e.g. a backbone
    given another head). Every tensor outside the head must be in ``source`` with the same shape;
    head tensors are copied when ``source`` has them with the same shape, else start fresh.

    Raises:
        LMForgeError: ``source`` lacks a backbone tensor or has it with another shape.
    """
    model = Transformer(config)
    model.to(next((p.dtype for p in source.parameters()), torch.float32))
    available = source.state_dict()
    target = model.state_dict()
    chosen = {}
    for key, tensor in target.items():
        found = available.get(key)
        fits = found is not None and found.shape == tensor.shape
        if key.startswith("head."):
            chosen[key] = found if fits and config.head == getattr(source.config, "head", None) else tensor
        elif not fits:
            what = (
                "missing"
                if found is None
                else f"of shape {tuple(found.shape)}, expected {tuple(tensor.shape)}"
            )
            raise LMForgeError(f"the base model does not fit this config: tensor '{key}' is {what}", key=key)
        else:
            chosen[key] = found
    model.load_state_dict(chosen, strict=True)
    return model


def load_tokenizer(
    tokenizer_path: Path,
    config: dict[str, Any],
    model_config: ModelConfig,
    *,
    lines: dict[str, int] | None = None,
    config_path: Path | None = None,
) -> Tokenizer:
    """The run's tokenizer, checked against the model: it must have the vocabulary size recorded
    in config.yaml and no more tokens than the model's embedding has rows."""
    section = config.get("tokenizer") or {}
    tokenizer = Tokenizer.from_file(tokenizer_path)  # roles from the tokenizer_config.json beside it
    recorded = section.get("vocab_size") if isinstance(section, dict) else None
    if tokenizer.vocab_size > model_config.vocab_size or (
        recorded is not None and recorded != tokenizer.vocab_size
    ):
        expected = recorded if recorded is not None else f"at most {model_config.vocab_size}"
        raise LMForgeError(
            f"the tokenizer does not match the model: it has {tokenizer.vocab_size} tokens, "
            f"the model expects {expected} (vocab_size {model_config.vocab_size})",
            file=tokenizer_path,
        )
    return tokenizer
