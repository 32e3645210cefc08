"""Optimizers and learning-rate schedules.

The schedule is a pure function of the global step, so resuming needs only the step number and
the checkpoint holds no scheduler object.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def build_optimizer(
    params, name: str, lr: float, weight_decay: float, momentum: float = 0.9
) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=True)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer {name!r} is not one of sgd, adamw")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases and norm parameters (standard practice; it only hurts them)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, total_steps: int, schedule: str, warmup_steps: int = 0) -> float:
    """Multiplier of the peak LR at ``step`` (0-based) of ``total_steps``."""
    total_steps = max(1, total_steps)
    step = min(step, total_steps)
    if schedule == "onecycle":
        # Smith & Topin 2017, as torch's OneCycleLR (cos annealing, pct_start 0.25, div 25, final 1e4).
        up = max(1, int(0.25 * total_steps))
        lo, final = 1 / 25, 1 / 25e4
        if step < up:
            return lo + (1 - lo) * (1 - math.cos(math.pi * step / up)) / 2
        t = (step - up) / max(1, total_steps - up)
        return final + (1 - final) * (1 + math.cos(math.pi * t)) / 2
    warm = 1.0
    if warmup_steps > 0 and step < warmup_steps:
        warm = 1 / 25 + (1 - 1 / 25) * step / warmup_steps
    if schedule == "cosine":
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps) if step >= warmup_steps else 0.0
        return warm * (1 + math.cos(math.pi * t)) / 2
    if schedule == "constant":
        return warm
    raise ValueError(f"schedule {schedule!r} is not one of cosine, onecycle, constant")


def set_lr(optimizer: torch.optim.Optimizer, peak: float, factor: float) -> float:
    lr = peak * factor
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
    return lr
