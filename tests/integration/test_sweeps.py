"""Hydra sweeps as a user runs them (`python train.py -m ...`, joblib, Optuna) and `crackclf compare`, checked
through MlflowClient: one parent run per sweep, nested children, failures recorded, the best job named."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image

from tests.conftest import REPO, expected_validation_points, run_train
from tests.integration.test_train_spine import artifact_paths

ROLE = "crackclf.role"
QUIET = ("data.progress=false", "callbacks.progress_bar.refresh_rate=0")


def sweep_runs(uri: str, experiment: str = "crack"):
    """(parent, children) of the only sweep in the store; children sorted by job number."""
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    parents = [r for r in runs if r.data.tags.get(ROLE) == "sweep"]
    assert len(parents) == 1, [(r.info.run_name, r.data.tags.get(ROLE)) for r in runs]
    children = sorted((r for r in runs if r.data.tags.get(ROLE) != "sweep"),
                      key=lambda r: int(r.data.tags["sweep_job"]))
    return parents[0], children


def crackclf(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The `crackclf` CLI as a user runs it."""
    return subprocess.run([sys.executable, "-m", "crackclf.cli", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def check_nesting(parent, children) -> None:
    """Every child is nested under the parent and carries the sweep id and its own overrides."""
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.tags["sweep_id"] == parent.data.tags["sweep_id"]
        assert child.data.tags["overrides"]
    assert sorted(int(c.data.tags["sweep_job"]) for c in children) == list(range(len(children)))  # none lost


def check_best(parent, children, metric: str = "val/acc") -> None:
    """The parent names the FINISHED child with the highest metric and records its swept params."""
    finished = [c for c in children if c.info.status == "FINISHED"]
    best_value = max(c.data.metrics[metric] for c in finished)
    best = next(c for c in finished if c.data.metrics[metric] == best_value)  # first of ties, as Optuna does
    assert parent.data.tags["best_run_id"] == best.info.run_id
    assert parent.data.tags["best_job"] == best.data.tags["sweep_job"]
    assert parent.data.metrics[f"best/{metric}"] == pytest.approx(best_value)
    for key, value in parent.data.params.items():
        if key.startswith("best."):
            assert f"{key.removeprefix('best.')}={value}" in best.data.tags["overrides"]


# ------------------------------------------------------------------------------------------ fast: tiny data
@pytest.fixture(scope="module")
def two_job_sweep(tiny_dataset, tmp_path_factory):
    """`python train.py -m optimizer.lr=0.001,0.003` on generated images, one epoch, its own MLflow store."""
    root = tmp_path_factory.mktemp("two_job_sweep")
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "CRACKCLF_CACHE": str(root / "cache")}
    result = run_train("-m", f"data.root={tiny_dataset}", "data.image_size=32", "trainer.max_epochs=1", *QUIET,
                       "optimizer.lr=0.001,0.003", f"hydra.sweep.dir={root / 'sweep'}", env=env)
    return SimpleNamespace(result=result, uri=env["MLFLOW_TRACKING_URI"], env=env, root=root)


def test_multirun_makes_one_parent_with_two_nested_children(two_job_sweep):
    result = two_job_sweep.result
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    parent, children = sweep_runs(two_job_sweep.uri)
    assert len(children) == 2
    assert [c.info.status for c in children] == ["FINISHED", "FINISHED"]
    check_nesting(parent, children)
    assert [c.data.params["optimizer.lr"] for c in children] == ["0.001", "0.003"]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["jobs_failed"] == "0"
    check_best(parent, children)
    assert set(parent.data.params) >= {"best.optimizer.lr"}  # only the swept key: the others were common
    summary = (two_job_sweep.root / "sweep" / "sweep_summary.md").read_text()
    assert "2 jobs: 2 finished, 0 failed" in summary
    assert "sweep_summary.md" in artifact_paths(MlflowClient(two_job_sweep.uri), parent.info.run_id)
    for child in children:  # the metrics `crackclf compare` tabulates are there
        assert {"val/acc", "test/acc", "test/f1", "test/auroc", "epochs_run", "train/images_per_s"} <= set(
            child.data.metrics)


def test_compare_writes_table_and_one_curve_per_run_and_logs_them_to_the_parent(two_job_sweep, tmp_path):
    parent, children = sweep_runs(two_job_sweep.uri)
    sweep_id = parent.data.tags["sweep_id"]
    result = crackclf("compare", "--experiment", "crack", "--sweep", sweep_id, "--out", str(tmp_path / "reports"),
                      env=two_job_sweep.env)
    assert result.returncode == 0, result.stderr[-3000:]
    table = (tmp_path / "reports" / f"compare-{sweep_id}.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| run ")]
    assert len(rows) == 2
    for child in children:
        row = next(r for r in rows if child.info.run_id[:8] in r)
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[2] == "tf_efficientnet_lite0"  # the default backbone
        assert f"{child.data.metrics['val/acc']:.4f}" in cells and f"{child.data.metrics['test/f1']:.4f}" in cells
    png = Image.open(tmp_path / "reports" / f"compare-{sweep_id}.png")
    assert png.size[0] > 300
    assert sorted(json.loads(png.text["crackclf.curves"])) == sorted(c.info.run_id for c in children)
    logged = artifact_paths(MlflowClient(two_job_sweep.uri), parent.info.run_id)
    assert {f"compare/compare-{sweep_id}.md", f"compare/compare-{sweep_id}.png"} <= logged


@pytest.mark.slow
def test_job_failing_after_its_run_started_is_failed_with_the_error_and_the_sweep_says_so(tiny_dataset, tmp_path,
                                                                                         mlflow_uri, cache_dir):
    # An invalid precision passes config validation and makes Lightning raise once the MLflow run exists.
    result = run_train("-m", f"data.root={tiny_dataset}", "data.image_size=32", "trainer.max_epochs=1", *QUIET,
                       "trainer.precision=bogus", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert result.returncode == 1, result.stderr[-3000:]
    assert "1 of 1 sweep jobs failed (jobs 0)" in result.stdout
    parent, children = sweep_runs(mlflow_uri)
    assert len(children) == 1  # the job's own run, not a second one made by the failure handler
    child = children[0]
    assert child.info.status == "FAILED"
    assert "bogus" in child.data.tags["error"]
    assert "error/traceback.txt" in artifact_paths(MlflowClient(mlflow_uri), child.info.run_id)
    assert parent.info.status == "FAILED"  # nothing finished
    assert parent.data.tags["failed_jobs"] == "0" and "best_run_id" not in parent.data.tags


def test_compare_says_which_experiment_is_missing(two_job_sweep, monkeypatch, capsys):
    from crackclf.cli import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", two_job_sweep.uri)  # an existing store: creating one costs seconds
    assert main(["compare", "--experiment", "no_such_experiment", "--out", "/nonexistent/reports"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("crackclf compare: error:") and "'no_such_experiment'" in error
    assert "experiments there: Default, crack" in error and len(error.splitlines()) == 1


# ------------------------------------------------------------------------------------ slow: the shared data
def joblib_sweep(shared_data: Path, tmp_path: Path, lrs: str) -> subprocess.CompletedProcess:
    """4 jobs on 2 joblib workers, 100 images per class, one epoch (the default cache keeps the inventory)."""
    return run_train("-m", f"data.root={shared_data}", "data.max_per_class=100", "trainer.max_epochs=1", *QUIET,
                     f"optimizer.lr={lrs}", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                     f"hydra.sweep.dir={tmp_path / 'sweep'}", timeout=1200)


@pytest.mark.slow
@pytest.mark.shared_data
def test_joblib_sweep_four_jobs_two_workers_all_finished_none_lost(shared_data, tmp_path, mlflow_uri):
    result = joblib_sweep(shared_data, tmp_path, "0.001,0.002,0.003,0.004")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    parent, children = sweep_runs(mlflow_uri)
    assert len(children) == 4 and all(c.info.status == "FINISHED" for c in children)
    check_nesting(parent, children)
    check_best(parent, children)
    # Nothing lost on the shared SQLite store: every child has the same params and a full set of metrics.
    assert len({len(c.data.params) for c in children}) == 1
    client = MlflowClient(mlflow_uri)
    for child in children:
        points = expected_validation_points(client, child.info.run_id, int(child.data.metrics["epochs_run"]))
        assert len(client.get_metric_history(child.info.run_id, "val/acc")) == points
        assert "checkpoints/best.ckpt" in artifact_paths(client, child.info.run_id)
    # Two workers really ran jobs side by side.
    spans = sorted((c.info.start_time, c.info.end_time) for c in children)
    assert any(start < previous_end for (_, previous_end), (start, _) in zip(spans, spans[1:], strict=False))


@pytest.mark.slow
@pytest.mark.shared_data
def test_joblib_sweep_with_a_bad_override_value_finishes_the_others_and_reports_it(shared_data, tmp_path, mlflow_uri):
    result = joblib_sweep(shared_data, tmp_path, "0.001,0.002,0.003,-1")
    assert result.returncode == 1
    assert "1 of 4 sweep jobs failed (jobs 3)" in result.stdout
    parent, children = sweep_runs(mlflow_uri)
    assert [c.info.status for c in children] == ["FINISHED", "FINISHED", "FINISHED", "FAILED"]
    check_nesting(parent, children)
    failed = children[3]
    assert "optimizer.lr=-1 must be > 0" in failed.data.tags["error"]
    assert "error/traceback.txt" in artifact_paths(MlflowClient(mlflow_uri), failed.info.run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["failed_jobs"] == "3"
    check_best(parent, children)
    summary = (tmp_path / "sweep" / "sweep_summary.md").read_text()
    assert "4 jobs: 3 finished, 1 failed" in summary and "- job 3 `lr=-1` (FAILED): ConfigError" in summary


@pytest.mark.slow
@pytest.mark.shared_data
def test_optuna_sweep_names_the_best_trial_and_compare_plots_every_trial(shared_data, tmp_path, mlflow_uri):
    result = run_train("hparams_search=optuna", f"data.root={shared_data}", "data.max_per_class=100",
                       "trainer.max_epochs=1", *QUIET, "hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=2",
                       "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                       timeout=1200)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    parent, children = sweep_runs(mlflow_uri)
    assert len(children) == 4 and all(c.info.status == "FINISHED" for c in children)
    check_nesting(parent, children)
    check_best(parent, children)
    assert parent.data.tags["sweeper"] == "OptunaSweeper"
    # Optuna's own verdict agrees with the parent run's.
    optuna = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    assert parent.data.metrics["best/val/acc"] == pytest.approx(optuna["best_value"])
    for key, value in optuna["best_params"].items():
        logged = parent.data.params[f"best.{key}"]
        assert (float(logged) == pytest.approx(value)) if isinstance(value, float) else logged == str(value)

    out = tmp_path / "reports"
    compared = crackclf("compare", "--sweep", "latest", "--out", str(out))
    assert compared.returncode == 0, compared.stderr[-3000:]
    sweep_id = parent.data.tags["sweep_id"]
    png = Image.open(out / f"compare-{sweep_id}.png")
    assert sorted(json.loads(png.text["crackclf.curves"])) == sorted(c.info.run_id for c in children)
    rows = [line for line in (out / f"compare-{sweep_id}.md").read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| run ")]
    assert len(rows) == 4
