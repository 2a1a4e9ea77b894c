"""``lmforge generate``: continue a prompt with a trained model, streaming the text as it comes."""

from __future__ import annotations

import sys
from typing import Literal

from ..errors import LMForgeError
from ..generation import TextStreamer
from ..pipeline.generation import Chat, Sampling, generate_text, prompt_ids, room
from ..quant import for_decoding
from ..runs import load
from ..runtime import resolve_device

DEFAULT_NEW_TOKENS = 200


def generate(
    *,
    model: str,
    prompt: str,
    max_new_tokens: int | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    seed: int = 0,
    no_stream: bool = False,
    sliding_window: bool = False,
    device: str = "auto",
    chat: bool = False,
    system: str | None = None,
    chat_template: str | None = None,
    dtype: Literal["fp32", "bf16", "int8"] = "fp32",
) -> int:
    """Continue a prompt with a model from a run directory (or a Hugging Face folder).

    A decoder prints the prompt and its continuation, token by token as they are generated; an
    encoder-decoder prints its output for the prompt as input. Generation stops at the
    tokenizer's end-of-sequence token or after max_new_tokens. What cannot fit is refused before
    anything is allocated: past a model's position table (learned or sinusoidal positions; a
    decoder can go on with --sliding_window), or a key/value cache larger than the free memory.

    Args:
        model: the run directory (config.yaml, model.safetensors, tokenizer.json), a Hugging Face
            folder, or a GGUF file (with its tokenizer and chat template).
        prompt: the text to continue (empty: start a new document).
        max_new_tokens: the most tokens to generate (default: 200, or what the context still holds,
            with a note).
        temperature: 0 decodes greedily; above 0 samples (higher: more varied).
        top_k: sample only among the k most likely tokens.
        top_p: sample only among the most likely tokens whose probabilities reach p (nucleus).
        repetition_penalty: above 1 discourages tokens already in the text (CTRL).
        num_beams: beam search with this many beams (deterministic; the text is printed at the end).
        length_penalty: beam search: finished sequences scored by log-probability / length^α.
        seed: random seed of sampling.
        no_stream: print the text at the end instead of token by token.
        sliding_window: a decoder with a position table keeps generating past its context, each
            new token seeing the last positions of the text (as nanoGPT does).
        device: cpu, cuda, cuda:1, … or auto (a GPU when there is one).
        chat: send the prompt as a user message through the model's chat template and print the
            answer only, stopping at the end of the assistant's turn.
        system: --chat: a system message before the prompt.
        chat_template: --chat: a built-in template (chatml, llama-2, plain) or Jinja source
            instead of the model's own.
        dtype: the weights to decode with: fp32 (the same numbers: on a CPU a GGUF file's
            Q8_0/Q4_x/Q5_x weights stay in their blocks, multiplied in fp32 by a native kernel,
            and other weights are stored transposed, the layout one-row products read fastest),
            bf16 (half the bytes: the linear weights stored in bfloat16, the arithmetic
            float32), or int8 (weight-only, one scale per 32 columns; fewer bytes
            read per token, at a measured quality cost: see benchmarks/RESULTS.md).
    """
    if not chat and (system is not None or chat_template is not None):
        raise LMForgeError("--system and --chat_template apply with --chat", key="chat")
    run = load(model, device=resolve_device(device))
    for_decoding(run.model, dtype)  # fp32 too: on a CPU, the weights in the layout decoding reads fastest
    tokenizer = run.tokenizer
    if tokenizer is None:
        raise LMForgeError("the run directory has no tokenizer.json to encode the prompt with", file=model)
    config = run.model.config
    conversation = Chat(system=system, template=chat_template) if chat else None
    # A prompt (decoder) takes room in the context too: shown before the continuation (a chat
    # shows the answer only).
    shown = [] if config.arch == "encoder_decoder" or chat else prompt_ids(tokenizer, prompt, arch=config.arch)
    wanted = max_new_tokens
    if wanted is None:  # unset: the default, clamped to the context with a note
        wanted = DEFAULT_NEW_TOKENS if sliding_window else room(config, len(shown) or 1, DEFAULT_NEW_TOKENS)
    sampling = Sampling(
        max_new_tokens=wanted,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        num_beams=num_beams,
        length_penalty=length_penalty,
        seed=seed,
        sliding_window=sliding_window,
    )
    streamer = None
    if not no_stream and num_beams == 1:
        streamer = TextStreamer(tokenizer, prompt_ids=shown, show_prompt=not chat)
    result = generate_text(run.model, tokenizer, prompt, sampling, streamer=streamer, chat=conversation)
    if result.unknown_pieces:
        print(
            f"lmforge: note: {result.unknown_pieces} piece(s) of the prompt are not in the tokenizer's "
            "vocabulary (read as the unknown token)",
            file=sys.stderr,
        )
    if streamer is None:
        sys.stdout.write(tokenizer.decode(shown + result.new_ids))
    print()
    if max_new_tokens is None and wanted < DEFAULT_NEW_TOKENS and len(result.new_ids) == wanted:
        print(
            f"lmforge: note: stopped after {wanted} new tokens: the model's context holds "
            f"{config.max_seq_len} positions (--sliding_window true goes on past it)",
            file=sys.stderr,
        )
    return 0
