"""Prompt-based fine-tuning: classification trained through the language-model head.

PET (Schick & Schütze 2021, "Exploiting Cloze Questions for Few Shot Text Classification") and
LM-BFF (Gao et al. 2021, "Making Pre-trained Language Models Better Few-shot Learners") turn a
classification example into the text a pretrained model already reads — a template — and train
the model to write the label's word in the label slot: the LM loss on the label word (a decoder:
the word's tokens after the prompt; an encoder: the word's tokens in the ``[MASK]`` slot). No
new head is initialized, so a few examples per class go much further than with a fresh
classification head, which starts from random weights.

Prediction scores every label's word in the slot (:mod:`lmforge.prompting.scoring`: one prompt
pass, the words sharing its KV cache) and picks the likeliest label; the metrics, predictions and
label handling are sequence classification's (:class:`ClassificationTask`), so ``lmforge eval``
and ``lmforge predict`` read a prompt-tuned run like any classifier. The template and verbalizer
are resolved once and recorded in the run (``task_state``), so evaluation needs no template file.

With ``demonstrations`` K (LM-BFF's "demonstrations in context"), K training examples per class,
labels filled in, precede each prompt: while training, each example gets its own draw from the
other training examples (seeded); for prediction one fixed draw, recorded in the run, precedes
every prompt (its KV cache is shared, so it costs little).

A template file of several templates is an ensemble, as PET's is (there one model per template,
distilled; here one model): each training example is seen through every template, and a
prediction averages the templates' label distributions.

Any PEFT method applies (``lmforge finetune --task prompt_classification --method lora``): the
task only supplies batches and a loss to the one training loop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import LMForgeError
from ..objectives import ObjectiveOutput, shift_labels, token_cross_entropy
from ..objectives.base import IGNORE_INDEX, model_inputs
from ..prompting.classifier import PromptEncoder
from ..prompting.demonstrations import per_class_sample
from ..prompting.scoring import cloze_inputs, label_log_probs
from ..prompting.templates import PromptTemplate, resolve_templates
from .base import Batch, Feature, TaskOptions, _check, model_device, require_token, token_label_batch
from .classification import UNLABELED, ClassificationTask, TextExample
from .data import Row


@dataclass
class PromptOptions(TaskOptions):
    """Options of prompt-based classification."""

    template: str | None = None  # a built-in (default, plain, chat, sentiment, sentiment-chat), a YAML file (several templates: an ensemble) or text with a {label} slot
    length_normalize: bool = False  # score a multi-token label word by its mean token log-probability
    oos_label: str | None = None  # the out-of-scope class (CLINC150: oos)
    demonstrations: int = 0  # training examples per class put in context before each prompt (LM-BFF)
    demonstration_seed: int = 0  # seeds which training examples are the demonstrations

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self, self.demonstrations >= 0, "demonstrations", "must be 0 or more (examples per class)")


@dataclass
class PromptExample(TextExample):
    values: dict[str, Any] = field(default_factory=dict)  # every column of the row, for the template


class PromptClassificationTask(ClassificationTask):
    """Classification by a template and a verbalizer through the LM (decoder) or MLM (encoder) head."""

    Options = PromptOptions
    name = "prompt_classification"
    head = "lm"

    # ---- the templates -----------------------------------------------------------------------

    @property
    def templates(self) -> list[PromptTemplate]:
        """The templates: those recorded in the run, else every one ``options.template`` names
        (a file of several is an ensemble, PET's: trained on each, predictions averaged)."""
        recorded = self.state.get("templates") or ([self.state["template"]] if self.state.get("template") else [])
        if recorded:
            return [PromptTemplate.from_dict(t, where="the run's recorded template") for t in recorded]
        chat = bool(getattr(self.tokenizer, "chat_template", None))
        return resolve_templates(self.options.template, chat_available=chat)

    @property
    def template(self) -> PromptTemplate:
        """The first template (the only one, unless the templates are an ensemble)."""
        return self.templates[0]

    @property
    def encoders(self) -> list[PromptEncoder]:
        """Each template's view of examples as ids (built once for the label set)."""
        key = (id(self.state.get("labels")), str(self.state.get("templates") or self.state.get("template")))
        cached = getattr(self, "_encoder_cache", None)
        if cached is None or cached[0] != key:
            arch = self.arch or "decoder"
            cached = (key, [PromptEncoder(self.tokenizer, t, self.labels, arch=arch) for t in self.templates])
            self._encoder_cache = cached
        return cached[1]

    @property
    def encoder(self) -> PromptEncoder:
        """The first template's encoder."""
        return self.encoders[0]

    def _record_template(self) -> None:
        if "template" not in self.state and self.state.get("labels"):
            recorded = []
            for template in self.templates:
                encoder = PromptEncoder(self.tokenizer, template, self.labels, arch=self.arch or "decoder")
                recorded.append({**template.to_dict(), "verbalizer": encoder.verbalizer.to_dict()})
            self.state["template"] = recorded[0]  # what a run of one template has always recorded
            if len(recorded) > 1:
                self.state["templates"] = recorded

    def fit(self, examples: Sequence[TextExample]) -> None:
        super().fit(examples)
        self._record_template()
        if self.options.demonstrations:
            self._pick_demonstrations(examples)

    # ---- demonstrations (LM-BFF) -------------------------------------------------------------

    def _pick_demonstrations(self, examples: Sequence[TextExample]) -> None:
        """Keep the training examples to draw each training prompt's demonstrations from, and
        record one fixed draw for prediction (the last ``fit`` decides: the examples trained on)."""
        labeled = [e for e in examples if e.label is not None]
        labels = [self.label_index(e.label) for e in labeled]
        chosen = per_class_sample(labels, self.options.demonstrations, seed=self.options.demonstration_seed)
        if not chosen:
            raise LMForgeError("demonstrations need labeled training examples", key="options.demonstrations")
        self.state["demonstrations"] = [
            {"values": plain_values(self.values_of(labeled[i])), "label": labels[i]} for i in chosen
        ]
        members: dict[int, list[int]] = {}
        for i, label in enumerate(labels):
            members.setdefault(label, []).append(i)
        self._pool = (labeled, labels, members)

    def fixed_demonstrations(self) -> list[tuple[dict[str, Any], int]]:
        """The demonstrations every prediction's prompt starts with (none without the option)."""
        return [(d["values"], int(d["label"])) for d in self.state.get("demonstrations") or []]

    def _training_demonstrations(self, example: TextExample, index: int) -> list[tuple[dict[str, Any], int]]:
        """A training example's own draw from the other training examples (seeded by its index)."""
        pool = getattr(self, "_pool", None)
        if pool is None:  # a task restored from a run: its recorded draw
            return self.fixed_demonstrations()
        examples, labels, members = pool
        rng = np.random.default_rng([self.options.demonstration_seed, index])
        chosen = []
        for label in sorted(members):  # k of each class, never the example itself (nor a copy of its text)
            chosen += draw_others(members[label], self.options.demonstrations, rng, lambda j: examples[j].text != example.text)
        return [(self.values_of(examples[j]), labels[j]) for j in rng.permutation(chosen).tolist()]

    def set_labels(self, names: list[str], source: str) -> None:
        super().set_labels(names, source)
        self._record_template()

    # ---- data --------------------------------------------------------------------------------

    def parse(self, row: Row) -> list[PromptExample]:
        (example,) = super().parse(row)
        values = {**row.values, "text": example.text}
        if example.text_pair is not None:
            values["text_pair"] = example.text_pair
        return [PromptExample(example.text, example.text_pair, example.label, example.where, example.id, values)]

    def values_of(self, example: TextExample) -> dict[str, Any]:
        if isinstance(example, PromptExample):
            return example.values
        return {"text": example.text, "text_pair": example.text_pair}

    def encode(self, examples: Sequence[TextExample]) -> list[Feature]:
        """Prompt + label word (decoder) or the cloze with the word's tokens as the masks'
        targets (encoder), through the first template; unlabeled examples get the prompt alone
        (prediction only). With several templates each feature also holds every template's
        prompt (``views``), which :meth:`logits` scores and averages."""
        encoders, demos = self.encoders, self.fixed_demonstrations()
        features = [self._feature(encoders[0], example, demos) for example in examples]
        if len(encoders) > 1:
            for feature, example in zip(features, examples, strict=True):
                first = {key: feature[key] for key in ("prompt", "cloze") if key in feature}
                feature["views"] = [first] + [self._view(encoder, example, demos) for encoder in encoders[1:]]
        return features

    def training_features(self, examples: Sequence[TextExample]) -> list[Feature]:
        """Every example once per template: one model learns the label word through each (after
        its own demonstrations, with ``options.demonstrations``)."""
        def demos(index: int, example: TextExample) -> list[tuple[dict[str, Any], int]]:
            return self._training_demonstrations(example, index) if self.options.demonstrations else []

        return [
            self._feature(encoder, example, demos(index, example))
            for encoder in self.encoders
            for index, example in enumerate(examples)
        ]

    def _view(self, encoder: PromptEncoder, example: TextExample, demos: Sequence[tuple[dict[str, Any], int]]) -> dict[str, Any]:
        feature = self._feature(encoder, example, demos)
        return {key: feature[key] for key in ("prompt", "cloze") if key in feature}

    def _feature(
        self, encoder: PromptEncoder, example: TextExample, demos: Sequence[tuple[dict[str, Any], int]] = ()
    ) -> Feature:
        label = self.label_index(example.label) if example.label is not None else UNLABELED
        target_ids = encoder.target_ids(label) if label != UNLABELED else []
        values = self.values_of(example)
        if encoder.arch == "decoder":
            prompt = encoder.prompt_ids(values, demos)
            room = self.max_length - len(target_ids)
            if room < 1:
                raise LMForgeError(f"max_length {self.max_length} leaves no room for a prompt", key="options.max_length")
            prompt = prompt[-room:]
            ids = prompt + target_ids
            targets = [IGNORE_INDEX] * len(prompt) + target_ids
            shifted = shift_labels(torch.tensor([targets]))[0].tolist()
            return {"input_ids": ids, "labels": shifted, "label": label, "prompt": prompt, "length": len(ids)}
        before, after = encoder.cloze_ids(values, demos)
        start, end = self._specials()
        ids, at = cloze_inputs(
            before, after, max(len(target_ids), 1), start=start, end=end,
            mask_id=require_token(self.tokenizer, "mask", "a cloze"), max_length=self.max_length,
        )  # fmt: skip
        targets = [IGNORE_INDEX] * len(ids)
        targets[at : at + len(target_ids)] = target_ids
        return {"input_ids": ids, "labels": targets, "label": label, "cloze": (before, after), "length": len(ids)}

    def _specials(self) -> tuple[list[int], list[int]]:
        start = [i for i in (self.tokenizer.cls_id,) if i is not None]
        end = [i for i in (self.tokenizer.sep_id,) if i is not None]
        return start, end

    def collate(self, features: Sequence[Feature]) -> Batch:
        return token_label_batch(features, self.tokenizer.pad_id or 0)

    # ---- model -------------------------------------------------------------------------------

    def model_changes(self, arch: str) -> dict[str, Any]:
        return {"head": "mlm" if arch == "encoder" else "lm"}

    def objective(self, model: nn.Module, batch: Batch) -> ObjectiveOutput:
        out = model(batch["input_ids"], **model_inputs(batch, "attention_mask"))
        return token_cross_entropy(out.logits, batch["labels"])

    def num_targets(self, batch: Batch) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())

    @torch.no_grad()
    def logits(self, model: nn.Module, features: Sequence[Feature], *, batch_size: int) -> torch.Tensor:
        """(N, L) log-probabilities of the labels: every label word scored in the slot. Several
        templates: the log of the mean of their label distributions (an ensemble, as in context)."""
        encoders = self.encoders
        was_training = model.training
        model.eval()
        scored = []
        try:
            for which, encoder in enumerate(encoders):  # one template at a time: its prompts share a cache
                scorer = encoder.scorer(model, max_length=self.max_length)
                out = torch.empty(len(features), len(self.labels))
                for index, feature in enumerate(features):
                    view = feature["views"][which] if len(encoders) > 1 else feature
                    if "prompt" in view:
                        words = scorer.word_log_probs(view["prompt"])
                    else:
                        words = scorer.word_log_probs(*view["cloze"])
                    out[index] = label_log_probs(
                        words.to(model_device(model)), encoder.table, length_normalize=self.options.length_normalize
                    ).cpu()
                scored.append(out)
        finally:
            model.train(was_training)
        if len(scored) == 1:
            return scored[0]
        mean = torch.stack([s.log_softmax(-1).exp() for s in scored]).mean(0)  # (N, L)
        return mean.log()

    def describe(self) -> str:
        words = ", ".join(f"{name} → {words[0].strip()!r}" for name, words in zip(self.labels[:6], self.encoder.verbalizer.words, strict=False))
        more = f", … ({len(self.labels)} labels)" if len(self.labels) > 6 else ""
        shown = []
        for template in self.templates:
            mode = "chat" if template.chat else "raw"
            shown.append(f"'{template.name}' ({mode}): {template.text!r}")
        demos = self.options.demonstrations
        context = f"; {demos} demonstration(s) per class in context" if demos else ""
        if len(shown) == 1:
            return f"prompt-based classification, template {shown[0]}; label words {words}{more}{context}"
        return (
            f"prompt-based classification, an ensemble of {len(shown)} templates (each example trained through "
            f"each; predictions average their label distributions): {'; '.join(shown)}; label words of the first "
            f"{words}{more}{context}"
        )


def plain_values(values: dict[str, Any]) -> dict[str, Any]:
    """A row's columns as plain values a run's config.yaml can hold (others as their text)."""
    return {k: v if v is None or isinstance(v, str | int | float | bool) else str(v) for k, v in values.items()}


def draw_others(
    members: list[int], k: int, rng: np.random.Generator, allowed: Callable[[int], bool]
) -> list[int]:
    """Up to ``k`` distinct members that ``allowed`` accepts, uniformly: rejection draws while
    the class is large (O(k) per call, whatever the pool's size), a shuffle of the rest when small."""
    if len(members) > 4 * k:
        picked: list[int] = []
        for _ in range(16 * k):
            j = members[int(rng.integers(len(members)))]
            if j not in picked and allowed(j):
                picked.append(j)
                if len(picked) == k:
                    return picked
    others = [j for j in members if allowed(j)]
    return [others[i] for i in rng.permutation(len(others))[:k]]
