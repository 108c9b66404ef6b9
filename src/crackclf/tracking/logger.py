"""The Lightning logger of crackclf: Lightning's MLflow logger, made crash-safe and concurrency-safe.

Two differences from ``pytorch_lightning.loggers.MLFlowLogger``:

* Every MLflow call goes through :mod:`crackclf.tracking.mlflow` (retries when SQLite says "database is locked",
  so two trainings on one store both finish).
* Metrics are **committed with checkpoints**: they are held back until the resume checkpoint
  (:class:`crackclf.training.resume.ResumeCheckpoint`) that contains them is on disk, and that checkpoint carries
  them as a journal. A run killed at any moment and resumed from its last checkpoint therefore has each epoch's
  metrics exactly once: what was logged after the checkpoint is recomputed (and had never reached MLflow), what
  was in the checkpoint is replayed unless MLflow already has it.

The run's status (FINISHED/FAILED/KILLED) is owned by :mod:`crackclf.train`, not by this logger.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from typing import Any

from pytorch_lightning.loggers import MLFlowLogger

from crackclf.tracking import mlflow as tracking

#: One logged point: (key, value, timestamp in ms, step).
Row = tuple[str, float, int, int]


class ResumableMLFlowLogger(MLFlowLogger):
    """``MLFlowLogger`` whose metrics reach MLflow when the checkpoint that covers them is written.

    Takes the arguments of ``MLFlowLogger``; crackclf always passes the ``run_id`` it created (or resumed).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pending: list[Row] = []
        self._present: set[tuple[str, int, float]] = set()  # points MLflow had when this run resumed
        self._resume_step = -1  # the checkpoint's step: points up to it may be replays of what MLflow has

    # --------------------------------------------------------------------------------------- MLflow through tracking
    @property
    def experiment(self):
        """An ``MlflowClient`` on crackclf's store (with a run id, no run is created here)."""
        if self._run_id is None:  # used without crackclf.train: let Lightning create the run
            return super().experiment
        if self._experiment_id is None:
            self._experiment_id = tracking.get_run(self._run_id).info.experiment_id
            self._initialized = True
        return tracking.client()

    def log_hyperparams(self, params: Any) -> None:
        params = vars(params) if not isinstance(params, Mapping) else params
        tracking.log_params(self.run_id, tracking.flatten(dict(params)))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Hold the metrics until the next :meth:`commit` (MLflow key rules as in Lightning)."""
        now = int(time.time() * 1000)
        for key, value in metrics.items():
            if isinstance(value, str):
                continue
            key = re.sub("[^a-zA-Z0-9_/. -]+", "", f"{self._prefix}{self.LOGGER_JOIN_CHAR}{key}" if self._prefix
                         else key)
            self._pending.append((key, float(value), now, int(step or 0)))

    def finalize(self, status: str = "success") -> None:
        """End of a fit/validate/test (or an interruption): whatever is held is final, send it."""
        self.commit()

    # ------------------------------------------------------------------------------------------- journal
    def journal(self) -> list[Row]:
        """The metrics not yet sent; a checkpoint stores them so that a resumed run can send them."""
        return list(self._pending)

    def commit(self) -> None:
        """Send the held metrics (skipping points MLflow already has, after a resume)."""
        if not self._pending or self._run_id is None:
            return
        rows, self._pending = self._pending, []
        rows = [row for row in rows if row[3] > self._resume_step or (row[0], row[3], row[1]) not in self._present]
        self._present.update((key, step, value) for key, value, _, step in rows if step <= self._resume_step)
        tracking.log_metric_rows(self._run_id, rows)

    def resume(self, journal: list[Row], step: int) -> None:
        """Continue a run from a checkpoint taken at logging step ``step``: send the checkpoint's journal, and
        from now on skip points up to ``step`` that MLflow already has (replays of hooks run before the save)."""
        self._present, self._resume_step = tracking.metric_points(self.run_id), step
        self._pending = [tuple(row) for row in journal] + self._pending  # type: ignore[misc]
        self.commit()
