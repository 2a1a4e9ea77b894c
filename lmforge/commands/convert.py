"""``lmforge convert``: a Hugging Face model folder <-> an lmforge run directory."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from ..errors import LMForgeError
from ..peft import get_method, method_names
from ..pipeline.export import from_hf, to_gguf, to_hf, to_hf_peft

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
    overwrite: bool = False,
) -> int:
    """Convert a model between lmforge, Hugging Face and GGUF formats.

    ``--to hf RUN_DIR OUT_DIR`` writes config.json + model.safetensors + tokenizer files that
    transformers' ``AutoModel*.from_pretrained`` loads with the same outputs (GPT-2, BERT/RoBERTa,
    Llama/Qwen2/Mistral and T5/mT5 shapes). ``--to lmforge HF_DIR OUT_RUN_DIR`` reads a local
    Hugging Face folder (safetensors, sharded safetensors or pytorch_model.bin), or a GGUF file
    with its tokenizer and chat template, into an lmforge run directory. ``--to hf-peft RUN_DIR
    OUT_DIR`` exports a PEFT run ({exportable}) as OUT_DIR/base (the Hugging Face base model) and
    OUT_DIR/adapter (a Hugging Face PEFT adapter that ``peft.PeftModel.from_pretrained(base,
    OUT_DIR/adapter)`` loads with the same outputs). ``--to gguf RUN_DIR OUT.gguf --dtype
    f16|bf16|q8_0|f32`` writes a Llama-style decoder (a run, a merged LoRA run, a Hugging Face
    folder or a GGUF file) with its tokenizer and chat template as a GGUF file for llama.cpp and
    Ollama (needs the gguf package).

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
        overwrite: replace what OUT holds, as a whole: the new output is written beside it and swapped in at the end (without it, an occupied OUT is an error and nothing is touched).
    """
    if to == "gguf":
        if model_type is not None or head != "auto" or num_labels is not None:
            raise LMForgeError("--model_type, --head and --num_labels do not apply to --to gguf", key="to")
        written = to_gguf(source, out, dtype=dtype, overwrite=overwrite)
        types = ", ".join(f"{n} {kind}" for kind, n in sorted(written.tensor_types.items(), key=lambda kv: -kv[1]))
        print(f"wrote a GGUF file ({written.dtype}: {types} tensors, {written.size / 2**20:.1f} MiB) to {out}")
        return 0
    if dtype == "q8_0":
        raise LMForgeError("--dtype q8_0 applies to --to gguf only", key="dtype")
    torch_dtype = DTYPES.get(dtype)
    if to != "lmforge" and (head != "auto" or num_labels is not None):
        raise LMForgeError("--head and --num_labels apply to --to lmforge only", key="head")
    if to == "hf":
        written = to_hf(source, out, model_type=model_type, dtype=torch_dtype, overwrite=overwrite)
        print(f"wrote a Hugging Face {written['architectures'][0]} ({written['model_type']}) to {out}")
        return 0
    if to == "hf-peft":
        base, adapter = to_hf_peft(source, out, model_type=model_type, dtype=torch_dtype, overwrite=overwrite)
        print(
            f"wrote the base model to {base} and the adapter to {adapter} "
            f"(peft.PeftModel.from_pretrained(AutoModel….from_pretrained('{base}'), '{adapter}'))"
        )
        return 0
    if model_type is not None:
        raise LMForgeError("--model_type applies to --to hf only", key="model_type")
    model = from_hf(
        source,
        out,
        head=None if head == "auto" else head,
        num_labels=num_labels,
        dtype=torch_dtype,
        overwrite=overwrite,
    )
    config = model.config
    print(
        f"wrote an lmforge run directory to {out}: {config.arch}, {config.num_layers} layers, "
        f"{config.embed_dim} wide, head {config.head}, {model.num_params():,} parameters"
    )
    return 0


# The list in --help comes from the PEFT method registry.
convert.__doc__ = (convert.__doc__ or "").format(
    exportable=", ".join(n for n in method_names() if get_method(n).hf_export is not None)
)
