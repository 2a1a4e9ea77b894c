"""Export LoRA, IA3 and prompt-tuning adapters in the Hugging Face PEFT format.

The folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` as ``peft`` writes them,
so ``peft.PeftModel.from_pretrained(base, folder)`` loads the adapter onto the Hugging Face export
of the base model (:func:`lmforge.interop.hf.save_hf`) and gives the same outputs. Module names are
translated with the interop tables (lmforge's ``encoder.layers.0.self_attn.q_proj`` becomes BERT's
``bert.encoder.layer.0.attention.self.query``). ``peft`` itself is never imported.
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
from .base import SavedCopy, active_adapter, adapted_modules, peft_configs
from .ia3 import IA3Config, IA3Linear
from .lora import LoraConfig, LoraLinear
from .prompts import PromptConfig

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
    from ..interop.hf import export_family

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
        LMForgeError: a method the format cannot hold here (only LoRA/rsLoRA, IA3 and prompt
            tuning), or a layer stored differently by Hugging Face (GPT-2's fused Conv1D).
    """
    name = name or active_adapter(model)
    configs = peft_configs(model)
    if name is None or name not in configs:
        raise LMForgeError("the model has no adapter to export")
    config = configs[name]
    names = hf_parameter_names(model, model_type)
    arch, head = model.config.arch, model.config.head
    tensors: dict[str, torch.Tensor] = {}
    targets: list[str] = []
    feedforward: list[str] = []
    prompt_learning = isinstance(config, PromptConfig)
    root = "base_model." if prompt_learning else "base_model.model."

    def hf_module(module_name: str) -> str:
        weight = names.get(f"{module_name}.weight")
        if weight is None:
            raise LMForgeError(
                f"cannot export to the Hugging Face PEFT format: {module_name} has no plain counterpart "
                f"in the {model.config.arch} export (fused or transposed there, e.g. GPT-2's Conv1D)"
            )
        return weight.removesuffix(".weight")

    saved: list[str] = []
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
                tensors[root + hf_name] = value
                saved.append(hf_name.rsplit(".", 1)[0])
            continue
        hf = hf_module(module_name)
        if isinstance(adapter, LoraLinear) and isinstance(config, LoraConfig) and not config.use_dora:
            tensors[f"{root}{hf}.lora_A.weight"] = adapter.lora_A.detach()
            tensors[f"{root}{hf}.lora_B.weight"] = adapter.lora_B.detach()
        elif isinstance(adapter, IA3Linear):
            scale = adapter.scale.detach()
            tensors[f"{root}{hf}.ia3_l"] = scale[None, :] if adapter.feedforward else scale[:, None]
            if adapter.feedforward:
                feedforward.append(hf)
        else:
            raise LMForgeError(
                f"the Hugging Face PEFT export covers LoRA (with rsLoRA), IA3 and prompt tuning, not {config.method}"
                + (" with DoRA" if getattr(config, "use_dora", False) else "")
            )
        targets.append(hf)

    meta: dict[str, Any] = {
        "base_model_name_or_path": base_model_name_or_path,
        "task_type": TASK_TYPES.get((arch, head)),
        "inference_mode": True,
        "modules_to_save": sorted(set(saved)) or None,
        "revision": None,
    }
    if isinstance(config, LoraConfig):
        meta.update(
            peft_type="LORA",
            r=config.r,
            lora_alpha=config.alpha,
            lora_dropout=config.dropout,
            target_modules=targets,
            use_rslora=config.use_rslora,
            use_dora=False,
            bias="none",
            fan_in_fan_out=False,
            init_lora_weights=True,
        )
    elif isinstance(config, IA3Config):
        meta.update(
            peft_type="IA3",
            target_modules=targets,
            feedforward_modules=feedforward,
            fan_in_fan_out=False,
            init_ia3_weights=True,
        )
    elif prompt_learning:
        if head == "classification" and model.config.pooling == "cls":
            raise LMForgeError(
                "cannot export prompt tuning with a [CLS]-pooled classifier: Hugging Face PEFT puts the virtual "
                "tokens first and pools the first of them, lmforge pools the real [CLS] token"
            )
        prompts = model.peft_modules[name].prompts().detach()
        tensors["prompt_embeddings"] = prompts
        meta.update(
            peft_type="PROMPT_TUNING",
            num_virtual_tokens=prompts.shape[0],
            token_dim=prompts.shape[1],
            num_transformer_submodules=2 if arch == "encoder_decoder" else 1,
            num_attention_heads=model.config.num_heads,
            num_layers=model.config.num_layers,
            prompt_tuning_init="RANDOM",
            prompt_tuning_init_text=None,
            tokenizer_name_or_path=None,
        )
        if arch == "encoder_decoder":
            raise LMForgeError(
                "prompt-tuning export covers encoders and decoders (lmforge prompts only the encoder)"
            )
    else:
        raise LMForgeError(
            f"the Hugging Face PEFT export covers LoRA, IA3 and prompt tuning, not {config.method}"
        )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from ..files import atomic_write, atomic_write_text

    state = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(
        out / "adapter_model.safetensors", lambda p: save_file(state, str(p), metadata={"format": "pt"})
    )
    atomic_write_text(out / "adapter_config.json", json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return out


def base_model_copy(model: nn.Module) -> nn.Module:
    """A copy of the base model with every adapter removed (for exporting the base alongside)."""
    from . import delete_adapter, unmerge

    plain = copy.deepcopy(model)
    unmerge(plain)
    for adapter_name in list(peft_configs(plain)):
        delete_adapter(plain, adapter_name)
    return plain
