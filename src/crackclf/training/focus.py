"""Hard-example focus: later epochs draw more of their batches from the images the network still gets wrong.

After a couple of epochs most of this data set is learnt: the first epoch ends near 98 % validation accuracy, and
nearly every training image then has the smallest loss label smoothing allows, so a uniform epoch spends most of its
steps on images that teach nothing new. What remains to learn (thin, faint cracks; stains that look like cracks) is
a few hundred images. With ``weight`` > 0, from epoch ``start`` on, each epoch's order is drawn with replacement
from a mixture: a share ``1 - weight`` uniform over all training images (so easy images keep being seen and their
recorded loss stays current) and a share ``weight`` in proportion to how far each image's last training loss is
above the median. Epochs keep their length, so the time budget and the schedule are unchanged; only what the steps
are spent on changes. This is loss-proportional prioritised sampling (Loshchilov & Hutter, "Online batch selection
for faster training of neural networks", 2015), without importance weights, with the uniform share as the guard
against forgetting.

Losses come from the training passes themselves (augmented views, no extra forward pass). Under DDP every rank
gathers the whole epoch's losses and draws the same global order from the same seed, then takes its own shard.
"""

from __future__ import annotations

import logging
import math

import pytorch_lightning as pl
import torch

from crackclf.distributed import gather_to_cpu, reduce_to_cpu
from crackclf.errors import UsageError
from crackclf.training.contracts import TrainingData, training_data

log = logging.getLogger(__name__)


def focused_order(losses: torch.Tensor, weight: float, length: int, generator: torch.Generator) -> torch.Tensor:
    """``length`` row numbers drawn with replacement: ``1 - weight`` uniform, ``weight`` ∝ loss above the median.

    Rows never seen (``NaN`` loss) count as the hardest seen, so nothing is left out for lack of a record.
    """
    seen = ~torch.isnan(losses)
    filled = losses.clone()
    if seen.any():
        filled[~seen] = losses[seen].max()
        excess = (filled - filled.median()).clamp_min(0.0)
    else:
        excess = torch.zeros_like(losses)
    probabilities = torch.full_like(losses, (1.0 - weight) / len(losses), dtype=torch.float64)
    if excess.sum() > 0:
        probabilities += weight * excess.double() / excess.double().sum()
    else:  # nothing stands out: uniform
        probabilities.fill_(1.0 / len(losses))
    return torch.multinomial(probabilities, length, replacement=True, generator=generator)


class HardExampleFocus(pl.Callback):
    """Draw a share ``weight`` of each epoch's batches in proportion to the images' excess training loss.

    Args:
        weight: share of the draws guided by the losses (0 disables the callback; 0.5: half of each epoch).
        start: first epoch drawn that way (earlier epochs are uniform permutations and only record losses); a run
            planned too short to reach it (``trainer.max_epochs`` after the time budget) starts one epoch before its
            uniform last ones instead.
        uniform_last: the last this many epochs are uniform permutations again, so that the weights the run ends
            with (and their BatchNorm statistics) are fitted to the images as they come, not to the hard ones.
    """

    def __init__(self, weight: float, start: int = 2, uniform_last: int = 1) -> None:
        if not 0.0 <= weight < 1.0:
            raise UsageError(f"callbacks.hard_example_focus.weight={weight} must be in [0, 1) (0 switches it off).")
        if start < 1:
            raise UsageError(f"callbacks.hard_example_focus.start={start} must be >= 1: the first epoch has no "
                             "losses to focus on.")
        if uniform_last < 0:
            raise UsageError(f"callbacks.hard_example_focus.uniform_last={uniform_last} must be >= 0.")
        self.weight, self.start, self.uniform_last = float(weight), int(start), int(uniform_last)
        self.losses: torch.Tensor | None = None  # last training loss of every training row; NaN: not seen yet
        self._order: tuple[int, torch.Tensor] | None = None  # (epoch, order) last drawn
        self._rows: list[torch.Tensor] = []
        self._values: list[torch.Tensor] = []

    # A resumed run continues with the recorded losses, those of the epoch it resumes in so far, and the order drawn
    # for that epoch: it draws what an uninterrupted run would have drawn. Under DDP the checkpoint holds rank zero's
    # state only, so the other ranks' losses of the interrupted epoch are lost: those rows keep their earlier losses.
    def state_dict(self) -> dict:
        return {"losses": self.losses, "order": self._order, "epoch_rows": self._rows,
                "epoch_losses": [values.cpu() for values in self._values]}

    def load_state_dict(self, state_dict: dict) -> None:
        self.losses, self._order = state_dict.get("losses"), state_dict.get("order")
        self._rows, self._values = list(state_dict.get("epoch_rows", [])), list(state_dict.get("epoch_losses", []))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.weight and self._order is not None:
            training_data(trainer, "callbacks.hard_example_focus").set_train_order(self._order[1],
                                                                                   epoch=self._order[0])

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if not self.weight:
            return
        rows, losses = training_data(trainer, "callbacks.hard_example_focus").last_train_rows, \
            pl_module.last_sample_losses
        if rows is not None and losses is not None and len(rows) == len(losses):
            self._rows.append(rows.cpu())
            self._values.append(losses.float())  # stays on the device until the next epoch: no sync per step

    def first_focused_epoch(self, epochs: int) -> int:
        """``start``, or earlier when the run has too few epochs (a slow machine's time budget) to reach it: a run
        of 3 or more epochs always has a focused one (at least one uniform epoch has recorded every loss)."""
        return min(self.start, max(1, epochs - self.uniform_last - 1))

    # DDP: the epoch's losses are gathered over the ranks when the next epoch starts, a point every rank reaches in
    # the same order; not at on_train_epoch_end, where rank zero's progress bar may still be reducing the epoch's
    # metrics while the other ranks' bars are off (a collective there waits forever; crackclf/models/module.py).
    # The time budget's plan for this epoch (an earlier callback in the same hook) is already made here.
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.weight:
            return
        datamodule: TrainingData = training_data(trainer, "callbacks.hard_example_focus")
        size = datamodule.train_rows_count
        if self.losses is None or len(self.losses) != size:
            self.losses = torch.full((size,), float("nan"))
        rows = torch.cat(self._rows) if self._rows else torch.empty(0, dtype=torch.long)
        values = torch.cat([v.cpu() for v in self._values]) if self._values else torch.empty(0)
        self._rows, self._values = [], []  # emptied here, at the epoch's start: a run resumed mid-epoch keeps them
        if trainer.world_size > 1:  # every rank needs every rank's losses to draw the same global order
            rows, values = _gather_all(trainer, rows, values)
        self.losses[rows.long()] = values  # a row drawn twice keeps its later loss
        epoch = trainer.current_epoch
        if epoch < self.first_focused_epoch(trainer.max_epochs) or epoch >= trainer.max_epochs - self.uniform_last:
            return
        generator = torch.Generator().manual_seed(int(datamodule.seed) * 1000 + epoch)
        length = datamodule.train_draws_per_epoch
        order = focused_order(self.losses, self.weight, length, generator)
        datamodule.set_train_order(order, epoch=epoch)
        self._order = (epoch, order)
        if not trainer.is_global_zero:
            return
        unique = len(torch.unique(order))
        seen = int((~torch.isnan(self.losses)).sum())
        wrong = int((self.losses > math.log(2)).sum())  # the true class scored below 0.5 in the last pass
        log.info("epoch %d: hard-example focus (weight %.2f) draws %d rows, %d distinct, from %d (%d with a recorded "
                 "loss); %d were on the wrong side in their last training pass", epoch, self.weight, length,
                 unique, size, seen, wrong)


def _gather_all(trainer: pl.Trainer, rows: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All ranks' (rows, losses) of the epoch; shorter shards are padded with -1 rows, which are dropped."""
    strategy = trainer.strategy
    longest = int(reduce_to_cpu(strategy, torch.tensor(len(rows), dtype=torch.float32), reduce_op="max"))
    padded_rows = torch.full((longest,), -1, dtype=torch.long)
    padded_values = torch.zeros(longest)
    padded_rows[: len(rows)], padded_values[: len(values)] = rows.long(), values
    all_rows, all_values = gather_to_cpu(strategy, padded_rows, padded_values)
    keep = all_rows >= 0
    return all_rows[keep], all_values[keep]
