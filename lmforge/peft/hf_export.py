"""Export adapters in the Hugging Face PEFT format (``peft``'s ``save_pretrained`` layout).

The folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` as ``peft`` writes them,
so ``peft.PeftModel.from_pretrained(base, folder)`` loads the adapter onto the Hugging Face export
of the base model (:func:`lmforge.interop.hf.save_hf`) and gives the same outputs. This module is
the shared machinery: it translates module names with the interop tables (lmforge's
``encoder.layers.0.self_attn.q_proj`` becomes BERT's ``bert.encoder.layer.0.attention.self.query``),
writes the task head (``modules_to_save``), ``target_modules`` and the common config fields, and
writes the folder. What a method's adapter holds and how its tensors are named comes from the
method's record (:class:`lmforge.peft.base.HFExport`); a method without one says why it has none.
``peft`` itself is never imported.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..errors import LMForgeError
from ..files import atomic_write, atomic_write_text
from ..interop.hf import export_family
from .base import (
    AdapterModule,
    HFExportContext,
    SavedCopy,
    active_adapter,
    adapted_modules,
    get_method,
    method_names,
    peft_configs,
)
from .lifecycle import delete_adapter, unmerge

TASK_TYPES = {  # (arch, head) -> peft task_type
    ("decoder", "lm"): "CAUSAL_LM",
    ("encoder_decoder", "lm"): "SEQ_2_SEQ_LM",
    ("encoder", "classification"): "SEQ_CLS",
    ("decoder", "classification"): "SEQ_CLS",
    ("encoder", "token_classification"): "TOKEN_CLS",
    ("encoder", "qa"): "QUESTION_ANS",
    ("encoder", "none"): "FEATURE_EXTRACTION",
    ("decoder", "none"): "FEATURE_EXTRACTION",
}


def hf_parameter_names(model: nn.Module, model_type: str | None = None) -> dict[str, str]:
    """lmforge parameter name -> full Hugging Face tensor name, for parameters stored the same way
    on both sides (fused or transposed tensors, such as GPT-2's c_attn, are left out)."""
    config = model.config
    family = export_family(config, model_type)
    backbone = {rule.hf for rule in family.backbone_rules(config)}
    prefix = "" if config.head == "none" else family.base_prefix
    names = {}
    for rule in family.rules(config):
        if rule.as_is:
            # BERT's pooler counts as head in lmforge but lives in the backbone (bert.pooler) in Hugging Face
            inside = rule.hf in backbone or rule.hf.startswith("pooler.")
            names[rule.lm[0]] = (prefix + rule.hf) if inside else rule.hf
    return names


def export_hf_peft(
    model: nn.Module,
    out_dir: str | Path,
    *,
    name: str | None = None,
    model_type: str | None = None,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write adapter ``name`` (default: the active one) as a Hugging Face PEFT adapter folder.

    Raises:
        LMForgeError: a method (or an option of it) the format cannot hold, with the method's
            reason, or a layer stored differently by Hugging Face (GPT-2's fused Conv1D).
    """
    name = name or active_adapter(model)
    configs = peft_configs(model)
    if name is None or name not in configs:
        raise LMForgeError("the model has no adapter to export")
    config = configs[name]
    method = get_method(config.method)
    export = method.hf_export
    if export is None:
        exportable = ", ".join(n for n in method_names() if get_method(n).hf_export is not None)
        raise LMForgeError(
            f"cannot export {config.method} adapter '{name}' to the Hugging Face PEFT format "
            f"(it covers {exportable}): {method.no_hf_export_reason}"
        )
    names = hf_parameter_names(model, model_type)
    root = "base_model." if export.prompt_learning else "base_model.model."
    layers, saved = _adapted_layers(model, name, names)
    context = HFExportContext(model=model, adapter_name=name, config=config, layers=layers)
    method_fields = export.config(context)  # first: it refuses options the format cannot hold

    tensors = {root + hf_name: value for hf_name, value in saved.items()}
    if export.layer_tensors is not None:
        for hf_module, layer in layers.items():
            for suffix, value in export.layer_tensors(layer).items():
                tensors[f"{root}{hf_module}.{suffix}"] = value
    if export.model_tensors is not None:
        tensors.update(export.model_tensors(context))

    arch, head = model.config.arch, model.config.head
    meta: dict[str, Any] = {
        "base_model_name_or_path": base_model_name_or_path,
        "task_type": TASK_TYPES.get((arch, head)),
        "inference_mode": True,
        "modules_to_save": sorted({hf_name.rsplit(".", 1)[0] for hf_name in saved}) or None,
        "revision": None,
    }
    if export.layer_tensors is not None:
        meta["target_modules"] = list(layers)
    meta.update(method_fields)
    _write(Path(out_dir), tensors, meta)
    return Path(out_dir)


def _adapted_layers(
    model: nn.Module, name: str, names: dict[str, str]
) -> tuple[dict[str, AdapterModule], dict[str, torch.Tensor]]:
    """Adapter ``name``'s layers by Hugging Face module name, and its ``modules_to_save`` copies'
    tensors by Hugging Face tensor name."""
    layers: dict[str, AdapterModule] = {}
    saved: dict[str, torch.Tensor] = {}
    for module_name, module in adapted_modules(model):
        if name not in module.adapters:
            continue
        adapter = module.adapters[name]
        if isinstance(adapter, SavedCopy):
            for param_name, value in adapter.module.state_dict().items():
                hf_name = names.get(f"{module_name}.{param_name}")
                if hf_name is None:
                    raise LMForgeError(
                        f"cannot export {module_name}.{param_name}: no Hugging Face counterpart"
                    )
                saved[hf_name] = value
            continue
        weight = names.get(f"{module_name}.weight")
        if weight is None:
            raise LMForgeError(
                f"cannot export to the Hugging Face PEFT format: {module_name} has no plain counterpart "
                f"in the {model.config.arch} export (fused or transposed there, e.g. GPT-2's Conv1D)"
            )
        layers[weight.removesuffix(".weight")] = adapter
    return layers, saved


def _write(out: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(
        out / "adapter_model.safetensors", lambda p: save_file(state, str(p), metadata={"format": "pt"})
    )
    atomic_write_text(out / "adapter_config.json", json.dumps(meta, indent=2, sort_keys=True) + "\n")


def base_model_copy(model: nn.Module) -> nn.Module:
    """A copy of the base model with every adapter removed (for exporting the base alongside)."""
    plain = copy.deepcopy(model)
    unmerge(plain)
    for adapter_name in list(peft_configs(plain)):
        delete_adapter(plain, adapter_name)
    return plain
