"""Continual learning from files: a sequence file → every strategy it names → the accuracy
matrices, the metrics table and heatmaps (what ``lmforge continual`` calls).

    OUT/sequence.json              the resolved sequence (a resume must match it)
    OUT/<strategy>/progress.json   the rows of R so far and the stage the saved state is after
    OUT/<strategy>/stage-K/        model.safetensors + strategy.safetensors + strategy.json
    OUT/<strategy>/result.json     when the strategy has finished the sequence
    OUT/results.{md,csv,json}, OUT/R_<strategy>.png

Resumable between tasks: the state after each finished task is written (atomically, in a new
stage folder) before ``progress.json`` names it, so a killed run continues from the last finished
task and, each stage being seeded alike, fills the same matrix as an uninterrupted one.
"""

from __future__ import annotations

import copy
import json
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..continual.generative import GenerativeLearner
from ..continual.learner import Learner, SequenceResult, TaskSplit, format_row
from ..continual.report import write_tables
from ..continual.sequence import SFT, SequenceSpec, select_strategies, strategy_setup
from ..continual.strategies import make_strategy
from ..errors import LMForgeError, did_you_mean
from ..files import TIED_KEY, atomic_write_json, check_output, read_weights, save_tensors, save_weights
from ..tasks.classification import ClassificationTask
from ..tasks.data import LABELS_FILE, read_label_file
from ..tasks.sft import SFTTask
from ..training import seed_everything
from .common import Log, silent
from .finetuning import Base, DataSpec, build_task, fit_head, load_base, read_examples

SEQUENCE_FILE = "sequence.json"
PROGRESS_FILE = "progress.json"
RESULT_FILE = "result.json"


@dataclass
class ContinualResult:
    """Every finished strategy's result (as in results.json), and whether a signal stopped the run."""

    results: list[dict[str, Any]] = field(default_factory=list)
    interrupted: bool = False
    files: list[Path] = field(default_factory=list)


def run_sequence(
    spec: SequenceSpec,
    *,
    out: str | Path,
    strategies: list[str] | None = None,
    resume: bool = False,
    log: Log = silent,
) -> ContinualResult:
    """Run ``strategies`` (default: all the file names) over the sequence and write the results.

    Raises:
        LMForgeError: a bad path, label or option; an occupied ``out`` without ``resume``; a
            resume whose sequence differs from the one the run started with.
    """
    out = Path(out)
    names = select_strategies(spec, strategies)
    check_output(out, resume=resume, hint="add --resume to continue it")
    described = spec.to_dict()
    saved = out / SEQUENCE_FILE
    if resume and saved.is_file() and json.loads(saved.read_text(encoding="utf-8")) != described:
        raise LMForgeError("the sequence changed since this run started: use a new --out", file=saved)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(saved, described)
    assert spec.model is not None  # read_sequence requires one
    base = load_base(spec.model)
    if spec.task == SFT:
        task: Any = load_generative(spec, base)
        splits = task.splits
        log(f"{len(splits)} tasks, a generative sequence (answers as text); method {spec.method}")
    else:
        task, splits = load_splits(spec, base)
        log(f"{len(splits)} tasks, {spec.scenario}-incremental, {len(task.labels)} labels; method {spec.method}")
    for split in splits:
        log(f"  {split.name}: {len(split.train):,} training / {len(split.test):,} test examples")
    result = ContinualResult()
    try:
        for name in names:
            result.results.append(run_strategy(spec, name, base, task, splits, out / name, log=log))
    except KeyboardInterrupt:
        result.interrupted = True
    finished = [
        json.loads((out / n / RESULT_FILE).read_text())
        for n in spec.strategies
        if (out / n / RESULT_FILE).is_file()
    ]
    if finished:
        kind = "a generative sequence" if spec.task == SFT else f"{spec.scenario}-incremental"
        result.files = write_tables(out, finished, title=f"{kind}, {len(splits)} tasks, method {spec.method}")
    return result


def run_strategy(
    spec: SequenceSpec,
    name: str,
    base: Base,
    task: ClassificationTask | GenerativeTasks,
    splits: list[TaskSplit],
    folder: Path,
    *,
    log: Log,
) -> dict[str, Any]:
    """One strategy over the sequence, continuing from its saved progress if any."""
    if (folder / RESULT_FILE).is_file():
        log(f"{name}: finished earlier ({folder / RESULT_FILE})")
        return json.loads((folder / RESULT_FILE).read_text(encoding="utf-8"))
    start = time.perf_counter()
    seed_everything(spec.train.seed)
    setup = strategy_setup(spec, name)
    method, options = setup.method, setup.options
    learner = make_learner(spec, base, task, splits, setup, make_strategy(name, options, method=method))
    progress = read_progress(folder)
    if progress is None:
        progress = {
            "done": 0,
            "initial": learner.evaluate(-1),
            "general": [learner.general()],
            "rows": [],
            "stages": [],
            "elapsed_s": 0.0,
        }
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(folder / PROGRESS_FILE, progress)
    else:
        model_state, strategy_state = read_state(folder / f"stage-{progress['done'] - 1}")
        learner.restore(progress["done"], model_state, strategy_state)
        log(f"{name}: resumed after stage {progress['done']} of {len(learner.stages())}")
    stages = learner.stages()
    for stage in stages[progress["done"] :]:
        learner.prepare(stage)
        info = learner.train_stage(stage)
        row = learner.evaluate(stage.last)
        progress["general"].append(learner.general())
        what = "all tasks" if len(stage.tasks) > 1 else splits[stage.last].name
        watched = f"; general perplexity {progress['general'][-1]:.2f}" if progress["general"][-1] else ""
        log(
            f"{name}: stage {stage.index + 1}/{len(stages)} ({what}): {info['steps']} steps, "
            f"{info['train_time_s']:.0f} s; {'score' if spec.task == SFT else 'accuracy'} % {format_row(row)}{watched}"
        )
        write_state(folder / f"stage-{stage.index}", learner)
        progress["rows"].append(row)
        progress["stages"].append(info)
        progress["done"] = stage.index + 1
        progress["elapsed_s"] += time.perf_counter() - start
        start = time.perf_counter()
        atomic_write_json(folder / PROGRESS_FILE, progress)
        shutil.rmtree(folder / f"stage-{stage.index - 1}", ignore_errors=True)
    result = {
        "strategy": name,
        "options": options,
        "scenario": spec.scenario,
        "method": method,
        "tasks": [s.name for s in splits],
        "metrics": [e.metric for e in spec.tasks] if spec.task == SFT else ["accuracy"] * len(splits),
        "initial": progress["initial"],
        "rows": progress["rows"],
        "general": progress["general"] if any(v is not None for v in progress["general"]) else None,
        "stages": progress["stages"],
        "wall_time_s": round(progress["elapsed_s"] + time.perf_counter() - start, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    result["summary"] = summary_of(result)
    atomic_write_json(folder / RESULT_FILE, result)
    measure = "score" if spec.task == SFT else "accuracy"
    log(f"{name}: average {measure} {100 * result['summary']['average_accuracy']:.1f}%")
    return result


def make_learner(
    spec: SequenceSpec, base: Base, task: Any, splits: list[TaskSplit], setup: Any, strategy: Any
) -> Learner:
    """A fresh copy of the base model in a learner for one strategy (the task's head fitted)."""
    common = {
        "strategy": strategy,
        "method": setup.method,
        "peft": setup.peft,
        "train": setup.train,
        "epochs": spec.epochs,
        "eval_batch_size": spec.eval_batch_size,
    }
    if spec.task == SFT:
        model = fit_head(Base(copy.deepcopy(base.model), base.tokenizer, base.source), task.tasks[0])
        return GenerativeLearner(
            model,
            task.tasks,
            copy.deepcopy(splits),
            metrics=[e.metric for e in spec.tasks],
            probe_windows=spec.probe_windows,
            **common,
        )
    model = fit_head(Base(copy.deepcopy(base.model), base.tokenizer, base.source), task)
    return Learner(model, task, copy.deepcopy(splits), scenario=str(spec.scenario), **common)


def summary_of(result: dict[str, Any]) -> dict[str, Any]:
    return SequenceResult(result["initial"], result["rows"]).summary()


def read_progress(folder: Path) -> dict[str, Any] | None:
    path = folder / PROGRESS_FILE
    if not path.is_file():
        return None
    progress = json.loads(path.read_text(encoding="utf-8"))
    return progress if progress.get("done") else None


def write_state(folder: Path, learner: Learner) -> None:
    """The model's weights and the strategy's state after a stage (tensors apart from the rest)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_weights(learner.model, folder / "model.safetensors")  # a tied head stored once
    state = learner.strategy.state_dict()
    tensors = {k: v for k, v in state.items() if isinstance(v, Tensor)}
    save_tensors(tensors or {"_empty": torch.zeros(0)}, folder / "strategy.safetensors")
    atomic_write_json(folder / "strategy.json", {k: v for k, v in state.items() if not isinstance(v, Tensor)})


def read_state(folder: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    model_state, metadata = read_weights(folder / "model.safetensors")
    for alias, source in json.loads(metadata.get(TIED_KEY, "{}")).items():
        model_state[alias] = model_state[source]
    tensors, _ = read_weights(folder / "strategy.safetensors")
    tensors.pop("_empty", None)
    rest = json.loads((folder / "strategy.json").read_text(encoding="utf-8"))
    return model_state, {**rest, **tensors}


def load_splits(spec: SequenceSpec, base: Base) -> tuple[ClassificationTask, list[TaskSplit]]:
    """The classification task (label set from the labels file) and each task's examples,
    restricted to its classes and subsampled per class as the spec says."""
    labels = spec.labels or (spec.tasks[0].data / LABELS_FILE)
    if not labels.is_file():
        raise LMForgeError("no labels file: give labels: in the sequence file", file=labels, key="labels")
    task = build_task("classification", base, options=spec.options, labels_file=labels)
    if not isinstance(task, ClassificationTask):
        raise LMForgeError("continual learning runs classification tasks", key="task")
    cache: dict[tuple[Path, str], list[Any]] = {}
    splits = []
    for index, entry in enumerate(spec.tasks):
        data = DataSpec(path=entry.data, columns=entry.columns)
        parts = []
        for split, limit in (("train", spec.max_train_per_class), (spec.test_split, spec.max_test_per_class)):
            key = (entry.data, split)
            if key not in cache:
                cache[key] = read_examples(task, data, split, training=split == "train")
            chosen = of_classes(task, cache[key], entry.classes, where=f"tasks[{index}].classes")
            parts.append(per_class(task, chosen, limit, seed=spec.train.seed + index))
        splits.append(TaskSplit(entry.name, parts[0], parts[1]))
    return task, splits


@dataclass
class GenerativeTasks:
    """A generative sequence's SFT task per entry and each one's examples."""

    tasks: list[SFTTask]
    splits: list[TaskSplit]


def load_generative(spec: SequenceSpec, base: Base) -> GenerativeTasks:
    """Each entry's SFT task (the sequence's options under its own) and its training and test
    examples, restricted to its classes (answers) and subsampled as the spec says. When the
    answer is a classification folder's label column (``columns: {target: label}``), its integer
    labels become their names (labels.txt): the answer a model learns to give."""
    tasks, splits = [], []
    for index, entry in enumerate(spec.tasks):
        task = build_task("sft", base, options={**spec.options, **entry.options}, columns=entry.columns)
        assert isinstance(task, SFTTask)
        data = DataSpec(path=entry.data, columns=entry.columns)
        labels_file = data.labels_file() if entry.columns.get("target") == "label" else None
        names = read_label_file(labels_file) if labels_file is not None else None  # answers by name
        for wanted in entry.classes or []:
            if names is not None and wanted not in names:
                raise LMForgeError(
                    f"label '{wanted}' is not in {labels_file}" + did_you_mean(wanted, names),
                    key=f"tasks[{index}].classes",
                )
        parts = []
        for split, limit in (("train", spec.max_train), (entry.test_split or spec.test_split, spec.max_test)):
            examples = [named(e, names) for e in read_examples(task, data, split, training=split == "train")]
            examples = [e for e in examples if e.response is not None]
            if entry.classes is not None:
                examples = [e for e in examples if e.response in set(entry.classes)]
            if not examples:
                raise LMForgeError(f"task {entry.name} has no {split} examples", key=f"tasks[{index}]")
            parts.append(subsample(examples, limit, seed=spec.train.seed + index))
        tasks.append(task)
        splits.append(TaskSplit(entry.name, parts[0], parts[1]))
    return GenerativeTasks(tasks, splits)


def named(example: Any, names: list[str] | None) -> Any:
    """``example`` with an integer answer replaced by that label's name (-1, unlabeled: none)."""
    answer = example.response
    if names is None or answer is None or not answer.lstrip("-").isdigit():
        return example
    index = int(answer)
    example.response = names[index] if 0 <= index < len(names) else None
    return example


def subsample(examples: list[Any], limit: int | None, *, seed: int) -> list[Any]:
    """At most ``limit`` of ``examples`` (a seeded choice, file order kept); all if None."""
    if limit is None or len(examples) <= limit:
        return examples
    keep = sorted(np.random.default_rng(seed).permutation(len(examples))[:limit].tolist())
    return [examples[i] for i in keep]


def of_classes(
    task: ClassificationTask, examples: list[Any], classes: list[str] | None, *, where: str
) -> list[Any]:
    if classes is None:
        return [e for e in examples if e.label is not None]
    known = set(task.labels)
    for name in classes:
        if name not in known:
            raise LMForgeError(
                f"label '{name}' is not in the label set" + did_you_mean(name, known), key=where
            )
    wanted = set(classes)
    return [e for e in examples if e.label is not None and task.labels[task.label_index(e.label)] in wanted]


def per_class(task: ClassificationTask, examples: list[Any], limit: int | None, *, seed: int) -> list[Any]:
    """At most ``limit`` examples of each class (a seeded choice, order kept); all if None."""
    if limit is None:
        return examples
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[int]] = {}
    for i, example in enumerate(examples):
        by_class.setdefault(task.label_index(example.label), []).append(i)
    keep = set()
    for indices in by_class.values():
        keep.update(rng.permutation(indices)[:limit].tolist() if len(indices) > limit else indices)
    return [examples[i] for i in sorted(keep)]
