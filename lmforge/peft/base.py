"""The contract every PEFT method follows, and the machinery they share.

A method is one module: a config dataclass (subclass of :class:`PeftConfig`), the layer or module
that carries its parameters, and one :func:`register_peft_method` call (after Hugging Face PEFT's
``register_peft_method`` and torchtune's ``AdapterModule.adapter_params()``). The call's record,
:class:`Method`, carries everything the rest of lmforge needs to know about the method: whether it
merges (and why not), the callbacks the training loop runs for it, its Hugging Face PEFT export
(or why it has none), and whether fine-tuning keeps the best validation weights. ``lmforge.peft``
imports every module of the package, so a new module is found without being listed anywhere.
Everything else — choosing target modules, freezing, several named adapters on one base,
switching, disabling, merging, saving — is generic and lives here.

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
import copy
import dataclasses
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import LMForgeError, did_you_mean
from ..hooks import Callback


@dataclass
class PeftConfig:
    """Options every method shares; each method subclasses it with its own."""

    method: str = ""  # set by each subclass
    modules_to_save: list[str] = field(default_factory=list)  # e.g. ["head"]: trained and saved whole

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class AdapterModule(nn.Module):
    """One adapter of one wrapped module. ``forward(base, *args)`` returns the adapted output.

    Mergeable methods (``register_peft_method(..., mergeable=True)``) override :meth:`merge` and
    :meth:`unmerge`; :func:`lmforge.peft.merge` refuses the others with the record's reason before
    it gets here.
    """

    # An additive method (plain LoRA) changes the output by a term of its own, y = base(x) +
    # output_delta(x): rows of one batch that use different adapters then share the base's matmul and
    # each adds its own delta (per-row adapters, see AdaptedModule.routes).
    additive: bool = False

    def output_delta(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - overridden where additive
        """The adapter's own term of the output (additive methods only)."""
        raise NotImplementedError(f"{type(self).__name__} is not additive")

    def merge(self, base: nn.Module) -> None:  # pragma: no cover - overridden where mergeable
        raise LMForgeError(f"{type(self).__name__} cannot be merged into the base weights")

    def unmerge(self, base: nn.Module) -> None:  # pragma: no cover - overridden where mergeable
        raise LMForgeError(f"{type(self).__name__} cannot be merged into the base weights")


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
        # Per-row adapters for a batch of requests (a server: see route_rows): (adapter name or
        # None, the rows of dim 0 it serves); None: every row goes through the active adapter.
        self.routes: list[tuple[str | None, torch.Tensor]] | None = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.routes is not None:
            return self._routed(*args, **kwargs)
        return self._through(self.active, *args, **kwargs)

    def _through(self, name: str | None, *args: Any, **kwargs: Any) -> Any:
        if name is None or name not in self.adapters or name == self.merged:
            return self.base(*args, **kwargs)
        return self.adapters[name](self.base, *args, **kwargs)

    def _routed(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """Each group of rows of ``x`` through its own adapter. Additive adapters share one pass
        of the base over all rows and add their deltas to their rows (as S-LoRA / Punica batch
        LoRA adapters); any other adapter runs the base on its rows only (grouped per adapter)."""
        assert self.routes is not None
        routes = [(n if n in self.adapters and n != self.merged else None, rows) for n, rows in self.routes]
        if len(routes) == 1:
            return self._through(routes[0][0], x, *args, **kwargs)
        if all(name is None or self.adapters[name].additive for name, _ in routes):
            out = self.base(x, *args, **kwargs)
            for name, rows in routes:
                if name is not None:
                    out.index_add_(0, rows, self.adapters[name].output_delta(x.index_select(0, rows)))
            return out
        parts = [(rows, self._through(name, x.index_select(0, rows), *args, **kwargs)) for name, rows in routes]
        out = parts[0][1].new_empty((x.shape[0], *parts[0][1].shape[1:]))
        for rows, part in parts:
            out.index_copy_(0, rows, part)
        return out


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


@dataclass(frozen=True)
class HFExportContext:
    """What a method's Hugging Face PEFT export sees (built by :mod:`lmforge.peft.hf_export`)."""

    model: nn.Module
    adapter_name: str
    config: PeftConfig
    layers: dict[str, AdapterModule]  # Hugging Face module name -> this adapter's layer on it


@dataclass(frozen=True)
class HFExport:
    """A method's part of the Hugging Face PEFT export; :func:`lmforge.peft.hf_export.export_hf_peft`
    does the rest (module names, ``target_modules``, the task head, writing the folder).

    ``config`` returns the method's fields of ``adapter_config.json`` (``peft_type`` first) and
    raises :class:`LMForgeError` for options the format cannot hold. ``layer_tensors`` names one
    adapted layer's tensors as ``adapter_model.safetensors`` holds them, relative to the layer
    (``{"lora_A.weight": A, ...}``); ``model_tensors`` gives the tensors that belong to no layer
    (prompt tuning's ``prompt_embeddings``), named from the file's root.
    """

    config: Callable[[HFExportContext], dict[str, Any]]
    layer_tensors: Callable[[AdapterModule], dict[str, torch.Tensor]] | None = None
    model_tensors: Callable[[HFExportContext], dict[str, torch.Tensor]] | None = None
    prompt_learning: bool = False  # Hugging Face names the modules under base_model. (not base_model.model.)


CallbackFactory = Callable[[nn.Module, str, PeftConfig], list[Callback]]


@dataclass(frozen=True)
class Method:
    """Everything lmforge knows about one PEFT method (one record per :func:`register_peft_method`)."""

    name: str  # what peft.apply, --method and adapter_config.json call it
    config_class: type[PeftConfig]  # its options
    inject: Callable[[nn.Module, Any, str], None]  # (model, config, adapter name) -> None
    mergeable: bool  # whether merge() can fold it into the base weights
    not_mergeable_reason: str = ""  # why not, for people (when mergeable is False)
    callbacks: CallbackFactory | None = None  # (model, adapter name, config) -> callbacks the loop runs
    hf_export: HFExport | None = None  # its Hugging Face PEFT export
    no_hf_export_reason: str = ""  # why it has none (when hf_export is None)
    keep_best: bool = True  # fine-tuning keeps the best validation weights (False: the last ones)


METHODS: dict[str, Method] = {}


def register_peft_method(
    name: str,
    config_class: type[PeftConfig],
    inject: Callable[[nn.Module, Any, str], None],
    *,
    mergeable: bool,
    not_mergeable_reason: str = "",
    callbacks: CallbackFactory | None = None,
    hf_export: HFExport | None = None,
    no_hf_export_reason: str = "",
    keep_best: bool = True,
) -> Method:
    """Make a method available to :func:`lmforge.peft.apply` (and ``--method``) under ``name``.

    Raises:
        LMForgeError: a name already taken, a config class whose ``method`` is not ``name``, a
            method that does not merge without saying why, or one without export or reason.
    """
    if name in METHODS:
        raise LMForgeError(
            f"PEFT method '{name}' is already registered (by {METHODS[name].config_class.__name__})"
        )
    default = next((f.default for f in dataclasses.fields(config_class) if f.name == "method"), None)
    if default != name:
        raise LMForgeError(f"{config_class.__name__}.method is {default!r}, registered as '{name}'")
    if mergeable == bool(not_mergeable_reason):
        raise LMForgeError(f"PEFT method '{name}': give not_mergeable_reason exactly when it cannot merge")
    if (hf_export is None) != bool(no_hf_export_reason):
        raise LMForgeError(f"PEFT method '{name}': give either hf_export or no_hf_export_reason")
    record = Method(
        name=name,
        config_class=config_class,
        inject=inject,
        mergeable=mergeable,
        not_mergeable_reason=not_mergeable_reason,
        callbacks=callbacks,
        hf_export=hf_export,
        no_hf_export_reason=no_hf_export_reason,
        keep_best=keep_best,
    )
    METHODS[name] = record
    return record


def get_method(name: str) -> Method:
    """The record of method ``name``.

    Raises:
        LMForgeError: an unknown name (with the nearest known one).
    """
    if name not in METHODS:
        raise LMForgeError(f"unknown PEFT method '{name}'" + did_you_mean(name, METHODS), key="method")
    return METHODS[name]


def method_names() -> list[str]:
    """The registered methods' names, in registration order."""
    return list(METHODS)


def make_config(method: str, options: dict[str, Any]) -> PeftConfig:
    """A method's config from keyword options, with errors that name the option."""
    config_class = get_method(method).config_class
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
def route_rows(model: nn.Module, names: Sequence[str | None]) -> Iterator[None]:
    """Within the block, row i of every batch (dim 0) goes through adapter ``names[i]`` (None: the
    base alone), whatever adapter is active: requests for different adapters decoded together.

    Only adapters that wrap layers can be routed per row: a seam (prefix or prompt tuning) changes
    the keys or the sequence of the whole batch.

    Raises:
        LMForgeError: an unknown adapter name, or one that plugs into a seam.
    """
    configs = peft_configs(model)
    seams = {name for slot in seam_slots(model) for name in slot.names}
    groups: dict[str | None, list[int]] = {}
    for row, name in enumerate(names):
        if name is not None and name not in configs:
            raise LMForgeError(f"no adapter named '{name}'" + did_you_mean(name, configs), key="adapter_name")
        if name in seams:
            raise LMForgeError(
                f"adapter '{name}' ({configs[name].method}) plugs into a seam of the whole batch: it cannot "
                "be chosen per row (adapters that wrap layers can: LoRA, IA3, ...)",
                key="adapter_name",
            )
        groups.setdefault(name, []).append(row)
    modules = [module for _, module in adapted_modules(model)]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    routes = [(name, torch.tensor(rows, dtype=torch.long, device=device)) for name, rows in groups.items()]
    for module in modules:
        module.routes = routes
    try:
        yield
    finally:
        for module in modules:
            module.routes = None


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
    used instead of the base module while the adapter is active. Merging copies the trained module
    over the base one."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
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
        if isinstance(module, AdaptedModule) and adapter_name in module.adapters:
            raise LMForgeError(
                f"modules_to_save names '{target}', which the {config.method} adapter already adapts: "
                "train it with the method, or name another module",
                key="modules_to_save",
            )
        base = module.base if isinstance(module, AdaptedModule) else module
        wrap(model, target, adapter_name, SavedCopy(base))
