"""TrainConfig: every knob of the one training loop in one flat, typed dataclass.

The defaults follow common small-model practice (nanoGPT's ``train.py``, the GPT-3 paper's
AdamW + warmup + cosine recipe); a recipe's ``train:`` section and ``--train.field value`` flags
override them.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Literal

from ..errors import ConfigError

Schedule = Literal["cosine", "linear", "wsd", "constant"]
Precision = Literal["fp32", "bf16"]
Strategy = Literal["auto", "ddp", "fsdp"]  # how a torchrun job shares the model (one process: unused)


@dataclass
class TrainConfig:
    """How to train: optimizer, schedule, batch, precision, evaluation, checkpoints, logging."""

    max_steps: int = 1000  # optimizer steps to train for
    batch_size: int = 12  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step (one window; loss normalized over it)
    lr: float = 1e-3  # peak learning rate
    min_lr: float | None = None  # the schedule decays to this (default: lr / 10)
    schedule: Schedule = "cosine"  # after warmup: "cosine", "linear", "wsd" (warmup-stable-decay), "constant"
    warmup_steps: int = 100  # linear warmup from 0 to lr
    decay_fraction: float = 0.2  # WSD only: the final fraction of max_steps spent decaying to min_lr
    weight_decay: float = 0.1  # AdamW decoupled decay, on ≥2-D weights only (not biases, norms)
    beta1: float = 0.9  # AdamW β1
    beta2: float = 0.95  # AdamW β2
    eps: float = 1e-8  # AdamW ε
    grad_clip: float | None = 1.0  # clip the global gradient norm to this (None = no clipping)
    precision: Precision = "fp32"  # "bf16": autocast matmuls to bfloat16 (CPU with AVX512-BF16/AMX, GPU)
    compile: bool = False  # torch.compile the model (slow first steps, faster after)
    activation_checkpointing: bool = False  # recompute block activations in backward (less memory)
    eval_every: int = 250  # evaluate on validation batches every N steps (0 = only at the end)
    eval_batches: int | None = 20  # validation batches per evaluation (None = the whole split)
    early_stopping_patience: int | None = None  # stop after N evaluations without improvement
    early_stopping_min_delta: float = 0.0  # an improvement must lower eval loss by more than this
    save_every: int = 500  # write a checkpoint every N steps (0 = only at the end)
    keep_checkpoints: int = 1  # resumable checkpoints kept in RUN_DIR/checkpoints (newest)
    log_every: int = 10  # write a metrics.jsonl line every N steps
    max_minutes: float | None = None  # stop (with a checkpoint) after this much training time
    seed: int = 1337  # seeds python, numpy and torch before the model is built
    device: str = "auto"  # "auto" (cuda if present, else cpu), "cpu", "cuda", "cuda:1", ...
    strategy: Strategy = "auto"  # under torchrun: "ddp" (whole model on each rank), "fsdp" (sharded), "auto"
    tensorboard: bool = False  # also log to TensorBoard (RUN_DIR/tensorboard)
    wandb: bool = False  # also log to Weights & Biases, offline mode (RUN_DIR/wandb)
    progress: bool = True  # show a progress bar

    def __post_init__(self) -> None:
        def check(condition: bool, key: str, why: str) -> None:
            if not condition:
                raise ConfigError(f"{key} = {getattr(self, key)!r}: {why}", key=key)

        for key in ("max_steps", "batch_size", "grad_accum", "log_every"):
            check(getattr(self, key) > 0, key, "must be positive")
        for key in ("warmup_steps", "eval_every", "save_every", "keep_checkpoints"):
            check(getattr(self, key) >= 0, key, "must be 0 or more")
        check(self.keep_checkpoints >= 1, "keep_checkpoints", "must be at least 1 (resume needs one)")
        check(self.lr > 0, "lr", "must be positive")
        check(self.min_lr is None or 0 <= self.min_lr <= self.lr, "min_lr", f"must be in [0, lr {self.lr}]")
        check(0 < self.decay_fraction <= 1, "decay_fraction", "must be in (0, 1]")
        check(self.weight_decay >= 0, "weight_decay", "must be 0 or more")
        check(0 <= self.beta1 < 1, "beta1", "must be in [0, 1)")
        check(0 <= self.beta2 < 1, "beta2", "must be in [0, 1)")
        check(self.eps > 0, "eps", "must be positive")
        check(
            self.grad_clip is None or self.grad_clip > 0,
            "grad_clip",
            "must be positive (or null: no clipping)",
        )
        check(self.eval_batches is None or self.eval_batches > 0, "eval_batches", "must be positive or null")
        check(
            self.early_stopping_patience is None or self.early_stopping_patience > 0,
            "early_stopping_patience",
            "must be positive or null",
        )
        check(self.max_minutes is None or self.max_minutes > 0, "max_minutes", "must be positive or null")
        # An optional logger that is not installed fails here, before any data or model is read.
        for key, package in (("wandb", "wandb"), ("tensorboard", "tensorboard")):
            if getattr(self, key) and importlib.util.find_spec(package) is None:
                raise ConfigError(
                    f"{key} logging needs the {package} package: pip install {package} (or leave --train.{key} off)",
                    key=key,
                )

    @property
    def final_lr(self) -> float:
        """The learning rate the schedule decays to: ``min_lr``, or lr / 10 when unset."""
        return self.lr / 10 if self.min_lr is None else self.min_lr
