"""The sequence file: a YAML description of a continual-learning run.

    model: path/to/base                 # a run directory, a Hugging Face folder or a GGUF file
    task: classification                # or sft: a generative sequence, each task answered as text
    scenario: class                     # task | class | domain (incremental; classification only)
    method: full                        # or a PEFT method, with its options under peft:
    peft: {r: 8, target_modules: all-linear}
    options: {max_length: 32}           # the classification task's options
    labels: path/labels.txt             # the label names (default: the first task's labels.txt)
    train: {lr: 5e-5, batch_size: 32}   # the loop's settings for every task
    epochs: 1                           # passes over each task's training data
    max_train_per_class: 40             # optional subsampling (seeded), for CPU-sized runs
    max_test_per_class: 20
    strategies:                         # each is run on the whole sequence, in this order
      naive: {}
      replay: {memory_fraction: 0.02}
      olora: {method: lora, peft: {r: 8}, train: {lr: 1.0e-3}}   # a strategy's own method and loop
    tasks:                              # in order; a data folder each, optionally only some classes
      - {name: banking, data: ../data/clinc150, classes: [transfer, balance]}
    domains: {file: domains.json, data: ../data/clinc150, take: 10}   # or: one task per domain
    quick: {max_train_per_class: 8, max_test_per_class: 5, epochs: 1, tasks: 3}   # what --quick uses

A generative sequence (``task: sft``) gives each task its own SFT options (template, system
prompt, answer length), its metric and its test split; with ``columns: {target: label}`` a
classification folder's integer labels become their names from its labels.txt, so the answer to
learn is the label word::

    task: sft
    method: lora
    options: {chat: true, max_length: 96}          # shared by every task
    max_train: 400                                 # rows per task (seeded choice); max_test alike
    probe_windows: 16                              # a general ability watched: perplexity of English text
    tasks:
      - {name: sst2, data: ../data/sst2, columns: {target: label}, test_split: validation,
         options: {template: "Positive or negative? {text}", max_target_length: 4}}
      - {name: fr, data: ../data/tatoeba_en_fr, metric: chrf, test_split: validation,
         options: {template: "Translate into French: {source}", max_target_length: 32}}

Relative paths are relative to the current directory, as in every lmforge recipe. Every mistake is one line naming the file,
the line and the key.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import peft as peft_lib
from ..errors import LMForgeError, did_you_mean
from ..settings import LineMap, dataclass_from_dict, dataclass_to_dict, dataclass_update, load_yaml
from ..training.config import TrainConfig
from .generative import GENERATIVE, METRICS
from .learner import SCENARIOS
from .strategies import make_strategy

SFT = "sft"
TASK_KINDS = ("classification", SFT)

DEFAULT_TRAIN = TrainConfig(
    max_steps=100,
    batch_size=32,
    lr=5e-5,
    warmup_steps=10,
    weight_decay=0.01,
    beta2=0.999,
    eval_every=0,
    save_every=0,
    log_every=1000,
    progress=False,
    seed=0,
)


@dataclass
class TaskEntry:
    """One task of the sequence: a data folder, optionally restricted to some classes."""

    name: str
    data: Path
    classes: list[str] | None = None  # keep only the rows of these labels (None: every row)
    columns: dict[str, str] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)  # sft: this task's own options (template, ...)
    metric: str = "exact"  # sft: exact (match of the answer) or chrf (translation)
    test_split: str | None = None  # this task's test split (None: the sequence's test_split)


@dataclass
class Quick:
    """The smaller version ``--quick`` runs."""

    max_train_per_class: int = 8
    max_test_per_class: int = 5
    epochs: float = 1.0
    tasks: int | None = None  # keep only the first N tasks
    max_train: int | None = 16  # sft: rows per task
    max_test: int | None = 8


@dataclass
class SequenceSpec:
    """A whole continual-learning run, as the sequence file describes it."""

    model: Path | None  # the base model (or --model)
    tasks: list[TaskEntry]
    task: str = "classification"  # classification, or sft (a generative sequence)
    scenario: str | None = None  # classification: task, class (default) or domain; sft: generative
    method: str = "full"
    peft: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    labels: Path | None = None
    strategies: dict[str, dict[str, Any]] = field(default_factory=lambda: {"naive": {}})
    train: TrainConfig = field(default_factory=lambda: DEFAULT_TRAIN)
    epochs: float | None = 1.0
    max_train_per_class: int | None = None
    max_test_per_class: int | None = None
    max_train: int | None = None  # at most this many training rows per task (a seeded choice)
    max_test: int | None = None  # at most this many test rows per task
    probe_windows: int = 0  # sft: windows of English text whose perplexity is watched (0: none)
    test_split: str = "test"
    eval_batch_size: int = 64
    quick: Quick = field(default_factory=Quick)

    def __post_init__(self) -> None:
        if self.scenario is None:
            self.scenario = GENERATIVE if self.task == SFT else "class"

    def quick_version(self) -> SequenceSpec:
        """The ``--quick`` version: fewer rows per class, fewer epochs (and tasks, if set)."""
        quick = self.quick
        return dataclasses.replace(
            self,
            tasks=self.tasks[: quick.tasks] if quick.tasks else self.tasks,
            max_train_per_class=quick.max_train_per_class,
            max_test_per_class=quick.max_test_per_class,
            max_train=quick.max_train if self.task == SFT else self.max_train,
            max_test=quick.max_test if self.task == SFT else self.max_test,
            probe_windows=min(self.probe_windows, 4),
            epochs=quick.epochs,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe, paths as strings (saved with the results; a resume must match it)."""
        return json.loads(json.dumps(dataclass_to_dict(self), default=str))


TOP_KEYS = {f.name for f in dataclasses.fields(SequenceSpec)} | {"domains"}
TASK_KEYS = {f.name for f in dataclasses.fields(TaskEntry)}


def read_sequence(path: str | Path, *, model: str | Path | None = None) -> SequenceSpec:
    """Parse and check a sequence file (strategies and their options included); ``model``
    overrides the file's ``model:``.

    Raises:
        LMForgeError: one line with the file, line and key of the first mistake.
    """
    path = Path(path)
    raw, lines = load_yaml(path)
    here = path.resolve().parent

    def fail(message: str, key: str) -> LMForgeError:
        return LMForgeError(message, file=path, line=lines.get(key.split("[")[0]), key=key)

    for key in raw:
        if key not in TOP_KEYS:
            raise fail(f"unknown key '{key}'" + did_you_mean(str(key), TOP_KEYS), str(key))
    if model is not None:
        raw["model"] = str(model)
    if raw.get("model") is None:
        raise fail(
            "the sequence needs a model: (or --model: a run directory or a Hugging Face folder)", "model"
        )
    tasks = task_entries(raw, here, fail)
    values = {k: v for k, v in raw.items() if k not in ("tasks", "domains")}
    for key in ("model", "labels"):
        if values.get(key) is not None:
            values[key] = resolve(here, values[key])
    train = raw.get("train") or {}
    if not isinstance(train, dict):
        raise fail("train: must be a mapping of loop settings", "train")
    values["train"] = dataclasses.asdict(DEFAULT_TRAIN) | train
    mappings = {}
    for key in ("peft", "options", "strategies"):  # free-form mappings, checked by their owners
        value = values.pop(key, None)
        if value is not None and not isinstance(value, dict):
            raise fail(f"{key}: must be a mapping", key)
        if value is not None:
            mappings[key] = value
    spec: SequenceSpec = dataclass_from_dict(SequenceSpec, {**values, "tasks": []}, file=path, lines=lines)
    spec.tasks = tasks
    for key, value in mappings.items():
        setattr(spec, key, value)
    check_kind(spec, raw, fail)
    check_strategies(spec, fail)
    return spec


def check_kind(spec: SequenceSpec, raw: dict[str, Any], fail: Any) -> None:
    """The sequence's task kind, its scenario and (sft) each task's metric."""
    if spec.task not in TASK_KINDS:
        raise fail(f"unknown task '{spec.task}' (a sequence's tasks are one of: {', '.join(TASK_KINDS)})", "task")
    if spec.task == SFT:
        if raw.get("scenario") is not None:
            raise fail(
                "scenario: does not apply to an sft sequence (one model answers every task as text)", "scenario"
            )
        for index, entry in enumerate(spec.tasks):
            if entry.metric not in METRICS:
                raise fail(
                    f"unknown metric '{entry.metric}' (metrics: {', '.join(METRICS)})", f"tasks[{index}].metric"
                )
        return
    if spec.scenario not in SCENARIOS:
        raise fail(f"unknown scenario '{spec.scenario}' (scenarios: {', '.join(SCENARIOS)})", "scenario")
    for index, entry in enumerate(spec.tasks):
        if entry.options or entry.metric != "exact":
            raise fail("a task's options: and metric: are for sft sequences (task: sft)", f"tasks[{index}]")


def resolve(here: Path, value: Any) -> Path:
    """A path of the file: relative to the current directory, as in every lmforge recipe."""
    return Path(str(value)).expanduser()


def task_entries(raw: dict[str, Any], here: Path, fail: Any) -> list[TaskEntry]:
    """The tasks, from ``tasks:`` or one per domain of ``domains:``."""
    if ("tasks" in raw) == ("domains" in raw):
        raise fail("give the tasks as tasks: (a list) or domains: (a domains file), one of them", "tasks")
    if "domains" in raw:
        return domain_entries(raw["domains"], here, fail)
    items = raw["tasks"]
    if not isinstance(items, list) or not items:
        raise fail("tasks: must be a non-empty list", "tasks")
    entries = []
    for index, item in enumerate(items):
        key = f"tasks[{index}]"
        if not isinstance(item, dict) or "data" not in item:
            raise fail("each task needs data: (a data folder)", key)
        for name in item:
            if name not in TASK_KEYS:
                raise fail(f"unknown task key '{name}'" + did_you_mean(str(name), TASK_KEYS), f"{key}.{name}")
        for mapping in ("columns", "options"):
            if item.get(mapping) is not None and not isinstance(item[mapping], dict):
                raise fail(f"{mapping}: must be a mapping", f"{key}.{mapping}")
        classes = item.get("classes")
        if classes is not None and (not isinstance(classes, list) or not classes):
            raise fail("classes: must be a non-empty list of label names", f"{key}.classes")
        entries.append(
            TaskEntry(
                name=str(item.get("name", f"task{index}")),
                data=resolve(here, item["data"]),
                classes=[str(c) for c in classes] if classes else None,
                columns={str(k): str(v) for k, v in (item.get("columns") or {}).items()},
                options=dict(item.get("options") or {}),
                metric=str(item.get("metric", "exact")),
                test_split=None if item.get("test_split") is None else str(item["test_split"]),
            )
        )
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise fail("task names must differ", "tasks")
    return entries


def domain_entries(section: Any, here: Path, fail: Any) -> list[TaskEntry]:
    """One task per domain of a domains file (a JSON mapping: domain -> its label names)."""
    if not isinstance(section, dict) or "file" not in section or "data" not in section:
        raise fail(
            "domains: needs file: (a JSON mapping domain -> labels) and data: (the data folder)", "domains"
        )
    file = resolve(here, section["file"])
    try:
        domains = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise fail(f"cannot read the domains file {file}: {err}", "domains.file") from None
    if not isinstance(domains, dict) or not all(isinstance(v, list) and v for v in domains.values()):
        raise fail(f"{file} must map each domain to a list of label names", "domains.file")
    take = section.get("take")
    names = list(domains)[: int(take)] if take else list(domains)
    data = resolve(here, section["data"])
    return [TaskEntry(name=n, data=data, classes=[str(c) for c in domains[n]]) for n in names]


@dataclass
class StrategySetup:
    """How one strategy of the file runs: its method, PEFT options, loop settings and own options."""

    method: str
    peft: dict[str, Any]
    train: TrainConfig
    options: dict[str, Any]


def strategy_setup(spec: SequenceSpec, name: str) -> StrategySetup:
    """Strategy ``name``'s setup: its own ``method:``, ``peft:`` and ``train:`` keys override the
    sequence's (per-task adapters need a PEFT method, and a LoRA its own learning rate, where the
    rest of the comparison fine-tunes fully).

    Raises:
        LMForgeError: a ``peft:`` or ``train:`` that is not a mapping, or a bad loop setting.
    """
    options = dict(spec.strategies.get(name) or {})
    method = str(options.pop("method", spec.method))
    peft = options.pop("peft", None)
    if peft is None:
        peft = spec.peft if method == spec.method else {}
    train = options.pop("train", None) or {}
    for key, value in (("peft", peft), ("train", train)):
        if not isinstance(value, dict):
            raise LMForgeError(f"strategies.{name}.{key} must be a mapping", key=f"strategies.{name}.{key}")
    changed = dataclass_update(spec.train, train, prefix=f"strategies.{name}.train.") if train else spec.train
    return StrategySetup(method, dict(peft), changed, options)


def check_strategies(spec: SequenceSpec, fail: Any) -> None:
    if not spec.strategies:
        raise fail("strategies: name at least one strategy", "strategies")
    for name, options in spec.strategies.items():
        if options is not None and not isinstance(options, dict):
            raise fail(f"the options of strategy {name} must be a mapping (or {{}})", f"strategies.{name}")
        try:
            setup = strategy_setup(spec, name)
            make_strategy(name, setup.options, method=setup.method).check_kind(spec.task)
            if setup.method != "full":
                peft_lib.make_config(setup.method, dict(setup.peft))
        except LMForgeError as err:
            raise fail(err.message, err.key or f"strategies.{name}") from None
        except (TypeError, ValueError) as err:
            raise fail(f"strategy {name}: {err}", f"strategies.{name}") from None


def select_strategies(spec: SequenceSpec, names: list[str] | None, where: LineMap | None = None) -> list[str]:
    """The strategies to run: ``names`` (each must be in the file), or all of the file's."""
    if not names:
        return list(spec.strategies)
    for name in names:
        if name not in spec.strategies:
            raise LMForgeError(
                f"strategy '{name}' is not in the sequence file"
                + did_you_mean(name, spec.strategies)
                + f" (it has: {', '.join(spec.strategies)})",
                key="strategies",
            )
    return names
