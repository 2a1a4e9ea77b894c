"""Evaluation metrics as plain functions.

Language modelling: perplexity and bits-per-byte. Perplexity exp(mean NLL) depends on the
tokenizer (a token may be a character or a word); bits-per-byte divides the total negative
log-likelihood, converted to bits, by the UTF-8 bytes of the text the predicted tokens cover, so
models with different tokenizers compare on one scale (Gao et al. 2020, "The Pile", §5).

Classification: accuracy, macro-F1 (the mean of per-class F1 over the classes that occur in the
references or the predictions, as scikit-learn's ``f1_score(average="macro")``), Matthews
correlation (multi-class form of Gorodkin 2004, as GLUE reports for CoLA), a per-class report and
the confusion matrix; in-scope accuracy and out-of-scope recall for intent data with an
out-of-scope class (Larson et al. 2019, CLINC150).

Generation: BLEU and chrF from sacrebleu (Post 2018: the standard, detokenized corpus scores),
ROUGE-1/2/L from rouge-score (Lin 2004; Google's reimplementation of ROUGE-1.5.5).

Extractive QA: exact match and token F1 after SQuAD's answer normalization (Rajpurkar et al.
2016), the best over the gold answers; for Chinese, CMRC 2018's scheme (Cui et al. 2019): text
cut into single CJK characters and whole Latin words, punctuation removed, F1 from the longest
common substring. Tagging: entity-level precision/recall/F1 over BIO spans (CoNLL-2003 style).
"""

from __future__ import annotations

import math
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Sequence
from typing import Any


def perplexity(mean_loss: float) -> float:
    """exp(mean negative log-likelihood in nats per token); ``inf`` when that overflows."""
    if math.isnan(mean_loss):
        return float("nan")
    return math.exp(mean_loss) if mean_loss < 700.0 else float("inf")


def bits_per_byte(loss_sum: float, num_bytes: float) -> float:
    """Total NLL in nats over some tokens → bits per byte of the text those tokens cover.

    ``loss_sum / (ln 2 · num_bytes)``. Example: 4 tokens covering 8 bytes with a total NLL of
    8·ln 2 nats cost 8 bits, i.e. 1 bit per byte.
    """
    if num_bytes <= 0:
        raise ValueError(f"num_bytes must be positive, got {num_bytes}")
    return loss_sum / (math.log(2.0) * num_bytes)


# ---- classification ----------------------------------------------------------------------------


def _check_pairs(predictions: Sequence[Any], references: Sequence[Any]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")


def accuracy(predictions: Sequence[Any], references: Sequence[Any]) -> float:
    """Share of predictions equal to their reference (nan for no examples)."""
    _check_pairs(predictions, references)
    if not references:
        return float("nan")
    return sum(p == r for p, r in zip(predictions, references, strict=True)) / len(references)


def confusion_matrix(
    predictions: Sequence[int], references: Sequence[int], num_labels: int
) -> list[list[int]]:
    """``matrix[gold][predicted]``: how many examples of each class got each prediction."""
    _check_pairs(predictions, references)
    matrix = [[0] * num_labels for _ in range(num_labels)]
    for p, r in zip(predictions, references, strict=True):
        matrix[r][p] += 1
    return matrix


def _prf(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def per_class_report(
    predictions: Sequence[int], references: Sequence[int], names: Sequence[str]
) -> dict[str, dict[str, float]]:
    """Per class name: precision, recall, F1 and support (gold examples of the class)."""
    matrix = confusion_matrix(predictions, references, len(names))
    report = {}
    for k, name in enumerate(names):
        tp = matrix[k][k]
        fp = sum(matrix[g][k] for g in range(len(names))) - tp
        fn = sum(matrix[k]) - tp
        precision, recall, f1 = _prf(tp, fp, fn)
        report[name] = {"precision": precision, "recall": recall, "f1": f1, "support": sum(matrix[k])}
    return report


def macro_f1(predictions: Sequence[int], references: Sequence[int]) -> float:
    """Mean F1 over the classes present in the references or the predictions."""
    _check_pairs(predictions, references)
    classes = sorted(set(references) | set(predictions))
    if not classes:
        return float("nan")
    scores = []
    for k in classes:
        tp = sum(p == k and r == k for p, r in zip(predictions, references, strict=True))
        fp = sum(p == k and r != k for p, r in zip(predictions, references, strict=True))
        fn = sum(p != k and r == k for p, r in zip(predictions, references, strict=True))
        scores.append(_prf(tp, fp, fn)[2])
    return sum(scores) / len(scores)


def matthews_corrcoef(predictions: Sequence[int], references: Sequence[int]) -> float:
    """Matthews correlation coefficient, multi-class (R_K): 1 perfect, 0 chance, -1 inverse;
    0 when either side has a single class."""
    _check_pairs(predictions, references)
    n = len(references)
    if n == 0:
        return float("nan")
    correct = sum(p == r for p, r in zip(predictions, references, strict=True))
    predicted = Counter(predictions)
    true = Counter(references)
    classes = set(predicted) | set(true)
    cov_pt = correct * n - sum(predicted[k] * true[k] for k in classes)
    cov_pp = n * n - sum(predicted[k] ** 2 for k in classes)
    cov_tt = n * n - sum(true[k] ** 2 for k in classes)
    if cov_pp == 0 or cov_tt == 0:
        return 0.0
    return cov_pt / math.sqrt(cov_pp * cov_tt)


def classification_metrics(
    predictions: Sequence[int],
    references: Sequence[int],
    names: Sequence[str],
    *,
    oos_label: int | None = None,
) -> dict[str, Any]:
    """Accuracy, macro-F1, MCC, per-class report and confusion matrix; with ``oos_label`` (the
    index of an out-of-scope class) also in-scope accuracy and out-of-scope recall/precision."""
    metrics: dict[str, Any] = {
        "accuracy": accuracy(predictions, references),
        "macro_f1": macro_f1(predictions, references),
        "mcc": matthews_corrcoef(predictions, references),
    }
    if oos_label is not None:
        pairs = list(zip(predictions, references, strict=True))
        in_scope = [(p, r) for p, r in pairs if r != oos_label]
        out_scope = [(p, r) for p, r in pairs if r == oos_label]
        predicted_oos = [(p, r) for p, r in pairs if p == oos_label]
        metrics["in_scope_accuracy"] = (
            sum(p == r for p, r in in_scope) / len(in_scope) if in_scope else float("nan")
        )
        metrics["oos_recall"] = (
            sum(p == r for p, r in out_scope) / len(out_scope) if out_scope else float("nan")
        )
        metrics["oos_precision"] = (
            sum(r == oos_label for _, r in predicted_oos) / len(predicted_oos)
            if predicted_oos
            else float("nan")
        )
    metrics["per_class"] = per_class_report(predictions, references, names)
    metrics["confusion_matrix"] = confusion_matrix(predictions, references, len(names))
    return metrics


# ---- generation --------------------------------------------------------------------------------


def _reference_streams(references: Sequence[str] | Sequence[Sequence[str]]) -> list[list[str]]:
    """sacrebleu's layout: one list per reference position ([[ref1 of each], [ref2 of each], …])."""
    rows = [[r] if isinstance(r, str) else list(r) for r in references]
    width = max((len(r) for r in rows), default=1)
    return [[row[i] if i < len(row) else "" for row in rows] for i in range(width)]


def bleu(
    hypotheses: Sequence[str],
    references: Sequence[str] | Sequence[Sequence[str]],
    *,
    tokenize: str | None = None,
) -> float:
    """Corpus BLEU (0–100) of sacrebleu, its default 13a tokenization (``tokenize="zh"`` for Chinese)."""
    import sacrebleu

    _check_pairs(hypotheses, references)
    kwargs = {"tokenize": tokenize} if tokenize else {}
    return float(sacrebleu.corpus_bleu(list(hypotheses), _reference_streams(references), **kwargs).score)


def chrf(hypotheses: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]]) -> float:
    """Corpus chrF (0–100) of sacrebleu (character 6-grams, β = 2)."""
    import sacrebleu

    _check_pairs(hypotheses, references)
    return float(sacrebleu.corpus_chrf(list(hypotheses), _reference_streams(references)).score)


def rouge(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1, ROUGE-2, ROUGE-L and ROUGE-Lsum F-measures (0–100), Porter stemming on."""
    from rouge_score import rouge_scorer

    _check_pairs(hypotheses, references)
    kinds = ("rouge1", "rouge2", "rougeL", "rougeLsum")
    scorer = rouge_scorer.RougeScorer(list(kinds), use_stemmer=True)
    totals = dict.fromkeys(kinds, 0.0)
    for hypothesis, reference in zip(hypotheses, references, strict=True):
        scores = scorer.score(reference, hypothesis)  # (target, prediction)
        for kind in kinds:
            totals[kind] += scores[kind].fmeasure
    n = max(len(references), 1)
    return {kind: 100.0 * total / n for kind, total in totals.items()}


# ---- extractive QA -----------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ffff]")


def normalize_answer(text: str) -> str:
    """SQuAD's normalization: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _is_punctuation(ch: str) -> bool:
    return unicodedata.category(ch).startswith("P") or ch in string.punctuation


def cjk_segments(text: str) -> list[str]:
    """CMRC 2018's mixed segmentation: each CJK character alone, other runs split at spaces,
    punctuation dropped, lower case."""
    out: list[str] = []
    word = ""
    for ch in text.lower():
        if _CJK.match(ch) or _is_punctuation(ch) or ch.isspace():
            if word:
                out.append(word)
                word = ""
            if _CJK.match(ch):
                out.append(ch)
        else:
            word += ch
    if word:
        out.append(word)
    return out


def has_cjk(text: str) -> bool:
    return _CJK.search(text) is not None


def _longest_common_substring(a: Sequence[str], b: Sequence[str]) -> int:
    best = 0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0] * (len(b) + 1)
        for j, y in enumerate(b, 1):
            if x == y:
                current[j] = previous[j - 1] + 1
                best = max(best, current[j])
        previous = current
    return best


def qa_exact_f1(prediction: str, answers: Sequence[str], *, language: str = "auto") -> tuple[float, float]:
    """Exact match and F1 of one predicted answer against its gold answers (the best of them).

    ``language`` "en": SQuAD (normalized words, bag-of-words F1); "zh": CMRC 2018 (mixed
    segments, longest-common-substring F1); "auto": zh when the answers hold CJK characters.
    """
    if not answers:
        raise ValueError("qa_exact_f1 needs at least one gold answer")
    if language == "auto":
        language = "zh" if any(has_cjk(a) for a in answers) else "en"
    best_em = best_f1 = 0.0
    for answer in answers:
        if language == "zh":
            pred, gold = cjk_segments(prediction), cjk_segments(answer)
            em = float(pred == gold)
            common = _longest_common_substring(pred, gold)
        else:
            pred, gold = normalize_answer(prediction).split(), normalize_answer(answer).split()
            em = float(pred == gold)
            common = sum((Counter(pred) & Counter(gold)).values())
        if common == 0 or not pred or not gold:
            f1 = float(pred == gold)
        else:
            precision, recall = common / len(pred), common / len(gold)
            f1 = 2 * precision * recall / (precision + recall)
        best_em, best_f1 = max(best_em, em), max(best_f1, f1)
    return best_em, best_f1


def qa_metrics(
    predictions: Sequence[str], answers: Sequence[Sequence[str]], *, language: str = "auto"
) -> dict[str, float]:
    """Mean exact match and F1 (0–100) over questions."""
    _check_pairs(predictions, answers)
    if not predictions:
        return {"exact_match": float("nan"), "f1": float("nan")}
    scores = [qa_exact_f1(p, a, language=language) for p, a in zip(predictions, answers, strict=True)]
    return {
        "exact_match": 100.0 * sum(e for e, _ in scores) / len(scores),
        "f1": 100.0 * sum(f for _, f in scores) / len(scores),
    }


# ---- tagging -----------------------------------------------------------------------------------


def bio_spans(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """Entity spans ``(type, start, end)`` (end exclusive) of a BIO / IOB2 tag sequence; an
    I- tag that does not continue an entity of its type starts one (the CoNLL convention)."""
    spans: set[tuple[str, int, int]] = set()
    kind, start = None, 0
    for i, tag in enumerate([*tags, "O"]):
        prefix, _, name = tag.partition("-") if "-" in tag else (tag, "", "")
        continues = prefix == "I" and name == kind
        if kind is not None and not continues:
            spans.add((kind, start, i))
            kind = None
        if prefix in ("B", "I") and not continues:
            kind, start = name, i
    return spans


def span_f1(predictions: Sequence[Sequence[str]], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Entity-level precision, recall and F1 over BIO-tagged sequences (exact span and type)."""
    _check_pairs(predictions, references)
    tp = fp = fn = 0
    for predicted, gold in zip(predictions, references, strict=True):
        p, g = bio_spans(predicted), bio_spans(gold)
        tp += len(p & g)
        fp += len(p - g)
        fn += len(g - p)
    precision, recall, f1 = _prf(tp, fp, fn)
    return {"span_precision": precision, "span_recall": recall, "span_f1": f1}
