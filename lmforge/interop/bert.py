"""BERT (Devlin et al. 2019), MiniLM-shaped BERTs and RoBERTa (Liu et al. 2019) checkpoints of
Hugging Face ``transformers`` <-> lmforge.

BERT is lmforge's post-norm encoder with learned positions, token-type embeddings and a
LayerNorm after the embeddings; its masked-LM head (``cls.predictions``) is dense → activation →
LayerNorm → tied decoder + bias, and its pooler (dense + tanh on [CLS]) feeds sequence
classification. RoBERTa is the same network with other tensor names and positions that start at
``pad_token_id + 1``: the unused first rows of its position table are sliced off on load (and
written back as zeros on export), which gives real tokens exactly the same positions.
"""

from __future__ import annotations

from typing import Any

from ..config import ModelConfig
from ..errors import LMForgeError
from .common import Family, HFConfig, Rule, check_config, layer_norm, linear, offset_rows, same

TO_HF_ACTIVATION = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu"}


class Bert(Family):
    name = "bert"
    model_types = ("bert", "roberta")
    architectures = {
        "BertForMaskedLM": "mlm",
        "BertModel": "none",
        "BertForPreTraining": "mlm",  # its next-sentence head is left out (see ignored)
        "BertForSequenceClassification": "classification",
        "BertForTokenClassification": "token_classification",
        "BertForQuestionAnswering": "qa",
        "RobertaForMaskedLM": "mlm",
        "RobertaModel": "none",
        "RobertaForSequenceClassification": "classification",
        "RobertaForTokenClassification": "token_classification",
        "RobertaForQuestionAnswering": "qa",
    }
    embedding_key = "embeddings.word_embeddings.weight"
    field_keys = {
        "vocab_size": "vocab_size",
        "max_seq_len": "max_position_embeddings",
        "embed_dim": "hidden_size",
        "num_layers": "num_hidden_layers",
        "num_heads": "num_attention_heads",
        "mlp_hidden_dim": "intermediate_size",
        "norm_eps": "layer_norm_eps",
        "type_vocab_size": "type_vocab_size",
        "dropout": "hidden_dropout_prob",
        "attn_dropout": "attention_probs_dropout_prob",
        "pad_token_id": "pad_token_id",
    }

    # position_ids / token_type_ids buffers; BertForPreTraining's next-sentence head
    ignored = (r"embeddings\.position_ids$", r"embeddings\.token_type_ids$", r"^cls\.seq_relationship\.")

    def __init__(self, model_type: str | None = None) -> None:
        super().__init__(model_type)
        self.roberta = self.model_type == "roberta"
        self.base_prefix = f"{self.model_type}."
        self.lm_head_key = "lm_head.decoder.weight" if self.roberta else "cls.predictions.decoder.weight"

    def canonical(self, key: str) -> str:
        key = super().canonical(key)
        if key.endswith((".gamma", ".beta")) and "LayerNorm" in key:  # TF-era checkpoints
            key = key.rsplit(".", 1)[0] + (".weight" if key.endswith(".gamma") else ".bias")
        return key

    def read(self, hf: HFConfig, *, head: str, tie: bool, num_labels: int) -> ModelConfig:
        model_type = self.model_type
        hf.expect("position_embedding_type", ["absolute"], "absolute")
        hf.expect("is_decoder", [False], False)
        hf.get("gradient_checkpointing")
        hf.get("use_cache")
        vocab_size = hf.int("vocab_size", 30522 if model_type == "bert" else 50265)
        pad = hf.get("pad_token_id", 0 if model_type == "bert" else 1, kind=int)
        max_positions = hf.int("max_position_embeddings", 512)
        offset = pad + 1 if self.roberta else 0
        return self.build(
            hf,
            dict(
                arch="encoder",
                vocab_size=vocab_size,
                max_seq_len=max_positions - offset,
                embed_dim=hf.int("hidden_size", 768),
                num_layers=hf.int("num_hidden_layers", 12),
                num_heads=hf.int("num_attention_heads", 12),
                mlp_hidden_dim=hf.int("intermediate_size", 3072),
                activation=hf.activation("hidden_act", "gelu"),
                norm="layernorm",
                norm_eps=hf.float("layer_norm_eps", 1e-12),
                prenorm=False,
                embed_norm=True,
                position="learned",
                bias=True,
                type_vocab_size=hf.int("type_vocab_size", 2),
                dropout=hf.float("hidden_dropout_prob", 0.1),
                attn_dropout=hf.float("attention_probs_dropout_prob", 0.1),
                tie_embeddings=tie,
                head=head,
                num_labels=num_labels,
                pooling="cls",
                pooler=head == "classification",
                pad_token_id=pad,
            ),
        )

    def backbone_rules(self, config: ModelConfig) -> list[Rule]:
        offset = config.pad_token_id + 1 if self.roberta else 0
        positions = "embeddings.position_embeddings.weight"
        rules = [
            same("embeddings.word_embeddings.weight", "tok_embed.weight"),
            offset_rows(positions, "encoder.pos_embed.weight", offset)
            if offset
            else same(positions, "encoder.pos_embed.weight"),
            same("embeddings.token_type_embeddings.weight", "type_embed.weight"),
            *layer_norm("embeddings.LayerNorm", "encoder.embed_norm"),
        ]
        for i in range(config.num_layers):
            hf, lm = f"encoder.layer.{i}.", f"encoder.layers.{i}."
            for hf_name, p in (("query", "q"), ("key", "k"), ("value", "v")):
                rules += linear(hf + f"attention.self.{hf_name}", lm + f"self_attn.{p}_proj", bias=True)
            rules += linear(hf + "attention.output.dense", lm + "self_attn.out_proj", bias=True)
            rules += layer_norm(hf + "attention.output.LayerNorm", lm + "attn_norm")
            rules += linear(hf + "intermediate.dense", lm + "mlp.up_proj", bias=True)
            rules += linear(hf + "output.dense", lm + "mlp.down_proj", bias=True)
            rules += layer_norm(hf + "output.LayerNorm", lm + "mlp_norm")
        return rules

    def head_rules(self, config: ModelConfig) -> list[Rule]:
        roberta = self.roberta
        if config.head == "mlm":
            if roberta:
                rules = [*linear("lm_head.dense", "head.dense", bias=True)]
                rules += layer_norm("lm_head.layer_norm", "head.norm")
                rules.append(same("lm_head.bias", "head.bias", aliases=["lm_head.decoder.bias"]))
            else:
                rules = [*linear("cls.predictions.transform.dense", "head.dense", bias=True)]
                rules += layer_norm("cls.predictions.transform.LayerNorm", "head.norm")
                rules.append(
                    same("cls.predictions.bias", "head.bias", aliases=["cls.predictions.decoder.bias"])
                )
            if not config.tie_embeddings:
                rules.append(same(self.lm_head_key, "head.proj.weight"))
            return rules
        if config.head == "classification":
            if roberta:
                return linear("classifier.dense", "head.dense", bias=True) + linear(
                    "classifier.out_proj", "head.classifier", bias=True
                )
            return linear("pooler.dense", "head.dense", bias=True) + linear(
                "classifier", "head.classifier", bias=True
            )
        if config.head == "token_classification":
            return linear("classifier", "head.classifier", bias=True)
        if config.head == "qa":
            return linear("qa_outputs", "head.classifier", bias=True)
        return []

    @classmethod
    def matches(cls, config: ModelConfig) -> bool:
        return config.arch == "encoder" and config.position == "learned" and config.norm == "layernorm"

    def write(self, config: ModelConfig) -> dict[str, Any]:
        model_type = self.model_type
        for field, allowed in (
            ("prenorm", [False]),
            ("embed_norm", [True]),
            ("bias", [True]),
            ("norm_bias", [True]),
            ("qkv_bias", [None, True]),
            ("gated_mlp", [False]),
            ("num_kv_heads", [config.num_heads]),
            ("head_dim", [config.embed_dim // config.num_heads]),
            ("attn_scale", [None, config.head_dim**-0.5]),  # type: ignore[operator]
            ("scale_embeddings", [False]),
        ):
            check_config(config, field, allowed, model_type)
        check_config(config, "type_vocab_size", list(range(1, 1 << 20)), model_type)
        if config.head == "classification" and (config.pooling != "cls" or not config.pooler):
            how = f"pools by '{config.pooling}'" if config.pooling != "cls" else "has no pooler"
            raise LMForgeError(
                f"cannot export as {model_type}: this classification head {how}, and "
                f"{model_type}'s ForSequenceClassification reads [CLS] through a pooler (dense + tanh). "
                "To get a run that exports, fine-tune with --options.pooling cls from a base with a pooler "
                "(a BERT/MiniLM Hugging Face folder has one); this run works as it is with lmforge "
                "(eval, predict, serve)",
                key="pooling" if config.pooling != "cls" else "pooler",
            )
        offset = config.pad_token_id + 1 if self.roberta else 0
        return {
            "model_type": model_type,
            "vocab_size": config.vocab_size,
            "max_position_embeddings": config.max_seq_len + offset,
            "hidden_size": config.embed_dim,
            "num_hidden_layers": config.num_layers,
            "num_attention_heads": config.num_heads,
            "intermediate_size": config.mlp_hidden_dim,
            "hidden_act": TO_HF_ACTIVATION[config.activation],
            "layer_norm_eps": config.norm_eps,
            "type_vocab_size": config.type_vocab_size,
            "hidden_dropout_prob": config.dropout,
            "attention_probs_dropout_prob": config.attn_dropout,
            "position_embedding_type": "absolute",
            "tie_word_embeddings": config.tie_embeddings,
            "pad_token_id": config.pad_token_id,
        }
