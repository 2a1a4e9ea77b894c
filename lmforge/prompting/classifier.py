"""Zero- and few-shot classification by prompting: templates × verbalizers × a scorer, with
calibration and template ensembling.

    example (+ demonstrations) ──template──► prompt ──scorer──► word log-probs ──► label
    distribution ──calibration (÷ p̂_cf of content-free inputs with the same demonstrations, or
    ÷ the mean distribution of a batch of real reference inputs)──► mean over templates
    (ensemble) ──► prediction

:class:`PromptEncoder` turns examples into token ids for one template (a decoder's prompt, an
encoder's text around the mask) and knows each label's words as ids; prompt-based fine-tuning
(:mod:`lmforge.tasks.prompt`) trains on the same ids. :class:`PromptClassifier` scores examples
with every template and returns label distributions before and after calibration, so one pass
over the data reports both.

The order of work keeps the decoder's KV cache useful: for each template, the queries in order,
and right after a query whose demonstrations are new, the content-free inputs with those same
demonstrations (they share everything but the input, so only a few tokens are computed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..errors import LMForgeError
from .calibration import Calibration, as_probabilities, calibrate, reference_distribution
from .scoring import ClozeScorer, DecoderScorer, WordTable, label_log_probs
from .templates import PromptTemplate, Verbalizer

Values = Mapping[str, Any]


def starts_with_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer's own template puts its bos token first (lmforge's BPE does; SmolLM2
    and GPT-2 do not): raw prompts then start with it, as the model's training texts did."""
    bos = tokenizer.bos_id
    if bos is None:
        return False
    ids = tokenizer.encode("a", add_special_tokens=True)
    return bool(ids) and ids[0] == bos


class PromptEncoder:
    """One template's view of examples as token ids, for a model of ``arch``.

    Args:
        tokenizer: the model's tokenizer.
        template: the template.
        labels: the label names, in index order.
        arch: ``decoder`` (the prompt is continued) or ``encoder`` (a cloze).
    """

    def __init__(self, tokenizer: Any, template: PromptTemplate, labels: Sequence[str], *, arch: str) -> None:
        if arch not in ("decoder", "encoder"):
            raise LMForgeError(
                f"prompting needs a decoder (label-word scoring) or an encoder with a masked-LM head (cloze); this model is {arch}",
                key="model",
            )
        if template.chat and not getattr(tokenizer, "chat_template", None):
            raise LMForgeError(
                f"template '{template.name}' goes through a chat template and this model's tokenizer has none "
                "(use a raw template, e.g. --template plain)",
                key="template",
            )
        self.tokenizer = tokenizer
        self.template = template
        self.labels = list(labels)
        self.arch = arch
        self.verbalizer: Verbalizer = template.verbalizer_for(self.labels)
        self.table = WordTable.build(self.verbalizer.token_ids(tokenizer, template.lead))
        self.label_words = [words[0] for words in self.verbalizer.words]
        self.bos = [tokenizer.bos_id] if arch == "decoder" and not template.chat and starts_with_bos(tokenizer) else []

    def demonstrations(self, demos: Sequence[tuple[Values, int]]) -> list[tuple[Values, str]]:
        return [(values, self.label_words[label]) for values, label in demos]

    def prompt_ids(self, values: Values, demos: Sequence[tuple[Values, int]] = ()) -> list[int]:
        """A decoder's prompt: the token ids the label words follow."""
        prompt = self.template.prompt(
            values, self.demonstrations(demos), label_words=self.label_words, tokenizer=self.tokenizer
        )
        return self.bos + self.tokenizer.encode(prompt.text)

    def cloze_ids(self, values: Values, demos: Sequence[tuple[Values, int]] = ()) -> tuple[list[int], list[int]]:
        """An encoder's ids before and after the ``[MASK]`` slot (without [CLS]/[SEP])."""
        before, after = self.template.cloze(values, self.demonstrations(demos), label_words=self.label_words)
        return self.tokenizer.encode(before.rstrip()), self.tokenizer.encode(after) if after.strip() else []

    def target_ids(self, label: int) -> list[int]:
        """The token ids of a label's first word (what prompt-based fine-tuning learns to say)."""
        return list(self.table.first_words()[label])

    def scorer(self, model: nn.Module, *, max_length: int = 512) -> DecoderScorer | ClozeScorer:
        if self.arch == "decoder":
            return DecoderScorer(model, self.table)
        return ClozeScorer(model, self.table, self.tokenizer, max_length=max_length)

    def log_probs(
        self,
        scorer: DecoderScorer | ClozeScorer,
        values: Values,
        demos: Sequence[tuple[Values, int]] = (),
        *,
        length_normalize: bool = False,
    ) -> Tensor:
        """(L,) log-probabilities over the labels for one example."""
        if isinstance(scorer, DecoderScorer):
            words = scorer.word_log_probs(self.prompt_ids(values, demos))
        else:
            words = scorer.word_log_probs(*self.cloze_ids(values, demos))
        return label_log_probs(words, self.table, length_normalize=length_normalize)


@dataclass
class PromptScores:
    """Label distributions of N examples (float64).

    probabilities: (N, L) the ensemble's, after calibration when one was asked.
    uncalibrated: (N, L) the ensemble's before calibration.
    per_template: template name → (N, L) its own distribution (calibrated when asked).
    per_template_uncalibrated: template name → (N, L) its own distribution before calibration.
    references: template name → the reference distributions it divided by (the content-free
        mean p̂_cf of each set of demonstrations, or batch calibration's one mean; at most ten
        shown; empty without calibration).
    tokens_computed: tokens that went through the model.
    """

    probabilities: Tensor
    uncalibrated: Tensor
    per_template: dict[str, Tensor] = field(default_factory=dict)
    per_template_uncalibrated: dict[str, Tensor] = field(default_factory=dict)
    references: dict[str, list[list[float]]] = field(default_factory=dict)
    tokens_computed: int = 0


class PromptClassifier:
    """Classifies examples with one or more templates (an ensemble averages their distributions).

    Args:
        model: a decoder with an LM head, or an encoder with a masked-LM head, in eval mode.
        tokenizer: its tokenizer.
        templates: the templates (several: ensembled).
        labels: the label names, in index order.
        length_normalize: score a multi-token word by its mean token log-probability.
        max_length: longest encoder input (cloze).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        templates: Sequence[PromptTemplate],
        labels: Sequence[str],
        *,
        length_normalize: bool = False,
        max_length: int = 512,
    ) -> None:
        if not templates:
            raise LMForgeError("no template to prompt with", key="template")
        arch = model.config.arch
        if arch == "encoder" and model.config.head != "mlm":
            raise LMForgeError(
                "an encoder needs a masked-LM head for cloze prompts (this one has head "
                f"'{model.config.head}'; load it with head mlm)",
                key="model",
            )
        if arch == "decoder" and model.config.head != "lm":
            raise LMForgeError(f"a decoder needs its LM head to score label words (head is '{model.config.head}')", key="model")
        names = [t.name for t in templates]
        if len(set(names)) != len(names):
            raise LMForgeError(f"two templates are named '{next(n for n in names if names.count(n) > 1)}'", key="template")
        self.model = model
        self.encoders = [PromptEncoder(tokenizer, t, labels, arch=arch) for t in templates]
        self.labels = list(labels)
        self.length_normalize = length_normalize
        self.max_length = max_length

    def check_columns(self, available: Sequence[str]) -> None:
        for encoder in self.encoders:
            encoder.template.check_columns(available)

    def classify(
        self,
        queries: Sequence[Values],
        *,
        pool: Sequence[tuple[Values, int]] = (),
        demonstrations: Sequence[Sequence[int]] | None = None,
        calibration: Calibration = "none",
        content_free: Sequence[str] = (),
        references: Sequence[Values] = (),
        reference_demonstrations: Sequence[Sequence[int]] | None = None,
        progress: bool = False,
    ) -> PromptScores:
        """Label distributions of ``queries``.

        Args:
            queries: each example's columns.
            pool: the examples demonstrations come from, (columns, label index).
            demonstrations: per query, the indices into ``pool`` of its demonstrations, in order
                (None: zero-shot).
            calibration: ``none``, or divide by the mean distribution of ``content_free`` inputs
                given with the same demonstrations (contextual / domain).
            content_free: the inputs that carry no content (see :mod:`.calibration`).
            references: for ``batch`` calibration, the real inputs whose mean distribution is
                divided out (prompted as queries are, with ``reference_demonstrations``).
            reference_demonstrations: per reference, its demonstrations (None: zero-shot).
            progress: show a progress bar.
        """
        if demonstrations is not None and len(demonstrations) != len(queries):
            raise ValueError(f"{len(demonstrations)} demonstration lists for {len(queries)} queries")
        if calibration == "batch":
            if not references:
                raise ValueError("batch calibration needs reference inputs")
            if reference_demonstrations is not None and len(reference_demonstrations) != len(references):
                raise ValueError(f"{len(reference_demonstrations)} demonstration lists for {len(references)} references")
        elif calibration != "none" and not content_free:
            raise ValueError("calibration needs content-free inputs")
        per_template: dict[str, Tensor] = {}
        uncalibrated: dict[str, Tensor] = {}
        shown: dict[str, list[list[float]]] = {}
        tokens = 0
        batch = calibration == "batch"
        total = (len(queries) + (len(references) if batch else 0)) * len(self.encoders)
        bar = tqdm(total=total, desc="prompting", disable=not progress, leave=False)
        for encoder in self.encoders:
            scorer = encoder.scorer(self.model, max_length=self.max_length)
            raw, calibrated, refs = self._one_template(
                encoder, scorer, queries, pool, demonstrations, "none" if batch else calibration, content_free, bar
            )
            if batch:  # the mean distribution of real inputs, prompted as the queries are
                seen, _, _ = self._one_template(
                    encoder, scorer, references, pool, reference_demonstrations, "none", (), bar
                )
                reference = reference_distribution(seen)
                calibrated = calibrate(raw, reference)
                refs = [[round(float(p), 6) for p in reference]]
            uncalibrated[encoder.template.name] = raw
            per_template[encoder.template.name] = calibrated
            shown[encoder.template.name] = refs
            tokens += scorer.tokens_computed
        bar.close()
        ensemble = torch.stack(list(per_template.values())).mean(dim=0)
        raw_ensemble = torch.stack(list(uncalibrated.values())).mean(dim=0)
        return PromptScores(ensemble, raw_ensemble, per_template, uncalibrated, shown, tokens)

    def _one_template(
        self,
        encoder: PromptEncoder,
        scorer: DecoderScorer | ClozeScorer,
        queries: Sequence[Values],
        pool: Sequence[tuple[Values, int]],
        demonstrations: Sequence[Sequence[int]] | None,
        calibration: Calibration,
        content_free: Sequence[str],
        bar: Any,
    ) -> tuple[Tensor, Tensor, list[list[float]]]:
        raw = torch.empty(len(queries), len(self.labels), dtype=torch.float64)
        calibrated = torch.empty_like(raw)
        known: dict[tuple[int, ...], Tensor] = {}  # demonstrations → p̂_cf
        columns = encoder.template.columns
        for index, values in enumerate(queries):
            chosen = tuple(demonstrations[index]) if demonstrations is not None else ()
            demos = [pool[i] for i in chosen]
            probs = as_probabilities(encoder.log_probs(scorer, values, demos, length_normalize=self.length_normalize))
            raw[index] = probs
            if calibration != "none":
                if chosen not in known:
                    blank = [
                        as_probabilities(
                            encoder.log_probs(
                                scorer, {**values, **dict.fromkeys(columns, text)}, demos,
                                length_normalize=self.length_normalize,
                            )
                        )
                        for text in content_free
                    ]
                    known[chosen] = reference_distribution(torch.stack(blank))
                calibrated[index] = calibrate(probs, known[chosen])
            else:
                calibrated[index] = probs
            bar.update(1)
        shown = [[round(float(p), 6) for p in ref] for ref in list(known.values())[:10]]
        return raw, calibrated, shown


__all__ = ["PromptClassifier", "PromptEncoder", "PromptScores", "starts_with_bos"]
