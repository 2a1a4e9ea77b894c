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

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
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
HEAD_FILE = "head.safetensors"  # a PEFT run: the task head as it was built (its frozen parts too)
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


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path) -> Path:
    """Write named tensors to a safetensors file atomically."""
    plain = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(plain, str(tmp), metadata={"format": "pt"}))


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


def swap_in(new: Path, path: Path) -> Path:
    """Put the folder ``new`` in the place of ``path`` (which may exist): the old folder is set
    aside, the new one renamed into place, then the old one removed — never a mix of the two."""
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    fsync_dir(new)
    if path.exists():
        os.replace(path, old)
    try:
        os.replace(new, path)
    except BaseException:
        if old.exists() and not path.exists():
            os.replace(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)
    fsync_dir(path.parent)
    return path


def replace_folder(path: str | Path, fill: Callable[[Path], None]) -> Path:
    """Create or replace the folder ``path`` as a whole: ``fill(tmp)`` writes a new folder beside
    it, which then takes its place (:func:`swap_in`). A failure leaves the old folder as it was
    and removes the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        fill(tmp)
        return swap_in(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---- output folders: never clobbered --------------------------------------------------------------


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs (another user's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_siblings(path: Path) -> None:
    """Remove the ``.NAME.new-PID`` / ``.NAME.tmp-PID`` / ``.NAME.old-PID`` folders a killed
    process left beside ``path`` while replacing it (the process is gone; ``path`` is intact)."""
    if not path.parent.is_dir():
        return
    for sibling in path.parent.glob(f".{path.name}.*-*"):
        kind, _, pid = sibling.name.rpartition("-")
        if kind.rsplit(".", 1)[-1] in ("new", "tmp", "old") and pid.isdigit() and not process_alive(int(pid)):
            if sibling.is_dir():
                shutil.rmtree(sibling, ignore_errors=True)
            else:
                sibling.unlink(missing_ok=True)


def describe_contents(path: Path, *, limit: int = 3) -> str:
    """A few names of what a folder holds, for an error message ("config.yaml, data and 4 more")."""
    names = sorted(p.name for p in path.iterdir())
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_writable(path: Path, *, what: str = "output") -> None:
    """``path`` can be created or written: not a file where a folder is wanted, not inside a file,
    and its nearest existing folder is writable. One-line LMForgeError otherwise."""
    if path.exists() and not path.is_dir():
        raise LMForgeError(f"the {what} is a file, not a folder", file=path)
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise LMForgeError(f"cannot create the {what} inside a file ({parent})", file=path)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise LMForgeError(f"cannot write the {what}: {parent} is not writable", file=path)


def occupied(path: Path) -> bool:
    """A folder that exists and holds something."""
    return path.is_dir() and any(path.iterdir())


def refuse_occupied(path: Path, *, hint: str = "") -> None:
    """The rule for every folder a command writes: new or empty, else a one-line error naming what
    is there (nothing is touched)."""
    if occupied(path):
        raise LMForgeError(
            f"the output folder is not empty (it holds {describe_contents(path)}): choose another --out"
            + (f", {hint}" if hint else "")
            + ", or add --overwrite to replace it",
            file=path,
        )


RESUME_HINT = "add --resume to continue a run there"


def check_output(path: Path, *, overwrite: bool = False, resume: bool = False, hint: str = "") -> None:
    """Whether ``path`` can take a command's output (see :func:`output_folder`), checked before any
    work: it touches nothing."""
    check_writable(path)
    if not resume and not overwrite and occupied(path):
        refuse_occupied(path, hint=hint)


def check_own_folder(path: Path, *, marker: str, what: str) -> None:
    """A folder a command keeps adding to (pictures, a comparison): new, empty, or one it made
    before (it holds ``marker``); anything else is a one-line error and nothing is touched."""
    check_writable(path)
    if occupied(path) and not (path / marker).exists():
        raise LMForgeError(
            f"the output folder holds {describe_contents(path)}, not {what}: choose another --out", file=path
        )


@contextlib.contextmanager
def output_folder(path: str | Path, *, overwrite: bool = False, resume: bool = False) -> Iterator[Path]:
    """The folder a command writes its output into, never mixed with an older one.

    - a new or empty ``path``: written in place (left new or empty again when the block fails
      before a checkpoint was written);
    - ``resume``: ``path`` itself (the caller checks it holds its own run);
    - an occupied ``path`` with ``overwrite``: the new output is written into a folder beside it,
      which replaces ``path`` as a whole when the block ends normally (an interrupted training
      run that saved its checkpoint ends normally); on an error the new folder is removed and
      the old one stays as it was;
    - an occupied ``path`` without ``overwrite``: a one-line error, nothing touched.
    """
    path = Path(path)
    check_output(path, overwrite=overwrite, resume=resume, hint=RESUME_HINT)
    remove_stale_siblings(path)
    if resume or not occupied(path):
        created = not path.exists()
        path.mkdir(parents=True, exist_ok=True)
        try:
            yield path
        except BaseException:
            # A command that fails before its first checkpoint leaves the folder as it found it.
            if not resume and not (path / "checkpoints").exists():
                if created:
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    for child in path.iterdir():
                        shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink()
            raise
        return
    staging = path.with_name(f".{path.name}.new-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    swap_in(staging, path)


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
