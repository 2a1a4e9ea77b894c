"""Extractive question answering: find the answer span of a question in a context.

As BERT on SQuAD (Devlin et al. 2019, §4.2): the input is ``[CLS] question [SEP] context [SEP]``
and a span head scores every token as the answer's start and end. A context longer than the
window is cut into overlapping windows (``max_length`` tokens, consecutive windows sharing
``stride`` tokens), by the tokenizer's own truncation with overflow. The character offsets of
the tokens map the gold answer onto token positions for training (a window without the whole
answer learns to point at its first token, the "no answer here" position) and map the predicted
span back onto the original context for evaluation, so the answer is the context's own text —
spaces, case and Chinese characters as written (CMRC 2018, Cui et al. 2019).

Rows are either SQuAD paragraphs (``context`` and a ``qas`` list of questions with ``answers``
of ``{"text", "answer_start"}``), or one question per row (``context``, ``question``,
``answers``: a list of such objects, ``{"text": [...], "answer_start": [...]}`` as in Hugging
Face datasets, or plain strings). A prediction is the best-scoring span (start + end logit)
over all windows with start ≤ end and at most ``max_answer_length`` tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LMForgeError
from ..metrics import qa_metrics
from ..objectives import ObjectiveOutput
from ..objectives.base import model_inputs
from .base import (
    Batch,
    EvalResult,
    Feature,
    QAOptions,
    Task,
    eval_order,
    length_mask,
    model_device,
    pad,
    to_device,
)
from .data import PartialRowError, Row, RowError

NO_ANSWER = 0  # the position a window without the answer points at (its first token)
CANDIDATES = 20  # best start and end positions considered per window


@dataclass
class QAExample:
    id: Any
    question: str
    context: str
    answers: list[tuple[str, int | None]]  # (text, character start in the context; None: not found there)
    where: str


class QATask(Task):
    """Extractive QA with a span head (``ModelConfig.head = "qa"``)."""

    Options = QAOptions
    name = "qa"
    head = "qa"
    main_metric = "f1"
    archs = ("encoder", "decoder")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.check_stride()

    def check_stride(self) -> None:
        if self.options.stride >= self.max_length // 2:
            raise LMForgeError(
                f"stride = {self.options.stride}: windows of max_length {self.max_length} tokens can "
                f"share at most {self.max_length // 2 - 1} (question and specials take room too)",
                key="options.stride",
            )

    def parse(self, row: Row) -> list[QAExample]:
        context = self.columns.text(row, "context")
        assert context is not None
        questions = row.values.get("qas")
        if questions is None:
            question = self.columns.text(row, "question")
            assert question is not None
            answers = self._answers(self.columns.get(row, "answers"), context)
            return [
                QAExample(self.columns.get(row, "id", required=False), question, context, answers, row.where)
            ]
        if not isinstance(questions, list):
            raise RowError("field 'qas' must be a list of questions")
        examples, errors = [], []
        for number, qa in enumerate(questions, 1):
            try:
                if (
                    not isinstance(qa, dict)
                    or not isinstance(qa.get("question"), str)
                    or not qa["question"].strip()
                ):
                    raise RowError(f"question {number} of 'qas' has no question text")
                if "answers" not in qa:
                    raise RowError(f"question {number} of 'qas' has no 'answers'")
                answers = self._answers(qa["answers"], context, number=number)
            except RowError as err:
                errors.append(str(err))
                continue
            examples.append(
                QAExample(qa.get("id", f"{row.where}#{number}"), qa["question"], context, answers, row.where)
            )
        if errors:
            raise PartialRowError(examples, errors) if examples else RowError(errors[0])
        return examples

    def parse_checked(self, row: Row, *, training: bool) -> list[QAExample]:
        """For training, every question needs an answer found in its context (a span to learn);
        the questions of a paragraph without one are reported, the others kept."""
        partial: PartialRowError | None = None
        try:
            examples = self.parse(row)
        except PartialRowError as err:
            examples, partial = err.examples, err
        if not training:
            if partial is not None:
                raise partial
            return examples
        kept, errors = [], list(partial.errors) if partial is not None else []
        for number, example in enumerate(examples, 1):
            located = [(t, s) for t, s in example.answers if s is not None]
            if located:
                example.answers = located
                kept.append(example)
            else:
                which = f"question {number}: " if len(examples) > 1 else ""
                errors.append(f"{which}answer {example.answers[0][0]!r} is not in the context")
        if errors and kept:
            raise PartialRowError(kept, errors)
        if errors:
            raise RowError(
                errors[0] if len(errors) == 1 else f"{errors[0]} (and {len(errors) - 1} more questions)"
            )
        return kept

    @staticmethod
    def _answers(value: Any, context: str, *, number: int | None = None) -> list[tuple[str, int | None]]:
        """Normalize the answer formats to (text, start) pairs; a start that does not match the
        context is looked up (the first occurrence), None when the text is not in the context."""
        where = f" of question {number}" if number is not None else ""
        if isinstance(value, dict) and isinstance(
            value.get("text"), list
        ):  # {"text": [...], "answer_start": [...]}
            starts = value.get("answer_start") or [None] * len(value["text"])
            value = [{"text": t, "answer_start": s} for t, s in zip(value["text"], starts, strict=False)]
        if isinstance(value, str | dict):
            value = [value]
        if not isinstance(value, list) or not value:
            raise RowError(f"no answers{where} (an extractive QA row needs at least one)")
        answers = []
        for item in value:
            text, start = (
                (item, None) if isinstance(item, str) else (item.get("text"), item.get("answer_start"))
            )
            if not isinstance(text, str) or not text.strip():
                raise RowError(f"an answer{where} has no text")
            if not isinstance(start, int) or start < 0 or context[start : start + len(text)] != text:
                found = context.find(text)  # a missing or wrong offset: the first occurrence
                start = found if found >= 0 else None
            answers.append((text, start))
        return answers

    # ---- features ----------------------------------------------------------------------------

    def windows(self, examples: Sequence[QAExample]) -> list[Feature]:
        """Token windows of every example (``example`` = its index), with offsets and the answer's
        token positions (``NO_ANSWER`` when the window does not hold the first answer whole)."""
        self.check_stride()
        backend = self.tokenizer.backend
        backend.enable_truncation(self.max_length, stride=self.options.stride, strategy="only_second")
        try:
            encodings = backend.encode_batch(
                [(e.question, e.context) for e in examples], add_special_tokens=True
            )
        finally:
            backend.no_truncation()
        features = []
        for index, (example, encoding) in enumerate(zip(examples, encodings, strict=True)):
            for window in [encoding, *encoding.overflowing]:
                sequence = window.sequence_ids
                context = [i for i, s in enumerate(sequence) if s == 1]
                if not context:
                    raise LMForgeError(
                        f"{example.where}: the question leaves no room for the context in "
                        f"{self.max_length} tokens (raise --options.max_length)",
                        key="options.max_length",
                    )
                located = [(t, s) for t, s in example.answers if s is not None]
                text, start_char = located[0] if located else ("", -1)
                end_char = start_char + len(text)
                offsets = window.offsets
                start = end = NO_ANSWER
                if located and offsets[context[0]][0] <= start_char and offsets[context[-1]][1] >= end_char:
                    start = next(i for i in context if offsets[i][1] > start_char)
                    end = next(i for i in reversed(context) if offsets[i][0] < end_char)
                features.append(
                    {
                        "input_ids": window.ids,
                        "token_type_ids": window.type_ids,
                        "start": start,
                        "end": end,
                        "example": index,
                        "offsets": [offsets[i] if sequence[i] == 1 else None for i in range(len(sequence))],
                        "length": len(window.ids),
                    }
                )
        return features

    def encode(self, examples: Sequence[QAExample]) -> list[Feature]:
        return self.windows(examples)

    def collate(self, features: Sequence[Feature]) -> Batch:
        rows = [f["input_ids"] for f in features]
        return {
            "input_ids": pad(rows, self.tokenizer.pad_id or 0),
            "attention_mask": length_mask(rows),
            "token_type_ids": pad([f["token_type_ids"] for f in features], 0),
            "start_positions": torch.tensor([f["start"] for f in features], dtype=torch.long),
            "end_positions": torch.tensor([f["end"] for f in features], dtype=torch.long),
        }

    def span_logits(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Start and end logits (B, T), padding positions at -inf."""
        out = model(batch["input_ids"], **model_inputs(batch, "attention_mask", "token_type_ids"))
        logits = out.logits.float()  # (B, T, 2)
        start, end = logits.unbind(-1)  # (B, T) each
        if "attention_mask" in batch:
            padding = ~batch["attention_mask"].bool()
            start, end = start.masked_fill(padding, float("-inf")), end.masked_fill(padding, float("-inf"))
        return start, end

    def objective(self, model: nn.Module, batch: Batch) -> ObjectiveOutput:
        start, end = self.span_logits(model, batch)
        # mean of the start and end cross-entropies, summed over windows (one target each)
        loss_sum = 0.5 * (
            F.cross_entropy(start, batch["start_positions"], reduction="sum")
            + F.cross_entropy(end, batch["end_positions"], reduction="sum")
        )
        n = batch["input_ids"].shape[0]
        with torch.no_grad():
            both = (start.argmax(-1) == batch["start_positions"]) & (end.argmax(-1) == batch["end_positions"])
        metrics = {"loss": float(loss_sum.detach()) / n, "accuracy": float(both.float().mean())}
        return ObjectiveOutput(loss_sum=loss_sum, num_targets=torch.tensor(n), metrics=metrics)

    def num_targets(self, batch: Batch) -> int:
        return int(batch["input_ids"].shape[0])

    # ---- prediction --------------------------------------------------------------------------

    @torch.no_grad()
    def predict(self, model: nn.Module, examples: Sequence[QAExample], *, batch_size: int) -> list[str]:
        """The best answer text of each example, from the context itself."""
        features = self.windows(examples)
        device = model_device(model)
        best: list[tuple[float, str]] = [(float("-inf"), "")] * len(examples)
        was_training = model.training
        model.eval()
        try:
            for index in eval_order([f["length"] for f in features], batch_size):
                chunk = [features[i] for i in index]
                start, end = self.span_logits(model, to_device(self.collate(chunk), device))
                for feature, start_row, end_row in zip(chunk, start.cpu(), end.cpu(), strict=True):
                    score, text = self._best_span(
                        feature, start_row, end_row, examples[feature["example"]].context
                    )
                    if score > best[feature["example"]][0]:
                        best[feature["example"]] = (score, text)
        finally:
            model.train(was_training)
        return [text for _, text in best]

    def _best_span(
        self, feature: Feature, start: torch.Tensor, end: torch.Tensor, context: str
    ) -> tuple[float, str]:
        offsets = feature["offsets"]
        k = min(CANDIDATES, len(offsets))
        starts = start.topk(k).indices.tolist()
        ends = end.topk(k).indices.tolist()
        best = (float("-inf"), "")
        for s in starts:
            if s >= len(offsets) or offsets[s] is None:
                continue
            for e in ends:
                if (
                    e >= len(offsets)
                    or offsets[e] is None
                    or e < s
                    or e - s + 1 > self.options.max_answer_length
                ):
                    continue
                score = float(start[s] + end[e])
                if score > best[0]:
                    best = (score, context[offsets[s][0] : offsets[e][1]].strip())
        return best

    def evaluate(
        self, model: nn.Module, examples: Sequence[QAExample], *, batch_size: int = 32, final: bool = True
    ) -> EvalResult:
        predictions = self.predict(model, examples, batch_size=batch_size)
        references = [[text for text, _ in e.answers] for e in examples]
        metrics: dict[str, Any] = {"examples": len(examples)}
        metrics.update(qa_metrics(predictions, references, language=self.options.language))
        records = [
            {"id": e.id, "question": e.question, "prediction": p, "answers": r}
            for e, p, r in zip(examples, predictions, references, strict=True)
        ]
        return EvalResult(metrics, records)

    def describe(self) -> str:
        return (
            f"extractive QA (windows of {self.max_length} tokens, stride {self.options.stride}, "
            f"answers up to {self.options.max_answer_length} tokens)"
        )
