"""The parts that make resuming exact, one at a time: which run `resume=` picks, the epoch-seeded data order that
can start mid-epoch, and the logger that sends each metric exactly once across a kill."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from torch.utils.data import SequentialSampler

from crackclf.config import ConfigError, register_resolvers
from crackclf.data.samplers import EpochBatchSampler, EpochShuffle
from crackclf.tracking import mlflow as tracking
from crackclf.tracking.logger import ResumableMLFlowLogger
from crackclf.training.resume import LAST_CHECKPOINT, find_resume_point, lock_run, write_marker
from tests.conftest import REPO


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One MLflow store for the module (creating a SQLite store runs MLflow's migrations: seconds each time)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        yield uri


def config(*overrides: str) -> DictConfig:
    register_resolvers()  # explicitly: importing crackclf.config registers nothing
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def make_run(folder: Path, cfg: DictConfig, status: str = "RUNNING", run_id: str | None = None,
             checkpoint: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_marker(folder, cfg, run_id, status)
    if checkpoint:
        (folder / "checkpoints").mkdir(exist_ok=True)
        (folder / "checkpoints" / LAST_CHECKPOINT).write_bytes(b"checkpoint")
    return folder


# ---------------------------------------------------------------------------------------------- resume=...
def test_auto_picks_the_latest_unfinished_run_of_the_same_config(tmp_path):
    cfg = config("seed=1")
    runs = tmp_path / "runs"
    old = make_run(runs / "a", cfg, run_id="a" * 32)
    time.sleep(0.02)
    newest = make_run(runs / "b", cfg, run_id="b" * 32)
    make_run(runs / "c", cfg, status="FINISHED")  # done: nothing to resume
    make_run(runs / "d", config("seed=2"))  # another configuration
    make_run(runs / "e", cfg, checkpoint=False)  # killed before its first epoch ended
    os.utime(runs / "c" / "checkpoints" / LAST_CHECKPOINT, None)
    os.utime(runs / "d" / "checkpoints" / LAST_CHECKPOINT, None)

    point = find_resume_point("auto", cfg, runs / "new")
    assert point.run_dir == newest.resolve() and point.run_id == "b" * 32
    assert point.checkpoint == newest.resolve() / "checkpoints" / LAST_CHECKPOINT

    lock = lock_run(newest)  # a training still running there: not taken over, the next candidate is
    try:
        assert find_resume_point("auto", cfg, runs / "new").run_dir == old.resolve()
    finally:
        lock.release()
    assert find_resume_point("auto", config("seed=3"), runs / "new") is None  # nothing of that config: new run
    for spec in (None, "null", ""):
        assert find_resume_point(spec, cfg, runs / "new") is None


def test_auto_finds_the_jobs_of_an_earlier_sweep(tmp_path):
    cfg = config("seed=5")
    job = make_run(tmp_path / "sweeps" / "2026-01-01" / "3", cfg, run_id="c" * 32)
    point = find_resume_point("auto", cfg, tmp_path / "sweeps" / "2026-01-02" / "3")
    assert point.run_dir == job.resolve()


def test_explicit_folder_checkpoint_and_run_id(tmp_path, store):
    cfg = config()
    folder = make_run(tmp_path / "run", cfg, run_id="d" * 32)
    assert find_resume_point(str(folder), cfg, tmp_path / "x").run_dir == folder.resolve()
    assert find_resume_point(str(folder / "checkpoints" / LAST_CHECKPOINT), cfg, tmp_path / "x").run_id == "d" * 32

    run_id = tracking.start_run("crack", "r", {"output_dir": str(folder)})
    write_marker(folder, cfg, run_id, "KILLED")
    point = find_resume_point(run_id, cfg, tmp_path / "x")
    assert point.run_dir == folder.resolve() and point.run_id == run_id


@pytest.mark.parametrize(("spec", "expected"), [
    ("yesterday", "is not 'auto', an existing run folder or an MLflow run id"),
    ("0" * 32, "no such MLflow run"),
])
def test_resume_targets_that_do_not_exist_are_explained(tmp_path, store, spec, expected):
    with pytest.raises(ConfigError, match=expected):
        find_resume_point(spec, config(), tmp_path / "x")


def test_a_run_without_checkpoint_or_with_another_config_is_refused(tmp_path):
    cfg = config()
    bare = make_run(tmp_path / "bare", cfg, checkpoint=False)
    with pytest.raises(ConfigError, match="does not exist .* Start it again without resume"):
        find_resume_point(str(bare), cfg, tmp_path / "x")
    other = make_run(tmp_path / "other", config("optimizer.lr=0.1", "data.batch_size=8"))
    with pytest.raises(ConfigError) as caught:
        find_resume_point(str(other), cfg, tmp_path / "x")
    message = str(caught.value)
    assert f"data.batch_size: 8 -> {cfg.data.batch_size}" in message and f"optimizer.lr: 0.1 -> {cfg.optimizer.lr}" \
        in message


# --------------------------------------------------------------------------------------------- data order
def batches(sampler: EpochBatchSampler, epoch: int) -> list[list[int]]:
    sampler.set_epoch(epoch)
    return list(sampler)


def test_data_order_depends_only_on_seed_and_epoch():
    first, second = (EpochBatchSampler(EpochShuffle(50, seed=7), 8, drop_last=True) for _ in range(2))
    assert batches(first, 3) == batches(second, 3)  # a fresh process sees the same epoch-3 order
    assert batches(first, 3) != batches(first, 4)
    assert batches(EpochBatchSampler(EpochShuffle(50, seed=8), 8, drop_last=True), 3) != batches(first, 3)
    assert sorted(i for b in batches(first, 5) for i in b) == sorted(set(i for b in batches(first, 5) for i in b))


def test_a_resumed_epoch_continues_with_the_batches_it_had_not_seen():
    full = batches(EpochBatchSampler(EpochShuffle(50, seed=7), 8, drop_last=True), 2)
    resumed = EpochBatchSampler(EpochShuffle(50, seed=7), 8, drop_last=True)
    resumed.resume_at = (2, 4)  # checkpoint: epoch 2, 4 batches trained
    assert list(resumed) == full[4:]  # before Lightning's set_epoch (the first iterator of a run) ...
    assert batches(resumed, 2) == full[4:]  # ... and after it
    assert batches(resumed, 3) == batches(EpochBatchSampler(EpochShuffle(50, seed=7), 8, drop_last=True), 3)

    finished = EpochBatchSampler(EpochShuffle(50, seed=7), 8, drop_last=True)
    finished.resume_at = (2, 6)  # all 6 batches of epoch 2 done: continue with epoch 3
    assert list(finished) == batches(EpochBatchSampler(EpochShuffle(50, seed=7), 8, drop_last=True), 3)
    sequential = EpochBatchSampler(SequentialSampler(range(10)), 4, drop_last=False)
    assert batches(sequential, 9) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


# ------------------------------------------------------------------------------------------- metric logger
def history(run_id: str) -> dict[str, list[tuple[int, float]]]:
    return {key: tracking.metric_history(run_id, key) for key in tracking.get_run(run_id).data.metrics}


def test_metrics_reach_mlflow_with_the_checkpoint_and_exactly_once_after_a_kill(store):
    run_id = tracking.start_run("crack", "r")
    first = ResumableMLFlowLogger(experiment_name="crack", tracking_uri=store, run_id=run_id)
    first.log_metrics({"train/loss": 0.9, "epoch": 0}, step=2)
    assert history(run_id) == {}  # held back until a checkpoint covers it
    journal = first.journal()  # what the checkpoint of epoch 1's start stores ...
    first.commit()  # ... and, once it is on disk, sends
    first.log_metrics({"val/loss": 0.7}, step=5)  # logged after that checkpoint, then SIGKILL: never sent
    assert history(run_id) == {"train/loss": [(2, 0.9)], "epoch": [(2, 0.0)]}

    second = ResumableMLFlowLogger(experiment_name="crack", tracking_uri=store, run_id=run_id)
    second.resume(journal, step=3)  # replays the journal: MLflow has it already, nothing doubles
    second.log_metrics({"lr": 0.01}, step=3)  # a hook re-run at the resumed epoch start, before the save ...
    second.log_metrics({"val/loss": 0.7, "epoch": 1}, step=5)  # ... and epoch 1, recomputed
    second.commit()
    second.log_metrics({"lr": 0.01}, step=3)
    second.commit()  # a replay of an already-sent point at or before the resume step is skipped
    assert history(run_id) == {"train/loss": [(2, 0.9)], "epoch": [(2, 0.0), (5, 1.0)], "val/loss": [(5, 0.7)],
                               "lr": [(3, 0.01)]}

    lost = ResumableMLFlowLogger(experiment_name="crack", tracking_uri=store, run_id=run_id)
    lost.resume([("test/acc", 0.5, 1, 9)], step=9)  # the commit after the save never happened: the journal sends it
    assert history(run_id)["test/acc"] == [(9, 0.5)]
