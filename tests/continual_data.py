"""A tiny synthetic continual-learning sequence the continual tests share: three tasks of two
classes each, every class marked by its own cue word among random filler words."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from lmforge import ModelConfig, Transformer
from lmforge.continual import TaskSplit
from lmforge.pipeline.finetuning import Base, build_task, examples_of, fit_head
from lmforge.tasks.classification import ClassificationTask
from lmforge.tokenizers import Tokenizer
from lmforge.training import TrainConfig

FILLER = ["the", "a", "it", "was", "very", "and", "so", "then"]
TASKS = {  # task name -> cue word -> class
    "fruit": {"apple": "apple_class", "banana": "banana_class"},
    "pets": {"cat": "cat_class", "dog": "dog_class"},
    "colors": {"red": "red_class", "blue": "blue_class"},
}
LABELS = [label for cues in TASKS.values() for label in cues.values()]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread (and do not fight the other tests for cores); the
    continual test modules import this fixture."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_tokenizer() -> Tokenizer:
    words = FILLER + [cue for cues in TASKS.values() for cue in cues]
    return Tokenizer.train(iter([" ".join(words)] * 10), kind="wordpiece", vocab_size=60, show_progress=False)


def records(cues: dict[str, str], n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        cue = rng.choice(sorted(cues))
        words = rng.sample(FILLER, 3) + [cue]
        rng.shuffle(words)
        out.append({"text": " ".join(words), "label": cues[cue]})
    return out


def setup(
    tokenizer: Tokenizer, *, train: int = 96, test: int = 40
) -> tuple[Any, ClassificationTask, list[TaskSplit]]:
    """A fresh tiny encoder with a head over the six classes, the task, and the three splits."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny-encoder", vocab_size=tokenizer.vocab_size, dropout=0.0))
    base = Base(model, tokenizer)
    task = build_task("classification", base, options={"max_length": 16})
    task.set_labels(LABELS, "the test's label list")
    model = fit_head(base, task)
    splits = [
        TaskSplit(
            name,
            examples_of(task, records(cues, train, 10 * i), training=True),
            examples_of(task, records(cues, test, 10 * i + 1)),
        )
        for i, (name, cues) in enumerate(TASKS.items())
    ]
    return model, task, splits


def fast(**changes: Any) -> TrainConfig:
    values = dict(
        max_steps=30,
        batch_size=16,
        lr=3e-3,
        warmup_steps=2,
        eval_every=0,
        save_every=0,
        progress=False,
        seed=0,
        device="cpu",
        log_every=1000,
    )
    return TrainConfig(**{**values, **changes})
