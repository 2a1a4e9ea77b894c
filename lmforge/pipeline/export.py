"""Taking a model elsewhere: merge an adapter into its base, convert to and from Hugging Face.

    PEFT run ──merge_adapter_run──► plain model (same outputs, checked on a probe batch) ──► run folder
    run folder ──to_hf──► config.json + model.safetensors + tokenizer files (transformers loads it)
    PEFT run ──to_hf_peft──► OUT/base (Hugging Face model) + OUT/adapter (Hugging Face PEFT adapter)
    Hugging Face folder ──from_hf──► run folder

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
from ..files import BASE_MODEL_KEY, check_output, replace_folder
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
    replace_folder(out, lambda tmp: save_hf(run.model, run.tokenizer, tmp, model_type=model_type, dtype=dtype))
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
    if not is_hf_folder(source):
        raise LMForgeError(
            "not a Hugging Face model folder (no config.json, or an lmforge config.yaml)", file=source
        )
    model = load_hf_model(source, head=head, num_labels=num_labels, dtype=dtype)
    save_run(out, model=model, tokenizer=load_hf_tokenizer(source), overwrite=overwrite)
    return model
