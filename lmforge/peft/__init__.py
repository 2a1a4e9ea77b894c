"""Parameter-efficient fine-tuning: every method under one contract.

    model = lmforge.peft.apply(model, "lora", r=8, target_modules=["q_proj", "v_proj"])
    print(lmforge.peft.format_report(lmforge.peft.trainable_report(model)))
    ...train with the one loop...
    lmforge.peft.save_adapter(model, "run/adapter")       # adapter.safetensors + adapter_config.json
    lmforge.peft.merge(model)                             # fold it into the weights (where the math allows)

Each method is one module of this package that calls :func:`register_peft_method`; this package
imports all of its modules, so the registry (:func:`method_names`, :func:`get_method`) lists every
method without a list kept here. The contract, the same for all: only the adapter's parameters
(and ``modules_to_save``, e.g. the task head) are trainable; layer methods are a no-op before
training; several named adapters can live on one base (add, switch, disable, delete);
adapter-only save/load; merge/unmerge where the math allows, a clear error (the method's own
reason) where it does not.
"""

from __future__ import annotations

import importlib
import pkgutil

from .adalora import AdaLoraConfig, RankAllocator
from .adapters import AdapterConfig
from .base import (
    METHODS,
    AdaptedModule,
    HFExport,
    Method,
    PeftConfig,
    active_adapter,
    disable_adapters,
    format_report,
    get_method,
    make_config,
    method_names,
    peft_configs,
    register_peft_method,
    route_rows,
    set_adapter,
    trainable_report,
    unwrap,
)
from .bitfit import BitFitConfig
from .ia3 import IA3Config
from .io import adapter_state_dict, load_adapter, read_adapter_config, save_adapter
from .lifecycle import (
    apply,
    delete_adapter,
    merge,
    merge_and_unload,
    training_callbacks,
    unmerge,
)
from .lora import LoraConfig
from .prompts import PrefixConfig, PromptConfig, PTuningConfig


def _import_method_modules() -> None:
    """Import every module of this package: each method module registers its method on import."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


_import_method_modules()


__all__ = [
    "METHODS",
    "AdaLoraConfig",
    "AdaptedModule",
    "AdapterConfig",
    "BitFitConfig",
    "HFExport",
    "IA3Config",
    "LoraConfig",
    "Method",
    "PTuningConfig",
    "PeftConfig",
    "PrefixConfig",
    "PromptConfig",
    "RankAllocator",
    "active_adapter",
    "adapter_state_dict",
    "apply",
    "delete_adapter",
    "disable_adapters",
    "format_report",
    "get_method",
    "load_adapter",
    "make_config",
    "merge",
    "merge_and_unload",
    "method_names",
    "peft_configs",
    "read_adapter_config",
    "register_peft_method",
    "route_rows",
    "save_adapter",
    "set_adapter",
    "trainable_report",
    "training_callbacks",
    "unmerge",
    "unwrap",
]
