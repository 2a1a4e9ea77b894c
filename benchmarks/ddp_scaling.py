"""Data-parallel scaling on this machine: one process with all the threads against a torchrun job.

The same pretraining (a decoder on the Python documentation inside Python, the same global
batch of ``2·b`` sequences per step, the same steps) run four ways, each by the real command
line (``lmforge pretrain``) in a fresh process, in alternation over ``--rounds`` rounds:

- ``1 × 2 threads``: one process, batch 2b, two intra-op threads (how a user runs it today);
- ``2 × 1 thread DDP``: ``--nproc 2`` (torchrun, gloo), batch b on each rank, one thread each;
- ``2 × 1 thread FSDP``: the same with ``--train.strategy fsdp``;
- ``1 × 1 thread, batch b``: what each rank computes, alone: the job's step time minus this one
  is the price of being a job (gradient all-reduce or FSDP's all-gather / reduce-scatter,
  waiting for the slower rank, the per-step sums of targets and metrics).

Throughput is the loop's own steady-state figure (tokens per second over the last 20 steps, the
whole job's tokens), and training CPU seconds per 1,000 tokens of rank 0 beside it. Evaluation and
saving are outside both (one evaluation and one checkpoint, at the end).

    python benchmarks/ddp_scaling.py --threads 2            # appends to benchmarks/RESULTS.md
    python benchmarks/ddp_scaling.py --threads 2 --steps 30 --rounds 1 --no-record
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_results, load_average, set_threads  # noqa: E402

from lmforge.data.python_docs import python_docs_corpus  # noqa: E402


def run(text: Path, out: Path, *, batch: int, threads: int, nproc: int, strategy: str, args) -> dict:
    """One pretraining run; returns its steady-state tokens/s and CPU seconds per 1k tokens."""
    command = [
        sys.executable, "-m", "lmforge", "pretrain", "--data.path", str(text), "--data.seq_len", str(args.seq_len),
        "--model.preset", "tiny-decoder", "--model.num_layers", str(args.layers), "--model.embed_dim",
        str(args.width), "--model.num_heads", str(args.heads), "--model.dropout", "0", "--tokenizer.kind", "bpe",
        "--tokenizer.vocab_size", "2000", "--train.batch_size", str(batch), "--train.max_steps", str(args.steps),
        "--train.warmup_steps", "5", "--train.eval_every", "0", "--train.eval_batches", "1",
        "--train.save_every", "0", "--train.log_every", "5", "--train.progress", "false",
        "--train.strategy", strategy, "--out", str(out),
    ]  # fmt: skip
    if nproc > 1:
        command += ["--nproc", str(nproc)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        raise SystemExit(f"run failed ({' '.join(command[2:4])}):\n{result.stderr[-3000:]}")
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    last = [x for x in lines if "tokens_per_s" in x][-1]
    state = json.loads((out / "trainer_state.json").read_text())["trainer"]
    return {
        "tokens_per_s": last["tokens_per_s"],
        "cpu_per_1k": 1000 * state["train_cpu_s"] / state["tokens_seen"],
        "loss": last["loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--threads", type=int, default=2, help="threads of the one-process run (= processes × 1)"
    )
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8, help="sequences per rank (one process: 2 × this)")
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--no-record", action="store_true", help="print only, leave RESULTS.md alone")
    args = parser.parse_args()
    set_threads(args.threads)
    nproc = args.threads
    variants = {
        f"1 × {nproc} threads, batch {nproc * args.batch}": dict(
            batch=nproc * args.batch, threads=nproc, nproc=1, strategy="auto"
        ),
        f"{nproc} × 1 thread DDP, batch {args.batch} each": dict(
            batch=args.batch, threads=1, nproc=nproc, strategy="ddp"
        ),
        f"{nproc} × 1 thread FSDP, batch {args.batch} each": dict(
            batch=args.batch, threads=1, nproc=nproc, strategy="fsdp"
        ),
        f"1 × 1 thread, batch {args.batch} (one rank's work alone)": dict(
            batch=args.batch, threads=1, nproc=1, strategy="auto"
        ),
    }
    results: dict[str, list[dict]] = {name: [] for name in variants}
    load_before = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "docs.txt"
        text.write_text("\n\n".join(python_docs_corpus(max_bytes=400_000)), encoding="utf-8")
        for round_ in range(args.rounds):
            for index, (name, how) in enumerate(variants.items()):
                out = Path(tmp) / f"run-{round_}-{index}"
                results[name].append(run(text, out, args=args, **how))
                print(f"round {round_ + 1}: {name}: {results[name][-1]}", flush=True)
    median = {
        name: {k: statistics.median(r[k] for r in rs) for k in ("tokens_per_s", "cpu_per_1k", "loss")}
        for name, rs in results.items()
    }
    names = list(variants)
    alone, ddp, fsdp, one_rank = (median[n] for n in names)
    rows = [
        "| run | tokens/s (whole job) | vs 1 process | rank 0's CPU s per 1k of the job's tokens | loss at the end |",
        "|---|---|---|---|---|",
    ]
    for name in names:
        m = median[name]
        rows.append(
            f"| {name} | {m['tokens_per_s']:,.0f} | {m['tokens_per_s'] / alone['tokens_per_s']:.2f}× "
            f"| {m['cpu_per_1k']:.3f} | {m['loss']:.4f} |"
        )
    # Per-step time of one rank: the job's tokens/s counts nproc ranks' tokens.
    step_alone = 1 / one_rank["tokens_per_s"]
    overhead = {
        label: (nproc / m["tokens_per_s"] - step_alone) / (nproc / m["tokens_per_s"])
        for label, m in (("DDP", ddp), ("FSDP", fsdp))
    }
    params = args.layers * 12 * args.width**2 + 2000 * args.width
    body = "\n".join(rows) + (
        f"\n\nShape: {args.layers} layers / {args.width} wide / {args.heads} heads / context {args.seq_len}, "
        f"BPE 2,000 tokens (about {params / 1e6:.1f}M parameters, {4 * params / 1e6:.1f} MB of fp32 gradients "
        f"a step), {args.steps} steps, global batch {nproc * args.batch}, median of {args.rounds} rounds, "
        f"load average {load_before} before / {load_average()} after, torch {torch.__version__}.\n\n"
        f"A job of {nproc} one-thread processes runs {ddp['tokens_per_s'] / one_rank['tokens_per_s']:.2f}× (DDP) / "
        f"{fsdp['tokens_per_s'] / one_rank['tokens_per_s']:.2f}× (FSDP) the tokens/s of one such process.\n\n"
        f"Overhead of being a job: a rank's step takes {overhead['DDP']:.0%} (DDP) / {overhead['FSDP']:.0%} "
        "(FSDP) longer than the same work in a process alone (1 thread, batch b): the gradient all-reduce "
        "(DDP; FSDP all-gathers each block's weights in forward and backward and reduce-scatters its "
        "gradients: about 1.5× DDP's traffic), over gloo's TCP loopback on the CPU, plus waiting for the "
        "slower rank each step. The losses agree across runs (the same global batch: tests/test_distributed.py "
        "holds them to 2e-5)."
    )
    print(body)
    if not args.no_record:
        append_results(
            "Data-parallel scaling: 1 process × 2 threads vs a torchrun job (benchmarks/ddp_scaling.py)", body
        )


if __name__ == "__main__":
    main()
