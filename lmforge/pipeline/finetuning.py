"""Fine-tuning: a base model, a task and its examples → the one loop → a fine-tuned model.

    Base (model + tokenizer, from a folder or in memory) ──build_task──► Task (options, arch)
    TaskData (train / validation examples, from files or in memory)
    finetune(base, task, data): head fitted to the task ──peft.apply──► Trainer(task objective,
        task batches, validation metric callback) ──► best weights ──► FinetuneResult
        (and, with ``out``, RUN_DIR: model.safetensors (full) or adapter.safetensors +
        adapter_config.json with config.yaml naming the base (PEFT), tokenizer.json,
        metrics.jsonl, finetune.json)

:func:`finetune` works on objects and needs no folder (``out=None``): a sequence of tasks can
run in one process, each call training the model the previous one returned.
:func:`finetune_run` is the same from files, what ``lmforge finetune`` calls. Nothing here
trains by itself: the loop is :class:`lmforge.training.Trainer`, the adapters are
:func:`lmforge.peft.apply`'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from torch import nn

from .. import peft as peft_lib
from ..errors import LMForgeError
from ..files import (
    BASE_MODEL_KEY,
    HEAD_FILE,
    RESUME_HINT,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    atomic_write_json,
    check_output,
    save_tensors,
    save_weights,
)
from ..interop.gguf import is_gguf
from ..interop.hf import is_hf_folder, load_hf_model, load_hf_tokenizer
from ..model import Transformer
from ..runs import load, load_head, transplant
from ..runtime import is_writer, world_size
from ..settings import dataclass_to_dict
from ..tasks import make_task, task_class
from ..tasks.base import DEFAULT_MAX_LENGTH, Batches, Task, TaskEvaluation, TaskOptions
from ..tasks.data import LABELS_FILE, Columns, Row, SplitPlan, check_bad_rows, data_files, read_label_file
from ..tokenizers import Tokenizer
from ..training import Callback, Trainer, TrainState, distributed, latest_checkpoint, seed_everything
from ..training.config import TrainConfig
from .common import Log, job_output_folder, silent

SUMMARY_FILE = "finetune.json"
FULL = "full"  # the method name of full fine-tuning (every other name is a PEFT method)
MethodName = Literal[(FULL, *peft_lib.method_names())]  # type: ignore[valid-type]  # from the PEFT registry


# ---- what goes in ------------------------------------------------------------------------------


@dataclass
class DataSpec:
    """Where the data is and how to read it (saved in the run config, so eval reads it alike)."""

    path: Path
    columns: dict[str, str] = field(default_factory=dict)
    labels: Path | None = None  # labels file (default: labels.txt in the data folder, if any)
    split_ratio: list[float] | None = None
    split_seed: int = 0
    skip_bad_rows: bool = False

    @property
    def plan(self) -> SplitPlan:
        return SplitPlan(self.split_ratio, seed=self.split_seed)

    def labels_file(self) -> Path | None:
        if self.labels is not None:
            return self.labels
        beside = self.path / LABELS_FILE if self.path.is_dir() else None
        return beside if beside is not None and beside.is_file() else None

    def to_dict(self) -> dict[str, Any]:
        """For the run config: paths made absolute, so eval finds the data from any directory."""
        values = dataclass_to_dict(self)
        values["path"] = str(self.path.resolve())
        if self.labels is not None:
            values["labels"] = str(self.labels.resolve())
        return values

    def describe(self) -> str:
        where = self.plan.describe(data_files(self.path))
        return "".join(f"; {split} from {source}" for split, source in where.items())


@dataclass
class Base:
    """The model to fine-tune and its tokenizer: read from a folder (``source``) or in memory."""

    model: Transformer
    tokenizer: Tokenizer
    source: Path | None = None  # the folder it was read from (None: an object in memory)

    @property
    def from_hf_folder(self) -> bool:
        return self.source is not None and is_hf_folder(self.source)


@dataclass
class TaskData:
    """The examples of one fine-tuning: training and validation (parsed by the task)."""

    train: list[Any]
    validation: list[Any]


def read_examples(task: Task, data: DataSpec, split: str, *, training: bool = False) -> list[Any]:
    """The examples of one split, bad rows reported (or skipped and counted)."""
    rows = data.plan.train_rows(data.path) if split == "train" else data.plan.rows(data.path, split)
    examples, bad = task.examples(rows, training=training)
    check_bad_rows(bad, skip=data.skip_bad_rows, split=split, used=len(examples))
    if not examples:
        raise LMForgeError(f"the {split} split has no usable examples", file=data.path)
    return examples


def examples_of(
    task: Task, records: list[dict[str, Any]], *, training: bool = False, where: str = "<memory>"
) -> list[Any]:
    """The task's examples of records held in memory (each a mapping of fields, as in a data file).

    Raises:
        LMForgeError: a record the task cannot use, naming it (``where`` record N: why).
    """
    rows = [Row(values=dict(record), file=Path(where), line=index) for index, record in enumerate(records, 1)]
    examples, bad = task.examples(rows, training=training)
    if bad:
        raise LMForgeError(f"{where} record {bad[0].line}: {bad[0].reason}")
    return examples


def read_task_data(task: Task, data: DataSpec) -> TaskData:
    """Training and validation examples of ``data`` for ``task``; the task learns what it needs
    from the training examples first (e.g. the label set), so validation rows are checked against it."""
    train = read_examples(task, data, "train", training=True)
    task.fit(train)
    return TaskData(train, read_examples(task, data, "validation"))


def load_base(path: str | Path) -> Base:
    """The model and tokenizer of a run directory, a Hugging Face folder or a GGUF file, to fine-tune.

    Raises:
        LMForgeError: no such folder, no tokenizer, or a PEFT run (merge it first).
    """
    path = Path(path)
    if not path.is_dir() and not is_gguf(path):
        raise LMForgeError(
            "model not found (a run directory, a Hugging Face folder or a GGUF file)", file=path, key="model"
        )
    if is_hf_folder(path):
        model, tokenizer = load_hf_model(path), load_hf_tokenizer(path)
    else:
        run = load(path)
        if run.config.get(BASE_MODEL_KEY) is not None:
            raise LMForgeError(
                "this run holds an adapter: merge it into its base first (lmforge merge), then fine-tune that",
                file=path,
                key="model",
            )
        model, tokenizer = run.model, run.tokenizer
    if tokenizer is None:
        raise LMForgeError(f"the model folder has no tokenizer ({TOKENIZER_FILE})", file=path, key="model")
    if model.config.vocab_size < tokenizer.vocab_size:
        raise LMForgeError(
            f"the tokenizer has {tokenizer.vocab_size} tokens, the model only {model.config.vocab_size}",
            file=path,
        )
    return Base(model, tokenizer, source=path)


def task_options(name: str, options: TaskOptions | dict[str, Any] | None, config: Any) -> TaskOptions:
    """The options of task ``name`` for a model of ``config``: a model with a position table
    cannot read past ``max_seq_len``, so an unset max_length becomes the shorter of 128 and that,
    and a longer one given is refused before any work."""
    resolved = task_class(name).options_from(options)
    table = config.position in ("learned", "sinusoidal")
    if resolved.max_length is None:
        limit = min(DEFAULT_MAX_LENGTH, config.max_seq_len) if table else DEFAULT_MAX_LENGTH
        resolved = dataclasses.replace(resolved, max_length=limit)
    elif table and resolved.max_length > config.max_seq_len:
        raise LMForgeError(
            f"max_length {resolved.max_length} is longer than the model's position table "
            f"(max_seq_len {config.max_seq_len}): lower --options.max_length",
            key="options.max_length",
        )
    return resolved


def build_task(
    name: str,
    base: Base,
    *,
    options: TaskOptions | dict[str, Any] | None = None,
    columns: dict[str, str] | None = None,
    labels_file: Path | None = None,
) -> Task:
    """Task ``name`` for ``base``'s tokenizer and architecture, with its label set from
    ``labels_file`` when one is given (else learned from the training examples)."""
    config = base.model.config
    task = make_task(
        name,
        base.tokenizer,
        options=task_options(name, options, config),
        columns=Columns(dict(columns or {})),
        arch=config.arch,
    )
    if labels_file is not None and hasattr(task, "set_labels"):
        task.set_labels(read_label_file(labels_file), f"{labels_file}")
    return task


def fit_head(base: Base, task: Task) -> Transformer:
    """``base``'s model with the head ``task`` trains (a new head starts fresh; a Hugging Face
    folder is read again with that head, so BERT's pooler goes into a classification head) and
    the task's dropout."""
    model = base.model
    changes = task.model_changes(model.config.arch)
    config = model.config
    if base.from_hf_folder and (
        changes["head"] != config.head or changes.get("num_labels", config.num_labels) != config.num_labels
    ):
        assert base.source is not None
        model = load_hf_model(base.source, head=changes["head"], num_labels=changes.get("num_labels"))
    if task.options.dropout is not None:
        changes.update(dropout=task.options.dropout, attn_dropout=task.options.dropout)
    if any(getattr(model.config, key) != value for key, value in changes.items()):
        model = transplant(model, model.config.replace(**changes))
    return model


def sized(train: TrainConfig, *, batches: int, epochs: float | None) -> TrainConfig:
    """``train`` with max_steps derived from ``epochs`` over ``batches`` batches per epoch."""
    if epochs is None:
        return train
    if epochs <= 0:
        raise LMForgeError(f"--epochs must be positive, got {epochs}", key="epochs")
    steps = max(1, math.ceil(epochs * batches / train.grad_accum))
    return dataclasses.replace(train, max_steps=steps, warmup_steps=min(train.warmup_steps, steps))


# ---- fine-tuning ---------------------------------------------------------------------------------


@dataclass
class FinetuneResult:
    """What :func:`finetune` returns: the summary (also RUN_DIR/finetune.json) and the trained
    pieces (the model holds the kept weights; None when training was interrupted)."""

    summary: dict[str, Any]
    model: Any = None
    tokenizer: Any = None
    task: Task | None = None
    state: TrainState | None = None

    @property
    def interrupted(self) -> bool:
        return bool(self.summary.get("interrupted"))


def check_method(method: str, peft: dict[str, Any] | None) -> None:
    """``full`` or a registered PEFT method with options it has (checked before any work)."""
    if method == FULL:
        if peft:
            raise LMForgeError("PEFT options were given (--peft.*) but --method is full", key="peft")
        return
    options = {k: v for k, v in (peft or {}).items() if k != "init_text"}  # init_text needs the tokenizer
    peft_lib.make_config(method, options)  # one line for an unknown method or option


def finetune(
    base: Base,
    task: Task,
    data: TaskData,
    *,
    method: str = FULL,
    peft: dict[str, Any] | None = None,
    train: TrainConfig,
    epochs: float | None = None,
    out: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    run_config: dict[str, Any] | None = None,
    callbacks: list[Callback] | None = None,
    log: Log = silent,
) -> FinetuneResult:
    """Fine-tune ``base`` on ``data`` for ``task``, fully (``method="full"``) or with a PEFT method.

    Args:
        base: the model and tokenizer (a folder's, or objects in memory).
        task: the task, built for this base (:func:`build_task`).
        data: training and validation examples.
        method: ``full`` or a PEFT method of :mod:`lmforge.peft`; ``peft``: its options.
        train: the loop's settings; ``epochs`` (if given) sets ``max_steps``.
        out: the run directory (None: nothing is written, no checkpoints); new or empty, or
            its own run with ``resume``.
        resume: continue the run in ``out`` from its newest checkpoint.
        overwrite: replace an occupied ``out`` as a whole when this run has saved.
        run_config: more of the resolved config to record in config.yaml (data, options, ...).
        callbacks: extra callbacks for the loop.
        log: receives the plan, one line each.

    Returns:
        A :class:`FinetuneResult`; its model keeps the best validation weights (the last ones
        for methods whose registry record says so, e.g. AdaLoRA).
    """
    check_method(method, peft)
    start = time.perf_counter()
    recorded = {
        "task": task.name,
        "task_state": task.state,
        "options": dataclass_to_dict(task.options),
        "method": method,
        "peft": dict(peft or {}),
        "epochs": epochs,
        **(run_config or {}),
    }
    if method != FULL and base.source is not None:
        recorded[BASE_MODEL_KEY] = str(base.source.resolve())
    with contextlib.ExitStack() as stack:
        stack.enter_context(distributed.job(train.device))
        work = None if out is None else stack.enter_context(job_output_folder(out, overwrite=overwrite, resume=resume))
        if resume and (work is None or latest_checkpoint(work) is None):
            raise LMForgeError("nothing to resume: no checkpoint in this run directory", file=out)
        seed_everything(train.seed)
        saved_head = work / HEAD_FILE if work is not None and resume and (work / HEAD_FILE).is_file() else None
        prepared = prepare(
            base, task, data, method=method, peft=peft, train=train, epochs=epochs, head_from=saved_head, log=log
        )
        trainer = Trainer(
            prepared.model,
            task,
            prepared.batches,
            config=prepared.train,
            eval_data=prepared.val_batches,
            callbacks=[prepared.evaluation, *(callbacks or [])],
            run_dir=work,
            tokenizer=base.tokenizer,
            run_config=recorded,
            num_targets=task.num_targets,
        )
        if work is not None and method != FULL and prepared.head and not resume and trainer.writer:
            # A PEFT run keeps its task head as built, frozen parts included: the adapter holds
            # only what trains, and a fresh head's frozen pooler, say, is not in the base.
            save_tensors(prepared.head, work / HEAD_FILE)
        if resume:
            log(f"resumed {out} at step {trainer.resume()}")
        state = trainer.fit()
        if state.interrupted:
            summary = {"interrupted": True, "step": state.step, "stopped_by": state.stopped_by}
            return FinetuneResult(summary, state=state)
        summary = finish(prepared, task, state, base=base, method=method, seconds=time.perf_counter() - start)
        if work is not None and trainer.writer:
            save_finetuned(prepared.model, work, method=method)
            atomic_write_json(work / SUMMARY_FILE, summary)
    prepared.model.eval()
    return FinetuneResult(summary, prepared.model, base.tokenizer, task, state)


@dataclass
class Prepared:
    """What :func:`prepare` sets up for the loop."""

    model: Transformer  # the head fitted, the PEFT method applied
    head: dict[str, Any]  # the task head's tensors as built, before the PEFT method
    train: TrainConfig  # sized by epochs
    batches: Batches
    val_batches: Batches
    evaluation: TaskEvaluation  # the task's validation metric, keeping the best weights
    report: dict[str, float]  # trainable / total parameters
    num_features: int


def prepare(
    base: Base,
    task: Task,
    data: TaskData,
    *,
    method: str,
    peft: dict[str, Any] | None,
    train: TrainConfig,
    epochs: float | None,
    head_from: Path | None = None,
    log: Log = silent,
) -> Prepared:
    """The model with the task's head (and the PEFT method), the batches, the validation callback.
    ``head_from``: the head a resumed run was built with (its ``head.safetensors``)."""
    task.fit(data.train)
    model = fit_head(base, task)
    if head_from is not None:
        load_head(model, head_from)
    head = {f"head.{k}": v.detach().clone() for k, v in model.head.state_dict().items()} if model.head else {}
    log(task.describe())
    features = task.training_features(data.train)
    batches = Batches(features, task.collate, batch_size=train.batch_size, seed=train.seed)
    train = sized(train, batches=len(batches), epochs=epochs)
    # Every rank of a job evaluates the same batches, as large as the job's global batch.
    val_size = train.batch_size * world_size()
    val_batches = Batches(task.encode(data.validation), task.collate, batch_size=val_size, shuffle=False)
    if method != FULL:
        model = peft_lib.apply(model, method, tokenizer=base.tokenizer, **dict(peft or {}))
    report = peft_lib.trainable_report(model)
    log(
        f"{model.config.arch} with {report['total'] / 1e6:.2f}M parameters, method {method}: "
        + peft_lib.format_report(report)
    )
    log(
        f"{train.max_steps:,} steps of {train.batch_size}×{train.grad_accum} examples "
        f"({train.max_steps * train.batch_size * train.grad_accum / max(len(features), 1):.2f} epochs), "
        f"validation {task.main_metric} every {train.eval_every or train.max_steps} steps"
    )
    keep_best = method == FULL or peft_lib.get_method(method).keep_best
    evaluation = TaskEvaluation(task, data.validation, batch_size=max(train.batch_size, 32), keep_best=keep_best)
    return Prepared(model, head, train, batches, val_batches, evaluation, report, len(features))


def finish(
    prepared: Prepared, task: Task, state: TrainState, *, base: Base, method: str, seconds: float
) -> dict[str, Any]:
    """Put the kept weights back (best or last) and summarize the run (finetune.json)."""
    evaluation, report = prepared.evaluation, prepared.report
    restored = evaluation.restore_best(prepared.model)
    last = evaluation.history[-1] if evaluation.history else {}
    return {
        "task": task.name,
        "method": method,
        "model": str(base.source) if base.source is not None else "(in memory)",
        "steps": state.step,
        "best_step": evaluation.best_step if restored else state.step,
        "kept": "best" if restored else "last",
        "validation": evaluation.best_metrics if restored else last,
        "main_metric": task.main_metric,
        "trainable_parameters": int(report["trainable"]),
        "total_parameters": int(report["total"]),
        "trainable_percent": report["percent"],
        "train_examples": prepared.num_features,
        "train_time_s": round(state.train_time_s, 1),
        "eval_time_s": round(state.eval_time_s, 1),
        "wall_time_s": round(seconds, 1),
        "stop_reason": state.stop_reason,
    }


def save_finetuned(model: nn.Module, out: Path, *, method: str) -> None:
    """The kept weights as the run's output: the whole model, or the adapter (with its task head)."""
    if method == FULL:
        save_weights(model, out / WEIGHTS_FILE)
    else:
        peft_lib.save_adapter(model, out)
        (out / WEIGHTS_FILE).unlink(missing_ok=True)  # a full-weights link: not this run's output


def finetune_run(
    *,
    model: str | Path,
    data: DataSpec,
    task_name: str,
    method: str = FULL,
    peft: dict[str, Any] | None = None,
    options: TaskOptions | dict[str, Any] | None = None,
    train: TrainConfig,
    epochs: float | None = None,
    out: str | Path,
    resume: bool = False,
    overwrite: bool = False,
    log: Log = silent,
) -> FinetuneResult:
    """:func:`finetune` from files: the base model's folder, the data folder, a run directory.

    The data comes before training starts: a bad option, method or file is reported before any
    weights are touched, and a classification head's size is the number of labels found there.
    """
    check_method(method, peft)
    if is_writer():  # before any work (a job's other ranks leave the folder to the writer)
        check_output(Path(out), overwrite=overwrite, resume=resume, hint=RESUME_HINT)
    base = load_base(model)
    task = build_task(task_name, base, options=options, columns=data.columns, labels_file=data.labels_file())
    examples = read_task_data(task, data)
    log(
        f"data {data.path}: {len(examples.train):,} training / {len(examples.validation):,} validation examples"
        + data.describe()
    )
    return finetune(
        base,
        task,
        examples,
        method=method,
        peft=peft,
        train=train,
        epochs=epochs,
        out=out,
        resume=resume,
        overwrite=overwrite,
        run_config={"data": data.to_dict(), "source_model": str(Path(model).resolve())},
        log=log,
    )
