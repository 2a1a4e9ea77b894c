"""``lmforge generate``: continue a prompt with a trained model, streaming the text as it comes."""

from __future__ import annotations

import sys
from typing import Literal

import torch

from ..errors import LMForgeError


def generate(
    *,
    model: str,
    prompt: str,
    max_new_tokens: int = 200,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    seed: int = 0,
    no_stream: bool = False,
    device: str = "auto",
    dtype: Literal["fp32", "bf16", "int8"] = "fp32",
) -> int:
    """Continue a prompt with a model from a run directory (or a Hugging Face folder).

    A decoder prints the prompt and its continuation, token by token as they are generated; an
    encoder-decoder prints its output for the prompt as input. Generation stops at the
    tokenizer's end-of-sequence token or after max_new_tokens (fewer when a model with a
    position table has less room left in its context; a note then says so).

    Args:
        model: the run directory (config.yaml, model.safetensors, tokenizer.json).
        prompt: the text to continue (empty: start a new document).
        max_new_tokens: the most tokens to generate.
        temperature: 0 decodes greedily; above 0 samples (higher: more varied).
        top_k: sample only among the k most likely tokens.
        top_p: sample only among the most likely tokens whose probabilities reach p (nucleus).
        repetition_penalty: above 1 discourages tokens already in the text (CTRL).
        num_beams: beam search with this many beams (deterministic; the text is printed at the end).
        length_penalty: beam search: finished sequences scored by log-probability / length^α.
        seed: random seed of sampling.
        no_stream: print the text at the end instead of token by token.
        device: cpu, cuda, cuda:1, … or auto (a GPU when there is one).
        dtype: the weights to decode with: fp32, bf16 (half the bytes), or int8 (weight-only, per-group
            scales; fewer bytes read per token, at a measured quality cost: see benchmarks/RESULTS.md).
    """
    from ..generation import TextStreamer
    from ..generation import generate as run_generation
    from ..generation.state import ABSOLUTE_POSITIONS
    from ..runs import load

    torch_device = _device(device)
    run = load(model, device=torch_device)
    if dtype != "fp32":
        from ..quant import for_decoding

        for_decoding(run.model, dtype)
    tokenizer = run.tokenizer
    if tokenizer is None:
        raise LMForgeError("the run directory has no tokenizer.json to encode the prompt with", file=model)
    config = run.model.config
    encoder_decoder = config.arch == "encoder_decoder"

    ids = tokenizer.encode(prompt)
    unknown = sum(1 for i in ids if i == tokenizer.unk_id) if tokenizer.unk_id is not None else 0
    if unknown:
        print(
            f"lmforge: note: {unknown} piece(s) of the prompt are not in the tokenizer's vocabulary "
            "(read as the unknown token)",
            file=sys.stderr,
        )
    if encoder_decoder and tokenizer.eos_id is not None:
        ids = ids + [tokenizer.eos_id]  # sources end with eos, as in span-corruption pretraining
    if not ids:  # an empty prompt: start after a document separator
        if tokenizer.eos_id is None:
            raise LMForgeError(
                "the prompt is empty and the tokenizer has no eos token to start from", key="prompt"
            )
        ids = [tokenizer.eos_id]
    asked = max_new_tokens
    if config.position in ABSOLUTE_POSITIONS:  # a position table: the context is a hard limit
        room = config.max_seq_len - (1 if encoder_decoder else len(ids))
        if 0 < room < max_new_tokens:  # (no room at all: generate() explains the prompt is too long)
            max_new_tokens = room

    decoder_start = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.pad_id
    streaming = not no_stream and num_beams == 1
    shown = [] if encoder_decoder else ids  # a decoder's prompt is printed with its continuation
    streamer = TextStreamer(tokenizer, prompt_ids=shown, show_prompt=True) if streaming else None
    out = run_generation(
        run.model,
        torch.tensor([ids], device=torch_device),
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        num_beams=num_beams,
        length_penalty=length_penalty,
        eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.pad_id,
        decoder_start_token_id=decoder_start,
        generator=torch.Generator(device=torch_device).manual_seed(seed),
        streamer=streamer,
    )
    if streamer is None:
        new = out[0, 1:] if encoder_decoder else out[0, len(ids) :]
        sys.stdout.write(tokenizer.decode(shown + new.tolist()))
    print()
    generated = out.shape[1] - (1 if encoder_decoder else len(ids))
    if max_new_tokens < asked and generated == max_new_tokens:
        print(
            f"lmforge: note: stopped after {generated} new tokens: the model's context holds "
            f"{config.max_seq_len} positions",
            file=sys.stderr,
        )
    return 0


def _device(name: str) -> torch.device:
    """``auto`` → the GPU when there is one, else the CPU; anything else must be a device torch knows."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise LMForgeError(f"unknown device '{name}' (cpu, cuda, cuda:N or auto)", key="device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LMForgeError(f"device '{name}' asked, but no CUDA GPU is available", key="device")
    return device
