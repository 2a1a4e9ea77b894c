"""lmforge.prompting on tiny models: templates and verbalizers (leading spaces, multi-token words,
BPE merges), calibration by hand, demonstration selection, and label scoring with the shared
prompt cache equal to one full pass per label."""

from __future__ import annotations

import collections
import json
import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

import lmforge
from lmforge import ModelConfig, Transformer
from lmforge.chat_template import BUILTIN_TEMPLATES
from lmforge.cli import main
from lmforge.errors import LMForgeError
from lmforge.model import KVCache
from lmforge.pipeline.finetuning import DataSpec, read_examples
from lmforge.pipeline.prompting import (
    PromptResult,
    PromptSettings,
    hold_out_references,
    in_context,
    load_prompt_model,
    long_enough,
    prompt_run,
    prompt_task,
    templates_of,
)
from lmforge.prompting import (
    BATCH_SAMPLES,
    CONTENT_FREE,
    ClozeScorer,
    DecoderScorer,
    PromptClassifier,
    PromptEncoder,
    PromptTemplate,
    Verbalizer,
    WordTable,
    arrange,
    balanced_sample,
    calibrate,
    domain_texts,
    full_pass_log_probs,
    label_log_probs,
    nearest,
    per_class_sample,
    read_template_file,
    reference_distribution,
    resolve_templates,
)
from lmforge.prompting.templates import join_word
from lmforge.tasks.prompt import PromptClassificationTask
from lmforge.tokenizers import Tokenizer
from lmforge.training import TrainConfig

CORPUS = [
    "Review: a charming and affecting journey\nSentiment: positive",
    "Review: unflinchingly bleak and desperate\nSentiment: negative",
    "the movie was wonderful and the plot was dull, positive negative neutral",
] * 30


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return Tokenizer.train(iter(CORPUS), kind="bpe", vocab_size=400, show_progress=False)


# ---- templates ---------------------------------------------------------------------------------------


def test_raw_template_moves_the_space_before_the_label_onto_the_word() -> None:
    template = PromptTemplate("Review: {text}\nSentiment: {label}", name="review")
    prompt = template.prompt({"text": "great fun"})
    assert prompt.text == "Review: great fun\nSentiment:" and prompt.lead == " "
    assert template.lead == " " and template.columns == ["text"]
    assert join_word(prompt.lead, "positive") == " positive"
    assert join_word(prompt.lead, " positive") == " positive"  # a word written with its space: not doubled
    assert join_word("", "positive") == "positive"


def test_demonstrations_instruction_and_separator() -> None:
    template = PromptTemplate(
        "Q: {text} A: {label}.", name="qa", instruction="Answer with one of: {labels}", separator="\n"
    )
    prompt = template.prompt(
        {"text": "x"}, [({"text": "good"}, "yes"), ({"text": "bad"}, " no")], label_words=["yes", "no"]
    )
    assert prompt.text == "Answer with one of: yes, no\nQ: good A: yes.\nQ: bad A: no.\nQ: x A:"
    assert prompt.lead == " "


def test_chat_template_renders_turns_and_the_word_has_no_space(bpe: Tokenizer) -> None:
    tokenizer = Tokenizer(bpe.backend, chat_template=BUILTIN_TEMPLATES["chatml"])
    template = PromptTemplate("Review: {text}\nPositive or negative? {label}", chat=True, instruction="Be brief.")
    prompt = template.prompt({"text": "fine"}, [({"text": "awful"}, "negative")], tokenizer=tokenizer)
    assert prompt.lead == "" and template.lead == ""
    assert prompt.text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nReview: awful\nPositive or negative?<|im_end|>\n"
        "<|im_start|>assistant\nnegative<|im_end|>\n"
        "<|im_start|>user\nReview: fine\nPositive or negative?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_cloze_pieces_around_the_mask() -> None:
    template = PromptTemplate("{text} It was {label}.", name="it-was")
    assert template.cloze({"text": "a fine film"}) == ("a fine film It was ", ".")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("Review: {text}", "no {label} slot"),
        ("{label} {text} {label}", "the {label} slot twice"),
        ("{text} {0} {label}", "must be a plain column name"),
    ],
)
def test_bad_templates_are_one_line_errors(text: str, message: str) -> None:
    with pytest.raises(LMForgeError, match=message.replace("{", r"\{").replace("}", r"\}")):
        PromptTemplate(text, name="bad")


def test_an_unknown_column_is_named() -> None:
    template = PromptTemplate("Title: {title}\n{text} {label}", name="t")
    with pytest.raises(LMForgeError, match=r"unknown column \{title\}.*the data has: label, text"):
        template.check_columns(["label", "text"])
    with pytest.raises(LMForgeError, match=r"unknown column \{title\}"):
        template.prompt({"text": "x"})


def test_template_file_and_builtins(tmp_path) -> None:
    path = tmp_path / "sst2.yaml"
    path.write_text(
        "templates:\n"
        "  - name: review\n    template: \"Review: {text}\\nSentiment: {label}\"\n"
        "    verbalizer: {negative: [terrible, bad], positive: great}\n"
        "  - template: \"{text} {label}\"\n    chat: true\n",
        encoding="utf-8",
    )
    first, second = read_template_file(path)
    assert first.name == "review" and second.name == "sst2-1" and second.chat
    assert first.verbalizer_for(["negative", "positive"]).words == (("terrible", "bad"), ("great",))
    assert resolve_templates(str(path), chat_available=False) == [first, second]
    assert resolve_templates(None, chat_available=True)[0].chat
    assert not resolve_templates(None, chat_available=False)[0].chat
    assert resolve_templates("Q: {text} A: {label}", chat_available=False)[0].name == "inline"
    bad = tmp_path / "bad.yaml"
    bad.write_text("templates:\n  - template: 'no slot {text}'\n", encoding="utf-8")
    with pytest.raises(LMForgeError, match=r"bad.yaml:2: .*no \{label\} slot"):
        read_template_file(bad)
    with pytest.raises(LMForgeError, match="unknown template 'sentimnt'.*did you mean 'sentiment'"):
        resolve_templates("sentimnt", chat_available=False)


# ---- verbalizers -------------------------------------------------------------------------------------


def test_verbalizer_defaults_to_label_names_and_checks_its_labels() -> None:
    verbalizer = Verbalizer.build(["pin_change", "oos"], {"oos": ["something else", "other"]})
    assert verbalizer.words == (("pin change",), ("something else", "other"))
    with pytest.raises(LMForgeError, match="verbalizer label 'positve' is not a label"):
        Verbalizer.build(["negative", "positive"], {"positve": "good"})
    with pytest.raises(LMForgeError, match="non-empty words"):
        Verbalizer.build(["a", "b"], {"a": ""})


def test_label_words_tokenize_as_they_do_inside_the_prompt(bpe: Tokenizer) -> None:
    """The word is encoded with the prompt's trailing space, so prompt ids + word ids are the ids
    of the whole text (byte-level BPE merges ' positive' into its own token, not ' ' + 'positive')."""
    template = PromptTemplate("Review: {text}\nSentiment: {label}", name="review")
    verbalizer = Verbalizer.build(["negative", "positive"], {"negative": "negative", "positive": ["positive", "wonderful movie"]})
    ids = verbalizer.token_ids(bpe, template.lead)
    assert len(ids[1][1]) > 1  # a multi-token word
    for text in ("a charming journey", "bleak", "the plot was dull"):
        prompt = template.prompt({"text": text})
        prompt_ids = bpe.encode(prompt.text)
        for label_words, words in zip(ids, verbalizer.words, strict=True):
            for word_ids, word in zip(label_words, words, strict=True):
                assert prompt_ids + word_ids == bpe.encode(prompt.text + join_word(prompt.lead, word))
    assert bpe.encode(" positive") != bpe.encode(" ") + bpe.encode("positive")  # what the lead avoids


def test_prompt_encoder_targets_are_the_first_words(bpe: Tokenizer) -> None:
    template = PromptTemplate("Review: {text}\nSentiment: {label}", name="review", verbalizer={"positive": ["positive", "good"]})
    encoder = PromptEncoder(bpe, template, ["negative", "positive"], arch="decoder")
    assert encoder.target_ids(1) == bpe.encode(" positive")
    assert encoder.table.owner == (0, 1, 1)


# ---- calibration -------------------------------------------------------------------------------------


def test_contextual_calibration_by_hand() -> None:
    content_free = torch.tensor([[0.9, 0.1], [0.7, 0.3]], dtype=torch.float64)
    reference = reference_distribution(content_free)
    torch.testing.assert_close(reference, torch.tensor([0.8, 0.2], dtype=torch.float64))
    probs = torch.tensor([[0.7, 0.3], [0.4, 0.6]], dtype=torch.float64)
    # [0.7/0.8, 0.3/0.2] = [0.875, 1.5] → / 2.375;  [0.4/0.8, 0.6/0.2] = [0.5, 3.0] → / 3.5
    expected = torch.tensor([[0.875 / 2.375, 1.5 / 2.375], [0.5 / 3.5, 3.0 / 3.5]], dtype=torch.float64)
    torch.testing.assert_close(calibrate(probs, reference), expected)
    assert calibrate(probs, reference).argmax(-1).tolist() == [1, 1]  # the first flips from label 0
    torch.testing.assert_close(calibrate(reference[None], reference), torch.full((1, 2), 0.5, dtype=torch.float64))
    assert CONTENT_FREE == ("N/A", "", "[MASK]")


def test_domain_texts_are_seeded_in_domain_words_of_average_length() -> None:
    texts = ["a b c d", "e f", "g h i"]  # 9 words / 3 texts → 3 words each
    first = domain_texts(texts, num_samples=5, seed=1)
    assert first == domain_texts(texts, num_samples=5, seed=1) and first != domain_texts(texts, num_samples=5, seed=2)
    assert all(len(t.split()) == 3 and set(t.split()) <= set("abcdefghi") for t in first)


def test_label_log_probs_mean_probability_and_length_normalization() -> None:
    table = WordTable.build([[[1]], [[2, 3], [4]]])  # label 1 has a 2-token and a 1-token word
    words = torch.tensor([[-1.0, -4.0, -2.0]])
    label1 = torch.log((torch.exp(torch.tensor(-4.0)) + torch.exp(torch.tensor(-2.0))) / 2)
    expected = torch.log_softmax(torch.stack([torch.tensor(-1.0), label1]), dim=-1)
    torch.testing.assert_close(label_log_probs(words, table)[0], expected)
    label1 = torch.log((torch.exp(torch.tensor(-2.0)) + torch.exp(torch.tensor(-2.0))) / 2)  # -4 / 2 tokens
    expected = torch.log_softmax(torch.stack([torch.tensor(-1.0), label1]), dim=-1)
    torch.testing.assert_close(label_log_probs(words, table, length_normalize=True)[0], expected)


# ---- demonstrations ----------------------------------------------------------------------------------


def test_random_demonstrations_are_class_balanced_and_seeded() -> None:
    labels = [0] * 50 + [1] * 10 + [2] * 5
    chosen = balanced_sample(labels, 9, seed=3)
    assert sorted(labels[i] for i in chosen) == [0, 0, 0, 1, 1, 1, 2, 2, 2] and len(set(chosen)) == 9
    assert chosen == balanced_sample(labels, 9, seed=3) and chosen != balanced_sample(labels, 9, seed=4)
    assert len({labels[i] for i in balanced_sample(labels, 2, seed=0)}) == 2  # k < classes: distinct classes
    train = per_class_sample(labels, 4, seed=0)
    dev = per_class_sample(labels, 4, seed=1, exclude=train)
    assert sorted(labels[i] for i in train) == [0] * 4 + [1] * 4 + [2] * 4 and not set(train) & set(dev)
    assert sorted(labels[i] for i in dev).count(2) == 1  # class 2 has 5 examples: one left


def test_knn_selection_is_deterministic_with_ties_to_the_first() -> None:
    pool = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [1.0, 1.0], [0.0, 3.0]])
    queries = torch.tensor([[1.0, 0.1], [0.0, 1.0]])
    index, similarity = nearest(queries, pool, 3)
    assert index.tolist() == [[0, 2, 3], [1, 4, 3]]  # equal cosines: the lower index first
    assert torch.all(similarity[:, :-1] >= similarity[:, 1:])
    again, _ = nearest(queries, pool, 3)
    assert torch.equal(index, again)
    assert arrange([5, 6, 7], [0] * 8, "similar_last", seed=0) == [7, 6, 5]
    assert arrange([1, 2, 3, 4], [0, 0, 0, 1, 1], "alternate", seed=0) == [1, 3, 2, 4]  # labels 0, 0, 1, 1
    with pytest.raises(LMForgeError, match="only 5 examples"):
        nearest(queries, pool, 6)


# ---- scoring -----------------------------------------------------------------------------------------

WORDS = WordTable.build([[[5], [7, 8, 9]], [[11, 12]], [[20, 21, 22, 23], [13]]])


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-decoder"])  # RoPE + GQA, learned positions
def test_shared_cache_scoring_equals_one_full_pass_per_word(preset: str) -> None:
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name(preset)).eval()
    scorer = DecoderScorer(model, WORDS)
    prompts = [[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 9, 9, 9], [1, 2, 3], [1, 2, 3, 4, 5, 6], [40] * 30]
    computed = []
    for prompt in prompts:
        before = scorer.tokens_computed
        torch.testing.assert_close(scorer.word_log_probs(prompt), full_pass_log_probs(model, prompt, WORDS), atol=1e-5, rtol=1e-5)
        computed.append(scorer.tokens_computed - before)
    packed = 2 + 1 + 3  # every word's tokens but its last ([7, 8], [11], [20, 21, 22]), in one continuation pass
    assert computed[0] == 6 + packed
    assert computed[1] == 3 + packed  # [1, 2, 3, 4] came from the cache
    assert computed[2] == 1 + packed  # all cached: the last token runs again for its logits
    assert computed[3] == 3 + packed


def test_scoring_falls_back_to_full_passes_where_words_cannot_be_packed() -> None:
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny-decoder", position="alibi")).eval()
    scorer = DecoderScorer(model, WORDS)
    assert not scorer.packed
    torch.testing.assert_close(scorer.word_log_probs([1, 2, 3]), full_pass_log_probs(model, [1, 2, 3], WORDS))


def test_kv_cache_truncate() -> None:
    cache = KVCache(1, 8, 2, 4)
    cache.update(torch.ones(1, 2, 5, 4), torch.ones(1, 2, 5, 4))
    cache.truncate(3)
    assert cache.length == 3 and cache.get()[0].shape == (1, 2, 3, 4)
    with pytest.raises(ValueError, match="cannot truncate"):
        cache.truncate(4)


def test_cloze_scoring_reads_the_masks_of_an_encoder(bpe: Tokenizer) -> None:
    torch.manual_seed(0)
    tokenizer = Tokenizer.train(iter(CORPUS), kind="wordpiece", vocab_size=200, show_progress=False)
    model = Transformer(ModelConfig.from_name("tiny-encoder", vocab_size=tokenizer.vocab_size, head="mlm")).eval()
    table = WordTable.build([[[10]], [[11, 12]]])
    scorer = ClozeScorer(model, table, tokenizer)
    before, after = tokenizer.encode("a charming journey it was"), tokenizer.encode(".")
    scores = scorer.word_log_probs(before, after)
    for index, word in enumerate(table.ids):
        ids, at = scorer.inputs(before, after, len(word))
        assert ids[at : at + len(word)] == [tokenizer.mask_id] * len(word) and ids[0] == tokenizer.cls_id
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0], dim=-1)
        expected = sum(lp[at + i, t] for i, t in enumerate(word))
        torch.testing.assert_close(scores[index], expected.detach())


def test_classifier_calibrates_with_the_same_demonstrations(bpe: Tokenizer) -> None:
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny-llama", vocab_size=bpe.vocab_size)).eval()
    template = PromptTemplate("Review: {text}\nSentiment: {label}", name="review")
    classifier = PromptClassifier(model, bpe, [template], ["negative", "positive"])
    pool = [({"text": "bleak"}, 0), ({"text": "charming"}, 1)]
    queries = [{"text": "a journey"}, {"text": "desperate"}]
    scores = classifier.classify(
        queries, pool=pool, demonstrations=[[0, 1], [0, 1]], calibration="contextual", content_free=CONTENT_FREE
    )
    encoder = classifier.encoders[0]
    scorer = encoder.scorer(model)
    blank = torch.stack(
        [torch.exp(encoder.log_probs(scorer, {"text": t}, pool).double()) for t in CONTENT_FREE]
    )
    raw = torch.stack([torch.exp(encoder.log_probs(scorer, q, pool).double()) for q in queries])
    torch.testing.assert_close(scores.uncalibrated, raw)
    torch.testing.assert_close(scores.probabilities, calibrate(raw, blank.mean(0) / blank.mean(0).sum()))
    assert len(scores.references["review"]) == 1  # one set of demonstrations: one estimate


def test_batch_calibration_divides_by_the_mean_of_real_reference_inputs(bpe: Tokenizer) -> None:
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny-llama", vocab_size=bpe.vocab_size)).eval()
    template = PromptTemplate("Review: {text}\nSentiment: {label}", name="review")
    classifier = PromptClassifier(model, bpe, [template], ["negative", "positive"])
    pool = [({"text": "bleak"}, 0), ({"text": "charming"}, 1), ({"text": "dull"}, 0)]
    queries = [{"text": "a journey"}, {"text": "desperate"}]
    references = [{"text": "the plot"}, {"text": "a movie"}, {"text": "it was"}]
    scores = classifier.classify(
        queries, pool=pool, demonstrations=[[0, 1], [1, 0]], calibration="batch",
        references=references, reference_demonstrations=[[0, 1], [1, 2], [2, 0]],
    )  # fmt: skip
    encoder = classifier.encoders[0]
    scorer = encoder.scorer(model)

    def probs(values: dict, demos: list[int]) -> torch.Tensor:
        return torch.exp(encoder.log_probs(scorer, values, [pool[i] for i in demos]).double())

    raw = torch.stack([probs(queries[0], [0, 1]), probs(queries[1], [1, 0])])
    seen = torch.stack([probs(r, d) for r, d in zip(references, [[0, 1], [1, 2], [2, 0]], strict=True)])
    mean = seen.mean(0) / seen.mean(0).sum()
    torch.testing.assert_close(scores.uncalibrated, raw)
    torch.testing.assert_close(scores.probabilities, calibrate(raw, mean))
    torch.testing.assert_close(torch.tensor(scores.references["review"][0], dtype=torch.float64), mean, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="reference inputs"):
        classifier.classify(queries, calibration="batch")


# ---- the pipeline and the command line ---------------------------------------------------------------

CUE_WORDS = {"great": 1, "fun": 1, "superb": 1, "bad": 0, "dull": 0, "awful": 0}
FILLER = ["the", "movie", "was", "plot", "a", "and", "it", "story"]
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def write_cue_folder(folder: Path, sizes: dict[str, int], *, seed: int = 0) -> Path:
    """A synthetic sentiment folder: four filler words and one cue word that decides the label."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in sizes.items():
        rows = []
        for _ in range(n):
            cue = rng.choice(sorted(CUE_WORDS))
            words = [rng.choice(FILLER) for _ in range(4)] + [cue]
            rng.shuffle(words)
            rows.append(json.dumps({"text": " ".join(words), "label": CUE_WORDS[cue]}))
        (folder / f"{split}.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (folder / "labels.txt").write_text("negative\npositive\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def cue_setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("prompt")
    text = " ".join(FILLER + sorted(CUE_WORDS))
    tokenizer = Tokenizer.train(
        iter([f"Review: {text}\nSentiment: positive negative"] * 20), kind="bpe", vocab_size=320, show_progress=False
    )
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny-llama", vocab_size=tokenizer.vocab_size))
    base = lmforge.save_run(root / "base", model=model, tokenizer=tokenizer)
    return base, write_cue_folder(root / "data", {"train": 200, "validation": 60, "test": 20})


def run_cli(args: list[object], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def train_on_cues(cue_setup: tuple[Path, Path], settings: PromptSettings, *, steps: int, r: int) -> PromptResult:
    """Prompt-based LoRA fine-tuning of the random tiny decoder on the cue folder (no head)."""
    base, data = cue_setup
    train = TrainConfig(
        max_steps=steps, batch_size=8, lr=1e-2, warmup_steps=max(2, steps // 15), weight_decay=0.0,
        eval_every=steps // 3, save_every=0, progress=False, seed=0,
    )  # fmt: skip
    return prompt_run(
        model=base, data=DataSpec(path=data), settings=settings, train=train, method="lora",
        peft={"r": r, "target_modules": "all-linear"}, compare_head=False, progress=False,
    )  # fmt: skip


def test_prompt_based_finetuning_learns_a_synthetic_task(cue_setup: tuple[Path, Path]) -> None:
    """A random tiny decoder, LoRA, the LM loss on the label word: 16 examples per class reach
    ≥ 90% on 60 held-out examples (chance is 50%; the cue word decides the label)."""
    result = train_on_cues(cue_setup, PromptSettings(template="sentiment", shots=16), steps=60, r=8)
    assert result.metrics["accuracy"] >= 0.9, result.metrics
    assert result.settings["shots_per_class"] == 16 and result.settings["method"] == "lora"


def test_prompt_based_finetuning_with_batch_calibration_picks_on_training_examples(
    cue_setup: tuple[Path, Path], capsys: pytest.CaptureFixture
) -> None:
    base, data = cue_setup
    result = train_on_cues(cue_setup, PromptSettings(template="sentiment", shots=8, calibrate="batch"), steps=20, r=4)
    calibration = result.settings["calibration"]
    assert calibration["how"] == "batch" and calibration["inputs"] == BATCH_SAMPLES
    assert sum(calibration["reference"]) == pytest.approx(1.0, abs=1e-5)
    plain, calibrated = calibration["dev_accuracy"]["none"], calibration["dev_accuracy"]["batch"]
    assert calibration["used"] == ("batch" if calibrated > plain else "none")  # decided on training examples
    other = "uncalibrated" if calibration["used"] == "batch" else "calibrated"
    assert set(result.compared) == {other} and 0.0 <= result.compared[other]["accuracy"] <= 1.0
    # content-free calibration is for prompting in context: with --train it is refused in one line
    code, _, err = run_cli(
        ["prompt", "--model", base, "--data", data, "--shots", 2, "--train", "--calibrate", "contextual"], capsys
    )
    assert code == 2 and "calibrates with 'batch' or not at all" in err


VERDICT = """  - name: verdict
    template: "{text}\\nThe movie was {label}"
    verbalizer: {negative: bad, positive: great}
"""
TWO_TEMPLATES = 'templates:\n  - name: review\n    template: "Review: {text}\\nSentiment: {label}"\n' + VERDICT


def test_a_template_ensemble_trains_through_each_template_and_averages_their_distributions(
    cue_setup: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    base, data = cue_setup
    file = tmp_path / "two.yaml"
    file.write_text(TWO_TEMPLATES, encoding="utf-8")
    (tmp_path / "verdict.yaml").write_text("templates:\n" + VERDICT, encoding="utf-8")
    loaded = load_prompt_model(base)

    def fitted(template: str) -> PromptClassificationTask:
        task = prompt_task(loaded, DataSpec(path=data), options={"template": template})
        task.fit(read_examples(task, DataSpec(path=data), "train"))
        return task

    both = fitted(str(file))
    review, verdict = fitted("Review: {text}\\nSentiment: {label}"), fitted(str(tmp_path / "verdict.yaml"))
    examples = read_examples(both, DataSpec(path=data), "validation")[:6]
    # each example once per template, through that template's prompt and label word
    training = both.training_features(examples)
    alone = review.encode(examples) + verdict.encode(examples)
    assert [f["input_ids"] for f in training] == [f["input_ids"] for f in alone]
    assert [f["labels"] for f in training] == [f["labels"] for f in alone]
    # prediction: the log of the mean of the two templates' label distributions
    model = loaded.model
    got = both.logits(model, both.encode(examples), batch_size=4)
    each = [t.logits(model, t.encode(examples), batch_size=4).softmax(-1) for t in (review, verdict)]
    torch.testing.assert_close(got, ((each[0] + each[1]) / 2).log(), atol=1e-5, rtol=0)
    assert "an ensemble of 2 templates" in both.describe()
    # trained: both templates recorded in the run, and `lmforge eval` scores the ensemble again
    trained = tmp_path / "trained.yaml"  # two templates the random tiny model learns within 60 steps
    trained.write_text(
        'templates:\n  - name: review\n    template: "Review: {text}\\nSentiment: {label}"\n'
        '  - name: text\n    template: "Text: {text}\\nSentiment: {label}"\n', encoding="utf-8"
    )  # fmt: skip
    settings = PromptSettings(template=str(trained), shots=16)
    train = TrainConfig(max_steps=60, batch_size=8, lr=1e-2, warmup_steps=4, weight_decay=0.0, eval_every=20, save_every=0, progress=False)
    result = prompt_run(
        model=base, data=DataSpec(path=data), settings=settings, train=train, method="lora",
        peft={"r": 8, "target_modules": "all-linear"}, compare_head=False, progress=False, out=tmp_path / "run",
    )  # fmt: skip
    assert result.metrics["accuracy"] >= 0.9, result.metrics
    state = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["task_state"]
    assert [t["name"] for t in state["templates"]] == ["review", "text"]
    code, stdout, _ = run_cli(
        ["eval", "--model", tmp_path / "run", "--data", data, "--split", "validation", "--output", tmp_path / "e.json"], capsys
    )
    assert code == 0, stdout
    evaluated = json.loads((tmp_path / "e.json").read_text())["metrics"]
    assert evaluated["accuracy"] == pytest.approx(result.metrics["accuracy"])


def test_demonstrations_in_context_while_training_and_predicting(
    cue_setup: tuple[Path, Path], capsys: pytest.CaptureFixture
) -> None:
    """LM-BFF's demonstrations: each training prompt after its own draw of one example per class
    (never itself, seeded), every prediction after one recorded draw."""
    base, data = cue_setup
    loaded = load_prompt_model(base)
    options = {"template": "sentiment", "demonstrations": 1, "max_length": 256}
    task = prompt_task(loaded, DataSpec(path=data), options=options)
    examples = read_examples(task, DataSpec(path=data), "train")[:12]
    task.fit(examples)
    tokenizer = loaded.tokenizer

    def shown(feature: dict) -> list[str]:  # the reviews in the prompt, in order (the query last)
        text = tokenizer.decode(feature["prompt"])
        return [part.split("\n")[0].strip() for part in text.split("Review:")[1:]]

    training = task.training_features(examples)
    assert training == task.training_features(examples)  # seeded
    draws = set()
    for example, feature in zip(examples, training, strict=True):
        reviews = shown(feature)
        assert len(reviews) == 3 and reviews[-1] == example.text and example.text not in reviews[:2]
        labels = sorted(CUE_WORDS[next(w for w in r.split() if w in CUE_WORDS)] for r in reviews[:2])
        assert labels == [0, 1]  # one demonstration per class, labels filled in
        draws.add(tuple(reviews[:2]))
    assert len(draws) > 1  # each example its own draw
    fixed = task.state["demonstrations"]
    assert [d["label"] for d in sorted(fixed, key=lambda d: d["label"])] == [0, 1]
    for feature in task.encode(examples[:3]):
        assert shown(feature)[:2] == [d["values"]["text"] for d in fixed]
    # a task rebuilt from the recorded state (as `lmforge eval` does) prompts the same way
    again = PromptClassificationTask(options, tokenizer, state=task.state, arch="decoder")
    assert [f["input_ids"] for f in again.encode(examples[:3])] == [f["input_ids"] for f in task.encode(examples[:3])]
    code, _, err = run_cli(
        ["prompt", "--model", base, "--data", data, "--train", "--shots", 2, "--options.demonstrations", -1], capsys
    )
    assert code == 2 and "demonstrations" in err and len(err.strip().splitlines()) == 1


def test_prompt_command_end_to_end_writes_metrics_like_eval(
    cue_setup: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    base, data = cue_setup
    output, predictions = tmp_path / "prompt.json", tmp_path / "pred.jsonl"
    code, stdout, _ = run_cli(
        ["prompt", "--model", base, "--data", data, "--template", "sentiment", "--shots", 2, "--selection", "knn",
         "--calibrate", "contextual", "--max_examples", 12, "--output", output, "--predictions", predictions],
        capsys,
    )  # fmt: skip
    assert code == 0, stdout
    assert "2-shot in context" in stdout and "predicted labels:" in stdout and "accuracy" in stdout
    record = json.loads(output.read_text())
    metrics = record["metrics"]
    assert {"accuracy", "macro_f1", "confusion_matrix", "per_class", "predicted"} <= set(metrics)
    assert metrics["examples"] == 12 and sum(metrics["predicted"].values()) == 12
    assert record["split"] == "validation" and record["task"] == "prompt_classification"
    assert "uncalibrated" in record["compared"] and record["settings"]["settings"]["selection"] == "knn"
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert len(rows) == 12 and {"prediction", "label", "probabilities"} <= set(rows[0])
    assert metrics["predicted"] == dict(collections.Counter(r["prediction"] for r in rows))


def test_batch_calibration_holds_its_inputs_out_of_the_demonstration_pool(cue_setup: tuple[Path, Path]) -> None:
    base, data = cue_setup
    task_base = load_prompt_model(base)
    task = prompt_task(task_base, DataSpec(path=data), options={"template": "sentiment"})
    pool = read_examples(task, DataSpec(path=data), "train", training=True)
    task.fit(pool)
    kept, held = hold_out_references(pool, PromptSettings(calibrate="batch", seed=3))
    assert len(held) == BATCH_SAMPLES and len(kept) == len(pool) - BATCH_SAMPLES
    assert held == hold_out_references(pool, PromptSettings(calibrate="batch", seed=3))[1]  # seeded
    assert hold_out_references(pool, PromptSettings(calibrate="contextual"))[1] == []
    settings = PromptSettings(template="sentiment", shots=2, selection="knn", calibrate="batch", seed=3)
    examples = read_examples(task, DataSpec(path=data), "validation")[:6]
    templates = templates_of(task, "sentiment")
    scores, chosen = in_context(task_base, task, templates, settings, pool, examples, embedder=task_base)
    assert chosen["calibration_inputs"] == BATCH_SAMPLES
    assert scores.probabilities.shape == (6, 2) and len(scores.references["sentiment"]) == 1
    reference = torch.tensor(scores.references["sentiment"][0], dtype=torch.float64)
    torch.testing.assert_close(scores.probabilities, calibrate(scores.uncalibrated, reference), atol=1e-5, rtol=0)


def test_select_chooses_template_and_calibration_on_training_data_and_records_the_one_used(
    cue_setup: tuple[Path, Path], tmp_path: Path
) -> None:
    base, data = cue_setup
    file = tmp_path / "templates.yaml"
    file.write_text(
        "templates:\n"
        "  - {name: review, template: \"Review: {text}\\nSentiment: {label}\"}\n"
        "  - {name: words, template: \"{text} It was {label}\", verbalizer: {negative: bad, positive: great}}\n",
        encoding="utf-8",
    )
    result = prompt_run(
        model=base, data=DataSpec(path=data), settings=PromptSettings(template=str(file), select=20, calibrate="batch"),
        max_examples=8, progress=False,
    )  # fmt: skip
    table = result.settings["selection"]
    assert {(r["template"], r["calibrate"]) for r in table} == {
        (t, c) for t in ("review", "words", "ensemble") for c in ("none", "batch")
    }
    best = max(table, key=lambda r: r["accuracy"])  # the first of equals
    assert result.settings["candidates"] == ["review", "words"]
    used = ["review", "words"] if best["template"] == "ensemble" else [best["template"]]
    assert [t["name"] for t in result.settings["templates"]] == used
    assert result.settings["settings"]["calibrate"] == best["calibrate"]


def cue_copy(source: Path, folder: Path, name: str, edit: Callable[[dict, int], dict]) -> list[dict]:
    """A copy of the cue folder in ``folder`` whose file ``name`` has every row (and its index)
    passed through ``edit``; the edited rows."""
    folder.mkdir()
    for other in ("train.jsonl", "validation.jsonl", "labels.txt"):
        if other != name:
            (folder / other).write_text((source / other).read_text())
    rows = [edit(json.loads(line), i) for i, line in enumerate((source / name).read_text().splitlines())]
    (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_train_min_words_keeps_only_long_training_examples_for_every_choice(
    cue_setup: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    base, source = cue_setup
    data = tmp_path / "data"  # every third training row made longer
    rows = cue_copy(source, data, "train.jsonl", lambda r, i: {**r, "text": f"{r['text']} and so on"} if i % 3 == 0 else r)
    floor = 1 + min(len(r["text"].split()) for r in rows)
    long = [r for r in rows if len(r["text"].split()) >= floor]
    assert 10 < len(long) < len(rows)
    pool = read_examples(prompt_task(load_prompt_model(base), DataSpec(path=data), options={}), DataSpec(path=data), "train")
    assert [e.text for e in long_enough(pool, floor)] == [r["text"] for r in long] and long_enough(pool, 0) == pool
    settings = PromptSettings(template="sentiment", select=10, calibrate="batch", train_min_words=floor)
    result = prompt_run(model=base, data=DataSpec(path=data), settings=settings, max_examples=4, progress=False)
    assert result.settings["pool"] == len(long) - 10  # the held-out examples came from the long rows too
    code, _, err = run_cli(["prompt", "--model", base, "--data", data, "--train_min_words", 99], capsys)
    assert code == 2 and err.strip() == "lmforge: error: key 'train_min_words': no training example has 99 words or more"


def test_prompt_sample_classifies_a_seeded_subset_in_file_order(
    cue_setup: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    base, source = cue_setup
    data = tmp_path / "data"  # an id on every validation row
    cue_copy(source, data, "validation.jsonl", lambda r, i: {**r, "id": i})
    seen = []
    for seed in (0, 0, 1):
        predictions = tmp_path / f"pred-{len(seen)}.jsonl"
        code, stdout, _ = run_cli(
            ["prompt", "--model", base, "--data", data, "--sample", 9, "--seed", seed, "--predictions", predictions],
            capsys,
        )
        assert code == 0, stdout
        ids = [json.loads(line)["id"] for line in predictions.read_text().splitlines()]
        assert len(ids) == 9 and ids == sorted(ids) and len(set(ids)) == 9  # a subset, in file order
        seen.append(ids)
    assert seen[0] == seen[1] and seen[0] != seen[2]  # seeded
    code, _, err = run_cli(["prompt", "--model", base, "--data", data, "--sample", 0], capsys)
    assert code == 2 and "--sample must be positive" in err


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("Review: {sentence}\nSentiment: {label}", "sentence"),  # a column the data does not have
        ("Review: {text}", "no {label} slot"),
    ],
)
def test_prompt_command_bad_template_is_one_line_exit_2(
    cue_setup: tuple[Path, Path], template: str, message: str, capsys: pytest.CaptureFixture
) -> None:
    base, data = cue_setup
    code, _, err = run_cli(["prompt", "--model", base, "--data", data, "--template", template], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("lmforge: error: "), (code, err)
    assert message in lines[0]


@pytest.mark.skipif(not (SHARED_DATA / "clinc150").is_dir(), reason="../shared/data/clinc150 absent (see PRODUCT.md)")
def test_clinc150_label_names_are_the_verbalizer_with_oos_metrics(
    cue_setup: tuple[Path, Path], capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    """151 intents, no verbalizer: the label names are the words (``pin_change`` → ``pin change``),
    all scored after one prompt pass; in-scope accuracy and oos recall reported."""
    base, _ = cue_setup
    output = tmp_path / "clinc.json"
    code, stdout, _ = run_cli(
        ["prompt", "--model", base, "--data", SHARED_DATA / "clinc150", "--template", "Query: {text}\nIntent: {label}",
         "--options.oos_label", "oos", "--max_examples", 6, "--output", output],
        capsys,
    )  # fmt: skip
    assert code == 0, stdout
    metrics = json.loads(output.read_text())["metrics"]
    assert {"in_scope_accuracy", "oos_recall"} <= set(metrics) and metrics["examples"] == 6
    assert "'pin change'" in stdout or "151 labels" in stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max_examples", 0], "--max_examples must be positive"),
        (["--shots", -1], "--shots must be 0 or more"),
        (["--train", "--shots", 0], "needs --shots"),
        (["--template", "nonesuch"], "unknown template 'nonesuch'"),
    ],
)
def test_prompt_command_bad_options_are_one_line_exit_2(
    cue_setup: tuple[Path, Path], args: list[object], message: str, capsys: pytest.CaptureFixture
) -> None:
    base, data = cue_setup
    code, _, err = run_cli(["prompt", "--model", base, "--data", data, *args], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and message in lines[0], (code, err)


def test_select_picks_the_ensemble_when_averaging_the_templates_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two templates, each biased to one label (50% each on the held-out examples); their average
    is right on all four: the ensemble is chosen, with every template."""
    from lmforge.pipeline import prompting as pipeline_prompting
    from lmforge.prompting import PromptTemplate
    from lmforge.prompting.classifier import PromptScores

    a = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.9, 0.1], [0.6, 0.4]], dtype=torch.float64)
    b = torch.tensor([[0.4, 0.6], [0.1, 0.9], [0.4, 0.6], [0.1, 0.9]], dtype=torch.float64)
    scores = PromptScores((a + b) / 2, (a + b) / 2, {"a": a, "b": b}, {"a": a, "b": b})
    monkeypatch.setattr(pipeline_prompting, "in_context", lambda *args, **kwargs: (scores, None))
    monkeypatch.setattr(pipeline_prompting, "label_indices", lambda task, examples: [0, 1, 0, 1])
    templates = [PromptTemplate("{text} {label}", name=n) for n in ("a", "b")]
    chosen, calibration, table = pipeline_prompting.select_on_training(
        None, None, templates, PromptSettings(calibrate="contextual"), [], [None] * 4,  # type: ignore[arg-type]
        embedder=None, progress=False,
    )  # fmt: skip
    assert [t.name for t in chosen] == ["a", "b"] and calibration == "none"
    assert {(r["template"], r["accuracy"]) for r in table if r["calibrate"] == "none"} == {("a", 0.5), ("b", 0.5), ("ensemble", 1.0)}
