"""Shared helpers of the benchmarks: timing, peak memory, the machine line and RESULTS.md."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("RESULTS.md")


def machine() -> str:
    """CPU model, cores, and library versions: enough to tell runs apart."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads){gpu}, "
        f"Python {platform.python_version()}"
    )


def timeit(fn: Callable[[], object], *, repeats: int = 5, warmup: int = 2) -> float:
    """Median wall time of ``fn`` in seconds after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved(
    fns: dict[str, Callable[[], object]], *, rounds: int = 5, warmup: int = 2
) -> dict[str, float]:
    """Median time of each function, measured in alternation so machine noise hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def append_results(title: str, body: str) -> None:
    """Append a dated section (command, machine, then ``body``) to benchmarks/RESULTS.md."""
    command = "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    section = f"\n## {title} — {stamp}\n\n- command: `{command}`\n- machine: {machine()}\n\n{body.strip()}\n"
    if not RESULTS.exists():
        RESULTS.write_text("# Benchmark results\n\nAppended by the scripts in `benchmarks/`; newest last.\n")
    with RESULTS.open("a", encoding="utf-8") as f:
        f.write(section)
    print(section)
