"""Every MLflow call of crackclf goes through here: store location, runs, params, artifacts, retries.

The default store is SQLite at ``<repo>/mlruns/mlflow.db`` with artifacts in ``<repo>/mlruns/artifacts``
(absolute, so sweep jobs and other working folders share it); ``MLFLOW_TRACKING_URI`` overrides it.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from crackclf.utils import repo_root

log = logging.getLogger(__name__)
T = TypeVar("T")

RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
_PARAM_LIMIT = 6000  # MLflow's maximum length of a param value


def default_store_dir() -> Path:
    return repo_root() / "mlruns"


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the SQLite store inside ``<repo>/mlruns``."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    store = default_store_dir()
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"


def artifact_location(experiment_name: str) -> str | None:
    """Artifacts of the default store go under ``mlruns/artifacts/<experiment>``; other stores decide."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return None
    uri = tracking_uri()
    base = Path(uri.removeprefix("sqlite:///")).parent / "artifacts" / experiment_name
    return base.as_uri()


def with_retry(call: Callable[[], T], what: str, attempts: int = 8) -> T:
    """Run an MLflow call, retrying with jittered back-off when SQLite says ``database is locked``."""
    for attempt in range(attempts):
        try:
            return call()
        except Exception as error:  # noqa: BLE001 - MLflow wraps SQLAlchemy errors in several types
            transient = "database is locked" in str(error) or "UNIQUE constraint failed" in str(error)
            if not transient or attempt == attempts - 1:
                raise
            delay = min(5.0, 0.1 * 2**attempt) * (0.5 + random.random())
            log.info("MLflow %s: store busy (%s); retrying in %.2fs", what, type(error).__name__, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def client() -> MlflowClient:
    return MlflowClient(tracking_uri=tracking_uri())


def get_or_create_experiment(name: str) -> str:
    """The id of experiment ``name``, creating it (race-safe) when it does not exist."""
    mlflow_client = client()

    def lookup() -> str:
        found = mlflow_client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return mlflow_client.create_experiment(name, artifact_location=artifact_location(name))
        except MlflowException as error:
            if "already exists" in str(error) or "UNIQUE" in str(error):
                return mlflow_client.get_experiment_by_name(name).experiment_id
            raise

    return with_retry(lookup, "create experiment")


def start_run(experiment_name: str, run_name: str, tags: Mapping[str, str] | None = None,
              parent_run_id: str | None = None) -> str:
    """Create a RUNNING run and return its id."""
    experiment_id = get_or_create_experiment(experiment_name)
    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = with_retry(lambda: client().create_run(experiment_id, run_name=run_name, tags=all_tags), "create run")
    return run.info.run_id


def end_run(run_id: str, status: str) -> None:
    """Mark a run FINISHED, FAILED or KILLED."""
    if status not in RUN_STATUSES:
        raise ValueError(f"run status {status!r} is not one of {RUN_STATUSES}")
    with_retry(lambda: client().set_terminated(run_id, status), "end run")


def set_tags(run_id: str, tags: Mapping[str, Any]) -> None:
    batch = [RunTag(str(k), str(v)[:_PARAM_LIMIT]) for k, v in tags.items()]
    with_retry(lambda: client().log_batch(run_id, tags=batch), "set tags")


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}``; lists become their string form."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def log_params(run_id: str, params: Mapping[str, Any]) -> None:
    """Log params (already flat), in batches of 100, truncating over-long values."""
    items = [Param(str(k), str(v)[:_PARAM_LIMIT]) for k, v in params.items()]
    for start in range(0, len(items), 100):
        batch = items[start : start + 100]
        with_retry(lambda b=batch: client().log_batch(run_id, params=b), "log params")


def log_metrics(run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
    with_retry(lambda: client().log_batch(run_id, metrics=batch), "log metrics")


def log_artifact(run_id: str, path: Path | str, artifact_path: str | None = None) -> None:
    """Copy a file or folder into the run's artifacts."""
    path = Path(path)
    mlflow_client = client()
    if path.is_dir():
        with_retry(lambda: mlflow_client.log_artifacts(run_id, str(path), artifact_path), "log artifacts")
    else:
        with_retry(lambda: mlflow_client.log_artifact(run_id, str(path), artifact_path), "log artifact")


def log_text(run_id: str, text: str, artifact_file: str) -> None:
    with_retry(lambda: client().log_text(run_id, text, artifact_file), "log text")


def metric_history(run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) pairs of a metric, in step order."""
    history = with_retry(lambda: client().get_metric_history(run_id, key), "metric history")
    return sorted((m.step, m.value) for m in history)


def search_runs(experiment_names: Iterable[str], filter_string: str = "", max_results: int = 1000):
    mlflow_client = client()
    ids = [e.experiment_id for name in experiment_names if (e := mlflow_client.get_experiment_by_name(name))]
    if not ids:
        return []
    return with_retry(
        lambda: mlflow_client.search_runs(ids, filter_string=filter_string, max_results=max_results), "search runs"
    )
