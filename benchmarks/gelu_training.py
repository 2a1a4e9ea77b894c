"""lmforge's native GELU (both forms) against PyTorch's: the operators alone, then in training steps
(an ablation inside lmforge, not a peer comparison).

1. The operators alone on one MLP activation of each shape (rows × hidden width, float32):
   forward, and backward (the input gradient), PyTorch's ``F.gelu``/``gelu_backward`` against
   ``lmforge.kernels.activation.gelu``'s native passes, called in alternation.
2. Train steps (pretrain_throughput.py's: forward, cross-entropy, backward, fused AdamW on one fixed
   batch) of a decoder with
   the erf form (nanoGPT's wiring: no biases) and one with the tanh form (GPT-2's wiring: biases),
   each against a copy of itself, same weights, whose GELU modules are ``nn.GELU`` (PyTorch's
   kernels). Everything else, the native causal attention included, is the same in both.

Variants run in alternation, many short rounds, medians of process-CPU time (1 thread: CPU time
does not count waiting for a core that another job holds); the per-round ratios' spread is shown,
since on a shared machine a step's time moves by ±20% between rounds.

    python benchmarks/gelu_training.py --threads 1            # appends to RESULTS.md
    python benchmarks/gelu_training.py --shapes small --no-record
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_results, interleaved_rounds, load_average, ratio_spread, set_threads  # noqa: E402
from pretrain_throughput import make_step  # noqa: E402  (the train step of the peer comparison)

from lmforge import ModelConfig, Transformer  # noqa: E402
from lmforge.kernels import kernel_problem  # noqa: E402
from lmforge.kernels.activation import gelu  # noqa: E402
from lmforge.model.layers import GELU  # noqa: E402

SHAPES = {  # name: (layers, width, heads, context, batch, rounds, steps a round)
    "small": (4, 128, 4, 64, 12, 31, 2),
    "medium": (6, 384, 6, 256, 8, 9, 1),
}
WIRINGS = {  # name: (activation, bias)
    "erf (nanoGPT wiring)": ("gelu", False),
    "tanh (GPT-2 wiring)": ("gelu_tanh", True),
}


def speedup(slow: list[float], fast: list[float]) -> str:
    return f"**{statistics.median(slow) / statistics.median(fast):.2f}×** ({ratio_spread(slow, fast)})"


def operators(x: torch.Tensor, dy: torch.Tensor, form: str) -> dict[str, Callable[[], object]]:
    """PyTorch's GELU and lmforge's native one, forward, and backward (the input gradient, through
    the autograd engine for both) alone."""
    leaf = x.detach().requires_grad_()
    theirs, ours = F.gelu(leaf, approximate=form), gelu(leaf, form)
    return {
        "pytorch forward": lambda: F.gelu(x, approximate=form),
        "native forward": lambda: gelu(x, form),
        "pytorch backward": lambda: torch.autograd.grad(theirs, leaf, dy, retain_graph=True),
        "native backward": lambda: torch.autograd.grad(ours, leaf, dy, retain_graph=True),
    }


def operator_rows(shapes: list[str]) -> list[str]:
    rows = []
    for name in shapes:
        _, width, _, context, batch, _, _ = SHAPES[name]
        torch.manual_seed(0)
        x, dy = torch.randn(batch * context, 4 * width) * 2, torch.randn(batch * context, 4 * width)
        for form in ("none", "tanh"):
            _, cpu = interleaved_rounds(operators(x, dy, form), rounds=15, calls=20 if name == "small" else 3)
            ms = {k: statistics.median(v) * 1e3 for k, v in cpu.items()}
            rows.append(
                f"| {'erf' if form == 'none' else 'tanh'} | {batch * context} × {4 * width} "
                f"| {ms['pytorch forward']:.3f} | {ms['native forward']:.3f} "
                f"| {speedup(cpu['pytorch forward'], cpu['native forward'])} "
                f"| {ms['pytorch backward']:.3f} | {ms['native backward']:.3f} "
                f"| {speedup(cpu['pytorch backward'], cpu['native backward'])} |"
            )
            print(rows[-1], flush=True)
    return rows


def _loss(model: nn.Module, ids: torch.Tensor, vocab: int) -> Callable[[], torch.Tensor]:
    """The next-token cross-entropy of one fixed batch."""
    inputs, labels = ids[:, :-1], ids[:, 1:].reshape(-1)
    return lambda: F.cross_entropy(model(inputs).logits.reshape(-1, vocab), labels)


def step_rows(shapes: list[str], vocab: int) -> list[str]:
    rows = []
    for name in shapes:
        layers, width, heads, context, batch, rounds, calls = SHAPES[name]
        torch.manual_seed(0)
        ids = torch.randint(0, vocab, (batch, context + 1))
        fns, steps_of = {}, {}
        for wiring, (activation, bias) in WIRINGS.items():
            config = ModelConfig(
                arch="decoder", vocab_size=vocab, max_seq_len=context, embed_dim=width, num_layers=layers,
                num_heads=heads, position="learned", tie_embeddings=True, dropout=0.0, activation=activation,
                bias=bias, norm_bias=bias,
            )  # fmt: skip
            native = Transformer(config).train()
            pytorch = copy.deepcopy(native)
            for module_name, module in list(pytorch.named_modules()):
                if isinstance(module, GELU):
                    pytorch.set_submodule(module_name, nn.GELU(approximate=module.approximate))
            for kind, model in (("native", native), ("pytorch", pytorch)):
                fns[f"{wiring} {kind}"] = make_step(_loss(model, ids, vocab), model, bf16=False)
            steps_of[wiring] = (f"{wiring} pytorch", f"{wiring} native")
        _, cpu = interleaved_rounds(fns, rounds=rounds, calls=calls)
        for wiring, (slow, fast) in steps_of.items():
            rows.append(
                f"| {wiring} | {name}: {layers} layers / {width}, B {batch}, T {context} "
                f"| {statistics.median(cpu[slow]) * 1e3:.1f} | {statistics.median(cpu[fast]) * 1e3:.1f} "
                f"| {speedup(cpu[slow], cpu[fast])} |"
            )
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--vocab", type=int, default=65)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args()
    if kernel_problem() is not None:
        sys.exit(f"gelu_training: the native kernels are unavailable here: {kernel_problem()}")
    set_threads(args.threads)
    before = load_average()
    ops = operator_rows(args.shapes)
    steps = step_rows(args.shapes, args.vocab)
    body = (
        f"{args.threads} thread(s), process-CPU time, medians over rounds in alternation (in brackets: the "
        f"per-round speed-ups' quartiles). An ablation inside lmforge, not a peer ratio. Load average "
        f"before {before}, after {load_average()}.\n\n"
        "The operators alone (ms a call; the input a decoder's MLP activation, rows × hidden width):\n\n"
        "| form | shape | PyTorch forward | native forward | speed-up | PyTorch backward | native backward "
        "| speed-up |\n|---|---|---:|---:|---:|---:|---:|---:|\n" + "\n".join(ops) + "\n\n"
        "Train steps (CPU ms a step; the same model with `nn.GELU` against lmforge's `GELU`):\n\n"
        "| GELU | shape | PyTorch's GELU | native GELU | speed-up |\n|---|---|---:|---:|---:|\n"
        + "\n".join(steps)
    )
    if args.no_record:
        print(body)
    else:
        append_results("GELU: native kernels vs PyTorch's, alone and in train steps", body)


if __name__ == "__main__":
    main()
