"""A generative sequence: a decoder learns tasks one after another, each answered as text.

Every task is supervised fine-tuning (:class:`lmforge.tasks.sft.SFTTask`, its own template,
columns and answer length): sentiment answered with the label word, intents with the intent
name, a translation with the French sentence. There is no label space to grow and no task id at
test time: one model answers every task, so the scenario is the hardest one (the model must
tell from the prompt what is asked). R[i][j] is task j's score after training task i:

- ``exact``: the share of answers equal to the reference, compared case-insensitively and
  without surrounding spaces, quotes and final punctuation (``"Positive."`` is ``positive``);
- ``chrf``: chrF (Popović 2015, sacrebleu's) of the answers against the references, over 100.

A general ability nobody trains is watched beside R (``probe_windows`` > 0): the perplexity of
fixed windows of English text the interpreter ships (:func:`lmforge.data.python_docs_corpus`),
measured before training and after every task, so drift of what the model knew shows next to
forgetting of what it was taught.

The strategies that work on text answers take part (``Strategy.generative``): naive, joint,
replay (a task-balanced or reservoir buffer of earlier prompt/answer pairs), ewc (the Fisher of
the answers' log-likelihood) and olora. Those built on class logits (lwf's distillation, the
adapters' routing by class prototypes) refuse a generative sequence in one line.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..data.python_docs import python_docs_corpus
from ..errors import LMForgeError
from ..metrics import chrf
from ..objectives import ObjectiveOutput, token_cross_entropy
from ..objectives.base import IGNORE_INDEX, model_inputs
from ..tasks.sft import SFTTask
from ..training.config import TrainConfig
from .learner import Learner, Stage, TaskSplit
from .strategies.base import FULL, Strategy

GENERATIVE = "generative"  # the scenario a generative sequence records
METRICS = ("exact", "chrf")
PROBE_LENGTH = 128  # tokens per window of the general-ability probe (fewer for a shorter context)
PROBE_BYTES = 400_000  # how much of the embedded corpus the probe's windows are spread over


def normalize_answer(text: str) -> str:
    """An answer as exact match compares it: lower case, without surrounding spaces, quotes and
    final punctuation."""
    return text.strip().strip("\"'`").strip().rstrip(".!?;:").strip().lower()


def score(metric: str, answers: Sequence[str], references: Sequence[str]) -> float:
    """``exact`` match or ``chrf`` / 100 of ``answers`` against ``references``, in [0, 1].

    Raises:
        LMForgeError: an unknown metric.
    """
    if metric == "exact":
        pairs = zip(answers, references, strict=True)
        return sum(normalize_answer(a) == normalize_answer(r) for a, r in pairs) / max(len(references), 1)
    if metric == "chrf":
        return chrf(list(answers), list(references)) / 100.0
    raise LMForgeError(f"unknown metric '{metric}' (metrics: {', '.join(METRICS)})", key="metric")


class GenerativeLearner(Learner):
    """Trains a decoder on SFT tasks in order with ``strategy``; R holds each task's score.

    Args:
        model: a decoder with its LM head.
        tasks: the SFT task of each entry of the sequence (one tokenizer for all).
        splits: each task's training and test examples.
        metrics: each task's metric (``exact`` or ``chrf``).
        probe_windows: windows of the embedded English corpus whose perplexity is measured
            after every task (0: none).
        The rest as :class:`Learner` (no scenario: one model answers every task).

    Raises:
        LMForgeError: a strategy that needs class logits, an unknown metric, an empty task.
    """

    kind = "sft"

    def __init__(
        self,
        model: nn.Module,
        tasks: Sequence[SFTTask],
        splits: Sequence[TaskSplit],
        *,
        metrics: Sequence[str],
        strategy: Strategy,
        method: str = FULL,
        peft: dict[str, Any] | None = None,
        train: TrainConfig,
        epochs: float | None = None,
        eval_batch_size: int = 32,
        probe_windows: int = 0,
    ) -> None:
        if len(tasks) != len(splits) or len(metrics) != len(splits) or not tasks:
            raise LMForgeError("a generative sequence needs one task and one metric per split", key="tasks")
        for metric in metrics:
            if metric not in METRICS:
                raise LMForgeError(f"unknown metric '{metric}' (metrics: {', '.join(METRICS)})", key="metric")
        self.sft, self.metrics = list(tasks), list(metrics)
        super().__init__(
            model,
            tasks[0],  # type: ignore[arg-type]  # the shared tokenizer and collation
            splits,
            scenario=GENERATIVE,
            strategy=strategy,
            method=method,
            peft=peft,
            train=train,
            epochs=epochs,
            eval_batch_size=eval_batch_size,
        )
        length = min(PROBE_LENGTH, int(getattr(model.config, "max_seq_len", PROBE_LENGTH + 1)) - 1)
        self.probe_ids = probe_windows_of(self.task.tokenizer, probe_windows, length) if probe_windows else None

    def check_scenario(self, scenario: str) -> None:
        if scenario != GENERATIVE:
            raise LMForgeError(f"a generative sequence has no '{scenario}' scenario", key="scenario")

    def index_classes(self) -> None:
        self.num_classes = 0  # answers are text: no label space

    def test_features(self) -> list[list[dict[str, Any]]]:
        return []  # answers are generated from the examples themselves

    def label_of(self, task: int, example: Any) -> int:
        return task  # a balanced buffer keeps an equal share of each task

    def encode(self, examples: Sequence[Any], task_index: int) -> list[dict[str, Any]]:
        """Features of ``examples`` through their own task's template, tagged with its index."""
        return [{**f, "task": task_index} for f in self.sft[task_index].encode(examples, packing=False)]

    def objective(self, stage: Stage) -> Callable[[nn.Module, dict[str, Tensor]], ObjectiveOutput]:
        return GenerativeObjective(self)

    def log_likelihood(self, model: nn.Module, batch: dict[str, Tensor], stage: Stage) -> Tensor:
        return -answer_loss(model, batch)[0].loss_sum

    def answers(self, task: int) -> list[str]:
        """The model's greedy answer to each test example of ``task``."""
        examples = self.tasks[task].test
        return self.sft[task].generated(self.model, examples, batch_size=self.eval_batch_size, num_beams=1)

    def evaluate(self, after: int) -> list[float]:
        """Each task's score on its test split after training task ``after`` (-1: untrained)."""
        self.model.eval()
        row = []
        for index, split in enumerate(self.tasks):
            references = [e.response for e in split.test]
            row.append(score(self.metrics[index], self.answers(index), references))
        return row

    @torch.no_grad()
    def general(self) -> float | None:
        """Perplexity of the probe's windows (None: no probe)."""
        if self.probe_ids is None:
            return None
        self.model.eval()
        device = next(self.model.parameters()).device
        ids = self.probe_ids.to(device)
        total, count = 0.0, 0
        for start in range(0, ids.shape[0], self.eval_batch_size):
            chunk = ids[start : start + self.eval_batch_size]
            out = self.model(chunk[:, :-1])
            loss = token_cross_entropy(out.logits, chunk[:, 1:])
            total, count = total + float(loss.loss_sum), count + int(loss.num_targets)
        return math.exp(total / max(count, 1))


def answer_loss(model: nn.Module, batch: dict[str, Tensor]) -> tuple[ObjectiveOutput, Tensor]:
    """Cross-entropy of the answer tokens and their logits; the LM head runs on the answers'
    positions only (the training loss and EWC's log-likelihood alike)."""
    counted = batch["labels"] != IGNORE_INDEX
    out = model(batch["input_ids"], **model_inputs(batch, "attention_mask"), logits_at=counted)
    return token_cross_entropy(out.logits, batch["labels"][counted]), out.logits


class GenerativeObjective:
    """Cross-entropy of the answer tokens (the prompt is context), plus the strategy's penalty;
    the LM head runs on the answers' positions only."""

    def __init__(self, learner: GenerativeLearner) -> None:
        self.learner = learner

    def __call__(self, model: nn.Module, batch: dict[str, Tensor]) -> ObjectiveOutput:
        result, logits = answer_loss(model, batch)
        extra = self.learner.strategy.penalty(self.learner, model, batch, logits)
        if extra is not None:
            result.metrics["penalty"] = float(extra.detach())
            result.loss_sum = result.loss_sum + extra * result.num_targets
        return result


def probe_windows_of(tokenizer: Any, windows: int, length: int = PROBE_LENGTH) -> Tensor:
    """(windows, length + 1) token ids: fixed windows spread evenly over the first PROBE_BYTES
    of the embedded English corpus (the same for every run of a tokenizer)."""
    text = "\n\n".join(python_docs_corpus(max_bytes=PROBE_BYTES))
    ids = tokenizer.encode(text)
    span = length + 1
    if len(ids) < span:
        raise LMForgeError("the embedded corpus is too short for the general-ability probe", key="probe_windows")
    starts = torch.linspace(0, len(ids) - span, windows).long().tolist()
    return torch.tensor([ids[s : s + span] for s in starts], dtype=torch.long)


