"""Prompt-type methods: trainable vectors the frozen model attends to, nothing in the weights changes.

- Prefix tuning (Li & Liang 2021, "Prefix-Tuning"): P trainable key/value vectors per layer,
  prepended to every self-attention layer's keys and values (through ``SelfAttention.prefix``),
  optionally produced by an MLP over P embeddings during training (the paper's
  reparameterization, §4.3, which makes optimization stable).
- Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning"):
  P trainable embeddings put before the input (through ``TransformerStack.prompt``), initialized
  at random, from random vocabulary embeddings, or from the embeddings of a text (§3.2).
- P-tuning (Liu et al. 2021, "GPT Understands, Too"): the prompt embeddings come out of a small
  prompt encoder (a bidirectional LSTM + MLP, or an MLP) over P trainable inputs.

None of them can be merged into the weights: they add inputs, not weight changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import LMForgeError
from ..model.attention import SelfAttention
from .base import (
    HFExport,
    HFExportContext,
    PeftConfig,
    SeamSlot,
    peft_modules,
    register_peft_method,
    unwrap,
    wrap_modules_to_save,
)


def _self_attention_layers(model: nn.Module) -> list[SelfAttention]:
    """Every self-attention layer (encoder, then decoder), without the cross-attention ones."""
    layers = []
    for stack in (getattr(model, "encoder", None), getattr(model, "decoder", None)):
        if stack is not None:
            layers += [block.self_attn for block in stack.layers]
    return [unwrap(layer) for layer in layers]


def _prompt_stack(model: nn.Module) -> nn.Module:
    """The stack that reads the input: the encoder when there is one, else the decoder."""
    return model.encoder if getattr(model, "encoder", None) is not None else model.decoder


def _attach(seam_owner: nn.Module, attribute: str, model: nn.Module, index: int, name: str) -> None:
    slot = getattr(seam_owner, attribute)
    if slot is None:
        slot = SeamSlot(peft_modules(model), index)
        setattr(seam_owner, attribute, slot)
    elif not isinstance(slot, SeamSlot):
        raise LMForgeError(f"the model's {attribute} seam is already taken by {type(slot).__name__}")
    slot.names.add(name)


# ---- prefix tuning -----------------------------------------------------------------------------


@dataclass
class PrefixConfig(PeftConfig):
    """Prefix tuning options."""

    method: str = "prefix"
    num_virtual_tokens: int = 20  # P: key/value vectors added per layer
    projection: bool = False  # produce the prefixes with an MLP over P embeddings (reparameterization)
    projection_hidden: int = 256  # hidden width of that MLP

    def __post_init__(self) -> None:
        if self.num_virtual_tokens < 1:
            raise ValueError(f"num_virtual_tokens = {self.num_virtual_tokens}: must be at least 1")


class PrefixEncoder(nn.Module):
    """All layers' prefixes: (layers, 2, Hkv, P, D) directly, or from an MLP over P embeddings."""

    def __init__(
        self, num_layers: int, num_kv_heads: int, head_dim: int, embed_dim: int, config: PrefixConfig
    ) -> None:
        super().__init__()
        self.shape = (num_layers, 2, num_kv_heads, config.num_virtual_tokens, head_dim)
        P, width = config.num_virtual_tokens, num_layers * 2 * num_kv_heads * head_dim
        if config.projection:
            self.embedding = nn.Parameter(torch.randn(P, embed_dim) * 0.02)
            self.mlp = nn.Sequential(
                nn.Linear(embed_dim, config.projection_hidden),
                nn.Tanh(),
                nn.Linear(config.projection_hidden, width),
            )
            self.prefix = None
        else:
            self.embedding, self.mlp = None, None
            self.prefix = nn.Parameter(torch.randn(self.shape) * 0.02)

    def all_prefixes(self) -> Tensor:
        """(layers, 2, Hkv, P, D)."""
        if self.prefix is not None:
            return self.prefix
        L, _, Hkv, P, D = self.shape
        flat = self.mlp(self.embedding)  # (P, L·2·Hkv·D)
        return flat.view(P, L, 2, Hkv, D).permute(1, 2, 3, 0, 4)  # -> (L, 2, Hkv, P, D)

    def for_slot(self, index: int, batch_size: int) -> tuple[Tensor, Tensor]:
        layer = self.all_prefixes()[index]  # (2, Hkv, P, D)
        keys, values = layer[0], layer[1]
        return keys.expand(batch_size, -1, -1, -1), values.expand(batch_size, -1, -1, -1)  # (B, Hkv, P, D)


def inject_prefix(model: nn.Module, config: PrefixConfig, name: str) -> None:
    layers = _self_attention_layers(model)
    first = layers[0]
    encoder = PrefixEncoder(len(layers), first.num_kv_heads, first.head_dim, first.embed_dim, config)
    reference = model.tok_embed.weight
    peft_modules(model)[name] = encoder.to(device=reference.device, dtype=reference.dtype)
    for index, layer in enumerate(layers):
        _attach(layer, "prefix", model, index, name)
    wrap_modules_to_save(model, config, name)


register_peft_method(
    "prefix",
    PrefixConfig,
    inject_prefix,
    mergeable=False,
    not_mergeable_reason="prefix tuning adds key/value vectors the model attends to, not a weight change",
    no_hf_export_reason="the export of prefix tuning (Hugging Face PEFT's past_key_values layout) is not written yet",
)


# ---- prompt tuning -----------------------------------------------------------------------------


@dataclass
class PromptConfig(PeftConfig):
    """Prompt tuning options."""

    method: str = "prompt"
    num_virtual_tokens: int = 20  # P: soft-prompt embeddings before the input
    init: str = "vocab"  # "random", "vocab" (embeddings of random tokens) or "text"
    init_token_ids: list[int] = field(default_factory=list)  # for init "text": the text's token ids
    seed: int = 0  # for the random choices of the initialization

    def __post_init__(self) -> None:
        if self.num_virtual_tokens < 1:
            raise ValueError(f"num_virtual_tokens = {self.num_virtual_tokens}: must be at least 1")
        if self.init not in ("random", "vocab", "text"):
            raise ValueError(f"init = {self.init!r}: must be random, vocab or text")
        if self.init == "text" and not self.init_token_ids:
            raise ValueError("init = 'text' needs init_token_ids (or init_text with a tokenizer)")


class PromptEmbedding(nn.Module):
    """P trainable input embeddings (P, E)."""

    def __init__(self, token_embedding: nn.Embedding, config: PromptConfig) -> None:
        super().__init__()
        P, vocab = config.num_virtual_tokens, token_embedding.num_embeddings
        generator = torch.Generator().manual_seed(config.seed)
        table = token_embedding.weight.detach().float().cpu()
        if config.init == "random":
            init = torch.randn(P, table.shape[1], generator=generator) * table.std()
        else:
            if config.init == "vocab":
                ids = torch.randint(0, vocab, (P,), generator=generator)
            else:
                bad = [i for i in config.init_token_ids if not 0 <= i < vocab]
                if bad:
                    raise LMForgeError(
                        f"init_token_ids {bad} are outside the vocabulary of {vocab}", key="init_token_ids"
                    )
                ids = torch.tensor(config.init_token_ids).repeat(P // len(config.init_token_ids) + 1)[:P]
            init = table[ids].clone()
        self.embedding = nn.Parameter(init)

    def prompts(self) -> Tensor:
        return self.embedding

    def for_slot(self, index: int, batch_size: int) -> Tensor:
        return self.prompts().expand(batch_size, -1, -1)  # (B, P, E)


def inject_prompt(model: nn.Module, config: PromptConfig, name: str) -> None:
    module = PromptEmbedding(model.tok_embed, config)
    reference = model.tok_embed.weight
    peft_modules(model)[name] = module.to(device=reference.device, dtype=reference.dtype)
    _attach(_prompt_stack(model), "prompt", model, 0, name)
    wrap_modules_to_save(model, config, name)


def hf_prompt_config(context: HFExportContext) -> dict[str, Any]:
    """adapter_config.json fields of prompt tuning (Hugging Face PEFT's ``PromptTuningConfig``)."""
    config = context.model.config
    if config.head == "classification" and config.pooling == "cls":
        raise LMForgeError(
            "cannot export prompt tuning with a [CLS]-pooled classifier: Hugging Face PEFT puts the virtual "
            "tokens first and pools the first of them, lmforge pools the real [CLS] token"
        )
    if config.arch == "encoder_decoder":
        raise LMForgeError(
            "prompt-tuning export covers encoders and decoders (lmforge prompts only the encoder)"
        )
    P, E = context.model.peft_modules[context.adapter_name].prompts().shape
    return {
        "peft_type": "PROMPT_TUNING",
        "num_virtual_tokens": P,
        "token_dim": E,
        "num_transformer_submodules": 1,
        "num_attention_heads": config.num_heads,
        "num_layers": config.num_layers,
        "prompt_tuning_init": "RANDOM",
        "prompt_tuning_init_text": None,
        "tokenizer_name_or_path": None,
    }


def hf_prompt_tensors(context: HFExportContext) -> dict[str, Tensor]:
    """The (P, E) soft prompt under the name Hugging Face PEFT gives it."""
    return {"prompt_embeddings": context.model.peft_modules[context.adapter_name].prompts()}


register_peft_method(
    "prompt",
    PromptConfig,
    inject_prompt,
    mergeable=False,
    not_mergeable_reason="prompt tuning adds input embeddings the model attends to, not a weight change",
    hf_export=HFExport(config=hf_prompt_config, model_tensors=hf_prompt_tensors, prompt_learning=True),
)


# ---- P-tuning ----------------------------------------------------------------------------------


@dataclass
class PTuningConfig(PeftConfig):
    """P-tuning options."""

    method: str = "ptuning"
    num_virtual_tokens: int = 20  # P
    encoder: str = "lstm"  # prompt encoder: "lstm" (bidirectional LSTM + MLP) or "mlp"
    hidden: int | None = None  # width inside the encoder (default: embed_dim)

    def __post_init__(self) -> None:
        if self.num_virtual_tokens < 1:
            raise ValueError(f"num_virtual_tokens = {self.num_virtual_tokens}: must be at least 1")
        if self.encoder not in ("lstm", "mlp"):
            raise ValueError(f"encoder = {self.encoder!r}: must be lstm or mlp")


class PromptEncoder(nn.Module):
    """P trainable inputs → (LSTM →) MLP → P prompt embeddings (P, E)."""

    def __init__(self, embed_dim: int, config: PTuningConfig) -> None:
        super().__init__()
        hidden = config.hidden or embed_dim
        self.inputs = nn.Parameter(torch.randn(config.num_virtual_tokens, embed_dim) * 0.02)
        self.lstm = (
            nn.LSTM(embed_dim, hidden // 2 or 1, num_layers=2, bidirectional=True, batch_first=True)
            if config.encoder == "lstm"
            else None
        )
        lstm_out = 2 * (hidden // 2 or 1) if self.lstm is not None else embed_dim
        self.mlp = nn.Sequential(nn.Linear(lstm_out, hidden), nn.ReLU(), nn.Linear(hidden, embed_dim))

    def prompts(self) -> Tensor:
        h = self.inputs[None]  # (1, P, E)
        if self.lstm is not None:
            h = self.lstm(h)[0]  # (1, P, 2·hidden/2)
        return self.mlp(h)[0]  # (P, E)

    def for_slot(self, index: int, batch_size: int) -> Tensor:
        return self.prompts().expand(batch_size, -1, -1)


def inject_ptuning(model: nn.Module, config: PTuningConfig, name: str) -> None:
    module = PromptEncoder(model.tok_embed.embedding_dim, config)
    reference = model.tok_embed.weight
    peft_modules(model)[name] = module.to(device=reference.device, dtype=reference.dtype)
    _attach(_prompt_stack(model), "prompt", model, 0, name)
    wrap_modules_to_save(model, config, name)


register_peft_method(
    "ptuning",
    PTuningConfig,
    inject_ptuning,
    mergeable=False,
    not_mergeable_reason="P-tuning adds input embeddings the model attends to, not a weight change",
    no_hf_export_reason="the export of P-tuning (Hugging Face PEFT's prompt-encoder layout) is not written yet",
)
