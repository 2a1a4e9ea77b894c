"""Training steps of a decoder on right-padded batches: lmforge's native causal attention against
SDPA with the padding mask (an ablation inside lmforge, not a peer comparison).

A right-padded batch (every row's tokens first, as lmforge's training batches pad) goes through
packing (the position-wise layers on the real tokens only); its causal attention then needs no
mask, so the layer takes the native kernel (lmforge/kernels/causal.py). The other variant is the
same model with the layer told that the kernel does not apply: SDPA with the padding mask, as
before. One step = forward, cross-entropy over the real tokens, backward, fused AdamW, on one
fixed batch whose row lengths are drawn between T/4 and T.

    python benchmarks/padded_training.py --threads 1            # appends to RESULTS.md
    python benchmarks/padded_training.py --shapes small --no-record
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

import lmforge.model.attention as attention_module  # noqa: E402
from lmforge import ModelConfig, Transformer  # noqa: E402

SHAPES = DECODER_SHAPES


def padded_step(overrides: dict, batch: int, context: int, vocab: int) -> tuple[Callable[[], None], int]:
    """A train step on one right-padded batch, and its number of real tokens."""
    torch.manual_seed(0)
    config = ModelConfig(arch="decoder", vocab_size=vocab, max_seq_len=context, dropout=0.0, **overrides)
    model = Transformer(config).train()
    lengths = torch.randint(context // 4, context + 1, (batch,))
    ids = torch.randint(0, vocab, (batch, context))
    mask = (torch.arange(context)[None] < lengths[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)[:, 1:].reshape(-1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step() -> None:
        logits = model(ids, attention_mask=mask).logits[:, :-1]
        F.cross_entropy(logits.reshape(-1, vocab), labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, int(mask.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--vocab", type=int, default=65)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args()
    set_threads(args.threads)
    native = attention_module.native_causal_attention

    def with_kernel(step: Callable[[], None], allowed: bool) -> Callable[[], None]:
        def run() -> None:
            attention_module.native_causal_attention = native if allowed else (lambda *_: False)
            step()

        return run

    before = load_average()
    rows = []
    for name in args.shapes:
        overrides, batch, context = SHAPES[name]
        step, real = padded_step(overrides, batch, context, args.vocab)
        calls = 4 if context <= 128 else 1
        wall_rounds, cpu_rounds = interleaved_rounds(
            {"native": with_kernel(step, True), "sdpa": with_kernel(step, False)},
            rounds=args.rounds,
            calls=calls,
        )
        wall = {name: statistics.median(v) for name, v in wall_rounds.items()}
        cpu = {name: statistics.median(v) for name, v in cpu_rounds.items()}
        attention_module.native_causal_attention = native
        rows.append(
            f"| {name} (B {batch}, T {context}, {real} of {batch * context} tokens real) "
            f"| {cpu['native'] * 1e3:.1f} | {cpu['sdpa'] * 1e3:.1f} | {wall['sdpa'] / wall['native']:.2f}× "
            f"| **{cpu['sdpa'] / cpu['native']:.2f}×** | {ratio_spread(cpu_rounds['sdpa'], cpu_rounds['native'])} |"
        )
        print(rows[-1], flush=True)
    body = (
        f"Right-padded training steps, {args.threads} thread(s), medians of {args.rounds} interleaved rounds, "
        f"vocab {args.vocab}: lmforge's native causal attention (the padding skipped by packing) against "
        f"the same model on SDPA with the padding mask. An ablation inside lmforge, not a peer ratio. "
        f"Load average before {before}, after {load_average()}.\n\n"
        "| shape | native CPU ms/step | SDPA CPU ms/step | speed-up (wall) | speed-up (CPU) | CPU, per-round quartiles |\n"
        "|---|---:|---:|---:|---:|---:|\n" + "\n".join(rows)
    )
    if args.no_record:
        print(body)
    else:
        append_results("Padded training: native causal attention vs SDPA with the mask", body)


if __name__ == "__main__":
    main()
