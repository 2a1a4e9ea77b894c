"""``lmforge demo``: the embedded default, end to end, in a few minutes on a laptop CPU.

No download and no data folder: the corpus is the documentation that ships inside the Python
interpreter (``pydoc_data`` topics and standard-library docstrings, see
:func:`lmforge.data.python_docs_corpus`). The demo takes the same road as ``lmforge pretrain``
(:func:`lmforge.pipeline.pretraining.build_pretraining` and the one :class:`~lmforge.training.Trainer`):
    Python docs ──byte-level BPE──► token shards ──► small GPT ──the loop──► run directory
                                                        │                         │
                                              samples before / after     lmforge generate --model RUN

The number of steps is chosen from a short timing of the machine so that training fits the time
budget (``--minutes``); a hard time limit stops it in any case.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..files import output_folder
from ..generation import generate
from ..training import TimeBudget, TrainConfig, TrainState, seed_everything
from .common import Log, silent
from .pretraining import (
    DataSection,
    ModelSection,
    TokenizerSection,
    batch_sources,
    build_pretraining,
    make_trainer,
    seconds_per_step,
)

PROMPTS = ("The list", "Return the", "If the")


@dataclass
class DemoResult:
    """What the demo produced: the run directory, samples, the validation curve."""
    run_dir: Path
    samples_before: list[str]
    samples_after: list[str]
    curve: list[tuple[int, float]]  # (step, validation loss), step 0 = before training
    state: TrainState
    extras: dict[str, Any] = field(default_factory=dict)


def demo_sections(
    *, seq_len: int = 128, vocab_size: int = 2048, width: int = 192, layers: int = 4
) -> tuple[Any, TokenizerSection, DataSection]:
    """The demo's model, tokenizer and data sections: a small GPT with RoPE, byte-level BPE on
    the Python documentation, sequences of 128 tokens, 5% of the documents held out."""
    model = ModelSection(
        arch="decoder", num_layers=layers, embed_dim=width, num_heads=max(1, width // 32), position="rope"
    )
    tokenizer = TokenizerSection(kind="bpe", vocab_size=vocab_size)
    data = DataSection(path=None, seq_len=seq_len, val_fraction=0.05, split="documents")
    return model, tokenizer, data


def demo_train_config(
    *,
    max_steps: int,
    minutes: float | None,
    batch_size: int = 16,
    precision: str = "fp32",
    progress: bool = True,
) -> TrainConfig:
    """AdamW 2e-3 → 1e-4 (cosine), 5% warmup, β2 0.99, about ten evaluations."""
    return TrainConfig(
        max_steps=max_steps,
        batch_size=batch_size,
        lr=2e-3,
        min_lr=1e-4,
        warmup_steps=max(1, min(100, max_steps // 20)),
        beta2=0.99,
        precision=precision,  # type: ignore[arg-type]
        eval_every=max(1, max_steps // 10),
        eval_batches=8,
        save_every=0,
        max_minutes=minutes,
        progress=progress,
    )


def bf16_is_fast() -> bool:
    """True on a GPU, or a CPU with AMX or AVX512-BF16 (where bf16 matmuls beat fp32)."""
    if torch.cuda.is_available():
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def calibrate(run: Any, data: DataSection, config: TrainConfig, *, minutes: float) -> tuple[int, str]:
    """Steps that fit ``minutes``, and the faster precision: fp32, or bf16 autocast where the
    hardware has bf16 units (at small widths the casts can cost more than bf16 matmuls save)."""
    probe, _ = batch_sources(
        run.shards["train"],
        run.shards["validation"],
        run.tokenizer,
        objective="causal_lm",
        data=data,
        train=config,
    )
    candidates = ["fp32", "bf16"] if bf16_is_fast() else ["fp32"]
    timings = {
        precision: seconds_per_step(
            run.model, run.objective, probe, dataclasses.replace(config, precision=precision)
        )
        for precision in candidates
    }
    precision = min(timings, key=lambda p: timings[p])
    steps = max(20, min(20_000, math.floor(minutes * 60 / timings[precision])))
    return steps, precision


def sample_texts(
    model: nn.Module,
    tokenizer: Any,
    prompts: tuple[str, ...] = PROMPTS,
    *,
    max_new_tokens: int = 40,
    seed: int = 0,
) -> list[str]:
    """A seeded sample (temperature 0.8, top-k 40) continuing each prompt, one line each."""
    texts = []
    for prompt in prompts:
        ids = torch.tensor([tokenizer.encode(prompt)], device=next(model.parameters()).device)
        out = generate(
            model,
            ids,
            max_new_tokens=max_new_tokens,
            temperature=0.8,
            top_k=40,
            eos_token_id=tokenizer.eos_id,
            generator=torch.Generator(device=ids.device).manual_seed(seed),
        )
        texts.append(" ".join(tokenizer.decode(out[0].tolist()).split()))
    return texts


def text_curve(points: list[tuple[int, float]], *, width: int = 48, height: int = 10) -> str:
    """A small terminal plot of (step, loss) points: loss on the left axis, steps below."""
    if not points:
        return "(no evaluations)"
    steps = [s for s, _ in points]
    losses = [v for _, v in points]
    low, high = min(losses), max(losses)
    span = high - low or 1.0
    last_step = max(steps) or 1
    grid = [[" "] * width for _ in range(height)]
    for step, loss in points:
        col = min(width - 1, round(step / last_step * (width - 1)))
        row = min(height - 1, round((high - loss) / span * (height - 1)))
        grid[row][col] = "●"
    lines = []
    for index, row in enumerate(grid):
        label = high - span * index / (height - 1)
        lines.append(f"{label:7.3f} ┤" + "".join(row))
    lines.append(" " * 8 + "└" + "─" * width)
    lines.append(" " * 9 + f"step 0{' ' * (width - 6 - len(str(last_step)))}{last_step}")
    return "\n".join(lines)


def save_curve_png(points: list[tuple[int, float]], path: Path) -> bool:
    """Save the validation curve as a PNG when matplotlib is installed; True if written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([s for s, _ in points], [v for _, v in points], marker="o")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("lmforge demo: GPT on the Python documentation")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def is_demo_run(out: Path) -> bool:
    """Whether ``out`` holds an earlier demo run (which a new demo replaces as a whole)."""
    try:
        return out.is_dir() and "demo:" in (out / "config.yaml").read_text(encoding="utf-8")
    except OSError:
        return False


def run_demo(
    *,
    out: Path,
    minutes: float = 3.0,
    seed: int = 0,
    max_steps: int | None = None,
    sections: tuple[Any, TokenizerSection, DataSection] | None = None,
    batch_size: int = 16,
    progress: bool = True,
    overwrite: bool = False,
    log: Log = silent,
) -> DemoResult:
    """Pretrain a small GPT on the Python documentation within ``minutes`` and save a run.

    Args:
        out: the run directory to write: new or empty, or an earlier demo run, which is replaced
            as a whole once the new one is done (anything else needs ``overwrite``).
        minutes: the training time budget (tokenizer and data preparation come on top).
        seed: seeds everything (weights, batches, samples).
        max_steps: train exactly this many steps instead of fitting the budget.
        sections: the model/tokenizer/data sections (default: :func:`demo_sections`).
        batch_size: sequences per step.
        progress: progress bars.
        overwrite: replace whatever ``out`` holds (as a whole, at the end).
        log: where the report lines go (print).
    """
    out = Path(out)
    with output_folder(out, overwrite=overwrite or is_demo_run(out)) as work:
        result = _demo(work, out, minutes, seed, max_steps, sections, batch_size, progress, log)
    log(f"demo: run directory {out} — try: lmforge generate --model {out} --prompt 'The list' --temperature 0.8")
    return result


def _demo(
    work: Path,
    out: Path,
    minutes: float,
    seed: int,
    max_steps: int | None,
    sections: tuple[Any, TokenizerSection, DataSection] | None,
    batch_size: int,
    progress: bool,
    log: Log,
) -> DemoResult:
    """The demo, writing into ``work`` (the folder that becomes ``out``)."""
    seed_everything(seed)
    model_section, tokenizer_section, data_section = sections or demo_sections()
    config = demo_train_config(
        max_steps=max_steps or 1000, minutes=minutes, batch_size=batch_size, progress=progress
    )
    started = time.perf_counter()
    log("demo: building the corpus from the Python documentation and training a byte-level BPE tokenizer")
    run = build_pretraining(
        model=model_section,
        tokenizer=tokenizer_section,
        data=data_section,
        train=config,
        run_dir=work,
        progress=progress,
    )
    shards = run.shards
    log(
        f"demo: {shards['train'].num_bytes / 1e6:.1f} MB of text → {shards['train'].num_tokens:,} training and "
        f"{shards['validation'].num_tokens:,} validation tokens (vocabulary {run.tokenizer.vocab_size}); "
        f"model: {run.model.num_params() / 1e6:.2f}M parameters ({run.model.config.num_layers} layers, "
        f"width {run.model.config.embed_dim}, RoPE)"
    )
    if max_steps is None:
        steps, precision = calibrate(run, data_section, config, minutes=minutes)
        config = demo_train_config(
            max_steps=steps,
            minutes=minutes * 1.1,
            batch_size=batch_size,
            precision=precision,
            progress=progress,
        )
        log(f"demo: {steps} steps of {precision} training fit {minutes:g} minutes on this machine")
        seed_everything(seed)

    budget = [TimeBudget(minutes)] if max_steps is None else []  # the timing was short: keep the plan honest
    trainer = make_trainer(
        run, config, out=work, callbacks=budget, extra_config={"demo": {"minutes": minutes, "seed": seed}}
    )
    before = sample_texts(run.model, run.tokenizer, seed=seed)
    initial = trainer.evaluate()["eval_loss"]
    log("\nsamples before training (random weights):")
    for prompt, text in zip(PROMPTS, before, strict=True):
        log(f"  {prompt!r:14} → {text}")
    log("")
    state = trainer.fit()
    after = sample_texts(run.model, run.tokenizer, seed=seed)
    curve = [(0, initial)] + [(int(e["step"]), float(e["eval_loss"])) for e in state.evals]
    log("\nsamples after training:")
    for prompt, text in zip(PROMPTS, after, strict=True):
        log(f"  {prompt!r:14} → {text}")
    log(f"\nvalidation loss (nats per token), {len(curve)} evaluations:")
    log(text_curve(curve))
    final = curve[-1][1]
    bpb = state.evals[-1].get("eval_bits_per_byte") if state.evals else None
    log(
        f"demo: validation loss {initial:.3f} → {final:.3f} (perplexity {math.exp(initial):.0f} → {math.exp(final):.1f}"
        + (f", {bpb:.3f} bits per byte" if bpb else "")
        + f") in {state.step} steps, {state.train_time_s:.0f} s of training, {time.perf_counter() - started:.0f} s in all"
    )
    extras: dict[str, Any] = {}
    if save_curve_png(curve, work / "validation_curve.png"):
        extras["png"] = out / "validation_curve.png"
        log(f"demo: curve saved to {extras['png']}")
    return DemoResult(
        run_dir=out, samples_before=before, samples_after=after, curve=curve, state=state, extras=extras
    )
