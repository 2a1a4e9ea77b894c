"""GPT-2 (Radford et al. 2019) checkpoints of Hugging Face ``transformers`` <-> lmforge.

GPT-2 is lmforge's pre-norm decoder with learned positions and LayerNorm. Two layout
differences: its linear layers are ``Conv1D`` modules storing weights as (in, out), so every
matrix is transposed; and one ``c_attn`` matrix holds the query, key and value projections side
by side, split here into lmforge's ``q_proj``/``k_proj``/``v_proj``. ``gelu_new`` is the tanh
approximation of GELU (lmforge's ``gelu_tanh``).
"""

from __future__ import annotations

from typing import Any

from ..config import ModelConfig
from .common import Family, HFConfig, Rule, check_config, fused, layer_norm, linear, same, transposed, zero

TO_HF_ACTIVATION = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu"}


class GPT2(Family):
    name = "gpt2"
    model_types = ("gpt2",)
    base_prefix = "transformer."
    architectures = {
        "GPT2LMHeadModel": "lm",
        "GPT2Model": "none",
        "GPT2ForSequenceClassification": "classification",
        "GPT2ForTokenClassification": "token_classification",
        "GPT2ForQuestionAnswering": "qa",
    }
    # The causal-mask buffers older checkpoints carry (not weights).
    ignored = (r"(^|\.)attn\.bias$", r"(^|\.)attn\.masked_bias$")
    embedding_key = "wte.weight"
    field_keys = {
        "vocab_size": "vocab_size",
        "max_seq_len": "n_positions",
        "embed_dim": "n_embd",
        "num_layers": "n_layer",
        "num_heads": "n_head",
        "mlp_hidden_dim": "n_inner",
        "norm_eps": "layer_norm_epsilon",
        "dropout": "resid_pdrop",
        "attn_dropout": "attn_pdrop",
    }

    def read(self, hf: HFConfig, *, head: str, tie: bool, num_labels: int) -> ModelConfig:
        hf.expect("scale_attn_weights", [True], True)
        hf.expect("scale_attn_by_inverse_layer_idx", [False], False)
        hf.get("reorder_and_upcast_attn")  # fp32 softmax in fp16: numerics only, same model
        for key in ("n_ctx", "embd_pdrop", "summary_type", "summary_use_proj", "summary_activation"):
            hf.get(key)  # n_ctx is n_positions of old configs; summary_* belong to GPT2DoubleHeadsModel
        for key in ("summary_proj_to_labels", "summary_first_dropout"):
            hf.get(key)
        embed_dim = hf.int("n_embd", 768)
        vocab_size = hf.int("vocab_size", 50257)
        pad = hf.get("pad_token_id", kind=int)
        return self.build(
            hf,
            dict(
                arch="decoder",
                vocab_size=vocab_size,
                max_seq_len=hf.int("n_positions", 1024),
                embed_dim=embed_dim,
                num_layers=hf.int("n_layer", 12),
                num_heads=hf.int("n_head", 12),
                mlp_hidden_dim=hf.int("n_inner", 4 * embed_dim),
                activation=hf.activation("activation_function", "gelu_new"),
                norm="layernorm",
                norm_eps=hf.float("layer_norm_epsilon", 1e-5),
                prenorm=True,
                position="learned",
                bias=True,
                dropout=hf.float("resid_pdrop", 0.1),
                attn_dropout=hf.float("attn_pdrop", 0.1),
                tie_embeddings=tie,
                head=head,
                num_labels=num_labels,
                pooling="last",
                pad_token_id=pad if pad is not None and 0 <= pad < vocab_size else 0,
            ),
        )

    def backbone_rules(self, config: ModelConfig) -> list[Rule]:
        rules = [same("wte.weight", "tok_embed.weight"), same("wpe.weight", "decoder.pos_embed.weight")]
        for i in range(config.num_layers):
            hf, lm = f"h.{i}.", f"decoder.layers.{i}."
            qkv = [lm + f"self_attn.{p}_proj" for p in "qkv"]
            rules += layer_norm(hf + "ln_1", lm + "attn_norm")
            rules.append(fused(hf + "attn.c_attn.weight", [p + ".weight" for p in qkv], transpose=True))
            rules.append(fused(hf + "attn.c_attn.bias", [p + ".bias" for p in qkv]))
            rules.append(transposed(hf + "attn.c_proj.weight", lm + "self_attn.out_proj.weight"))
            rules.append(same(hf + "attn.c_proj.bias", lm + "self_attn.out_proj.bias"))
            rules += layer_norm(hf + "ln_2", lm + "mlp_norm")
            rules.append(transposed(hf + "mlp.c_fc.weight", lm + "mlp.up_proj.weight"))
            rules.append(same(hf + "mlp.c_fc.bias", lm + "mlp.up_proj.bias"))
            rules.append(transposed(hf + "mlp.c_proj.weight", lm + "mlp.down_proj.weight"))
            rules.append(same(hf + "mlp.c_proj.bias", lm + "mlp.down_proj.bias"))
        return rules + layer_norm("ln_f", "decoder.norm")

    def head_rules(self, config: ModelConfig) -> list[Rule]:
        return decoder_head_rules(config, "GPT2ForSequenceClassification")

    @classmethod
    def matches(cls, config: ModelConfig) -> bool:
        return config.arch == "decoder" and config.position == "learned" and config.norm == "layernorm"

    def write(self, config: ModelConfig) -> dict[str, Any]:
        for field, allowed in (
            ("prenorm", [True]),
            ("bias", [True]),
            ("norm_bias", [True]),
            ("qkv_bias", [None, True]),
            ("gated_mlp", [False]),
            ("num_kv_heads", [config.num_heads]),
            ("head_dim", [config.embed_dim // config.num_heads]),
            ("attn_scale", [None, config.head_dim**-0.5]),  # type: ignore[operator]
            ("logit_scale", [1.0]),
            ("type_vocab_size", [0]),
            ("embed_norm", [False]),
            ("scale_embeddings", [False]),
        ):
            check_config(config, field, allowed, "gpt2")
        check_decoder_head(config, "gpt2")
        return {
            "model_type": "gpt2",
            "vocab_size": config.vocab_size,
            "n_positions": config.max_seq_len,
            "n_embd": config.embed_dim,
            "n_layer": config.num_layers,
            "n_head": config.num_heads,
            "n_inner": config.mlp_hidden_dim,
            "activation_function": TO_HF_ACTIVATION[config.activation],
            "layer_norm_epsilon": config.norm_eps,
            "resid_pdrop": config.dropout,
            "embd_pdrop": config.dropout,
            "attn_pdrop": config.attn_dropout,
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
            "tie_word_embeddings": config.tie_embeddings,
            "pad_token_id": config.pad_token_id,
        }


def decoder_head_rules(config: ModelConfig, classification: str) -> list[Rule]:
    """Heads of Hugging Face decoders (GPT-2, Llama): ``lm_head`` (unless tied), ``score``
    without a bias for sequence classification, ``score``/``classifier`` for tagging, ``qa_outputs``."""
    if config.head == "lm":
        return [] if config.tie_embeddings else [same("lm_head.weight", "head.proj.weight")]
    if config.head == "classification":
        rules = [same("score.weight", "head.classifier.weight")]
        if config.classifier_bias:  # lmforge decoders classify without a bias by default, as Hugging Face does
            rules.append(zero("head.classifier.bias", f"{classification}'s score layer has no bias"))
        return rules
    token = "classifier" if classification.startswith("GPT2") else "score"
    if config.head == "token_classification":
        return linear(token, "head.classifier", bias=True)
    if config.head == "qa":
        return linear("qa_outputs", "head.classifier", bias=True)
    return []


def check_decoder_head(config: ModelConfig, family: str) -> None:
    """A Hugging Face decoder classifies from the last real token, with no pooler."""
    if config.head == "classification":
        check_config(config, "pooling", ["last"], family)
        check_config(config, "pooler", [False], family)
