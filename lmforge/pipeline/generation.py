"""Generating text with a loaded model: the prompt's ids, the room the model has, the call.

    prompt text ──prompt_ids──► ids (an encoder-decoder's source ends with eos; an empty prompt
    starts after a document separator) ──room──► new-token budget ──lmforge.generation.generate──►
    GeneratedText (the text, the new ids, why it stopped)

``lmforge generate`` calls :func:`generate_text`, and so do the chat command and the server:
the decoder-start rule and the context check live here once.

Generation is bounded before anything is allocated: a model with a position table (learned,
sinusoidal) holds ``max_seq_len`` positions, prompt included; a model without one (RoPE, ALiBi,
relative) is held to the memory its key/value cache would take. A decoder with a position table
can keep going past its context with ``sliding_window`` (as nanoGPT's ``generate`` does: the last
positions of the text are the context of the next tokens).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from ..chat_template import chat_prompt
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
    sliding_window: bool = False  # a decoder with a position table: crop the context and go on

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise LMForgeError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}", key="max_new_tokens")
        if self.num_beams < 1:
            raise LMForgeError(f"num_beams must be at least 1, got {self.num_beams}", key="num_beams")


@dataclass
class Chat:
    """Send the prompt as the user's turn through the model's chat template (an instruct model):
    the answer stops at the end of the assistant's turn."""

    system: str | None = None  # a system message before the user's
    template: str | None = None  # a built-in (chatml, llama-2, plain) or Jinja source; None: the model's


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


def available_memory() -> int:
    """Bytes of memory this machine can still give (Linux: MemAvailable; else the physical size)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def cache_bytes(config: Any, positions: int, *, rows: int = 1, dtype_bytes: int = 4) -> int:
    """Bytes of the key/value cache for ``positions`` positions of ``rows`` sequences (beams)."""
    layers = (config.num_decoder_layers or config.num_layers) if config.arch == "encoder_decoder" else config.num_layers
    return 2 * layers * config.num_kv_heads * config.head_dim * positions * rows * dtype_bytes


def check_length(config: Any, prompt_length: int, sampling: Sampling, *, dtype_bytes: int = 4) -> None:
    """Refuse, before anything is allocated, a generation the model cannot hold: past a position
    table (without a sliding window), or a key/value cache larger than the free memory."""
    total = (1 if config.arch == "encoder_decoder" else prompt_length) + sampling.max_new_tokens
    if config.position in ABSOLUTE_POSITIONS:
        if total <= config.max_seq_len:
            return
        if config.arch == "decoder" and prompt_length >= config.max_seq_len:
            raise LMForgeError(
                f"the prompt has {prompt_length} tokens; the model's context holds {config.max_seq_len} "
                "positions: shorten the prompt",
                key="prompt",
            )
        if sampling.sliding_window and config.arch == "decoder":
            return
        left = config.max_seq_len - (1 if config.arch == "encoder_decoder" else prompt_length)
        hint = " or --sliding_window true to keep going past it" if config.arch == "decoder" else ""
        raise LMForgeError(
            f"{'the prompt (' + str(prompt_length) + ' tokens) and ' if config.arch == 'decoder' else ''}"
            f"{sampling.max_new_tokens:,} new tokens do not fit the model's context of {config.max_seq_len} "
            f"positions: ask for at most {max(left, 0):,} new tokens{hint}",
            key="max_new_tokens",
        )
    need = cache_bytes(config, total, rows=sampling.num_beams, dtype_bytes=dtype_bytes)
    free = available_memory()
    if need > 0.8 * free:
        raise LMForgeError(
            f"{sampling.max_new_tokens:,} new tokens need a key/value cache of {need / 2**30:.1f} GiB, "
            f"more than this machine has free ({free / 2**30:.1f} GiB): ask for fewer --max_new_tokens",
            key="max_new_tokens",
        )


def generate_text(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt: str,
    sampling: Sampling | None = None,
    *,
    streamer: Any = None,
    chat: Chat | None = None,
) -> GeneratedText:
    """Continue ``prompt`` (a decoder) or answer it (an encoder-decoder) with ``model``.

    Args:
        model: a decoder or encoder-decoder in eval mode, on the device to use.
        tokenizer: its tokenizer.
        prompt: the text.
        sampling: how to choose tokens (default: greedy, 200 new tokens).
        streamer: receives the new tokens as they come (``put`` / ``end``), e.g.
            :class:`lmforge.generation.TextStreamer`.
        chat: send ``prompt`` as a user message through the chat template (a decoder).
    """
    sampling = sampling or Sampling()
    config = model.config
    parameter = next(model.parameters())
    device = parameter.device
    stop: int | list[int] | None = tokenizer.eos_id
    if chat is not None:
        if config.arch != "decoder":
            raise LMForgeError("a chat prompt needs a decoder model", key="chat")
        ids, stop = chat_prompt(tokenizer, prompt, system=chat.system, template=chat.template)
    else:
        ids = prompt_ids(tokenizer, prompt, arch=config.arch)
    check_length(config, len(ids), sampling, dtype_bytes=parameter.element_size())
    unknown = sum(1 for i in ids if i == tokenizer.unk_id) if tokenizer.unk_id is not None else 0
    if sampling.sliding_window and config.position in ABSOLUTE_POSITIONS and config.arch == "decoder":
        new = sliding(model, tokenizer, ids, sampling, streamer=streamer)
        return GeneratedText(tokenizer.decode(new), ids, new, False, unknown)
    budget = room(config, len(ids), sampling.max_new_tokens)
    encoder_decoder = config.arch == "encoder_decoder"
    out = generate(
        model,
        torch.tensor([ids], device=device),
        max_new_tokens=budget,
        num_beams=sampling.num_beams,
        length_penalty=sampling.length_penalty,
        decoder_start_token_id=decoder_start_id(tokenizer) if encoder_decoder else None,
        streamer=streamer,
        **choosing(sampling, tokenizer, device, stop=stop),
    )
    new = out[0, 1:] if encoder_decoder else out[0, len(ids) :]
    return GeneratedText(
        text=tokenizer.decode(new.tolist()),
        prompt_ids=ids,
        new_ids=new.tolist(),
        limited_by_context=budget < sampling.max_new_tokens and new.numel() == budget,
        unknown_pieces=unknown,
    )


def choosing(
    sampling: Sampling, tokenizer: Any, device: torch.device, *, seed_offset: int = 0, stop: Any = None
) -> dict[str, Any]:
    """The options of :func:`lmforge.generation.generate` that choose the next token and end the
    text (``stop``: the ids that end it, default the tokenizer's eos)."""
    return {
        "temperature": sampling.temperature,
        "top_k": sampling.top_k,
        "top_p": sampling.top_p,
        "repetition_penalty": sampling.repetition_penalty,
        "eos_token_id": tokenizer.eos_id if stop is None else stop,
        "pad_token_id": tokenizer.pad_id,
        "generator": torch.Generator(device=device).manual_seed(sampling.seed + seed_offset),
    }


class _Chunks:
    """A streamer for one chunk of a longer generation: passes the tokens on, keeps the end."""

    def __init__(self, streamer: Any) -> None:
        self.streamer = streamer

    def put(self, tokens: torch.Tensor) -> None:
        if self.streamer is not None:
            self.streamer.put(tokens)

    def end(self) -> None:
        """Only the whole generation ends."""


def sliding(model: torch.nn.Module, tokenizer: Any, ids: list[int], sampling: Sampling, *, streamer: Any) -> list[int]:
    """Decoder generation past the context: whenever the context is full, the last three quarters
    of the text become the prompt of the next chunk (its cache built anew), so each new token
    sees at least that much of what came before."""
    config = model.config
    context = config.max_seq_len
    keep = max(1, (3 * context) // 4)
    device = next(model.parameters()).device
    text, new = list(ids), []
    chunk_streamer = _Chunks(streamer)
    step = 0
    while len(new) < sampling.max_new_tokens:
        window = text[-keep:] if len(text) >= context else text
        budget = min(sampling.max_new_tokens - len(new), context - len(window))
        out = generate(
            model,
            torch.tensor([window], device=device),
            max_new_tokens=budget,
            streamer=chunk_streamer,
            **choosing(sampling, tokenizer, device, seed_offset=step),
        )
        chunk = out[0, len(window) :].tolist()
        text += chunk
        new += chunk
        step += 1
        if len(chunk) < budget or (tokenizer.eos_id is not None and tokenizer.eos_id in chunk):
            break  # the model ended its text
    if streamer is not None:
        streamer.end()
    return new
