"""Generating text with a loaded model: the prompt's ids, the room the model has, the call.

    prompt text ──prompt_ids──► ids (an encoder-decoder's source ends with eos; an empty prompt
    starts after a document separator) ──room──► new-token budget ──lmforge.generation.generate──►
    GeneratedText (the text, the new ids, why it stopped)

``lmforge generate`` calls :func:`generate_text`, and so do the chat command and the server:
the decoder-start rule and the context check live here once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import LMForgeError
from ..generation import generate
from ..generation.state import ABSOLUTE_POSITIONS
from ..objectives import decoder_start_id


@dataclass
class Sampling:
    """How to choose the next tokens (the defaults decode greedily)."""

    max_new_tokens: int = 200  # the most tokens to generate
    temperature: float = 0.0  # 0: greedy; above 0: sample
    top_k: int | None = None  # sample among the k most likely tokens
    top_p: float | None = None  # sample among the most likely tokens whose probabilities reach p
    repetition_penalty: float = 1.0  # above 1 discourages tokens already in the text (CTRL)
    num_beams: int = 1  # beam search with this many beams (deterministic)
    length_penalty: float = 1.0  # beam search: finished sequences scored by log-prob / length^α
    seed: int = 0  # seeds sampling


@dataclass
class GeneratedText:
    """What :func:`generate_text` returns."""

    text: str  # the new text (a decoder's prompt not included)
    prompt_ids: list[int]
    new_ids: list[int]
    limited_by_context: bool  # fewer tokens than asked: the model's position table was full
    unknown_pieces: int  # pieces of the prompt read as the unknown token


def prompt_ids(tokenizer: Any, prompt: str, *, arch: str) -> list[int]:
    """The ids a model of ``arch`` reads for ``prompt``: an encoder-decoder's source ends with
    eos (as in span-corruption pretraining); an empty prompt starts after eos, a document
    separator."""
    ids = tokenizer.encode(prompt)
    if arch == "encoder_decoder" and tokenizer.eos_id is not None:
        ids = ids + [tokenizer.eos_id]
    if not ids:
        if tokenizer.eos_id is None:
            raise LMForgeError(
                "the prompt is empty and the tokenizer has no eos token to start from", key="prompt"
            )
        ids = [tokenizer.eos_id]
    return ids


def room(config: Any, prompt_length: int, wanted: int) -> int:
    """New tokens a model with a position table can still place after the prompt (``wanted``
    when it has no table, or room enough)."""
    if config.position not in ABSOLUTE_POSITIONS:
        return wanted
    used = 1 if config.arch == "encoder_decoder" else prompt_length
    left = config.max_seq_len - used
    return min(wanted, left) if left > 0 else wanted  # no room at all: generate() explains


def generate_text(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt: str,
    sampling: Sampling | None = None,
    *,
    streamer: Any = None,
) -> GeneratedText:
    """Continue ``prompt`` (a decoder) or answer it (an encoder-decoder) with ``model``.

    Args:
        model: a decoder or encoder-decoder in eval mode, on the device to use.
        tokenizer: its tokenizer.
        prompt: the text.
        sampling: how to choose tokens (default: greedy, 200 new tokens).
        streamer: receives the new tokens as they come (``put`` / ``end``), e.g.
            :class:`lmforge.generation.TextStreamer`.
    """
    sampling = sampling or Sampling()
    config = model.config
    device = next(model.parameters()).device
    ids = prompt_ids(tokenizer, prompt, arch=config.arch)
    budget = room(config, len(ids), sampling.max_new_tokens)
    encoder_decoder = config.arch == "encoder_decoder"
    out = generate(
        model,
        torch.tensor([ids], device=device),
        max_new_tokens=budget,
        temperature=sampling.temperature,
        top_k=sampling.top_k,
        top_p=sampling.top_p,
        repetition_penalty=sampling.repetition_penalty,
        num_beams=sampling.num_beams,
        length_penalty=sampling.length_penalty,
        eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.pad_id,
        decoder_start_token_id=decoder_start_id(tokenizer) if encoder_decoder else None,
        generator=torch.Generator(device=device).manual_seed(sampling.seed),
        streamer=streamer,
    )
    new = out[0, 1:] if encoder_decoder else out[0, len(ids) :]
    unknown = sum(1 for i in ids if i == tokenizer.unk_id) if tokenizer.unk_id is not None else 0
    return GeneratedText(
        text=tokenizer.decode(new.tolist()),
        prompt_ids=ids,
        new_ids=new.tolist(),
        limited_by_context=budget < sampling.max_new_tokens and new.numel() == budget,
        unknown_pieces=unknown,
    )
