"""File tools at the bottom of lmforge: file names, atomic writes, weight files.

Every file lmforge writes goes through :func:`atomic_write`: into a temporary file in the same
folder, flushed to disk (fsync), then renamed over the old one, so a crash leaves either the old
or the new file, never a torn one. :func:`replace_folder` does the same for a whole folder (built
beside the target, swapped in at the end). Weights are safetensors, never pickle; tensors that
share memory (a tied LM head and its embedding) are stored once and re-tied on load.

Nothing here knows about models, runs or training: this module imports no other lmforge module
but :mod:`lmforge.errors`, so every layer above can use it (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import LMForgeError

# The files of a run directory (PRODUCT.md: a run directory is self-describing).
CONFIG_FILE = "config.yaml"  # the whole resolved config
TOKENIZER_FILE = "tokenizer.json"  # a Hugging Face tokenizers file
WEIGHTS_FILE = "model.safetensors"  # the full model's weights
ADAPTER_WEIGHTS_FILE = "adapter.safetensors"  # a PEFT run: the adapter (and task head) only
ADAPTER_CONFIG_FILE = "adapter_config.json"  # a PEFT run: the method's options and the base's shape
STATE_FILE = "trainer_state.json"  # step, RNG states, data position
METRICS_FILE = "metrics.jsonl"  # one JSON line per logged step / evaluation
TIED_KEY = "lmforge.tied"  # safetensors metadata: JSON {alias name: stored name}
BASE_MODEL_KEY = "base_model"  # config.yaml of a PEFT run: the folder of the base model


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



def atomic_write_json(path: str | Path, value: Any) -> Path:
    """Write ``value`` as indented JSON to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def atomic_write_yaml(path: str | Path, value: Any) -> Path:
    """Write ``value`` as YAML (keys in their order) to ``path`` atomically."""
    return atomic_write_text(path, yaml.safe_dump(value, sort_keys=False, allow_unicode=True))


def write_jsonl(path: str | Path, records: Any) -> Path:
    """One JSON object per line (UTF-8, non-ASCII kept), written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    return atomic_write_text(path, text)


# ---- folders -------------------------------------------------------------------------------------


def replace_folder(path: str | Path, fill: Callable[[Path], None]) -> Path:
    """Create or replace the folder ``path`` as a whole: ``fill(tmp)`` writes a new folder beside
    it, which then takes its place (the old one is removed only after the new one is in). A
    failure leaves the old folder as it was and removes the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        fill(tmp)
        fsync_dir(tmp)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not path.exists():
            os.replace(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)
    fsync_dir(path.parent)
    return path


# ---- run metadata ----------------------------------------------------------------------------


def save_tokenizer(tokenizer: Any, folder: str | Path) -> None:
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


def run_config(model: Any, tokenizer: Any, config: dict[str, Any] | None) -> dict[str, Any]:
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
    folder: str | Path, *, model: Any, tokenizer: Any, config: dict[str, Any] | None
) -> dict[str, Any]:
    """Write config.yaml (resolved, see :func:`run_config`) and tokenizer.json into ``folder``,
    each atomically; the training loop calls this before its first checkpoint. Returns the config."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    resolved = run_config(model, tokenizer, config)
    atomic_write_yaml(folder / CONFIG_FILE, resolved)
    if tokenizer is not None:
        save_tokenizer(tokenizer, folder)
    return resolved
