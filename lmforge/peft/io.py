"""Adapter-only files: ``adapter.safetensors`` + ``adapter_config.json``, loadable onto the base.

The tensors are the adapter's own parameters (and its copies of ``modules_to_save``, e.g. the task
head), keyed by where they live in the model with the adapter's name left out, so a saved adapter
can be loaded under any name. The JSON file holds the method's config and enough of the base
model's config to refuse a base it was not trained on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import LMForgeError
from ..files import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, atomic_write, atomic_write_json
from .base import METHODS, active_adapter, adapter_parameters, make_config, peft_configs, set_adapter
from .lifecycle import apply

ADAPTER_WEIGHTS = ADAPTER_WEIGHTS_FILE
ADAPTER_CONFIG = ADAPTER_CONFIG_FILE
# Fields of the base model's config that must agree for an adapter to fit.
BASE_FIELDS = (
    "arch",
    "vocab_size",
    "embed_dim",
    "num_layers",
    "num_decoder_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "mlp_hidden_dim",
)


def _portable_key(qualified: str, name: str) -> str:
    """``…q_proj.adapters.NAME.lora_A`` -> ``…q_proj.lora_A``; ``peft_modules.NAME.x`` -> ``peft_modules.x``."""
    parts = qualified.split(".")
    for i in range(len(parts) - 1):
        if parts[i] in ("adapters", "peft_modules") and parts[i + 1] == name:
            keep = parts[: i + 1] if parts[i] == "peft_modules" else parts[:i]
            return ".".join(keep + parts[i + 2 :])
    raise ValueError(f"{qualified} does not belong to adapter {name}")


def adapter_state_dict(model: nn.Module, name: str | None = None) -> dict[str, torch.Tensor]:
    """The adapter's tensors under portable keys."""
    name = name or active_adapter(model)
    if name is None:
        raise LMForgeError("the model has no active adapter to save")
    return {_portable_key(k, name): v.detach() for k, v in adapter_parameters(model, name).items()}


def save_adapter(model: nn.Module, directory: str | Path, name: str | None = None) -> Path:
    """Write ``adapter.safetensors`` and ``adapter_config.json`` into ``directory`` (atomically)."""
    name = name or active_adapter(model)
    if name is None or name not in peft_configs(model):
        raise LMForgeError("the model has no adapter to save (apply one with lmforge.peft.apply)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous().cpu() for k, v in adapter_state_dict(model, name).items()}
    config = peft_configs(model)[name]
    meta: dict[str, Any] = {"adapter": config.to_dict(), "adapter_name": name}
    base_config = getattr(model, "config", None)
    if base_config is not None:
        meta["base_model"] = {k: getattr(base_config, k) for k in BASE_FIELDS}
        meta["base_head"] = getattr(base_config, "head", None)
    atomic_write(
        directory / ADAPTER_WEIGHTS,
        lambda path: save_file(tensors, str(path), metadata={"method": config.method}),
    )
    atomic_write_json(directory / ADAPTER_CONFIG, meta)
    return directory


def read_adapter_config(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / ADAPTER_CONFIG
    if not path.is_file():
        raise LMForgeError("no adapter_config.json here (not an adapter directory)", file=Path(directory))
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise LMForgeError(f"invalid JSON: {err.msg}", file=path, line=err.lineno) from None


def load_adapter(
    model: nn.Module, directory: str | Path, name: str = "default", *, activate: bool = True
) -> nn.Module:
    """Inject the saved adapter into ``model`` under ``name`` and fill its tensors (strictly)."""
    directory = Path(directory)
    meta = read_adapter_config(directory)
    options = dict(meta.get("adapter", {}))
    method = options.pop("method", None)
    if method not in METHODS:
        raise LMForgeError(
            f"unknown PEFT method {method!r}", file=directory / ADAPTER_CONFIG, key="adapter.method"
        )
    base_config = getattr(model, "config", None)
    for key, value in (meta.get("base_model") or {}).items():
        if base_config is not None and getattr(base_config, key, value) != value:
            raise LMForgeError(
                f"this adapter was trained on a base with {key} = {value}, the model has {getattr(base_config, key)}",
                file=directory / ADAPTER_CONFIG,
                key=f"base_model.{key}",
            )
    if not (directory / ADAPTER_WEIGHTS).is_file():
        raise LMForgeError("adapter weights missing", file=directory / ADAPTER_WEIGHTS)
    previous = active_adapter(model)
    apply(model, make_config(method, options), adapter_name=name)
    saved = load_file(str(directory / ADAPTER_WEIGHTS))
    own = {_portable_key(k, name): p for k, p in adapter_parameters(model, name).items()}
    missing = sorted(set(own) - set(saved))
    unexpected = sorted(set(saved) - set(own))
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise LMForgeError(f"adapter tensors do not fit this model: {what}", file=directory / ADAPTER_WEIGHTS)
    with torch.no_grad():
        for key, parameter in own.items():
            if saved[key].shape != parameter.shape:
                raise LMForgeError(
                    f"tensor {key} has shape {tuple(saved[key].shape)}, the model expects {tuple(parameter.shape)}",
                    file=directory / ADAPTER_WEIGHTS,
                )
            parameter.copy_(saved[key])
    if not activate:
        set_adapter(model, previous)
    return model


def adapter_size_bytes(directory: str | Path) -> int:
    return (Path(directory) / ADAPTER_WEIGHTS).stat().st_size


__all__ = ["adapter_size_bytes", "adapter_state_dict", "load_adapter", "read_adapter_config", "save_adapter"]
