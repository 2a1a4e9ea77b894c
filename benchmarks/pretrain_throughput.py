"""Pretraining train-step throughput: lmforge against nanoGPT's own ``model.py``, then transformers.

One train step = forward, cross-entropy loss, backward, AdamW step, zero grads, on one fixed batch.
Every comparison is at the same architecture, the same precision, the same thread count and the
same optimizer (``torch.optim.AdamW(fused=True)`` with weight decay on ≥2-D weights, for every
model):

- **nanoGPT** (primary peer): ``GPT`` from ``../shared/peers/nanogpt/model.py`` (imported from
  there, never copied; skipped with a reason when absent), ``bias=False``, no dropout, its own loss
  (``model(x, y)``). lmforge is built with the same wiring: learned positions, LayerNorm without
  bias, no bias in the linear layers, exact-erf GELU, tied head, no dropout.
- **transformers** (second peer): ``GPT2LMHeadModel`` (SDPA attention) with GPT-2's wiring (biases,
  tanh GELU); lmforge is built with that wiring for this comparison.

Precisions: fp32, and bf16 autocast (``torch.autocast("cpu", torch.bfloat16)``, the way nanoGPT's
``train.py`` runs bf16) for every model alike. Variants run in alternation (each round runs
``--steps`` steps of every variant) so the shared machine's noise hits all alike; wall and process
CPU time are both reported (with one thread, CPU time does not count time spent waiting for a core
that another job holds). Model-FLOPs utilization (MFU) uses nanoGPT's FLOP count (6·N + 12·L·H·D·T
per token) per CPU second against this CPU's matmul peak in the same precision, measured here in
the same way. A CPU without bf16 matrix hardware (no AMX / AVX512-BF16: its measured bf16 peak is
below its fp32 peak) runs bf16 matmuls in a slow generic kernel; bf16 rows are then skipped with
that reason unless ``--bf16-anyway``.

Shapes: nanoGPT's CPU configuration (4 layers / 128 wide / 4 heads / context 64 / batch 12) and a
larger one (6 / 384 / 6 / 256 / 8), vocabulary 65 (character-level Shakespeare).

Targets (issue 16): lmforge ≥ 1.3× nanoGPT in bf16 at both shapes, ≥ 1.3× (small) and ≥ 1.1×
(6 layers) in fp32, ≥ 1.5× transformers in each precision, bf16 MFU ≥ 40% at 6/384/256/8.

    python benchmarks/pretrain_throughput.py --threads 1            # both shapes, appends to RESULTS.md
    python benchmarks/pretrain_throughput.py --threads 1 --shapes small --precisions bf16 --no-record
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    NANOGPT,
    append_results,
    interleaved_rounds,
    load_average,
    matmul_peak,
    nanogpt_model,
    ratio_spread,
    set_threads,
)

from lmforge import ModelConfig, Transformer  # noqa: E402
from lmforge.model.size import flops_per_token  # noqa: E402
from lmforge.objectives import make_objective  # noqa: E402
from lmforge.runtime import keep_freed_memory  # noqa: E402

SHAPES = {  # name: (layers, width, heads, context, batch)
    "small": (4, 128, 4, 64, 12),
    "medium": (6, 384, 6, 256, 8),
}
PRECISIONS = ("fp32", "bf16")
Step = Callable[[], None]


def adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
    """The one optimizer of every variant: fused AdamW, decay on ≥2-D weights only (nanoGPT's groups)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=3e-4, betas=(0.9, 0.99), fused=True)


def make_step(loss_fn: Callable[[], torch.Tensor], model: torch.nn.Module, *, bf16: bool) -> Step:
    """forward + loss (under bf16 autocast or not) → backward → AdamW step → zero grads."""
    optimizer = adamw(model)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def lmforge_config(shape: tuple[int, ...], vocab: int, wiring: str) -> ModelConfig:
    """lmforge at nanoGPT's wiring (no biases, erf GELU) or GPT-2's (biases, tanh GELU)."""
    layers, width, heads, context, _ = shape
    common = dict(
        arch="decoder",
        vocab_size=vocab,
        max_seq_len=context,
        embed_dim=width,
        num_layers=layers,
        num_heads=heads,
        position="learned",
        tie_embeddings=True,
        dropout=0.0,
        norm_eps=1e-5,
    )
    if wiring == "nanogpt":
        return ModelConfig(**common, bias=False, norm_bias=False, activation="gelu")
    return ModelConfig(**common, bias=True, activation="gelu_tanh")


def lmforge_step(config: ModelConfig, x: torch.Tensor, y: torch.Tensor, *, bf16: bool) -> tuple[Step, int]:
    """lmforge's model with its own causal-LM objective (the loss its training loop computes)."""
    model = Transformer(config).train()
    objective = make_objective("causal_lm")
    batch = {"input_ids": x, "labels": y}
    n = y.numel()

    def loss() -> torch.Tensor:
        return objective(model, batch).loss_sum / n

    return make_step(loss, model, bf16=bf16), model.num_params()


def nanogpt_step(nano: object, shape: tuple[int, ...], vocab: int, x, y, *, bf16: bool) -> tuple[Step, int]:  # noqa: ANN001
    """nanoGPT's GPT at bias=False, no dropout, with its own loss (``model(x, y)``)."""
    layers, width, heads, context, _ = shape
    config = nano.GPTConfig(  # type: ignore[attr-defined]
        block_size=context,
        vocab_size=vocab,
        n_layer=layers,
        n_head=heads,
        n_embd=width,
        dropout=0.0,
        bias=False,
    )
    model = nano.GPT(config).train()  # type: ignore[attr-defined]
    return make_step(lambda: model(x, y)[1], model, bf16=bf16), sum(p.numel() for p in model.parameters())


def transformers_step(shape: tuple[int, ...], vocab: int, x, y, *, bf16: bool) -> tuple[Step, int]:  # noqa: ANN001
    """transformers' GPT2LMHeadModel (SDPA attention), cross-entropy on its logits."""
    import transformers

    transformers.logging.set_verbosity_error()
    layers, width, heads, context, _ = shape
    config = transformers.GPT2Config(
        n_layer=layers,
        n_head=heads,
        n_embd=width,
        n_positions=context,
        vocab_size=vocab,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = transformers.GPT2LMHeadModel(config).train()

    def loss() -> torch.Tensor:
        logits = model(input_ids=x).logits
        return F.cross_entropy(logits.float().view(-1, vocab), y.view(-1))

    return make_step(loss, model, bf16=bf16), sum(p.numel() for p in model.parameters())


def build_variants(
    shape: tuple[int, ...], vocab: int, precision: str, peers: list[str], nano: object | None
) -> tuple[dict[str, Step], dict[str, int]]:
    _, _, _, context, batch = shape
    torch.manual_seed(0)
    x = torch.randint(0, vocab, (batch, context))
    y = torch.randint(0, vocab, (batch, context))
    bf16 = precision == "bf16"
    steps: dict[str, Step] = {}
    params: dict[str, int] = {}
    if "nanogpt" in peers and nano is not None:
        steps["nanoGPT"], params["nanoGPT"] = nanogpt_step(nano, shape, vocab, x, y, bf16=bf16)
        config = lmforge_config(shape, vocab, "nanogpt")
        steps["lmforge (nanoGPT wiring)"], params["lmforge (nanoGPT wiring)"] = lmforge_step(
            config, x, y, bf16=bf16
        )
    if "transformers" in peers:
        steps["transformers GPT-2"], params["transformers GPT-2"] = transformers_step(
            shape, vocab, x, y, bf16=bf16
        )
        config = lmforge_config(shape, vocab, "gpt2")
        steps["lmforge (GPT-2 wiring)"], params["lmforge (GPT-2 wiring)"] = lmforge_step(
            config, x, y, bf16=bf16
        )
    return steps, params


PAIRS = (("lmforge (nanoGPT wiring)", "nanoGPT"), ("lmforge (GPT-2 wiring)", "transformers GPT-2"))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine)")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    parser.add_argument(
        "--peers", nargs="+", default=["nanogpt", "transformers"], choices=["nanogpt", "transformers"]
    )
    parser.add_argument("--vocab", type=int, default=65, help="65: character-level Shakespeare, as nanoGPT")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--bf16-anyway", action="store_true", help="time bf16 even without bf16 hardware")
    parser.add_argument(
        "--keep-memory",
        action="store_true",
        help="let the allocator keep freed memory, as lmforge's training loop does on a CPU "
        "(lmforge.runtime.keep_freed_memory); process-wide, so for every model alike",
    )
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    set_threads(args.threads)
    nano = nanogpt_model() if "nanogpt" in args.peers else None
    if "nanogpt" in args.peers and nano is None:
        print(f"nanoGPT skipped: {NANOGPT / 'model.py'} not found (../shared/peers/nanogpt is absent)")

    load_before = load_average()
    peaks = {p: matmul_peak(torch.float32 if p == "fp32" else torch.bfloat16) for p in PRECISIONS}
    peak_text = ", ".join(f"{p} {v / 1e9:,.1f} GFLOP/s" for p, v in peaks.items())
    print(f"matmul peak per CPU second: {peak_text}", flush=True)
    notes = []
    if args.keep_memory:
        kept = keep_freed_memory()
        notes.append(
            "Allocator: freed memory kept for reuse (`--keep-memory`, as lmforge's training loop sets it "
            f"on a CPU), for every model alike{'' if kept else ' — not taken here (no glibc)'}."
        )
        print(notes[-1], flush=True)
    if "bf16" in args.precisions and peaks["bf16"] < peaks["fp32"] and not args.bf16_anyway:
        args.precisions = [p for p in args.precisions if p != "bf16"]
        notes.append(
            f"**bf16 not timed: this CPU has no bf16 matrix hardware** (measured bf16 matmul "
            f"{peaks['bf16'] / 1e9:.1f} GFLOP/s vs fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s per CPU second: a generic "
            "kernel, the same for every model, so a bf16 step here measures that kernel, not the models; "
            "`--bf16-anyway` times it)."
        )
        print(notes[-1], flush=True)

    sections, headline = [], []
    for shape_name in args.shapes:
        shape = SHAPES[shape_name]
        layers, width, heads, context, batch = shape
        tokens = batch * context
        per_token = flops_per_token(lmforge_config(shape, args.vocab, "nanogpt"), seq_len=context)
        calls = 4 if shape_name == "small" else 1
        rows, results = [], {}
        for precision in args.precisions:
            steps, params = build_variants(shape, args.vocab, precision, args.peers, nano)
            wall_rounds, cpu_rounds = interleaved_rounds(steps, rounds=args.rounds, warmup=3, calls=calls)
            wall = {name: statistics.median(v) for name, v in wall_rounds.items()}
            cpu = {name: statistics.median(v) for name, v in cpu_rounds.items()}
            results[precision] = (wall, cpu, params, cpu_rounds)
            for name in steps:
                mfu = per_token * tokens / cpu[name] / peaks[precision]
                rows.append(
                    f"| {precision} | {name} | {params[name] / 1e6:.3f}M | {tokens / wall[name]:,.0f} | "
                    f"{wall[name] * 1e3:.1f} | {cpu[name] * 1e3:.1f} | {100 * mfu:.1f}% |"
                )
            print("\n".join(rows[-len(steps) :]), flush=True)
        ratio_rows = []
        for ours, peer in PAIRS:
            for precision, (wall, cpu, _, cpu_rounds) in results.items():
                if ours in wall and peer in wall:
                    ratio_rows.append(
                        f"| {ours} / {peer} | {precision} | {wall[peer] / wall[ours]:.2f}× | **{cpu[peer] / cpu[ours]:.2f}×** "
                        f"| {ratio_spread(cpu_rounds[peer], cpu_rounds[ours])} |"
                    )
                    headline.append(f"{shape_name} {precision} vs {peer}: {cpu[peer] / cpu[ours]:.2f}× (CPU)")
            if (
                "fp32" in results
                and "bf16" in results
                and ours in results["bf16"][0]
                and peer in results["fp32"][0]
            ):
                cross = results["fp32"][0][peer] / results["bf16"][0][ours]
                cross_cpu = results["fp32"][1][peer] / results["bf16"][1][ours]
                ratio_rows.append(
                    f"| {ours} bf16 / {peer} fp32 (*cross-precision*) | — | {cross:.2f}× | {cross_cpu:.2f}× | — |"
                )
        sections.append(
            f"**{layers} layers / {width} wide / {heads} heads / context {context} / batch {batch}, vocab {args.vocab}** "
            f"({tokens:,} tokens per step, {per_token * tokens / 1e9:.1f} GFLOP per step by nanoGPT's count)\n\n"
            "| precision | variant | parameters | tokens/s | wall ms/step | CPU ms/step | MFU |\n"
            "|---|---|---:|---:|---:|---:|---:|\n" + "\n".join(rows) + "\n\n"
            "| speed, lmforge / peer (peer step time / lmforge step time) | precision | wall | CPU (headline) "
            "| CPU, per-round quartiles |\n|---|---|---:|---:|---:|\n"
            + "\n".join(ratio_rows)
        )
        print(sections[-1], flush=True)

    body = (
        f"Train step (forward + loss + backward + fused AdamW), {args.threads} thread(s), medians of {args.rounds} "
        "interleaved rounds; wall and process-CPU time per step. The headline ratios are of CPU time: on a shared "
        "machine the wall time of one thread also counts the time other jobs held its core; beside them, the "
        "quartiles of the per-round ratios (how far the machine's noise moved one round). MFU: nanoGPT's FLOP count (6·N + 12·L·H·D·T per "
        "token, N = non-embedding parameters with the tied head) per CPU second / this CPU's measured matmul peak per "
        f"CPU second in the same precision ({peak_text}, {args.threads} thread(s)). "
        f"Load average (1/5/15 min) {load_before} before, {load_average()} after.\n\n"
        + "".join(n + "\n\n" for n in notes)
        + "\n\n".join(sections)
    )
    if args.no_record:
        print(body)
    else:
        append_results(
            "Pretraining train step vs nanoGPT and transformers (benchmarks/pretrain_throughput.py)", body
        )
    print("; ".join(headline))


if __name__ == "__main__":
    main()
