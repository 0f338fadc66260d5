"""Learning-rate schedule: linear warm-up, then cosine or linear decay to ``min_lr_ratio * lr``."""

from __future__ import annotations

import math

import torch


def lr_lambda(step: int, *, warmup_steps: int, total_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """Multiplier of the base lr at ``step`` (0-based); a pure function so a resumed run matches exactly."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule == "linear":
        decay = 1.0 - progress
    else:
        raise ValueError(f"unknown lr schedule {schedule!r}; choose cosine, linear or constant")
    return min_lr_ratio + (1.0 - min_lr_ratio) * decay


def build_lr_scheduler(optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int, schedule: str,
                       min_lr_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    def fn(step: int) -> float:
        return lr_lambda(step, warmup_steps=warmup_steps, total_steps=total_steps, schedule=schedule,
                         min_lr_ratio=min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
