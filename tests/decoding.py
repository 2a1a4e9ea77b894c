"""A helper the native-decoding tests share: a decoding-form model and its plain original, fed the
same tokens one at a time, give the same logits and fill the same cache, up to its last place."""

from __future__ import annotations

import pytest
import torch

from lmforge import Transformer


def decode_alongside(model: Transformer, plain: Transformer, prompt: torch.Tensor, tokens: torch.Tensor) -> int:
    """Prefill a cache of 12 places with ``prompt`` (1, 7) in both models, step both through
    ``tokens[0, 7:11]`` comparing each step's logits, compare the caches' keys and values, then
    fill the last place and check that one more token is refused by the general path. Returns
    how many one-token steps ``model`` took (4 compared, 1 to fill the cache)."""
    cache, plain_cache = model.new_cache(1, 12), plain.new_cache(1, 12)
    with torch.no_grad():
        model(prompt, cache=cache)
        plain(prompt, cache=plain_cache)
        for token in tokens[0, 7:11]:
            step = token.view(1, 1)
            torch.testing.assert_close(model(step, cache=cache).logits, plain(step, cache=plain_cache).logits,
                                       rtol=1e-4, atol=1e-5)  # fmt: skip
        for mine, theirs in zip(cache.self_attention, plain_cache.self_attention, strict=True):
            assert mine.length == theirs.length == 11
            torch.testing.assert_close(mine.keys, theirs.keys, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(mine.values, theirs.values, rtol=1e-5, atol=1e-5)
        model(tokens[:, 11:12], cache=cache)  # the last place in the cache
        with pytest.raises(ValueError, match="KV cache is full"):  # then the general path says so
            model(tokens[:, 12:13], cache=cache)
    return 5
