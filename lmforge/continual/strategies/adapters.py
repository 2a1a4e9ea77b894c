"""``adapters``: one PEFT adapter per task on a frozen base (progressive, parameter-isolated
learning in the line of Rusu et al. 2016 and the per-task LoRA of the CL-for-LLMs work).

Each task adds a named adapter (with its own copy of the task head) through
:func:`lmforge.peft.apply`, which makes that adapter, and only it, trainable: the earlier adapters
and the base stay bit-identical, so with the task id known at test time (task-incremental) old
tasks cannot be forgotten (BWT = 0 exactly).

Without the task id (class- and domain-incremental) a routing rule picks the adapter:

- ``prototype`` (default): after each task, the mean of the frozen base model's pooled features
  of each of its classes' training examples is kept (class prototypes, the nearest-class-mean
  classifier of iCaRL, Rebuffi et al. 2017); a test example goes to the adapter of the task that
  owns the nearest class prototype by cosine similarity. A task of 15 intents is a loose cloud in
  feature space, its intents tight ones: the nearest class mean finds the right task far more
  often than the nearest task mean.
- ``task_mean``: one prototype per task, the mean over all its training examples (cheaper, and
  coarser: an example near the border of two domains goes to the wrong one more often).
- ``confidence``: each adapter scores the example among its own task's classes (all classes for
  domain-incremental), and the adapter with the highest top softmax probability answers (simple,
  but an expert is often confidently wrong on another task's inputs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ... import peft as peft_lib
from ...objectives.base import model_inputs
from ...tasks.base import eval_order, model_device, to_device
from .base import Strategy, StrategyOptions, register_strategy

if TYPE_CHECKING:
    from ..learner import Learner, Stage

ROUTING = ("prototype", "task_mean", "confidence")
PROTOTYPE_SAMPLES = 256  # training examples per class (prototype) or per task (task_mean) averaged


def adapter_name(task: int) -> str:
    return f"task{task}"


@dataclass
class AdaptersOptions(StrategyOptions):
    routing: str = "prototype"  # without a task id: prototype (nearest class mean), task_mean or confidence

    def __post_init__(self) -> None:
        if self.routing not in ROUTING:
            raise ValueError(f"routing '{self.routing}': one of {', '.join(ROUTING)}")


class PerTaskAdapters(Strategy):
    """A new adapter per task, frozen after it; task-id routing, or routing by confidence."""

    Options = AdaptersOptions
    name = "adapters"
    methods = "peft"
    why = "it trains one adapter per task on a frozen base model"
    owns_adapters = True

    def __init__(self, options: AdaptersOptions) -> None:
        super().__init__(options)
        # (task, class) -> the mean pooled base feature of the class's training examples (unit
        # length); with task_mean routing, (task, -1) -> the task's mean
        self.prototypes: dict[tuple[int, int], Tensor] = {}

    def prepare(self, learner: Learner, stage: Stage) -> None:
        peft_lib.apply(
            learner.model,
            learner.method,
            adapter_name=adapter_name(stage.index),
            tokenizer=learner.task.tokenizer,
            **learner.peft,
        )

    def finish(self, learner: Learner, stage: Stage) -> None:
        for t in stage.tasks:
            examples = learner.tasks[t].train
            if self.options.routing == "task_mean":
                features = learner.encode(examples[:PROTOTYPE_SAMPLES], t)
                self.prototypes[(t, -1)] = F.normalize(base_features(learner, features).mean(0), dim=0)
                continue
            by_class: dict[int, list[Any]] = {}
            for example in examples:
                rows = by_class.setdefault(learner.task.label_index(example.label), [])
                if len(rows) < PROTOTYPE_SAMPLES:
                    rows.append(example)
            for label, rows in sorted(by_class.items()):
                vectors = F.normalize(base_features(learner, learner.encode(rows, t)), dim=-1)
                self.prototypes[(t, label)] = F.normalize(vectors.mean(0), dim=0)

    def state_dict(self) -> dict[str, Any]:
        return {f"prototype.{t}.{c}": v for (t, c), v in self.prototypes.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.prototypes = {}
        for key, value in state.items():
            parts = key.split(".")
            if parts[0] == "prototype":  # prototype.T.C (prototype.T: a task mean, saved before class means)
                self.prototypes[(int(parts[1]), int(parts[2]) if len(parts) > 2 else -1)] = value

    def train_classes(self, learner: Learner, stage: Stage, masks: Tensor) -> Tensor:
        # each adapter is an expert of its own task: its head learns that task's classes
        return learner.own_task_masks() if learner.scenario == "class" else masks

    def logits(self, learner: Learner, features: list[dict[str, Any]], task: int, after: int) -> Tensor:
        model = learner.model
        names = [n for n in (adapter_name(i) for i in range(after + 1)) if n in peft_lib.peft_configs(model)]
        if not names:
            with peft_lib.disable_adapters(model):
                return learner.masked_logits(model, features, task, after)
        current = peft_lib.active_adapter(model)
        try:
            if learner.scenario == "task":
                peft_lib.set_adapter(model, adapter_name(min(task, after)))
                return learner.masked_logits(model, features, task, after)
            if self.options.routing in ("prototype", "task_mean"):
                return self.nearest(learner, features, task, after, names)
            return self.route(learner, features, task, after, names)
        finally:
            peft_lib.set_adapter(model, current)

    def nearest(
        self, learner: Learner, features: list[dict[str, Any]], task: int, after: int, names: list[str]
    ) -> Tensor:
        """Each example's logits from the adapter of the task that owns the nearest prototype."""
        tasks = [int(n[len("task") :]) for n in names]
        keys = [key for key in self.prototypes if key[0] in tasks]
        prototypes = torch.stack([self.prototypes[key] for key in keys])  # (P, E)
        nearest = (F.normalize(base_features(learner, features), dim=-1) @ prototypes.T).argmax(-1)  # (N,)
        chosen = torch.tensor([tasks.index(keys[i][0]) for i in nearest.tolist()], dtype=torch.long)
        out = torch.full((len(features), learner.num_classes), float("-inf"))
        allowed = learner.eval_mask(task, after)
        for k, name in enumerate(names):
            rows = (chosen == k).nonzero().flatten().tolist()
            if not rows:
                continue
            peft_lib.set_adapter(learner.model, name)
            logits = learner.task.logits(
                learner.model, [features[i] for i in rows], batch_size=learner.eval_batch_size
            )
            own = (
                learner.mask(learner.tasks[tasks[k]].classes) & allowed
                if learner.scenario == "class"
                else allowed
            )
            out[rows] = logits.masked_fill(~own, float("-inf"))
        return out

    def route(
        self, learner: Learner, features: list[dict[str, Any]], task: int, after: int, names: list[str]
    ) -> Tensor:
        """Each example's logits from its most confident adapter."""
        best_logits: Tensor | None = None
        best_confidence: Tensor | None = None
        allowed = learner.eval_mask(task, after)
        for index, name in enumerate(names):
            peft_lib.set_adapter(learner.model, name)
            logits = learner.task.logits(learner.model, features, batch_size=learner.eval_batch_size)
            own = (
                learner.mask(learner.tasks[index].classes) & allowed
                if learner.scenario == "class"
                else allowed
            )
            logits = logits.masked_fill(~own, float("-inf"))
            confidence = logits.softmax(-1).max(-1).values  # (N,)
            if best_logits is None or best_confidence is None:
                best_logits, best_confidence = logits, confidence
                continue
            better = confidence > best_confidence
            best_logits = torch.where(better[:, None], logits, best_logits)
            best_confidence = torch.maximum(confidence, best_confidence)
        assert best_logits is not None
        return best_logits


@torch.no_grad()
def base_features(learner: Learner, features: list[dict[str, Any]]) -> Tensor:
    """(N, E) mean-pooled last hidden states of the base model (adapters off), in order."""
    model = learner.model
    out = torch.empty(len(features), model.config.embed_dim)
    with peft_lib.disable_adapters(model):
        was_training = model.training
        model.eval()
        try:
            for index in eval_order([f["length"] for f in features], learner.eval_batch_size):
                batch = to_device(learner.task.collate([features[i] for i in index]), model_device(model))
                hidden = model(
                    batch["input_ids"], **model_inputs(batch, "attention_mask", "token_type_ids")
                ).hidden_states
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
                out[index] = ((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).float().cpu()
        finally:
            model.train(was_training)
    return out


register_strategy(
    PerTaskAdapters, "one adapter per task, frozen after it; routing by task id, nearest class prototype or confidence"
)
