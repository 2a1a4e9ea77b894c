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

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .config import ModelConfig
from .errors import LMForgeError
from .settings import dataclass_from_dict, load_yaml

if TYPE_CHECKING:
    from .model import Transformer
    from .tokenizers import Tokenizer

CONFIG_FILE = "config.yaml"
TOKENIZER_FILE = "tokenizer.json"
WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "trainer_state.json"
METRICS_FILE = "metrics.jsonl"
TIED_KEY = "lmforge.tied"  # safetensors metadata: JSON {alias name: stored name}
BASE_MODEL_KEY = "base_model"  # config.yaml of a PEFT run: the folder of the base model
ADAPTER_CONFIG_FILE = "adapter_config.json"


# ---- atomic files ------------------------------------------------------------------------------


def fsync_dir(path: Path) -> None:
    """Flush a directory entry (a rename inside it) to disk, where the OS allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Create ``path`` atomically: ``write(tmp)`` fills a temporary file next to it, which is
    fsynced and renamed over ``path``. On any failure the temporary file is removed and the old
    ``path`` (if any) is untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 text to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


# ---- weights -----------------------------------------------------------------------------------


def weights_to_save(module: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict with each shared tensor kept once, and ``{alias: kept name}`` for the rest.

    safetensors refuses tensors that share memory (a tied LM head and embedding), so the alias is
    dropped here and restored from the kept tensor by :func:`load_weights`.
    """
    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    seen: dict[tuple[int, int, tuple[int, ...], torch.dtype], str] = {}
    for name, tensor in module.state_dict().items():
        ident = (
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tuple(tensor.shape),
            tensor.dtype,
        )
        if ident in seen and tensor.numel() > 0:
            tied[name] = seen[ident]
            continue
        seen[ident] = name
        tensors[name] = tensor.detach().contiguous().cpu()
    return tensors, tied


def save_weights(module: nn.Module, path: str | Path, *, metadata: dict[str, str] | None = None) -> Path:
    """Write the module's weights to a safetensors file atomically (tied tensors stored once)."""
    tensors, tied = weights_to_save(module)
    meta = {"format": "pt", **(metadata or {})}
    if tied:
        meta[TIED_KEY] = json.dumps(tied, sort_keys=True)
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file; a missing or damaged file is an LMForgeError."""
    path = Path(path)
    if not path.is_file():
        raise LMForgeError("weights file not found", file=path)
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise LMForgeError(f"cannot read safetensors weights ({err})", file=path) from None
    return tensors, metadata


def load_weights(module: nn.Module, path: str | Path) -> dict[str, str]:
    """Load a file written by :func:`save_weights` into ``module``, strictly: every expected
    tensor present with its shape, nothing extra. Tied aliases are filled from their source.
    Returns the file's metadata."""
    tensors, metadata = read_weights(path)
    tied = json.loads(metadata.get(TIED_KEY, "{}"))
    for alias, source in tied.items():
        if source in tensors:
            tensors[alias] = tensors[source]
    expected = module.state_dict()
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if missing or unexpected:
        what = f"missing tensor '{missing[0]}'" if missing else f"unexpected tensor '{unexpected[0]}'"
        more = len(missing) + len(unexpected) - 1
        raise LMForgeError(
            f"weights do not fit the model: {what}" + (f" (and {more} more)" if more else ""), file=path
        )
    for key, tensor in tensors.items():
        if tensor.shape != expected[key].shape:
            raise LMForgeError(
                f"weights do not fit the model: shape {tuple(tensor.shape)} in the file, "
                f"{tuple(expected[key].shape)} in the model",
                file=path,
                key=key,
            )
    module.load_state_dict(tensors, strict=True)
    return metadata


# ---- run directories ---------------------------------------------------------------------------


@dataclass
class LoadedRun:
    """What :func:`load` returns: the model (eval mode), its tokenizer, the run's config, the path."""

    model: Transformer
    tokenizer: Tokenizer | None
    config: dict[str, Any] = field(default_factory=dict)  # the whole resolved config ({} for HF folders)
    path: Path = Path(".")


def run_config(model: Transformer, tokenizer: Tokenizer | None, config: dict[str, Any] | None) -> dict:
    """The config to write: ``config`` with its ``model`` section replaced by the model's real
    config and the tokenizer's vocabulary size recorded (checked again by :func:`load`)."""
    resolved = dict(config or {})
    resolved["model"] = model.config.to_dict()
    if tokenizer is not None:  # its roles go into tokenizer_config.json beside tokenizer.json
        section = dict(resolved.get("tokenizer") or {})
        section["vocab_size"] = tokenizer.vocab_size
        resolved["tokenizer"] = section
    return resolved


def write_run_metadata(
    folder: str | Path, *, model: Transformer, tokenizer: Tokenizer | None, config: dict[str, Any] | None
) -> dict[str, Any]:
    """Write config.yaml (resolved, see :func:`run_config`) and tokenizer.json into ``folder``,
    each atomically; the training loop calls this before its first checkpoint. Returns the config."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    resolved = run_config(model, tokenizer, config)
    atomic_write_text(folder / CONFIG_FILE, yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True))
    if tokenizer is not None:
        save_tokenizer(tokenizer, folder)
    return resolved


def save_tokenizer(tokenizer: Tokenizer, folder: str | Path) -> None:
    """Write tokenizer.json (and the tokenizer_config.json that ``Tokenizer.save`` puts beside
    it) into ``folder``, each file atomically."""
    folder = Path(folder)
    staging = folder / f".tokenizer.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        tokenizer.save(staging / TOKENIZER_FILE)
        for written in sorted(staging.iterdir(), key=lambda p: p.name != TOKENIZER_FILE):
            atomic_write(folder / written.name, lambda tmp, source=written: os.replace(source, tmp))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


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
) -> Path:
    """Write a run directory that :func:`load` (and ``lmforge generate --model``) can use.

    Args:
        path: the folder; created if absent (then atomically: built under a temporary name and
            renamed), else its files are replaced one by one, each atomically.
        model: the trained model; its config becomes the ``model`` section of config.yaml.
        tokenizer: written as tokenizer.json (its size and special tokens go into config.yaml).
        config: the rest of the resolved config (tokenizer, data, train sections, ...).

    Returns:
        The path of the run directory.
    """
    path = Path(path)
    resolved = dict(config or {})
    if path.exists():
        if not path.is_dir():
            raise LMForgeError("cannot write a run directory: a file of that name exists", file=path)
        _write_run_files(path, model, tokenizer, resolved)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write_run_files(tmp, model, tokenizer, resolved)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(path.parent)
    return path


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
    from .interop.gguf import is_gguf, load_gguf

    if is_gguf(path):
        return load_gguf(path, device=device, dtype=dtype)
    if not path.is_dir():
        raise LMForgeError("run directory not found", file=path)
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        if (path / "config.json").is_file():
            try:
                from .interop.hf import load_hf_folder
            except ImportError:
                raise LMForgeError(
                    "this is a Hugging Face folder (config.json), but lmforge.interop.hf is not available",
                    file=path,
                ) from None
            return load_hf_folder(path, device=device, dtype=dtype)
        raise LMForgeError("not a run directory: no config.yaml (nor a Hugging Face config.json)", file=path)
    config, lines = load_yaml(config_path)
    model_config = model_config_of(config, file=config_path, lines=lines)

    from .model import Transformer

    if config.get(BASE_MODEL_KEY) is not None:
        model = _load_adapter_run(path, config, model_config, config_path=config_path, lines=lines)
    else:
        model = Transformer(model_config)
        load_weights(model, path / WEIGHTS_FILE)
    model.to(device=device or "cpu", dtype=dtype)
    model.eval()

    tokenizer = None
    tokenizer_path = path / TOKENIZER_FILE
    if tokenizer_path.is_file():
        tokenizer = load_tokenizer(tokenizer_path, config, model_config, lines=lines, config_path=config_path)
    return LoadedRun(model=model, tokenizer=tokenizer, config=config, path=path)


def base_model_path(run_dir: Path, value: Any, *, config_path: Path, line: int | None = None) -> Path:
    """Where the base model of a PEFT run is: ``value`` as given (absolute, or relative to the
    working directory), else relative to the run directory."""
    if not isinstance(value, str) or not value:
        raise LMForgeError(
            "expected the path of the base model", file=config_path, line=line, key=BASE_MODEL_KEY
        )
    for candidate in (Path(value), run_dir / value):
        if candidate.is_dir():
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
    """The base model (a run directory or a Hugging Face folder) with the run's task head, and
    the run's adapter applied (its saved copy of the head included)."""
    from .peft import load_adapter

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
    load_adapter(model, path)
    return model


def transplant(source: nn.Module, config: ModelConfig) -> Transformer:
    """A new :class:`Transformer` of ``config`` holding ``source``'s weights (e.g. a backbone
    given another head). Every tensor outside the head must be in ``source`` with the same shape;
    head tensors are copied when ``source`` has them with the same shape, else start fresh.

    Raises:
        LMForgeError: ``source`` lacks a backbone tensor or has it with another shape.
    """
    from .model import Transformer

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
    from .tokenizers import Tokenizer

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
