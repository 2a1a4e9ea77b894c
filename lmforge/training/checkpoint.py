"""Resumable checkpoints: weights, optimizer, RNG states, data position — written atomically.

A checkpoint is a folder ``RUN_DIR/checkpoints/step-00000500/`` holding the trained weights,
``optimizer.pt`` (tensors, numbers and lists only, read back with ``torch.load(weights_only=True)``)
and ``trainer_state.json``. The weights follow the method: a model trained whole is saved whole
(``model.safetensors``); a model with an active PEFT adapter saves only what trains — the adapter
and its copies of ``modules_to_save`` such as the task head (``adapter.safetensors`` +
``adapter_config.json``), a few percent of the model — since the frozen base is the one the run
was built from. It is built under a temporary name (``.tmp-step-…``), every file
fsynced, and renamed into place in one step, so a process killed midway leaves the previous
checkpoint whole; a folder without the ``.tmp`` prefix is always complete. After the rename, the
run directory's top-level ``model.safetensors`` (a hard link, no copy) and ``trainer_state.json``
(or the adapter files) are replaced atomically, so ``lmforge.load(RUN_DIR)`` always sees the
newest complete weights, from the first checkpoint on.

An FSDP job (:mod:`lmforge.training.distributed`) saves sharded checkpoints instead:
``step-N/sharded/`` holds every rank's shards of the weights and optimizer state
(``torch.distributed.checkpoint``), written into the writer's temporary folder and committed with
the same rename; the whole weights reach the top of the run directory when training ends.

Exact resume restores the python, numpy and torch (CPU and CUDA) random states and the batch
source's position (``state_dict()`` / ``load_state_dict()``), after the approach of Hugging Face
``Trainer._save_rng_state`` and torchtitan's checkpointer.
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import LMForgeError
from ..files import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    STATE_FILE,
    WEIGHTS_FILE,
    atomic_write,
    atomic_write_text,
    fsync_dir,
    load_weights,
    process_alive,
    read_weights,
    save_weights,
)
from ..peft import active_adapter, adapter_state_dict, save_adapter
from ..runtime import is_writer
from . import distributed

CHECKPOINTS_DIR = "checkpoints"
OPTIMIZER_FILE = "optimizer.pt"
_STEP_DIR = re.compile(r"^step-(\d+)$")


# ---- JSON with tensors, arrays and tuples (RNG and sampler states) ------------------------------


def to_json(obj: Any) -> Any:
    """A JSON-safe form of ``obj`` that :func:`from_json` turns back into the same values
    (tensors, numpy arrays and scalars, tuples, bytes are tagged)."""
    if isinstance(obj, torch.Tensor):
        array = obj.detach().cpu().contiguous()
        return {
            "__tensor__": base64.b64encode(array.view(torch.uint8).numpy().tobytes()).decode("ascii")
            if array.numel()
            else "",
            "dtype": str(array.dtype).removeprefix("torch."),
            "shape": list(array.shape),
        }
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, bytes):
        return {"__bytes__": base64.b64encode(obj).decode("ascii")}
    if isinstance(obj, tuple):
        return {"__tuple__": [to_json(v) for v in obj]}
    if isinstance(obj, list):
        return [to_json(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_json(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def from_json(obj: Any) -> Any:
    """Inverse of :func:`to_json`."""
    if isinstance(obj, list):
        return [from_json(v) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        dtype = getattr(torch, obj["dtype"])
        raw = base64.b64decode(obj["__tensor__"])
        flat = (
            torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        )
        return flat.view(dtype).reshape(obj["shape"]).clone()
    if "__ndarray__" in obj:
        return np.asarray(obj["__ndarray__"], dtype=obj["dtype"])
    if "__bytes__" in obj:
        return base64.b64decode(obj["__bytes__"])
    if "__tuple__" in obj:
        return tuple(from_json(v) for v in obj["__tuple__"])
    return {k: from_json(v) for k, v in obj.items()}


# ---- random states -----------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """The python, numpy and torch random states (CUDA too when present)."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices) with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---- checkpoints -------------------------------------------------------------------------------


_LEFTOVER = re.compile(r"^\.(?:tmp|old)-step-\d+-(\d+)$|^\..+\.tmp-(\d+)$")


def remove_leftovers(run_dir: str | Path) -> list[Path]:
    """Delete what a killed process left half-written in a run directory — temporary checkpoint
    folders (``checkpoints/.tmp-step-N-PID``) and temporary files (``.NAME.tmp-PID``) — when that
    process is gone. Returns what was removed."""
    run_dir = Path(run_dir)
    removed = []
    for folder in (run_dir, run_dir / CHECKPOINTS_DIR):
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            match = _LEFTOVER.match(path.name)
            if match is None:
                continue
            pid = int(match.group(1) or match.group(2))
            if pid == os.getpid() or process_alive(pid):
                continue
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary folders are never listed)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def _link_or_copy(source: Path, target: Path) -> None:
    """Put ``source``'s bytes at ``target`` atomically: a hard link when the filesystem allows."""

    def write(tmp: Path) -> None:
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)

    atomic_write(target, write)


def save_checkpoint(
    run_dir: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep: int = 1,
) -> Path:
    """Write a resumable checkpoint of step ``state["step"]`` atomically; keep the newest ``keep``.

    Args:
        run_dir: the run directory (checkpoints go into its ``checkpoints/`` folder).
        model: the model; its weights are stored with tied tensors once.
        optimizer: the optimizer; its state_dict is stored with ``torch.save`` (no custom objects).
        state: the trainer state (JSON after :func:`to_json`), including ``step``.
        keep: how many checkpoints to keep (older ones are deleted after the new one is in place).

    Returns:
        The checkpoint folder.
    """
    run_dir = Path(run_dir)
    tmp = _temporary_folder(run_dir, int(state["step"]))
    weight_files = [ADAPTER_WEIGHTS_FILE, ADAPTER_CONFIG_FILE] if active_adapter(model) else [WEIGHTS_FILE]

    def write() -> None:
        if active_adapter(model):
            save_adapter(model, tmp)
        else:
            save_weights(model, tmp / WEIGHTS_FILE, metadata={"step": str(state["step"])})
        atomic_write(tmp / OPTIMIZER_FILE, lambda path: torch.save(optimizer.state_dict(), path))

    return _finish(run_dir, tmp, state, weight_files=weight_files, keep=keep, write=write)


def _final_folder(run_dir: Path, step: int) -> Path:
    return run_dir / CHECKPOINTS_DIR / checkpoint_name(step)


def _temporary_folder(run_dir: Path, step: int) -> Path:
    """A fresh ``checkpoints/.tmp-step-N-PID`` folder to build step ``step``'s checkpoint in."""
    final = _final_folder(run_dir, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _finish(
    run_dir: Path,
    tmp: Path,
    state: dict[str, Any],
    *,
    weight_files: list[str],
    keep: int,
    write: Callable[[], None] = lambda: None,
) -> Path:
    """Complete a checkpoint built in ``tmp``: ``write()`` what is still to write, add the
    trainer state, fsync, rename it into place and commit it (:func:`_commit`); on any failure
    the temporary folder goes and the previous checkpoint stays."""
    final = _final_folder(run_dir, int(state["step"]))
    state_text = json.dumps(to_json({**state, "checkpoint": f"{CHECKPOINTS_DIR}/{final.name}"}), indent=1)
    try:
        write()
        atomic_write_text(tmp / STATE_FILE, state_text)
        fsync_dir(tmp)
        _replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _commit(run_dir, final, state_text, weight_files=weight_files, keep=keep)
    return final


def _replace(tmp: Path, final: Path) -> None:
    """Rename a complete checkpoint folder into place, over the same step saved before (e.g.
    interrupted right after a save) without a moment with neither."""
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def _commit(run_dir: Path, final: Path, state_text: str, *, weight_files: list[str], keep: int) -> None:
    """After a checkpoint folder is in place: show its weights and state at the top of the run
    directory (atomically) and delete checkpoints older than the newest ``keep``."""
    fsync_dir(final.parent)
    for name in weight_files:
        _link_or_copy(final / name, run_dir / name)
    atomic_write_text(run_dir / STATE_FILE, state_text)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def save_sharded_checkpoint(
    run_dir: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep: int = 1,
    frozen: bool = True,
) -> Path:
    """An FSDP job's checkpoint, called on every rank: each writes its shards of the weights and
    optimizer state (``torch.distributed.checkpoint``) into ``step-N/sharded`` of a temporary
    folder the writer made; the writer then adds ``trainer_state.json`` and renames the folder
    into place, as :func:`save_checkpoint` does. ``frozen``: include frozen weights (False for a
    PEFT run: the adapter and head only). The whole weights reach the top of the run directory
    when training ends (:func:`write_weights` after consolidation)."""
    run_dir = Path(run_dir)
    step = int(state["step"])
    writer = is_writer()
    made = str(_temporary_folder(run_dir, step)) if writer else None
    tmp = Path(distributed.broadcast(made))  # the writer's folder, on every rank
    distributed.save_sharded(tmp / distributed.SHARDED_DIR, model, optimizer, frozen=frozen)
    distributed.barrier()
    if writer:
        _finish(run_dir, tmp, state, weight_files=[], keep=keep)
    distributed.barrier()
    return _final_folder(run_dir, step)


def write_weights(model: nn.Module, run_dir: Path) -> None:
    """The model's whole weights (or its active adapter) at the top of the run directory."""
    if active_adapter(model):
        save_adapter(model, run_dir)
    else:
        save_weights(model, run_dir / WEIGHTS_FILE)


def release_weights(model: nn.Module) -> None:
    """Give back the memory of a model's parameters (they become empty, keeping their
    identity and ties) while a sharded copy trains; refilled by assigning ``param.data``."""
    for param in model.parameters():
        param.data = torch.empty(0, dtype=param.dtype, device=param.device)


def load_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    sharded: bool = False,
) -> dict[str, Any]:
    """Load a checkpoint folder (or the newest one of a run directory) into ``model`` and
    ``optimizer``; returns the trainer state (RNG and data states not yet applied).
    ``sharded``: the model is sharded by FSDP in a job, the checkpoint must be an FSDP one."""
    path = Path(path)
    if not (path / OPTIMIZER_FILE).is_file() and not (path / distributed.SHARDED_DIR).is_dir():
        latest = latest_checkpoint(path)
        if latest is None:
            raise LMForgeError("no checkpoint to resume from (no checkpoints/step-* folder)", file=path)
        path = latest
    try:
        state = from_json(json.loads((path / STATE_FILE).read_text(encoding="utf-8")))
    except (OSError, ValueError) as err:
        raise LMForgeError(f"cannot read the trainer state ({err})", file=path / STATE_FILE) from None
    is_sharded = (path / distributed.SHARDED_DIR).is_dir()
    if is_sharded != sharded:
        how = (
            "sharded (FSDP): resume it under torchrun with --train.strategy fsdp"
            if is_sharded
            else ("whole (one process or DDP): resume it without --train.strategy fsdp")
        )
        raise LMForgeError(f"this checkpoint is {how}", file=path)
    if sharded:
        if optimizer is None:
            raise ValueError("a sharded checkpoint is resumed with its optimizer")
        distributed.load_sharded(
            path / distributed.SHARDED_DIR, model, optimizer, frozen=active_adapter(model) is None
        )
        return state
    if (path / ADAPTER_WEIGHTS_FILE).is_file():
        load_adapter_weights(model, path / ADAPTER_WEIGHTS_FILE)
    else:
        load_weights(model, path / WEIGHTS_FILE)
    if optimizer is not None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        try:
            saved = torch.load(path / OPTIMIZER_FILE, map_location=device, weights_only=True)
            optimizer.load_state_dict(saved)
        except (OSError, RuntimeError, ValueError, KeyError) as err:
            raise LMForgeError(
                f"cannot load the optimizer state ({str(err).splitlines()[0]})", file=path / OPTIMIZER_FILE
            ) from None
    return state


def load_adapter_weights(model: nn.Module, path: Path) -> None:
    """Fill the model's active adapter (already applied, as when the run began) with the tensors
    of a checkpoint's adapter file, strictly: the same tensors with the same shapes."""
    if active_adapter(model) is None:
        raise LMForgeError(
            "the checkpoint holds an adapter, but the model has none: apply the run's PEFT method first",
            file=path,
        )
    saved, _ = read_weights(path)
    own = adapter_state_dict(model)
    if set(saved) != set(own):
        odd = sorted(set(saved) ^ set(own))[0]
        raise LMForgeError(f"the checkpoint's adapter does not fit the model: tensor '{odd}'", file=path)
    with torch.no_grad():
        for key, tensor in own.items():
            if saved[key].shape != tensor.shape:
                raise LMForgeError(
                    f"the checkpoint's adapter does not fit the model: shape {tuple(saved[key].shape)}, "
                    f"expected {tuple(tensor.shape)}",
                    file=path,
                    key=key,
                )
            tensor.copy_(saved[key])
