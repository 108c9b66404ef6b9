"""Hard-example focus: later epochs draw more of their batches from the training images with the highest losses."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from crackclf.data.datamodule import CrackDataModule
from crackclf.training.focus import HardExampleFocus, focused_order
from tests.conftest import tiny_fit


def test_draws_follow_the_excess_loss_and_keep_a_uniform_share():
    losses = torch.full((1000,), 0.12)
    losses[:10] = 2.0  # ten hard rows
    order = focused_order(losses, weight=0.5, length=20_000, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(order, minlength=1000).float()
    # Half the draws go to the ten hard rows (plus their uniform share), the other half uniformly to all rows.
    assert (counts[:10].sum() / len(order)).item() == pytest.approx(0.5 + 0.5 * 10 / 1000, abs=0.02)
    assert counts[10:].mean().item() == pytest.approx(0.5 * 20_000 / 1000, rel=0.1)
    assert (counts[10:] > 0).float().mean() > 0.99  # easy rows are still seen


def test_unseen_rows_count_as_the_hardest_and_equal_losses_give_uniform_draws():
    losses = torch.full((100,), 0.1)
    losses[0], losses[1] = 1.0, float("nan")
    order = focused_order(losses, weight=0.9, length=10_000, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(order, minlength=100).float()
    assert counts[1].item() == pytest.approx(counts[0].item(), rel=0.15)
    assert counts[1] > 10 * counts[2:].mean()
    flat = focused_order(torch.full((100,), 0.3), weight=0.9, length=10_000, generator=torch.Generator().manual_seed(0))
    assert torch.bincount(flat, minlength=100).float().std() < 20  # ~binomial spread around 100 each


def test_the_same_seed_draws_the_same_order():
    losses = torch.rand(500)
    first = focused_order(losses, 0.5, 500, torch.Generator().manual_seed(7))
    assert torch.equal(first, focused_order(losses, 0.5, 500, torch.Generator().manual_seed(7)))


@pytest.mark.parametrize(("settings", "message"), [
    ({"weight": 1.0}, r"weight=1.0 must be in \[0, 1\)"), ({"weight": -0.1}, r"\[0, 1\)"),
    ({"weight": 0.5, "start": 0}, "start=0 must be >= 1"),
    ({"weight": 0.5, "uniform_last": -1}, "uniform_last=-1 must be >= 0"),
])
def test_bad_settings_are_named(settings, message):
    with pytest.raises(ValueError, match=message):
        HardExampleFocus(**settings)


class _RecordRows(pl.Callback):
    """Training rows per epoch, as the data module reports them to the training step."""

    def __init__(self) -> None:
        self.rows: dict[int, list[int]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        rows = trainer.datamodule.last_train_rows
        assert rows is not None and len(rows) == len(batch[1])
        self.rows.setdefault(trainer.current_epoch, []).extend(rows.tolist())
        # The rows really are those of the batch: the batch's labels are the labels of those rows.
        labels = trainer.datamodule._datasets["train"].labels.index_select(0, rows)
        assert torch.equal(labels, batch[1].cpu())


def _fit(tiny_dataset, tmp_path, focus: HardExampleFocus, epochs: int) -> tuple[CrackDataModule, _RecordRows]:
    recorder = _RecordRows()
    data, _ = tiny_fit(tiny_dataset, tmp_path, [focus, recorder], epochs, batch_size=8)
    return data, recorder


def test_training_records_every_loss_and_focuses_from_the_start_epoch(tiny_dataset, tmp_path):
    focus = HardExampleFocus(weight=0.7, start=1, uniform_last=0)
    data, recorder = _fit(tiny_dataset, tmp_path, focus, epochs=3)

    size = data.train_rows_count
    drawn = (size // 8) * 8  # drop_last: whole batches only
    assert sorted(recorder.rows[0]) == sorted(set(recorder.rows[0])) and len(recorder.rows[0]) == drawn
    assert not torch.isnan(focus.losses).any() and len(focus.losses) == size
    for epoch in (1, 2):  # drawn with replacement from the recorded losses: repeats, same length
        assert len(recorder.rows[epoch]) == drawn
        assert len(set(recorder.rows[epoch])) < drawn
    # The order drawn for the last epoch is the one that was trained on (the first `drawn` rows of it).
    assert focus._order[0] == 2 and focus._order[1][:drawn].tolist() == recorder.rows[2]


@pytest.mark.parametrize(("focus", "permutations"), [(HardExampleFocus(weight=0.0), (0, 1, 2)),
                                                     (HardExampleFocus(weight=0.7, start=1, uniform_last=1), (0, 2))])
def test_uniform_epochs_are_permutations(tiny_dataset, tmp_path, focus, permutations):
    """Switched off, every epoch is a permutation; switched on, so are the epochs before `start` and the last one."""
    _, recorder = _fit(tiny_dataset, tmp_path, focus, epochs=3)
    for epoch, rows in recorder.rows.items():
        assert (len(rows) == len(set(rows))) == (epoch in permutations), epoch


def test_each_rank_trains_on_its_own_share_of_the_drawn_order_in_the_epoch_it_was_drawn_for():
    from torch.utils.data import DistributedSampler

    from crackclf.data.samplers import FocusableOrder

    rows = list(range(11))
    order = torch.tensor([5, 5, 3, 9, 0, 1, 1, 7, 2, 10, 4, 6])  # 12 draws: two shards of 6 (padded, as DDP does)
    shards = [FocusableOrder(DistributedSampler(rows, 2, rank, shuffle=True, seed=1), rank, 2, lambda: (3, order))
              for rank in (0, 1)]
    for shard in shards:
        shard.set_epoch(3)
    assert [list(s) for s in shards] == [[5, 3, 0, 1, 2, 4], [5, 9, 1, 7, 10, 6]]
    for shard in shards:  # another epoch: the base sampler's permutation shard again
        shard.set_epoch(4)
    assert set(shards[0]) | set(shards[1]) == set(rows)  # a permutation of all rows, split over the ranks
    assert list(shards[0]) == list(shards[0].base)


class _InterruptAt(pl.Callback):
    """Ctrl-C just before batch ``batch`` of epoch ``epoch`` (ResumeCheckpoint then saves last.ckpt)."""

    def __init__(self, epoch: int, batch: int) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            raise KeyboardInterrupt


def test_a_run_resumed_mid_epoch_draws_what_an_uninterrupted_run_draws(tiny_dataset, tmp_path):
    from crackclf.training.resume import ResumeCheckpoint

    def fit(run: str, callbacks: list, ckpt_path: str | None = None) -> None:
        pl.seed_everything(5)
        tiny_fit(tiny_dataset, tmp_path, [HardExampleFocus(weight=0.7, start=1, uniform_last=0),
                                          ResumeCheckpoint(tmp_path / run), *callbacks], 4, batch_size=8,
                 ckpt_path=ckpt_path)

    uninterrupted, first, resumed = _RecordRows(), _RecordRows(), _RecordRows()
    fit("whole", [uninterrupted])
    with pytest.raises(SystemExit):  # Lightning exits with status 1 after a Ctrl-C; last.ckpt is saved first
        fit("cut", [first, _InterruptAt(epoch=1, batch=2)])  # inside the first focused epoch
    assert max(first.rows) == 1 and len(first.rows[1]) == 16
    fit("cut", [resumed], ckpt_path=str(tmp_path / "cut" / "last.ckpt"))
    # The resumed run finishes epoch 1 with the rows the uninterrupted run trained on; the losses recorded before the
    # interruption were kept, so the orders drawn for the later epochs are the same too.
    assert first.rows[1] + resumed.rows[1] == uninterrupted.rows[1]
    assert resumed.rows[2] == uninterrupted.rows[2] and resumed.rows[3] == uninterrupted.rows[3]


@pytest.mark.parametrize(("epochs", "first"), [(2, 1), (3, 1), (4, 2), (5, 2), (20, 2)])
def test_a_short_plan_moves_the_focus_start_forward(epochs, first):
    focus = HardExampleFocus(weight=0.5, start=2, uniform_last=1)
    assert focus.first_focused_epoch(epochs) == first
    # 3 or more epochs: at least one epoch between the first (uniform, records the losses) and the uniform last.
    assert epochs < 3 or 1 <= first < epochs - focus.uniform_last
