"""Learning-rate schedule factories; each takes the optimiser and the total number of optimiser steps."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR, OneCycleLR


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float = 0.05, min_lr_ratio: float = 0.01
) -> LambdaLR:
    """Linear warm-up over ``warmup_fraction`` of the steps, then cosine decay to ``min_lr_ratio`` × lr."""
    warmup = max(1, int(total_steps * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def one_cycle(optimizer: torch.optim.Optimizer, total_steps: int, pct_start: float = 0.25) -> OneCycleLR:
    """One-cycle policy peaking at the optimiser's configured learning rate."""
    max_lr = [group["lr"] for group in optimizer.param_groups]
    return OneCycleLR(optimizer, max_lr=max_lr, total_steps=max(1, total_steps), pct_start=pct_start)
