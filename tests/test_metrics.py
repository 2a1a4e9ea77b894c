"""Task metrics against hand-computed values and against sacrebleu / rouge-score on fixed strings."""

from __future__ import annotations

import math

import pytest

from lmforge import metrics as M


def test_accuracy_confusion_and_per_class_by_hand() -> None:
    gold = [0, 0, 1, 1, 2, 2]
    pred = [0, 1, 1, 1, 0, 2]
    assert M.accuracy(pred, gold) == pytest.approx(4 / 6)
    assert M.confusion_matrix(pred, gold, 3) == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    report = M.per_class_report(pred, gold, ["a", "b", "c"])
    # class a: tp 1, fp 1 (the c predicted a), fn 1 -> p = r = f1 = 1/2
    assert report["a"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    # class b: tp 2, fp 1, fn 0 -> p 2/3, r 1, f1 0.8
    assert report["b"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})
    # class c: tp 1, fp 0, fn 1 -> p 1, r 1/2, f1 2/3
    assert report["c"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2})
    assert M.macro_f1(pred, gold) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)


def test_macro_f1_counts_classes_seen_in_predictions_or_references() -> None:
    # class 2 only predicted (f1 0), class 1 never seen: it does not count
    assert M.macro_f1([0, 2], [0, 0]) == pytest.approx((2 / 3 + 0.0) / 2)


def test_matthews_correlation_binary_by_hand_and_edge_cases() -> None:
    gold = [1, 1, 1, 0, 0, 0, 0, 1]
    pred = [1, 1, 0, 0, 0, 1, 0, 1]
    tp, tn, fp, fn = 3, 3, 1, 1
    expected = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert M.matthews_corrcoef(pred, gold) == pytest.approx(expected)
    assert M.matthews_corrcoef(gold, gold) == pytest.approx(1.0)
    assert M.matthews_corrcoef([1 - g for g in gold], gold) == pytest.approx(-1.0)
    assert M.matthews_corrcoef([1] * 8, gold) == 0.0  # one predicted class: undefined, reported as 0


def test_matthews_correlation_multiclass_matches_the_covariance_form() -> None:
    gold = [0, 1, 2, 0, 1, 2, 2]
    pred = [0, 2, 2, 0, 1, 1, 2]
    # R_K = cov(X, Y) / sqrt(cov(X, X) cov(Y, Y)) over one-hot vectors (Gorodkin 2004)
    n, classes = len(gold), range(3)
    x = [[int(p == k) for k in classes] for p in pred]
    y = [[int(g == k) for k in classes] for g in gold]

    def cov(a: list[list[int]], b: list[list[int]]) -> float:
        total = 0.0
        for k in classes:
            mean_a = sum(r[k] for r in a) / n
            mean_b = sum(r[k] for r in b) / n
            total += sum((ra[k] - mean_a) * (rb[k] - mean_b) for ra, rb in zip(a, b, strict=True))
        return total

    assert M.matthews_corrcoef(pred, gold) == pytest.approx(cov(x, y) / math.sqrt(cov(x, x) * cov(y, y)))


def test_in_scope_accuracy_and_out_of_scope_recall() -> None:
    names = ["book", "cancel", "oos"]
    gold = [0, 1, 2, 2, 2, 0]
    pred = [0, 0, 2, 1, 2, 2]
    out = M.classification_metrics(pred, gold, names, oos_label=2)
    assert out["in_scope_accuracy"] == pytest.approx(1 / 3)  # of gold 0, 1, 0: one right
    assert out["oos_recall"] == pytest.approx(2 / 3)
    assert out["oos_precision"] == pytest.approx(2 / 3)  # predicted oos 3 times, right twice
    assert out["accuracy"] == pytest.approx(3 / 6)
    assert out["confusion_matrix"][2] == [0, 1, 2]


def test_bleu_and_chrf_equal_sacrebleu_on_fixed_strings() -> None:
    sacrebleu = pytest.importorskip("sacrebleu")
    hyps = ["the cat sat on the mat .", "a quick brown fox jumps", "hello world"]
    refs = ["the cat is sitting on the mat .", "the quick brown fox jumps over", "hello , world"]
    assert M.bleu(hyps, refs) == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert M.chrf(hyps, refs) == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
    assert M.bleu(refs, refs) == pytest.approx(100.0)
    # several references per hypothesis
    two = [[r, h] for r, h in zip(refs, hyps, strict=True)]
    assert M.bleu(hyps, two) == pytest.approx(100.0)
    zh = ["我爱北京天安门", "今天天气很好"]
    zh_refs = ["我爱北京", "今天天气不错"]
    assert M.bleu(zh, zh_refs, tokenize="zh") == pytest.approx(
        sacrebleu.corpus_bleu(zh, [zh_refs], tokenize="zh").score
    )


def test_bleu_by_hand_on_a_short_corpus() -> None:
    hyp, ref = "a b c d", "a b d c"
    # n-gram precisions: unigrams 4/4; bigrams ab, bc, cd vs ab, bd, dc: 1/3; trigrams and
    # 4-grams match nothing, and sacrebleu's default "exp" smoothing makes the k-th such
    # precision 1 / (2^k · count): 1 / (2 · 2), 1 / (4 · 1). Same length: no brevity penalty.
    precisions = [1.0, 1 / 3, 1 / 4, 1 / 4]
    expected = 100 * math.exp(sum(math.log(p) for p in precisions) / 4)
    assert M.bleu([hyp], [ref]) == pytest.approx(expected, rel=1e-9)


def test_rouge_equals_rouge_score_and_hand_values() -> None:
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    hyps = ["the cats were sitting on a mat", "police killed the gunman"]
    refs = ["the cat sat on the mat", "the gunman was shot down by police"]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    ours = M.rouge(hyps, refs)
    for kind in ("rouge1", "rouge2", "rougeL"):
        expected = sum(scorer.score(r, h)[kind].fmeasure for h, r in zip(hyps, refs, strict=True)) / 2
        assert ours[kind] == pytest.approx(100 * expected)
    # by hand: "a b c" vs "a b d": unigram overlap 2/3 both ways -> F 2/3; bigram 1/2 -> 1/2
    simple = M.rouge(["a b c"], ["a b d"])
    assert simple["rouge1"] == pytest.approx(200 / 3) and simple["rouge2"] == pytest.approx(50.0)


def test_squad_exact_match_and_f1() -> None:
    assert M.normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    em, f1 = M.qa_exact_f1("the Eiffel tower", ["Eiffel Tower", "Paris"])
    assert (em, f1) == (1.0, 1.0)
    # "in paris france" vs "paris": precision 1/3, recall 1 -> F1 0.5
    em, f1 = M.qa_exact_f1("in Paris, France", ["Paris"])
    assert em == 0.0 and f1 == pytest.approx(0.5)
    out = M.qa_metrics(["Paris", "London"], [["paris"], ["Berlin"]])
    assert out == {"exact_match": pytest.approx(50.0), "f1": pytest.approx(50.0)}


def test_chinese_answers_use_character_segments_and_longest_common_substring() -> None:
    assert M.cjk_segments("北京，CMRC 2018年") == ["北", "京", "cmrc", "2018", "年"]
    # prediction 天安门广场 vs gold 北京天安门: longest common substring 天安门 (3 characters)
    em, f1 = M.qa_exact_f1("天安门广场", ["北京天安门"])
    precision, recall = 3 / 5, 3 / 5
    assert em == 0.0 and f1 == pytest.approx(2 * precision * recall / (precision + recall))
    assert M.qa_exact_f1("踢爆。", ["踢爆"]) == (1.0, 1.0)  # punctuation removed
    assert M.qa_exact_f1("x", ["天"], language="zh") == (0.0, 0.0)


def test_bio_spans_and_entity_f1() -> None:
    tags = ["B-PER", "I-PER", "O", "B-LOC", "I-PER", "I-PER", "O", "I-LOC"]
    assert M.bio_spans(tags) == {("PER", 0, 2), ("LOC", 3, 4), ("PER", 4, 6), ("LOC", 7, 8)}
    gold = [["B-PER", "I-PER", "O", "B-LOC"]]
    pred = [["B-PER", "O", "O", "B-LOC"]]
    out = M.span_f1(pred, gold)
    # predicted spans: PER(0,1) wrong, LOC(3,4) right -> p 1/2, r 1/2
    assert out == {"span_precision": 0.5, "span_recall": 0.5, "span_f1": 0.5}


def test_mismatched_lengths_are_refused() -> None:
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        M.accuracy([1, 2], [1])
    with pytest.raises(ValueError):
        M.qa_exact_f1("x", [])


def test_language_model_metrics_still_there() -> None:
    assert M.perplexity(math.log(4.0)) == pytest.approx(4.0)
    assert M.bits_per_byte(8 * math.log(2.0), 8) == pytest.approx(1.0)
