"""Training entry: compose → validate → build → fit → pick threshold → test → log. No ML logic of its own."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from crackclf.config import ConfigError, validate
from crackclf.training.threshold import choose_threshold, confusion_matrix
from crackclf.utils import repo_root

log = logging.getLogger("crackclf.train")
CONFIG_DIR = str(repo_root() / "conf")


class _Terminated(KeyboardInterrupt):
    """SIGTERM, turned into the interrupt Lightning already shuts down cleanly on."""


def _sigterm_handler(resume_callback):
    """SIGTERM → interrupt, except inside the training loop: there Lightning's own handler (called first) stops at
    the end of the current batch and a checkpoint is saved, where an interrupt could tear an optimiser step."""

    def handler(signum, frame) -> None:
        if not resume_callback.in_training_loop:
            raise _Terminated()

    return handler


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_root(), capture_output=True, text=True,
                              timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def sweep_info() -> dict[str, str]:
    """Sweep id and overrides of this job when it runs inside a Hydra multirun (see crackclf.experiments.sweep)."""
    from crackclf.experiments.sweep import job_info

    return job_info()


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train, test and log one configuration; returns the final metrics (including the optimised one)."""
    validate(cfg)  # before the heavy imports below: a wrong value is reported in a second or two
    import pytorch_lightning as pl
    import torch
    from hydra.utils import instantiate
    from pytorch_lightning.utilities.exceptions import SIGTERMException
    from pytorch_lightning.utilities.rank_zero import rank_zero_only

    from crackclf.experiments.sweep import parent_run_id
    from crackclf.inference.bundle import BundleInfo, log_bundle_model, source_tile_size, write_bundle_info
    from crackclf.tracking import mlflow as tracking
    from crackclf.tracking.plots import plot_confusion, plot_curves
    from crackclf.training.checkpointing import AtomicCheckpointIO
    from crackclf.training.resume import ResumeCheckpoint, find_resume_point, lock_run, write_marker
    from crackclf.utils import describe_device, keep_freed_memory

    if rank_zero_only.rank > 0:  # DDP's other processes run the same code: rank zero alone reports progress
        logging.getLogger("crackclf").setLevel(logging.WARNING)
    resume_point = find_resume_point(cfg.get("resume"), cfg, Path(cfg.paths.output_dir))
    if resume_point is not None:  # continue in the original run folder: its checkpoints, marker and MLflow run
        cfg.paths.output_dir = str(resume_point.run_dir)
    pl.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision("high")
    keep_freed_memory()  # no page-fault churn from the same big tensors freed and re-allocated every batch
    output_dir = Path(cfg.paths.output_dir)
    # DDP ranks > 0 are re-runs of this command in the same folder: rank zero holds the lock for all of them.
    run_lock = lock_run(output_dir) if rank_zero_only.rank == 0 else None
    if run_lock is None and rank_zero_only.rank == 0:
        raise ConfigError(f"{output_dir} is in use by another training process; wait for it or resume another run.")

    datamodule = instantiate(cfg.data, augment=instantiate(cfg.augmentation))
    datamodule.prepare(prefetch_cache=True)  # decoded while the model, MLflow run and DDP ranks start
    model = instantiate(cfg.model)

    use_mlflow = cfg.get("logger") is not None and "MLFlowLogger" in str(cfg.logger.get("_target_", ""))
    # DDP re-runs this script once per extra rank: only rank zero owns the MLflow run (one run, not one per GPU).
    use_mlflow = use_mlflow and rank_zero_only.rank == 0
    run_id = None
    loggers: list = []
    resumed = False
    if use_mlflow and resume_point is not None and resume_point.run_id:
        run_id, resumed = resume_point.run_id, True
        tracking.reopen_run(run_id)
        tracking.set_tags(run_id, {"resumed_from": str(resume_point.checkpoint)})
        loggers.append(instantiate(cfg.logger, run_id=run_id))
        log.info("resuming MLflow run %s from %s", run_id, resume_point.checkpoint)
    elif use_mlflow:
        tags = {
            "backbone": cfg.backbone.name,
            "pretrained": model.pretrained_status,
            "git_commit": git_commit(),
            "output_dir": str(output_dir),
            **sweep_info(),
        }
        run_name = f"{cfg.backbone.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        run_id = tracking.start_run(cfg.experiment_name, run_name, tags, parent_run_id=parent_run_id())
        loggers.append(instantiate(cfg.logger, run_id=run_id))
        log.info("MLflow run %s (%s) in experiment %r at %s", run_id, run_name, cfg.experiment_name,
                 tracking.tracking_uri())
    elif cfg.get("logger") is not None:
        loggers.append(instantiate(cfg.logger))

    if rank_zero_only.rank == 0:
        write_marker(output_dir, cfg, run_id, "RUNNING")
    status = "FAILED"
    resume_callback = ResumeCheckpoint(output_dir / "checkpoints")
    previous_sigterm = signal.signal(signal.SIGTERM, _sigterm_handler(resume_callback))
    try:
        if run_id and not resumed:  # a resumed run has its params and data artifacts already
            resolved = OmegaConf.to_container(cfg, resolve=True)
            tracking.log_params(run_id, tracking.flatten(resolved))
            config_file = output_dir / "config.yaml"
            OmegaConf.save(cfg, config_file, resolve=True)
            tracking.log_artifact(run_id, config_file)
            tracking.log_artifact(run_id, datamodule.split_path, "data")
            if datamodule.verify_report is not None:
                from crackclf.data.inventory import format_report

                tracking.log_text(run_id, format_report(datamodule.verify_report), "data/verify.txt")
            if datamodule.split_summary is not None:
                tracking.log_text(run_id, datamodule.split_summary.describe(), "data/split_summary.txt")

        callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
        trainer = instantiate(cfg.trainer, callbacks=[*callbacks, resume_callback], logger=loggers or False,
                              plugins=[AtomicCheckpointIO()])
        if run_id:  # which hardware a run used, to compare wall times in the MLflow UI
            tracking.set_tags(run_id, {"device": describe_device(trainer.strategy.root_device)})
        trainer.fit(model, datamodule=datamodule, ckpt_path=resume_point.checkpoint if resume_point else None,
                    weights_only=False)  # our own checkpoint: it also holds RNG states and the metric journal

        checkpoint = trainer.checkpoint_callback
        best_path = checkpoint.best_model_path if checkpoint is not None else ""
        if best_path:
            weights = torch.load(best_path, map_location="cpu", weights_only=False)["state_dict"]
            model.load_state_dict(weights)

        # Threshold on validation data only, with the weights that will be deployed.
        val_results = trainer.validate(model, datamodule=datamodule, verbose=False)[0]
        val_probabilities, val_labels = model.validation_probabilities()
        threshold_cfg = cfg.threshold
        model.decision_threshold = choose_threshold(
            val_probabilities.numpy(), val_labels.numpy(), threshold_cfg.mode, threshold_cfg.target_recall
        )
        test_results = (trainer.test(model, datamodule=datamodule, verbose=False)[0]
                        if datamodule.rows_of("test") else {})

        # The generalisation gap of the deployed weights: a sample of the training split as large as validation,
        # unaugmented, against validation, both at 0.5 like val/acc. (The per-epoch train/gap compares accuracy on
        # augmented, partly hard-example batches while the weights change: a curve, not this measurement.)
        train_sample = datamodule.train_sample_dataloader(len(datamodule.rows_of("val")))
        train_accuracy = _accuracy(_confusion(model, datamodule, train_sample, trainer, 0.5))
        final_gap = train_accuracy - float(val_results["val/acc"])
        overfitting = final_gap > cfg.model.max_gap
        if overfitting:
            log.warning("train (unaugmented sample) - val accuracy gap %.4f exceeds model.max_gap=%s: the run looks "
                        "overfitted", final_gap, cfg.model.max_gap)
        info = BundleInfo(
            backbone=cfg.backbone.name, image_size=cfg.data.image_size, mean=tuple(model.net.mean.flatten().tolist()),
            std=tuple(model.net.std.flatten().tolist()), class_names=tuple(cfg.data.class_names),
            threshold=model.decision_threshold, run_id=run_id, pretrained_status=model.pretrained_status,
            timm_kwargs=dict(cfg.backbone.get("kwargs") or {}), tile_size=source_tile_size(datamodule.verify_report),
        )
        if best_path and rank_zero_only.rank == 0:  # one writer: other DDP ranks have no verify report
            write_bundle_info(Path(best_path), info)

        results = {
            "epochs": trainer.current_epoch,
            "val/acc": float(val_results["val/acc"]),
            "val/loss": float(val_results["val/loss"]),
            "threshold": model.decision_threshold,
            "train/clean_acc": train_accuracy,
            "train_val_gap": final_gap,
            **{k: float(v) for k, v in test_results.items()},
        }
        matrix = None
        if test_results:
            probabilities, labels = model.test_probabilities()
            matrix = confusion_matrix(probabilities.numpy(), labels.numpy(), model.decision_threshold)
        if run_id:
            tracking.log_metrics(run_id, {"threshold": model.decision_threshold, "epochs_run": trainer.current_epoch,
                                          "train/clean_acc": train_accuracy, "train_val_gap": final_gap})
            tracking.set_tags(run_id, {"overfitting": str(overfitting).lower(), "threshold_mode": threshold_cfg.mode})
            curves = plot_curves(model.history, output_dir / "curves.png", title=f"{cfg.backbone.name}")
            tracking.log_artifact(run_id, curves, "plots")
            if matrix is not None:
                confusion = plot_confusion(matrix, cfg.data.class_names, output_dir / "confusion_test.png",
                                           title=f"test split (threshold {model.decision_threshold:.3f})")
                tracking.log_artifact(run_id, confusion, "plots")
            if best_path:
                tracking.log_artifact(run_id, best_path, "checkpoints")
            if cfg.get("register"):
                log_bundle_model(run_id, model.net, info, cfg.registered_model_name)
        if rank_zero_only.rank == 0:  # one summary, not one per DDP process
            _print_summary(cfg, results, run_id)
        status = "FINISHED"
        return results
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except SIGTERMException:  # Lightning's graceful stop on SIGTERM (a SystemExit without a code)
        status = "KILLED"
        raise SystemExit(128 + signal.SIGTERM) from None
    except SystemExit as exit_:  # Lightning turns Ctrl-C/SIGTERM into sys.exit(1) after a graceful stop
        status = "KILLED" if exit_.code else "FINISHED"
        raise
    except BaseException as error:
        if run_id:
            _best_effort("record the error in MLflow", tracking.record_error, run_id, error)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)
        # Best effort: when the disk that failed the run also holds the store, the original error must still show.
        if run_id:
            _best_effort(f"mark MLflow run {run_id} {status}", tracking.end_run, run_id, status)
        if rank_zero_only.rank == 0:
            _best_effort("update the run marker", write_marker, output_dir, cfg, run_id, status)
        if run_lock is not None:
            run_lock.release()


def _best_effort(what: str, action, *args) -> None:
    """Run a bookkeeping step during error handling without letting its own failure hide the original error."""
    try:
        action(*args)
    except Exception as error:  # noqa: BLE001 - reported, and the original error goes on
        log.warning("could not %s: %s", what, error)


def _confusion(model, datamodule, loader, trainer, threshold: float) -> np.ndarray:
    """Confusion matrix of ``loader``'s images, unaugmented, at ``threshold`` (rows: true, columns: predicted);
    under DDP summed over the ranks."""
    import torch

    device = trainer.strategy.root_device  # trainer.test() leaves the module on the CPU: back to the GPU if any
    matrix = np.zeros((2, 2), dtype=np.int64)
    model.to(device).eval()
    with torch.no_grad():
        for batch in loader:
            images, labels = datamodule.on_after_batch_transfer([t.to(device) for t in batch], 0)
            probabilities = model(images).softmax(1)[:, 1].cpu().numpy()
            matrix += confusion_matrix(probabilities, labels.cpu().numpy(), threshold)
    if trainer.world_size > 1:  # DDP: each rank counted its own shard (summed on the device: NCCL needs GPU tensors)
        matrix = trainer.strategy.reduce(torch.from_numpy(matrix).to(device), reduce_op="sum").cpu().numpy()
    return matrix


def _accuracy(matrix: np.ndarray) -> float:
    return float(np.trace(matrix) / max(1, matrix.sum()))


def _print_summary(cfg: DictConfig, results: dict[str, Any], run_id: str | None) -> None:
    rows = [("backbone", cfg.backbone.name), ("epochs run", results["epochs"]), ("MLflow run", run_id or "-")]
    for key in ("val/acc", "train/clean_acc", "train_val_gap", "threshold", "test/acc", "test/precision",
                "test/recall", "test/f1", "test/auroc", "test/loss"):
        value = results.get(key)
        rows.append((key, f"{value:.4f}" if isinstance(value, float) else "-"))
    width = max(len(k) for k, _ in rows)
    print("\n" + "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows) + "\n", flush=True)


def _friendly_exit(error: BaseException) -> None:
    """Print a one-paragraph message instead of a traceback (CRACKCLF_DEBUG=1 shows the traceback)."""
    if os.environ.get("CRACKCLF_DEBUG"):
        traceback.print_exc()
    print(f"crackclf: error: {error}", file=sys.stderr, flush=True)
    sys.exit(2)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def hydra_main(cfg: DictConfig) -> float | None:
    """Hydra task: returns the optimised metric for sweepers."""
    try:
        results = run(cfg)
    except Exception as error:
        from crackclf.experiments.sweep import in_multirun, job_failed

        if in_multirun():  # one bad job must not stop a sweep: record it FAILED in MLflow, let the others run
            return job_failed(cfg, error)
        if isinstance(error, ConfigError):  # before the imports below, which load torch/Lightning/timm
            _friendly_exit(error)
        from crackclf.data.datamodule import DataError
        from crackclf.data.download import DownloadError
        from crackclf.data.images import ImageError
        from crackclf.inference.bundle import BundleError
        from crackclf.utils import DiskFullError

        if isinstance(error, (ConfigError, DataError, DownloadError, ImageError, BundleError, DiskFullError)):
            _friendly_exit(error)
        raise
    metric = results.get(cfg.get("optimized_metric") or "", None)
    return float(metric) if metric is not None else None


def check_command_line(argv: list[str]) -> None:
    """Check the overrides before Hydra does, so a misspelt key or option gets a message that lists the valid ones
    (one paragraph, exit status 2; ``CRACKCLF_DEBUG=1`` adds the traceback)."""
    from hydra._internal.utils import get_args_parser

    from crackclf.config import check_overrides

    try:
        args, _ = get_args_parser().parse_known_args(argv)
    except SystemExit:  # malformed flags: Hydra's own parser reports them
        return
    if args.help or args.hydra_help or args.info or args.config_dir or args.config_name or args.config_path:
        return
    try:
        check_overrides(args.overrides, Path(CONFIG_DIR))
    except ConfigError as error:
        _friendly_exit(error)
    except Exception as error:  # noqa: BLE001 - a pre-check must never stop a run Hydra would accept
        log.debug("override pre-check skipped: %s", error)


def main() -> None:
    """Console-script entry (``crackclf-train``) and ``python train.py``."""
    check_command_line(sys.argv[1:])
    hydra_main()


if __name__ == "__main__":
    main()
