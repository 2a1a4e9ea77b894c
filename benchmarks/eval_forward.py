"""Evaluation passes of a decoder (forward, no gradients): Q/K/V fused and lmforge's native causal
attention against the three projections and SDPA (an ablation inside lmforge, not a peer ratio).

Without gradients, an uncached causal pass over at least as many tokens as the model is wide (an
evaluation batch: validation loss, perplexity) stacks the Q/K/V weights and takes the native
kernel (lmforge/kernels/causal.py), as training does. The other variant is the same model with
``fuse_qkv`` off in every layer: three projections and SDPA, the path such passes took before. One
call = the model's forward and the mean cross-entropy, under ``torch.no_grad()``.

    python benchmarks/eval_forward.py --threads 1            # appends to RESULTS.md
    python benchmarks/eval_forward.py --shapes small --no-record
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    DECODER_SHAPES,
    append_results,
    interleaved_rounds,
    load_average,
    ratio_spread,
    set_threads,
)

from lmforge import ModelConfig, Transformer  # noqa: E402
from lmforge.model.attention import SelfAttention  # noqa: E402

SHAPES = DECODER_SHAPES
ROUNDS = {"small": (21, 8), "medium": (11, 1), "rope-gqa": (11, 2)}  # rounds, calls a round


def eval_pass(overrides: dict, batch: int, context: int, vocab: int) -> tuple[Callable[[], None], Transformer]:
    """The mean cross-entropy of one fixed batch under no_grad, and the model."""
    torch.manual_seed(0)
    config = ModelConfig(arch="decoder", vocab_size=vocab, max_seq_len=context, dropout=0.0, **overrides)
    model = Transformer(config).eval()
    ids = torch.randint(0, vocab, (batch, context + 1))

    def run() -> None:
        with torch.no_grad():
            logits = model(ids[:, :-1]).logits
            F.cross_entropy(logits.reshape(-1, vocab), ids[:, 1:].reshape(-1))

    return run, model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--vocab", type=int, default=65)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args()
    set_threads(args.threads)

    def with_fusion(run: Callable[[], None], model: Transformer, fused: bool) -> Callable[[], None]:
        layers = [m for m in model.modules() if isinstance(m, SelfAttention)]

        def timed() -> None:
            for layer in layers:
                layer.fuse_qkv = fused
            run()

        return timed

    before = load_average()
    rows = []
    for name in args.shapes:
        overrides, batch, context = SHAPES[name]
        rounds, calls = ROUNDS[name]
        run, model = eval_pass(overrides, batch, context, args.vocab)
        _, cpu = interleaved_rounds(
            {"native": with_fusion(run, model, True), "sdpa": with_fusion(run, model, False)},
            rounds=rounds,
            calls=calls,
        )
        native, sdpa = statistics.median(cpu["native"]), statistics.median(cpu["sdpa"])
        rows.append(
            f"| {name} (B {batch}, T {context}, {overrides['num_layers']} layers / {overrides['embed_dim']}) "
            f"| {native * 1e3:.1f} | {sdpa * 1e3:.1f} | **{sdpa / native:.2f}×** "
            f"| {ratio_spread(cpu['sdpa'], cpu['native'])} |"
        )
        print(rows[-1], flush=True)
    body = (
        f"Evaluation passes (forward and mean cross-entropy under no_grad), {args.threads} thread(s), process-CPU "
        f"time, medians over rounds in alternation, vocab {args.vocab}: Q/K/V fused and the native causal "
        f"attention against the three projections and SDPA (each layer's `fuse_qkv` off). An ablation inside "
        f"lmforge, not a peer ratio. Load average before {before}, after {load_average()}.\n\n"
        "| shape | native CPU ms/pass | SDPA CPU ms/pass | speed-up (CPU) | per-round quartiles |\n"
        "|---|---:|---:|---:|---:|\n" + "\n".join(rows)
    )
    if args.no_record:
        print(body)
    else:
        append_results("Evaluation passes: fused Q/K/V and native causal attention vs SDPA", body)


if __name__ == "__main__":
    main()
