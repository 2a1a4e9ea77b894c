"""The serving engine (continuous batching): requests that join and leave the batch at different
steps, with different prompt lengths and adapters, get exactly the tokens they get alone
(greedy), as lmforge.generation.generate gives them; stop texts, cancelling, growing slots."""

from __future__ import annotations

import copy

import pytest
import torch
from serving_models import add_adapter, tiny_decoder, tiny_tokenizer

from lmforge import peft
from lmforge.errors import LMForgeError
from lmforge.generation import generate
from lmforge.kernels import kernel_problem
from lmforge.model import attention as attention_module
from lmforge.quant import for_decoding
from lmforge.serving.engine import Engine, Request, _held_back
from lmforge.serving.slots import GROWTH


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def prompts(vocab_size: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(5, vocab_size, (n,), generator=generator).tolist() for n in lengths]


def alone(model, ids: list[int], new: int, adapter: str | None = None) -> list[int]:
    """Greedy tokens of one prompt decoded alone by lmforge.generation.generate."""
    if adapter is not None:
        peft.set_adapter(model, adapter)
    out = generate(model, torch.tensor([ids]), max_new_tokens=new)
    if adapter is not None:
        peft.set_adapter(model, None)
    return out[0, len(ids) :].tolist()


def run_staggered(engine: Engine, requests: list[Request], every: int = 2) -> list[list[int]]:
    """Submit a request every ``every`` steps (they join a batch already decoding), run to the end."""
    handles = []
    for request in requests:
        handles.append(engine.submit(request))
        for _ in range(every):
            engine.step()
    while not engine.idle:
        engine.step()
    return [h.result().token_ids for h in handles]


@pytest.mark.parametrize("position", ["rope", "learned", "alibi"])
def test_batched_decoding_gives_the_tokens_of_single_decoding(tokenizer, position: str) -> None:
    model = tiny_decoder(tokenizer.vocab_size, position=position)
    lengths, new = [3, 17, 1, 40, 9, 25, 5, 12], [12, 5, 20, 8, 15, 3, 18, 10]
    ids = prompts(model.config.vocab_size, lengths)
    engine = Engine(model, tokenizer, max_batch=4)  # fewer slots than requests: some wait for a free one
    got = run_staggered(engine, [Request(p, n) for p, n in zip(ids, new, strict=True)])
    for prompt, count, tokens in zip(ids, new, got, strict=True):
        assert tokens == alone(model, prompt, count)
    stats = engine.snapshot()
    assert stats.requests_finished == len(ids) and stats.running == 0 and stats.waiting == 0
    assert stats.batch_rows / stats.steps > 2  # rows really shared decoding steps


@pytest.mark.skipif(kernel_problem() is not None, reason=f"native kernels unavailable here: {kernel_problem()}")
@pytest.mark.parametrize("position", ["rope", "learned"])
def test_the_decoding_form_batches_rows_at_their_own_positions_natively(
    tokenizer, position: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As `lmforge serve` runs: the decoding form, each step's rows (at different positions, a
    mask between them) through the native attention, with the tokens of the plain model alone."""
    plain = tiny_decoder(tokenizer.vocab_size, position=position)
    model = for_decoding(copy.deepcopy(plain), "fp32")
    rows = []
    real = attention_module.decode_attention
    monkeypatch.setattr(attention_module, "decode_attention", lambda qkv, *a: rows.append(qkv.shape[0]) or real(qkv, *a))
    lengths, new = [3, 17, 1, 40, 9, 25], [12, 5, 20, 8, 15, 3]
    ids = prompts(model.config.vocab_size, lengths)
    engine = Engine(model, tokenizer, max_batch=4)
    got = run_staggered(engine, [Request(p, n) for p, n in zip(ids, new, strict=True)])
    for prompt, count, tokens in zip(ids, new, got, strict=True):
        assert tokens == alone(plain, prompt, count)
    assert max(rows) > 1  # rows of different lengths decoded together, natively


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_requests_for_different_adapters_share_the_batch(tokenizer, method: str) -> None:
    """LoRA rows share the base matmul and add their own low-rank term; IA3 (not additive) runs its
    layers per group of rows; either way each row gets its adapter's tokens."""
    model = tiny_decoder(tokenizer.vocab_size)
    add_adapter(model, "a", method, seed=1)
    add_adapter(model, "b", method, seed=2)
    ids = prompts(model.config.vocab_size, [4, 11, 7, 2, 15, 6], seed=3)
    names = ["a", None, "b", "a", "b", None]
    engine = Engine(model, tokenizer, max_batch=6)
    got = run_staggered(engine, [Request(p, 10, adapter=n) for p, n in zip(ids, names, strict=True)], every=1)
    expected = [alone(model, p, 10, n) for p, n in zip(ids, names, strict=True)]
    assert got == expected
    assert len({tuple(t) for t in expected[:3]}) == 3  # the adapters do change the output
    assert peft.active_adapter(model) is None and all(
        m.routes is None for _, m in peft.base.adapted_modules(model)
    )


def test_stop_ids_stop_texts_and_the_text_held_back(tokenizer) -> None:
    model = tiny_decoder(tokenizer.vocab_size)
    ids = prompts(model.config.vocab_size, [6])[0]
    engine = Engine(model, tokenizer)
    full = engine.generate(Request(ids, 24))
    assert full.finish_reason == "length" and len(full.token_ids) == 24
    assert full.text == tokenizer.decode(full.token_ids)
    stop_token = full.token_ids[5]
    stopped = engine.generate(Request(ids, 24, stop_ids=[stop_token]))
    assert (
        stopped.finish_reason == "stop"
        and stopped.token_ids == full.token_ids[: full.token_ids.index(stop_token) + 1]
    )
    cut = full.text[len(full.text) // 2 :][:3]
    updates = []
    handle = engine.submit(Request(ids, 24, stop=[cut]), listener=updates.append)
    while not engine.idle:
        engine.step()
    assert handle.result().text == full.text[: full.text.index(cut)]
    assert "".join(u.text for u in updates) == handle.text and updates[-1].finish_reason == "stop"
    assert _held_back("hello wor", ["world"]) == 3 and _held_back("hello", ["xyz"]) == 0


def test_sampling_is_per_request_and_seeded(tokenizer) -> None:
    model = tiny_decoder(tokenizer.vocab_size)
    ids = prompts(model.config.vocab_size, [5, 9])
    engine = Engine(model, tokenizer)
    together = run_staggered(
        engine,
        [
            Request(ids[0], 12, temperature=1.0, seed=7),
            Request(ids[1], 12, temperature=1.0, top_p=0.9, seed=3),
        ],
        every=0,
    )
    assert engine.generate(Request(ids[0], 12, temperature=1.0, seed=7)).token_ids == together[0]
    assert engine.generate(Request(ids[1], 12, temperature=1.0, top_p=0.9, seed=3)).token_ids == together[1]


def test_a_cancelled_request_frees_its_slot(tokenizer) -> None:
    model = tiny_decoder(tokenizer.vocab_size)
    ids = prompts(model.config.vocab_size, [4, 6, 8])
    engine = Engine(model, tokenizer, max_batch=2)
    first, second, third = (engine.submit(Request(p, 30)) for p in ids)
    engine.step()
    engine.step()
    assert engine.snapshot().running == 2 and engine.snapshot().waiting == 1
    first.cancel()
    engine.step()
    assert first.done and first.finish_reason == "cancelled"
    while not engine.idle:
        engine.step()
    assert second.result().token_ids == alone(model, ids[1], 30)
    assert third.result().token_ids == alone(model, ids[2], 30)


def test_slots_grow_past_their_first_capacity(tokenizer) -> None:
    model = tiny_decoder(tokenizer.vocab_size)
    ids = prompts(model.config.vocab_size, [GROWTH - 4, 3])
    engine = Engine(model, tokenizer, max_batch=2)
    got = run_staggered(engine, [Request(ids[0], 10), Request(ids[1], 10)], every=0)
    assert engine.cache.capacity == 2 * GROWTH
    assert got == [alone(model, ids[0], 10), alone(model, ids[1], 10)]


def test_requests_are_checked_before_they_queue(tokenizer) -> None:
    model = tiny_decoder(tokenizer.vocab_size, position="learned", max_seq_len=64)
    engine = Engine(model, tokenizer)
    with pytest.raises(LMForgeError, match="do not fit the context of 64"):
        engine.submit(Request([5] * 60, 10))
    with pytest.raises(LMForgeError, match="prompt is empty"):
        engine.submit(Request([], 10))
    with pytest.raises(LMForgeError, match="no adapter named 'x'"):
        engine.submit(Request([5], 10, adapter="x"))
    with pytest.raises(LMForgeError, match="top_p"):
        engine.submit(Request([5], 10, temperature=1.0, top_p=2.0))
    with pytest.raises(LMForgeError, match="position table"):
        Engine(model, tokenizer, max_context=100)
    prefix = tiny_decoder(tokenizer.vocab_size)
    peft.apply(prefix, "prefix", num_virtual_tokens=2)
    with pytest.raises(LMForgeError, match="prefix and prompt tuning"):
        Engine(prefix, tokenizer)


def test_the_engine_thread_serves_and_drains(tokenizer) -> None:
    model = tiny_decoder(tokenizer.vocab_size)
    ids = prompts(model.config.vocab_size, [3, 8, 5, 13])
    engine = Engine(model, tokenizer)
    engine.start()
    handles = [engine.submit(Request(p, 16)) for p in ids]
    engine.stop(drain=True, timeout=60)
    assert [h.result(0).token_ids for h in handles] == [alone(model, p, 16) for p in ids]
    with pytest.raises(LMForgeError, match="shutting down"):
        engine.submit(Request(ids[0], 4))


@pytest.mark.parametrize("position", ["rope", "learned", "alibi"])
def test_prompts_that_start_alike_reuse_the_prefix_and_give_the_same_tokens(tokenizer, position: str) -> None:
    model = tiny_decoder(tokenizer.vocab_size, position=position)
    add_adapter(model, "a", "lora", seed=1)
    header = prompts(model.config.vocab_size, [20], seed=7)[0]  # a shared "system prompt"
    tails = prompts(model.config.vocab_size, [3, 9, 1, 14], seed=8)
    ids = [header + tail for tail in tails] + [header, header[:12]]
    names = [None, None, "a", None, "a", None]
    engine = Engine(model, tokenizer, max_batch=3)
    got = run_staggered(engine, [Request(p, 8, adapter=n) for p, n in zip(ids, names, strict=True)])
    assert got == [alone(model, p, 8, n) for p, n in zip(ids, names, strict=True)]
    # reused: the 2nd and 4th take the header from the 1st (20 each); the 5th ("a") finds it in
    # the 3rd's, capped at all but its last token (19); the 6th, 12 long, takes 11
    assert engine.snapshot().prefix_tokens_reused == 20 + 20 + 19 + 11
    off = Engine(model, tokenizer, max_batch=3, prefix_cache=0)
    assert run_staggered(off, [Request(p, 8) for p in ids[:2]]) == got[:2]
    assert off.snapshot().prefix_tokens_reused == 0


def test_the_prefix_store_keeps_at_most_its_positions(tokenizer) -> None:
    model = tiny_decoder(tokenizer.vocab_size)
    engine = Engine(model, tokenizer, max_batch=2, prefix_cache=40)
    for prompt in prompts(model.config.vocab_size, [15, 15, 15, 15], seed=9):
        run_staggered(engine, [Request(prompt, 2)])
    assert sum(len(ids) for _, ids in engine._prefixes) <= 40 and len(engine._prefixes) == 2
