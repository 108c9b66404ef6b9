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
# Model/artifact downloads draw their own progress bars otherwise, in the middle of crackclf's output.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

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
    """Artifacts of a SQLite store go beside its database, under ``artifacts/<experiment>`` (for the default store:
    ``mlruns/artifacts/<experiment>``); other stores decide. Without this MLflow would put them in ``./mlruns`` of
    whatever the working folder is, so an isolated store (tests, ``MLFLOW_TRACKING_URI``) would not be isolated."""
    uri = tracking_uri()
    if not uri.startswith("sqlite:///"):
        return None
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


_PREPARED: set[str] = set()


def client() -> MlflowClient:
    """A client of the store (created and migrated once per process, see :func:`prepare_store`)."""
    uri = tracking_uri()
    if uri not in _PREPARED:
        prepare_store(uri)
        _PREPARED.add(uri)
    return MlflowClient(tracking_uri=uri)


def prepare_store(uri: str) -> None:
    """Create or upgrade a SQLite store's tables under a file lock beside the database.

    Two trainings that open a new store at the same moment would otherwise both run MLflow's schema migrations,
    and one of them fails (``CircularDependencyError``, ``table ... already exists``, ``database is locked``).
    """
    if not uri.startswith("sqlite:///"):
        return
    from filelock import FileLock

    database = Path(uri.removeprefix("sqlite:///"))
    database.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{database}.lock"):
        with_retry(lambda: MlflowClient(tracking_uri=uri).search_experiments(max_results=1), "open store")


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
    # File names that are not valid UTF-8 (lone surrogates) would make MLflow's UTF-8 write fail: escape them.
    safe = text.encode("utf-8", "backslashreplace").decode("utf-8")
    with_retry(lambda: client().log_text(run_id, safe, artifact_file), "log text")


def record_error(run_id: str, error: BaseException) -> None:
    """Put an error on a run: an ``error`` tag (type and message) and the traceback as ``error/traceback.txt``."""
    import traceback

    set_tags(run_id, {"error": f"{type(error).__name__}: {error}"})
    log_text(run_id, "".join(traceback.format_exception(error)), "error/traceback.txt")


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


def experiment_names() -> list[str]:
    """Names of the experiments in the store (for "no such experiment" messages)."""
    return sorted(e.name for e in with_retry(lambda: client().search_experiments(), "search experiments"))


def get_run(run_id: str):
    """The MLflow run (info, data: params/metrics/tags)."""
    return with_retry(lambda: client().get_run(run_id), "get run")


def experiment_name_of(run_id: str) -> str:
    """The name of the experiment a run belongs to."""
    experiment_id = get_run(run_id).info.experiment_id
    return with_retry(lambda: client().get_experiment(experiment_id), "get experiment").name


def download_artifact(run_id: str, artifact_path: str, dst: Path) -> Path:
    """Download one artifact (file or folder) of a run into ``dst``; returns the local path."""
    dst.mkdir(parents=True, exist_ok=True)
    local = with_retry(lambda: client().download_artifacts(run_id, artifact_path, str(dst)), "download artifact")
    return Path(local)


def _use_store() -> None:
    """Point MLflow's fluent API (needed for model logging/loading) at our store."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_registry_uri(tracking_uri())


def log_pytorch_model(run_id: str, model: Any, input_example: Any, metadata: Mapping[str, Any],
                      registered_model_name: str | None = None, name: str = "model") -> tuple[str, str | None]:
    """Log ``model`` with the MLflow PyTorch flavour (signature inferred from ``input_example``) to run ``run_id``.

    With ``registered_model_name`` the model is also registered. Returns ``(model_uri, registered version)``.
    Pip requirements are given explicitly: inferring them would re-load the model in a subprocess (slow).
    """
    import mlflow
    import mlflow.pytorch
    import torch
    from mlflow.models import infer_signature

    _use_store()
    # The logged model belongs to the fluent "active" experiment, not to run_id's: point it at the run's, or its
    # files land in experiment 0's default location (./mlruns/0 of the working folder).
    mlflow.set_experiment(experiment_id=get_run(run_id).info.experiment_id)
    with torch.no_grad():
        output = model(torch.from_numpy(input_example)).softmax(dim=1).numpy()
    signature = infer_signature(input_example, output)
    requirements = [f"torch=={torch.__version__.split('+')[0]}", "timm", "crackclf"]
    # MLflow warns that pickle is unsafe on every call; the choice is deliberate (see serialization_format below).
    logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
    info = with_retry(lambda: mlflow.pytorch.log_model(
        model, name=name, signature=signature, input_example=input_example, metadata=dict(metadata),
        pip_requirements=requirements, registered_model_name=registered_model_name, run_id=run_id,
        serialization_format="pickle",  # keeps the module structure (Grad-CAM needs layers, not an exported graph)
    ), "log model")
    version = getattr(info, "registered_model_version", None)
    return info.model_uri, (str(version) if version is not None else None)


def load_pytorch_model(model_uri: str) -> tuple[Any, dict[str, Any]]:
    """Load a model logged with the PyTorch flavour (``models:/name/version``, ``runs:/id/model``, ...).

    Returns ``(torch module, MLflow model metadata)``.
    """
    import tempfile

    import mlflow.artifacts
    import mlflow.pytorch
    from mlflow.models import Model

    _use_store()
    with tempfile.TemporaryDirectory(prefix="crackclf-mlflow-model-") as tmp:
        local = with_retry(lambda: mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp),
                           "download model")
        metadata = Model.load(local).metadata or {}
        module = mlflow.pytorch.load_model(local, map_location="cpu", weights_only=False)
    return module, metadata


def latest_model_version(name: str) -> str | None:
    """The highest registered version of model ``name`` (``None`` when it is not registered)."""
    versions = with_retry(lambda: client().search_model_versions(f"name='{name}'"), "search model versions")
    return max((v.version for v in versions), key=int, default=None)


def reopen_run(run_id: str) -> None:
    """Mark a KILLED/FAILED run RUNNING again, so a resumed training continues in it (same run id)."""
    with_retry(lambda: client().update_run(run_id, status="RUNNING"), "reopen run")


def log_metric_rows(run_id: str, rows: Iterable[tuple[str, float, int, int]]) -> None:
    """Log ``(key, value, timestamp_ms, step)`` rows as they were recorded, 1000 per request (MLflow's limit)."""
    metrics = [Metric(key, float(value), int(timestamp), int(step)) for key, value, timestamp, step in rows]
    for start in range(0, len(metrics), 1000):
        batch = metrics[start : start + 1000]
        with_retry(lambda b=batch: client().log_batch(run_id, metrics=b), "log metrics")


def metric_points(run_id: str) -> set[tuple[str, int, float]]:
    """Every ``(key, step, value)`` point logged to a run (all keys, whole history)."""
    keys = list(get_run(run_id).data.metrics)
    return {(key, step, value) for key in keys for step, value in metric_history(run_id, key)}
