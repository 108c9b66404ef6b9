"""Learning-rate schedule factories; each takes the optimiser and the total number of optimiser steps."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR, OneCycleLR


class WarmupCosineFactor:
    """Learning-rate factor of step ``step``: linear warm-up over ``warmup_steps``, then cosine decay to
    ``min_lr_ratio`` at ``total_steps``.

    A class, not a closure: ``LambdaLR`` saves its attributes in checkpoints, and :class:`~crackclf.training.budget.
    TimeBudget` may change ``total_steps`` once it knows how many epochs fit the time budget.
    """

    def __init__(self, total_steps: int, warmup_steps: int, min_lr_ratio: float,
                 warmup_fraction: float | None = None) -> None:
        self.total_steps, self.warmup_steps, self.min_lr_ratio = int(total_steps), int(warmup_steps), min_lr_ratio
        self.warmup_fraction = warmup_fraction  # kept so that a re-planned run can fit its warm-up to the new length

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float = 0.05, min_lr_ratio: float = 0.01
) -> LambdaLR:
    """Linear warm-up over ``warmup_fraction`` of the steps, then cosine decay to ``min_lr_ratio`` × lr."""
    warmup = max(1, int(total_steps * warmup_fraction))
    return LambdaLR(optimizer, WarmupCosineFactor(total_steps, warmup, min_lr_ratio, warmup_fraction))


def set_total_steps(scheduler: object, total_steps: int, warmup_from: int | None = None) -> bool:
    """Make a :func:`warmup_cosine` schedule end (reach its lowest rate) at ``total_steps``.

    The warm-up is kept, unless ``warmup_from`` gives the steps already taken: then it becomes ``warmup_fraction``
    of the new total, never ending before the steps already taken nor longer than it was (from a short plan's
    few warm-up steps the rate climbs to its peak within a step or two).
    Returns ``False`` for a scheduler that cannot be re-planned in flight (it then runs as it was planned).
    """
    factors = [f for f in getattr(scheduler, "lr_lambdas", []) if isinstance(f, WarmupCosineFactor)]
    for factor in factors:
        fraction = getattr(factor, "warmup_fraction", None)  # None in checkpoints written before it was kept
        if warmup_from is not None and fraction is not None:
            wanted = max(int(warmup_from) + 1, int(total_steps * fraction), 1)
            factor.warmup_steps = min(factor.warmup_steps, wanted)
        factor.total_steps = max(int(total_steps), factor.warmup_steps + 1)
    return bool(factors)


def one_cycle(optimizer: torch.optim.Optimizer, total_steps: int, pct_start: float = 0.25) -> OneCycleLR:
    """One-cycle policy peaking at the optimiser's configured learning rate."""
    max_lr = [group["lr"] for group in optimizer.param_groups]
    return OneCycleLR(optimizer, max_lr=max_lr, total_steps=max(1, total_steps), pct_start=pct_start)
