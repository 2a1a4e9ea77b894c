"""Llama-style checkpoints (Touvron et al. 2023) of Hugging Face ``transformers`` <-> lmforge:
``llama``, ``mistral`` (without a sliding window) and ``qwen2`` (Qwen2/2.5: q/k/v biases, often
tied embeddings).

All are lmforge's pre-norm decoder with RMSNorm, a SwiGLU MLP and RoPE, with grouped-query
attention. lmforge's RoPE uses the same "rotate half" pairing as Hugging Face's Llama, so the
q/k projections load without permutation. Only the default RoPE (no ``rope_scaling``) is
supported; other RoPE types are refused by name.
"""

from __future__ import annotations

from typing import Any

from ..config import ModelConfig
from ..errors import LMForgeError
from .common import Family, HFConfig, Rule, check_config, layer_norm, linear, same
from .gpt2 import check_decoder_head, decoder_head_rules

TO_HF_ACTIVATION = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu", "silu": "silu"}
ARCH_PREFIX = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}


class Llama(Family):
    name = "llama"
    model_types = ("llama", "mistral", "qwen2")
    base_prefix = "model."
    architectures = {
        f"{prefix}{suffix}": head
        for prefix in ("Llama", "Mistral", "Qwen2")
        for suffix, head in (
            ("ForCausalLM", "lm"),
            ("Model", "none"),
            ("ForSequenceClassification", "classification"),
            ("ForTokenClassification", "token_classification"),
        )
    }
    ignored = (r"rotary_emb\.inv_freq$",)
    embedding_key = "embed_tokens.weight"
    tie_default = False
    field_keys = {
        "vocab_size": "vocab_size",
        "max_seq_len": "max_position_embeddings",
        "embed_dim": "hidden_size",
        "num_layers": "num_hidden_layers",
        "num_heads": "num_attention_heads",
        "num_kv_heads": "num_key_value_heads",
        "head_dim": "head_dim",
        "mlp_hidden_dim": "intermediate_size",
        "norm_eps": "rms_norm_eps",
        "rope_theta": "rope_theta",
        "attn_dropout": "attention_dropout",
    }

    def read(self, hf: HFConfig, *, head: str, tie: bool, num_labels: int) -> ModelConfig:
        model_type = self.model_type
        hf.get("pretraining_tp")  # >1 only splits the matmuls: same numbers
        rope_theta = read_rope(hf)
        hf.expect("partial_rotary_factor", [1.0, 1], 1.0)
        if model_type == "qwen2":
            bias, qkv_bias = False, True
            hf.expect("use_sliding_window", [False], False)
            hf.get("sliding_window")  # only read when use_sliding_window is true
            hf.get("max_window_layers")
            hf.expect("use_mrope", [False], False)
            hf.get("attention_bias")  # Qwen2 always has q/k/v biases; transformers ignores this key too
        elif model_type == "mistral":
            bias, qkv_bias = False, None
            hf.get("attention_bias")  # Mistral has no biases; transformers ignores this key too
            window = hf.get("sliding_window", kind=int)
            limit = hf.int("max_position_embeddings", 131072)
            if window is not None and window < limit:
                raise hf.error(
                    "sliding_window", f"sliding-window attention ({window}) is not supported by lmforge"
                )
        else:
            bias = hf.bool("attention_bias", False)
            qkv_bias = None
            mlp_bias = hf.bool("mlp_bias", False)
            if mlp_bias != bias:
                raise hf.error(
                    "mlp_bias",
                    f"mlp_bias = {mlp_bias} with attention_bias = {bias} is not supported by lmforge "
                    "(its bias switch covers attention and MLP together)",
                )
        layer_types = hf.get("layer_types", kind=list) or []
        for kind in layer_types:
            if kind != "full_attention":
                raise hf.error(
                    "layer_types", f"layer type {kind!r} is not supported by lmforge (full_attention only)"
                )
        embed_dim = hf.int("hidden_size", 4096)
        num_heads = hf.int("num_attention_heads", 32)
        vocab_size = hf.int("vocab_size", 32000)
        pad = hf.get("pad_token_id", kind=int)
        return self.build(
            hf,
            dict(
                arch="decoder",
                vocab_size=vocab_size,
                max_seq_len=hf.int("max_position_embeddings", 2048),
                embed_dim=embed_dim,
                num_layers=hf.int("num_hidden_layers", 32),
                num_heads=num_heads,
                num_kv_heads=hf.int("num_key_value_heads", num_heads),
                head_dim=hf.int("head_dim", embed_dim // num_heads),
                mlp_hidden_dim=hf.int("intermediate_size", 11008),
                activation=hf.activation("hidden_act", "silu"),
                gated_mlp=True,
                norm="rmsnorm",
                norm_eps=hf.float("rms_norm_eps", 1e-6),
                prenorm=True,
                position="rope",
                rope_theta=rope_theta,
                bias=bias,
                qkv_bias=qkv_bias,
                attn_dropout=hf.float("attention_dropout", 0.0),
                dropout=0.0,
                tie_embeddings=tie,
                head=head,
                num_labels=num_labels,
                pooling="last",
                pad_token_id=pad if pad is not None and 0 <= pad < vocab_size else 0,
            ),
        )

    def backbone_rules(self, config: ModelConfig) -> list[Rule]:
        qkv_bias = config.bias if config.qkv_bias is None else config.qkv_bias
        rules = [same("embed_tokens.weight", "tok_embed.weight")]
        for i in range(config.num_layers):
            hf, lm = f"layers.{i}.", f"decoder.layers.{i}."
            rules += layer_norm(hf + "input_layernorm", lm + "attn_norm", bias=False)
            for p in "qkv":
                rules += linear(hf + f"self_attn.{p}_proj", lm + f"self_attn.{p}_proj", bias=qkv_bias)
            rules += linear(hf + "self_attn.o_proj", lm + "self_attn.out_proj", bias=config.bias)
            rules += layer_norm(hf + "post_attention_layernorm", lm + "mlp_norm", bias=False)
            for p in ("gate", "up", "down"):
                rules += linear(hf + f"mlp.{p}_proj", lm + f"mlp.{p}_proj", bias=config.bias)
        return rules + layer_norm("norm", "decoder.norm", bias=False)

    def head_rules(self, config: ModelConfig) -> list[Rule]:
        return decoder_head_rules(config, f"{ARCH_PREFIX[self.model_type]}ForSequenceClassification")

    @classmethod
    def matches(cls, config: ModelConfig) -> bool:
        return config.arch == "decoder" and config.position == "rope" and config.norm == "rmsnorm"

    @classmethod
    def model_type_for(cls, config: ModelConfig) -> str:
        """qwen2 for q/k/v biases without other biases, else llama."""
        return "qwen2" if config.qkv_bias and not config.bias else "llama"

    def write(self, config: ModelConfig) -> dict[str, Any]:
        model_type = self.model_type
        for field, allowed in (
            ("prenorm", [True]),
            ("gated_mlp", [True]),
            ("attn_scale", [None, config.head_dim**-0.5]),  # type: ignore[operator]
            ("logit_scale", [1.0]),
            ("type_vocab_size", [0]),
            ("embed_norm", [False]),
            ("scale_embeddings", [False]),
            ("qkv_bias", [None, config.bias, True]),
        ):
            check_config(config, field, allowed, "llama")
        check_decoder_head(config, model_type)
        if (model_type == "qwen2") != (config.qkv_bias is True and not config.bias):
            raise LMForgeError(
                f"cannot export as {model_type}: qwen2 has q/k/v biases and no others, "
                f"this model has bias={config.bias}, qkv_bias={config.qkv_bias}",
                key="qkv_bias",
            )
        out: dict[str, Any] = {
            "model_type": model_type,
            "vocab_size": config.vocab_size,
            "max_position_embeddings": config.max_seq_len,
            "hidden_size": config.embed_dim,
            "num_hidden_layers": config.num_layers,
            "num_attention_heads": config.num_heads,
            "num_key_value_heads": config.num_kv_heads,
            "head_dim": config.head_dim,
            "intermediate_size": config.mlp_hidden_dim,
            "hidden_act": TO_HF_ACTIVATION[config.activation],
            "rms_norm_eps": config.norm_eps,
            "rope_theta": config.rope_theta,
            "rope_scaling": None,
            "attention_dropout": config.attn_dropout,
            "tie_word_embeddings": config.tie_embeddings,
            "pad_token_id": config.pad_token_id,
        }
        if model_type == "qwen2":
            out.update(use_sliding_window=False, sliding_window=None)
        elif model_type == "mistral":
            if config.bias:
                raise LMForgeError("cannot export as mistral: Mistral has no biases", key="bias")
            out.update(sliding_window=None)
        else:
            out.update(attention_bias=config.bias, mlp_bias=config.bias)
        return out


def read_rope(hf: HFConfig) -> float:
    """RoPE θ from ``rope_theta``/``rope_scaling`` (transformers 4) or ``rope_parameters`` (5);
    any RoPE type other than the default is refused by name."""
    theta = hf.float("rope_theta", 10000.0)
    for key in ("rope_scaling", "rope_parameters"):
        params = hf.get(key, kind=dict)
        if not params:
            continue
        kind = params.get("rope_type", params.get("type", "default"))
        if kind != "default":
            raise hf.error(key, f"RoPE type {kind!r} is not supported by lmforge (only the default RoPE)")
        for name, value in params.items():
            if name == "rope_theta":
                if not isinstance(value, int | float) or isinstance(value, bool):
                    raise hf.error(key, f"rope_theta must be a number, got {value!r}")
                theta = float(value)
            elif name not in ("rope_type", "type"):
                raise hf.error(key, f"RoPE parameter {name!r} is not supported by lmforge")
    return theta
