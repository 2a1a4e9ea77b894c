"""Pretraining train-step throughput: lmforge's decoder against transformers' GPT2LMHeadModel.

One train step = forward, cross-entropy loss, backward, AdamW step, zero grads, at equal shape (same
layers, width, heads, context, batch, vocabulary, parameter count; GPT-2 architecture: learned
positions, pre-norm LayerNorm, tanh-GELU MLP, tied embeddings, no dropout). Measured in alternation
(each round runs a few steps of every variant) so the shared machine's noise hits all alike.

Variants:
  peer fp32         transformers GPT2LMHeadModel (SDPA attention), torch AdamW defaults: how it is
                    usually run
  peer bf16+fused   the same with bf16 autocast and fused AdamW (the peer given lmforge's tricks)
  lmforge fp32      lmforge Transformer, fused AdamW with decay groups
  lmforge bf16      the same under bf16 autocast (fast on CPUs with AMX / AVX512-BF16)
  lmforge compiled  torch.compile'd, fp32 and bf16 (with --compile)

Target (PRODUCT.md): lmforge ≥ 1.5× the peer's tokens/s at 4 layers/128 wide/context 64/batch 12
and at 6 layers/384 wide/context 256/batch 8.

    python benchmarks/pretrain_throughput.py              # both shapes, appends to RESULTS.md
    python benchmarks/pretrain_throughput.py --compile    # also torch.compile variants
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_results  # noqa: E402

from lmforge import ModelConfig, Transformer  # noqa: E402

SHAPES = {  # name: (layers, width, heads, context, batch)
    "small": (4, 128, 4, 64, 12),
    "medium": (6, 384, 6, 256, 8),
}


def decay_groups(model: torch.nn.Module, weight_decay: float = 0.1) -> list[dict]:
    """Weight decay on ≥2-D weights only (matrices and embeddings), none on biases and norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def make_step(
    forward: Callable[[torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    bf16: bool,
) -> Callable[[], float]:
    vocab = None

    def step() -> float:
        nonlocal vocab
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = forward(x)
            vocab = logits.shape[-1]
            loss = F.cross_entropy(logits.float().view(-1, vocab), y.view(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    return step


def build_variants(shape: tuple[int, ...], vocab: int, compile_too: bool) -> tuple[dict, dict]:
    from transformers import GPT2Config, GPT2LMHeadModel

    layers, width, heads, context, batch = shape
    torch.manual_seed(0)
    x = torch.randint(0, vocab, (batch, context))
    y = torch.randint(0, vocab, (batch, context))
    hf_config = GPT2Config(
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
    ours_config = ModelConfig(
        arch="decoder",
        vocab_size=vocab,
        max_seq_len=context,
        embed_dim=width,
        num_layers=layers,
        num_heads=heads,
        activation="gelu_tanh",
        norm_eps=1e-5,
    )
    variants: dict[str, Callable[[], float]] = {}
    counts = {}
    for name, bf16, fused in (("peer fp32", False, False), ("peer bf16+fused", True, True)):
        model = GPT2LMHeadModel(hf_config).train()
        counts["peer"] = sum(p.numel() for p in model.parameters())
        opt = torch.optim.AdamW(decay_groups(model), lr=3e-4, fused=fused or None)
        variants[name] = make_step(lambda ids, m=model: m(input_ids=ids).logits, opt, x, y, bf16=bf16)
    kinds = [("lmforge fp32", False, False), ("lmforge bf16", True, False)]
    if compile_too:
        kinds += [("lmforge compiled fp32", False, True), ("lmforge compiled bf16", True, True)]
    for name, bf16, compiled in kinds:
        model = Transformer(ours_config).train()
        counts["lmforge"] = model.num_params()
        opt = torch.optim.AdamW(decay_groups(model), lr=3e-4, fused=True)
        forward = torch.compile(model) if compiled else model
        variants[name] = make_step(lambda ids, f=forward: f(ids).logits, opt, x, y, bf16=bf16)
    return variants, counts


def measure(
    variants: dict[str, Callable[[], float]], *, rounds: int, steps: int, warmup: int
) -> dict[str, float]:
    for step in variants.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, step in variants.items():
            start = time.perf_counter()
            for _ in range(steps):
                step()
            times[name].append((time.perf_counter() - start) / steps)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--vocab", type=int, default=65, help="65: character-level Shakespeare, as nanoGPT")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--compile", action="store_true", help="add torch.compile variants")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    sections = []
    for shape_name in args.shapes:
        shape = SHAPES[shape_name]
        layers, width, heads, context, batch = shape
        variants, counts = build_variants(shape, args.vocab, args.compile)
        assert counts["peer"] == counts["lmforge"], counts
        steps = 5 if shape_name == "small" else 1
        step_time = measure(variants, rounds=args.rounds, steps=steps, warmup=3)
        tokens = batch * context
        peer = step_time["peer fp32"]
        peer_same = step_time["peer bf16+fused"]
        best = min((n for n in step_time if n.startswith("lmforge")), key=step_time.get)
        rows = [
            f"| {name} | {tokens / t:,.0f} | {t * 1e3:.1f} | {peer / t:.2f}× |"
            for name, t in step_time.items()
        ]
        sections.append(
            f"**{layers} layers / {width} wide / {heads} heads / context {context} / batch {batch}, vocab "
            f"{args.vocab}** ({counts['lmforge'] / 1e6:.2f}M parameters each)\n\n"
            "| variant | tokens/s | ms/step | vs peer fp32 |\n|---|---:|---:|---:|\n"
            + "\n".join(rows)
            + "\n\n"
            f"Best lmforge variant ({best}): **{peer / step_time[best]:.2f}×** the peer as usually run; "
            f"{peer_same / step_time[best]:.2f}× the peer given bf16 autocast and fused AdamW too. "
            f"lmforge fp32 vs peer fp32: {peer / step_time['lmforge fp32']:.2f}×."
        )
        print(sections[-1], flush=True)

    body = (
        f"Train step (forward + loss + backward + AdamW), medians of {args.rounds} interleaved rounds.\n\n"
        + "\n\n".join(sections)
    )
    if args.no_record:
        print(body)
    else:
        append_results(
            "Pretraining train-step throughput vs transformers GPT-2 (benchmarks/pretrain_throughput.py)",
            body,
        )


if __name__ == "__main__":
    main()
