"""Training entry (``python train.py``, ``crackclf-train``): compose the configured objects and run the stages
validate → prepare data → build → fit → finalize → bundle → log, inside one :class:`TrainingRun` that owns the run's
bookkeeping. The ML lives in those stages' modules, not here."""

from __future__ import annotations

import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import hydra
from hydra.errors import InstantiationException
from omegaconf import DictConfig

from crackclf.config import ConfigError, register_resolvers, validate
from crackclf.errors import CrackclfError
from crackclf.utils import config_dir

log = logging.getLogger("crackclf.train")
CONFIG_DIR = str(config_dir())


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train, test and log one configuration; returns the final metrics (including the optimised one)."""
    validate(cfg)  # before the heavy imports below: a wrong value is reported in a second or two
    from crackclf.training.launch import start_ranks_early

    with start_ranks_early(cfg) as early_ranks:  # now, so that their imports and start-up run beside ours
        return _run_stages(cfg, early_ranks)


def _run_stages(cfg: DictConfig, early_ranks: Any) -> dict[str, Any]:
    """The stages of :func:`run`, with DDP's other processes started (``early_ranks``) or left to Lightning."""
    import pytorch_lightning as pl
    import torch
    from hydra.utils import instantiate
    from pytorch_lightning.utilities.rank_zero import rank_zero_only

    from crackclf.bundle import write_bundle_info
    from crackclf.experiments.sweep import job_info, parent_run_id
    from crackclf.training.checkpointing import AtomicCheckpointIO
    from crackclf.training.finalize import bundle_info, finalize
    from crackclf.training.init_from import score_start
    from crackclf.training.lifecycle import TrainingRun
    from crackclf.training.resume import find_resume_point
    from crackclf.utils import describe_device, keep_freed_memory

    rank = rank_zero_only.rank
    if rank > 0:  # DDP's other processes run the same code: rank zero alone reports progress
        logging.getLogger("crackclf").setLevel(logging.WARNING)
    resume_point = find_resume_point(cfg.get("resume"), cfg, Path(cfg.paths.output_dir))
    if resume_point is not None:  # continue in the original run folder: its checkpoints, marker and MLflow run
        cfg.paths.output_dir = str(resume_point.run_dir)
    pl.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision("high")
    keep_freed_memory()  # no page-fault churn from the same big tensors freed and re-allocated every batch

    with TrainingRun(cfg, resume_point, rank) as training_run:
        training_run.open_store_early()  # on ranks > 0, while rank zero prepares the data
        datamodule = instantiate(cfg.data, augment=instantiate(cfg.augmentation))
        datamodule.prepare(prefetch_cache=True)  # decoded while the model, MLflow run and DDP ranks start
        model = instantiate(cfg.model)
        started_from = _start_from(cfg, model)
        training_run.start(model.pretrained_status, extra_tags={**job_info(), **started_from},
                           parent_run_id=parent_run_id())
        training_run.log_inputs(datamodule)
        callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
        trainer = instantiate(cfg.trainer, callbacks=[*callbacks, training_run.checkpoints],
                              logger=training_run.loggers or False, plugins=[AtomicCheckpointIO()])
        early_ranks.attach(trainer)
        training_run.set_tags({"device": describe_device(trainer.strategy.root_device)})
        if started_from:  # what the start model scores here before training: the adaptation's "before"
            training_run.log_metrics(score_start(trainer, model, datamodule))
        trainer.fit(model, datamodule=datamodule, ckpt_path=resume_point.checkpoint if resume_point else None,
                    weights_only=False)  # our own checkpoint: it also holds RNG states and the metric journal
        report = finalize(trainer, model, datamodule, threshold_mode=cfg.threshold.mode,
                          target_recall=cfg.threshold.target_recall, max_gap=cfg.model.max_gap,
                          threshold_source=cfg.threshold.get("source"))
        info = bundle_info(cfg, model, datamodule, report.threshold, training_run.run_id)
        if report.best_checkpoint and rank == 0:  # one writer: other DDP ranks have no verify report
            write_bundle_info(Path(report.best_checkpoint), info)
        training_run.log_report(report, model.history, info, model.net)
        if rank == 0:  # one summary, not one per DDP process
            _print_summary(cfg, report.results(), training_run.run_id)
    return report.results()


def _start_from(cfg: DictConfig, model: Any) -> dict[str, str]:
    """The ``init_from`` stage: the weights of an earlier model, when one is given; the run's tag naming it."""
    if not cfg.get("init_from"):
        return {}
    from crackclf.training.init_from import initialise_from

    source = str(cfg.init_from)
    return {"init_from": initialise_from(model, source, cfg.backbone.name, dict(cfg.backbone.get("kwargs") or {}))}


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
    register_resolvers()  # here, in the task: a launcher may run it in a process that never ran main()
    try:
        results = run(cfg)
    except Exception as error:
        from crackclf.experiments.sweep import in_multirun, job_failed

        if in_multirun():  # one bad job must not stop a sweep: record it FAILED in MLflow, let the others run
            return job_failed(cfg, error)
        cause = error  # hydra.utils.instantiate wraps what a constructor raises (e.g. a BackboneError) in its own
        while isinstance(cause, InstantiationException) and cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, CrackclfError):  # bad input or environment: one paragraph; a bug keeps its traceback
            _friendly_exit(cause)
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
    register_resolvers()  # before Hydra: `--cfg job --resolve` resolves the config before any task runs
    hydra_main()


if __name__ == "__main__":
    main()
