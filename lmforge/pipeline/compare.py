"""Fine-tuning methods side by side: the same base, data, task options, training settings, time
budget and seeds for each, and one report (in the manner of Hugging Face PEFT's method-comparison
suite and of a Weights & Biases run comparison).

    for each method, for each seed (a fresh process each, so its peak memory is its own):
        load_base ─► build_task ─► read_task_data ─► finetune (TimeBudget: its share of the budget)
        ─► OUT/runs/METHOD-seedS/ (the run folder) + compare.json (what the report needs)
    all records ─► OUT/report.md, OUT/report.csv (per method), OUT/runs.csv (per run), OUT/compare.png

Resumable: a run whose ``compare.json`` exists is not run again; a run folder without one (the
comparison was stopped during it) is started afresh.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import multiprocessing
import queue
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import peft as peft_lib
from ..errors import LMForgeError
from ..files import (
    ADAPTER_CONFIG_FILE,
    HEAD_FILE,
    WEIGHTS_FILE,
    atomic_write_json,
    atomic_write_text,
    check_own_folder,
)
from ..training import TimeBudget
from ..training.config import TrainConfig
from ..viz.charts import write_compare_png
from ..viz.curves import curves_figure, read_run
from ..viz.figures import save_png
from .common import Log, silent
from .finetuning import FULL, DataSpec, build_task, check_method, finetune, load_base, read_task_data

RECORD_FILE = "compare.json"
ADAPTER_WEIGHTS = "adapter.safetensors"
TRAIN_SHARE = 0.75  # of each run's share of the budget, the part given to training (the rest: start, load, evaluation)


@dataclass
class Comparison:
    """What every method of one comparison shares, and what each may change (lr, PEFT options)."""

    model: Path  # the base model (run folder, Hugging Face folder, GGUF file)
    data: DataSpec
    methods: list[str]
    task_name: str = "classification"
    options: dict[str, Any] = field(default_factory=dict)  # the task's options
    train: TrainConfig = field(default_factory=TrainConfig)
    epochs: float | None = None
    seeds: list[int] = field(default_factory=lambda: [0])
    budget_minutes: float | None = None  # the whole comparison's wall time, split evenly over the runs
    lr: dict[str, float] = field(default_factory=dict)  # method -> learning rate (default: train.lr)
    peft: dict[str, dict[str, Any]] = field(default_factory=dict)  # method -> its PEFT options

    @property
    def num_runs(self) -> int:
        return len(self.methods) * len(self.seeds)

    def train_minutes(self) -> float | None:
        """Training minutes each run gets: an equal share of the budget, less the part for
        starting, loading and evaluating (:data:`TRAIN_SHARE`)."""
        if self.budget_minutes is None:
            return None
        return self.budget_minutes / self.num_runs * TRAIN_SHARE

    def check(self) -> None:
        """Every method, option, lr and seed checked before any work (one line for the first problem)."""
        if not self.methods:
            raise LMForgeError("--methods is empty: give methods to compare, e.g. full,lora,ia3", key="methods")
        if len(set(self.methods)) != len(self.methods):
            raise LMForgeError(f"--methods names a method twice: {','.join(self.methods)}", key="methods")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise LMForgeError("--seeds must list one or more different seeds", key="seeds")
        if self.budget_minutes is not None and self.budget_minutes <= 0:
            raise LMForgeError(f"--budget_minutes must be positive, got {self.budget_minutes}", key="budget_minutes")
        for method in self.methods:
            check_method(method, self.peft.get(method))
        for name, section in (("lr", self.lr), ("peft", self.peft)):
            for method in section:
                if method not in self.methods:
                    raise LMForgeError(f"--{name}.{method} is given but {method} is not in --methods", key=name)
        for method, value in self.lr.items():
            if not isinstance(value, int | float) or value <= 0:
                raise LMForgeError(f"--lr.{method} must be a positive number, got {value!r}", key=f"lr.{method}")


@dataclass
class Job:
    """One run of a comparison: a method with a seed (sent to a fresh process)."""

    comparison: Comparison
    method: str
    seed: int
    out: Path

    @property
    def name(self) -> str:
        return f"{self.method}-seed{self.seed}"

    def train_config(self) -> TrainConfig:
        minutes = self.comparison.train_minutes()
        changes: dict[str, Any] = {"seed": self.seed, "lr": self.comparison.lr.get(self.method, self.comparison.train.lr)}
        if minutes is not None:  # a hard stop a little past the budget TimeBudget plans for
            changes["max_minutes"] = minutes * 1.05
        if changes["lr"] < (self.comparison.train.min_lr or 0.0):
            changes["min_lr"] = None
        return dataclasses.replace(self.comparison.train, **changes)


def _status_mb(field_name: str) -> float | None:
    """A memory field of /proc/self/status (Linux) in MiB, or None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def reset_peak_memory() -> float:
    """Start a new peak-memory measurement here; returns the memory in use now (MiB).

    On Linux the kernel's high-water mark of the resident set (VmHWM) is reset to the current
    size (``5`` into /proc/self/clear_refs), so the peak read later is this run's own; on a GPU,
    the allocator's peak is reset."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    with contextlib.suppress(OSError):  # not Linux, or not allowed: the peak stays the process's
        Path("/proc/self/clear_refs").write_text("5")
    return _status_mb("VmRSS") or _peak_memory_mb()


def _peak_memory_mb() -> float:
    """The peak memory since :func:`reset_peak_memory`: CUDA's allocator peak on a GPU, else the
    resident set's high-water mark (VmHWM; elsewhere the process's peak, ru_maxrss)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    peak = _status_mb("VmHWM")
    if peak is not None:
        return peak
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def weights_on_disk(folder: Path, method: str) -> int:
    """Bytes of the files that hold what the method trained: the whole model.safetensors for full
    fine-tuning; the adapter, its config and the task head it was built with for a PEFT method."""
    names = [WEIGHTS_FILE] if method == FULL else [ADAPTER_WEIGHTS, ADAPTER_CONFIG_FILE, HEAD_FILE]
    return sum((folder / n).stat().st_size for n in names if (folder / n).is_file())


def run_job(job: Job, *, isolated: bool = True) -> dict[str, Any]:
    """Run one method with one seed into ``job.out`` and write its ``compare.json`` (what the
    report needs). Meant for a fresh process (``isolated``): the peak memory it records is then
    the run's own; in a shared process it is that process's peak so far."""
    start = time.perf_counter()
    runtime_mb = reset_peak_memory()  # Python + torch + lmforge, before any data or model
    comparison = job.comparison
    base = load_base(comparison.model)
    task = build_task(
        comparison.task_name, base, options=comparison.options, columns=comparison.data.columns,
        labels_file=comparison.data.labels_file(),
    )
    data = read_task_data(task, comparison.data)
    minutes = comparison.train_minutes()
    result = finetune(
        base, task, data, method=job.method, peft=comparison.peft.get(job.method), train=job.train_config(),
        epochs=comparison.epochs, out=job.out, overwrite=True, callbacks=[TimeBudget(minutes)] if minutes else None,
        run_config={"data": comparison.data.to_dict(), "source_model": str(Path(comparison.model).resolve())},
    )
    if result.interrupted or result.state is None:
        raise LMForgeError(f"{job.name} was interrupted: the comparison stops here (run it again to go on)")
    summary, state = result.summary, result.state
    record = {
        "method": job.method,
        "seed": job.seed,
        "main_metric": summary["main_metric"],
        "score": summary["validation"].get(summary["main_metric"]),
        "validation": summary["validation"],
        "trainable_parameters": summary["trainable_parameters"],
        "total_parameters": summary["total_parameters"],
        "trainable_percent": summary["trainable_percent"],
        "weights_bytes": weights_on_disk(job.out, job.method),
        "peak_memory_mb": round(_peak_memory_mb(), 1),
        "runtime_memory_mb": round(runtime_mb, 1),
        "memory_isolated": isolated,
        "steps": summary["steps"],
        "lr": job.train_config().lr,
        "train_time_s": summary["train_time_s"],
        "tokens_per_s": round(state.tokens_seen / max(state.train_time_s, 1e-9), 1),
        "wall_time_s": round(time.perf_counter() - start, 1),
        "stop_reason": summary["stop_reason"],
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }
    atomic_write_json(job.out / RECORD_FILE, record)
    return record


def _child(job: Job, errors: Any) -> None:
    """The body of a run's process: a failure goes back to the parent as one line."""
    try:
        run_job(job)
    except LMForgeError as err:
        errors.put(err.one_line())
    except Exception as err:  # noqa: BLE001 (any failure of one method is reported, the others go on)
        errors.put(f"{type(err).__name__}: {err}")


def _run_isolated(job: Job) -> str | None:
    """Run ``job`` in a fresh (spawned) process; the error line, or None on success."""
    context = multiprocessing.get_context("spawn")
    errors = context.Queue()
    process = context.Process(target=_child, args=(job, errors), name=f"lmforge-compare-{job.name}")
    process.start()
    process.join()
    try:
        return errors.get(timeout=1.0)
    except queue.Empty:
        pass
    if process.exitcode != 0:
        return f"the run's process ended with status {process.exitcode}"
    return None


@dataclass
class CompareResult:
    """The records of every finished run, the failures, and the report's files."""

    records: list[dict[str, Any]]
    failures: dict[str, str]
    files: list[Path]
    skipped: list[str]  # runs found finished (not run again)


def compare(comparison: Comparison, *, out: str | Path, isolate: bool = True, log: Log = silent) -> CompareResult:
    """Run every method of ``comparison`` with every seed (each finished run kept, not rerun) and
    write the report: OUT/report.md, report.csv, runs.csv, compare.png, and curves.png (the
    runs' training curves overlaid).

    Args:
        comparison: the shared setup and the methods.
        out: the comparison's folder (run folders under OUT/runs).
        isolate: each run in a fresh process (its own peak memory); False runs them here.
        log: one line per run started, skipped or finished.

    Raises:
        LMForgeError: a bad method, option or seed; a base model or data folder that cannot be
            read (found before any training).
    """
    comparison.check()
    folder = Path(out)
    check_own_folder(folder, marker="comparison.json", what="an earlier lmforge compare")
    load_base(comparison.model)  # a bad model path is reported before any run starts
    if not comparison.data.path.exists():
        raise LMForgeError("data not found", file=comparison.data.path, key="data")
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / "comparison.json", describe(comparison))
    minutes = comparison.train_minutes()
    if minutes is not None:
        log(f"budget {comparison.budget_minutes:g} min for {comparison.num_runs} runs: {minutes:.2f} min of training each")
    records, failures, skipped = [], {}, []
    for method in comparison.methods:
        for seed in comparison.seeds:
            job = Job(comparison, method, seed, folder / "runs" / f"{method}-seed{seed}")
            done = job.out / RECORD_FILE
            if done.is_file():
                records.append(json.loads(done.read_text(encoding="utf-8")))
                skipped.append(job.name)
                log(f"{job.name}: finished earlier, not run again")
                continue
            log(f"{job.name}: training (lr {job.train_config().lr:g})")
            if isolate:
                error = _run_isolated(job)
            else:
                try:
                    run_job(job, isolated=False)
                    error = None
                except LMForgeError as err:
                    error = err.one_line()
            if error is not None:
                failures[job.name] = error
                log(f"{job.name}: failed: {error}")
                continue
            record = json.loads(done.read_text(encoding="utf-8"))
            records.append(record)
            log(
                f"{job.name}: {record['main_metric']} {_fmt(record['score'])}, {record['steps']} steps, "
                f"{record['wall_time_s']:.0f} s"
            )
            write_report(comparison, records, failures, folder)  # the report so far, after each run
    # The whole report: every run, the ones reused after the last that trained included.
    files = write_report(comparison, records, failures, folder)
    finished = [folder / "runs" / f"{r['method']}-seed{r['seed']}" for r in records]
    if finished:  # every run's training curves, overlaid (lmforge viz run draws the same)
        files.append(save_png(curves_figure([read_run(path) for path in finished]), folder / "curves.png"))
    return CompareResult(records, failures, files, skipped)


def describe(comparison: Comparison) -> dict[str, Any]:
    """The comparison's setup as JSON (written beside the report)."""
    values = dataclasses.asdict(comparison)
    values["model"] = str(Path(comparison.model).resolve())
    values["data"] = comparison.data.to_dict()
    return values


def model_name(path: Path) -> str:
    """A short name of the base model for titles: its folder's name, with the folder above it when
    that name says nothing (a package's ``model`` folder)."""
    path = Path(path)
    return f"{path.parent.name}/{path.name}" if path.name in ("model", "models") else path.name


def _fmt(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, int | float) and math.isfinite(value) else "n/a"


def summarize(records: list[dict[str, Any]], methods: list[str]) -> list[dict[str, Any]]:
    """One row per method: the score's mean, spread (sample std; 0 with one seed), min and max over
    seeds, and the means of the costs."""
    rows = []
    for method in methods:
        mine = [r for r in records if r["method"] == method]
        if not mine:
            continue
        scores = [float(r["score"]) for r in mine if isinstance(r.get("score"), int | float)]

        def mean(key: str, runs: list[dict[str, Any]] = mine) -> float:
            return statistics.fmean(float(r[key]) for r in runs)

        rows.append({
            "method": method,
            "metric": mine[0]["main_metric"],
            "seeds": len(mine),
            "mean": statistics.fmean(scores) if scores else float("nan"),
            "std": statistics.stdev(scores) if len(scores) > 1 else 0.0,
            "min": min(scores, default=float("nan")),
            "max": max(scores, default=float("nan")),
            "trainable_parameters": mine[0]["trainable_parameters"],
            "trainable_percent": mine[0]["trainable_percent"],
            "weights_mb": mean("weights_bytes") / 2**20,
            "peak_memory_mb": mean("peak_memory_mb"),
            "runtime_memory_mb": mean("runtime_memory_mb"),
            "memory_isolated": all(r.get("memory_isolated", True) for r in mine),
            "steps": mean("steps"),
            "train_time_s": mean("train_time_s"),
            "wall_time_s": mean("wall_time_s"),
            "tokens_per_s": mean("tokens_per_s"),
        })
    return rows


def _csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: json.dumps(v) if isinstance(v, dict) else v for k, v in row.items()} for row in rows)
    return buffer.getvalue()


def markdown(comparison: Comparison, rows: list[dict[str, Any]], failures: dict[str, str]) -> str:
    """The report as Markdown: the setup, the table, the failures."""
    metric = rows[0]["metric"] if rows else "score"
    lines = [
        f"# Method comparison: {model_name(comparison.model)} on {comparison.data.path.name}",
        "",
        f"- task: {comparison.task_name}; seeds: {', '.join(map(str, comparison.seeds))}; "
        f"batch {comparison.train.batch_size}, "
        + (f"{comparison.epochs:g} epoch(s)" if comparison.epochs is not None else f"at most {comparison.train.max_steps} steps")
        + (f"; budget {comparison.budget_minutes:g} min in all ({comparison.train_minutes():.2f} min of training per run)"
           if comparison.budget_minutes is not None else "; no time budget"),
        f"- {metric} on the validation split, evaluated once at the end of each run; mean ± sample std over seeds (min–max)",
        "- size on disk: model.safetensors (full) or adapter + its config + task head (PEFT); peak memory: the run's "
        "process (resident set on CPU, allocator peak on GPU), runtime: the same process before loading anything",
        "",
        f"| method | {metric} | min–max | trainable params | trainable % | size on disk | peak memory | runtime memory "
        "| steps | train s | wall s | tokens/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['method']} | {row['mean']:.2%} ± {row['std']:.2%} (n={row['seeds']}) | {row['min']:.2%}–{row['max']:.2%} "
            f"| {row['trainable_parameters']:,} | {row['trainable_percent']:.3f}% | {row['weights_mb']:.2f} MB "
            f"| {row['peak_memory_mb']:,.0f} MB | {row['runtime_memory_mb']:,.0f} MB | {row['steps']:,.0f} "
            f"| {row['train_time_s']:,.0f} | {row['wall_time_s']:,.0f} | {row['tokens_per_s']:,.0f} |"
        )
    if any(not row["memory_isolated"] for row in rows):
        lines += ["", "Some runs were not in a process of its own (isolate=False): their peak memory is the shared process's."]
    if failures:
        lines += ["", "Failed runs:", ""] + [f"- {name}: {error}" for name, error in failures.items()]
    return "\n".join(lines) + "\n"


def write_report(
    comparison: Comparison, records: list[dict[str, Any]], failures: dict[str, str], folder: Path
) -> list[Path]:
    """report.md, report.csv (per method), runs.csv (per run) and compare.png (when any run finished)."""
    rows = summarize(records, comparison.methods)
    files = [
        atomic_write_text(folder / "report.md", markdown(comparison, rows, failures)),
        atomic_write_text(folder / "report.csv", _csv(rows)),
        atomic_write_text(folder / "runs.csv", _csv(records)),
    ]
    if rows:
        scores = {m: [float(r["score"]) for r in records if r["method"] == m and r.get("score") is not None] for m in comparison.methods}
        title = f"{model_name(comparison.model)} on {comparison.data.path.name}"
        files.append(write_compare_png(rows, folder / "compare.png", title=title, scores=scores))
    return files


def peft_sections(options: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Per-method PEFT options from a nested mapping (``{lora: {r: 8}}``) or dotted keys
    (``{"lora.r": 8}``, as ``--peft.lora.r 8`` gives them)."""
    sections: dict[str, dict[str, Any]] = {}
    for key, value in (options or {}).items():
        if isinstance(value, dict):
            sections.setdefault(key, {}).update(value)
        elif "." in key:
            method, option = key.split(".", 1)
            sections.setdefault(method, {})[option] = value
        else:
            raise LMForgeError(f"--peft.{key}: name the method, e.g. --peft.lora.r 8", key=f"peft.{key}")
    return sections


def method_names() -> list[str]:
    """``full`` and every registered PEFT method."""
    return [FULL, *peft_lib.method_names()]
