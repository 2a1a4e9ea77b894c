"""Token classification (tagging): one tag per word, e.g. named entities in BIO form.

Rows give the words (``tokens``: a list, or a string split at whitespace) and one tag per word
(``tags``: names, or integers indexing the label set). Words are tokenized as pre-split input and
only each word's first sub-token is trained and read for the prediction, the other sub-tokens
and the specials are ignored (BERT on CoNLL-2003, Devlin et al. 2019, §5.3). Tags come from a
labels file or the training rows (sorted). Metrics: word accuracy and macro-F1 over tags, and,
when the tags are BIO, entity-level precision/recall/F1 (exact span and type, as CoNLL's
``conlleval``), the main metric then.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import LMForgeError, did_you_mean
from ..metrics import accuracy, macro_f1, span_f1
from ..objectives import ObjectiveOutput, token_cross_entropy
from ..objectives.base import IGNORE_INDEX, model_inputs
from .base import Batch, EvalResult, Feature, Task, eval_order, model_device, to_device, token_label_batch
from .data import Row, RowError


@dataclass
class TaggedExample:
    words: list[str]
    tags: list[Any] | None  # raw tags (names or indices); None: unlabeled
    where: str
    id: Any = None


class TaggingTask(Task):
    """Token classification with a per-token head (``ModelConfig.head = "token_classification"``)."""

    name = "tagging"
    head = "token_classification"
    archs = ("encoder", "decoder")

    @property
    def labels(self) -> list[str]:
        labels = self.state.get("labels")
        if not labels:
            raise LMForgeError("the tag set is not known yet (no labels file and no training rows)")
        return list(labels)

    @property
    def bio(self) -> bool:
        return any(t.startswith(("B-", "I-")) for t in self.state.get("labels") or [])

    @property
    def main_metric(self) -> str:  # type: ignore[override]
        return "span_f1" if self.bio else "accuracy"

    def parse(self, row: Row) -> list[TaggedExample]:
        words = self.columns.get(row, "tokens")
        if isinstance(words, str):
            words = words.split()
        if (
            not isinstance(words, list)
            or not words
            or not all(isinstance(w, str) and w.strip() for w in words)
        ):
            raise RowError(f"field '{self.columns.column('tokens')}' must be a non-empty list of words")
        tags = self.columns.get(row, "tags", required=False)
        if isinstance(tags, str):
            tags = tags.split()
        if tags is not None:
            if not isinstance(tags, list) or len(tags) != len(words):
                count = len(tags) if isinstance(tags, list) else "no list of"
                raise RowError(f"{count} tags for {len(words)} words")
            if self.state.get("labels"):
                for tag in tags:
                    self.tag_index(tag)
        return [TaggedExample(words, tags, row.where, self.columns.get(row, "id", required=False))]

    def parse_checked(self, row: Row, *, training: bool) -> list[TaggedExample]:
        examples = self.parse(row)
        if training and examples[0].tags is None:
            raise RowError(f"missing field '{self.columns.column('tags')}' in a training row")
        return examples

    def tag_index(self, tag: Any) -> int:
        labels = self.labels
        if isinstance(tag, int) and not isinstance(tag, bool) and not self.state.get("int_labels_are_names"):
            if 0 <= tag < len(labels):
                return tag
            raise RowError(f"tag {tag} is not in the tag set (0 to {len(labels) - 1})")
        if str(tag) in labels:
            return labels.index(str(tag))
        raise RowError(f"tag '{tag}' is not in the tag set" + did_you_mean(str(tag), labels))

    def fit(self, examples: Sequence[TaggedExample]) -> None:
        if self.state.get("labels"):
            return
        found = {t for e in examples for t in (e.tags or [])}
        if all(isinstance(t, int) for t in found):
            values = sorted(found)
            self.state["labels"] = [str(v) for v in values]
            self.state["int_labels_are_names"] = values != list(range(len(values)))
        else:
            self.state["labels"] = sorted(str(t) for t in found)
            self.state["int_labels_are_names"] = True
        self.state["labels_from"] = "inferred from the training rows (sorted)"

    def set_labels(self, names: list[str], source: str) -> None:
        self.state.update(labels=list(names), labels_from=source, int_labels_are_names=False)

    def model_changes(self, arch: str) -> dict[str, Any]:
        return {"head": "token_classification", "num_labels": len(self.labels)}

    # ---- features ----------------------------------------------------------------------------

    def encode(self, examples: Sequence[TaggedExample]) -> list[Feature]:
        backend = self.tokenizer.backend
        backend.enable_truncation(self.max_length)
        try:
            encodings = backend.encode_batch(
                [e.words for e in examples], is_pretokenized=True, add_special_tokens=True
            )
        finally:
            backend.no_truncation()
        features = []
        for example, encoding in zip(examples, encodings, strict=True):
            first: list[int] = []  # token position of each word's first sub-token (-1: truncated away)
            labels = [IGNORE_INDEX] * len(encoding.ids)
            seen: set[int] = set()
            positions = {}
            for position, word in enumerate(encoding.word_ids):
                if word is not None and word not in seen:
                    seen.add(word)
                    positions[word] = position
            for word in range(len(example.words)):
                first.append(positions.get(word, -1))
                if example.tags is not None and word in positions:
                    labels[positions[word]] = self.tag_index(example.tags[word])
            features.append(
                {"input_ids": encoding.ids, "labels": labels, "first": first, "length": len(encoding.ids)}
            )
        return features

    def collate(self, features: Sequence[Feature]) -> Batch:
        return token_label_batch(features, self.tokenizer.pad_id or 0)

    def objective(self, model: nn.Module, batch: Batch) -> ObjectiveOutput:
        out = model(batch["input_ids"], **model_inputs(batch, "attention_mask"))
        return token_cross_entropy(out.logits, batch["labels"])

    # ---- prediction --------------------------------------------------------------------------

    @torch.no_grad()
    def predict(
        self, model: nn.Module, examples: Sequence[TaggedExample], *, batch_size: int
    ) -> list[list[str]]:
        """One tag name per word (words cut off by max_length get the most common tag, "O" if there is one)."""
        features = self.encode(examples)
        names = self.labels
        fallback = names.index("O") if "O" in names else 0
        device = model_device(model)
        out: list[list[str]] = [[] for _ in examples]
        was_training = model.training
        model.eval()
        try:
            for index in eval_order([f["length"] for f in features], batch_size):
                batch = to_device(self.collate([features[i] for i in index]), device)
                logits = model(batch["input_ids"], **model_inputs(batch, "attention_mask")).logits
                best = logits.argmax(-1).cpu()  # (B, T)
                for row, i in enumerate(index):
                    out[i] = [
                        names[int(best[row, p])] if p >= 0 else names[fallback] for p in features[i]["first"]
                    ]
        finally:
            model.train(was_training)
        return out

    def evaluate(
        self, model: nn.Module, examples: Sequence[TaggedExample], *, batch_size: int = 32, final: bool = True
    ) -> EvalResult:
        predicted = self.predict(model, examples, batch_size=batch_size)
        names = self.labels
        metrics: dict[str, Any] = {"examples": len(examples)}
        gold = [[names[self.tag_index(t)] for t in e.tags] for e in examples if e.tags is not None]
        pred = [p for p, e in zip(predicted, examples, strict=True) if e.tags is not None]
        if gold:
            flat_gold = [t for row in gold for t in row]
            flat_pred = [t for row in pred for t in row]
            metrics["accuracy"] = accuracy(flat_pred, flat_gold)
            metrics["macro_f1"] = macro_f1(
                [names.index(t) for t in flat_pred], [names.index(t) for t in flat_gold]
            )
            if self.bio:
                metrics.update(span_f1(pred, gold))
        records = []
        for example, tags in zip(examples, predicted, strict=True):
            record: dict[str, Any] = {"tokens": example.words, "prediction": tags}
            if example.id is not None:
                record = {"id": example.id, **record}
            if example.tags is not None:
                record["tags"] = [names[self.tag_index(t)] for t in example.tags]
            records.append(record)
        return EvalResult(metrics, records)

    def describe(self) -> str:
        return f"tagging with {len(self.labels)} tags" + (" (BIO: entity F1)" if self.bio else "")
