"""One training run's bookkeeping, apart from its ML: the run folder's lock and marker, the MLflow run (started, or
reopened on resume), the SIGTERM policy, and the final status (FINISHED, KILLED or FAILED) that every exit records.

The lightning-hydra-template ``task_wrapper`` shape: the entry point writes its stages inside ``with TrainingRun(...)``
and never decides a status itself."""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from omegaconf import DictConfig, OmegaConf

from crackclf.bundle import BundleInfo, log_bundle_model
from crackclf.config import ConfigError
from crackclf.plots import plot_confusion, plot_curves
from crackclf.tracking import mlflow as tracking
from crackclf.training.finalize import FinalReport
from crackclf.training.resume import ResumeCheckpoint, ResumePoint, lock_run, write_marker
from crackclf.utils import git_commit

__all__ = ["TrainingRun"]

log = logging.getLogger("crackclf.train")


class _Terminated(KeyboardInterrupt):
    """SIGTERM, turned into the interrupt Lightning already shuts down cleanly on."""


class TrainingRun:
    """The context of one training run (rank zero owns the lock, the marker and the MLflow run; DDP's other ranks
    re-run the same command and only follow).

    ``with TrainingRun(cfg, resume_point, rank) as run:`` takes the run folder's lock; :meth:`start` opens the
    MLflow run and writes the RUNNING marker; leaving the block records the outcome: FINISHED on a normal exit,
    KILLED on Ctrl-C or SIGTERM (a SIGTERM leaves with exit status 143), FAILED with the traceback in MLflow on
    any other exception.
    """

    def __init__(self, cfg: DictConfig, resume_point: ResumePoint | None, rank: int = 0) -> None:
        self.cfg = cfg
        self.resume_point = resume_point
        self.rank = rank
        self.output_dir = Path(cfg.paths.output_dir)
        self.run_id: str | None = None
        self.resumed = False
        self.loggers: list[Any] = []
        self.status = "FAILED"
        #: The callback that checkpoints for resuming; it also tells the SIGTERM policy when training is running.
        self.checkpoints = ResumeCheckpoint(self.output_dir / "checkpoints")
        self._lock = None
        self._started = False
        self._previous_sigterm: Any = None

    def __enter__(self) -> TrainingRun:
        if self.rank == 0:  # DDP ranks > 0 are re-runs of this command in the same folder: rank zero holds the lock
            self._lock = lock_run(self.output_dir)
            if self._lock is None:
                raise ConfigError(f"{self.output_dir} is in use by another training process; wait for it or resume "
                                  "another run.")
        return self

    @property
    def logs_to_mlflow(self) -> bool:
        """Whether the configured logger is MLflow's (on every rank)."""
        logger = self.cfg.get("logger")
        return logger is not None and "MLFlowLogger" in str(logger.get("_target_", ""))

    @property
    def uses_mlflow(self) -> bool:
        """Rank zero owns the MLflow run when the configured logger is MLflow (one run, not one per GPU)."""
        return self.rank == 0 and self.logs_to_mlflow

    def open_store_early(self) -> None:
        """On a DDP rank other than zero, create (or migrate) the MLflow store now, under its lock: such a rank waits
        for rank zero's data preparation anyway, and rank zero's run then starts on a store that is ready (creating a
        new one takes seconds, on a new user's first run)."""
        if self.rank > 0 and self.logs_to_mlflow:
            tracking.client()

    def start(self, pretrained_status: str, extra_tags: Mapping[str, str] | None = None,
              parent_run_id: str | None = None) -> None:
        """Open the MLflow run (or reopen the resumed one), build the loggers, write the RUNNING marker and install
        the SIGTERM policy. ``extra_tags`` (a sweep job's id and overrides) and ``parent_run_id`` apply to a new run."""
        from hydra.utils import instantiate

        cfg = self.cfg
        if self.uses_mlflow and self.resume_point is not None and self.resume_point.run_id:
            self.run_id, self.resumed = self.resume_point.run_id, True
            tracking.reopen_run(self.run_id)
            tracking.set_tags(self.run_id, {"resumed_from": str(self.resume_point.checkpoint)})
            log.info("resuming MLflow run %s from %s", self.run_id, self.resume_point.checkpoint)
        elif self.uses_mlflow:
            tags = {"backbone": cfg.backbone.name, "pretrained": pretrained_status, "git_commit": git_commit(),
                    "output_dir": str(self.output_dir), **(extra_tags or {})}
            run_name = f"{cfg.backbone.name}-{time.strftime('%Y%m%d-%H%M%S')}"
            self.run_id = tracking.start_run(cfg.experiment_name, run_name, tags, parent_run_id=parent_run_id)
            log.info("MLflow run %s (%s) in experiment %r at %s", self.run_id, run_name, cfg.experiment_name,
                     tracking.tracking_uri())
        if self.run_id:
            self.loggers.append(instantiate(cfg.logger, run_id=self.run_id))
        elif cfg.get("logger") is not None:  # another logger, or a DDP rank > 0 (Lightning logs on rank zero)
            if self.logs_to_mlflow:
                tracking.client()  # the store created under its lock: rank zero may be creating it right now
            self.loggers.append(instantiate(cfg.logger))
        if self.rank == 0:
            write_marker(self.output_dir, cfg, self.run_id, "RUNNING")
        self._previous_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)
        self._started = True

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        """SIGTERM → interrupt, except inside the training loop: there Lightning's own handler (called first) stops
        at the end of the current batch and a checkpoint is saved, where an interrupt could tear an optimiser step."""
        if not self.checkpoints.in_training_loop:
            raise _Terminated()

    def log_inputs(self, datamodule: Any) -> None:
        """Parameters, the resolved config and the data's split and verification report (a resumed run has them)."""
        if not self.run_id or self.resumed:
            return
        resolved = OmegaConf.to_container(self.cfg, resolve=True)
        tracking.log_params(self.run_id, tracking.flatten(resolved))
        config_file = self.output_dir / "config.yaml"
        OmegaConf.save(self.cfg, config_file, resolve=True)
        tracking.log_artifact(self.run_id, config_file)
        tracking.log_artifact(self.run_id, datamodule.split_path, "data")
        if datamodule.verify_report is not None:
            from crackclf.data.inventory import format_report

            tracking.log_text(self.run_id, format_report(datamodule.verify_report), "data/verify.txt")
        if datamodule.split_summary is not None:
            tracking.log_text(self.run_id, datamodule.split_summary.describe(), "data/split_summary.txt")

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Tag the MLflow run (nothing without one)."""
        if self.run_id:
            tracking.set_tags(self.run_id, tags)

    def log_metrics(self, metrics: Mapping[str, float]) -> None:
        """Log run-level metrics (rank zero's MLflow run; nothing without one)."""
        if self.run_id and metrics:
            tracking.log_metrics(self.run_id, dict(metrics))

    def log_report(self, report: FinalReport, history: list[dict[str, float]], info: BundleInfo, network: Any
                   ) -> None:
        """The finished run's metrics, tags, curves, test confusion matrix, best checkpoint and, with
        ``register``, the registered model."""
        if not self.run_id:
            return
        cfg, run_id = self.cfg, self.run_id
        tracking.log_metrics(run_id, {"threshold": report.threshold, "epochs_run": report.epochs,
                                      "train/clean_acc": report.train_clean_acc, "train_val_gap": report.train_val_gap,
                                      **report.per_source})
        tracking.set_tags(run_id, {"overfitting": str(report.overfitting).lower(),
                                   "threshold_mode": cfg.threshold.mode})
        tracking.log_artifact(run_id, plot_curves(history, self.output_dir / "curves.png", title=cfg.backbone.name),
                              "plots")
        if report.test_confusion is not None:
            confusion = plot_confusion(report.test_confusion, cfg.data.class_names,
                                       self.output_dir / "confusion_test.png",
                                       title=f"test split (threshold {report.threshold:.3f})")
            tracking.log_artifact(run_id, confusion, "plots")
        if report.best_checkpoint:
            tracking.log_artifact(run_id, report.best_checkpoint, "checkpoints")
        if cfg.get("register"):
            log_bundle_model(run_id, network, info, cfg.registered_model_name)

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> bool:
        from pytorch_lightning.utilities.exceptions import SIGTERMException

        replacement: BaseException | None = None
        if error is None:
            self.status = "FINISHED"
        elif isinstance(error, KeyboardInterrupt):
            self.status = "KILLED"
        elif isinstance(error, SIGTERMException):  # Lightning's graceful stop on SIGTERM (a SystemExit, no code)
            self.status = "KILLED"
            replacement = SystemExit(128 + signal.SIGTERM)
        elif isinstance(error, SystemExit):  # Lightning turns Ctrl-C/SIGTERM into sys.exit(1) after a clean stop
            self.status = "KILLED" if error.code else "FINISHED"
        elif self.run_id:
            _best_effort("record the error in MLflow", tracking.record_error, self.run_id, error)
        self._close()
        if replacement is not None:
            raise replacement from None
        return False

    def _close(self) -> None:
        # Best effort: when the disk that failed the run also holds the store, the original error must still show.
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
        if self.run_id:
            _best_effort(f"mark MLflow run {self.run_id} {self.status}", tracking.end_run, self.run_id, self.status)
        if self.rank == 0 and self._started:
            _best_effort("update the run marker", write_marker, self.output_dir, self.cfg, self.run_id, self.status)
        if self._lock is not None:
            self._lock.release()


def _best_effort(what: str, action: Any, *args: Any) -> None:
    """Run a bookkeeping step during error handling without letting its own failure hide the original error."""
    try:
        action(*args)
    except Exception as error:  # noqa: BLE001 - reported, and the original error goes on
        log.warning("could not %s: %s", what, error)
