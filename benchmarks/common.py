"""Shared helpers of the benchmarks: threads, timing (wall and CPU), load, the machine's matmul
peak, the nanoGPT peer, the machine line and RESULTS.md."""

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

from lmforge.kernels import block_kernels, dense_row

RESULTS = Path(__file__).with_name("RESULTS.md")
# nanoGPT (MIT), the primary training peer: never copied into this repository, read from beside it.
NANOGPT = Path(__file__).resolve().parents[2] / "shared" / "peers" / "nanogpt"


# Decoder shapes of the ablations inside lmforge (padded_training.py, eval_forward.py):
# name: (model overrides, batch, context)
DECODER_SHAPES = {
    "small": (dict(embed_dim=128, num_layers=4, num_heads=4), 12, 64),
    "medium": (dict(embed_dim=384, num_layers=6, num_heads=6), 8, 256),
    "rope-gqa": (
        dict(embed_dim=256, num_layers=4, num_heads=8, num_kv_heads=2, position="rope", norm="rmsnorm", bias=False),
        16,
        128,
    ),
}


def set_threads(threads: int | None) -> None:
    """Pin torch's intra-op threads (1 on a shared machine: a descheduled thread stalls every
    parallel region); also exported for child processes."""
    if threads:
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)


def load_average() -> str:
    """The 1/5/15-minute load average as "a/b/c" (how busy the shared cores were)."""
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def nanogpt_model() -> object | None:
    """nanoGPT's own ``model`` module from ../shared/peers/nanogpt, or None when it is absent."""
    if not (NANOGPT / "model.py").is_file():
        return None
    import importlib

    sys.dont_write_bytecode = True  # write no __pycache__ into the shared peer folder
    if str(NANOGPT) not in sys.path:
        sys.path.insert(0, str(NANOGPT))
    return importlib.import_module("model")


def matmul_peak(dtype: torch.dtype, *, seconds: float = 1.0) -> float:
    """This CPU's matmul throughput in FLOP per second of process CPU time for ``dtype`` on the
    current thread count: the fastest single product among square products of a few sizes. CPU
    time, not wall time, and the fastest call rather than the average, so that a shared machine's
    other jobs (which only ever slow a call) do not lower it: it is the denominator of model-FLOPs
    utilization, which the benchmarks compute from CPU time too."""
    best = 0.0
    for n in (256, 512, 1024):
        a = torch.randn(n, n).to(dtype)
        b = torch.randn(n, n).to(dtype)
        a @ b  # warm up (the BLAS picks its kernel on first use)
        fastest, start = float("inf"), time.process_time()
        while time.process_time() - start < seconds / 3:
            before = time.process_time()
            a @ b
            fastest = min(fastest, time.process_time() - before)
        best = max(best, 2 * n**3 / max(fastest, 1e-9))
    return best


def weight_pass(model: torch.nn.Module, *, rounds: int = 5) -> dict[str, float]:
    """What a batch-1 decoding step must cost at the least: every ``nn.Linear`` weight (the tied
    head once) read once. Times three passes over them all (median wall and CPU seconds of
    ``rounds``): a plain read (``sum``), matrix-vector products on the (out, in) layout
    (``F.linear``, as transformers decodes) and on the (in, out) layout (``x @ Wᵀ`` stored
    transposed, as lmforge's fp32 decoding does with addmm), and, where lmforge's native kernels
    are built, ``native``: lmforge's one-row kernel on that layout (``lmforge.kernels.dense_row``,
    what its fp32 decoding calls). ``megabytes`` is what a token reads; the fastest
    pass bounds the tokens/s of an implementation in that precision that reads the weights no
    faster (attention, norms and the rest ignored): ``ceiling_wall`` / ``ceiling_cpu``, in tokens/s."""
    import torch.nn.functional as F

    weights = list(
        {id(m.weight): m.weight.detach() for m in model.modules() if type(m) is torch.nn.Linear}.values()
    )
    transposed = [w.t().contiguous() for w in weights]
    inputs = [torch.randn(1, w.shape[1], dtype=w.dtype) for w in weights]
    passes = {
        "read": lambda: [w.sum() for w in weights],
        "gemv": lambda: [F.linear(x, w) for x, w in zip(inputs, weights, strict=True)],
        "gemv_t": lambda: [x @ w for x, w in zip(inputs, transposed, strict=True)],
    }
    if block_kernels() is not None and all(w.dtype == torch.float32 for w in weights):
        rows = [x[0] for x in inputs]
        passes["native"] = lambda: [dense_row(x, w, None) for x, w in zip(rows, transposed, strict=True)]
    wall, cpu = interleaved_wall_cpu(passes, rounds=rounds, warmup=1)
    out = {"megabytes": sum(w.numel() * w.element_size() for w in weights) / 1e6}
    for name in wall:
        out[f"{name}_wall"], out[f"{name}_cpu"] = wall[name], cpu[name]
    for clock, times in (("wall", wall), ("cpu", cpu)):  # tokens/s if a token cost the fastest pass
        out[f"ceiling_{clock}"] = 1 / min(times.values())
    return out


def machine() -> str:
    """CPU model, cores, and library versions: enough to tell runs apart."""
    fields: dict[str, str] = {}  # /proc/cpuinfo's first "model name" and "flags"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    cpu = fields.get("model name") or platform.processor() or platform.machine()
    flags = set(fields.get("flags", "").split())
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    # the vector unit torch's kernels use, and bf16 matrix hardware (what bf16 autocast runs on)
    bf16 = ", AMX bf16" if "amx_bf16" in flags else ", AVX512-BF16" if "avx512_bf16" in flags else ""
    cpu += f" ({torch.backends.cpu.get_cpu_capability()}{bf16})"
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
    return interleaved_wall_cpu(fns, rounds=rounds, warmup=warmup)[0]


def interleaved_rounds(
    fns: dict[str, Callable[[], object]], *, rounds: int = 5, warmup: int = 2, calls: int = 1
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and process-CPU seconds per call of each function in each of ``rounds`` rounds, in
    which every function runs ``calls`` times in turn (machine noise hits all alike; CPU time
    does not count time spent waiting for a core)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            for _ in range(calls):
                fn()
            wall[name].append((time.perf_counter() - start) / calls)
            cpu[name].append((time.process_time() - cpu_start) / calls)
    return wall, cpu


def interleaved_wall_cpu(
    fns: dict[str, Callable[[], object]], *, rounds: int = 5, warmup: int = 2, calls: int = 1
) -> tuple[dict[str, float], dict[str, float]]:
    """Median wall and process-CPU seconds per call of each function (:func:`interleaved_rounds`)."""
    wall, cpu = interleaved_rounds(fns, rounds=rounds, warmup=warmup, calls=calls)
    return (
        {name: statistics.median(v) for name, v in wall.items()},
        {name: statistics.median(v) for name, v in cpu.items()},
    )


def ratio_spread(slow: list[float], fast: list[float]) -> str:
    """The quartiles of the per-round ratios slow / fast, "a–b": how far the shared machine's noise
    moved one round's ratio (the headline stays the ratio of the medians)."""
    ratios = sorted(s / f for s, f in zip(slow, fast, strict=True))
    return f"{ratios[len(ratios) // 4]:.2f}–{ratios[(3 * len(ratios)) // 4]:.2f}"


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
