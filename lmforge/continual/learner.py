"""The continual-learning driver: one model, a sequence of classification tasks, a strategy.

    for each stage (one task; joint training: one stage holding every task):
        seed(seed + stage) → strategy.prepare → strategy.batches → the one loop (task loss over
        the scenario's classes + strategy.penalty) → strategy.finish
        → evaluate every task's test split → one row of the accuracy matrix R

A generative sequence (SFT tasks answered as text) runs in the subclass
:class:`lmforge.continual.generative.GenerativeLearner`, which overrides the hooks below that
speak of classes (encoding, the objective, the log-likelihood, evaluation).

Scenarios (van de Ven & Tolias 2019, "Three scenarios for continual learning"):

- ``task``: task-incremental, the task id is known at test time: each example is scored among
  its own task's classes.
- ``class``: class-incremental, one growing label space: after training tasks 0..i an example
  is scored among every class of tasks 0..i (a future task j > i adds its own classes, so that
  R[i][j] and forward transfer are defined).
- ``domain``: domain-incremental, every task shares the label set: scored among all classes.

The head holds every class of the sequence from the start; classes outside an example's allowed
set get -inf logits, in training (task loss) and in testing alike. Each stage reseeds with
``seed + stage``, so a sequence resumed after task i trains task i+1 exactly as an uninterrupted
one does (:mod:`lmforge.pipeline.continual` saves and restores the state between tasks).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import peft as peft_lib
from ..errors import LMForgeError
from ..objectives import ObjectiveOutput
from ..objectives.base import model_inputs
from ..tasks.base import Batches
from ..tasks.classification import UNLABELED, ClassificationTask
from ..training import Trainer, seed_everything
from ..training.config import TrainConfig
from .metrics import summarize
from .strategies.base import FULL, Strategy

Scenario = Literal["task", "class", "domain"]
SCENARIOS: tuple[str, ...] = ("task", "class", "domain")
TASK_KEY = "task_ids"  # the batch key holding each example's task index


@dataclass
class TaskSplit:
    """One task of a sequence in memory: its examples and the label indices it holds."""

    name: str
    train: list[Any]
    test: list[Any]
    classes: list[int] = field(default_factory=list)  # filled by the learner from the examples


@dataclass
class Stage:
    """One training stage: the tasks it trains on (one, or all of them for joint training)."""

    index: int
    tasks: list[int]

    @property
    def last(self) -> int:
        return self.tasks[-1]


def sized_steps(train: TrainConfig, *, batches: int, epochs: float | None) -> TrainConfig:
    """``train`` with max_steps from ``epochs`` passes over ``batches`` batches."""
    if epochs is None:
        return train
    steps = max(1, round(epochs * batches / train.grad_accum))
    return dataclasses.replace(train, max_steps=steps, warmup_steps=min(train.warmup_steps, steps // 10))


class Learner:
    """Trains ``model`` on ``tasks`` in order with ``strategy`` and fills the accuracy matrix.

    Args:
        model: a classification model whose head spans every class of the sequence.
        task: the classification task (tokenizer, label set, encoding).
        tasks: the sequence.
        scenario: ``task``, ``class`` or ``domain`` incremental.
        strategy: a registered strategy (:func:`lmforge.continual.make_strategy`).
        method: ``full`` or a PEFT method (applied once, unless the strategy adds its own adapters).
        peft: the PEFT method's options.
        train: the loop's settings for each stage; ``epochs`` (if given) sizes each stage.
        eval_batch_size: batch size of the test passes.

    Raises:
        LMForgeError: an unknown scenario, a task with no examples, a method the strategy refuses.
    """

    kind: ClassVar[str] = "classification"  # the sequence's kind of task (GenerativeLearner: sft)

    def __init__(
        self,
        model: nn.Module,
        task: ClassificationTask,
        tasks: Sequence[TaskSplit],
        *,
        scenario: str,
        strategy: Strategy,
        method: str = FULL,
        peft: dict[str, Any] | None = None,
        train: TrainConfig,
        epochs: float | None = None,
        eval_batch_size: int = 64,
    ) -> None:
        self.check_scenario(scenario)
        strategy.check_method(method)
        strategy.check_kind(self.kind)
        self.task, self.tasks, self.scenario, self.strategy = task, list(tasks), scenario, strategy
        self.method, self.peft = method, dict(peft or {})
        self.train_config, self.epochs, self.eval_batch_size = train, epochs, eval_batch_size
        for split in self.tasks:
            if not split.train or not split.test:
                raise LMForgeError(f"task {split.name} has no training or no test examples", key="tasks")
        self.index_classes()
        self.model = model
        if method != FULL and not strategy.owns_adapters:
            self.model = peft_lib.apply(model, method, tokenizer=task.tokenizer, **self.peft)
        self._test_features = self.test_features()

    def check_scenario(self, scenario: str) -> None:
        if scenario not in SCENARIOS:
            raise LMForgeError(
                f"unknown scenario '{scenario}' (scenarios: {', '.join(SCENARIOS)})", key="scenario"
            )

    def index_classes(self) -> None:
        """The label space: each task's classes, from its training examples."""
        self.num_classes = len(self.task.labels)
        for split in self.tasks:
            split.classes = sorted({self.task.label_index(e.label) for e in split.train})

    def test_features(self) -> list[list[dict[str, Any]]]:
        return [self.encode(split.test, index) for index, split in enumerate(self.tasks)]

    def label_of(self, task: int, example: Any) -> int:
        """The class a buffer balances ``example`` of task ``task`` under."""
        return self.task.label_index(example.label)

    # ---- the stages ---------------------------------------------------------------------------

    def stages(self) -> list[Stage]:
        """One stage per task, or a single one over every task for joint training."""
        if self.strategy.all_at_once:
            return [Stage(0, list(range(len(self.tasks))))]
        return [Stage(i, [i]) for i in range(len(self.tasks))]

    def encode(self, examples: Sequence[Any], task_index: int) -> list[dict[str, Any]]:
        """Features of ``examples``, each tagged with its task index."""
        return [{**f, "task": task_index} for f in self.task.encode(examples)]

    def collate(self, features: Sequence[dict[str, Any]]) -> dict[str, Tensor]:
        batch = self.task.collate(features)
        batch[TASK_KEY] = torch.tensor([f["task"] for f in features], dtype=torch.long)
        return batch

    def batches(self, features: list[dict[str, Any]], stage: Stage) -> Batches:
        """Shuffled batches of ``features`` for ``stage`` (seeded by the stage)."""
        return Batches(features, self.collate, batch_size=self.train_config.batch_size, seed=self.seed(stage))

    def seed(self, stage: Stage) -> int:
        return self.train_config.seed + stage.index

    def stage_features(self, stage: Stage) -> list[dict[str, Any]]:
        return [f for t in stage.tasks for f in self.encode(self.tasks[t].train, t)]

    def prepare(self, stage: Stage) -> None:
        """Seed the stage and let the strategy set up its structure (also used on resume)."""
        seed_everything(self.seed(stage))
        self.strategy.prepare(self, stage)

    def train_stage(self, stage: Stage) -> dict[str, Any]:
        """Train ``stage`` (after :meth:`prepare`); returns its time and steps."""
        start = time.perf_counter()
        batches = self.strategy.batches(self, stage, self.stage_features(stage))
        config = sized_steps(self.train_config, batches=len(batches), epochs=self.epochs)  # type: ignore[arg-type]
        objective = self.objective(stage)
        trainer = Trainer(self.model, objective, batches, config=config, num_targets=self.task.num_targets)
        state = trainer.fit()
        if state.interrupted:
            raise KeyboardInterrupt(state.stopped_by)
        self.model.eval()
        self.strategy.finish(self, stage)
        return {"steps": state.step, "train_time_s": round(time.perf_counter() - start, 2)}

    def objective(self, stage: Stage) -> Callable[[nn.Module, dict[str, Tensor]], ObjectiveOutput]:
        """The loss the loop trains ``stage`` with: the task loss plus the strategy's penalty."""
        return ContinualObjective(self, self.strategy.train_classes(self, stage, self.train_masks(stage)))

    def log_likelihood(self, model: nn.Module, batch: dict[str, Tensor], stage: Stage) -> Tensor:
        """The summed log-likelihood of the batch's labels among the classes ``stage`` trains
        (EWC's Fisher reads its gradient)."""
        out = model(batch["input_ids"], **model_inputs(batch, "attention_mask", "token_type_ids"))
        allowed = self.strategy.train_classes(self, stage, self.train_masks(stage)).to(out.logits.device)
        logits = out.logits.float().masked_fill(~allowed[batch[TASK_KEY]], float("-inf"))
        return -F.cross_entropy(logits, batch["labels"], reduction="sum")

    # ---- class masks -------------------------------------------------------------------------

    def classes_of(self, tasks: Sequence[int]) -> list[int]:
        return sorted({c for t in tasks for c in self.tasks[t].classes})

    def mask(self, classes: Sequence[int] | None) -> Tensor:
        """(C,) bool: True for the allowed classes (None: all)."""
        allowed = torch.zeros(self.num_classes, dtype=torch.bool)
        allowed[list(range(self.num_classes)) if classes is None else list(classes)] = True
        return allowed

    def train_masks(self, stage: Stage) -> Tensor:
        """(tasks, C) bool: the classes the loss spans for an example of each task in ``stage``
        (task-incremental: its own task's; class-incremental: every class seen so far)."""
        rows = []
        for t in range(len(self.tasks)):
            if self.scenario == "task":
                rows.append(self.mask(self.tasks[t].classes))
            elif self.scenario == "class":
                rows.append(self.mask(self.classes_of(range(max(stage.last, t) + 1))))
            else:
                rows.append(self.mask(None))
        return torch.stack(rows)

    def own_task_masks(self) -> Tensor:
        """(tasks, C) bool: each task's own classes (a per-task expert's label space)."""
        return torch.stack([self.mask(split.classes) for split in self.tasks])

    def eval_mask(self, task: int, after: int) -> Tensor:
        """The classes an example of ``task`` is scored among after training task ``after``."""
        if self.scenario == "task":
            return self.mask(self.tasks[task].classes)
        if self.scenario == "class":
            return self.mask(self.classes_of(range(max(after, task) + 1)))
        return self.mask(None)

    def previous_classes(self, stage: Stage) -> Tensor:
        """(C,) bool: the classes learned before ``stage`` (all, for domain-incremental)."""
        if self.scenario == "domain":
            return self.mask(None)
        return self.mask(self.classes_of(range(stage.tasks[0])))

    # ---- evaluation --------------------------------------------------------------------------

    def masked_logits(
        self, model: nn.Module, features: list[dict[str, Any]], task: int, after: int
    ) -> Tensor:
        """(N, C) logits of ``model``, the classes outside the scenario's allowed set at -inf."""
        logits = self.task.logits(model, features, batch_size=self.eval_batch_size)
        return logits.masked_fill(~self.eval_mask(task, after), float("-inf"))

    def evaluate(self, after: int) -> list[float]:
        """Accuracy on every task's test split after training task ``after`` (-1: untrained)."""
        row = []
        for index, features in enumerate(self._test_features):
            logits = self.strategy.logits(self, features, index, after)
            gold = torch.tensor([f["label"] for f in features])
            row.append(float((logits.argmax(-1) == gold).float().mean()))
        return row

    # ---- the whole sequence, and the state between stages --------------------------------------

    def run(self, *, log: Callable[[str], None] = lambda line: None) -> SequenceResult:
        """Evaluate the untrained model, then train and evaluate every stage in turn."""
        result = SequenceResult(initial=self.evaluate(-1))
        for stage in self.stages():
            self.prepare(stage)
            info = self.train_stage(stage)
            result.rows.append(self.evaluate(stage.last))
            result.stages.append(info)
            log(f"stage {stage.index}: {info['steps']} steps, accuracies {format_row(result.rows[-1])}")
        return result

    def general(self) -> float | None:
        """A general ability watched beside R (a generative sequence's probe perplexity); None here."""
        return None

    def restore(self, done: int, model_state: dict[str, Tensor], strategy_state: dict[str, Any]) -> None:
        """Rebuild the structure of the first ``done`` stages (adapters), then load their weights
        and the strategy's state: the learner stands where it stood after stage ``done - 1``."""
        for stage in self.stages()[:done]:
            self.prepare(stage)
        self.model.load_state_dict(model_state, strict=True)
        self.strategy.load_state_dict(strategy_state)
        self.model.eval()


@dataclass
class SequenceResult:
    """The accuracy matrix's rows (one per stage), the untrained model's row, time per stage."""

    initial: list[float]
    rows: list[list[float]] = field(default_factory=list)
    stages: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Average accuracy, BWT, FWT, forgetting (only the average for a single joint stage)."""
        if len(self.rows) == len(self.initial):
            return summarize(self.rows, self.initial).to_dict()
        final = self.rows[-1]
        return {
            "average_accuracy": sum(final) / len(final),
            "bwt": None,
            "fwt": None,
            "forgetting": None,
            "curve": [sum(final) / len(final)],
        }


def format_row(row: Sequence[float]) -> str:
    return " ".join(f"{100 * value:.1f}" for value in row)


class ContinualObjective:
    """The classification loss over each example's allowed classes, plus the strategy's penalty.

    ``loss_sum`` is the summed cross-entropy plus ``penalty × targets``, so the loop's
    normalization by the number of targets gives mean cross-entropy + penalty.
    """

    def __init__(self, learner: Learner, masks: Tensor) -> None:
        self.learner, self.masks = learner, masks

    def __call__(self, model: nn.Module, batch: dict[str, Tensor]) -> ObjectiveOutput:
        out = model(batch["input_ids"], **model_inputs(batch, "attention_mask", "token_type_ids"))
        logits = out.logits.float()  # (B, C)
        allowed = self.masks.to(logits.device)[batch[TASK_KEY]]  # (B, C)
        labels = batch["labels"]
        counted = labels != UNLABELED
        masked = logits.masked_fill(~allowed, float("-inf"))
        loss_sum = F.cross_entropy(masked[counted], labels[counted], reduction="sum")
        targets = counted.sum()
        metrics = {"loss": float(loss_sum.detach()) / max(int(targets), 1)}
        extra = self.learner.strategy.penalty(self.learner, model, batch, logits)
        if extra is not None:
            metrics["penalty"] = float(extra.detach())
            loss_sum = loss_sum + extra * targets
        return ObjectiveOutput(loss_sum=loss_sum, num_targets=targets, metrics=metrics)
