"""The built-in callbacks of the one training loop: early stopping, loggers, the progress bar.

The contract (the hooks and the order the loop calls them in) is :class:`lmforge.hooks.Callback`,
re-exported here. A callback reads ``trainer.model``, ``trainer.optimizer`` and ``trainer.state``
(step, tokens, losses) and may add entries to ``metrics`` (they are logged) or set
``trainer.state.should_stop``. Its ``state_dict()`` is saved in every checkpoint and given back
through ``load_state_dict()`` on resume.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from ..errors import LMForgeError
from ..hooks import Callback

if TYPE_CHECKING:
    from .loop import Trainer


class EarlyStopping(Callback):
    """Stop when the validation loss has not improved by more than ``min_delta`` for
    ``patience`` evaluations in a row."""

    def __init__(self, *, patience: int, min_delta: float = 0.0, metric: str = "eval_loss") -> None:
        if patience < 1:
            raise ValueError(f"patience must be at least 1, got {patience}")
        self.patience = patience
        self.min_delta = min_delta
        self.metric = metric
        self.best = math.inf
        self.bad_evals = 0

    def on_evaluate(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        value = metrics[self.metric]
        if value < self.best - self.min_delta:
            self.best, self.bad_evals = value, 0
        else:
            self.bad_evals += 1
            if self.bad_evals >= self.patience:
                trainer.state.should_stop = True
                trainer.state.stop_reason = (
                    f"early stopping: {self.metric} did not improve for {self.patience} evaluations"
                )

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.bad_evals = float(state["best"]), int(state["bad_evals"])


def _clean(metrics: dict[str, Any]) -> dict[str, Any]:
    """Numbers rounded for the log; non-finite floats as strings (JSON has no NaN)."""
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, float):
            out[key] = round(value, 6) if math.isfinite(value) else str(value)
        else:
            out[key] = value
    return out


class JSONLLogger(Callback):
    """Appends one JSON line per logged step (every ``every`` steps) and per evaluation to
    ``RUN_DIR/metrics.jsonl``. On resume, lines past the resumed step are dropped first, so the
    file reads as one uninterrupted run."""

    def __init__(self, path: str | Path, *, every: int = 10) -> None:
        self.path = Path(path)
        self.every = every

    def on_train_begin(self, trainer: Trainer) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        step = trainer.state.step
        if self.path.exists():
            kept = []
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    if json.loads(line).get("step", 0) <= step:
                        kept.append(line)
                except ValueError:
                    continue  # a line torn by a crash
            self.path.write_text("".join(k + "\n" for k in kept), encoding="utf-8")

    def _write(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(_clean(record)) + "\n")

    def on_step_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        step = trainer.state.step
        if step % self.every == 0 or step == 1 or step == trainer.config.max_steps:
            self._write({"step": step, **metrics})

    def on_evaluate(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        self._write({"step": trainer.state.step, **metrics})


class TensorBoardLogger(Callback):
    """Scalars to TensorBoard event files under ``log_dir`` (needs the ``tensorboard`` package)."""

    def __init__(self, log_dir: str | Path, *, every: int = 10) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise LMForgeError(
                "TensorBoard logging needs the tensorboard package: pip install tensorboard "
                "(or leave --train.tensorboard off)",
                key="train.tensorboard",
            ) from None
        self.writer = SummaryWriter(log_dir=str(log_dir))
        self.every = every

    def on_step_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        step = trainer.state.step
        if step % self.every == 0 or step == 1:
            for key, value in metrics.items():
                self.writer.add_scalar(f"train/{key}", value, step)

    def on_evaluate(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(f"eval/{key.removeprefix('eval_')}", value, trainer.state.step)
        self.writer.flush()

    def on_train_end(self, trainer: Trainer) -> None:
        self.writer.close()


class WandbLogger(Callback):
    """Weights & Biases in offline mode (files under ``RUN_DIR/wandb``; ``wandb sync`` uploads
    them later). Needs the ``wandb`` package."""

    def __init__(
        self, run_dir: str | Path, *, config: dict[str, Any], project: str = "lmforge", every: int = 10
    ):
        try:
            import wandb
        except ImportError:
            raise LMForgeError(
                "W&B logging needs the wandb package: pip install wandb (or leave --train.wandb off)",
                key="train.wandb",
            ) from None
        self.wandb = wandb
        self.run = wandb.init(
            project=project, dir=str(run_dir), mode="offline", config=config, name=Path(run_dir).name
        )
        self.every = every

    def on_step_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        step = trainer.state.step
        if step % self.every == 0 or step == 1:
            self.run.log({f"train/{k}": v for k, v in metrics.items()}, step=step)

    def on_evaluate(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        self.run.log(
            {f"eval/{k.removeprefix('eval_')}": v for k, v in metrics.items()}, step=trainer.state.step
        )

    def on_train_end(self, trainer: Trainer) -> None:
        self.run.finish()


class ProgressBar(Callback):
    """A tqdm bar over the optimizer steps with loss, tokens/s and (tqdm's own) ETA."""

    def __init__(self, *, every: int = 1) -> None:
        self.every = every
        self.bar: Any = None
        self.last_eval: float | None = None

    def on_train_begin(self, trainer: Trainer) -> None:

        self.bar = tqdm(
            total=trainer.config.max_steps,
            initial=trainer.state.step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            file=sys.stderr,
        )
        self._shown = time.perf_counter()

    def on_step_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        if self.bar is None:
            return
        self.bar.update(1)
        now = time.perf_counter()
        if now - self._shown > 0.5 or trainer.state.step == trainer.config.max_steps:
            self._shown = now
            postfix = {"loss": f"{metrics['loss']:.4f}", "tok/s": f"{metrics.get('tokens_per_s', 0):,.0f}"}
            if self.last_eval is not None:
                postfix["val"] = f"{self.last_eval:.4f}"
            self.bar.set_postfix(postfix, refresh=False)

    def on_evaluate(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        self.last_eval = metrics.get("eval_loss")

    def on_train_end(self, trainer: Trainer) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class TimeBudget(Callback):
    """Keeps a run planned for a time budget honest: once ``check_after`` steps have shown how fast
    this machine really trains, ``max_steps`` shrinks (never grows) to what still fits ``minutes``
    of training, and the progress bar's total follows — so a run planned from a short timing ends
    at its last planned step with its final evaluation, instead of being cut by the time limit
    with the bar stopped half way. The learning-rate schedule, read from ``max_steps`` at each
    step, decays to its end within the new length."""

    def __init__(self, minutes: float, *, check_after: int = 10, margin: float = 0.97) -> None:
        self.seconds = 60 * minutes
        self.check_after = check_after
        self.margin = margin
        self.adjusted_to: int | None = None

    def on_step_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        state = trainer.state
        if self.adjusted_to is not None or state.step < self.check_after:
            return
        per_step = state.train_time_s / max(state.step, 1)
        fits = state.step + int((self.margin * self.seconds - state.train_time_s) / max(per_step, 1e-9))
        fits = max(fits, state.step)
        self.adjusted_to = trainer.config.max_steps
        if fits < trainer.config.max_steps:
            trainer.config = dataclasses.replace(trainer.config, max_steps=fits)
            self.adjusted_to = fits
            for callback in trainer.callbacks:
                if isinstance(callback, ProgressBar) and callback.bar is not None:
                    callback.bar.total = fits
                    callback.bar.refresh()
