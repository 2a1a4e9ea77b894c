"""Text generation: greedy decoding, sampling (temperature, top-k, top-p), repetition penalty,
beam search with a length penalty, and streaming, all on the model's KV cache.

    from lmforge.generation import generate, stream, IncrementalDecoder

    ids = generate(model, prompt_ids, max_new_tokens=50, temperature=0.8, top_p=0.95,
                   eos_token_id=tokenizer.eos_id, generator=torch.Generator().manual_seed(0))
    decoder = IncrementalDecoder(tokenizer)
    for token in stream(model, prompt_ids, max_new_tokens=50):
        print(decoder.push(token), end="", flush=True)

References: Holtzman et al. 2020 (nucleus sampling), Fan et al. 2018 (top-k), Keskar et al. 2019
(CTRL repetition penalty), Wu et al. 2016 (beam search length penalty). The modules:

- ``search``: :func:`generate` and :func:`stream`, the decoding loop;
- ``state``: :class:`DecodeState`, the token buffer, KV cache, masks and positions of one run;
- ``sampling``: the logits filters and the choice of the next token;
- ``beam``: beam search;
- ``text``: incremental decoding of token ids to text, and a terminal streamer.
"""

from .beam import beam_search
from .sampling import apply_repetition_penalty, next_tokens, top_k_filter, top_p_filter
from .search import Streamer, generate, stream
from .state import DecodeState
from .text import IncrementalDecoder, TextStreamer

__all__ = [
    "DecodeState",
    "IncrementalDecoder",
    "Streamer",
    "TextStreamer",
    "apply_repetition_penalty",
    "beam_search",
    "generate",
    "next_tokens",
    "stream",
    "top_k_filter",
    "top_p_filter",
]
