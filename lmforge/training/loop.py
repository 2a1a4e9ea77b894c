"""The one training loop, for pretraining and fine-tuning alike.

    for each step:  grad_accum micro-batches → objective → loss_sum / targets(window) → backward
                    → clip → AdamW step → schedule → callbacks (log, evaluate, checkpoint, …)

What varies between pretraining and fine-tuning is the objective (``objective(model, batch) ->
ObjectiveOutput``), the batches, and whether a PEFT method froze most of the model; never the
loop (STYLE.md habit 6). After nanoGPT's ``train.py`` (accumulation, clipping, bf16 autocast,
cosine schedule) with the callback hooks of Hugging Face's ``Trainer``.

Gradient accumulation normalizes by the number of targets of the whole window, counted before
the first backward, so k micro-batches give the gradient of one batch k times as large — exactly,
even when micro-batches hold different numbers of targets (padding, masked-LM selections).

Under torchrun the same loop runs on every rank (:mod:`lmforge.training.distributed`): the window's
targets are counted over all ranks, gradients sync on the window's last micro-batch only, and the
step's metrics and the decision to stop are shared, so a job of N ranks × batch b computes what
one process with batch N·b would.
"""

from __future__ import annotations

import contextlib
import copy
import math
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from ..errors import LMForgeError
from ..files import METRICS_FILE, write_run_metadata
from ..objectives.base import Batch
from ..peft import active_adapter, training_callbacks
from ..runtime import is_writer, keep_freed_memory, resolve_device, world_size
from . import distributed
from .callbacks import Callback, EarlyStopping, JSONLLogger, ProgressBar, TensorBoardLogger, WandbLogger
from .checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    release_weights,
    remove_leftovers,
    rng_state,
    save_checkpoint,
    save_sharded_checkpoint,
    set_rng_state,
    write_weights,
)
from .config import TrainConfig
from .optim import build_optimizer, lr_at, set_lr


class Objective(Protocol):
    """``objective(model, batch)`` → an output with ``loss_sum`` (scalar tensor, summed over the
    counted targets), ``num_targets`` (scalar) and ``metrics`` (dict of floats)."""

    def __call__(self, model: nn.Module, batch: Batch) -> Any: ...


class TrainingDiverged(LMForgeError):
    """The loss or the gradient became NaN/inf: training stopped before using it."""


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint (``trainer_state.json``)."""

    step: int = 0  # optimizer steps taken
    tokens_seen: int = 0  # input tokens processed (encoder + decoder inputs)
    train_time_s: float = 0.0  # wall time spent in training steps (evaluation and saving excluded)
    train_cpu_s: float = 0.0  # CPU time of this process in those steps (all threads; robust to other jobs)
    eval_time_s: float = 0.0  # time spent evaluating
    epoch: int = 0  # completed passes over a finite batch source
    best_eval_loss: float = math.inf
    evals: list[dict[str, float]] = field(default_factory=list)  # every evaluation, with its step
    last_loss: float = math.nan  # the loss of the latest step
    should_stop: bool = False  # set by a callback (early stopping) or the time limit
    stop_reason: str = ""
    interrupted: bool = False  # stopped by Ctrl-C or SIGTERM (a checkpoint was saved)
    stopped_by: str = ""  # the signal that stopped it: "SIGINT" or "SIGTERM"

    @property
    def exit_code(self) -> int:
        """The shell's convention for a job a signal stopped: 128 + its number (130, 143); 0 else."""
        if not self.interrupted:
            return 0
        return 128 + int(getattr(signal, self.stopped_by or "SIGINT"))


def default_num_targets(batch: Batch) -> int:
    """Targets of a token-level batch: labels that are not -100."""
    return int((batch["labels"] != -100).sum())


def _count_tokens(batch: Batch) -> int:
    tokens = 0
    for key in ("input_ids", "decoder_input_ids"):
        if isinstance(batch.get(key), Tensor):
            tokens += batch[key].numel()
    return tokens


class Trainer:
    """Trains ``model`` with ``objective`` on batches from ``train_data``.

    Args:
        model: the model (moved to the configured device).
        objective: ``objective(model, batch) -> ObjectiveOutput`` (lmforge.objectives).
        train_data: an iterable of batches; re-iterated when it ends (an epoch). For exact
            resume it also has ``state_dict()`` / ``load_state_dict()`` (its position).
        config: the :class:`TrainConfig`.
        eval_data: validation batches, iterated afresh at every evaluation (a list, or an
            iterable whose ``__iter__`` starts over).
        callbacks: extra :class:`Callback` objects, called before the built-in ones.
        run_dir: where config.yaml, tokenizer.json, checkpoints and metrics.jsonl go (None: no
            files, no checkpoints). Only the writer process (rank 0, :mod:`lmforge.runtime`)
            writes there and shows the progress bar; the other ranks train alike.
        tokenizer: saved into the run directory.
        run_config: the rest of the resolved config, saved as config.yaml (its ``train``
            section is set from ``config``).
        num_targets: counts the targets of a batch (default: labels != -100), used to normalize
            the loss over the accumulation window.
    """

    def __init__(
        self,
        model: nn.Module,
        objective: Objective,
        train_data: Iterable[Batch],
        *,
        config: TrainConfig,
        eval_data: Iterable[Batch] | None = None,
        callbacks: Sequence[Callback] = (),
        run_dir: str | Path | None = None,
        tokenizer: Any = None,
        run_config: dict[str, Any] | None = None,
        num_targets: Callable[[Batch], int] | None = None,
    ) -> None:
        self.config = config
        self.device = resolve_device(config.device, key="train.device")
        self.model = model.to(self.device)
        self.objective = objective
        self.train_data = train_data
        self.eval_data = eval_data
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.tokenizer = tokenizer
        self.run_config = {**(run_config or {}), "train": asdict(config)}
        self.num_targets = num_targets or default_num_targets
        self.state = TrainState()

        for stack in (getattr(model, "encoder", None), getattr(model, "decoder", None)):
            if stack is not None and hasattr(stack, "activation_checkpointing"):
                stack.activation_checkpointing = config.activation_checkpointing
        own_callbacks = training_callbacks(model)
        # Under torchrun: DDP around the model, or FSDP sharding a copy of it (the model passed in
        # gives its memory back and is filled with the trained weights at the end of fit()).
        self.distributed = distributed.active()
        self.strategy = distributed.choose(config.strategy, model, self.device) if self.distributed else None
        self.world_size = world_size()
        self._plain: nn.Module | None = None
        wrapped: nn.Module = model
        if self.strategy == "fsdp":
            if own_callbacks:
                raise LMForgeError(
                    "this PEFT method adjusts its adapter during training (its own callbacks), which "
                    "FSDP does not support: use --train.strategy ddp",
                    key="train.strategy",
                )
            self._plain = model
            self.model = wrapped = distributed.wrap(
                copy.deepcopy(model), "fsdp", device=self.device, bf16=config.precision == "bf16"
            )
            release_weights(model)
        elif self.strategy == "ddp":
            wrapped = distributed.wrap(model, "ddp", device=self.device, bf16=False)
        self._wrapped = wrapped
        self.forward_model: nn.Module = torch.compile(wrapped) if config.compile else wrapped
        self.optimizer = build_optimizer(self.model, config)
        self.trainable = [p for group in self.optimizer.param_groups for p in group["params"]]

        self.callbacks: list[Callback] = list(callbacks) + own_callbacks
        if config.early_stopping_patience is not None:
            self.callbacks.append(
                EarlyStopping(
                    patience=config.early_stopping_patience, min_delta=config.early_stopping_min_delta
                )
            )
        self.writer = is_writer()
        if self.run_dir is not None and self.writer:
            self.callbacks.append(JSONLLogger(self.run_dir / METRICS_FILE, every=config.log_every))
            if config.tensorboard:
                self.callbacks.append(TensorBoardLogger(self.run_dir / "tensorboard", every=config.log_every))
            if config.wandb:
                self.callbacks.append(
                    WandbLogger(self.run_dir, config=self.run_config, every=config.log_every)
                )
        if config.progress and self.writer:
            self.callbacks.append(ProgressBar())

        self._iterator: Iterator[Batch] | None = None
        self._interrupt_requested = False
        self._last_saved_step = -1
        self._last_eval_step = -1
        self._recent: deque[tuple[int, float]] = deque(maxlen=20)  # (tokens, seconds) of recent steps

    # ---- public API ----------------------------------------------------------------------------

    def fit(self) -> TrainState:
        """Train until ``max_steps`` (or early stopping, the time limit, Ctrl-C); evaluate and
        checkpoint along the way and at the end. Returns the final :class:`TrainState`.

        Raises:
            TrainingDiverged: the loss or gradient norm became NaN/inf (nothing was trained on it).
        """
        if self.run_dir is not None and self.writer:
            remove_leftovers(self.run_dir)
            write_run_metadata(
                self.run_dir, model=self.model, tokenizer=self.tokenizer, config=self.run_config
            )
        if self.device.type == "cpu":
            keep_freed_memory()  # a step's tensors reuse the last step's memory, not fresh pages
        self.model.train()
        self._iterator = iter(self.train_data)
        self.state.should_stop = False
        self._call("on_train_begin")
        restore_signals = self._install_signal_handlers()
        try:
            while self.state.step < self.config.max_steps and not self.state.should_stop:
                start, cpu_start, tokens_before = (
                    time.perf_counter(),
                    time.process_time(),
                    self.state.tokens_seen,
                )
                metrics = self._train_step()
                seconds = time.perf_counter() - start
                self.state.train_time_s += seconds
                self.state.train_cpu_s += time.process_time() - cpu_start
                self._recent.append((self.state.tokens_seen - tokens_before, seconds))
                metrics["tokens_per_s"] = sum(t for t, _ in self._recent) / max(
                    sum(s for _, s in self._recent), 1e-9
                )
                self._call("on_step_end", metrics)
                config = self.config  # a callback may have changed it (e.g. TimeBudget's max_steps)
                step = self.state.step
                if config.eval_every and step % config.eval_every == 0:
                    self._evaluate_and_report()
                out_of_time = (
                    config.max_minutes is not None and self.state.train_time_s >= 60 * config.max_minutes
                )
                interrupted = self._interrupt_requested
                if self.distributed:  # every rank stops at the same step: one vote
                    out_of_time, interrupted = (
                        v > 0 for v in distributed.all_sum([out_of_time, interrupted])
                    )
                if out_of_time:
                    self.state.should_stop = True
                    self.state.stop_reason = f"time limit of {config.max_minutes:g} minutes reached"
                if interrupted:
                    self.state.stopped_by = self.state.stopped_by or "SIGTERM"
                    self.state.should_stop = self.state.interrupted = True
                    self.state.stop_reason = f"interrupted ({self.state.stopped_by})"
                last = self.state.should_stop or step >= config.max_steps
                if last and not self.state.interrupted and self._last_eval_step != step:
                    self._evaluate_and_report()  # the final evaluation, before the final checkpoint
                if self.run_dir is not None and (
                    (config.save_every and step % config.save_every == 0) or last
                ):
                    self.save()
        except (RuntimeError, distributed.PeerLost) as err:
            if not self.distributed or not distributed.lost_peer(err):
                raise  # a bug or a bad batch, not a lost peer: as it is
            raise self._lost(err) from None
        finally:
            restore_signals()
            self._call("on_train_end")
        if self._plain is not None:
            try:
                self._consolidate()
            except (RuntimeError, distributed.PeerLost) as err:
                if not distributed.lost_peer(err):
                    raise
                raise self._lost(err, "while gathering the final weights") from None
        return self.state

    def _consolidate(self) -> None:
        """FSDP's end: gather the shards into the model passed in (on every rank) and, on the
        writer, put the whole weights (or the adapter) at the top of the run folder."""
        assert self._plain is not None
        full = distributed.gather_full(self.model)
        with torch.no_grad():
            for name, param in self._plain.named_parameters():
                param.data = full[name].to(self.device)
            for name, buffer in self._plain.named_buffers():
                if name in full:
                    buffer.copy_(full[name])
        self.model = self.forward_model = self._wrapped = self._plain
        self._plain = None
        if self.run_dir is not None and self.writer:
            write_weights(self.model, self.run_dir)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss (per target) and objective metrics over the validation batches
        (``eval_batches`` of them, or all); {} without validation data."""
        if self.eval_data is None:
            return {}
        was_training = self.model.training
        self.model.eval()
        loss_sum, targets = 0.0, 0
        metric_sums: dict[str, float] = {}
        try:
            for index, batch in enumerate(self.eval_data):
                if self.config.eval_batches is not None and index >= self.config.eval_batches:
                    break
                batch = self._to_device(batch)
                with self._autocast():
                    out = self.objective(self.forward_model, batch)
                n = int(out.num_targets)
                loss_sum += float(out.loss_sum)
                targets += n
                for key, value in out.metrics.items():
                    metric_sums[key] = metric_sums.get(key, 0.0) + float(value) * n
        finally:
            self.model.train(was_training)
        if self.distributed:  # each rank's share (or the same whole on every rank): summed
            loss_sum, total, metric_sums = distributed.sum_totals(loss_sum, targets, metric_sums)
            targets = int(total)
        if targets == 0:
            raise LMForgeError("the validation data has no targets to evaluate on")
        loss = loss_sum / targets
        metrics = {f"eval_{k}": v / targets for k, v in metric_sums.items() if k != "loss"}
        metrics.update(eval_loss=loss, eval_ppl=math.exp(min(loss, 50.0)))
        return metrics

    def save(self) -> Path:
        """Write a resumable checkpoint of the current step into the run directory."""
        if self.run_dir is None:
            raise ValueError("this Trainer has no run_dir to save into")
        if self.strategy == "fsdp":  # every rank writes its shards; the writer commits
            path = save_sharded_checkpoint(
                self.run_dir,
                model=self.model,
                optimizer=self.optimizer,
                state=self._state_dict(),
                keep=self.config.keep_checkpoints,
                frozen=active_adapter(self.model) is None,
            )
        elif self.writer:
            path = save_checkpoint(
                self.run_dir,
                model=self.model,
                optimizer=self.optimizer,
                state=self._state_dict(),
                keep=self.config.keep_checkpoints,
            )
        else:  # one writer: the other ranks hold the same weights
            path = self.run_dir
        self._last_saved_step = self.state.step
        if self.writer:
            self._call("on_save", path)
        return path

    def resume(self, path: str | Path | None = None) -> int:
        """Restore a checkpoint (a ``checkpoints/step-*`` folder, or the newest one of a run
        directory; default: this trainer's run_dir): weights, optimizer, RNG states, data
        position, callback states. Returns the step training continues from."""
        path = Path(path) if path is not None else self.run_dir
        if path is None:
            raise ValueError("resume() needs a path when the Trainer has no run_dir")
        saved = load_checkpoint(
            path, model=self.model, optimizer=self.optimizer, sharded=self.strategy == "fsdp"
        )
        for key, value in saved["trainer"].items():
            if key in TrainState.__dataclass_fields__:
                setattr(self.state, key, value)
        self.state.should_stop = self.state.interrupted = False
        self.state.stop_reason = self.state.stopped_by = ""
        self._last_saved_step = self._last_eval_step = self.state.step
        if saved.get("data") is not None:
            if not hasattr(self.train_data, "load_state_dict"):
                raise LMForgeError(
                    "the checkpoint holds a data position, but the batch source cannot restore one"
                )
            self.train_data.load_state_dict(saved["data"])
        for key, callback in self._keyed_callbacks().items():
            if key in saved.get("callbacks", {}):
                callback.load_state_dict(saved["callbacks"][key])
        set_rng_state(saved["rng"])
        return self.state.step

    # ---- the step ------------------------------------------------------------------------------

    def _lost(self, err: Exception, where: str = "") -> distributed.PeerLost:
        """The one line a rank stops with when a peer is gone (a collective failed in a step, an
        evaluation, a save or the final gathering of the weights): where, and how to go on."""
        reason = (
            str(err)
            if isinstance(err, distributed.PeerLost)
            else (f"another process of this job stopped ({distributed.short_reason(err)})")
        )
        # Read from the folder: a save the lost peer interrupted may or may not have completed.
        latest = latest_checkpoint(self.run_dir) if self.run_dir is not None else None
        saved = f"step {int(latest.name.removeprefix('step-'))}" if latest is not None else "none yet"
        where = where or f"at step {self.state.step + 1}"
        return distributed.PeerLost(
            f"{reason} {where}; the last checkpoint is {saved}: "
            "run the same command with --resume to continue"
        )

    def _train_step(self) -> dict[str, float]:
        config = self.config
        batches = [self._to_device(self._next_batch()) for _ in range(config.grad_accum)]
        counts = [int(self.num_targets(b)) for b in batches]
        # Normalize by the targets of the whole window, over all ranks; DDP and FSDP average the
        # gradients over the ranks, so each rank's share is scaled back up by the world size.
        window_targets = max(int(distributed.all_sum([sum(counts)])[0]), 1)
        scale = self.world_size if self.distributed else 1
        lr = lr_at(self.state.step, config)
        set_lr(self.optimizer, lr)
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        metric_sums: dict[str, float] = {}
        for index, (batch, count) in enumerate(zip(batches, counts, strict=True)):
            with distributed.gradient_sync(self._wrapped, sync=index == len(batches) - 1):
                with self._autocast():
                    out = self.objective(self.forward_model, batch)
                value = float(out.loss_sum.detach())
                if not math.isfinite(value):
                    raise self._diverged(f"the loss is {value}", micro_batch=index)
                (out.loss_sum * (scale / window_targets)).backward()
            loss_sum += value
            for key, metric in out.metrics.items():
                metric_sums[key] = metric_sums.get(key, 0.0) + float(metric) * count
        self._call("on_after_backward")
        if self.strategy == "fsdp":
            grad_norm = distributed.clip_gradients(self.trainable, config.grad_clip or math.inf)
        else:
            grad_norm = float(
                torch.nn.utils.clip_grad_norm_(self.trainable, config.grad_clip or math.inf, foreach=True)
            )
        if not math.isfinite(grad_norm):
            raise self._diverged(f"the gradient norm is {grad_norm}")
        self.optimizer.step()

        self.state.step += 1
        tokens = sum(_count_tokens(b) for b in batches)
        if self.distributed:  # the step's loss, metrics and tokens over all ranks
            loss_sum, total, metric_sums = distributed.sum_totals(loss_sum, tokens, metric_sums)
            tokens = int(total)
        self.state.tokens_seen += tokens
        loss = loss_sum / window_targets
        self.state.last_loss = loss
        metrics = {k: v / window_targets for k, v in metric_sums.items() if k != "loss"}
        metrics.update(loss=loss, lr=lr, grad_norm=grad_norm, tokens=float(self.state.tokens_seen))
        return metrics

    def _evaluate_and_report(self) -> None:
        if self.eval_data is None:
            return
        start = time.perf_counter()
        metrics = self.evaluate()
        self.state.eval_time_s += time.perf_counter() - start
        self._last_eval_step = self.state.step
        self.state.best_eval_loss = min(self.state.best_eval_loss, metrics["eval_loss"])
        self.state.evals.append({"step": self.state.step, **metrics})
        self._call("on_evaluate", metrics)

    def _next_batch(self) -> Batch:
        assert self._iterator is not None
        try:
            return next(self._iterator)
        except StopIteration:
            self.state.epoch += 1
            self._iterator = iter(self.train_data)
            try:
                return next(self._iterator)
            except StopIteration:
                raise LMForgeError("the training data yields no batches") from None

    def _to_device(self, batch: Batch) -> Batch:
        return {
            k: v.to(self.device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()
        }

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.config.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _diverged(self, what: str, *, micro_batch: int | None = None) -> TrainingDiverged:
        where = f"step {self.state.step + 1}"
        if micro_batch is not None and self.config.grad_accum > 1:
            where += f" (micro-batch {micro_batch + 1} of {self.config.grad_accum})"
        hint = "try a lower --train.lr, --train.precision fp32"
        if self.config.grad_clip is None:
            hint += ", --train.grad_clip 1.0"
        saved = f"; the last checkpoint is step {self._last_saved_step}" if self._last_saved_step >= 0 else ""
        return TrainingDiverged(f"{what} at {where}: stopped before training on it ({hint}){saved}")

    # ---- callbacks, state, signals -------------------------------------------------------------

    def _call(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)

    def _keyed_callbacks(self) -> dict[str, Callback]:
        """Callbacks under stable keys (class name, numbered when repeated) for checkpoints."""
        keyed: dict[str, Callback] = {}
        for callback in self.callbacks:
            name = type(callback).__name__
            key, n = name, 1
            while key in keyed:
                n += 1
                key = f"{name}-{n}"
            keyed[key] = callback
        return keyed

    def _state_dict(self) -> dict[str, Any]:
        trainer = asdict(self.state)
        for key in ("should_stop", "stop_reason", "interrupted", "stopped_by"):
            trainer.pop(key)
        return {
            "step": self.state.step,
            "trainer": trainer,
            "lr": lr_at(max(self.state.step - 1, 0), self.config),
            "schedule": self.config.schedule,
            "rng": rng_state(),
            "data": self.train_data.state_dict() if hasattr(self.train_data, "state_dict") else None,
            "callbacks": {k: c.state_dict() for k, c in self._keyed_callbacks().items()},
        }

    def _install_signal_handlers(self) -> Callable[[], None]:
        """Ctrl-C (SIGINT) and SIGTERM — how Docker, Kubernetes, Slurm preemption and systemd stop
        a job — both finish the step, save a checkpoint and stop; a second one aborts at once."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        self._interrupt_requested = False

        def handler(signum: int, frame: Any) -> None:
            if self._interrupt_requested:
                raise KeyboardInterrupt
            self._interrupt_requested = True
            self.state.stopped_by = signal.Signals(signum).name
            print(
                f"\nlmforge: {self.state.stopped_by}: finishing this step"
                + (" and saving a checkpoint" if self.run_dir is not None else "")
                + " (again to abort)",
                file=sys.stderr,
            )

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}

        def restore() -> None:
            for sig, old in previous.items():
                signal.signal(sig, old)

        return restore
