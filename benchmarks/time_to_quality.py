"""Time to quality on tinyshakespeare, character level: lmforge against nanoGPT's own ``train.py``.

The peer is nanoGPT itself: its ``train.py`` run as a subprocess (from ``../shared/peers/nanogpt``,
MIT, never copied; the benchmark says so and stops when it is absent) with
``config/train_shakespeare_char.py`` and its README's CPU flags (4 layers, 4 heads, width 128,
context 64, batch 12, 2,000 iterations, no dropout, lr 1e-3 → 1e-4 cosine, 100 warmup, β2 0.99,
weight decay 0.1, clipping 1.0; fp32: nanoGPT does not autocast on a CPU), plus ``--out_dir``,
``--dataset`` (a temporary folder), ``--eval_interval`` and ``--always_save_checkpoint`` so that
its weights are saved along the way (logging only: the training is unchanged). Its data is
prepared the way its ``data/shakespeare_char/prepare.py`` does (sorted distinct characters,
first 90% / last 10%, ``train.bin`` / ``val.bin`` as uint16, ``meta.pkl``) from
``../shared/data/tinyshakespeare/input.txt``, into a temporary folder.

Both models' saved weights are scored afterwards by this script on the same fixed validation
windows: the whole validation split in consecutive windows of 64 (every character but the first
predicted once), never on random batches. Both run to the end.

Phases (each a fresh peer run, interleaved with one lmforge run):

- ``equal``: lmforge with nanoGPT's recipe and wiring (same shape, lr, schedule, batch, steps;
  learned positions, no biases, erf GELU, tied head; fp32): an implementation comparison.
- ``best``: lmforge's best recipe (``configs/pretrain/shakespeare-char-fast.yaml``) against
  nanoGPT's configuration: how soon lmforge reaches the loss nanoGPT ends at. The base is the
  peer's own time to its final loss. Target (issue 16): ≤ 0.4×.

Timing: both use one thread. They run in alternation, in slices of about one percent of each
run, so that both are at the same fraction of their own run at every switch (the peer is paused
with SIGSTOP meanwhile): load from other jobs hits both alike and neither runs alone at the end.
Training time counts the training steps only. lmforge's comes from its loop
(``TrainState.train_time_s`` / ``train_cpu_s``); the peer's from its own per-iteration log
(``time …ms``, with the paused time taken out), its evaluation-and-save iterations replaced by its
median step, and its CPU time from ``/proc`` (its utime + stime) the same way.

    python benchmarks/time_to_quality.py --threads 1                  # both phases, appends to RESULTS.md
    python benchmarks/time_to_quality.py --threads 1 --phases best --peer_steps 300 --no_record
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import pickle
import queue
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import NANOGPT, append_results, load_average, nanogpt_model, set_threads  # noqa: E402

from lmforge.cli import resolve_arguments  # noqa: E402
from lmforge.commands.pretrain import pretrain  # noqa: E402
from lmforge.pipeline.pretraining import build_pretraining  # noqa: E402
from lmforge.training import Callback, Trainer, seed_everything  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
EQUAL_RECIPE = REPO / "configs" / "pretrain" / "shakespeare-char.yaml"
BEST_RECIPE = REPO / "configs" / "pretrain" / "shakespeare-char-fast.yaml"
# nanoGPT's wiring and its CPU recipe, as overrides of the equal-recipe file.
EQUAL_OVERRIDES = {
    "model.position": "learned",
    "model.bias": "false",
    "model.norm_bias": "false",
    "model.activation": "gelu",
    "model.tie_embeddings": "true",
    "model.dropout": "0",
    "train.precision": "fp32",
    "train.batch_size": "12",
    "train.lr": "1e-3",
    "train.min_lr": "1e-4",
    "train.warmup_steps": "100",
    "train.beta2": "0.99",
    "train.weight_decay": "0.1",
    "train.grad_clip": "1.0",
}
PEER_FLAGS = [  # SOURCE.md: nanoGPT's README CPU configuration
    "--device=cpu",
    "--compile=False",
    "--eval_iters=20",
    "--log_interval=1",
    "--block_size=64",
    "--batch_size=12",
    "--n_layer=4",
    "--n_head=4",
    "--n_embd=128",
    "--dropout=0.0",
]
CONTEXT = 64


# ---- data, prepared as nanoGPT's prepare.py does ------------------------------------------------------


def prepare_char_data(text: str, folder: Path) -> dict[str, int]:
    """train.bin / val.bin (uint16 ids of the sorted distinct characters, first 90% / last 10%)
    and meta.pkl, as nanoGPT's ``data/shakespeare_char/prepare.py`` writes them. Returns stoi."""
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    n = len(text)
    folder.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", text[: int(n * 0.9)]), ("val", text[int(n * 0.9) :])):
        np.array([stoi[c] for c in part], dtype=np.uint16).tofile(folder / f"{name}.bin")
    with open(folder / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}, f)
    return stoi


def validation_windows(val_ids: np.ndarray, context: int = CONTEXT) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole validation split as consecutive windows: inputs (W, T) and targets (W, T), every
    token but the first predicted once (the last partial window is dropped)."""
    count = (len(val_ids) - 1) // context
    ids = torch.from_numpy(val_ids[: count * context + 1].astype(np.int64))
    return ids[:-1].view(count, context), ids[1:].view(count, context)


@torch.no_grad()
def score(logits_of, inputs: torch.Tensor, targets: torch.Tensor, batch: int = 64) -> float:  # noqa: ANN001
    """Mean cross-entropy (nats per character) over all windows."""
    total = 0.0
    for i in range(0, len(inputs), batch):
        logits = logits_of(inputs[i : i + batch]).float()
        total += float(
            F.cross_entropy(logits.flatten(0, 1), targets[i : i + batch].flatten(), reduction="sum")
        )
    return total / targets.numel()


# ---- the peer: nanoGPT's train.py in a subprocess -------------------------------------------------


@dataclass
class PeerPoint:
    step: int  # optimizer steps done
    train_s: float
    train_cpu_s: float
    checkpoint: Path | None = None


@dataclass
class PeerRun:
    """nanoGPT's train.py, paused (SIGSTOP) and resumed so that it advances in step with lmforge.

    A reader thread stamps each output line with its arrival time and the child's CPU seconds.
    The child cannot print while stopped, so a pause lies inside the iteration of the first line
    that arrives after the pause ended: that line's own ``time …ms`` is shortened by it."""

    process: subprocess.Popen
    out_dir: Path
    eval_interval: int
    max_iters: int
    snapshots: Path
    lines: queue.Queue = field(default_factory=queue.Queue)  # (arrival s, CPU s, text), None at the end
    pauses: list[tuple[float, float]] = field(default_factory=list)  # (stopped at, resumed at)
    dts: dict[int, float] = field(default_factory=dict)  # iteration -> its wall seconds (pauses removed)
    cpus: dict[int, float] = field(default_factory=dict)  # iteration -> its CPU seconds
    own_evals: dict[int, float] = field(default_factory=dict)  # nanoGPT's own 20-batch val loss
    checkpoints: dict[int, Path] = field(default_factory=dict)
    last_iter: int = -1
    log: list[str] = field(default_factory=list)
    _stopped_at: float | None = None
    _previous_arrival: float = 0.0
    _cpu_mark: float = 0.0
    _saving: bool = False
    _ended: bool = False

    @classmethod
    def start(cls, work: Path, data_dir: Path, *, max_iters: int, eval_interval: int) -> PeerRun:
        work.mkdir(parents=True, exist_ok=True)
        # train.py reads configurator.py from its working directory: a link, not a copy.
        (work / "configurator.py").symlink_to(NANOGPT / "configurator.py")
        out_dir = work / "out"
        command = [
            sys.executable,
            "-u",
            str(NANOGPT / "train.py"),
            str(NANOGPT / "config" / "train_shakespeare_char.py"),
            *PEER_FLAGS,
            f"--max_iters={max_iters}",
            f"--lr_decay_iters={max_iters}",
            f"--out_dir={out_dir}",
            f"--dataset={data_dir}",  # an absolute path: os.path.join('data', it) is it
            f"--eval_interval={eval_interval}",
            "--always_save_checkpoint=True",
        ]
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
        process = subprocess.Popen(
            command, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        snapshots = work / "snapshots"
        snapshots.mkdir()
        run = cls(process, out_dir, eval_interval, max_iters, snapshots)
        threading.Thread(target=run._reader, daemon=True).start()
        return run

    def _reader(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            try:
                cpu = self.cpu_seconds()
            except OSError:  # the process has just exited
                cpu = math.nan
            self.lines.put((time.time(), cpu, line))
        self.lines.put(None)

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    def pause(self) -> None:
        if self.process.poll() is None and self._stopped_at is None:
            self.process.send_signal(signal.SIGSTOP)
            self._stopped_at = time.time()

    def resume(self) -> None:
        if self._stopped_at is not None:
            self.process.send_signal(signal.SIGCONT)
            self.pauses.append((self._stopped_at, time.time()))
            self._stopped_at = None

    def advance(self, steps_done: int) -> None:
        """Run until the peer has done ``steps_done`` optimizer steps (or ended), then pause."""
        self.resume()
        while self.last_iter + 1 < steps_done and self._next_line():
            pass
        self.pause()

    def finish(self) -> None:
        self.resume()
        while self._next_line():
            pass
        if self.process.wait() != 0:
            raise RuntimeError("nanoGPT's train.py failed:\n" + "\n".join(self.log[-20:]))

    def _next_line(self) -> bool:
        if self._ended:
            return False
        item = self.lines.get()
        if item is None:
            self._ended = True
            return False
        arrival, cpu, line = item
        self.log.append(line.rstrip())
        if m := re.match(r"iter (\d+): loss [\d.]+, time ([\d.]+)ms", line):
            it = int(m.group(1))
            paused = sum(end - begin for begin, end in self.pauses if self._previous_arrival < end <= arrival)
            self.dts[it] = float(m.group(2)) / 1000 - paused
            self.cpus[it] = cpu - self._cpu_mark
            self._cpu_mark, self._previous_arrival, self.last_iter = cpu, arrival, it
            if self._saving:  # "saving checkpoint" came before this iteration's step: the file is complete
                target = self.snapshots / f"step-{it}.pt"
                shutil.copyfile(self.out_dir / "ckpt.pt", target)
                self.checkpoints[it] = target
                self._saving = False
        elif m := re.match(r"step (\d+): train loss [\d.]+, val loss ([\d.]+)", line):
            self.own_evals[int(m.group(1))] = float(m.group(2))
            if int(m.group(1)) == 0:  # start-up and the first evaluation are not training
                self._cpu_mark, self._previous_arrival = cpu, arrival
        elif line.startswith("saving checkpoint"):
            self._saving = True
        return True

    def points(self) -> list[PeerPoint]:
        """Cumulative training time after each saved step. Iteration i's log line times the step
        that makes i + 1 steps done; at evaluation iterations (i % eval_interval == 0) the line
        also holds the evaluation and the save, so the median step stands in for it."""
        plain = [i for i in self.dts if i % self.eval_interval]
        median_dt = statistics.median(self.dts[i] for i in plain)
        median_cpu = statistics.median(self.cpus[i] for i in plain)
        points, wall, cpu = [], 0.0, 0.0
        for i in sorted(self.dts):
            evaluated = i % self.eval_interval == 0
            wall += median_dt if evaluated else self.dts[i]
            cpu += median_cpu if evaluated else self.cpus[i]
            if i + 1 in self.checkpoints:
                points.append(PeerPoint(i + 1, wall, cpu, self.checkpoints[i + 1]))
        return points


# ---- lmforge, in this process ------------------------------------------------------------------------


class Lockstep(Callback):
    """After each lmforge step: keep a copy of the weights every ``snapshot_every`` steps, and
    when lmforge is a slice ahead (as a fraction of its run), let the peer catch up to the same
    fraction of its own run."""

    def __init__(self, peer: PeerRun, *, snapshot_every: int, slices: int = 100) -> None:
        self.peer, self.snapshot_every, self.slices = peer, snapshot_every, slices
        self.snapshots: list[tuple[int, float, float, dict[str, torch.Tensor]]] = []
        self._next = 0.0

    def on_train_begin(self, trainer: Trainer) -> None:
        self.peer.pause()

    def on_step_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        state = trainer.state
        if state.step % self.snapshot_every == 0 or state.step == trainer.config.max_steps:
            weights = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
            self.snapshots.append((state.step, state.train_time_s, state.train_cpu_s, weights))
        done = state.step / trainer.config.max_steps
        if done >= self._next:
            self.peer.advance(math.ceil(done * self.peer.max_iters))
            self._next = done + 1 / self.slices


def char_id(tokenizer: object, char: str) -> int:
    """lmforge's id of one character (its char tokenizer puts the special tokens first)."""
    ids = tokenizer.encode(char)  # type: ignore[attr-defined]
    if len(ids) != 1:
        raise RuntimeError(f"the char tokenizer encodes {char!r} as {ids}, not one id")
    return ids[0]


def lmforge_run(recipe: Path, overrides: dict[str, str], data: Path, run_dir: Path) -> tuple[Trainer, object]:
    options = {"config": str(recipe), "data.path": str(data), "out": str(run_dir), **overrides}
    _, kwargs = resolve_arguments(pretrain, options)
    train = dataclasses.replace(kwargs["train"], progress=False, save_every=0, eval_every=0, log_every=10**9)
    seed_everything(train.seed)
    run = build_pretraining(
        model=kwargs["model"],
        tokenizer=kwargs["tokenizer"],
        data=kwargs["data"],
        train=train,
        objective=kwargs["objective"],
        run_dir=run_dir,
        progress=False,
    )
    trainer = Trainer(
        run.model, run.objective, run.train_batches, config=train, run_dir=None, tokenizer=run.tokenizer
    )
    return trainer, run


# ---- one phase ----------------------------------------------------------------------------------------


def time_to(curve: list[tuple[int, float, float, float]], target: float) -> tuple[float, float, int] | None:
    """(wall s, CPU s, step) at which a (step, wall, cpu, loss) curve first reaches ``target``,
    linear between the two scored points around it."""
    previous = (0, 0.0, 0.0, math.inf)
    for step, wall, cpu, loss in curve:
        if loss <= target:
            _, w0, c0, l0 = previous
            f = (l0 - target) / (l0 - loss) if math.isfinite(l0) and l0 > loss else 1.0
            return w0 + f * (wall - w0), c0 + f * (cpu - c0), step
        previous = (step, wall, cpu, loss)
    return None


@dataclass
class Phase:
    name: str
    recipe: Path
    overrides: dict[str, str]
    lm_curve: list[tuple[int, float, float, float]]
    peer_curve: list[tuple[int, float, float, float]]
    lm_config: object
    peer_own_final: float | None


def run_phase(name: str, args: argparse.Namespace, work: Path, nano: object, stoi: dict[str, int]) -> Phase:
    recipe, overrides = (EQUAL_RECIPE, dict(EQUAL_OVERRIDES)) if name == "equal" else (BEST_RECIPE, {})
    if name == "equal":
        overrides["train.max_steps"] = str(args.peer_steps)
    data_dir = work / "nanogpt-data"
    val = np.fromfile(data_dir / "val.bin", dtype=np.uint16)
    inputs, targets = validation_windows(val)

    peer = PeerRun.start(
        work / f"peer-{name}", data_dir, max_iters=args.peer_steps, eval_interval=args.peer_eval
    )
    trainer, run = lmforge_run(recipe, overrides, args.data, work / f"lmforge-{name}")
    steps = trainer.config.max_steps
    clock = Lockstep(peer, snapshot_every=max(1, steps // args.points))
    trainer.callbacks.append(clock)
    print(
        f"[{name}] lmforge {recipe.name} {steps} steps vs nanoGPT train.py {args.peer_steps} steps",
        flush=True,
    )
    try:
        trainer.fit()
        peer.finish()
    finally:
        if peer.process.poll() is None:
            peer.resume()
            peer.process.kill()

    # Score every saved state on the same windows (ids mapped from nanoGPT's to lmforge's table).
    to_lmforge = torch.tensor(
        [char_id(run.tokenizer, c) for c, _ in sorted(stoi.items(), key=lambda kv: kv[1])]
    )
    model = trainer.model.eval()
    lm_curve = []
    for step, wall, cpu, weights in clock.snapshots:
        model.load_state_dict(weights)  # the same windows in lmforge's ids; softmax over its whole table
        loss = score(lambda x: model(x).logits, to_lmforge[inputs], to_lmforge[targets])
        lm_curve.append((step, wall, cpu, loss))
        print(f"  lmforge step {step:5d}  {wall:7.1f} s  {cpu:7.1f} CPU s  val {loss:.4f}", flush=True)
    peer_curve = []
    for point in peer.points():
        saved = torch.load(point.checkpoint, map_location="cpu", weights_only=True)
        peer_model = nano.GPT(nano.GPTConfig(**saved["model_args"])).eval()  # type: ignore[attr-defined]
        peer_model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in saved["model"].items()})
        loss = score(
            lambda x, m=peer_model: m(x, x)[0], inputs, targets
        )  # with targets: logits at every position
        peer_curve.append((point.step, point.train_s, point.train_cpu_s, loss))
        print(
            f"  nanoGPT step {point.step:5d}  {point.train_s:7.1f} s  {point.train_cpu_s:7.1f} CPU s  val {loss:.4f}"
        )
    own = peer.own_evals.get(args.peer_steps)
    return Phase(name, recipe, overrides, lm_curve, peer_curve, trainer.config, own)


def report(phase: Phase, args: argparse.Namespace) -> str:
    lm_end, peer_end = phase.lm_curve[-1], phase.peer_curve[-1]
    peer_final = peer_end[3]
    peer_to = time_to(phase.peer_curve, peer_final)
    lm_to = time_to(phase.lm_curve, peer_final)
    assert peer_to is not None
    t = phase.lm_config
    lines = [
        "| run | steps | training wall s | training CPU s | val loss at end | time to the peer's final loss (wall / CPU s) |",
        "|---|---:|---:|---:|---:|---:|",
        f"| nanoGPT train.py, CPU config | {peer_end[0]} | {peer_end[1]:.1f} | {peer_end[2]:.1f} | {peer_final:.4f} | "
        f"{peer_to[0]:.1f} / {peer_to[1]:.1f} (step {peer_to[2]}) |",
        f"| lmforge `{phase.recipe.name}`{' + nanoGPT overrides' if phase.overrides else ''} | {lm_end[0]} | "
        f"{lm_end[1]:.1f} | {lm_end[2]:.1f} | {lm_end[3]:.4f} | "
        + (f"{lm_to[0]:.1f} / {lm_to[1]:.1f} (step {lm_to[2]})" if lm_to else "not reached")
        + " |",
        "",
    ]
    if phase.name == "equal":
        lines.append(
            f"**(a) Equal recipe** (nanoGPT's shape, wiring, lr schedule, batch {t.batch_size}, {t.max_steps} steps, fp32): "
            f"nanoGPT's training time / lmforge's: **{peer_end[1] / lm_end[1]:.2f}× wall, {peer_end[2] / lm_end[2]:.2f}× CPU**; "
            f"final validation loss {lm_end[3]:.4f} (lmforge) vs {peer_final:.4f} (nanoGPT)."
            + (
                f" nanoGPT's own estimate at its end (20 random batches): {phase.peer_own_final:.4f}."
                if phase.peer_own_final
                else ""
            )
        )
    else:
        ratio = (
            f"**{lm_to[0] / peer_to[0]:.2f}× wall, {lm_to[1] / peer_to[1]:.2f}× CPU**"
            if lm_to
            else "not reached"
        )
        lines.append(
            f"**(b) lmforge's best recipe** (`{phase.recipe.relative_to(REPO)}`: {t.max_steps} steps, batch {t.batch_size}, "
            f"lr {t.lr:g} → {t.final_lr:g} {t.schedule}, {t.precision}) reaches nanoGPT's final validation loss "
            f"{peer_final:.4f} in {ratio} nanoGPT's time to it (target ≤ 0.4×)."
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--phases", nargs="+", default=["equal", "best"], choices=["equal", "best"])
    parser.add_argument(
        "--peer_steps", type=int, default=2000, help="nanoGPT's max_iters (its CPU config: 2000)"
    )
    parser.add_argument(
        "--peer_eval", type=int, default=100, help="nanoGPT's eval_interval: a saved state every N steps"
    )
    parser.add_argument("--points", type=int, default=40, help="lmforge states kept (and scored) per run")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads of both (1 on a shared machine)"
    )
    parser.add_argument("--no_record", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args()
    set_threads(args.threads)
    nano = nanogpt_model()
    if nano is None or not (NANOGPT / "train.py").is_file():
        sys.exit(
            f"skipped: nanoGPT's model.py and train.py not found in {NANOGPT} (../shared/peers/nanogpt is absent)"
        )
    if not args.data.is_file():
        sys.exit(f"skipped: {args.data} not found (../shared/data/tinyshakespeare/input.txt)")
    load_before = load_average()
    sections = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        stoi = prepare_char_data(args.data.read_text(encoding="utf-8"), work / "nanogpt-data")
        val_len = len(np.fromfile(work / "nanogpt-data" / "val.bin", dtype=np.uint16))
        for name in args.phases:
            sections.append(report(run_phase(name, args, work, nano, stoi), args))
            print(sections[-1], flush=True)
    inputs, _ = validation_windows(np.zeros(val_len, dtype=np.uint16))
    body = (
        "Character-level tinyshakespeare, data prepared as nanoGPT's prepare.py does (first 90% of the characters "
        f"train, last 10% validate). Validation loss of both models' saved weights on the same {len(inputs):,} "
        f"consecutive windows of {CONTEXT} (the whole validation split, {inputs.numel():,} targets), scored by this "
        "script. Peer: nanoGPT's own train.py as a subprocess, `config/train_shakespeare_char.py` with its README's CPU "
        f"flags ({' '.join(PEER_FLAGS)} --max_iters={args.peer_steps}), weights saved every {args.peer_eval} steps. "
        f"{args.threads} thread(s) each; the two runs alternate in slices of 1% of each run (the peer paused meanwhile); "
        "training time only (evaluation and saving excluded for both).\n\n"
        + "\n\n".join(sections)
        + f"\n\nLoad average (1/5/15 min) {load_before} before, {load_average()} after: the cores are shared "
        "with other jobs, so wall times are inflated and noisy; the CPU-time figures are the steadier ones."
    )
    if args.no_record:
        print(body)
    else:
        append_results(
            "Time to quality on tinyshakespeare vs nanoGPT's train.py (benchmarks/time_to_quality.py)", body
        )


if __name__ == "__main__":
    main()
