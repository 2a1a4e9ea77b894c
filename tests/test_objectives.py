"""Objectives: causal LM, masked LM statistics, span corruption invertibility, metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmforge import ModelConfig, Transformer
from lmforge.data import CausalLMCollator, MaskedLMCollator, SpanCorruptionCollator
from lmforge.metrics import bits_per_byte, perplexity
from lmforge.objectives import (
    IGNORE_INDEX,
    CausalLM,
    MaskedLM,
    SpanCorruption,
    corrupt_spans,
    make_objective,
    mask_tokens,
    num_targets,
    random_spans_noise_mask,
    restore_spans,
    shift_labels,
)
from lmforge.tokenizers import Tokenizer

WORDS = [
    "the",
    "tokenizer",
    "splits",
    "uncommon",
    "words",
    "like",
    "antidisestablishmentarianism",
    "or",
    "photosynthesis",
    "into",
    "several",
    "pieces",
    "while",
    "common",
    "words",
    "stay",
    "whole",
]


@pytest.fixture(scope="module")
def wordpiece() -> Tokenizer:
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, size=12)) for _ in range(50)]
    return Tokenizer.train(
        iter(texts), kind="wordpiece", vocab_size=120, num_sentinels=30, show_progress=False
    )


# ---- metrics ------------------------------------------------------------------------------------


def test_bits_per_byte_and_perplexity_by_hand() -> None:
    # 4 tokens covering 8 bytes, each predicted with probability 1/4: 4·ln 4 nats = 8 bits → 1 bit/byte
    assert bits_per_byte(4 * math.log(4), 8) == pytest.approx(1.0)
    assert bits_per_byte(3 * math.log(2), 6) == pytest.approx(0.5)
    assert perplexity(math.log(4)) == pytest.approx(4.0)
    assert perplexity(1e6) == math.inf and math.isnan(perplexity(math.nan))
    with pytest.raises(ValueError):
        bits_per_byte(1.0, 0)


# ---- causal LM ----------------------------------------------------------------------------------


def test_causal_lm_loss_is_cross_entropy_by_hand() -> None:
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny-decoder"))
    window = torch.randint(0, 256, (3, 17))
    labels = window[:, 1:].clone()
    labels[1, 10:] = IGNORE_INDEX  # some ignored targets
    mask = torch.ones(3, 16, dtype=torch.bool)
    batch = {"input_ids": window[:, :-1], "attention_mask": mask, "labels": labels}
    out = CausalLM(bytes_per_token=2.0)(model, batch)
    logits = model(window[:, :-1]).logits
    expected = F.cross_entropy(logits.reshape(-1, 256), labels.reshape(-1), ignore_index=IGNORE_INDEX)
    assert int(out.num_targets) == num_targets(batch) == 3 * 16 - 6
    torch.testing.assert_close(out.loss_sum / out.num_targets, expected)
    assert out.metrics["loss"] == pytest.approx(float(expected.detach()), rel=1e-5)
    assert out.metrics["bits_per_byte"] == pytest.approx(float(expected.detach()) / (2.0 * math.log(2)), rel=1e-5)
    out.loss_sum.backward()  # differentiable
    assert model.tok_embed.weight.grad is not None


def test_shift_labels_and_causal_collator() -> None:
    assert shift_labels(torch.tensor([[5, 6, 7]])).tolist() == [[6, 7, IGNORE_INDEX]]
    tok = Tokenizer.train(iter(["abcdef"]), kind="char", vocab_size=50, show_progress=False)
    collator = CausalLMCollator(tok)
    rows = [np.array([10, 11, 12, 13]), np.array([20, 21])]
    batch = collator(rows, np.random.default_rng(0))
    assert batch["input_ids"].tolist() == [[10, 11, 12], [20, tok.pad_id, tok.pad_id]]
    assert batch["labels"].tolist() == [[11, 12, 13], [21, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[True] * 3, [True, False, False]]


# ---- masked LM ----------------------------------------------------------------------------------


def test_masking_statistics_under_a_seed() -> None:
    rng = np.random.default_rng(1234)
    B, T, V = 40, 100, 500
    specials = np.arange(7)  # ids 0..6 are special, as in trained lmforge tokenizers
    input_ids = rng.integers(7, V, size=(B, T))
    input_ids[:, 0], input_ids[:, -1] = 4, 5  # [CLS] … [SEP]
    input_ids[::2, 80:] = 0  # padding on half the rows
    eligible = ~np.isin(input_ids, specials)
    inputs, labels = mask_tokens(
        input_ids, eligible=eligible, mask_id=6, random_ids=np.arange(7, V), rng=np.random.default_rng(7)
    )
    selected = labels != IGNORE_INDEX
    assert not (selected & ~eligible).any()  # specials and padding are never selected
    assert (labels[selected] == input_ids[selected]).all()
    for row in range(B):  # 15% of each row's eligible tokens, rounded
        assert selected[row].sum() == max(1, round(0.15 * eligible[row].sum()))
    assert (inputs[~selected] == input_ids[~selected]).all()  # nothing else changes
    n = selected.sum()
    masked = (inputs == 6) & selected
    unchanged = (inputs == input_ids) & selected
    replaced = selected & ~masked & ~unchanged
    assert n > 400
    assert masked.sum() / n == pytest.approx(0.8, abs=0.05)
    assert replaced.sum() / n == pytest.approx(0.1, abs=0.04)  # a random token can equal the original
    assert unchanged.sum() / n == pytest.approx(0.1, abs=0.04)
    assert not np.isin(inputs[replaced], specials).any()
    again, again_labels = mask_tokens(
        input_ids, eligible=eligible, mask_id=6, random_ids=np.arange(7, V), rng=np.random.default_rng(7)
    )
    assert (again == inputs).all() and (again_labels == labels).all()  # reproducible under a seed


def test_whole_word_masking_takes_every_piece(wordpiece: Tokenizer) -> None:
    collator = MaskedLMCollator(wordpiece, whole_word=True)
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, size=20)) for _ in range(30)]
    rows = [np.array(wordpiece.encode(t)) for t in texts]
    assert any(wordpiece.id_to_token(int(i)).startswith("##") for r in rows for i in r)  # words do split
    batch = collator(rows, np.random.default_rng(3))
    labels, ids = batch["labels"].numpy(), batch["input_ids"].numpy()
    total_selected = total_eligible = whole_words = 0
    for i, row in enumerate(rows):
        full = np.concatenate([[wordpiece.cls_id], row, [wordpiece.sep_id]])
        words = wordpiece.word_ids(full)
        selected = labels[i, : len(full)] != IGNORE_INDEX
        for word in np.unique(words[words >= 0]):
            pieces = selected[words == word]
            assert pieces.all() or not pieces.any()  # a word is selected whole or not at all
            whole_words += pieces.all() and pieces.size > 1
        total_selected += selected.sum()
        total_eligible += (words >= 0).sum()
        assert not selected[0] and not selected[len(full) - 1]  # [CLS] and [SEP]
        assert (ids[i, len(full) :] == wordpiece.pad_id).all()
    assert whole_words > 0
    assert total_selected / total_eligible == pytest.approx(0.15, abs=0.03)


def test_masked_lm_objective_counts_only_selected_positions(wordpiece: Tokenizer) -> None:
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny-encoder", vocab_size=wordpiece.vocab_size))
    rows = [np.array(wordpiece.encode(" ".join(WORDS[i : i + 8]))) for i in range(4)]
    batch = MaskedLMCollator(wordpiece)(rows, np.random.default_rng(0))
    out = MaskedLM()(model, batch)
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    selected = batch["labels"] != IGNORE_INDEX
    expected = F.cross_entropy(logits[selected], batch["labels"][selected], reduction="sum")
    torch.testing.assert_close(out.loss_sum, expected)
    assert int(out.num_targets) == int(selected.sum()) > 0


# ---- span corruption ----------------------------------------------------------------------------


def test_span_corruption_is_invertible_and_has_the_right_density() -> None:
    rng = np.random.default_rng(0)
    sentinels = list(range(1000, 1100))
    noise_total = length_total = spans_total = 0
    for _ in range(300):
        length = int(rng.integers(2, 300))
        tokens = rng.integers(10, 900, size=length)
        mask = random_spans_noise_mask(length, rng=rng)
        inputs, targets = corrupt_spans(tokens, mask, sentinels)
        assert np.array_equal(restore_spans(inputs, targets, sentinels), tokens)
        starts = int((mask & ~np.concatenate([[False], mask[:-1]])).sum())
        assert len(inputs) == length - mask.sum() + starts
        assert len(targets) == mask.sum() + starts + 1 and targets[-1] == sentinels[starts]
        assert not mask[0]  # spans come after a non-noise stretch, as in T5
        noise_total += mask.sum()
        length_total += length
        spans_total += starts
    assert noise_total / length_total == pytest.approx(0.15, abs=0.01)
    assert noise_total / spans_total == pytest.approx(3.0, abs=0.35)


def test_span_corruption_example() -> None:
    tokens = np.array([1, 2, 3, 4, 5, 6, 7])
    mask = np.array([0, 1, 1, 0, 0, 1, 0], dtype=bool)
    inputs, targets = corrupt_spans(tokens, mask, [100, 101, 102])
    assert inputs.tolist() == [1, 100, 4, 5, 101, 7]
    assert targets.tolist() == [100, 2, 3, 101, 6, 102]


def test_span_collator_and_objective(wordpiece: Tokenizer) -> None:
    collator = SpanCorruptionCollator(wordpiece)
    chunk = collator.chunk_length(32)
    assert chunk > 32  # more raw tokens than the encoder takes, as T5 does
    rows = [np.array(wordpiece.encode(" ".join(WORDS * 3))[:chunk]) for _ in range(3)]
    batch = collator(rows, np.random.default_rng(0))
    assert batch["input_ids"].shape[1] <= 32
    labels = batch["labels"]
    decoder_inputs = batch["decoder_input_ids"]
    assert (decoder_inputs[:, 0] == wordpiece.bos_id).all()
    real = batch["decoder_attention_mask"]
    assert torch.equal(real, labels != IGNORE_INDEX)
    for i in range(3):
        n = int(real[i].sum())
        assert torch.equal(decoder_inputs[i, 1:n], labels[i, : n - 1])  # teacher forcing, shifted by one
        assert labels[i, n - 1] == wordpiece.eos_id
        source = batch["input_ids"][i, : int(batch["attention_mask"][i].sum()) - 1].numpy()  # drop eos
        restored = restore_spans(source, labels[i, : n - 1].numpy(), wordpiece.sentinel_ids)
        assert np.array_equal(restored, rows[i])

    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny-encoder-decoder", vocab_size=wordpiece.vocab_size))
    out = SpanCorruption()(model, batch)
    logits = model(
        batch["input_ids"],
        attention_mask=batch["attention_mask"],
        decoder_input_ids=decoder_inputs,
        decoder_attention_mask=real,
    ).logits
    expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum")
    torch.testing.assert_close(out.loss_sum, expected)

    few = Tokenizer.train(
        iter(["some text here"] * 3), kind="char", vocab_size=60, num_sentinels=2, show_progress=False
    )
    with pytest.raises(Exception, match="sentinel tokens"):
        SpanCorruptionCollator(few).chunk_length(64)


def test_make_objective() -> None:
    assert isinstance(make_objective("causal_lm"), CausalLM)
    assert isinstance(make_objective("span_corruption"), SpanCorruption)
    with pytest.raises(Exception, match="did you mean 'masked_lm'"):
        make_objective("masked_llm")  # type: ignore[arg-type]
