"""T5 (Raffel et al. 2020) and mT5 checkpoints of Hugging Face ``transformers`` <-> lmforge.

T5 is lmforge's pre-norm encoder-decoder with RMSNorm, no biases and no score scaling
(``attn_scale=1``). Its relative position bias lives in the first block of each stack and is
shared by all blocks; lmforge computes it once per stack from one module, which is the same
thing. With tied embeddings the decoder output is scaled by d_model^-0.5 before the LM head
(``logit_scale``); T5 v1.1 / mT5 use a gated-GELU MLP and an untied, unscaled head.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..config import ModelConfig
from ..errors import LMForgeError
from .common import ACTIVATIONS_FROM_HF, Family, HFConfig, Rule, check_config, layer_norm, same

# lmforge (activation, gated) -> feed_forward_proj; "gated-gelu" means the tanh GELU in transformers.
TO_FEED_FORWARD = {
    ("relu", False): "relu",
    ("gelu", False): "gelu",
    ("gelu_tanh", False): "gelu_new",
    ("silu", False): "silu",
    ("relu", True): "gated-relu",
    ("gelu_tanh", True): "gated-gelu",
    ("silu", True): "gated-silu",
}


class T5(Family):
    name = "t5"
    model_types = ("t5", "mt5")
    architectures = {
        f"{prefix}{suffix}": head
        for prefix in ("T5", "MT5")
        for suffix, head in (("ForConditionalGeneration", "lm"), ("Model", "none"), ("EncoderModel", "none"))
    }
    # transformers ignores this one too (the decoder's cross-attention has no position bias).
    ignored = (r"^decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight$",)
    embedding_key = "shared.weight"
    field_keys = {
        "vocab_size": "vocab_size",
        "embed_dim": "d_model",
        "head_dim": "d_kv",
        "mlp_hidden_dim": "d_ff",
        "num_layers": "num_layers",
        "num_decoder_layers": "num_decoder_layers",
        "num_heads": "num_heads",
        "relative_buckets": "relative_attention_num_buckets",
        "relative_max_distance": "relative_attention_max_distance",
        "norm_eps": "layer_norm_epsilon",
        "dropout": "dropout_rate",
    }

    def wants_tie(self, hf: HFConfig) -> bool:
        # transformers 5 always ties T5's head to the embedding unless the checkpoint holds a
        # different lm_head; tie_word_embeddings (read in read()) only decides the scaling.
        return True

    def read(self, hf: HFConfig, *, head: str, tie: bool, num_labels: int) -> ModelConfig:
        hf.expect("is_decoder", [False], False)
        hf.get("use_cache")
        hf.get("gradient_checkpointing")
        proj = hf.get("feed_forward_proj", "relu", kind=str)
        parts = proj.split("-")
        gated = parts[0] == "gated" and len(parts) == 2
        act_name = parts[-1]
        if (len(parts) == 2 and not gated) or len(parts) > 2:
            raise hf.error("feed_forward_proj", f"{proj!r} is not of the form ACT or gated-ACT")
        activation = "gelu_tanh" if proj == "gated-gelu" else ACTIVATIONS_FROM_HF.get(act_name)
        if activation is None or (activation == "gelu" and gated):
            raise hf.error("feed_forward_proj", f"{proj!r} is not supported by lmforge")
        # Derived copies that transformers 5 writes; they must agree with feed_forward_proj.
        hf.expect("is_gated_act", [gated], gated)
        dense_act = "gelu_new" if proj == "gated-gelu" else act_name
        hf.expect("dense_act_fn", [dense_act], dense_act)
        scale = hf.get("scale_decoder_outputs", None, kind=bool)
        tie_key = hf.get("tie_word_embeddings", True, kind=bool)
        scale = tie_key if scale is None else scale
        d_model = hf.int("d_model", 512)
        # T5EncoderModel checkpoints hold the encoder stack only.
        encoder_only = any(str(a).endswith("EncoderModel") for a in architectures_of(hf))
        arch = "encoder" if encoder_only else "encoder_decoder"
        num_layers = hf.int("num_layers", 6)
        num_decoder_layers = hf.int("num_decoder_layers", num_layers)
        return self.build(
            hf,
            dict(
                arch=arch,
                vocab_size=hf.int("vocab_size", 32128),
                max_seq_len=hf.int("n_positions", 512),
                embed_dim=d_model,
                num_layers=num_layers,
                num_decoder_layers=num_decoder_layers if arch == "encoder_decoder" else None,
                num_heads=hf.int("num_heads", 8),
                head_dim=hf.int("d_kv", 64),
                mlp_hidden_dim=hf.int("d_ff", 2048),
                activation=activation,
                gated_mlp=gated,
                norm="rmsnorm",
                norm_eps=hf.float("layer_norm_epsilon", 1e-6),
                prenorm=True,
                position="relative",
                relative_buckets=hf.int("relative_attention_num_buckets", 32),
                relative_max_distance=hf.int("relative_attention_max_distance", 128),
                bias=False,
                attn_scale=1.0,
                dropout=hf.float("dropout_rate", 0.1),
                tie_embeddings=tie,
                logit_scale=d_model**-0.5 if scale and arch == "encoder_decoder" else 1.0,
                head=head,
                pad_token_id=hf.get("pad_token_id", 0, kind=int),
            ),
        )

    def backbone_rules(self, config: ModelConfig) -> list[Rule]:
        stacks = ["encoder"] + (["decoder"] if config.arch == "encoder_decoder" else [])
        rules = [
            same("shared.weight", "tok_embed.weight", aliases=[f"{s}.embed_tokens.weight" for s in stacks])
        ]
        for stack in stacks:
            num_layers = config.num_layers if stack == "encoder" else config.num_decoder_layers
            assert num_layers is not None
            rules.append(
                same(
                    f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                    f"{stack}.relative_bias.embedding.weight",
                )
            )
            for i in range(num_layers):
                hf, lm = f"{stack}.block.{i}.layer.", f"{stack}.layers.{i}."
                rules += attention(hf + "0.SelfAttention", lm + "self_attn")
                rules += layer_norm(hf + "0.layer_norm", lm + "attn_norm", bias=False)
                mlp = "1"
                if stack == "decoder":
                    rules += attention(hf + "1.EncDecAttention", lm + "cross_attn")
                    rules += layer_norm(hf + "1.layer_norm", lm + "cross_norm", bias=False)
                    mlp = "2"
                ff = f"{hf}{mlp}.DenseReluDense."
                if config.gated_mlp:
                    rules.append(same(ff + "wi_0.weight", lm + "mlp.gate_proj.weight"))
                    rules.append(same(ff + "wi_1.weight", lm + "mlp.up_proj.weight"))
                else:
                    rules.append(same(ff + "wi.weight", lm + "mlp.up_proj.weight"))
                rules.append(same(ff + "wo.weight", lm + "mlp.down_proj.weight"))
                rules += layer_norm(f"{hf}{mlp}.layer_norm", lm + "mlp_norm", bias=False)
            rules += layer_norm(f"{stack}.final_layer_norm", f"{stack}.norm", bias=False)
        return rules

    def head_rules(self, config: ModelConfig) -> list[Rule]:
        if config.head == "lm" and not config.tie_embeddings:
            return [same("lm_head.weight", "head.proj.weight")]
        return []

    @classmethod
    def matches(cls, config: ModelConfig) -> bool:
        return config.arch != "decoder" and config.position == "relative" and config.norm == "rmsnorm"

    def architecture(self, config: ModelConfig) -> str:
        prefix = "MT5" if self.model_type == "mt5" else "T5"
        if config.arch == "encoder" and config.head == "none":
            return prefix + "EncoderModel"
        if config.arch == "encoder_decoder" and config.head in ("lm", "none"):
            return prefix + ("ForConditionalGeneration" if config.head == "lm" else "Model")
        raise LMForgeError(
            f"cannot export as {self.model_type}: no Hugging Face class for a {config.arch} with a "
            f"{config.head!r} head",
            key="head",
        )

    def scaled(self, config: ModelConfig) -> bool:
        if config.arch == "encoder":
            return True  # no head: the flag is irrelevant, keep transformers' default
        scale = config.embed_dim**-0.5
        check_config(config, "logit_scale", [1.0, scale], self.model_type)
        return config.logit_scale == scale

    def write(self, config: ModelConfig) -> dict[str, Any]:
        for field, allowed in (
            ("prenorm", [True]),
            ("bias", [False]),
            ("qkv_bias", [None, False]),
            ("attn_scale", [1.0]),
            ("num_kv_heads", [config.num_heads]),
            ("type_vocab_size", [0]),
            ("embed_norm", [False]),
            ("scale_embeddings", [False]),
        ):
            check_config(config, field, allowed, self.model_type)
        proj = TO_FEED_FORWARD.get((config.activation, config.gated_mlp))
        if proj is None:
            raise LMForgeError(
                f"cannot export as {self.model_type}: a gated MLP with exact GELU has no T5 "
                "feed_forward_proj (gated-gelu is the tanh GELU)",
                key="activation",
            )
        scale = self.scaled(config)
        return {
            "model_type": self.model_type,
            "vocab_size": config.vocab_size,
            "d_model": config.embed_dim,
            "d_kv": config.head_dim,
            "d_ff": config.mlp_hidden_dim,
            "num_layers": config.num_layers,
            "num_decoder_layers": config.num_decoder_layers or config.num_layers,
            "num_heads": config.num_heads,
            "relative_attention_num_buckets": config.relative_buckets,
            "relative_attention_max_distance": config.relative_max_distance,
            "dropout_rate": config.dropout,
            "layer_norm_epsilon": config.norm_eps,
            "feed_forward_proj": proj,
            "is_encoder_decoder": config.arch == "encoder_decoder",
            # transformers 4 reads tie_word_embeddings as "tied and scaled"; 5 reads the scale
            # from scale_decoder_outputs. The head matrix is written whenever it is not both.
            "tie_word_embeddings": scale and config.tie_embeddings,
            "scale_decoder_outputs": scale,
            "pad_token_id": config.pad_token_id,
            "decoder_start_token_id": config.pad_token_id,
        }

    def extra_tensors(self, config: ModelConfig, tensors: dict[str, Tensor]) -> None:
        """A tied but unscaled head is written out as its own copy (see ``write``)."""
        if config.head == "lm" and config.tie_embeddings and not self.scaled(config):
            tensors["lm_head.weight"] = tensors["shared.weight"].clone()


def architectures_of(hf: HFConfig) -> list[Any]:
    """The class names listed in config.json."""
    return hf.get("architectures", [], kind=list)


def attention(hf: str, lm: str) -> list[Rule]:
    """T5's q/k/v/o projections (no biases)."""
    names = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "out_proj"}
    return [same(f"{hf}.{h}.weight", f"{lm}.{m}.weight") for h, m in names.items()]
