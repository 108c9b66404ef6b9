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
from crackclf.utils import repo_root

log = logging.getLogger("crackclf.train")
CONFIG_DIR = str(repo_root() / "conf")


class _Terminated(KeyboardInterrupt):
    """SIGTERM, turned into the interrupt Lightning already shuts down cleanly on."""


def _raise_terminated(signum, frame) -> None:
    raise _Terminated()


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_root(), capture_output=True, text=True,
                              timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def sweep_info() -> dict[str, str]:
    """Sweep id and overrides of this job when it runs inside a Hydra multirun."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
    except ValueError:  # not running under Hydra (e.g. called from a test)
        return {}
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return {}
    return {
        "sweep_id": Path(hydra_cfg.sweep.dir).name,
        "sweep_dir": str(hydra_cfg.sweep.dir),
        "sweep_job": str(hydra_cfg.job.num),
        "overrides": " ".join(hydra_cfg.overrides.task),
    }


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train, test and log one configuration; returns the final metrics (including the optimised one)."""
    import pytorch_lightning as pl
    import torch
    from hydra.utils import instantiate
    from pytorch_lightning.loggers import MLFlowLogger

    from crackclf.inference.bundle import BundleInfo, write_bundle_info
    from crackclf.tracking import mlflow as tracking
    from crackclf.tracking.plots import plot_confusion, plot_curves
    from crackclf.training.checkpointing import AtomicCheckpointIO
    from crackclf.training.threshold import choose_threshold

    validate(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision("high")
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    datamodule = instantiate(cfg.data, augment=instantiate(cfg.augmentation))
    datamodule.prepare()
    model = instantiate(cfg.model)

    use_mlflow = cfg.get("logger") is not None and "MLFlowLogger" in str(cfg.logger.get("_target_", ""))
    run_id = None
    loggers: list = []
    if use_mlflow:
        tags = {
            "backbone": cfg.backbone.name,
            "pretrained": model.pretrained_status,
            "git_commit": git_commit(),
            "output_dir": str(output_dir),
            **sweep_info(),
        }
        run_name = f"{cfg.backbone.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        run_id = tracking.start_run(cfg.experiment_name, run_name, tags)
        loggers.append(instantiate(cfg.logger, run_id=run_id))
        log.info("MLflow run %s (%s) in experiment %r at %s", run_id, run_name, cfg.experiment_name,
                 tracking.tracking_uri())
    elif cfg.get("logger") is not None:
        loggers.append(instantiate(cfg.logger))

    status = "FAILED"
    previous_sigterm = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        if run_id:
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
        trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                              plugins=[AtomicCheckpointIO()])
        trainer.fit(model, datamodule=datamodule)

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
        test_results = trainer.test(model, datamodule=datamodule, verbose=False)[0] if datamodule.rows_of("test") else {}

        final_gap = next((h["train/gap"] for h in reversed(model.history) if "train/gap" in h), None)
        overfitting = final_gap is not None and final_gap > cfg.model.max_gap
        if overfitting:
            log.warning("final train/acc - val/acc gap %.4f exceeds model.max_gap=%s: the run looks overfitted",
                        final_gap, cfg.model.max_gap)
        info = BundleInfo(
            backbone=cfg.backbone.name, image_size=cfg.data.image_size, mean=tuple(model.net.mean.flatten().tolist()),
            std=tuple(model.net.std.flatten().tolist()), class_names=tuple(cfg.data.class_names),
            threshold=model.decision_threshold, run_id=run_id, pretrained_status=model.pretrained_status,
            timm_kwargs=dict(cfg.backbone.get("kwargs") or {}),
        )
        if best_path:
            write_bundle_info(Path(best_path), info)

        results = {
            "epochs": trainer.current_epoch,
            "val/acc": float(val_results["val/acc"]),
            "val/loss": float(val_results["val/loss"]),
            "threshold": model.decision_threshold,
            "train_val_gap": final_gap,
            **{k: float(v) for k, v in test_results.items()},
        }
        matrix = _confusion(model, datamodule, trainer) if test_results else None
        if run_id:
            tracking.log_metrics(run_id, {"threshold": model.decision_threshold,
                                          "epochs_run": trainer.current_epoch})
            tracking.set_tags(run_id, {"overfitting": str(overfitting).lower(), "threshold_mode": threshold_cfg.mode})
            curves = plot_curves(model.history, output_dir / "curves.png", title=f"{cfg.backbone.name}")
            tracking.log_artifact(run_id, curves, "plots")
            if matrix is not None:
                confusion = plot_confusion(matrix, cfg.data.class_names, output_dir / "confusion_test.png",
                                           title=f"test split (threshold {model.decision_threshold:.3f})")
                tracking.log_artifact(run_id, confusion, "plots")
            if best_path:
                tracking.log_artifact(run_id, best_path, "checkpoints")
        _print_summary(cfg, results, run_id)
        status = "FINISHED"
        return results
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except SystemExit as exit_:  # Lightning turns Ctrl-C/SIGTERM into sys.exit(1) after a graceful stop
        status = "KILLED" if exit_.code else "FINISHED"
        raise
    except BaseException:
        if run_id:
            tracking.log_text(run_id, traceback.format_exc(), "error/traceback.txt")
        raise
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)
        if run_id:
            tracking.end_run(run_id, status)


def _confusion(model, datamodule, trainer) -> np.ndarray:
    """Confusion matrix of the test split at the decision threshold (rows: true, columns: predicted)."""
    import torch

    matrix = np.zeros((2, 2), dtype=np.int64)
    model.eval()
    with torch.no_grad():
        for batch in datamodule.test_dataloader():
            images, labels = datamodule.on_after_batch_transfer(
                [t.to(model.device) for t in batch], 0
            )
            predicted = (model(images).softmax(1)[:, 1] >= model.decision_threshold).long().cpu()
            np.add.at(matrix, (labels.cpu().numpy(), predicted.numpy()), 1)
    return matrix


def _print_summary(cfg: DictConfig, results: dict[str, Any], run_id: str | None) -> None:
    rows = [("backbone", cfg.backbone.name), ("epochs run", results["epochs"]), ("MLflow run", run_id or "-")]
    for key in ("val/acc", "threshold", "train_val_gap", "test/acc", "test/precision", "test/recall", "test/f1",
                "test/auroc", "test/loss"):
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
    from crackclf.data.datamodule import DataError
    from crackclf.data.images import ImageError
    from crackclf.inference.bundle import BundleError

    try:
        results = run(cfg)
    except (ConfigError, DataError, ImageError, BundleError) as error:
        _friendly_exit(error)
        return None
    metric = results.get(cfg.get("optimized_metric") or "", None)
    return float(metric) if metric is not None else None


def main() -> None:
    """Console-script entry (``crackclf-train``) and ``python train.py``."""
    hydra_main()


if __name__ == "__main__":
    main()
