"""The operations on a model's adapters: add one, switch, merge, unmerge, delete, and the
callbacks the training loop runs for the active one (re-exported by :mod:`lmforge.peft`)."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import LMForgeError
from ..hooks import Callback
from .base import (
    PeftConfig,
    SeamSlot,
    active_adapter,
    adapted_modules,
    get_method,
    make_config,
    peft_configs,
    seam_slots,
    set_adapter,
)

TASK_HEADS = ("classification", "token_classification", "qa")


def apply(
    model: nn.Module,
    method: str | PeftConfig = "lora",
    *,
    adapter_name: str = "default",
    tokenizer: Any = None,
    **options: Any,
) -> nn.Module:
    """Add adapter ``adapter_name`` of ``method`` to ``model`` (in place), make it the active one and
    make only its parameters trainable. Returns the model.

    A task head (classification, tagging, QA) is trained and saved with the adapter: it is added to
    ``modules_to_save`` unless that names the head or a part of it (e.g. ``head.classifier`` alone,
    leaving BERT's pooler frozen as Hugging Face PEFT does). For prompt tuning, ``init_text`` with a ``tokenizer``
    initializes the prompt from that text's embeddings.

    Raises:
        LMForgeError: unknown method or option, a target that matches nothing, a name in use.
    """
    if isinstance(method, PeftConfig):
        if options:
            raise LMForgeError("pass options either in the config object or as keywords, not both")
        config = method
    else:
        init_text = options.pop("init_text", None)
        if init_text is not None:
            if tokenizer is None:
                raise LMForgeError("init_text needs a tokenizer to turn it into token ids", key="init_text")
            options.setdefault("init", "text")
            options["init_token_ids"] = tokenizer.encode(init_text)
        config = make_config(method, options)
    configs = peft_configs(model)
    if adapter_name in configs:
        raise LMForgeError(
            f"an adapter named '{adapter_name}' already exists on this model", key="adapter_name"
        )
    head = getattr(getattr(model, "config", None), "head", None)
    if (
        head in TASK_HEADS
        and not any(m == "head" or m.startswith("head.") for m in config.modules_to_save)
        and getattr(model, "head", None) is not None
    ):
        config.modules_to_save = [*config.modules_to_save, "head"]
    if any(m.merged is not None for _, m in adapted_modules(model)):
        raise LMForgeError("an adapter is merged into the weights: unmerge it before adding another")
    get_method(config.method).inject(model, config, adapter_name)
    configs[adapter_name] = config
    set_adapter(model, adapter_name)
    return model


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` everywhere; wrappers left without adapters give back their module."""
    configs = peft_configs(model)
    if name not in configs:
        raise LMForgeError(f"no adapter named '{name}'", key="adapter_name")
    for module_name, module in list(adapted_modules(model)):
        if name not in module.adapters:
            continue
        if module.merged == name:
            raise LMForgeError(
                f"adapter '{name}' is merged into {module_name}: unmerge it before deleting it"
            )
        del module.adapters[name]
        if not len(module.adapters):
            _replace(model, module_name, module.base)
    for slot in list(seam_slots(model)):
        slot.names.discard(name)
    _drop_empty_slots(model)
    if hasattr(model, "peft_modules") and name in model.peft_modules:
        del model.peft_modules[name]
    del configs[name]
    if active_adapter(model) == name:
        set_adapter(model, next(iter(configs), None))


def merge(model: nn.Module, name: str | None = None) -> nn.Module:
    """Fold adapter ``name`` (default: the active one) into the base weights; outputs do not change.

    Raises:
        LMForgeError: for a method whose record says it cannot merge, with the record's reason.
    """
    name = _resolve(model, name)
    method = get_method(peft_configs(model)[name].method)
    if not method.mergeable:
        raise LMForgeError(f"cannot merge adapter '{name}': {method.not_mergeable_reason}")
    for _, module in adapted_modules(model):
        if name in module.adapters and module.merged != name:
            if module.merged is not None:
                raise LMForgeError(f"adapter '{module.merged}' is already merged: unmerge it first")
            module.adapters[name].merge(module.base)
            module.merged = name
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Take a merged adapter back out of the base weights (exactly, up to float rounding)."""
    for _, module in adapted_modules(model):
        if module.merged is not None:
            module.adapters[module.merged].unmerge(module.base)
            module.merged = None
    return model


def merge_and_unload(model: nn.Module, name: str | None = None) -> nn.Module:
    """Merge adapter ``name`` and remove every adapter: a plain model with the adapted weights."""
    merge(model, name)
    for module_name, module in list(adapted_modules(model)):
        _replace(model, module_name, module.base)
    for slot in list(seam_slots(model)):
        slot.names.clear()
    _drop_empty_slots(model)
    if hasattr(model, "peft_modules"):
        del model.peft_modules
    peft_configs(model).clear()
    object.__setattr__(model, "active_adapter_name", None)
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return model


def training_callbacks(model: nn.Module) -> list[Callback]:
    """Callbacks the training loop adds on its own for the active adapter, as its method's record
    gives them (AdaLoRA's rank allocation); empty without an adapter or for methods that need none."""
    name = active_adapter(model)
    config = peft_configs(model).get(name) if name is not None else None
    if name is None or config is None:
        return []
    factory = get_method(config.method).callbacks
    return factory(model, name, config) if factory is not None else []


def _resolve(model: nn.Module, name: str | None) -> str:
    name = name or active_adapter(model)
    if name is None or name not in peft_configs(model):
        raise LMForgeError("the model has no adapter" + (f" named '{name}'" if name else ""))
    return name


def _replace(model: nn.Module, qualified: str, module: nn.Module) -> None:
    parent_name, _, child = qualified.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _drop_empty_slots(model: nn.Module) -> None:
    for module in model.modules():
        for attribute in ("prefix", "prompt"):
            slot = getattr(module, attribute, None)
            if isinstance(slot, SeamSlot) and not slot.names:
                setattr(module, attribute, None)
