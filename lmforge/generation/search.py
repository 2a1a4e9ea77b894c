"""``generate`` and ``stream``: autoregressive decoding with a KV cache.

    prompt ──prefill (whole prompt, one pass)──► logits of the last position
           ──choose (greedy | sampling | beam search)──► token ──append, feed one token──► …

Each step feeds the model only the new token; keys and values of earlier tokens come from the
cache (preallocated for prompt + max_new_tokens, so nothing grows per step), and only the last
position goes through the LM head. Rows that produce an end-of-sequence token are finished: they
are padded from then on, and decoding stops when every row is finished or after
``max_new_tokens``. Batched prompts of different lengths are left-padded; the attention mask and
position ids make each row decode exactly as it would alone.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Protocol

import torch
from torch import Tensor

from ..errors import ConfigError, LMForgeError
from ..model import Transformer
from .beam import beam_search
from .sampling import apply_repetition_penalty, check_sampling, next_tokens
from .state import DecodeState, check_model


class Streamer(Protocol):
    """Receives the new token of every row after each step (``put``), then ``end()`` once."""

    def put(self, tokens: Tensor) -> None: ...

    def end(self) -> None: ...


def generate(
    model: Transformer,
    input_ids: Tensor,
    *,
    attention_mask: Tensor | None = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    early_stopping: bool = True,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    decoder_start_token_id: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    streamer: Streamer | None = None,
    compile: bool = False,
) -> Tensor:
    """Continue ``input_ids`` with up to ``max_new_tokens`` tokens.

    Args:
        model: a decoder, or an encoder-decoder, with an LM head. Run in eval mode (restored after).
        input_ids: (B, T) prompts of a decoder, left-padded to one length; or the source
            sequences of an encoder-decoder (padded on either side).
        attention_mask: (B, T) True/1 = real token; None when nothing is padded.
        max_new_tokens: the most tokens to add to each row.
        temperature: 0 decodes greedily (argmax); above 0 samples from softmax(logits / T).
        top_k: sample only among the k most likely tokens.
        top_p: sample only among the most likely tokens whose probabilities reach p (nucleus).
        repetition_penalty: θ > 1 discourages tokens already present (prompt included): their
            positive logits are divided by θ, negative ones multiplied (CTRL).
        num_beams: above 1, beam search with that many beams (deterministic: temperature 0).
        length_penalty: beam search scores a finished sequence by sum of log-probs / length^α.
        early_stopping: beam search stops an input once it has num_beams finished sequences;
            False: once no running beam can beat them.
        eos_token_id: end-of-sequence id(s): a row that produces one is finished.
        pad_token_id: fills finished rows and shorter beam results (default: the model config's).
        decoder_start_token_id: first decoder token of an encoder-decoder (default: pad_token_id,
            T5's convention).
        generator: a seeded ``torch.Generator`` makes sampling reproducible.
        use_cache: keep keys/values between steps; False recomputes the whole sequence each step
            (slower, same tokens: a check of the cache).
        streamer: gets each step's new tokens as they are chosen (not with beam search).
        compile: run the one-token steps through ``torch.compile`` (dynamic shapes: compiled
            once per model, reused as the cache grows). Pays off for long outputs: compiling
            takes seconds to a minute on a CPU, then each step skips most of PyTorch's per-op
            overhead. A model in the decoding form (:func:`lmforge.quant.for_decoding`) decodes
            one sequence faster eagerly where lmforge's native kernels are built (each block's
            step is one native call, which a compiled graph does not take): GPT-2 small 23.6–28.4
            compiled against 28.7–32.8 tokens/s eager on one core here.

    Returns:
        (B, P + N) long: a decoder's prompts followed by the new tokens; for an encoder-decoder,
        the decoder sequence (the start token, then the new tokens). N ≤ max_new_tokens: decoding
        stops early when every row has ended, and finished rows are padded with pad_token_id.

    Raises:
        LMForgeError: settings that cannot work (a negative temperature, top_p outside (0, 1],
            a prompt that does not fit the model's context, …), named in one line.
    """
    settings = _Settings(
        model,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        num_beams=num_beams,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        decoder_start_token_id=decoder_start_token_id,
    )
    if num_beams > 1 and streamer is not None:
        raise ConfigError(
            "streaming needs num_beams 1: beam search settles the tokens at the end", key="num_beams"
        )
    input_ids, attention_mask = _prepare_inputs(model, input_ids, attention_mask)
    with torch.inference_mode(), _eval_mode(model):
        state = settings.new_state(model, input_ids, attention_mask, use_cache=use_cache, compile=compile)
        if num_beams > 1:
            out = beam_search(
                state,
                num_beams=num_beams,
                max_new_tokens=max_new_tokens,
                length_penalty=length_penalty,
                early_stopping=early_stopping,
                eos_token_ids=settings.eos_ids,
                pad_token_id=settings.pad_token_id,
                repetition_penalty=repetition_penalty,
            )
        else:
            for tokens in _decode_steps(state, settings, generator=generator):
                if streamer is not None:
                    streamer.put(tokens)
            if streamer is not None:
                streamer.end()
            out = state.tokens[:, : state.length]
    return out.clone()  # an ordinary tensor (not an inference-mode one) the caller may train on


def stream(
    model: Transformer,
    input_ids: Tensor | Sequence[int],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    decoder_start_token_id: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    compile: bool = False,
) -> Iterator[int]:
    """Yield the new token ids of one prompt as they are produced (an end token included, then stop).

    Takes the options of :func:`generate` (one sequence, no beam search); ``input_ids`` is a
    (T,) or (1, T) tensor or a list of ids. Pair with
    :class:`~lmforge.generation.IncrementalDecoder` to print text as it grows.
    """
    settings = _Settings(
        model,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        num_beams=1,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        decoder_start_token_id=decoder_start_token_id,
    )
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise LMForgeError(
            f"stream decodes one sequence: input_ids of shape {tuple(ids.shape)}", key="input_ids"
        )
    ids, _ = _prepare_inputs(model, ids, None)
    with _eval_mode(model):
        with torch.inference_mode():
            state = settings.new_state(model, ids, None, use_cache=use_cache, compile=compile)
            steps = _decode_steps(state, settings, generator=generator)
        while True:
            with torch.inference_mode():  # entered per step: the caller's code runs in between
                tokens = next(steps, None)
            if tokens is None:
                return
            yield int(tokens[0])


# ---- the decoding loop -------------------------------------------------------------------------


def _decode_steps(
    state: DecodeState, settings: _Settings, *, generator: torch.Generator | None
) -> Iterator[Tensor]:
    """Greedy or sampled decoding from ``state``; yields the tokens (B,) of each step."""
    temperature, top_k, top_p = settings.temperature, settings.top_k, settings.top_p
    penalty = settings.repetition_penalty
    pad = settings.pad_token_id
    eos = (
        torch.tensor(settings.eos_ids, dtype=torch.long, device=state.tokens.device)
        if settings.eos_ids
        else None
    )
    unfinished = (
        torch.ones(state.batch_size, dtype=torch.bool, device=state.tokens.device)
        if eos is not None
        else None
    )

    logits = state.forward()  # (B, V) prefill: the whole prompt in one pass
    seen = state.seen_tokens(logits.shape[-1]) if penalty != 1.0 else None
    for step in range(settings.max_new_tokens):
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen, penalty)
        tokens = next_tokens(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        if unfinished is not None:
            tokens = torch.where(unfinished, tokens, pad)  # finished rows are padded
        state.append(tokens)
        if seen is not None:
            seen.scatter_(1, tokens[:, None], True)
        yield tokens
        if unfinished is not None:
            unfinished &= ~torch.isin(tokens, eos)
            if not unfinished.any():
                return
        if step + 1 < settings.max_new_tokens:
            logits = state.forward()  # (B, V) feeding only the new token


# ---- settings and inputs -----------------------------------------------------------------------


class _Settings:
    """Checked generation settings with the defaults resolved from the model."""

    def __init__(
        self,
        model: Transformer,
        *,
        max_new_tokens: int,
        temperature: float,
        top_k: int | None,
        top_p: float | None,
        repetition_penalty: float,
        num_beams: int,
        eos_token_id: int | Sequence[int] | None,
        pad_token_id: int | None,
        decoder_start_token_id: int | None,
    ) -> None:
        check_model(model)
        check_sampling(
            temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty
        )
        vocab_size = model.config.vocab_size
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens {max_new_tokens} must be at least 1", key="max_new_tokens")
        if num_beams < 1:
            raise ConfigError(f"num_beams {num_beams} must be at least 1", key="num_beams")
        if num_beams > 1 and temperature != 0.0:
            raise ConfigError(
                f"beam search is deterministic: use temperature 0 with num_beams {num_beams} "
                "(or sample with num_beams 1)",
                key="temperature",
            )
        eos_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
        pad = model.config.pad_token_id if pad_token_id is None else pad_token_id
        start = pad if decoder_start_token_id is None else decoder_start_token_id
        for key, ids in (
            ("eos_token_id", eos_ids),
            ("pad_token_id", [pad]),
            ("decoder_start_token_id", [start]),
        ):
            for token in ids:
                if not 0 <= token < vocab_size:
                    raise ConfigError(
                        f"{key} {token} is not a token id of a {vocab_size}-token vocabulary", key=key
                    )
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_k = top_k
        self.top_p = top_p
        self.repetition_penalty = repetition_penalty
        self.eos_ids = eos_ids
        self.pad_token_id = pad
        self.decoder_start_token_id = start

    def new_state(
        self,
        model: Transformer,
        input_ids: Tensor,
        attention_mask: Tensor | None,
        *,
        use_cache: bool,
        compile: bool = False,
    ) -> DecodeState:
        return DecodeState(
            model,
            input_ids,
            attention_mask,
            max_new_tokens=self.max_new_tokens,
            pad_token_id=self.pad_token_id,
            decoder_start_token_id=self.decoder_start_token_id,
            use_cache=use_cache,
            compile=compile,
        )


def _prepare_inputs(
    model: Transformer, input_ids: Tensor, attention_mask: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """Check the prompts, move them to the model's device; a mask without padding becomes None."""
    device = model.tok_embed.weight.device
    if input_ids.dim() != 2:
        raise LMForgeError(
            f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}", key="input_ids"
        )
    if input_ids.shape[1] == 0:
        raise LMForgeError("the prompt is empty: give at least one token (e.g. the bos token)", key="prompt")
    input_ids = input_ids.to(device=device, dtype=torch.long)
    vocab_size = model.config.vocab_size
    if int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab_size:
        raise LMForgeError(
            f"input_ids hold ids outside the model's {vocab_size}-token vocabulary", key="input_ids"
        )
    if attention_mask is None:
        return input_ids, None
    if attention_mask.shape != input_ids.shape:
        raise LMForgeError(
            f"attention_mask of shape {tuple(attention_mask.shape)} does not match input_ids "
            f"{tuple(input_ids.shape)}",
            key="attention_mask",
        )
    mask = attention_mask.to(device=device).bool()
    if not bool(mask.any(dim=1).all()):
        raise LMForgeError(
            "a prompt of the batch has no real token (its mask is all False)", key="attention_mask"
        )
    if bool(mask.all()):
        return input_ids, None
    if model.config.arch == "decoder" and bool((mask[:, 1:] < mask[:, :-1]).any()):
        raise LMForgeError(
            "decoder prompts must be left-padded (padding before the tokens, so every row ends with "
            "its last real token)",
            key="attention_mask",
        )
    return input_ids, mask


@contextmanager
def _eval_mode(model: Transformer) -> Iterator[None]:
    """Run in eval mode (no dropout), then restore the mode the model was in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
