"""Time to quality on tinyshakespeare, character level: lmforge vs nanoGPT's CPU configuration.

The peer is nanoGPT's ``config/train_shakespeare_char.py`` with its README's CPU overrides
(4 layers, 4 heads, width 128, context 64, batch 12, 2,000 iterations, no dropout, AdamW lr 1e-3
with β2 0.99 and weight decay 0.1 on ≥2-D weights, 100 warmup steps then cosine to 1e-4, gradient
clipping at 1.0, fp32 on CPU), run as transformers' ``GPT2LMHeadModel`` with a plain PyTorch loop
(nanoGPT's ``get_batch`` random windows). nanoGPT reports validation loss ≈ 1.88 after 2,000
iterations with this configuration.

lmforge runs its own recipe (``configs/pretrain/shakespeare-char-fast.yaml``: whatever makes it
fast and sample-efficient) through ``lmforge pretrain``'s pieces: char tokenizer, token shards, the
one training loop. Both use the same split (first 90% of the characters train, last 10%
validate) and are evaluated every ``--eval_every`` steps on the *same* fixed validation windows
(evenly spaced over the validation split). Wall time counts training steps only (batch drawing,
forward, backward, optimizer), never evaluation, for both alike. The two runs are interleaved:
each time lmforge evaluates, the peer trains until its own training time has caught up, so
machine noise (other processes on a shared CPU) hits both alike. Time to the target is
interpolated linearly between the two evaluations around it.

Then lmforge trains alone for ``--minutes`` (default 10) with a longer recipe and reports the best
validation loss it reaches.

    python benchmarks/time_to_quality.py                    # full run, appends to RESULTS.md
    python benchmarks/time_to_quality.py --minutes 0 --peer_steps 300 --no_record   # a quick look
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_results  # noqa: E402

from lmforge.cli import resolve_arguments  # noqa: E402
from lmforge.commands.pretrain import pretrain  # noqa: E402
from lmforge.pipeline.pretraining import build_pretraining  # noqa: E402
from lmforge.training import Callback, Trainer, seed_everything  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
FAST_RECIPE = REPO / "configs" / "pretrain" / "shakespeare-char-fast.yaml"
LONG_RECIPE = REPO / "configs" / "pretrain" / "shakespeare-char-10min.yaml"
TARGET = 1.88


# ---- the peer: nanoGPT's CPU configuration as GPT2LMHeadModel + a plain loop --------------------


class NanoGPTPeer:
    """transformers' GPT2LMHeadModel trained the way nanoGPT's train.py trains on CPU."""

    def __init__(
        self, train_ids: np.ndarray, *, vocab_size: int, steps: int = 2000, seed: int = 1337
    ) -> None:
        import transformers

        transformers.logging.set_verbosity_error()
        torch.manual_seed(seed)
        config = transformers.GPT2Config(
            n_layer=4,
            n_head=4,
            n_embd=128,
            n_positions=64,
            vocab_size=vocab_size,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
        )
        self.model = transformers.GPT2LMHeadModel(config)
        self.model.train()
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        # nanoGPT's configure_optimizers: fused AdamW only on CUDA; on CPU the default kernel.
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
            lr=1e-3,
            betas=(0.9, 0.99),
        )
        self.data = torch.from_numpy(train_ids.astype(np.int64))
        self.generator = torch.Generator().manual_seed(seed)
        self.steps, self.step = steps, 0
        self.train_time = 0.0
        self.train_cpu = 0.0
        self.evals: list[tuple[int, float, float, float]] = []  # (step, train s, train CPU s, loss)

    def lr(self, it: int) -> float:  # nanoGPT's get_lr: linear warmup, cosine to min_lr
        warmup, decay_iters, peak, low = 100, self.steps, 1e-3, 1e-4
        if it < warmup:
            return peak * (it + 1) / (warmup + 1)
        ratio = min(1.0, (it - warmup) / (decay_iters - warmup))
        return low + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (peak - low)

    def train_step(self) -> None:
        start, cpu_start = time.perf_counter(), time.process_time()
        ix = torch.randint(len(self.data) - 64, (12,), generator=self.generator)
        x = torch.stack([self.data[i : i + 64] for i in ix.tolist()])
        y = torch.stack([self.data[i + 1 : i + 65] for i in ix.tolist()])
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr(self.step)
        logits = self.model(input_ids=x).logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.train_time += time.perf_counter() - start
        self.train_cpu += time.process_time() - cpu_start

    @torch.no_grad()
    def evaluate(self, batches: list[dict]) -> float:
        self.model.eval()
        total, count = 0.0, 0
        for batch in batches:
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"]
            total += float(
                F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
            )
            count += int((labels != -100).sum())
        self.model.train()
        return total / count

    def run_until(self, seconds: float, batches: list[dict], eval_every: int) -> None:
        """Train until this peer's training time reaches ``seconds`` (or its last step)."""
        while self.step < self.steps and self.train_time < seconds:
            self.train_step()
            if self.step % eval_every == 0 or self.step == self.steps:
                self.evals.append((self.step, self.train_time, self.train_cpu, self.evaluate(batches)))


# ---- helpers ------------------------------------------------------------------------------------------


def time_to(
    evals: list[tuple[int, float, float, float]], target: float, *, cpu: bool = False
) -> tuple[float | None, int | None]:
    """Training seconds (wall, or CPU with ``cpu``) to ``target``, linear between the evaluations
    around it, and the first evaluated step at or below it."""
    previous = (0, 0.0, 0.0, math.inf)
    for step, wall, cpu_s, loss in evals:
        if loss <= target:
            l0 = previous[3]
            t0, t1 = (previous[2], cpu_s) if cpu else (previous[1], wall)
            if math.isfinite(l0) and l0 > loss:
                return t0 + (t1 - t0) * (l0 - target) / (l0 - loss), step
            return t1, step
        previous = (step, wall, cpu_s, loss)
    return None, None


def recipe(path: Path, data: Path, out: Path, **train_overrides: object) -> dict:
    _, kwargs = resolve_arguments(pretrain, {"config": str(path), "data.path": str(data), "out": str(out)})
    kwargs["train"] = dataclasses.replace(kwargs["train"], progress=False, save_every=0, **train_overrides)
    return kwargs


class Lockstep(Callback):
    """At every lmforge evaluation: record it, then let the peer train until it has used as much
    training time as lmforge so far."""

    def __init__(self, peer: NanoGPTPeer | None, peer_batches: list[dict], eval_every: int) -> None:
        self.peer, self.peer_batches, self.eval_every = peer, peer_batches, eval_every
        self.evals: list[tuple[int, float, float, float]] = []

    def on_evaluate(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        state = trainer.state
        self.evals.append((state.step, state.train_time_s, state.train_cpu_s, metrics["eval_loss"]))
        print(
            f"  lmforge step {state.step:5d}  {state.train_time_s:7.1f} s  val {metrics['eval_loss']:.4f}",
            flush=True,
        )
        if self.peer is not None:
            self.peer.run_until(state.train_time_s, self.peer_batches, self.eval_every)
            if self.peer.evals:
                step, seconds, _, loss = self.peer.evals[-1]
                print(f"  peer    step {step:5d}  {seconds:7.1f} s  val {loss:.4f}", flush=True)


def lmforge_run(
    kwargs: dict, callback: Callback, run_dir: Path, eval_data: list[dict] | None = None
) -> tuple[Trainer, dict]:
    seed_everything(kwargs["train"].seed)
    run = build_pretraining(
        model=kwargs["model"],
        tokenizer=kwargs["tokenizer"],
        data=kwargs["data"],
        train=kwargs["train"],
        objective=kwargs["objective"],
        run_dir=run_dir,
        progress=False,
    )
    trainer = Trainer(
        run.model,
        run.objective,
        run.train_batches,
        config=kwargs["train"],
        eval_data=eval_data if eval_data is not None else list(run.eval_batches),
        run_dir=run_dir,
        tokenizer=run.tokenizer,
        run_config=run.run_config,
        callbacks=[callback],
    )
    return trainer, {"run": run}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--peer_steps", type=int, default=2000)
    parser.add_argument("--eval_every", type=int, default=50, help="evaluate both every N steps")
    parser.add_argument("--eval_batches", type=int, default=40, help="validation batches of 12 windows")
    parser.add_argument("--minutes", type=float, default=10.0, help="lmforge's long run (0: skip)")
    parser.add_argument("--steps", type=int, default=None, help="override the fast recipe's max_steps")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no_record", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.data.is_file():
        sys.exit(f"{args.data} not found (../shared/data/tinyshakespeare/input.txt)")
    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory() as tmp:
        fast = recipe(
            FAST_RECIPE,
            args.data,
            Path(tmp) / "fast",
            eval_every=args.eval_every,
            eval_batches=args.eval_batches,
            **({"max_steps": args.steps} if args.steps else {}),
        )
        clock = Lockstep(None, [], args.eval_every)
        trainer, built = lmforge_run(fast, clock, Path(tmp) / "fast")
        run = built["run"]
        # The peer's ids: nanoGPT's char table (sorted distinct characters of the whole text).
        text = args.data.read_text(encoding="utf-8")
        chars = sorted(set(text))
        peer_id = {c: i for i, c in enumerate(chars)}
        to_peer = np.zeros(run.tokenizer.vocab_size, dtype=np.int64)
        for token_id in range(run.tokenizer.vocab_size):
            piece = run.tokenizer.decode([token_id], skip_special_tokens=False)
            to_peer[token_id] = peer_id.get(piece, 0)
        train_text = text[: int(len(text) * 0.9)]
        assert run.shards["train"].num_tokens == len(train_text), "char shards must match the 90% split"
        peer_train = np.array([peer_id[c] for c in train_text], dtype=np.int64)
        peer_batches = [
            {
                "input_ids": torch.from_numpy(to_peer[b["input_ids"].numpy()]),
                "attention_mask": b["attention_mask"],
                "labels": torch.where(
                    b["labels"] >= 0, torch.from_numpy(to_peer[b["labels"].clamp(min=0).numpy()]), -100
                ),
            }
            for b in trainer.eval_data
        ]
        targets = sum(int((b["labels"] != -100).sum()) for b in peer_batches)
        peer = NanoGPTPeer(peer_train, vocab_size=len(chars), steps=args.peer_steps)
        clock.peer, clock.peer_batches = peer, peer_batches
        print(
            f"lmforge: {FAST_RECIPE.name}, {trainer.config.max_steps} steps; peer: nanoGPT CPU config, {args.peer_steps} steps"
        )
        state = trainer.fit()
        peer.run_until(math.inf, peer_batches, args.eval_every)  # the peer's remaining steps
        load_after_phase1 = os.getloadavg()

        lm_time, lm_step = time_to(clock.evals, TARGET)
        peer_time, peer_step = time_to(peer.evals, TARGET)
        lm_cpu, _ = time_to(clock.evals, TARGET, cpu=True)
        peer_cpu, _ = time_to(peer.evals, TARGET, cpu=True)
        cpu_ratio = (
            lm_cpu / (peer_cpu if peer_cpu is not None else peer.train_cpu) if lm_cpu is not None else None
        )
        peer_final = peer.evals[-1][3]
        reference = peer_time if peer_time is not None else peer.train_time
        ratio = lm_time / reference if lm_time is not None else None

        long_best = None
        if args.minutes > 0:
            from lmforge.pipeline.demo import seconds_per_step

            long = recipe(
                LONG_RECIPE, args.data, Path(tmp) / "long", max_minutes=args.minutes, eval_batches=None
            )
            long_clock = Lockstep(None, [], 0)
            # Evaluated on phase 1's windows (same char ids: the char tokenizer is deterministic).
            long_trainer, long_built = lmforge_run(
                long, long_clock, Path(tmp) / "long", eval_data=trainer.eval_data
            )
            step_s = seconds_per_step(
                long_trainer.model, long_trainer.objective, long_built["run"].train_batches, long["train"]
            )
            steps = max(100, int(0.95 * args.minutes * 60 / step_s))
            long_trainer.config = dataclasses.replace(
                long_trainer.config, max_steps=steps, eval_every=max(1, steps // 20)
            )
            print(
                f"lmforge long run: {LONG_RECIPE.name}, {steps} steps ({step_s * 1000:.0f} ms each) or {args.minutes:g} minutes"
            )
            long_state = long_trainer.fit()
            best = min(long_clock.evals, key=lambda e: e[3])
            long_best = (best, long_state, long_trainer.config)

    f = trainer.config
    body = [
        "Character-level tinyshakespeare (first 90% of the characters train, last 10% validate). "
        f"Validation loss on the same {sum(len(b['input_ids']) for b in peer_batches)} fixed windows of 64 "
        f"({targets:,} targets, evenly spaced over the validation split) for both, every {args.eval_every} steps; "
        "times are training time only (evaluation excluded, same rule for both), lmforge and the peer interleaved "
        "in lockstep. Peer: nanoGPT's CPU configuration (4 layers, 4 heads, width 128, context 64, batch 12, "
        "lr 1e-3 → 1e-4 cosine, 100 warmup, β2 0.99, no dropout, fp32) as transformers' GPT2LMHeadModel with a "
        f"plain PyTorch loop. lmforge: `{FAST_RECIPE.relative_to(REPO)}` (batch {f.batch_size}, {f.max_steps} steps, "
        f"lr {f.lr:g} → {f.final_lr:g} {f.schedule}, {f.precision}).",
        "",
        "| run | steps | training time s | val loss at end | time to 1.88 s (first eval ≤ 1.88) |",
        "|---|---:|---:|---:|---:|",
        f"| peer: nanoGPT CPU config (GPT2LMHeadModel) | {peer.step} | {peer.train_time:.1f} | {peer_final:.4f} | "
        + (f"{peer_time:.1f} (step {peer_step})" if peer_time is not None else "not reached")
        + " |",
        f"| lmforge `{FAST_RECIPE.name}` | {state.step} | {state.train_time_s:.1f} | {clock.evals[-1][3]:.4f} | "
        + (f"{lm_time:.1f} (step {lm_step})" if lm_time is not None else "not reached")
        + " |",
        "",
    ]
    if ratio is not None:
        basis = (
            "the peer's time to 1.88"
            if peer_time is not None
            else "the peer's 2,000-step time (it did not reach 1.88)"
        )
        body.append(
            f"**lmforge reaches 1.88 in {ratio:.2f}× {basis}** (target ≤ 0.5×); in CPU time "
            f"(process CPU seconds of the training steps, less sensitive to other jobs): {cpu_ratio:.2f}×."
        )
    else:
        body.append("**lmforge did not reach 1.88.**")
    if long_best is not None:
        (step, seconds, _, loss), long_state, long_config = long_best
        body.append(
            f"\nBest validation loss in {args.minutes:g} minutes of lmforge training (`{LONG_RECIPE.name}`, "
            f"max_steps {long_config.max_steps} set from a timing of the machine, batch {long_config.batch_size}, "
            f"same validation windows): **{loss:.4f}** at step {step} ({seconds:.0f} s); the run ended at step "
            f"{long_state.step} ({long_state.train_time_s:.0f} s of training)."
        )
    body.append(
        f"\nLoad average (1/5/15 min) before: {load_before[0]:.1f}/{load_before[1]:.1f}/{load_before[2]:.1f}, "
        f"after the interleaved phase: {load_after_phase1[0]:.1f}/{load_after_phase1[1]:.1f}/{load_after_phase1[2]:.1f} "
        "(the 2 cores are shared with other work: absolute times are noisy, the lockstep ratio much less)."
    )
    text_body = "\n".join(body)
    if args.no_record:
        print(text_body)
    else:
        append_results(
            "Time to validation loss 1.88 on tinyshakespeare (benchmarks/time_to_quality.py)", text_body
        )


if __name__ == "__main__":
    main()
