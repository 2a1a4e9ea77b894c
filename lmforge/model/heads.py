"""Task heads: what turns the final hidden states into predictions.

- Language-model head (GPT-2, Llama, T5): hidden → vocabulary logits, optionally sharing the token
  embedding matrix (Press & Wolf 2017, "Using the Output Embedding").
- Masked-LM head (BERT, Devlin et al. 2019): dense → activation → norm → vocabulary logits.
- Sequence classification: pool the sequence (first token, mean, or last real token), optional
  dense + tanh (BERT's pooler), dropout, linear classifier.
- Token classification: a linear classifier per position (tagging).
- Extractive QA span head: per position a start and an end score (BERT on SQuAD).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import ModelConfig
from .layers import ACTIVATIONS, make_norm


class LMHead(nn.Module):
    """Hidden states (…, E) → logits (…, V)."""

    def __init__(self, config: ModelConfig, embedding: nn.Embedding) -> None:
        super().__init__()
        self.logit_scale = config.logit_scale
        self.proj = nn.Linear(config.embed_dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.proj.weight = embedding.weight

    def forward(self, hidden: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        if self.logit_scale != 1.0:
            hidden = hidden * self.logit_scale
        return self.proj(hidden)


class MLMHead(nn.Module):
    """BERT's masked-LM head: dense → activation → norm → logits (+ bias)."""

    def __init__(self, config: ModelConfig, embedding: nn.Embedding) -> None:
        super().__init__()
        self.dense = nn.Linear(config.embed_dim, config.embed_dim)
        self.act = ACTIVATIONS[config.activation]()
        self.norm = make_norm(config.norm, config.embed_dim, config.norm_eps, bias=config.norm_bias)
        self.proj = nn.Linear(config.embed_dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.proj.weight = embedding.weight
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.proj(self.norm(self.act(self.dense(hidden)))) + self.bias


def pool(hidden: Tensor, attention_mask: Tensor | None, how: str) -> Tensor:
    """One vector per sequence from hidden (B, T, E): the first token ("cls"), the mean of the
    real tokens ("mean") or the last real token ("last", works with left or right padding)."""
    if how == "cls":
        return hidden[:, 0]
    if attention_mask is None:
        return hidden.mean(dim=1) if how == "mean" else hidden[:, -1]
    mask = attention_mask.bool()
    if how == "mean":
        weights = mask.to(hidden.dtype)[..., None]  # (B, T, 1)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
    if how == "last":
        T = mask.shape[1]
        last = T - 1 - mask.flip(1).to(torch.int8).argmax(dim=1)  # index of the last True
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(f"unknown pooling '{how}' (cls, mean or last)")


class SequenceClassificationHead(nn.Module):
    """pool → (dense + tanh) → dropout → classifier: logits (B, num_labels)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.pooling = config.pooling
        self.dense = nn.Linear(config.embed_dim, config.embed_dim) if config.pooler else None
        self.dropout = nn.Dropout(config.dropout)
        self.classifier = nn.Linear(config.embed_dim, config.num_labels, bias=bool(config.classifier_bias))

    def forward(self, hidden: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        pooled = pool(hidden, attention_mask, self.pooling)  # (B, E)
        if self.dense is not None:
            pooled = torch.tanh(self.dense(pooled))
        return self.classifier(self.dropout(pooled))


class TokenClassificationHead(nn.Module):
    """dropout → classifier at every position: logits (B, T, num_labels)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.dropout = nn.Dropout(config.dropout)
        self.classifier = nn.Linear(config.embed_dim, config.num_labels)

    def forward(self, hidden: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.classifier(self.dropout(hidden))


class SpanHead(nn.Module):
    """Extractive QA: start and end scores per position, logits (B, T, 2)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.classifier = nn.Linear(config.embed_dim, 2)

    def forward(self, hidden: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.classifier(hidden)


def make_head(config: ModelConfig, embedding: nn.Embedding) -> nn.Module | None:
    """The head named by ``config.head`` (None for "none")."""
    if config.head == "lm":
        return LMHead(config, embedding)
    if config.head == "mlm":
        return MLMHead(config, embedding)
    if config.head == "classification":
        return SequenceClassificationHead(config)
    if config.head == "token_classification":
        return TokenClassificationHead(config)
    if config.head == "qa":
        return SpanHead(config)
    return None
