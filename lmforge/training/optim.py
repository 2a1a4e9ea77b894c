"""AdamW with weight-decay groups, and learning-rate schedules.

- AdamW (Loshchilov & Hutter 2019, decoupled weight decay), decay applied only to ≥2-D weights
  (matrices, embeddings) and never to biases or norm gains, as in GPT-2/nanoGPT's
  ``configure_optimizers``; only parameters with ``requires_grad`` are handed to the optimizer, so
  PEFT methods that freeze the base model train just their own parameters.
- Schedules: linear warmup, then cosine (Loshchilov & Hutter 2017, SGDR), linear, constant, or
  warmup-stable-decay (WSD; Hu et al. 2024 MiniCPM, decay shape "1 − sqrt" from Hägele et al. 2024).
  A schedule is a pure function of the step, so resuming needs nothing but the step.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split into a decayed group (≥2-D) and an undecayed group (<2-D).

    Shared (tied) parameters appear once. Groups that would be empty are left out.
    """
    decay, no_decay = [], []
    for _name, param in model.named_parameters():  # named_parameters() yields a tied tensor once
        if not param.requires_grad:
            continue
        (decay if param.dim() >= 2 else no_decay).append(param)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if not groups:
        raise ValueError("the model has no trainable parameters (every parameter has requires_grad=False)")
    return groups


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters with decay groups; the fused kernel where it runs
    (CPU and CUDA floating-point parameters), else the multi-tensor ``foreach`` one."""
    groups = param_groups(model, config.weight_decay)
    kwargs = dict(lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps)
    params = [p for g in groups for p in g["params"]]
    fusable = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)
    if fusable:
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, TypeError):  # an older torch without fused AdamW on this device
            pass
    return torch.optim.AdamW(groups, foreach=True, **kwargs)


def lr_at(step: int, config: TrainConfig) -> float:
    """The learning rate of optimizer step ``step`` (0-based).

    Warmup rises linearly to ``lr`` over ``warmup_steps``; then the schedule runs from ``lr`` to
    ``final_lr`` at the last step (``max_steps - 1``)::

        cosine    final + (lr - final) · ½(1 + cos(π·p))
        linear    lr - (lr - final) · p
        constant  lr
        wsd       lr until the last ``decay_fraction`` of the steps, then
                  final + (lr - final) · (1 - sqrt(q)), q the progress through the decay
    """
    peak, final = config.lr, config.final_lr
    warmup = config.warmup_steps
    if step < warmup:
        return peak * (step + 1) / (warmup + 1)
    if config.schedule == "constant":
        return peak
    last = max(config.max_steps - 1, warmup)
    if config.schedule == "wsd":
        decay_steps = max(1, round(config.decay_fraction * config.max_steps))
        start = max(warmup, config.max_steps - decay_steps)
        if step < start:
            return peak
        q = min(1.0, (step - start) / max(1, last - start))
        return final + (peak - final) * (1.0 - math.sqrt(q))
    p = min(1.0, (step - warmup) / max(1, last - warmup))
    if config.schedule == "cosine":
        return final + (peak - final) * 0.5 * (1.0 + math.cos(math.pi * p))
    return peak - (peak - final) * p  # linear


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's learning rate (a group may scale it with an ``lr_scale`` entry)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
