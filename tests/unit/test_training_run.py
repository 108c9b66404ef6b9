"""The run's bookkeeping on its own (crackclf.training.lifecycle): every way out of a training run leaves the MLflow
run, the run marker, the lock and the SIGTERM handler in the state a user and ``resume=`` rely on."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from mlflow.tracking import MlflowClient
from pytorch_lightning.utilities.exceptions import SIGTERMException

from crackclf.config import ConfigError, register_resolvers
from crackclf.training.lifecycle import TrainingRun
from crackclf.training.resume import lock_run, read_marker

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def cfg(tmp_path, mlflow_uri):
    GlobalHydra.instance().clear()
    register_resolvers()  # explicitly: importing crackclf.config registers nothing
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("train", overrides=[f"paths.output_dir={tmp_path / 'run'}", f"paths.root_dir={tmp_path}"])


def outcome(cfg, run_id: str, mlflow_uri: str) -> tuple[str, str, dict]:
    """(MLflow status, marker status, MLflow tags) after the run."""
    run = MlflowClient(mlflow_uri).get_run(run_id)
    return run.info.status, read_marker(Path(cfg.paths.output_dir))["status"], run.data.tags


def test_a_clean_exit_is_finished_and_frees_the_folder(cfg, mlflow_uri):
    with TrainingRun(cfg, None) as training_run:
        training_run.start("false", extra_tags={"sweep_id": "s1"})
        assert read_marker(Path(cfg.paths.output_dir))["status"] == "RUNNING"
        with pytest.raises(ConfigError, match="in use by another training process"):
            TrainingRun(cfg, None).__enter__()  # the folder is held while the run lasts
    status, marker, tags = outcome(cfg, training_run.run_id, mlflow_uri)
    assert (status, marker) == ("FINISHED", "FINISHED")
    assert tags["pretrained"] == "false" and tags["sweep_id"] == "s1" and tags["backbone"] == cfg.backbone.name
    lock = lock_run(Path(cfg.paths.output_dir))
    assert lock is not None  # released
    lock.release()


def test_a_failing_stage_is_failed_with_its_traceback_in_mlflow(cfg, mlflow_uri):
    # The stage's own error reaches the caller unchanged.
    with pytest.raises(ZeroDivisionError), TrainingRun(cfg, None) as training_run:
        training_run.start("false")
        _ = 1 / 0
    status, marker, tags = outcome(cfg, training_run.run_id, mlflow_uri)
    assert (status, marker) == ("FAILED", "FAILED")
    assert tags["error"].startswith("ZeroDivisionError")
    traceback_text = MlflowClient(mlflow_uri).download_artifacts(training_run.run_id, "error/traceback.txt")
    assert "1 / 0" in Path(traceback_text).read_text()


def test_sigterm_between_stages_is_killed_and_restores_the_handler(cfg, mlflow_uri):
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), TrainingRun(cfg, None) as training_run:
        training_run.start("false")
        os.kill(os.getpid(), signal.SIGTERM)
        signal.pause()  # the handler raises here, like in a stage between fits
    status, marker, _ = outcome(cfg, training_run.run_id, mlflow_uri)
    assert (status, marker) == ("KILLED", "KILLED")
    assert signal.getsignal(signal.SIGTERM) == before


def test_lightnings_graceful_sigterm_stop_exits_143_and_is_killed(cfg, mlflow_uri):
    with pytest.raises(SystemExit) as exit_, TrainingRun(cfg, None) as training_run:
        training_run.start("false")
        raise SIGTERMException()
    assert exit_.value.code == 128 + signal.SIGTERM
    assert outcome(cfg, training_run.run_id, mlflow_uri)[:2] == ("KILLED", "KILLED")


def test_a_failure_before_the_run_starts_leaves_no_marker_and_frees_the_folder(cfg, mlflow_uri):
    # E.g. the data folder is missing: nothing was started.
    with pytest.raises(FileNotFoundError), TrainingRun(cfg, None):
        raise FileNotFoundError("data")
    assert read_marker(Path(cfg.paths.output_dir)) is None
    assert MlflowClient(mlflow_uri).search_experiments(filter_string=f"name = '{cfg.experiment_name}'") == []
    lock = lock_run(Path(cfg.paths.output_dir))
    assert lock is not None
    lock.release()
