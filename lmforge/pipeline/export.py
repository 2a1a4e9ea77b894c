"""Taking a model elsewhere: merge an adapter into its base, convert to and from Hugging Face.

    PEFT run ──merge_adapter_run──► plain model (same outputs, checked on a probe batch) ──► run folder
    run folder ──to_hf──► config.json + model.safetensors + tokenizer files (transformers loads it)
    PEFT run ──to_hf_peft──► OUT/base (Hugging Face model) + OUT/adapter (Hugging Face PEFT adapter)
    Hugging Face folder or GGUF file ──from_hf──► run folder
    decoder run (a merged LoRA run, say) ──to_gguf──► OUT.gguf (llama.cpp, Ollama, LM Studio)

``lmforge merge`` and ``lmforge convert`` call these and print what was written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import peft
from ..errors import LMForgeError
from ..files import BASE_MODEL_KEY, check_output, check_writable, replace_folder
from ..interop.gguf import is_gguf, load_gguf
from ..interop.gguf_writer import save_gguf
from ..interop.hf import is_hf_folder, load_hf_model, load_hf_tokenizer, save_hf
from ..peft.hf_export import base_model_copy, export_hf_peft
from ..runs import load, save_run


@dataclass
class Merged:
    """What :func:`merge_adapter_run` wrote."""

    out: Path
    method: str
    adapter: str
    num_params: int
    max_difference: float | None  # the largest output change on the probe batch (None: not checked)


def probe_batch(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A small deterministic batch the model accepts."""
    config = model.config
    ids = torch.randint(0, config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    ids = ids.to(next(model.parameters()).device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids, dtype=torch.bool)}
    if config.arch == "encoder_decoder":
        batch["decoder_input_ids"] = ids[:, :5]
    return batch


def merge_adapter_run(source: Path, out: Path, *, check: bool = True, overwrite: bool = False) -> Merged:
    """Fold a PEFT run's adapter into its base and write a plain run folder at ``out``.

    Raises:
        LMForgeError: no adapter, a method that cannot merge (saying why), or merged outputs
            that differ from the adapter model's (``check``).
    """
    check_output(out, overwrite=overwrite)
    run = load(source)
    model = run.model
    name = peft.active_adapter(model)
    if name is None:
        raise LMForgeError("this run has no adapter to merge (it is already a plain model)", file=source)
    method = peft.peft_configs(model)[name].method
    probe = probe_batch(model)
    with torch.no_grad():
        before = model(**probe).logits if check else None
    peft.merge_and_unload(model, name)
    worst = None
    if before is not None:
        with torch.no_grad():
            after = model(**probe).logits
        worst = float((after - before).abs().max())
        if worst > 1e-3 * max(1.0, float(before.abs().max())):
            raise LMForgeError(f"the merged model's outputs differ from the adapter model's by {worst:.2e}")
    config = {k: v for k, v in run.config.items() if k not in ("model", BASE_MODEL_KEY)}
    config["merged_from"] = {"run": str(source), "method": method, "adapter": name}
    save_run(out, model=model, tokenizer=run.tokenizer, config=config, overwrite=overwrite)
    return Merged(out, method, name, model.num_params(), worst)


def to_hf(
    source: Path,
    out: Path,
    *,
    model_type: str | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> dict:
    """Write a run folder as a Hugging Face folder; returns the written config.json."""
    check_output(out, overwrite=overwrite)
    run = load(source)
    if peft.active_adapter(run.model) is not None:
        raise LMForgeError(
            "this run holds a PEFT adapter: write it with --to hf-peft, or merge it first (lmforge merge)",
            file=source,
        )
    labels = label_names(run.config, run.model.config)
    replace_folder(
        out,
        lambda tmp: save_hf(run.model, run.tokenizer, tmp, model_type=model_type, dtype=dtype, labels=labels),
    )
    return json.loads((out / "config.json").read_text(encoding="utf-8"))


def to_hf_peft(
    source: Path,
    out: Path,
    *,
    model_type: str | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> tuple[Path, Path]:
    """Write a PEFT run as OUT/base (Hugging Face model) and OUT/adapter (Hugging Face PEFT adapter)
    whose ``base_model_name_or_path`` is the absolute path of OUT/base."""
    check_output(out, overwrite=overwrite)
    run = load(source)
    if peft.active_adapter(run.model) is None:
        raise LMForgeError("this run has no PEFT adapter: use --to hf", file=source)
    base = (out / "base").resolve()

    def write(tmp: Path) -> None:
        save_hf(base_model_copy(run.model), run.tokenizer, tmp / "base", model_type=model_type, dtype=dtype)
        export_hf_peft(run.model, tmp / "adapter", model_type=model_type, base_model_name_or_path=str(base))

    replace_folder(out, write)
    return out / "base", out / "adapter"


def from_hf(
    source: Path,
    out: Path,
    *,
    head: str | None = None,
    num_labels: int | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Any:
    """Read a Hugging Face folder and write it as a run folder; returns the model."""
    check_output(out, overwrite=overwrite)
    if is_gguf(source):  # a GGUF file: its model, tokenizer and chat template
        if head is not None or num_labels is not None:
            raise LMForgeError("--head and --num_labels apply to Hugging Face folders", key="head")
        found = load_gguf(source, dtype=dtype)
        save_run(out, model=found.model, tokenizer=found.tokenizer, config=found.config, overwrite=overwrite)
        return found.model
    if not is_hf_folder(source):
        raise LMForgeError(
            "not a Hugging Face model folder (no config.json, or an lmforge config.yaml)", file=source
        )
    model = load_hf_model(source, head=head, num_labels=num_labels, dtype=dtype)
    config: dict[str, Any] = {}
    names = hf_label_names(source)
    if model.config.head in LABELED_HEADS and names and len(names) == model.config.num_labels:
        # The class names come along, so lmforge eval / predict print them (not LABEL_0, LABEL_1).
        config = {"task": LABELED_HEADS[model.config.head], "task_state": {"labels": names}}
    save_run(out, model=model, tokenizer=load_hf_tokenizer(source), config=config, overwrite=overwrite)
    return model


LABELED_HEADS = {"classification": "classification", "token_classification": "tagging"}


def label_names(run_config: dict[str, Any], model_config: Any) -> list[str] | None:
    """The class names a run was trained with (its task state), for a head with that many classes."""
    if model_config.head not in LABELED_HEADS:
        return None
    names = (run_config.get("task_state") or {}).get("labels")
    return list(names) if names and len(names) == model_config.num_labels else None


def hf_label_names(folder: Path) -> list[str] | None:
    """``id2label`` of a Hugging Face config.json in index order (None when absent or LABEL_i)."""
    try:
        id2label = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("id2label") or {}
    except (OSError, ValueError):
        return None
    names = [id2label[k] for k in sorted(id2label, key=int)] if all(k.isdigit() for k in id2label) else []
    if not names or names == [f"LABEL_{i}" for i in range(len(names))]:
        return None
    return names


@dataclass
class WrittenGGUF:
    """What :func:`to_gguf` wrote."""

    path: Path
    dtype: str  # f32, f16, bf16 or q8_0 (the matrices; 1-D tensors stay F32)
    tensor_types: dict[str, int]  # GGML type -> tensors written in it
    size: int  # bytes


def to_gguf(source: Path, out: Path, *, dtype: str = "auto", overwrite: bool = False) -> WrittenGGUF:
    """Write a decoder (a run, a merged LoRA run, a Hugging Face folder, a GGUF file) with its
    tokenizer and chat template as one GGUF file.

    Raises:
        LMForgeError: a folder at ``out``, an existing file (without ``overwrite``), an adapter
            run (merge it first), or a model GGUF cannot describe.
    """
    if out.is_dir():
        raise LMForgeError("--to gguf writes a file, and this is a folder", file=out)
    check_writable(out.parent, what="output's folder")
    if out.exists() and not overwrite:
        raise LMForgeError("the output file exists: choose another name, or add --overwrite", file=out)
    kind = {"auto": "f16", "float32": "f32", "float16": "f16", "bfloat16": "bf16"}.get(dtype, dtype)
    run = load(source)
    if peft.active_adapter(run.model) is not None:
        raise LMForgeError("this run holds a PEFT adapter: merge it first (lmforge merge)", file=source)
    counts = save_gguf(run.model, run.tokenizer, out, dtype=kind)
    return WrittenGGUF(out, kind, counts, out.stat().st_size)
