"""``lmforge generate``: continue a prompt with a trained model, streaming the text as it comes."""

from __future__ import annotations

import sys

from ..errors import LMForgeError
from ..generation import TextStreamer
from ..pipeline.generation import Sampling, generate_text, prompt_ids
from ..runs import load
from ..runtime import resolve_device


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
    """
    run = load(model, device=resolve_device(device))
    tokenizer = run.tokenizer
    if tokenizer is None:
        raise LMForgeError("the run directory has no tokenizer.json to encode the prompt with", file=model)
    config = run.model.config
    sampling = Sampling(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        num_beams=num_beams,
        length_penalty=length_penalty,
        seed=seed,
    )
    # A decoder's prompt is printed with its continuation (decoded together, so pieces join).
    shown = [] if config.arch == "encoder_decoder" else prompt_ids(tokenizer, prompt, arch=config.arch)
    streamer = None
    if not no_stream and num_beams == 1:
        streamer = TextStreamer(tokenizer, prompt_ids=shown, show_prompt=True)
    result = generate_text(run.model, tokenizer, prompt, sampling, streamer=streamer)
    if result.unknown_pieces:
        print(
            f"lmforge: note: {result.unknown_pieces} piece(s) of the prompt are not in the tokenizer's "
            "vocabulary (read as the unknown token)",
            file=sys.stderr,
        )
    if streamer is None:
        sys.stdout.write(tokenizer.decode(shown + result.new_ids))
    print()
    if result.limited_by_context:
        print(
            f"lmforge: note: stopped after {len(result.new_ids)} new tokens: the model's context holds "
            f"{config.max_seq_len} positions",
            file=sys.stderr,
        )
    return 0
