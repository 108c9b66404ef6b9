"""The training and evaluation orders: an epoch-seeded shuffle, whole batches that resume part-way into an epoch,
and an order that a callback (hard-example focus) can replace for one epoch.

Every order depends only on (seed, epoch): a resumed run, or any run with the same seed, sees exactly the same
batches in every epoch (the resume-exact guarantee of :mod:`crackclf.training.resume`).
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable

import torch
from torch.utils.data import BatchSampler, Sampler

__all__ = ["EpochBatchSampler", "EpochShuffle", "FocusableOrder", "WeightedEpochDraw"]


class EpochShuffle(Sampler[int]):
    """``range(size)`` in an order that depends only on (seed, epoch): the same recipe as DistributedSampler's, so
    a resumed run (or any run with this seed) sees exactly the same order in every epoch."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Draw the next iteration's order for ``epoch``."""
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


class WeightedEpochDraw(Sampler[int]):
    """This rank's share of an epoch drawn with replacement, each row in proportion to its weight (a data source's
    ``weight``), from (seed, epoch) only: every rank draws the same global order of ``world × ⌈N / world⌉`` rows
    and takes every ``world``-th from ``rank`` (the length DistributedSampler's shards have)."""

    def __init__(self, weights: torch.Tensor, seed: int, rank: int = 0, world: int = 1) -> None:
        self.weights, self.seed, self.rank, self.world, self.epoch = weights.double(), seed, rank, world, 0
        self.length = -(-len(weights) // world)

    def set_epoch(self, epoch: int) -> None:
        """Draw the next iteration's order for ``epoch``."""
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.multinomial(self.weights, self.length * self.world, replacement=True, generator=generator)
        return iter(order[self.rank :: self.world].tolist())

    def __len__(self) -> int:
        return self.length


class EpochBatchSampler(BatchSampler):
    """Batches of an epoch-seeded sampler; can start part-way into an epoch when a run resumes.

    Lightning calls ``set_epoch`` before each epoch but creates a run's first iterator before that call, so the
    epoch is handed to the inner sampler when iteration starts. ``resume_at`` = (epoch, batches already trained),
    from the checkpoint a run resumes from: that epoch continues with the batches it had not seen.
    """

    epoch = 0
    resume_at: tuple[int, int] | None = None
    # The batches handed out and not yet trained, oldest first (the loader fetches one ahead), so the training
    # step can learn which rows it trained on (crackclf.training.focus records their losses).
    pending: deque | None = None

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` next; a resume position of an earlier epoch is forgotten."""
        self.epoch = epoch
        if self.resume_at is not None and self._resume_position()[0] != epoch:
            self.resume_at = None  # the resumed epoch is over

    def _resume_position(self) -> tuple[int, int]:
        epoch, done = self.resume_at
        return (epoch + 1, 0) if done >= len(self) else (epoch, done)  # a finished epoch resumes at the next

    def __iter__(self):
        epoch, skip = self._resume_position() if self.resume_at is not None else (self.epoch, 0)
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        if self.pending is None:
            yield from itertools.islice(super().__iter__(), skip, None)
            return
        self.pending.clear()
        for batch in itertools.islice(super().__iter__(), skip, None):
            self.pending.append(batch)
            yield batch


class FocusableOrder(Sampler[int]):
    """This rank's share of the training order: the base sampler's, or in an epoch for which a drawn order was set
    (``set_train_order`` of the datamodule), that order's every ``world``-th row from ``rank``."""

    def __init__(self, base: Sampler[int], rank: int, world: int,
                 drawn: Callable[[], tuple[int, torch.Tensor] | None]) -> None:
        self.base, self.rank, self.world, self.drawn, self.epoch = base, rank, world, drawn, 0

    def set_epoch(self, epoch: int) -> None:
        """Pass the epoch on to the base sampler and remember it (a drawn order applies to one epoch)."""
        self.epoch = epoch
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def __iter__(self):
        drawn = self.drawn()
        if drawn is not None and drawn[0] == self.epoch:
            return iter(drawn[1][self.rank :: self.world][: len(self)].tolist())
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)
