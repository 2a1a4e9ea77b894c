"""ModelConfig: every architecture choice of an lmforge model in one flat, typed dataclass.

In the spirit of nanoGPT's ``GPTConfig`` and litgpt's ``Config``: one field per choice with a
comment, values that follow from others filled in by ``__post_init__``, named presets as plain
dicts, a YAML round trip, and a single size dial (:meth:`ModelConfig.from_depth`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, did_you_mean
from .settings import dataclass_from_dict, dataclass_to_dict, load_yaml

ARCHS = ("encoder", "decoder", "encoder_decoder")
ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")
NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "sinusoidal", "rope", "alibi", "relative", "none")
HEADS = ("lm", "mlm", "classification", "token_classification", "qa", "none")
POOLINGS = ("cls", "mean", "last")


@dataclass
class ModelConfig:
    """The shape and wiring of a Transformer. See ``PRESETS`` for real-model examples."""

    arch: str = "decoder"  # "encoder" (BERT), "decoder" (GPT, Llama) or "encoder_decoder" (T5, BART)
    vocab_size: int = 256  # rows of the token embedding (and outputs of the LM head)
    max_seq_len: int = 256  # longest sequence; size of a learned/sinusoidal position table
    embed_dim: int = 128  # width of the residual stream (d_model)
    num_layers: int = 4  # blocks of a decoder or encoder (the encoder's for encoder_decoder)
    num_decoder_layers: int | None = None  # decoder blocks of encoder_decoder (default: num_layers)
    num_heads: int = 4  # query heads per attention layer
    num_kv_heads: int | None = None  # key/value heads: = num_heads (MHA), 1 (MQA), between (GQA)
    head_dim: int | None = None  # width of one head (default: embed_dim / num_heads)
    mlp_hidden_dim: int | None = None  # inner MLP width (default: 4·embed_dim, or ≈8/3·embed_dim gated)
    activation: str = "gelu"  # MLP nonlinearity: "gelu", "gelu_tanh" (GPT-2), "relu", "silu"
    gated_mlp: bool = False  # GLU-style MLP: act(x W_gate) ⊙ (x W_up) (SwiGLU with silu)
    norm: str = "layernorm"  # "layernorm" or "rmsnorm"
    norm_eps: float = 1e-5  # epsilon inside the norms
    norm_bias: bool = True  # bias in the LayerNorms (nanoGPT's bias=False has none; RMSNorm never has one)
    prenorm: bool = True  # norm before each sublayer (GPT-2, Llama) or after the residual (BERT)
    position: str = "learned"  # "learned", "sinusoidal", "rope", "alibi", "relative" (T5) or "none"
    rope_theta: float = 10000.0  # RoPE base θ
    relative_buckets: int = 32  # T5 relative bias: number of distance buckets
    relative_max_distance: int = 128  # T5 relative bias: distance of the last bucket
    bias: bool = True  # bias terms in linear layers
    qkv_bias: bool | None = None  # bias in the q/k/v projections only (default: bias; Qwen2: True)
    attn_scale: float | None = None  # score scale (default 1/√head_dim; T5 uses 1.0)
    dropout: float = 0.0  # dropout on embeddings and sublayer outputs
    attn_dropout: float = 0.0  # dropout on attention weights
    tie_embeddings: bool = True  # the LM/MLM head reuses the token embedding matrix
    logit_scale: float = 1.0  # hidden states are scaled by this before the LM head (T5: embed_dim^-0.5)
    type_vocab_size: int = 0  # token-type (segment) embeddings, BERT: 2; 0 = none
    embed_norm: bool = False  # a norm right after the embeddings (BERT, BART)
    scale_embeddings: bool = False  # token embeddings × √embed_dim (original Transformer)
    head: str = "lm"  # "lm", "mlm", "classification", "token_classification", "qa" or "none"
    num_labels: int = 2  # classes of a classification / token-classification head
    pooling: str = "cls"  # sequence classification reads "cls" (first), "mean" or "last" token
    pooler: bool = False  # dense + tanh on the pooled vector before the classifier (BERT)
    classifier_bias: bool | None = None  # bias in the sequence classifier (default: not for decoders, as GPT-2/Llama)
    pad_token_id: int = 0  # id of the padding token
    init_std: float = 0.02  # standard deviation of the initial weights

    def __post_init__(self) -> None:
        def check(condition: bool, key: str, why: str) -> None:
            if not condition:
                raise ConfigError(f"{key} = {getattr(self, key)!r}: {why}", key=key)

        def check_choice(key: str, choices: tuple[str, ...]) -> None:
            value = getattr(self, key)
            check(
                value in choices,
                key,
                f"must be one of {', '.join(choices)}" + did_you_mean(str(value), choices),
            )

        check_choice("arch", ARCHS)
        check_choice("activation", ACTIVATIONS)
        check_choice("norm", NORMS)
        check_choice("position", POSITIONS)
        check_choice("head", HEADS)
        check_choice("pooling", POOLINGS)
        for key in ("vocab_size", "max_seq_len", "embed_dim", "num_layers", "num_heads", "num_labels"):
            check(getattr(self, key) > 0, key, "must be positive")
        for key in ("dropout", "attn_dropout"):
            check(0.0 <= getattr(self, key) < 1.0, key, "must be in [0, 1)")
        check(self.norm_eps > 0, "norm_eps", "must be positive")
        check(self.type_vocab_size >= 0, "type_vocab_size", "must be 0 or more")
        check(
            0 <= self.pad_token_id < self.vocab_size,
            "pad_token_id",
            f"must be a token id below vocab_size {self.vocab_size}",
        )

        # Derived values.
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        check(self.num_kv_heads > 0, "num_kv_heads", "must be positive")
        check(
            self.num_heads % self.num_kv_heads == 0,
            "num_kv_heads",
            f"must divide num_heads {self.num_heads}",
        )
        if self.head_dim is None:
            check(
                self.embed_dim % self.num_heads == 0,
                "num_heads",
                f"must divide embed_dim {self.embed_dim} (or set head_dim)",
            )
            self.head_dim = self.embed_dim // self.num_heads
        check(self.head_dim > 0, "head_dim", "must be positive")
        if self.position == "rope":
            check(self.head_dim % 2 == 0, "head_dim", "must be even for RoPE")
        if self.mlp_hidden_dim is None:
            self.mlp_hidden_dim = (
                64 * math.ceil(8 * self.embed_dim / 3 / 64) if self.gated_mlp else 4 * self.embed_dim
            )
        check(self.mlp_hidden_dim > 0, "mlp_hidden_dim", "must be positive")
        if self.classifier_bias is None:
            self.classifier_bias = self.arch != "decoder"
        if self.arch == "encoder_decoder":
            if self.num_decoder_layers is None:
                self.num_decoder_layers = self.num_layers
            check(self.num_decoder_layers > 0, "num_decoder_layers", "must be positive")
        else:
            check(
                self.num_decoder_layers is None, "num_decoder_layers", "only applies to arch encoder_decoder"
            )
        check(
            not (self.head == "mlm" and self.arch != "encoder"),
            "head",
            "a masked-LM head needs arch encoder (bidirectional)",
        )
        check(not (self.head == "lm" and self.arch == "encoder"), "head", "an encoder uses head mlm, not lm")

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> ModelConfig:
        """A named preset (see ``PRESETS``) with some fields overridden."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset '{name}'" + did_you_mean(name, PRESETS), key="preset")
        return cls.from_dict({**PRESETS[name], **overrides})

    @classmethod
    def from_depth(cls, depth: int, *, arch: str = "decoder", **overrides: Any) -> ModelConfig:
        """One dial for size: ``depth`` layers, width 64·depth, heads of width 64 (nanochat's
        aspect ratio). depth 2 → 128 wide, 2 heads; depth 12 → 768 wide, 12 heads (GPT-2 small)."""
        if depth < 1:
            raise ConfigError(f"depth {depth} must be at least 1", key="depth")
        base: dict[str, Any] = {
            "arch": arch,
            "num_layers": depth,
            "embed_dim": 64 * depth,
            "num_heads": depth,
        }
        if arch == "encoder":
            base.update(head="mlm", prenorm=True)
        return cls.from_dict({**base, **overrides})

    @classmethod
    def from_dict(
        cls, data: dict[str, Any], *, file: str | Path | None = None, lines: dict[str, int] | None = None
    ) -> ModelConfig:
        """Build from a mapping, checking types and rejecting unknown keys (nearest one suggested)."""
        return dataclass_from_dict(cls, data, file=file, lines=lines)

    @classmethod
    def from_yaml(cls, path: str | Path) -> ModelConfig:
        """Read a YAML file of config fields (a top-level ``model:`` section also works)."""
        data, lines = load_yaml(path)
        if set(data) == {"model"} and isinstance(data["model"], dict):
            data = data["model"]
            lines = {k.removeprefix("model."): v for k, v in lines.items()}
        return cls.from_dict(data, file=path, lines=lines)

    def to_dict(self) -> dict[str, Any]:
        return dataclass_to_dict(self)

    def to_yaml(self, path: str | Path | None = None) -> str:
        """The config as YAML text; also written to ``path`` when given."""
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed; derived fields are derived again unless given."""
        data = self.to_dict()
        for key in DERIVED_FIELDS:
            if key not in changes and _is_derived(self, key):
                data[key] = None
        return ModelConfig.from_dict({**data, **changes})


DERIVED_FIELDS = ("num_kv_heads", "head_dim", "mlp_hidden_dim", "num_decoder_layers", "classifier_bias")


def _is_derived(config: ModelConfig, key: str) -> bool:
    """Whether ``key`` holds the value __post_init__ would derive (so replace() derives it anew)."""
    data = config.to_dict()
    data[key] = None
    try:
        return getattr(ModelConfig.from_dict(data), key) == getattr(config, key)
    except ConfigError:
        return False


# Named presets: plain data. The tiny ones are for tests; the others have the shapes of
# well-known models (weights come from a checkpoint, see lmforge.load).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny-decoder": dict(
        arch="decoder", vocab_size=256, max_seq_len=64, embed_dim=64, num_layers=2, num_heads=4
    ),
    "tiny-encoder": dict(
        arch="encoder",
        vocab_size=256,
        max_seq_len=64,
        embed_dim=64,
        num_layers=2,
        num_heads=4,
        prenorm=False,
        embed_norm=True,
        type_vocab_size=2,
        head="mlm",
        norm_eps=1e-12,
    ),
    "tiny-encoder-decoder": dict(
        arch="encoder_decoder",
        vocab_size=256,
        max_seq_len=64,
        embed_dim=64,
        num_layers=2,
        num_heads=4,
        position="sinusoidal",
        scale_embeddings=True,
    ),
    "tiny-llama": dict(
        arch="decoder",
        vocab_size=256,
        max_seq_len=64,
        embed_dim=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        position="rope",
        norm="rmsnorm",
        activation="silu",
        gated_mlp=True,
        bias=False,
        tie_embeddings=False,
    ),
    "gpt2-small": dict(
        arch="decoder",
        vocab_size=50257,
        max_seq_len=1024,
        embed_dim=768,
        num_layers=12,
        num_heads=12,
        activation="gelu_tanh",
        dropout=0.1,
        attn_dropout=0.1,
    ),
    "bert-base": dict(
        arch="encoder",
        vocab_size=30522,
        max_seq_len=512,
        embed_dim=768,
        num_layers=12,
        num_heads=12,
        prenorm=False,
        embed_norm=True,
        type_vocab_size=2,
        norm_eps=1e-12,
        head="mlm",
        pooler=True,
        dropout=0.1,
        attn_dropout=0.1,
    ),
    "llama-1b": dict(  # the shape of Llama 3.2 1B
        arch="decoder",
        vocab_size=128256,
        max_seq_len=8192,
        embed_dim=2048,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        mlp_hidden_dim=8192,
        position="rope",
        rope_theta=500000.0,
        norm="rmsnorm",
        activation="silu",
        gated_mlp=True,
        bias=False,
    ),
    "qwen2-0.5b": dict(  # the shape of Qwen2.5 0.5B
        arch="decoder",
        vocab_size=151936,
        max_seq_len=32768,
        embed_dim=896,
        num_layers=24,
        num_heads=14,
        num_kv_heads=2,
        mlp_hidden_dim=4864,
        position="rope",
        rope_theta=1000000.0,
        norm="rmsnorm",
        norm_eps=1e-6,
        activation="silu",
        gated_mlp=True,
        bias=False,
        qkv_bias=True,
    ),
    "t5-small": dict(
        arch="encoder_decoder",
        vocab_size=32128,
        max_seq_len=512,
        embed_dim=512,
        num_layers=6,
        num_heads=8,
        mlp_hidden_dim=2048,
        activation="relu",
        norm="rmsnorm",
        norm_eps=1e-6,
        position="relative",
        bias=False,
        attn_scale=1.0,
        logit_scale=512**-0.5,
        dropout=0.1,
    ),
    "transformer-base": dict(  # Vaswani et al. 2017, base model
        arch="encoder_decoder",
        vocab_size=37000,
        max_seq_len=512,
        embed_dim=512,
        num_layers=6,
        num_heads=8,
        mlp_hidden_dim=2048,
        activation="relu",
        prenorm=False,
        position="sinusoidal",
        scale_embeddings=True,
        dropout=0.1,
    ),
}
