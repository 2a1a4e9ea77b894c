"""The attention weights α of a real model on one text, with the tokens as its tokenizer splits them.

The model's own forward pass is asked for α (``need_weights=True``: the explicit path of
:class:`~lmforge.model.attention.SelfAttention`, which gives the same numbers as the fast one), so
what is drawn is what the model computes, layer by layer and head by head. The views follow the
idea of BertViz's head and model views (Vig 2019, "A Multiscale Visualization of Attention in the
Transformer Model"): one heatmap per (layer, head), queries as rows, keys as columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import LMForgeError
from ..model import Transformer
from ..tokenizers import Tokenizer


@dataclass
class AttentionMaps:
    """α of every self-attention layer on one text.

    weights: (L, H, T, S) float32, row t of [l, h] is query t's distribution over the S keys (sums to 1;
        S > T when a PEFT prefix or prompt adds virtual positions before the text).
    tokens: the T query tokens as the tokenizer splits the text (special tokens included).
    key_tokens: the S key labels (virtual positions first, named ``<v1>`` …).
    token_ids: the T ids fed to the model.
    stack: which stack the layers belong to ("encoder" or "decoder").
    """

    weights: np.ndarray
    tokens: list[str]
    key_tokens: list[str]
    token_ids: list[int]
    stack: str

    @property
    def num_layers(self) -> int:
        return int(self.weights.shape[0])

    @property
    def num_heads(self) -> int:
        return int(self.weights.shape[1])

    def select(self, layer: int | None = None, head: int | None = None) -> tuple[list[int], list[int]]:
        """The layer and head indices a view shows (all, or the one asked), checked.

        Raises:
            LMForgeError: a layer or head outside the model (one line naming the valid range).
        """
        for value, size, key in ((layer, self.num_layers, "layer"), (head, self.num_heads, "head")):
            if value is not None and not 0 <= value < size:
                raise LMForgeError(f"--{key} {value} is out of range: the model has {size} ({key}s 0..{size - 1})", key=key)
        layers = [layer] if layer is not None else list(range(self.num_layers))
        heads = [head] if head is not None else list(range(self.num_heads))
        return layers, heads


def token_labels(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    """Readable labels of ``ids``, one per token, as the tokenizer splits them: a token decoded on
    its own (byte-level ``Ġcat`` reads ``cat``; WordPiece keeps ``##s``), else its vocabulary entry."""
    labels = []
    for token_id in ids:
        text = tokenizer.decode([token_id], skip_special_tokens=False).strip()
        if not text:
            text = tokenizer.id_to_token(token_id) or f"<{token_id}>"
            text = text.replace("\n", "\\n").strip() or repr(text)
        labels.append(text)
    return labels


def encode_for(model: Transformer, tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` the way the model reads a text: with the tokenizer's special tokens.

    Raises:
        LMForgeError: an empty text, or one longer than the model's position table.
    """
    if not text.strip():
        raise LMForgeError("--text is empty", key="text")
    ids = tokenizer.encode(text, add_special_tokens=True)
    config = model.config
    if config.position in ("learned", "sinusoidal") and len(ids) > config.max_seq_len:
        raise LMForgeError(
            f"--text is {len(ids)} tokens, the model reads at most {config.max_seq_len}", key="text"
        )
    if not ids:
        raise LMForgeError("--text gives no tokens", key="text")
    return ids


@torch.no_grad()
def capture_attention(model: Transformer, tokenizer: Tokenizer, text: str) -> AttentionMaps:
    """Run ``model`` on ``text`` once and keep α of every self-attention layer.

    An encoder or a decoder: its stack; an encoder-decoder: its encoder (the text is the source).

    Raises:
        LMForgeError: see :func:`encode_for`.
    """
    ids = encode_for(model, tokenizer, text)
    input_ids = torch.tensor([ids], device=next(model.parameters()).device)
    was_training = model.training
    model.eval()
    try:
        if model.config.arch == "decoder":
            weights = model(input_ids, need_weights=True).attentions
            stack = "decoder"
        else:
            _, weights = model.encode(input_ids, need_weights=True)
            stack = "encoder"
    finally:
        model.train(was_training)
    assert weights is not None
    stacked = torch.stack([w[0].float() for w in weights]).cpu().numpy()  # L × (1, H, T, S) -> (L, H, T, S)
    tokens = token_labels(tokenizer, ids)
    num_virtual = stacked.shape[-1] - len(ids)
    keys = [f"<v{i + 1}>" for i in range(num_virtual)] + tokens
    if stacked.shape[-2] != len(ids):  # prompt tuning: the virtual rows are queries too
        tokens = keys
    return AttentionMaps(weights=stacked, tokens=tokens, key_tokens=keys, token_ids=ids, stack=stack)
