"""Hydra sweeps in MLflow: one parent run per multirun, one nested child run per job, the best job recorded at the end.

The parent run is created by :class:`MlflowSweepCallback` (registered in ``conf/hydra/default.yaml`` under
``hydra.callbacks``) *before* any job starts, which also creates the SQLite store once instead of letting parallel
jobs race to initialise it. Its id is written to ``<sweep dir>/mlflow_parent.json``; every job — in this process,
a joblib worker or a cluster node — reads that file to nest its run under the parent. At the end the callback
reads the children back from MLflow (the one source of truth, whatever the launcher), records the best job on the
parent, writes ``<sweep dir>/sweep_summary.md`` and exits with status 1 when any job failed.

This module imports nothing heavy at import time: Hydra instantiates the callback in every run and job.
"""

from __future__ import annotations

import atexit
import json
import logging
import shlex
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from crackclf.utils import atomic_write_text

log = logging.getLogger(__name__)

PARENT_FILE = "mlflow_parent.json"
SUMMARY_FILE = "sweep_summary.md"
ROLE_TAG = "crackclf.role"  # "sweep" on parent runs, so listings can tell them from training runs


@dataclass(frozen=True)
class SweepParent:
    """What a job needs to know about its sweep's parent run."""

    run_id: str
    sweep_id: str
    experiment_name: str


def write_parent(sweep_dir: Path, parent: SweepParent) -> Path:
    """Record the parent run in the sweep folder (atomic: a job never reads half a file)."""
    return atomic_write_text(Path(sweep_dir) / PARENT_FILE, json.dumps(asdict(parent), indent=2))


def read_parent(sweep_dir: Path) -> SweepParent | None:
    """The parent run recorded in ``sweep_dir``, or ``None`` when the sweep has none (callback not registered)."""
    path = Path(sweep_dir) / PARENT_FILE
    if not path.is_file():
        return None
    return SweepParent(**json.loads(path.read_text()))


def _hydra_job() -> tuple[Any, Path] | None:
    """(Hydra config, absolute sweep dir) of the current job when it runs inside a multirun, else ``None``."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
    except ValueError:  # not running under Hydra (e.g. called from a test)
        return None
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    # Relative sweep dirs are relative to where the sweep was started, not to a job's (possibly changed) cwd.
    return hydra_cfg, Path(hydra_cfg.runtime.cwd) / str(hydra_cfg.sweep.dir)


def in_multirun() -> bool:
    """True inside a job of a Hydra multirun (``-m``, ``hydra.mode=MULTIRUN``, an Optuna search...)."""
    return _hydra_job() is not None


def job_info() -> dict[str, str]:
    """MLflow tags of the current sweep job: sweep id and folder, job number, overrides (empty outside a sweep)."""
    job = _hydra_job()
    if job is None:
        return {}
    hydra_cfg, sweep_dir = job
    parent = read_parent(sweep_dir)
    return {
        "sweep_id": parent.sweep_id if parent else sweep_dir.name,
        "sweep_dir": str(sweep_dir),
        "sweep_job": str(hydra_cfg.job.num),
        "overrides": " ".join(hydra_cfg.overrides.task),
    }


def parent_run_id() -> str | None:
    """The parent run of the current sweep job, if its sweep has one."""
    job = _hydra_job()
    parent = read_parent(job[1]) if job else None
    return parent.run_id if parent else None


def job_failed(cfg: DictConfig, error: BaseException) -> None:
    """Record a failed sweep job so the sweep can go on: its MLflow run ends FAILED with the error on it.

    A job that fails before its run exists (a bad override value caught by config validation, unreadable data)
    gets a FAILED child run here, with the job's config as params when it resolves, so the sweep's summary, MLflow
    and ``crackclf compare`` all show it. Returns ``None``: the value a job hands back to the sweeper (Optuna then
    marks the trial FAIL and goes on).
    """
    from crackclf.tracking import mlflow as tracking

    info = job_info()
    log.error("sweep job %s failed (%s): %s: %s", info.get("sweep_job", "?"), info.get("overrides", ""),
              type(error).__name__, error)
    parent_id = parent_run_id()
    if parent_id is None:
        return None
    experiment = str(cfg.experiment_name)
    existing = tracking.search_runs(
        [experiment], f"tags.`mlflow.parentRunId` = '{parent_id}' and tags.sweep_job = '{info['sweep_job']}'"
    )
    if existing:  # train.run() created the run and already marked it FAILED with the error
        return None
    backbone = str(OmegaConf.select(cfg, "backbone.name", default="?"))
    run_id = tracking.start_run(experiment, f"{backbone}-job{info['sweep_job']}-failed", {**info, "backbone": backbone},
                                parent_run_id=parent_id)
    try:
        params = tracking.flatten(OmegaConf.to_container(cfg, resolve=True))
    except Exception:  # noqa: BLE001 - a config that does not even resolve: the error tag says why
        params = {}
    tracking.log_params(run_id, params)
    tracking.record_error(run_id, error)
    tracking.end_run(run_id, "FAILED")
    return None


# --------------------------------------------------------------------------------------------------- the sweep end
@dataclass
class JobResult:
    """One child run, as the sweep summary shows it."""

    job: str
    run_id: str
    status: str
    overrides: str
    value: float | None
    error: str


def direction_of(config: DictConfig) -> str:
    """``maximize``/``minimize`` for the optimised metric: the sweeper's own setting, else from the metric's name."""
    declared = OmegaConf.select(config, "hydra.sweeper.direction", default=None)
    if isinstance(declared, str) or hasattr(declared, "name"):
        return str(getattr(declared, "name", declared)).lower()
    return "minimize" if "loss" in str(config.get("optimized_metric", "")) else "maximize"


def collect_jobs(experiment_name: str, parent_id: str, metric: str) -> list[JobResult]:
    """The child runs of a sweep, in job order, with the optimised metric of each."""
    from crackclf.tracking import mlflow as tracking

    runs = tracking.search_runs([experiment_name], f"tags.`mlflow.parentRunId` = '{parent_id}'")
    jobs = [
        JobResult(
            job=run.data.tags.get("sweep_job", "?"), run_id=run.info.run_id, status=run.info.status,
            overrides=run.data.tags.get("overrides", ""), value=run.data.metrics.get(metric),
            error=run.data.tags.get("error", ""),
        )
        for run in runs
    ]
    return sorted(jobs, key=lambda j: (int(j.job) if j.job.isdigit() else 1 << 30, j.run_id))


def best_job(jobs: list[JobResult], direction: str) -> JobResult | None:
    """The FINISHED job with the best metric value (``None`` when no job finished with a value)."""
    finished = [j for j in jobs if j.status == "FINISHED" and j.value is not None]
    if not finished:
        return None
    pick = max if direction == "maximize" else min
    return pick(finished, key=lambda j: j.value)


def override_params(overrides: str) -> dict[str, str]:
    """``"optimizer.lr=0.001 backbone=resnet18"`` → ``{"optimizer.lr": "0.001", "backbone": "resnet18"}``."""
    params = {}
    for item in shlex.split(overrides):
        key, sep, value = item.partition("=")
        if sep:
            params[key.lstrip("+~")] = value
    return params


def varying_keys(overrides: list[dict[str, str]]) -> list[str]:
    """Override keys whose value differs between jobs (what the sweep varied); all keys for a single job."""
    keys = sorted({k for item in overrides for k in item})
    if len(overrides) < 2:
        return keys
    return [k for k in keys if len({item.get(k) for item in overrides}) > 1]


def short_value(value: str) -> str:
    """``"0.00019010245319870352"`` → ``"0.00019"``: override and param values are strings; 3 significant digits."""
    try:
        number = float(value)
    except ValueError:
        return value
    return value if number.is_integer() and "e" not in value.lower() else f"{number:.3g}"


def format_overrides(overrides: dict[str, str], keys: list[str]) -> str:
    """The given overrides, compactly: ``lr=0.0003 image_size=64`` (last part of each key)."""
    return " ".join(f"{k.rsplit('.', 1)[-1]}={short_value(overrides[k])}" for k in keys if k in overrides)


def format_summary(sweep_id: str, metric: str, direction: str, jobs: list[JobResult], best: JobResult | None) -> str:
    """Markdown summary: one row per job (what it varied), then the best job and the failed ones."""
    parsed = {j.run_id: override_params(j.overrides) for j in jobs}
    swept = varying_keys(list(parsed.values()))
    common = sorted({k for item in parsed.values() for k in item} - set(swept))
    shared = " ".join(f"{k}={parsed[jobs[0].run_id][k]}" for k in common) if jobs else ""
    lines = [
        f"# Sweep {sweep_id}",
        "",
        f"{len(jobs)} jobs: {sum(j.status == 'FINISHED' for j in jobs)} finished, "
        f"{sum(j.status == 'FAILED' for j in jobs)} failed, {sum(j.status == 'KILLED' for j in jobs)} killed; "
        f"optimised metric {metric} ({direction}).",
        *([f"Common overrides: `{shared}`"] if shared else []),
        "",
        f"| job | status | {metric} | varied | run |",
        "|---|---|---|---|---|",
    ]
    for job in jobs:
        value = f"{job.value:.4f}" if job.value is not None else "-"
        marker = " **best**" if best is not None and job.run_id == best.run_id else ""
        varied = format_overrides(parsed[job.run_id], swept) or "-"
        lines.append(f"| {job.job} | {job.status}{marker} | {value} | `{varied}` | {job.run_id} |")
    lines.append("")
    if best is not None:
        lines.append(f"Best: job {best.job} (run {best.run_id}), {metric} = {best.value:.4f}: "
                     f"`{format_overrides(parsed[best.run_id], swept) or best.overrides}`.")
    else:
        lines.append("Best: none (no job finished).")
    failed = [j for j in jobs if j.status != "FINISHED"]
    if failed:
        lines += ["", "Failed jobs:"]
        lines += [f"- job {j.job} `{format_overrides(parsed[j.run_id], swept)}` ({j.status}): "
                  f"{j.error or 'see the run'}" for j in failed]
    return "\n".join(lines) + "\n"


class MlflowSweepCallback(Callback):
    """Hydra callback: a parent MLflow run around every multirun; see the module docstring.

    Args:
        enabled: set ``hydra.callbacks.mlflow_sweep.enabled=false`` to let jobs log top-level runs instead.
        fail_exit_code: the process exit status when at least one job failed (0: never fail the sweep).
    """

    def __init__(self, enabled: bool = True, fail_exit_code: int = 1) -> None:
        self.enabled = enabled
        self.fail_exit_code = fail_exit_code
        self.parent: SweepParent | None = None
        self.sweep_dir: Path | None = None
        self._ended = False

    @staticmethod
    def _uses_mlflow(config: DictConfig) -> bool:
        target = str(OmegaConf.select(config, "logger._target_", default="") or "")
        return "MLFlowLogger" in target

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.enabled or not self._uses_mlflow(config):
            return
        from crackclf.tracking import mlflow as tracking

        self.sweep_dir = (Path.cwd() / str(config.hydra.sweep.dir)).resolve()
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        experiment = str(config.experiment_name)
        sweep_id = self.sweep_dir.name
        # A reused sweep folder must not merge two sweeps under one id in `crackclf compare --sweep`.
        if tracking.search_runs([experiment], f"tags.sweep_id = '{sweep_id}' and tags.`{ROLE_TAG}` = 'sweep'"):
            sweep_id = f"{sweep_id}-{time.strftime('%Y%m%d-%H%M%S')}"
        sweeper = str(OmegaConf.select(config, "hydra.sweeper._target_", default="")).rsplit(".", 1)[-1]
        launcher = str(OmegaConf.select(config, "hydra.launcher._target_", default="")).rsplit(".", 1)[-1]
        tags = {
            ROLE_TAG: "sweep", "sweep_id": sweep_id, "sweep_dir": str(self.sweep_dir), "sweeper": sweeper,
            "launcher": launcher, "overrides": " ".join(config.hydra.overrides.task),
            "optimized_metric": str(config.get("optimized_metric")), "direction": direction_of(config),
        }
        run_id = tracking.start_run(experiment, f"sweep-{sweep_id}", tags)
        search_space = OmegaConf.select(config, "hydra.sweeper.params", default=None) or {}
        if search_space:
            tracking.log_params(run_id, {f"search.{k}": v for k, v in search_space.items()})
        self.parent = SweepParent(run_id=run_id, sweep_id=sweep_id, experiment_name=experiment)
        write_parent(self.sweep_dir, self.parent)
        # Ctrl-C or a sweeper error skips on_multirun_end: never leave the parent RUNNING forever.
        atexit.register(self._abandon)
        log.info("sweep %s: MLflow parent run %s in experiment %r", sweep_id, run_id, experiment)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.parent is None or self._ended:
            return
        from crackclf.tracking import mlflow as tracking

        parent = self.parent
        metric = str(config.get("optimized_metric"))
        direction = direction_of(config)
        jobs = collect_jobs(parent.experiment_name, parent.run_id, metric)
        best = best_job(jobs, direction)
        failed = [j for j in jobs if j.status != "FINISHED"]
        tags: dict[str, Any] = {"jobs": len(jobs), "jobs_failed": len(failed),
                                "failed_jobs": ",".join(j.job for j in failed)}
        if best is not None:
            tags.update(best_job=best.job, best_run_id=best.run_id, best_overrides=best.overrides)
            swept = varying_keys([override_params(j.overrides) for j in jobs])
            best_overrides = override_params(best.overrides)
            tracking.log_params(parent.run_id, {f"best.{k}": best_overrides[k] for k in swept if k in best_overrides})
            tracking.log_metrics(parent.run_id, {f"best/{metric}": best.value})
        tracking.log_metrics(parent.run_id, {"jobs_finished": len(jobs) - len(failed), "jobs_failed": len(failed)})
        tracking.set_tags(parent.run_id, tags)
        summary = format_summary(parent.sweep_id, metric, direction, jobs, best)
        summary_path = atomic_write_text(self.sweep_dir / SUMMARY_FILE, summary)
        tracking.log_artifact(parent.run_id, summary_path)
        # The sweep as a whole failed only if nothing finished; single failures are visible in the counts.
        tracking.end_run(parent.run_id, "FINISHED" if best is not None else "FAILED")
        self._ended = True
        print("\n" + summary, flush=True)
        if failed and self.fail_exit_code:
            print(f"crackclf: {len(failed)} of {len(jobs)} sweep jobs failed (jobs {tags['failed_jobs']}); "
                  f"see {summary_path}", flush=True)
            # SystemExit, not an exception: Hydra turns callback exceptions into warnings.
            raise SystemExit(self.fail_exit_code)

    def _abandon(self) -> None:
        if self.parent is None or self._ended:
            return
        from crackclf.tracking import mlflow as tracking

        self._ended = True
        try:
            tracking.set_tags(self.parent.run_id, {"error": "the sweep stopped before all its jobs were collected"})
            tracking.end_run(self.parent.run_id, "KILLED")
        except Exception as error:  # noqa: BLE001 - at interpreter exit, report and move on
            log.warning("could not close sweep parent run %s: %s", self.parent.run_id, error)
