"""Generation / supervised fine-tuning (SFT): prompt → response pairs on a decoder.

Each row fills a prompt template (``"### Prompt:\\n{source}\\n### Response:\\n"`` by default; any
``{column}`` slot reads that column) and its ``target`` field is the response. The sequence is
``[BOS] prompt response [EOS]`` and the loss counts the response tokens and the end token only:
the prompt is context, not something to learn (the InstructGPT / Alpaca recipe, Ouyang et al.
2022; Taori et al. 2023). Labels are built aligned with the tokens, then shifted for next-token
prediction (:func:`lmforge.objectives.shift_labels`).

With ``options.chat`` the examples go through the model's chat template instead (an instruct
model such as SmolLM2-Instruct): a row's ``messages`` (a conversation of ``{"role", "content"}``
turns) or its filled template as the user's turn and its ``target`` as the assistant's answer,
after ``options.system``. The loss counts the assistant turns (their text and the template's
end-of-turn token) and nothing else, as Hugging Face TRL's ``assistant_only_loss`` does; the
answer is generated up to the end of the turn.

Packing (``options.packing``) concatenates several short examples into one sequence of up to
``max_length`` tokens, each example with its own positions (from 0) and a block-diagonal
attention mask, so examples never see one another (as in Krell et al. 2021, "Efficient
sequence packing without cross-contamination").

The shared pieces of decoder-side generation (left-padded prompts, :func:`generate_texts`)
also serve the seq2seq tasks.
"""

from __future__ import annotations

import math
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..chat_template import ChatTemplate, encode_chat, render_chat, template_for
from ..errors import LMForgeError
from ..generation import generate
from ..generation.state import ABSOLUTE_POSITIONS
from ..metrics import rouge
from ..objectives import ObjectiveOutput, shift_labels, token_cross_entropy
from ..objectives.base import IGNORE_INDEX, model_inputs
from .base import (
    Batch,
    EvalResult,
    Feature,
    SFTOptions,
    Task,
    eval_order,
    length_mask,
    model_device,
    pad,
    to_device,
    token_label_batch,
)
from .data import Row, RowError

DEFAULT_TEMPLATE = "### Prompt:\n{source}\n### Response:\n"
CHAT_TEMPLATE = "{source}"  # chat mode: the user's turn is the source as it is
ROLES = ("system", "user", "assistant")


def parse_messages(value: Any) -> list[dict[str, str]]:
    """A row's ``messages``: a non-empty list of ``{"role", "content"}`` turns.

    Raises:
        RowError: anything else, saying which turn is wrong.
    """
    if not isinstance(value, list) or not value:
        raise RowError("'messages' must be a non-empty list of {\"role\", \"content\"} turns")
    turns = []
    for number, turn in enumerate(value, 1):
        if not isinstance(turn, dict) or turn.get("role") not in ROLES or not isinstance(turn.get("content"), str):
            raise RowError(f"turn {number} of 'messages' needs a role ({', '.join(ROLES)}) and a content text")
        turns.append({"role": turn["role"], "content": turn["content"]})
    return turns


@dataclass
class PromptExample:
    prompt: str  # the filled template
    response: str | None  # None: nothing to learn or score (prediction only)
    where: str
    id: Any = None
    source: str | None = None  # the source text, for seq2seq predictions
    messages: list[dict[str, str]] | None = None  # chat: the row's own conversation


def template_fields(template: str) -> list[str]:
    """The ``{slot}`` names of a template (``{{`` and ``}}`` are literal braces)."""
    try:
        return [name for _, name, _, _ in string.Formatter().parse(template) if name]
    except ValueError as err:
        raise LMForgeError(f"bad template {template!r}: {err}", key="options.template") from None


def fill_template(template: str, row: Row, columns: Any) -> str:
    values = {}
    for name in template_fields(template):
        if not name.isidentifier():
            raise LMForgeError(
                f"template slot {{{name}}} must be a plain column name", key="options.template"
            )
        values[name] = columns.text(row, name)
    return template.format(**values)


def encode_prompt_response(
    tokenizer: Any, prompt: str, response: str | None, *, max_length: int, max_target_length: int
) -> tuple[list[int], list[int]]:
    """``([BOS] prompt response [EOS]`` ids, labels aligned with them (-100 on the prompt)), the
    response cut to ``max_target_length`` and the prompt's start cut so the whole fits ``max_length``."""
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    prompt_ids = tokenizer.encode(prompt)
    response_ids = tokenizer.encode(response)[:max_target_length] + eos if response is not None else []
    room = max_length - len(bos) - len(response_ids)
    if room < 1:
        response_ids = response_ids[: max(max_length - len(bos) - 1, 1)]
        room = max_length - len(bos) - len(response_ids)
    prompt_ids = prompt_ids[-room:] if room > 0 else []
    ids = bos + prompt_ids + response_ids
    labels = [IGNORE_INDEX] * (len(bos) + len(prompt_ids)) + response_ids
    return ids, labels


def left_padded(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    return pad(rows, pad_id, left=True), length_mask(rows, left=True)


@torch.no_grad()
def generate_texts(
    model: nn.Module,
    tokenizer: Any,
    inputs: Sequence[Sequence[int]],
    *,
    batch_size: int,
    max_new_tokens: int,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    decoder_start_token_id: int | None = None,
    stop_ids: list[int] | None = None,
) -> list[str]:
    """Generated text for each input (decoder prompts, or encoder-decoder sources), batched by
    length; decoding stops at the tokenizer's end token (or at any of ``stop_ids``)."""
    config = model.config
    device = model_device(model)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    eos: Any = stop_ids or tokenizer.eos_id
    texts: list[str] = [""] * len(inputs)
    for index in eval_order([len(x) for x in inputs], batch_size):
        rows = [inputs[i] for i in index]
        longest = max(len(r) for r in rows)
        budget = max_new_tokens
        if config.position in ABSOLUTE_POSITIONS:  # a position table: the whole must fit
            used = 1 if config.arch == "encoder_decoder" else longest
            budget = max(1, min(budget, config.max_seq_len - used))
        if config.arch == "encoder_decoder":
            ids, mask = pad(rows, pad_id).to(device), length_mask(rows).to(device)
        else:
            ids, mask = (t.to(device) for t in left_padded(rows, pad_id))
        out = generate(
            model,
            ids,
            attention_mask=mask,
            max_new_tokens=budget,
            num_beams=num_beams,
            length_penalty=length_penalty,
            early_stopping=False,  # keep searching while a running beam can still beat a finished one
            eos_token_id=eos,
            pad_token_id=pad_id,
            decoder_start_token_id=decoder_start_token_id,
        )
        start = 1 if config.arch == "encoder_decoder" else ids.shape[1]
        ends = set(eos if isinstance(eos, list) else [eos]) - {None}
        for row, i in zip(out[:, start:].tolist(), index, strict=True):
            cut = next((k for k, token in enumerate(row) if token in ends), len(row))
            texts[i] = tokenizer.decode(row[:cut]).strip()
    return texts


def teacher_forced_loss(
    task: Task, model: nn.Module, features: Sequence[Feature], *, batch_size: int
) -> dict[str, float]:
    """Mean loss per target token, perplexity and token accuracy over ``features``."""
    device = model_device(model)
    loss_sum, targets, correct = 0.0, 0, 0.0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for index in eval_order([f["length"] for f in features], batch_size):
                batch = to_device(task.collate([features[i] for i in index]), device)
                out = task.objective(model, batch)
                n = int(out.num_targets)
                loss_sum += float(out.loss_sum)
                targets += n
                correct += out.metrics.get("accuracy", 0.0) * n
    finally:
        model.train(was_training)
    if targets == 0:
        return {}
    loss = loss_sum / targets
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "token_accuracy": correct / targets}


class SFTTask(Task):
    """Supervised fine-tuning of a decoder on prompt → response pairs."""
    Options = SFTOptions
    name = "sft"
    head = "lm"
    main_metric = "loss"
    greater_is_better = False
    archs = ("decoder",)

    @property
    def template(self) -> str:
        """The prompt template: the user's turn in chat mode (``{source}`` by default)."""
        return self.options.template or (CHAT_TEMPLATE if self.options.chat else DEFAULT_TEMPLATE)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # chat mode: the template, found (and compiled) once for the task's tokenizer
        self.chat: ChatTemplate | None = (
            template_for(self.tokenizer, self.options.chat_template) if self.options.chat else None
        )

    def parse(self, row: Row) -> list[PromptExample]:
        where, row_id = row.where, self.columns.get(row, "id", required=False)
        if self.options.chat and self.columns.get(row, "messages", required=False) is not None:
            messages = parse_messages(self.columns.get(row, "messages"))
            answer = messages[-1]["content"] if messages[-1]["role"] == "assistant" else None
            return [PromptExample("", answer, where, row_id, messages=messages)]
        prompt = fill_template(self.template, row, self.columns)
        response = self.columns.text(row, "target", required=False)
        return [PromptExample(prompt, response, where, row_id)]

    def parse_checked(self, row: Row, *, training: bool) -> list[PromptExample]:
        examples = self.parse(row)
        if training and examples[0].response is None:
            raise RowError(
                f"missing field '{self.columns.column('target')}' (the response) in a training row"
            )
        return examples

    def encode(self, examples: Sequence[PromptExample], *, packing: bool | None = None) -> list[Feature]:
        """Features of the examples; ``packing`` (default: the option) joins short ones."""
        features = []
        for example in examples:
            if self.chat is not None:
                ids, labels = self.encode_conversation(example)
            else:
                ids, labels = encode_prompt_response(
                    self.tokenizer,
                    example.prompt,
                    example.response,
                    max_length=self.max_length,
                    max_target_length=self.options.max_target_length,
                )
            shifted = shift_labels(torch.tensor([labels]))[0].tolist()
            features.append({"input_ids": ids, "labels": shifted, "length": len(ids)})
        if self.options.packing if packing is None else packing:
            return pack(features, self.max_length)
        return features

    def collate(self, features: Sequence[Feature]) -> Batch:
        batch = token_label_batch(features, self.tokenizer.pad_id or 0)
        if any("segments" in f for f in features):  # packed rows: each sees its own sequence
            segments = pad([f["segments"] for f in features], -1)  # (B, T), -1 = padding
            same = segments[:, :, None] == segments[:, None, :]  # (B, T, T)
            batch["attention_mask"] = same & (segments >= 0)[:, None, :]
            batch["position_ids"] = pad([f["positions"] for f in features], 0)
        return batch

    def objective(self, model: nn.Module, batch: Batch) -> ObjectiveOutput:
        # The LM head (a vocabulary-wide projection) runs on the answer's positions only.
        counted = batch["labels"] != IGNORE_INDEX
        inputs = model_inputs(batch, "attention_mask", "position_ids")
        out = model(batch["input_ids"], **inputs, logits_at=counted)
        return token_cross_entropy(out.logits, batch["labels"][counted])

    def evaluate(
        self, model: nn.Module, examples: Sequence[PromptExample], *, batch_size: int = 32, final: bool = True
    ) -> EvalResult:
        scored = [e for e in examples if e.response is not None]
        metrics: dict[str, Any] = {"examples": len(examples)}
        if scored:  # example by example: never packed
            features = self.encode(scored, packing=False)
            metrics.update(teacher_forced_loss(self, model, features, batch_size=batch_size))
        predictions: list[dict[str, Any]] = []
        if final:
            texts = self.generated(model, examples, batch_size=batch_size)
            references = [e.response for e in examples]
            if scored:
                pairs = [(t, r) for t, r in zip(texts, references, strict=True) if r is not None]
                metrics["exact_match"] = 100.0 * sum(t == r.strip() for t, r in pairs) / len(pairs)
                metrics["rougeL"] = rouge([t for t, _ in pairs], [r for _, r in pairs])["rougeL"]
            for example, text in zip(examples, texts, strict=True):
                record: dict[str, Any] = {"prediction": text}
                if example.id is not None:
                    record = {"id": example.id, **record}
                if example.response is not None:
                    record["reference"] = example.response
                predictions.append(record)
        return EvalResult(metrics, predictions)

    # ---- chat mode -------------------------------------------------------------------------------

    def conversation(self, example: PromptExample, *, with_answer: bool) -> list[dict[str, str]]:
        """The example as chat messages: its own, or [system], user: the prompt, [assistant]."""
        if example.messages is not None:
            messages = list(example.messages)
            if not with_answer and messages[-1]["role"] == "assistant":
                messages = messages[:-1]
        else:
            messages = [{"role": "user", "content": example.prompt}]
            if with_answer and example.response is not None:
                messages.append({"role": "assistant", "content": example.response})
        if self.options.system and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.options.system})
        return messages

    def encode_conversation(self, example: PromptExample) -> tuple[list[int], list[int]]:
        """Ids of the rendered conversation and labels on its assistant turns only; a
        conversation longer than ``max_length`` keeps its end (the answer)."""
        encoding = encode_chat(self.tokenizer, self.conversation(example, with_answer=True), template=self.chat)
        ids = encoding.ids
        labels = [i if keep else IGNORE_INDEX for i, keep in zip(ids, encoding.assistant_mask, strict=True)]
        return ids[-self.max_length :], labels[-self.max_length :]

    def chat_prompt_ids(self, example: PromptExample) -> list[int]:
        """The conversation up to the answer, with the template's generation prompt."""
        assert self.chat is not None
        text = render_chat(
            self.tokenizer, self.conversation(example, with_answer=False), add_generation_prompt=True,
            template=self.chat,
        )  # fmt: skip
        return self.tokenizer.encode(text)[-self.max_length :]

    def generated(
        self,
        model: nn.Module,
        examples: Sequence[PromptExample],
        *,
        batch_size: int,
        num_beams: int | None = None,
    ) -> list[str]:
        """The generated response of each example (``num_beams``: default the option); in chat
        mode up to the end of the assistant's turn."""
        if self.chat is not None:
            prompts = [self.chat_prompt_ids(e) for e in examples]
            stop = self.chat.stop_tokens(self.tokenizer)
        else:
            prompts = [
                encode_prompt_response(
                    self.tokenizer, e.prompt, None, max_length=self.max_length, max_target_length=1
                )[0]
                for e in examples
            ]
            stop = None
        return generate_texts(
            model,
            self.tokenizer,
            prompts,
            batch_size=batch_size,
            max_new_tokens=self.options.max_target_length,
            num_beams=self.options.num_beams if num_beams is None else num_beams,
            length_penalty=self.options.length_penalty,
            stop_ids=stop,
        )

    def describe(self) -> str:
        packing = ", packed" if self.options.packing else ""
        return f"sft (loss on responses only{packing}), template {self.template!r}"


def pack(features: Sequence[Feature], max_length: int) -> list[Feature]:
    """Greedy packing in order: consecutive features joined while they fit ``max_length``; each
    keeps its own positions and a segment id (the mask keeps segments apart)."""
    packed: list[Feature] = []
    current: Feature | None = None
    for feature in features:
        n = feature["length"]
        if current is None or current["length"] + n > max_length:
            current = {"input_ids": [], "labels": [], "segments": [], "positions": [], "length": 0}
            packed.append(current)
        segment = current["segments"][-1] + 1 if current["segments"] else 0
        current["input_ids"] += feature["input_ids"]
        current["labels"] += feature["labels"]
        current["segments"] += [segment] * n
        current["positions"] += list(range(n))
        current["length"] += n
    return packed
