"""``lmforge convert``: a Hugging Face model folder <-> an lmforge run directory; a decoder -> GGUF."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch

from ..errors import LMForgeError

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "f32": torch.float32,
    "bf16": torch.bfloat16,
    "f16": torch.float16,
}


def convert(
    source: Path,
    out: Path,
    *,
    to: Literal["hf", "hf-peft", "lmforge", "gguf"],
    model_type: str | None = None,
    head: Literal["auto", "lm", "mlm", "classification", "token_classification", "qa", "none"] = "auto",
    num_labels: int | None = None,
    dtype: Literal["auto", "float32", "bfloat16", "float16", "f32", "f16", "bf16", "q8_0"] = "auto",
) -> int:
    """Convert a model between lmforge and Hugging Face formats.

    ``--to hf RUN_DIR OUT_DIR`` writes config.json + model.safetensors + tokenizer files that
    transformers' ``AutoModel*.from_pretrained`` loads with the same outputs (GPT-2, BERT/RoBERTa,
    Llama/Qwen2/Mistral and T5/mT5 shapes). ``--to lmforge HF_DIR OUT_RUN_DIR`` reads a local
    Hugging Face folder (safetensors, sharded safetensors or pytorch_model.bin), or a GGUF file
    with its tokenizer and chat template, into an lmforge run directory. ``--to hf-peft RUN_DIR
    OUT_DIR`` exports a LoRA, IA3 or prompt-tuning run as OUT_DIR/base (the Hugging Face base
    model) and OUT_DIR/adapter (a Hugging Face PEFT adapter that
    ``peft.PeftModel.from_pretrained(base, OUT_DIR/adapter)`` loads with the same outputs).
    ``--to gguf RUN_DIR OUT.gguf --dtype f16|bf16|q8_0|f32`` writes a Llama-style decoder (a run,
    a merged LoRA run, a Hugging Face folder or a GGUF file) with its tokenizer and chat template
    as a GGUF file for llama.cpp and Ollama (needs the gguf package).

    Args:
        source: the run directory (or Hugging Face folder, or GGUF file) to read.
        out: the folder to write (a file for --to gguf).
        to: the format to write: "hf", "hf-peft" (base + PEFT adapter of a fine-tuning run), "lmforge"
            or "gguf" (a file).
        model_type: --to hf: the Hugging Face model_type to write, e.g. roberta or mistral
            (by default gpt2, bert, llama, qwen2 or t5, from the model's shape).
        head: --to lmforge: the lmforge head to build; auto keeps the checkpoint's own, another
            head starts freshly initialized (to fine-tune a pretrained backbone).
        num_labels: --to lmforge: classes of a new classification head.
        dtype: tensor dtype of the written weights (auto: float32 for lmforge, as is for hf, f16
            for gguf; q8_0: gguf only).
    """
    from ..interop.hf import is_hf_folder, load_hf_folder, save_hf
    from ..runs import load, save_run

    if to == "gguf":
        return _to_gguf(source, out, dtype=dtype, model_type=model_type, head=head, num_labels=num_labels)
    if dtype == "q8_0":
        raise LMForgeError("--dtype q8_0 applies to --to gguf only", key="dtype")
    if out.exists() and not out.is_dir():
        raise LMForgeError("the output exists and is not a folder", file=out)
    torch_dtype = DTYPES.get(dtype)
    if to == "hf":
        if head != "auto" or num_labels is not None:
            raise LMForgeError("--head and --num_labels apply to --to lmforge only", key="head")
        run = load(source)
        from ..peft import active_adapter

        if active_adapter(run.model) is not None:
            raise LMForgeError(
                "this run holds a PEFT adapter: write it with --to hf-peft, or merge it first (lmforge merge)",
                file=source,
            )
        save_hf(run.model, run.tokenizer, out, model_type=model_type, dtype=torch_dtype)
        written = json.loads((out / "config.json").read_text(encoding="utf-8"))
        print(f"wrote a Hugging Face {written['architectures'][0]} ({written['model_type']}) to {out}")
        return 0
    if to == "hf-peft":
        from ..peft import active_adapter
        from ..peft.hf_export import base_model_copy, export_hf_peft

        run = load(source)
        if active_adapter(run.model) is None:
            raise LMForgeError("this run has no PEFT adapter: use --to hf", file=source)
        save_hf(
            base_model_copy(run.model), run.tokenizer, out / "base", model_type=model_type, dtype=torch_dtype
        )
        export_hf_peft(
            run.model, out / "adapter", model_type=model_type, base_model_name_or_path=str(out / "base")
        )
        print(
            f"wrote the base model to {out / 'base'} and the adapter to {out / 'adapter'} "
            f"(peft.PeftModel.from_pretrained(AutoModel….from_pretrained('{out / 'base'}'), '{out / 'adapter'}'))"
        )
        return 0
    if model_type is not None:
        raise LMForgeError("--model_type applies to --to hf only", key="model_type")
    from ..interop.gguf import is_gguf, load_gguf

    if is_gguf(source):  # a GGUF file: its model, tokenizer and chat template
        if head != "auto" or num_labels is not None:
            raise LMForgeError("--head and --num_labels apply to Hugging Face folders", key="head")
        run = load_gguf(source, dtype=torch_dtype)
    elif not is_hf_folder(source):
        raise LMForgeError(
            "not a Hugging Face model folder (no config.json, or an lmforge config.yaml)", file=source
        )
    else:
        run = load_hf_folder(
            source, dtype=torch_dtype, head=None if head == "auto" else head, num_labels=num_labels
        )
    save_run(out, model=run.model, tokenizer=run.tokenizer)
    config = run.model.config
    print(
        f"wrote an lmforge run directory to {out}: {config.arch}, {config.num_layers} layers, "
        f"{config.embed_dim} wide, head {config.head}, {run.model.num_params():,} parameters"
    )
    return 0


def _to_gguf(
    source: Path, out: Path, *, dtype: str, model_type: str | None, head: str, num_labels: int | None
) -> int:
    """``--to gguf``: any model lmforge loads, written as a GGUF file."""
    from ..interop.gguf import save_gguf
    from ..peft import active_adapter
    from ..runs import load

    if model_type is not None or head != "auto" or num_labels is not None:
        raise LMForgeError("--model_type, --head and --num_labels do not apply to --to gguf", key="to")
    if out.is_dir():
        raise LMForgeError("--to gguf writes a file, and this is a folder", file=out)
    gguf_type = {"auto": "f16", "float32": "f32", "float16": "f16", "bfloat16": "bf16"}.get(dtype, dtype)
    run = load(source)
    if active_adapter(run.model) is not None:
        raise LMForgeError("this run holds a PEFT adapter: merge it first (lmforge merge)", file=source)
    counts = save_gguf(run.model, run.tokenizer, out, dtype=gguf_type)
    types = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    size = out.stat().st_size / 2**20
    print(f"wrote a GGUF file ({gguf_type}: {types} tensors, {size:.1f} MiB) to {out}")
    return 0
