"""The state of one decoding run: the sequences so far and what the model needs to extend them.

:class:`DecodeState` preallocates the token buffer (B, prompt + max_new_tokens) and the model's KV
cache once; each step writes one column and feeds the model only the tokens the cache has not
seen (the whole prompt at first, then one token). Only the last position goes through the LM
head. Left-padded decoder prompts carry an attention mask and position ids (the running count of
real tokens − 1), so each row is decoded exactly as if it were alone. An encoder-decoder runs its
encoder once; the decoder then reads the encoder output through a cross-attention cache filled on
the first step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from ..errors import ConfigError, LMForgeError
from ..model import KVCache, ModelCache, Transformer

ABSOLUTE_POSITIONS = ("learned", "sinusoidal")  # a table of max_seq_len rows: a hard context limit


def check_model(model: Transformer) -> None:
    """Generation needs a decoder stack and an LM head."""
    config = model.config
    if model.decoder is None:
        raise ConfigError(
            f"an {config.arch} model cannot generate text: it has no decoder (use a decoder or "
            "encoder_decoder model)",
            key="arch",
        )
    if config.head != "lm":
        raise ConfigError(
            f"generation needs a model with head 'lm', this one has '{config.head}'", key="head"
        )


class DecodeState:
    """Sequences being decoded, with the KV cache, masks and positions of the model.

    Args:
        model: a decoder or encoder-decoder :class:`~lmforge.model.Transformer` with an LM head.
        input_ids: (B, T) the prompts (decoder, left-padded) or the source (encoder-decoder).
        attention_mask: (B, T) boolean, True = real token, or None when nothing is padded.
        max_new_tokens: room to reserve for new tokens.
        pad_token_id: fills unused positions and the rows that have finished.
        decoder_start_token_id: first decoder token of an encoder-decoder.
        use_cache: keep keys/values between steps; False recomputes the whole sequence each step.
        compile: run the one-token steps through ``torch.compile`` (the prompt stays eager).

    Attributes:
        tokens: (B, P + max_new_tokens) the decoder's sequences; columns ``:length`` are filled.
        prompt_len: P, the prompt columns (T for a decoder, 1 — the start token — for an encoder-decoder).
        length: filled columns.
    """

    def __init__(
        self,
        model: Transformer,
        input_ids: Tensor,
        attention_mask: Tensor | None,
        *,
        max_new_tokens: int,
        pad_token_id: int,
        decoder_start_token_id: int,
        use_cache: bool = True,
        compile: bool = False,
    ) -> None:
        config = model.config
        device = model.tok_embed.weight.device
        B, T = input_ids.shape
        self.model = model
        self.encoder_decoder = config.arch == "encoder_decoder"
        self.memory: Tensor | None = None  # encoder output (B, S, E)
        self.memory_mask: Tensor | None = None  # (B, S) True = real source token
        self.mask: Tensor | None = None  # (B, P + N) decoder padding mask, None when nothing is padded
        self.positions: Tensor | None = None  # (B, P + N) decoder position ids, with the mask
        check_context(
            config.position,
            config.max_seq_len,
            prompt_len=1 if self.encoder_decoder else longest_prompt(input_ids, attention_mask),
            source_len=T if self.encoder_decoder else None,
            max_new_tokens=max_new_tokens,
        )

        if self.encoder_decoder:
            self.memory_mask = attention_mask
            self.memory = model.encode(input_ids, attention_mask=attention_mask)[0]  # (B, S, E), once
            prompt = torch.full((B, 1), decoder_start_token_id, dtype=torch.long, device=device)
        else:
            prompt = input_ids
        P = prompt.shape[1]
        total = P + max_new_tokens
        self.prompt_len = P
        self.length = P
        self.tokens = torch.full((B, total), pad_token_id, dtype=torch.long, device=device)  # (B, P + N)
        self.tokens[:, :P] = prompt

        if not self.encoder_decoder and attention_mask is not None:
            # Left padding: new tokens are real; each row counts positions from its first real token.
            self.mask = torch.ones(B, total, dtype=torch.bool, device=device)
            self.mask[:, :P] = attention_mask
            real = attention_mask.long()
            prompt_positions = (real.cumsum(1) - 1).clamp(min=0)  # (B, P)
            new_positions = real.sum(1, keepdim=True) + torch.arange(max_new_tokens, device=device)  # (B, N)
            self.positions = torch.cat((prompt_positions, new_positions), dim=1)  # (B, P + N)

        self.compile = compile and use_cache  # one-token steps through torch.compile
        self.cache: ModelCache | None = None
        if use_cache:
            memory_len = self.memory.shape[1] if self.memory is not None else None
            self.cache = model.new_cache(B, total, memory_len=memory_len)

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    def forward(self) -> Tensor:
        """Logits (B, V) of the next token after the first ``length`` columns.

        With a cache, only the columns it has not seen go through the stack; without one, all of
        them. The LM head is applied to the last position only.
        """
        start = self.cache.length if self.cache is not None else 0
        end = self.length
        step = _compiled_step() if self.compile and end - start == 1 else last_logits
        return step(
            self.model,
            self.tokens[:, start:end],
            self.mask[:, :end] if self.mask is not None else None,
            self.positions[:, start:end] if self.positions is not None else None,
            self.cache.self_attention if self.cache is not None else None,
            self.memory,
            self.memory_mask,
            self.cache.cross_attention if self.cache is not None else None,
        )

    def append(self, tokens: Tensor) -> None:
        """Write the chosen tokens (B,) into the next column."""
        self.tokens[:, self.length] = tokens
        self.length += 1

    def seen_tokens(self, vocab_size: int) -> Tensor:
        """(B, V) boolean: which tokens each decoder sequence holds so far (padding excluded)."""
        ids = self.tokens[:, : self.length]
        if self.mask is not None:
            ids = ids.masked_fill(~self.mask[:, : self.length], vocab_size)  # padding -> a spare column
        seen = torch.zeros(self.batch_size, vocab_size + 1, dtype=torch.bool, device=ids.device)
        return seen.scatter_(1, ids, True)[:, :vocab_size]

    def expand(self, num_copies: int) -> None:
        """Repeat every row ``num_copies`` times in place (row b becomes rows b·k … b·k + k − 1):
        the beams of beam search start as copies of their prompt."""
        index = torch.arange(self.batch_size, device=self.tokens.device).repeat_interleave(num_copies)
        self.tokens = self.tokens.index_select(0, index)
        if self.mask is not None and self.positions is not None:
            self.mask = self.mask.index_select(0, index)
            self.positions = self.positions.index_select(0, index)
        if self.memory is not None:
            self.memory = self.memory.index_select(0, index)
        if self.memory_mask is not None:
            self.memory_mask = self.memory_mask.index_select(0, index)
        if self.cache is not None:
            self.cache.reorder(index)

    def reorder(self, index: Tensor) -> None:
        """Row i takes the decoded state of row ``index[i]`` (the surviving beams of beam search).

        The index may only move rows within a group of copies made by :meth:`expand` (the beams of
        one input): those share the encoder memory, its mask and positions, which stay in place.
        Only the filled part of the self-attention caches is copied.
        """
        self.tokens[:, : self.length] = self.tokens[:, : self.length].index_select(0, index)
        if self.cache is not None:
            for layer in self.cache.self_attention:
                n = layer.length
                layer.keys[:, :, :n] = layer.keys[:, :, :n].index_select(0, index)
                layer.values[:, :, :n] = layer.values[:, :, :n].index_select(0, index)


def last_logits(
    model: Transformer,
    ids: Tensor,
    mask: Tensor | None,
    positions: Tensor | None,
    cache: list[KVCache] | None,
    memory: Tensor | None,
    memory_mask: Tensor | None,
    cross_cache: list[KVCache] | None,
) -> Tensor:
    """The decoder stack on ids (B, T) (after what ``cache`` holds), the LM head on the last
    position only: logits (B, V). Encoder-decoders pass the encoder output as ``memory``."""
    embeds = model.embed(ids)  # (B, T, E)
    assert model.decoder is not None and model.head is not None
    hidden = model.decoder(
        embeds,
        attention_mask=mask,
        position_ids=positions,
        memory=memory,
        memory_mask=memory_mask,
        cache=cache,
        cross_cache=cross_cache,
    )[0]
    return model.head(hidden[:, -1]).float()  # (B, E) -> (B, V), float32 also for bf16 weights


@functools.cache
def _compiled_step() -> Callable[..., Tensor]:
    """:func:`last_logits` compiled once for one-token steps, with symbolic batch and cache
    lengths, so the cache growing by a token each step does not recompile."""
    return torch.compile(last_logits, dynamic=True)


def longest_prompt(input_ids: Tensor, attention_mask: Tensor | None) -> int:
    """Real tokens of the longest prompt in the batch."""
    if attention_mask is None:
        return input_ids.shape[1]
    return int(attention_mask.sum(1).max())


def check_context(
    position: str,
    max_seq_len: int,
    *,
    prompt_len: int,
    source_len: int | None,
    max_new_tokens: int,
) -> None:
    """A model with a learned or sinusoidal position table sees at most ``max_seq_len`` positions:
    the prompt (an encoder-decoder's decoder prompt is its start token) plus the new tokens must
    fit, and so must an encoder-decoder's source. Other position kinds have no hard limit."""
    if position not in ABSOLUTE_POSITIONS:
        return
    if source_len is not None and source_len > max_seq_len:
        raise LMForgeError(
            f"the input has {source_len} tokens but the model's context holds {max_seq_len} "
            f"({position} positions)",
            key="prompt",
        )
    if prompt_len >= max_seq_len:
        raise LMForgeError(
            f"the prompt has {prompt_len} tokens but the model's context holds {max_seq_len} "
            f"({position} positions): no room for a new token",
            key="prompt",
        )
    if prompt_len + max_new_tokens > max_seq_len:
        raise LMForgeError(
            f"the prompt ({prompt_len} tokens) plus max_new_tokens {max_new_tokens} exceed the model's "
            f"context of {max_seq_len} ({position} positions): ask for at most "
            f"{max_seq_len - prompt_len} new tokens",
            key="max_new_tokens",
        )
