"""Seq2seq: translation and summarization, source → target.

On an encoder-decoder (Vaswani et al. 2017; T5, Raffel et al. 2020) the encoder reads
``source_prefix + source [EOS]``; the decoder reads ``[START] target`` and learns
``target [EOS]`` (teacher forcing), START being the tokenizer's bos, else pad (T5). On a
decoder-only model the pair becomes a prompt and a response, ``template`` (default
``"### Source:\\n{source}\\n### Target:\\n"``) and ``target``, with the loss on the target only
(:mod:`lmforge.tasks.sft`).

Evaluation generates the targets — beam search with a length penalty (Wu et al. 2016) by
default in ``lmforge eval``, greedy while training — and scores them: BLEU and chrF
(sacrebleu; Chinese references use its ``zh`` tokenization) for translation, ROUGE-1/2/L
(rouge-score) for summarization, plus the teacher-forced loss and perplexity.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from torch import nn

from ..errors import LMForgeError
from ..metrics import bleu, chrf, has_cjk, rouge
from ..objectives import ObjectiveOutput, decoder_start_id, token_cross_entropy
from ..objectives.base import IGNORE_INDEX, model_inputs
from .base import (
    Batch,
    EvalResult,
    Feature,
    Seq2SeqOptions,
    SFTOptions,
    Task,
    length_mask,
    pad,
    require_token,
)
from .data import Row, RowError
from .sft import PromptExample, SFTTask, fill_template, generate_texts, teacher_forced_loss

DECODER_TEMPLATE = "### Source:\n{source}\n### Target:\n"


class Seq2SeqTask(Task):
    """Source → target generation (base of :class:`TranslationTask` and :class:`SummarizationTask`)."""

    Options = Seq2SeqOptions
    head = "lm"
    archs = ("encoder_decoder", "decoder")
    metric_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.arch is None:  # the encoding depends on the model: encoder-decoder unless told
            self.arch = "encoder_decoder"
        options = self.options
        # On a decoder the pairs are prompt → response: the same task as SFT, never packed.
        self.decoder_only = SFTTask(
            SFTOptions(
                max_length=options.max_length,
                template=self.template,
                max_target_length=options.max_target_length,
                num_beams=options.num_beams,
                length_penalty=options.length_penalty,
                eval_num_beams=options.eval_num_beams,
            ),
            self.tokenizer,
            self.columns,
        )

    @property
    def template(self) -> str:
        return self.options.template or DECODER_TEMPLATE

    def parse(self, row: Row) -> list[PromptExample]:
        source = self.columns.text(row, "source")
        target = self.columns.text(row, "target", required=False)
        prompt = fill_template(self.template, row, self.columns)
        return [
            PromptExample(
                prompt, target, row.where, self.columns.get(row, "id", required=False), source=source
            )
        ]

    def parse_checked(self, row: Row, *, training: bool) -> list[PromptExample]:
        examples = self.parse(row)
        if training and examples[0].response is None:
            raise RowError(f"missing field '{self.columns.column('target')}' in a training row")
        return examples

    def source_ids(self, example: PromptExample) -> list[int]:
        eos = require_token(self.tokenizer, "eos", "a seq2seq source")
        assert example.source is not None
        ids = self.tokenizer.encode(self.options.source_prefix + example.source)
        return ids[: self.max_length - 1] + [eos]

    def encode(self, examples: Sequence[PromptExample]) -> list[Feature]:
        if self.arch == "decoder":
            return self.decoder_only.encode(examples)
        eos = require_token(self.tokenizer, "eos", "a seq2seq target")
        start = decoder_start_id(self.tokenizer)
        features = []
        for example in examples:
            source = self.source_ids(example)
            target = self.tokenizer.encode(example.response or "")[: self.options.max_target_length - 1]
            features.append(
                {
                    "input_ids": source,
                    "decoder_input_ids": [start, *target],
                    "labels": [*target, eos],
                    "length": max(len(source), len(target) + 1),
                }
            )
        return features

    def collate(self, features: Sequence[Feature]) -> Batch:
        if self.arch == "decoder":
            return self.decoder_only.collate(features)
        pad_id = self.tokenizer.pad_id or 0
        sources = [f["input_ids"] for f in features]
        targets = [f["decoder_input_ids"] for f in features]
        return {
            "input_ids": pad(sources, pad_id),
            "attention_mask": length_mask(sources),
            "decoder_input_ids": pad(targets, pad_id),
            "decoder_attention_mask": length_mask(targets),
            "labels": pad([f["labels"] for f in features], IGNORE_INDEX),
        }

    def objective(self, model: nn.Module, batch: Batch) -> ObjectiveOutput:
        if self.arch == "decoder":
            return self.decoder_only.objective(model, batch)
        out = model(
            batch["input_ids"],
            decoder_input_ids=batch["decoder_input_ids"],
            **model_inputs(batch, "attention_mask", "decoder_attention_mask"),
        )
        return token_cross_entropy(out.logits, batch["labels"])

    def generate(
        self, model: nn.Module, examples: Sequence[PromptExample], *, batch_size: int, num_beams: int
    ) -> list[str]:
        self.check_model(model)
        if self.arch == "decoder":
            return self.decoder_only.generated(model, examples, batch_size=batch_size, num_beams=num_beams)
        return generate_texts(
            model,
            self.tokenizer,
            [self.source_ids(e) for e in examples],
            batch_size=batch_size,
            max_new_tokens=self.options.max_target_length,
            num_beams=num_beams,
            length_penalty=self.options.length_penalty,
            decoder_start_token_id=decoder_start_id(self.tokenizer),
        )

    def check_model(self, model: nn.Module) -> None:
        if model.config.arch != self.arch:
            raise LMForgeError(
                f"this {self.name} task encodes for a model of arch {self.arch}, the model is {model.config.arch}",
                key="model",
            )

    def score(self, hypotheses: list[str], references: list[str]) -> dict[str, float]:
        raise NotImplementedError

    def evaluate(
        self, model: nn.Module, examples: Sequence[PromptExample], *, batch_size: int = 32, final: bool = True
    ) -> EvalResult:
        self.check_model(model)
        scored = [e for e in examples if e.response is not None]
        metrics: dict[str, Any] = {"examples": len(examples)}
        if scored:
            metrics.update(teacher_forced_loss(self, model, self.encode(scored), batch_size=batch_size))
        beams = self.options.num_beams if final else self.options.eval_num_beams
        texts = self.generate(model, examples, batch_size=batch_size, num_beams=beams)
        metrics["num_beams"] = beams
        pairs = [(t, e.response) for t, e in zip(texts, examples, strict=True) if e.response is not None]
        if pairs:
            metrics.update(self.score([t for t, _ in pairs], [r for _, r in pairs]))
        predictions = []
        for example, text in zip(examples, texts, strict=True):
            record: dict[str, Any] = {"source": example.source, "prediction": text}
            if example.id is not None:
                record = {"id": example.id, **record}
            if example.response is not None:
                record["reference"] = example.response
            predictions.append(record)
        return EvalResult(metrics, predictions)

    def describe(self) -> str:
        where = f"prompt template {self.template!r}" if self.arch == "decoder" else "source → target"
        return f"{self.name} ({where}), scored by {self.main_metric}"


class TranslationTask(Seq2SeqTask):
    """Translation: BLEU (the main metric) and chrF."""

    name = "translation"
    main_metric = "bleu"

    def score(self, hypotheses: list[str], references: list[str]) -> dict[str, float]:
        tokenize = "zh" if any(has_cjk(r) for r in references[:100]) else None
        return {"bleu": bleu(hypotheses, references, tokenize=tokenize), "chrf": chrf(hypotheses, references)}


class SummarizationTask(Seq2SeqTask):
    """Summarization: ROUGE-1/2/L (ROUGE-L the main metric)."""

    name = "summarization"
    main_metric = "rougeL"

    def score(self, hypotheses: list[str], references: list[str]) -> dict[str, float]:
        return rouge(hypotheses, references)
