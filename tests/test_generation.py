"""Generation: cache vs no cache, greedy by hand, left padding, the logits filters, seeded sampling,
beam search on a hand-made bigram model, eos per row, streaming, incremental text, the CLI."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from lmforge import LMForgeError, ModelConfig, Transformer, save_run
from lmforge.cli import main
from lmforge.errors import ConfigError
from lmforge.generation import (
    DecodeState,
    IncrementalDecoder,
    apply_repetition_penalty,
    beam_search,
    generate,
    next_tokens,
    stream,
    top_k_filter,
    top_p_filter,
)
from lmforge.tokenizers import Tokenizer

POSITIONS = ["learned", "sinusoidal", "rope", "alibi", "relative", "none"]


def tiny(preset: str, **overrides) -> Transformer:
    """A tiny random model; untied, larger weights keep its greedy output from repeating one token."""
    torch.manual_seed(0)
    settings = {"init_std": 0.3, "tie_embeddings": False, **overrides}
    return Transformer(ModelConfig.from_name(preset, **settings)).eval()


def greedy_by_hand(model: Transformer, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """argmax of the full forward pass, one step at a time, no cache."""
    with torch.no_grad():
        if model.config.arch == "encoder_decoder":
            dec = torch.zeros(ids.shape[0], 1, dtype=torch.long)  # start token = pad = 0
            for _ in range(steps):
                logits = model(ids, decoder_input_ids=dec).logits[:, -1]
                dec = torch.cat((dec, logits.argmax(-1, keepdim=True)), 1)
            return dec
        for _ in range(steps):
            ids = torch.cat((ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)), 1)
        return ids


# ---- greedy, cache, padding -------------------------------------------------------------------


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("preset", ["tiny-decoder", "tiny-llama", "tiny-encoder-decoder"])
def test_greedy_with_and_without_cache_identical_and_equal_to_argmax_by_hand(
    preset: str, position: str
) -> None:
    model = tiny(preset, position=position)
    ids = torch.randint(1, 256, (2, 6), generator=torch.Generator().manual_seed(1))
    cached = generate(model, ids, max_new_tokens=12)
    uncached = generate(model, ids, max_new_tokens=12, use_cache=False)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, greedy_by_hand(model, ids, 12))
    assert len(set(cached[:, -12:].flatten().tolist())) > 5  # a varied continuation: the test can tell


def test_encoder_decoder_padded_source_cache_equals_no_cache() -> None:
    model = tiny("tiny-encoder-decoder", position="relative")
    src = torch.randint(1, 256, (2, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 5:] = False
    out = generate(model, src, attention_mask=mask, max_new_tokens=10)
    assert torch.equal(out, generate(model, src, attention_mask=mask, max_new_tokens=10, use_cache=False))
    alone = generate(model, src[1:, :5], max_new_tokens=10)  # padding of the source is invisible
    assert torch.equal(out[1:], alone)


@pytest.mark.parametrize(
    ("position", "repetition_penalty"), [(p, 1.0) for p in POSITIONS] + [("learned", 1.5), ("alibi", 1.5)]
)
def test_left_padded_batch_equals_each_prompt_alone(position: str, repetition_penalty: float) -> None:
    model = tiny("tiny-decoder", position=position)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 256, (n,), generator=gen) for n in (3, 7, 5)]
    T = max(len(p) for p in prompts)
    ids = torch.zeros(3, T, dtype=torch.long)  # pad id 0 on the left
    mask = torch.zeros(3, T, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, T - len(p) :] = p
        mask[i, T - len(p) :] = True
    batched = generate(
        model, ids, attention_mask=mask, max_new_tokens=10, repetition_penalty=repetition_penalty
    )
    uncached = generate(
        model,
        ids,
        attention_mask=mask,
        max_new_tokens=10,
        repetition_penalty=repetition_penalty,
        use_cache=False,
    )
    assert torch.equal(batched, uncached)
    for i, p in enumerate(prompts):
        alone = generate(model, p[None], max_new_tokens=10, repetition_penalty=repetition_penalty)
        assert torch.equal(batched[i, T:], alone[0, len(p) :]), f"row {i}"


def test_right_padding_and_bad_inputs_are_explained() -> None:
    model = tiny("tiny-decoder")
    ids = torch.ones(2, 4, dtype=torch.long)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    with pytest.raises(LMForgeError, match="left-padded"):
        generate(model, ids, attention_mask=mask)
    with pytest.raises(LMForgeError, match="empty"):
        generate(model, torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(LMForgeError, match="vocabulary"):
        generate(model, torch.tensor([[300]]))
    for options, key in [
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": 0}, "top_k"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"num_beams": 2, "temperature": 0.7}, "temperature"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"eos_token_id": 999}, "eos_token_id"),
    ]:
        with pytest.raises(ConfigError) as info:
            generate(model, ids, **options)
        assert info.value.key == key
    encoder = Transformer(ModelConfig.from_name("tiny-encoder"))
    with pytest.raises(ConfigError, match="no decoder"):
        generate(encoder, ids)


def test_context_limit_of_position_tables() -> None:
    model = tiny("tiny-decoder")  # learned positions, max_seq_len 64
    ids = torch.randint(1, 256, (1, 60))
    with pytest.raises(LMForgeError, match="at most 4 new tokens"):
        generate(model, ids, max_new_tokens=5)
    assert generate(model, ids, max_new_tokens=4).shape == (1, 64)
    with pytest.raises(LMForgeError, match="the prompt has 64 tokens"):
        generate(model, torch.randint(1, 256, (1, 64)), max_new_tokens=1)
    rope = tiny("tiny-llama")  # RoPE: no table, no limit
    assert generate(rope, ids, max_new_tokens=10).shape == (1, 70)


@pytest.mark.slow
def test_compiled_steps_give_the_same_tokens() -> None:
    for preset in ("tiny-llama", "tiny-encoder-decoder"):
        model = tiny(preset)
        ids = torch.randint(1, 256, (2, 6), generator=torch.Generator().manual_seed(11))
        mask = torch.ones(2, 6, dtype=torch.bool)
        mask[0, :2] = False
        eager = generate(model, ids, attention_mask=mask, max_new_tokens=20)
        assert torch.equal(generate(model, ids, attention_mask=mask, max_new_tokens=20, compile=True), eager)


def test_generation_restores_training_mode_and_returns_a_normal_tensor() -> None:
    model = tiny("tiny-decoder", dropout=0.5)
    model.train()
    ids = torch.randint(1, 256, (1, 4))
    out = generate(model, ids, max_new_tokens=5)
    assert model.training
    assert not out.is_inference()
    assert torch.equal(out, generate(model, ids, max_new_tokens=5))  # dropout off while generating


# ---- the logits filters -----------------------------------------------------------------------


def kept(logits: torch.Tensor) -> list[set[int]]:
    return [set(torch.isfinite(row).nonzero().flatten().tolist()) for row in logits]


def test_top_k_keeps_the_k_highest_and_ties() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0, 3.5, 0.0], [5.0, 4.0, 4.0, 1.0, -2.0]])
    assert kept(top_k_filter(logits, 1)) == [{3}, {0}]
    assert kept(top_k_filter(logits, 2)) == [{1, 3}, {0, 1, 2}]  # a tie with the k-th stays
    assert kept(top_k_filter(logits, 3)) == [{1, 2, 3}, {0, 1, 2}]
    assert kept(top_k_filter(logits, 9)) == [{0, 1, 2, 3, 4}] * 2
    torch.testing.assert_close(top_k_filter(logits, 2)[0, [1, 3]], logits[0, [1, 3]])  # values untouched


def test_top_p_keeps_the_smallest_nucleus() -> None:
    probs = torch.tensor([[0.1, 0.5, 0.15, 0.25], [0.25, 0.15, 0.5, 0.1]])  # two orders of the same mass
    logits = probs.log()
    assert kept(top_p_filter(logits, 0.3)) == [{1}, {2}]
    assert kept(top_p_filter(logits, 0.5)) == [{1}, {2}]  # 0.5 is reached by the first token alone
    assert kept(top_p_filter(logits, 0.7)) == [{1, 3}, {2, 0}]
    assert kept(top_p_filter(logits, 0.8)) == [{1, 3, 2}, {2, 0, 1}]
    assert kept(top_p_filter(logits, 0.95)) == [{0, 1, 2, 3}] * 2
    assert kept(top_p_filter(logits, 1.0)) == [{0, 1, 2, 3}] * 2


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    torch.testing.assert_close(out, torch.tensor([[1.0, -2.0, 0.5, -3.0]]))
    assert torch.equal(logits, torch.tensor([[2.0, -1.0, 0.5, -3.0]]))  # input untouched


def test_repetition_penalty_in_generate_equals_the_formula_by_hand() -> None:
    model = tiny("tiny-decoder")
    ids = torch.randint(1, 256, (1, 5), generator=torch.Generator().manual_seed(4))
    penalty = 3.0
    expected = ids
    with torch.no_grad():
        for _ in range(15):
            logits = model(expected).logits[:, -1]
            seen = torch.zeros_like(logits, dtype=torch.bool)
            seen[0, expected[0]] = True
            logits = torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)
            expected = torch.cat((expected, logits.argmax(-1, keepdim=True)), 1)
    out = generate(model, ids, max_new_tokens=15, repetition_penalty=penalty)
    assert torch.equal(out, expected)
    assert not torch.equal(out, generate(model, ids, max_new_tokens=15))  # the penalty changed something


# ---- sampling ---------------------------------------------------------------------------------


def test_seeded_sampling_is_reproducible_and_seeds_differ() -> None:
    model = tiny("tiny-llama")
    ids = torch.randint(1, 256, (2, 4), generator=torch.Generator().manual_seed(5))

    def sample(seed: int, **options) -> torch.Tensor:
        return generate(
            model,
            ids,
            max_new_tokens=20,
            temperature=1.0,
            generator=torch.Generator().manual_seed(seed),
            **options,
        )

    assert torch.equal(sample(0), sample(0))
    assert torch.equal(sample(7, top_k=10, top_p=0.9), sample(7, top_k=10, top_p=0.9))
    assert not torch.equal(sample(0), sample(1))
    greedy = generate(model, ids, max_new_tokens=20)
    assert not torch.equal(sample(0), greedy)
    assert torch.equal(sample(3, top_k=1), greedy)  # one token left: sampling is greedy
    assert torch.equal(sample(3, top_p=1e-6), greedy)


def test_sampling_follows_the_filtered_distribution() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]]).repeat(20000, 1)
    gen = torch.Generator().manual_seed(0)
    draws = next_tokens(logits, temperature=0.5, top_k=3, generator=gen)
    counts = torch.bincount(draws, minlength=5).float() / len(draws)
    expected = torch.softmax(torch.tensor([2.0, 1.0, -math.inf, -math.inf, 0.5]) / 0.5, dim=0)
    torch.testing.assert_close(counts, expected, atol=0.015, rtol=0)


# ---- end of sequence, streaming ---------------------------------------------------------------


def test_eos_stops_rows_independently_and_pads_finished_rows() -> None:
    model = tiny("tiny-llama")
    ids = torch.randint(1, 256, (2, 4), generator=torch.Generator().manual_seed(6))
    free = generate(model, ids, max_new_tokens=12)[:, 4:]
    eos = int(free[0, 2])  # row 0 produces it at step 3
    assert eos not in free[1].tolist()
    out = generate(model, ids, max_new_tokens=12, eos_token_id=eos, pad_token_id=255)[:, 4:]
    assert out.shape == (2, 12)  # row 1 never ends: all 12 steps run
    assert torch.equal(out[0, :3], free[0, :3])
    assert out[0, 3:].tolist() == [255] * 9
    assert torch.equal(out[1], free[1])
    # Every row ended: decoding stops early.
    short = generate(model, ids[:1], max_new_tokens=12, eos_token_id=[999 % 256, eos])
    assert short.shape == (1, 7) and int(short[0, -1]) == eos


def test_stream_yields_the_tokens_of_generate() -> None:
    for preset in ("tiny-decoder", "tiny-encoder-decoder"):
        model = tiny(preset)
        ids = torch.randint(1, 256, (1, 5), generator=torch.Generator().manual_seed(8))
        out = generate(model, ids, max_new_tokens=10)
        P = out.shape[1] - 10
        assert list(stream(model, ids[0], max_new_tokens=10)) == out[0, P:].tolist()
        options = dict(max_new_tokens=10, temperature=0.8, top_p=0.9)
        sampled = generate(model, ids, generator=torch.Generator().manual_seed(2), **options)
        streamed = list(stream(model, ids, generator=torch.Generator().manual_seed(2), **options))
        assert streamed == sampled[0, P:].tolist()
    eos = int(out[0, P + 2])
    assert (
        list(stream(model, ids.tolist()[0], max_new_tokens=10, eos_token_id=eos))
        == out[0, P : P + 3].tolist()
    )


def test_streamer_receives_every_step() -> None:
    model = tiny("tiny-decoder")
    ids = torch.randint(1, 256, (2, 3))

    class Collect:
        def __init__(self) -> None:
            self.steps: list[list[int]] = []
            self.ended = False

        def put(self, tokens: torch.Tensor) -> None:
            self.steps.append(tokens.tolist())

        def end(self) -> None:
            self.ended = True

    collect = Collect()
    out = generate(model, ids, max_new_tokens=6, streamer=collect)
    assert collect.ended and torch.tensor(collect.steps).T.tolist() == out[:, 3:].tolist()


# ---- beam search ------------------------------------------------------------------------------

PAD, START, EOS = 0, 1, 2


def bigram_model(table: dict[int, dict[int, float]], vocab_size: int = 10) -> Transformer:
    """A real Transformer whose next-token distribution depends only on the last token:
    P(next | last) = table[last] (unlisted tokens share the remaining mass). Its blocks are
    switched off (zero output projections: identity residuals), and the LM head is solved so that
    head(norm(embedding(last))) = log P(· | last)."""
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=vocab_size, embed_dim=16, num_layers=1, num_heads=2, position="none", tie_embeddings=False
    )
    model = Transformer(config).eval()
    logprobs = torch.empty(vocab_size, vocab_size)
    for last in range(vocab_size):
        row = table.get(last, {})
        rest = (1.0 - sum(row.values())) / (vocab_size - len(row))
        assert rest > 0
        logprobs[last] = torch.tensor([row.get(t, rest) for t in range(vocab_size)]).log()
    with torch.no_grad():
        for block in model.decoder.layers:
            for linear in (block.self_attn.out_proj, block.mlp.down_proj):
                linear.weight.zero_()
                linear.bias.zero_()
        model.tok_embed.weight.copy_(torch.eye(vocab_size, 16) * 3.0)
        features = model.decoder.norm(model.tok_embed.weight)  # (V, E) what the head sees
        X = features.double()
        solution = X.T @ torch.linalg.solve(X @ X.T, logprobs.double())  # (E, V): X @ solution = logprobs
        model.head.proj.weight.copy_(solution.T)
        torch.testing.assert_close(
            model(torch.arange(vocab_size)[:, None]).logits[:, 0], logprobs, atol=1e-4, rtol=0
        )
    return model


def seq_logprob(table: dict[int, dict[int, float]], tokens: list[int]) -> float:
    return sum(math.log(table[a][b]) for a, b in zip([START, *tokens[:-1]], tokens, strict=True))


def test_beam_search_finds_the_better_sequence_greedy_misses() -> None:
    table = {START: {3: 0.5, 4: 0.4}, 3: {EOS: 0.34, 5: 0.33, 6: 0.23}, 4: {EOS: 0.9}}
    model = bigram_model(table)
    prompt = torch.tensor([[START]])
    greedy = generate(model, prompt, max_new_tokens=5, eos_token_id=EOS)[0, 1:].tolist()
    beam = generate(model, prompt, max_new_tokens=5, eos_token_id=EOS, num_beams=2)[0, 1:].tolist()
    assert greedy == [3, EOS] and beam == [4, EOS]
    assert seq_logprob(table, beam) > seq_logprob(table, greedy)
    # Same answer without the cache, and in a batch with another input.
    assert (
        generate(model, prompt, max_new_tokens=5, eos_token_id=EOS, num_beams=2, use_cache=False)[
            0, 1:
        ].tolist()
        == beam
    )
    batch = generate(model, torch.tensor([[5], [START]]), max_new_tokens=5, eos_token_id=EOS, num_beams=2)
    assert batch[1, 1:3].tolist() == beam


def test_length_penalty_changes_the_choice() -> None:
    # After 3, token 5 takes most of the rest: no tie among the unlisted tokens can put an early
    # [3, EOS] among the two best candidates (topk breaks ties differently across CPUs).
    table = {START: {EOS: 0.3, 3: 0.6}, 3: {4: 0.5, 5: 0.45}, 4: {EOS: 0.9}}
    model = bigram_model(table)
    prompt = torch.tensor([[START]])

    def best(alpha: float) -> list[int]:
        out = generate(model, prompt, max_new_tokens=6, eos_token_id=EOS, num_beams=2, length_penalty=alpha)
        return [t for t in out[0, 1:].tolist() if t != PAD]

    assert best(0.0) == [EOS]  # sums: log 0.3 > log 0.27
    assert best(1.0) == [3, 4, EOS]  # per token: log 0.27 / 3 > log 0.3 / 1
    assert best(-1.0) == [EOS]


def test_early_stopping_false_keeps_searching_while_a_beam_can_win() -> None:
    table = {START: {3: 0.5, EOS: 0.3, 4: 0.19}, 3: {EOS: 0.09, 7: 0.89}, 4: {EOS: 0.99}, 7: {EOS: 0.9}}
    model = bigram_model(table)
    prompt = torch.tensor([[START]])
    options = dict(max_new_tokens=6, eos_token_id=EOS, num_beams=2, length_penalty=0.0)
    # Two hypotheses ([EOS], [4, EOS]) are in after step 2; [3, 7] is still running and better.
    assert generate(model, prompt, early_stopping=True, **options)[0, 1:].tolist()[:1] == [EOS]
    assert generate(model, prompt, early_stopping=False, **options)[0, 1:4].tolist() == [3, 7, EOS]


def test_beam_search_with_one_beam_equals_greedy() -> None:
    for preset in ("tiny-decoder", "tiny-encoder-decoder"):
        model = tiny(preset)
        ids = torch.randint(1, 256, (2, 5), generator=torch.Generator().manual_seed(9))
        greedy = generate(model, ids, max_new_tokens=10)
        P = greedy.shape[1] - 10
        eos = int(greedy[0, P + 4])
        for eos_id in (None, eos):
            expected = generate(model, ids, max_new_tokens=10, eos_token_id=eos_id)
            with torch.inference_mode():
                state = DecodeState(
                    model, ids, None, max_new_tokens=10, pad_token_id=0, decoder_start_token_id=0
                )
                beams = beam_search(
                    state, num_beams=1, max_new_tokens=10, eos_token_ids=None if eos_id is None else [eos_id]
                )
            assert torch.equal(beams, expected[:, : beams.shape[1]])
            assert (expected[:, beams.shape[1] :] == 0).all()


def test_beam_search_runs_on_real_models_with_padding_and_penalty() -> None:
    model = tiny("tiny-llama")
    ids = torch.randint(1, 256, (2, 6), generator=torch.Generator().manual_seed(10))
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, :2] = False
    options = dict(attention_mask=mask, max_new_tokens=8, num_beams=3, repetition_penalty=1.2, eos_token_id=7)
    out = generate(model, ids, **options)
    assert torch.equal(out, generate(model, ids, use_cache=False, **options))
    alone = generate(model, ids[:1, 2:], **{**options, "attention_mask": None})
    n = min(alone.shape[1] - 4, out.shape[1] - 6)
    assert torch.equal(out[0, 6 : 6 + n], alone[0, 4 : 4 + n])


# ---- text -------------------------------------------------------------------------------------

TEXT = "The cat sat on the mat. 小猫坐在垫子上。 Émile a mangé 🍰 ! " * 3


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return Tokenizer.train(iter([TEXT] * 4), kind="bpe", vocab_size=280, show_progress=False)


def test_incremental_decoder_joins_characters_split_across_tokens(bpe: Tokenizer) -> None:
    ids = bpe.encode(TEXT)
    assert any("\ufffd" in bpe.decode([i]) for i in ids)  # some tokens hold part of a character
    decoder = IncrementalDecoder(bpe)
    pieces = [decoder.push(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + decoder.flush() == bpe.decode(ids) == TEXT
    # With the prompt as context, only the continuation comes out.
    decoder = IncrementalDecoder(bpe, prompt_ids=ids[:10])
    assert "".join(decoder.push(i) for i in ids[10:]) + decoder.flush() == TEXT[len(bpe.decode(ids[:10])) :]


def test_incremental_decoder_with_a_wordpiece_tokenizer() -> None:
    words = "the quick brown fox jumps over the lazy dog again and again"
    tokenizer = Tokenizer.train(iter([words] * 5), kind="wordpiece", vocab_size=60, show_progress=False)
    ids = tokenizer.encode(words)
    decoder = IncrementalDecoder(tokenizer)
    assert "".join(decoder.push(i) for i in ids) + decoder.flush() == tokenizer.decode(ids)


# ---- the command line -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, bpe: Tokenizer) -> Path:
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny-decoder", vocab_size=bpe.vocab_size, init_std=0.2))
    return save_run(tmp_path_factory.mktemp("runs") / "tiny", model=model, tokenizer=bpe)


def expected_text(run_dir: Path, prompt: str, **options) -> str:
    from lmforge import load

    run = load(run_dir)
    ids = run.tokenizer.encode(prompt)
    out = generate(run.model, torch.tensor([ids]), eos_token_id=run.tokenizer.eos_id, **options)
    return run.tokenizer.decode(out[0].tolist())


def test_cli_streams_the_continuation(run_dir: Path, capsys: pytest.CaptureFixture) -> None:
    prompt = "The cat 小猫"
    assert main(["generate", "--model", str(run_dir), "--prompt", prompt, "--max_new_tokens", "20"]) == 0
    streamed = capsys.readouterr().out
    expected = expected_text(run_dir, prompt, max_new_tokens=20)
    assert streamed == expected + "\n" and len(expected) > len(prompt)
    argv = ["generate", "--model", str(run_dir), "--prompt", prompt, "--max-new-tokens", "20", "--no-stream"]
    assert main(argv) == 0
    assert capsys.readouterr().out == streamed


def test_cli_sampling_and_beams(run_dir: Path, capsys: pytest.CaptureFixture) -> None:
    base = ["generate", "--model", str(run_dir), "--prompt", "mat", "--max_new_tokens", "12"]
    assert main([*base, "--temperature", "0.9", "--top_k", "50", "--top_p", "0.95", "--seed", "3"]) == 0
    first = capsys.readouterr().out
    assert main([*base, "--temperature", "0.9", "--top_k", "50", "--top_p", "0.95", "--seed", "3"]) == 0
    assert capsys.readouterr().out == first
    assert main([*base, "--num_beams", "3", "--repetition_penalty", "1.3"]) == 0
    expected = expected_text(run_dir, "mat", max_new_tokens=12, num_beams=3, repetition_penalty=1.3)
    assert capsys.readouterr().out == expected + "\n"


def test_cli_clamps_the_default_and_refuses_what_cannot_fit(run_dir: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["generate", "--model", str(run_dir), "--prompt", "The cat"]) == 0  # the default: clamped
    captured = capsys.readouterr()
    assert re.search(r"stopped after \d+ new tokens: the model's context holds 64 positions", captured.err)
    for asked in ("500", "1000000000"):  # asked for: refused before anything is allocated
        assert main(["generate", "--model", str(run_dir), "--prompt", "The cat", "--max_new_tokens", asked]) == 2
        err = capsys.readouterr().err.strip()
        assert "do not fit the model's context of 64 positions" in err and "--sliding_window" in err
        assert len(err.splitlines()) == 1


def test_cli_sliding_window_writes_past_the_context(run_dir: Path, bpe: Tokenizer, capsys: pytest.CaptureFixture) -> None:
    from lmforge import load
    from lmforge.pipeline.generation import Sampling, generate_text

    run = load(run_dir)
    eos_free = Tokenizer(run.tokenizer.backend, special_tokens={})  # no end token: it writes on
    result = generate_text(run.model, eos_free, "The cat", Sampling(max_new_tokens=150, sliding_window=True))
    assert len(result.new_ids) == 150  # more than the 64 positions the model holds
    # The first chunk is plain generation; later tokens see the last 48 positions (3/4 of 64).
    plain = generate_text(run.model, eos_free, "The cat", Sampling(max_new_tokens=20))
    assert result.new_ids[:20] == plain.new_ids
    argv = ["generate", "--model", str(run_dir), "--prompt", "The cat", "--max_new_tokens", "150", "--sliding_window", "true"]
    assert main(argv) == 0


def test_a_cache_larger_than_memory_is_refused(tmp_path: Path, bpe: Tokenizer) -> None:
    from lmforge.pipeline.generation import Sampling, check_length

    config = ModelConfig.from_name("tiny-llama", vocab_size=bpe.vocab_size)  # RoPE: no position table
    check_length(config, 10, Sampling(max_new_tokens=1000))  # fits
    with pytest.raises(LMForgeError, match=r"need a key/value cache of .* GiB, more than this machine has free"):
        check_length(config, 10, Sampling(max_new_tokens=10**12))


def test_cli_encoder_decoder_prints_the_output(
    tmp_path: Path, bpe: Tokenizer, capsys: pytest.CaptureFixture
) -> None:
    torch.manual_seed(0)
    config = ModelConfig.from_name("tiny-encoder-decoder", vocab_size=bpe.vocab_size, tie_embeddings=False)
    model = Transformer(config.replace(init_std=0.3)).eval()
    run = save_run(tmp_path / "t5ish", model=model, tokenizer=bpe)
    assert main(["generate", "--model", str(run), "--prompt", "The cat", "--max_new_tokens", "12"]) == 0
    source = torch.tensor([bpe.encode("The cat") + [bpe.eos_id]])  # sources end with eos
    out = generate(
        model, source, max_new_tokens=12, eos_token_id=bpe.eos_id, decoder_start_token_id=bpe.bos_id
    )
    assert capsys.readouterr().out == bpe.decode(out[0, 1:].tolist()) + "\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "/nonexistent/run", "--prompt", "hi"], "run directory not found"),
        (["--prompt", "the cat " * 80], "context holds 64"),
        (["--prompt", "hi", "--top_p", "1.5"], "top_p"),
        (["--prompt", "hi", "--temperature", "-1"], "temperature"),
        (["--prompt", "hi", "--device", "tpu9"], "device"),
        (["--prompt", "hi", "--max_new_tokens", "many"], "max_new_tokens"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(
    run_dir: Path, capsys: pytest.CaptureFixture, args: list[str], message: str
) -> None:
    argv = ["generate", *(["--model", str(run_dir)] if "--model" not in args else []), *args]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_cli_needs_a_tokenizer(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = save_run(tmp_path / "bare", model=tiny("tiny-decoder"))
    assert main(["generate", "--model", str(run), "--prompt", "hi"]) == 2
    assert "tokenizer" in capsys.readouterr().err
