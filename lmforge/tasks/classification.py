"""Sequence classification: sentiment, intents (binary or many classes, optional out-of-scope).

A text (or a text pair) is encoded with the tokenizer's template (``[CLS] a [SEP] b [SEP]`` for
BERT-like tokenizers, ``[BOS] a [EOS]`` for lmforge's BPE), the backbone's hidden states are
pooled — the first token for encoders (BERT, Devlin et al. 2019), the last real token for
decoders (GPT-style classifiers, Radford et al. 2018) — and a linear head gives one logit per
class. The loss is the cross-entropy of each example: one target per example. Labels are names
from ``labels.txt`` (integer labels index it) or inferred from the training rows (sorted) and
saved in the run config; ``label = -1`` (or empty) marks an unlabeled row, which can be predicted
but not trained or scored. With an out-of-scope class (CLINC150's ``oos``, Larson et al. 2019)
the evaluation adds in-scope accuracy and out-of-scope recall.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import LMForgeError, did_you_mean
from ..metrics import classification_metrics
from ..objectives import ObjectiveOutput
from ..objectives.base import model_inputs
from .base import (
    Batch,
    ClassificationOptions,
    EvalResult,
    Feature,
    Task,
    eval_order,
    length_mask,
    model_device,
    pad,
    to_device,
)
from .data import Row, RowError

UNLABELED = -1
TOP_PROBABILITIES = 10  # a prediction lists the probabilities of (at most) the ten likeliest labels


@dataclass
class TextExample:
    text: str
    text_pair: str | None
    label: Any  # the raw label of the row (a name or an index), None when unlabeled
    where: str
    id: Any = None


class ClassificationTask(Task):
    """Sequence classification with a pooled head (``ModelConfig.head = "classification"``)."""

    Options = ClassificationOptions
    name = "classification"
    head = "classification"
    main_metric = "accuracy"
    archs = ("encoder", "decoder")

    @property
    def labels(self) -> list[str]:
        labels = self.state.get("labels")
        if not labels:
            raise LMForgeError("the label set is not known yet (no labels file and no training rows)")
        return list(labels)

    def parse(self, row: Row) -> list[TextExample]:
        text = self.columns.text(row, "text")
        pair = self.columns.text(row, "text_pair", required=False)
        raw = self.columns.get(row, "label", required=False)
        if isinstance(raw, str) and raw.strip().lstrip("-").isdigit():
            raw = int(raw)  # CSV cells are text
        if raw == "" or raw == UNLABELED:
            raw = None
        if raw is not None and (isinstance(raw, bool) or not isinstance(raw, str | int)):
            raise RowError(f"label must be a name or an integer, got {raw!r}")
        if raw is not None and self.state.get("labels"):
            self.label_index(raw)  # raises for a label outside the set
        return [TextExample(text, pair, raw, row.where, self.columns.get(row, "id", required=False))]

    def parse_checked(self, row: Row, *, training: bool) -> list[TextExample]:
        examples = self.parse(row)
        if training and examples[0].label is None:
            raise RowError(f"missing label (column '{self.columns.column('label')}') in a training row")
        return examples

    def label_index(self, raw: Any) -> int:
        labels = self.labels
        if isinstance(raw, int):
            if self.state.get("int_labels_are_names"):
                raw = str(raw)
            elif 0 <= raw < len(labels):
                return raw
            else:
                raise RowError(f"label {raw} is not in the label set (0 to {len(labels) - 1})")
        if raw in self._index:
            return self._index[raw]
        shown = ", ".join(labels[:8]) + (", …" if len(labels) > 8 else "")
        raise RowError(f"label '{raw}' is not in the label set ({shown})" + did_you_mean(str(raw), labels))

    @property
    def _index(self) -> dict[str, int]:
        cached = getattr(self, "_index_cache", None)
        if cached is None or cached[0] is not self.state.get("labels"):
            cached = (self.state.get("labels"), {name: i for i, name in enumerate(self.labels)})
            self._index_cache = cached
        return cached[1]

    def fit(self, examples: Sequence[TextExample]) -> None:
        """Infer the label set from the training examples when no labels file gave it: the
        distinct labels sorted (integers numerically)."""
        if self.state.get("labels"):
            return
        found = {e.label for e in examples if e.label is not None}
        if not found:
            raise LMForgeError("no labeled training rows to learn the label set from")
        if all(isinstance(v, int) for v in found):
            values = sorted(found)
            self.state["labels"] = [str(v) for v in values]
            # integer labels that are not 0..N-1 are names, not indices
            self.state["int_labels_are_names"] = values != list(range(len(values)))
        else:
            self.state["labels"] = sorted(str(v) for v in found)
            self.state["int_labels_are_names"] = True
        self.state["labels_from"] = "inferred from the training rows (sorted)"
        if len(self.state["labels"]) < 2:
            raise LMForgeError(
                f"the training rows hold a single label ({self.state['labels'][0]}): nothing to classify"
            )
        self._check_oos()

    def set_labels(self, names: list[str], source: str) -> None:
        self.state["labels"] = list(names)
        self.state["labels_from"] = source
        self.state["int_labels_are_names"] = False
        self._check_oos()

    def _check_oos(self) -> None:
        oos = self.options.oos_label
        if oos is not None and oos not in self.labels:
            raise LMForgeError(
                f"out-of-scope label '{oos}' is not in the label set" + did_you_mean(oos, self.labels),
                key="options.oos_label",
            )

    # ---- features and batches ----------------------------------------------------------------

    def encode(self, examples: Sequence[TextExample]) -> list[Feature]:
        backend = self.tokenizer.backend
        backend.enable_truncation(self.max_length, strategy="longest_first")
        try:
            singles = [i for i, e in enumerate(examples) if e.text_pair is None]
            pairs = [i for i, e in enumerate(examples) if e.text_pair is not None]
            encodings: dict[int, Any] = {}
            if singles:
                done = backend.encode_batch([examples[i].text for i in singles], add_special_tokens=True)
                encodings.update(zip(singles, done, strict=True))
            if pairs:
                done = backend.encode_batch(
                    [(examples[i].text, examples[i].text_pair) for i in pairs], add_special_tokens=True
                )
                encodings.update(zip(pairs, done, strict=True))
        finally:
            backend.no_truncation()
        features = []
        for i, example in enumerate(examples):
            encoding = encodings[i]
            label = self.label_index(example.label) if example.label is not None else UNLABELED
            feature: Feature = {"input_ids": encoding.ids, "label": label, "length": len(encoding.ids)}
            if example.text_pair is not None:
                feature["token_type_ids"] = encoding.type_ids
            features.append(feature)
        return features

    def collate(self, features: Sequence[Feature]) -> Batch:
        rows = [f["input_ids"] for f in features]
        batch: Batch = {
            "input_ids": pad(rows, self.tokenizer.pad_id or 0),
            "attention_mask": length_mask(rows),
            "labels": torch.tensor([f["label"] for f in features], dtype=torch.long),
        }
        if any("token_type_ids" in f for f in features):
            batch["token_type_ids"] = pad([f.get("token_type_ids", [0] * f["length"]) for f in features], 0)
        return batch

    # ---- model -------------------------------------------------------------------------------

    def model_changes(self, arch: str) -> dict[str, Any]:
        pooling = self.options.pooling
        changes: dict[str, Any] = {"head": "classification", "num_labels": len(self.labels)}
        if pooling != "auto":
            changes["pooling"] = pooling
        elif arch == "decoder":
            changes["pooling"] = "last"
        return changes

    def objective(self, model: nn.Module, batch: Batch) -> ObjectiveOutput:
        out = model(batch["input_ids"], **model_inputs(batch, "attention_mask", "token_type_ids"))
        logits = out.logits.float()  # (B, C)
        labels = batch["labels"]  # (B,)
        counted = labels != UNLABELED
        loss_sum = F.cross_entropy(logits[counted], labels[counted], reduction="sum")
        n = int(counted.sum())
        with torch.no_grad():
            correct = int((logits[counted].argmax(-1) == labels[counted]).sum())
        metrics = {"loss": float(loss_sum.detach()) / max(n, 1), "accuracy": correct / max(n, 1)}
        return ObjectiveOutput(loss_sum=loss_sum, num_targets=counted.sum(), metrics=metrics)

    def num_targets(self, batch: Batch) -> int:
        return int((batch["labels"] != UNLABELED).sum())

    @torch.no_grad()
    def logits(self, model: nn.Module, features: Sequence[Feature], *, batch_size: int) -> torch.Tensor:
        """(N, C) float logits of the features, in their order."""
        device = model_device(model)
        was_training = model.training
        model.eval()
        out = torch.empty(len(features), len(self.labels))
        try:
            for index in eval_order([f["length"] for f in features], batch_size):
                batch = to_device(self.collate([features[i] for i in index]), device)
                result = model(batch["input_ids"], **model_inputs(batch, "attention_mask", "token_type_ids"))
                out[index] = result.logits.float().cpu()
        finally:
            model.train(was_training)
        return out

    def evaluate(
        self, model: nn.Module, examples: Sequence[TextExample], *, batch_size: int = 32, final: bool = True
    ) -> EvalResult:
        features = self.encode(examples)
        logits = self.logits(model, features, batch_size=batch_size)
        predicted = logits.argmax(-1).tolist()
        probabilities = logits.softmax(-1)
        labels = [f["label"] for f in features]
        scored = [i for i, label in enumerate(labels) if label != UNLABELED]
        names = self.labels
        metrics: dict[str, Any] = {"examples": len(examples), "labeled": len(scored)}
        if scored:
            gold = torch.tensor([labels[i] for i in scored])
            metrics["loss"] = float(F.cross_entropy(logits[scored], gold))
            oos = names.index(self.options.oos_label) if self.options.oos_label else None
            metrics.update(
                classification_metrics([predicted[i] for i in scored], gold.tolist(), names, oos_label=oos)
            )
        gold_or_none = [label if label != UNLABELED else None for label in labels]
        return EvalResult(metrics, prediction_records(examples, probabilities, predicted, gold_or_none, names))

    def describe(self) -> str:
        labels = self.labels
        shown = ", ".join(labels[:6]) + (f", … ({len(labels)} in all)" if len(labels) > 6 else "")
        oos = f"; out-of-scope class '{self.options.oos_label}'" if self.options.oos_label else ""
        return f"classification into {len(labels)} classes ({shown}){oos}"


def prediction_records(
    examples: Sequence[Any], probabilities: Tensor, predicted: list[int], gold: list[int | None], names: list[str]
) -> list[dict[str, Any]]:
    """One record per example: the predicted name, its probability, the top probabilities by name,
    the example's id and its label where it has them."""
    records = []
    shown = min(len(names), TOP_PROBABILITIES)
    for i, example in enumerate(examples):
        top = probabilities[i].topk(shown)
        record: dict[str, Any] = {
            "prediction": names[predicted[i]],
            "score": round(float(probabilities[i, predicted[i]]), 6),
            "probabilities": {names[j]: round(float(p), 6) for p, j in zip(top.values, top.indices, strict=True)},
        }
        if example.id is not None:
            record = {"id": example.id, **record}
        if gold[i] is not None:
            record["label"] = names[gold[i]]
        records.append(record)
    return records
