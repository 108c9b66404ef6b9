"""Crash-safe training: which run a ``resume=…`` continues, and the checkpoint that makes continuing exact.

A run folder holds ``resume.json`` (config fingerprint, MLflow run id, status) and ``checkpoints/last.ckpt``.
:class:`ResumeCheckpoint` writes ``last.ckpt`` (atomically, see :mod:`crackclf.training.checkpointing`) when an
epoch has been completely logged (at the start of the next one and when training ends) and when SIGTERM/Ctrl-C
stops training. Each checkpoint carries the RNG states, the data position (see the datamodule's ``state_dict``)
and the metrics not yet sent to MLflow (see :mod:`crackclf.tracking.logger`), so a run killed at any moment —
SIGKILL included — resumes into the same MLflow run with every epoch logged exactly once and the same data order.
"""

from __future__ import annotations

import json
import logging
import random
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from filelock import FileLock, Timeout
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.utilities.exceptions import SIGTERMException
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from crackclf.config import ConfigError
from crackclf.errors import short_error
from crackclf.tracking import mlflow as tracking
from crackclf.tracking.logger import ResumableMLFlowLogger
from crackclf.utils import atomic_write_text, stable_hash

log = logging.getLogger(__name__)

MARKER = "resume.json"
LAST_CHECKPOINT = "last.ckpt"
LOCK = ".crackclf-run.lock"
#: Keys that do not change what is trained (where outputs go, how it resumes, progress bars).
NEUTRAL_KEYS = ("resume", "paths", "data.progress")
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
_STATE_KEY = "crackclf_resume"


# ------------------------------------------------------------------------------------------------ run folders
def config_items(cfg: DictConfig) -> dict[str, Any]:
    """The flat, unresolved config that defines a training (``NEUTRAL_KEYS`` left out)."""
    flat = tracking.flatten(OmegaConf.to_container(cfg, resolve=False))
    return {k: v for k, v in flat.items() if not any(k == n or k.startswith(n + ".") for n in NEUTRAL_KEYS)}


def write_marker(run_dir: Path, cfg: DictConfig, run_id: str | None, status: str) -> None:
    """Record in ``run_dir`` what it trains and where its MLflow run is (``status``: RUNNING/FINISHED/...)."""
    items = config_items(cfg)
    atomic_write_text(Path(run_dir) / MARKER, json.dumps({
        "fingerprint": stable_hash(items), "run_id": run_id, "status": status, "updated": time.time(),
        "config": {k: str(v) for k, v in items.items()},
    }, indent=1))


def read_marker(run_dir: Path) -> dict | None:
    try:
        return json.loads((Path(run_dir) / MARKER).read_text())
    except (OSError, ValueError):
        return None


def lock_run(run_dir: Path) -> FileLock | None:
    """Hold ``run_dir`` for this process (released by the OS even on SIGKILL); ``None`` if another holds it."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(Path(run_dir) / LOCK))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return None
    return lock


@dataclass
class ResumePoint:
    """Where a resumed training continues: its run folder, checkpoint and MLflow run."""

    run_dir: Path
    checkpoint: Path
    run_id: str | None


def find_resume_point(spec: Any, cfg: DictConfig, output_dir: Path) -> ResumePoint | None:
    """Resolve ``resume=`` (``null``, ``auto``, a run folder, its ``last.ckpt``, or an MLflow run id).

    ``auto`` picks the most recent unfinished run of the same configuration among this run's folder, its siblings
    and the job folders of sibling sweeps; ``None`` when there is none (a new run starts).

    Raises:
        ConfigError: for a folder or run id that cannot be resumed, with the reason and what to do.
    """
    if spec is None or str(spec).strip().lower() in ("", "null", "none", "false"):
        return None
    text = str(spec).strip()
    if text == "auto":
        return _latest_unfinished(cfg, Path(output_dir))
    path = Path(text).expanduser()
    if path.suffix == ".ckpt" and path.is_file():
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    elif path.is_dir():
        run_dir = path
    elif _RUN_ID.match(text):
        run_dir = _run_dir_of(text)
    else:
        raise ConfigError(f"resume={text} is not 'auto', an existing run folder or an MLflow run id (32 hex "
                          "digits). Use resume=auto to continue the latest unfinished run of this configuration.")
    checkpoint = path if path.suffix == ".ckpt" and path.is_file() else run_dir / "checkpoints" / LAST_CHECKPOINT
    if not checkpoint.is_file():
        raise ConfigError(f"resume={text}: {checkpoint} does not exist (the run stopped before its first epoch "
                          "ended, or it is not a crackclf run folder). Start it again without resume.")
    marker = read_marker(run_dir) or {}
    _check_same_config(marker, cfg, text)
    run_id = marker.get("run_id") or (text if _RUN_ID.match(text) else None)
    return ResumePoint(run_dir.resolve(), checkpoint.resolve(), run_id)


def _run_dir_of(run_id: str) -> Path:
    try:
        run = tracking.get_run(run_id)
    except Exception as error:  # noqa: BLE001 - MLflow raises several types for an unknown id
        raise ConfigError(f"resume={run_id}: no such MLflow run in {tracking.tracking_uri()} "
                          f"({short_error(error, 120)}).") from None
    folder = run.data.tags.get("output_dir")
    if not folder or not Path(folder).is_dir():
        raise ConfigError(f"resume={run_id}: the run's output folder {folder!r} is gone, so there is no checkpoint "
                          "to continue from.")
    return Path(folder)


def _check_same_config(marker: dict, cfg: DictConfig, spec: str) -> None:
    if not marker or marker.get("fingerprint") == stable_hash(config_items(cfg)):
        return
    now = {k: str(v) for k, v in config_items(cfg).items()}
    before = marker.get("config", {})
    changed = sorted(k for k in set(now) | set(before) if now.get(k) != before.get(k))
    shown = ", ".join(f"{k}: {before.get(k, '<absent>')} -> {now.get(k, '<absent>')}" for k in changed[:6])
    raise ConfigError(f"resume={spec}: that run was trained with a different configuration ({shown}"
                      f"{', ...' if len(changed) > 6 else ''}). Resume with the same overrides, or start a new run.")


def _latest_unfinished(cfg: DictConfig, output_dir: Path) -> ResumePoint | None:
    fingerprint = stable_hash(config_items(cfg))
    parent = output_dir.resolve().parent
    folders = {output_dir.resolve(), *parent.glob("*"), *parent.parent.glob("*/*")}
    found = []
    for folder in folders:
        marker = read_marker(folder)
        checkpoint = folder / "checkpoints" / LAST_CHECKPOINT
        if (marker and marker.get("fingerprint") == fingerprint and marker.get("status") != "FINISHED"
                and checkpoint.is_file()):
            found.append((checkpoint.stat().st_mtime, folder, checkpoint, marker.get("run_id")))
    for _, folder, checkpoint, run_id in sorted(found, key=lambda item: item[0], reverse=True):
        if rank_zero_only.rank == 0:  # DDP ranks > 0 follow rank zero, which holds the folder's lock by now
            lock = lock_run(folder)
            if lock is None:
                log.info("resume=auto: %s is in use by a running training; not taking it over", folder)
                continue
            lock.release()
        log.info("resume=auto: continuing %s from %s", folder, checkpoint)
        return ResumePoint(folder, checkpoint, run_id)
    log.info("resume=auto: no unfinished run of this configuration under %s; starting a new run", parent)
    return None


# ---------------------------------------------------------------------------------------------- the callback
def capture_rng() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class ResumeCheckpoint(Callback):
    """Owns ``<dirpath>/last.ckpt``: written when resuming from it is exact, read back when a run resumes.

    Written at the start of every epoch after the first (the previous epoch is then completely logged), at the end
    of training, and when SIGTERM or Ctrl-C stops training (SIGTERM waits for the current batch to finish). After
    each write the held-back metrics are sent to MLflow. ``in_training_loop`` tells the SIGTERM handler of
    :mod:`crackclf.train` to let Lightning stop gracefully instead of interrupting mid-step.
    """

    def __init__(self, dirpath: str | Path) -> None:
        self.path = Path(dirpath) / LAST_CHECKPOINT
        self.in_training_loop = False
        self._saved_step = -1
        self._rng: dict[str, Any] | None = None
        self._logging_step: int | None = None  # the logging step counter of the checkpoint resumed from
        self._stopped_in: str | None = None  # while saving on a stop: "training" or "validation"
        # The random state at the last point a resumed run can restart from: an epoch's start or the end of its
        # latest training batch. A stop mid-batch (Ctrl-C, SIGTERM) comes after that batch drew its augmentation and
        # dropout; a resumed run trains the batch again from the start, so it must draw from the state before.
        self._rng_at_batch_boundary: dict[str, Any] | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for callback in trainer.callbacks:  # a second writer of last.ckpt would save before the epoch is logged
            if isinstance(callback, ModelCheckpoint) and callback.save_last:
                callback.save_last = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._rng is not None:
            restore_rng(self._rng)  # the state saved with the checkpoint: the resumed epoch draws the same numbers
            self._rng = None
        self.in_training_loop = True

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step > 0 and trainer.global_step != self._saved_step:
            # The batch counters still describe the finished epoch until the epoch loop resets them, a moment
            # later; reset them now (as that reset does) so the checkpoint reads "epoch start", not "epoch end".
            epoch_loop = trainer.fit_loop.epoch_loop
            epoch_loop.batch_progress.reset_on_run()
            epoch_loop.batch_progress.is_last_batch = False
            epoch_loop.scheduler_progress.reset_on_run()
            epoch_loop.automatic_optimization.optim_progress.reset_on_run()
            self._save(trainer)
        self._rng_at_batch_boundary = capture_rng()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._continue_logging_steps(trainer)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._rng_at_batch_boundary = capture_rng()  # a few microseconds a batch

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._logging_step = None  # resumed in an epoch's validation: Lightning's counter is right (see below)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._logging_step = None

    def _continue_logging_steps(self, trainer: pl.Trainer) -> None:
        """At the first training batch of a resumed run: the logging step counter as the checkpoint had it."""
        if self._logging_step is not None:
            # Lightning adds one to this counter when it restarts among an epoch's training batches, assuming a
            # checkpoint taken before the step was counted; ours are taken after, and the metric steps must continue
            # exactly where they stopped. Restarted after an epoch's last batch (a stop during its validation) it
            # adds nothing and counts that step when validation ends, as an uninterrupted run does: there the first
            # hook is on_validation_start or on_train_epoch_end, and the counter is left alone.
            trainer.fit_loop.epoch_loop._batches_that_stepped = self._logging_step
            self._logging_step = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.in_training_loop = False
        self._save(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.in_training_loop = False
        if trainer.state.fn == "fit" and isinstance(exception, (KeyboardInterrupt, SIGTERMException)):
            self._stopped_in = "validation" if trainer.validating else "training"
            try:
                self._save(trainer)
            finally:
                self._stopped_in = None
            log.info("training stopped by %s; checkpoint saved to %s (continue with resume=auto)",
                     "SIGTERM" if isinstance(exception, SIGTERMException) else "Ctrl-C", self.path)

    def _save(self, trainer: pl.Trainer) -> None:
        if trainer.global_step in (self._saved_step, 0) or trainer.fast_dev_run:  # a smoke test keeps no checkpoint
            return
        trainer.save_checkpoint(self.path, weights_only=False)
        self._saved_step = trainer.global_step
        for logger in _resumable(trainer):
            logger.commit()

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        journal = [row for logger in _resumable(trainer) for row in logger.journal()]
        stopped = self._stopped_in is not None and self._rng_at_batch_boundary is not None
        rng = self._rng_at_batch_boundary if stopped else capture_rng()
        checkpoint[_STATE_KEY] = {"rng": rng, "metric_journal": journal}
        if self._stopped_in == "validation":
            _mark_validation_unfinished(checkpoint)

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        state = checkpoint.get(_STATE_KEY) or {}
        self._rng = state.get("rng")
        # The data loaders do resume mid-epoch (the datamodule stores its position): Lightning cannot see that.
        warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")
        self._saved_step = int(checkpoint.get("global_step", -1))
        loop_state = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.state_dict", {})
        self._logging_step = loop_state.get("_batches_that_stepped")
        for logger in _resumable(trainer):
            logger.resume(state.get("metric_journal", []), self._logging_step or 0)


def _mark_validation_unfinished(checkpoint: dict) -> None:
    """Make a checkpoint taken during a validation pass say "stopped inside a validation step", which Lightning's
    restart runs again. Stopped before that pass's first step had begun (while the loader starts, say), the loop's
    counters would look like a pass that had finished, and Lightning would skip the epoch's validation: no val/*,
    no early-stopping or best-checkpoint decision for that epoch."""
    progress = checkpoint["loops"]["fit_loop"]["epoch_loop.val_loop.batch_progress"]
    for counts in (progress["total"], progress["current"]):
        done = counts["completed"]
        counts.update(ready=done + 1, started=done + 1, processed=done, completed=done)


def _resumable(trainer: pl.Trainer) -> list[ResumableMLFlowLogger]:
    # isinstance, not hasattr: with fast_dev_run Lightning swaps loggers for a DummyLogger that "has" everything.
    return [logger for logger in trainer.loggers if isinstance(logger, ResumableMLFlowLogger)]
