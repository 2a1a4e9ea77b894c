"""Writing GGUF files: an lmforge Llama-style decoder and its tokenizer as one file that llama.cpp,
Ollama, LM Studio and transformers' GGUF loader read (GGUF specification: docs/gguf.md in the ggml
repository). Written with the ``gguf`` package's writer, tensor by tensor; reading is
:mod:`lmforge.interop.gguf`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..config import ModelConfig
from ..errors import LMForgeError
from ..files import atomic_write
from .common import check_config, model_tensors
from .gguf import gguf_package, tensor_rules
from .gguf_vocab import tokenizer_metadata
from .llama import Llama

if TYPE_CHECKING:
    from ..model import Transformer
    from ..tokenizers import Tokenizer

# --dtype of lmforge convert --to gguf -> GGML type name (2-D weights; 1-D tensors stay F32)
WRITE_TYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}
FILE_TYPES = {"F32": 0, "F16": 1, "Q8_0": 7, "BF16": 32}  # general.file_type (gguf.LlamaFileType)


def gguf_architecture(config: ModelConfig) -> str:
    """``llama`` or ``qwen2`` (q/k/v biases only) for a decoder lmforge can write as GGUF.

    Raises:
        LMForgeError: the model is not a Llama-style decoder with an LM head (the field named).
    """

    if not Llama.matches(config):
        raise LMForgeError(
            f"GGUF export needs a Llama-style decoder (arch decoder, position rope, norm rmsnorm); "
            f"this model has arch={config.arch}, position={config.position}, norm={config.norm}",
            key="arch",
        )
    architecture = Llama.model_type_for(config)
    Llama(architecture).write(config)  # every field with no Llama/Qwen2 equivalent is refused
    check_config(config, "head", ["lm"], "GGUF")
    check_config(config, "activation", ["silu"], "GGUF")
    check_config(config, "bias", [False], "GGUF")
    return architecture


def save_gguf(
    model: Transformer,
    tokenizer: Tokenizer,
    path: str | Path,
    *,
    dtype: str = "f16",
    name: str | None = None,
) -> dict[str, int]:
    """Write ``model`` and ``tokenizer`` as a GGUF file that llama.cpp, Ollama and transformers'
    GGUF loader read.

    Args:
        model: a Llama-style lmforge decoder with an LM head (``llama``; ``qwen2`` when it has
            q/k/v biases only).
        tokenizer: its byte-level BPE tokenizer (with the chat template, if any).
        path: the file to write (atomically: a temporary file renamed).
        dtype: ``f32``, ``f16``, ``bf16`` or ``q8_0`` for the matrices; 1-D tensors stay F32.
        name: ``general.name`` (default: the file's stem).

    Returns:
        how many tensors were written in each GGML type, e.g. ``{"Q8_0": 211, "F32": 61}``.

    Raises:
        LMForgeError: a model or tokenizer GGUF cannot describe, or an unknown dtype.
    """

    gguf = gguf_package()
    if dtype not in WRITE_TYPES:
        raise LMForgeError(f"unknown GGUF dtype {dtype!r} (one of {', '.join(WRITE_TYPES)})", key="dtype")
    config = model.config
    architecture = gguf_architecture(config)
    if tokenizer is None:
        raise LMForgeError("a GGUF file carries its tokenizer: this model has none", key="tokenizer")
    vocabulary = tokenizer_metadata(tokenizer, config.vocab_size)
    if tokenizer.vocab_size > config.vocab_size:
        raise LMForgeError(
            f"the tokenizer has {tokenizer.vocab_size} tokens, the model's embedding {config.vocab_size} rows",
            key="tokenizer",
        )

    tensors = model_tensors(model, tensor_rules(config, architecture), name="GGUF")
    wanted = gguf.GGMLQuantizationType[WRITE_TYPES[dtype]]
    plan: dict[str, Any] = {}
    for key, tensor in tensors.items():
        kind = wanted if tensor.dim() > 1 else gguf.GGMLQuantizationType.F32
        block, _ = gguf.GGML_QUANT_SIZES[kind]
        if tensor.shape[-1] % block:
            kind = (
                gguf.GGMLQuantizationType.F16
            )  # rows that do not split into blocks (llama.cpp does the same)
        plan[key] = kind
    path = Path(path)

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(tmp, architecture)
        try:
            _write_metadata(writer, config, architecture, name or path.stem, WRITE_TYPES[dtype])
            for key, value in vocabulary.items():
                _add_value(writer, key, value)
            for key, tensor in tensors.items():
                kind = plan[key]
                block, size = gguf.GGML_QUANT_SIZES[kind]
                nbytes = tensor.numel() // block * size
                writer.add_tensor_info(key, list(tensor.shape), np.dtype(np.float32), nbytes, raw_dtype=kind)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for key, tensor in tensors.items():  # one tensor converted at a time
                array = tensor.detach().to("cpu", torch.float32).contiguous().numpy()
                writer.write_tensor_data(_encode(gguf, array, plan[key]))
        finally:
            writer.close()

    atomic_write(path, write)
    counts: dict[str, int] = {}
    for kind in plan.values():
        counts[kind.name] = counts.get(kind.name, 0) + 1
    return counts


def _encode(gguf: Any, array: np.ndarray, kind: Any) -> np.ndarray:
    """A float32 array in GGML type ``kind`` (the bytes of quantized types)."""
    if kind == gguf.GGMLQuantizationType.F32:
        return array
    if kind == gguf.GGMLQuantizationType.F16:
        return array.astype(np.float16)
    return gguf.quants.quantize(array, kind)


def _write_metadata(writer: Any, config: ModelConfig, architecture: str, name: str, main_type: str) -> None:
    """The ``general.*`` and ``{arch}.*`` keys describing ``config``."""
    assert (
        config.head_dim is not None and config.num_kv_heads is not None and config.mlp_hidden_dim is not None
    )
    writer.add_type("model")
    writer.add_name(name)
    writer.add_file_type(FILE_TYPES[main_type])
    writer.add_quantization_version(2)  # GGML_QNT_VERSION
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.embed_dim)
    writer.add_block_count(config.num_layers)
    writer.add_feed_forward_length(config.mlp_hidden_dim)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_rope_dimension_count(config.head_dim)
    if config.head_dim * config.num_heads != config.embed_dim:
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    writer.add_vocab_size(config.vocab_size)
    del architecture  # the writer prefixes the architecture itself


def _add_value(writer: Any, key: str, value: Any) -> None:
    """One metadata entry with the GGUF type its Python value implies."""
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, list):
        writer.add_array(key, value)
    else:
        raise TypeError(f"no GGUF type for {key} = {value!r}")
