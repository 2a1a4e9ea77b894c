"""The contract every PEFT method follows, and the machinery they share.

A method is one module: a config dataclass (subclass of :class:`PeftConfig`), the layer or module
that carries its parameters, and one :func:`register_peft_method` call (after Hugging Face PEFT's
``register_peft_method`` and torchtune's ``AdapterModule.adapter_params()``). Everything else —
choosing target modules, freezing, several named adapters on one base, switching, disabling,
merging, saving — is generic and lives here.

Two ways a method plugs into a model:

- **Wrapping** (LoRA, AdaLoRA, IA3, BitFit, bottleneck adapters, ``modules_to_save`` heads): a target
  module is replaced by an :class:`AdaptedModule` that holds the original as ``base`` and one
  adapter per name; the active adapter computes the output from the base.
- **Seams** (prefix tuning, prompt tuning, P-tuning): the model's own seams
  (``SelfAttention.prefix``, ``TransformerStack.prompt``) receive a :class:`SeamSlot`; the
  parameters live in ``model.peft_modules[name]``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import LMForgeError, did_you_mean


@dataclass
class PeftConfig:
    """Options every method shares; each method subclasses it with its own."""

    method: str = ""  # set by each subclass
    modules_to_save: list[str] = field(default_factory=list)  # e.g. ["head"]: trained and saved whole

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class AdapterModule(nn.Module):
    """One adapter of one wrapped module. ``forward(base, *args)`` returns the adapted output."""

    mergeable = False  # whether merge()/unmerge() can fold it into the base weights
    why_not_mergeable = ""

    def merge(self, base: nn.Module) -> None:  # pragma: no cover - overridden where mergeable
        raise LMForgeError(self.why_not_mergeable)

    def unmerge(self, base: nn.Module) -> None:  # pragma: no cover - overridden where mergeable
        raise LMForgeError(self.why_not_mergeable)


class AdaptedModule(nn.Module):
    """A base module plus named adapters, one of them active (or none: the base alone).

    Attributes of the wrapped module are not forwarded: read them from ``base`` (or through
    :func:`unwrap`, which takes wrapped and plain modules alike), so it is always visible which
    object is read.
    """

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.adapters = nn.ModuleDict()
        self.active: str | None = None
        self.merged: str | None = None  # the adapter folded into the base weights, if any

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.active is None or self.active not in self.adapters or self.active == self.merged:
            return self.base(*args, **kwargs)
        return self.adapters[self.active](self.base, *args, **kwargs)


class SeamSlot(nn.Module):
    """What a model seam calls: dispatches to the active adapter's model-level module.

    ``peft_modules`` is held without registering it here (it is registered once, on the model),
    so the parameters appear once in ``state_dict`` and ``parameters()``.
    """

    def __init__(self, peft_modules: nn.ModuleDict, index: int) -> None:
        super().__init__()
        object.__setattr__(self, "_peft_modules", peft_modules)
        self.index = index
        self.active: str | None = None
        self.names: set[str] = set()

    def forward(self, batch_size: int) -> Any:
        if self.active is None or self.active not in self.names:
            return None
        return self._peft_modules[self.active].for_slot(self.index, batch_size)


# ---- the registry ------------------------------------------------------------------------------


@dataclass
class Method:
    name: str
    config_class: type[PeftConfig]
    inject: Callable[[nn.Module, Any, str], None]  # (model, config, adapter name) -> None
    mergeable: bool


METHODS: dict[str, Method] = {}


def register_peft_method(
    name: str,
    config_class: type[PeftConfig],
    inject: Callable[[nn.Module, Any, str], None],
    *,
    mergeable: bool,
) -> None:
    """Make a method available to :func:`lmforge.peft.apply` under ``name``."""
    METHODS[name] = Method(name, config_class, inject, mergeable)


def make_config(method: str, options: dict[str, Any]) -> PeftConfig:
    """A method's config from keyword options, with errors that name the option."""
    if method not in METHODS:
        raise LMForgeError(f"unknown PEFT method '{method}'" + did_you_mean(method, METHODS), key="method")
    config_class = METHODS[method].config_class
    names = {f.name for f in dataclasses.fields(config_class)} - {"method"}
    for key in options:
        if key not in names:
            raise LMForgeError(
                f"{method} has no option '{key}'"
                + did_you_mean(key, names)
                + f" (options: {', '.join(sorted(names))})",
                key=key,
            )
    try:
        return config_class(**options)
    except (TypeError, ValueError) as err:
        raise LMForgeError(f"{method}: {err}") from None


# ---- finding targets ---------------------------------------------------------------------------

# Parts of a model that "all-linear" leaves alone: the task head and the LM head are not
# adapted by default (name them in modules_to_save to train them).
_NOT_ALL_LINEAR = re.compile(r"(^|\.)head(\.|$)")


def find_targets(
    model: nn.Module, targets: list[str] | str, *, kinds: tuple[type, ...] = (nn.Linear,)
) -> list[str]:
    """Qualified names of the modules to adapt.

    ``targets`` is a list of names matched against the end of each module's qualified name
    (``"q_proj"`` matches ``decoder.layers.0.self_attn.q_proj``), the string ``"all-linear"`` (every
    nn.Linear outside the head), or any other string, a regular expression that must match the
    whole qualified name.
    """
    names = [n for n, m in model.named_modules() if n and isinstance(unwrap(m), kinds)]
    names = [n for n in names if not n.endswith(".base") and ".adapters." not in n]
    if targets == "all-linear":
        found = [n for n in names if not _NOT_ALL_LINEAR.search(n)]
    elif isinstance(targets, str):
        pattern = re.compile(targets)
        found = [n for n in names if pattern.fullmatch(n)]
    else:
        found = [n for n in names if any(n == t or n.endswith("." + t) for t in targets)]
        for target in targets:
            if not any(n == target or n.endswith("." + target) for n in names):
                short = sorted({n.rsplit(".", 1)[-1] for n in names})
                raise LMForgeError(
                    f"target module '{target}' matches nothing in this model"
                    + did_you_mean(target, short)
                    + f" (candidates: {', '.join(short)})",
                    key="target_modules",
                )
    if not found:
        raise LMForgeError(f"target_modules {targets!r} match no module of this model", key="target_modules")
    return found


def unwrap(module: nn.Module) -> nn.Module:
    """The original module under an AdaptedModule wrapper (or the module itself)."""
    return module.base if isinstance(module, AdaptedModule) else module


def get_submodule_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def wrap(model: nn.Module, name: str, adapter_name: str, adapter: nn.Module) -> AdaptedModule:
    """Put ``adapter`` under ``adapter_name`` on the module ``name``, wrapping it if needed."""
    parent, child = get_submodule_parent(model, name)
    module = getattr(parent, child)
    if not isinstance(module, AdaptedModule):
        module = AdaptedModule(module)
        setattr(parent, child, module)
    if adapter_name in module.adapters:
        raise LMForgeError(f"adapter '{adapter_name}' already exists on {name}", key="adapter_name")
    device, dtype = _device_dtype(module.base)
    module.adapters[adapter_name] = adapter.to(
        device=device, dtype=dtype if dtype.is_floating_point else None
    )
    return module


def _device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    for tensor in list(module.parameters()) + list(module.buffers()):
        return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.get_default_dtype()


def peft_modules(model: nn.Module) -> nn.ModuleDict:
    """The model-level container of seam-based adapters (created on first use)."""
    if not hasattr(model, "peft_modules"):
        model.peft_modules = nn.ModuleDict()
    return model.peft_modules


def seam_slots(model: nn.Module) -> Iterator[SeamSlot]:
    for module in model.modules():
        if isinstance(module, SeamSlot):
            yield module


def adapted_modules(model: nn.Module) -> Iterator[tuple[str, AdaptedModule]]:
    for name, module in model.named_modules():
        if isinstance(module, AdaptedModule):
            yield name, module


# ---- state on the model ------------------------------------------------------------------------


def peft_configs(model: nn.Module) -> dict[str, PeftConfig]:
    """adapter name -> its config (kept on the model as ``model.peft_config``)."""
    if not hasattr(model, "peft_config"):
        object.__setattr__(model, "peft_config", {})
    return model.peft_config


def active_adapter(model: nn.Module) -> str | None:
    return getattr(model, "active_adapter_name", None)


def set_adapter(model: nn.Module, name: str | None) -> None:
    """Make adapter ``name`` the active one everywhere (None: the base model alone), and make its
    parameters (and only those) trainable."""
    configs = peft_configs(model)
    if name is not None and name not in configs:
        raise LMForgeError(f"no adapter named '{name}'" + did_you_mean(name, configs), key="adapter_name")
    for module_name, module in adapted_modules(model):
        if module.merged is not None and module.merged != name:
            raise LMForgeError(
                f"adapter '{module.merged}' is merged into {module_name}: unmerge it before switching adapters"
            )
        module.active = name if name in module.adapters else None
    for slot in seam_slots(model):
        slot.active = name if name in slot.names else None
    object.__setattr__(model, "active_adapter_name", name)
    mark_trainable(model, name)


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Within the block the model behaves as the base model; the active adapter comes back after."""
    previous = active_adapter(model)
    if any(m.merged is not None for _, m in adapted_modules(model)):
        raise LMForgeError("an adapter is merged into the weights: unmerge it before disabling adapters")
    set_adapter(model, None)
    try:
        yield
    finally:
        set_adapter(model, previous)


def mark_trainable(model: nn.Module, name: str | None) -> None:
    """Freeze everything, then unfreeze the parameters of adapter ``name``."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if name is None:
        return
    for parameter in adapter_parameters(model, name).values():
        parameter.requires_grad_(True)


def adapter_parameters(model: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """Qualified name -> parameter, for everything adapter ``name`` owns (its layers, its
    model-level modules, its copies of ``modules_to_save``)."""
    result = {}
    for qualified, parameter in model.named_parameters(remove_duplicate=False):
        parts = qualified.split(".")
        in_layer = any(parts[i] == "adapters" and parts[i + 1] == name for i in range(len(parts) - 1))
        at_model_level = len(parts) > 1 and parts[0] == "peft_modules" and parts[1] == name
        if in_layer or at_model_level:
            result[qualified] = parameter
    return result


def trainable_report(model: nn.Module) -> dict[str, float]:
    """Trainable and total parameter counts (shared tensors once) and the trainable percentage."""
    seen: set[int] = set()
    total = trainable = 0
    for parameter in model.parameters():
        if id(parameter) in seen:
            continue
        seen.add(id(parameter))
        total += parameter.numel()
        trainable += parameter.numel() if parameter.requires_grad else 0
    return {"trainable": trainable, "total": total, "percent": 100.0 * trainable / max(total, 1)}


def format_report(report: dict[str, float]) -> str:
    return (
        f"trainable parameters: {int(report['trainable']):,} of {int(report['total']):,} "
        f"({report['percent']:.3f}%)"
    )


class SavedCopy(AdapterModule):
    """``modules_to_save``: an adapter's own trainable copy of a whole module (e.g. the task head),
    used instead of the base module while the adapter is active."""

    mergeable = True  # merging copies the trained module over the base one

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        import copy

        self.module = copy.deepcopy(module)
        for parameter in self.module.parameters():
            parameter.requires_grad_(True)
        self._saved_base: dict[str, torch.Tensor] | None = None

    def forward(self, base: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    @torch.no_grad()
    def merge(self, base: nn.Module) -> None:
        self._saved_base = {k: v.clone() for k, v in base.state_dict().items()}
        base.load_state_dict(self.module.state_dict())

    @torch.no_grad()
    def unmerge(self, base: nn.Module) -> None:
        if self._saved_base is not None:
            base.load_state_dict(self._saved_base)
            self._saved_base = None


def wrap_modules_to_save(model: nn.Module, config: PeftConfig, adapter_name: str) -> None:
    """Give adapter ``adapter_name`` its own trainable copy of each module in ``modules_to_save``."""
    for target in config.modules_to_save:
        try:
            module = model.get_submodule(target)
        except AttributeError:
            children = [n for n, _ in model.named_children()]
            raise LMForgeError(
                f"modules_to_save: no module '{target}'" + did_you_mean(target, children),
                key="modules_to_save",
            ) from None
        base = module.base if isinstance(module, AdaptedModule) else module
        wrap(model, target, adapter_name, SavedCopy(base))
