"""`init_from=`: a run starts from the weights of a model trained before, as `make adapt` uses it."""

from __future__ import annotations

import pytest
import torch
from mlflow.tracking import MlflowClient

from crackclf.bundle import network_state
from tests.conftest import run_train

TINY = ("backbone=lcnet_050", "optimizer=adamw", "data.image_size=32", "data.batch_size=16", "trainer.max_epochs=1",
        "data.progress=false")


def _runs(uri: str):
    client = MlflowClient(uri)
    return client.search_runs([client.get_experiment_by_name("crack").experiment_id], order_by=["start_time ASC"])


def _weights(checkpoint) -> dict[str, torch.Tensor]:
    state = network_state(torch.load(checkpoint, map_location="cpu", weights_only=False))
    return {k: v for k, v in state.items() if "running_" not in k and "num_batches" not in k}  # learnt tensors


def test_a_run_starts_from_an_earlier_models_weights(tiny_dataset, tmp_path, mlflow_uri, cache_dir):
    first = run_train(f"data.root={tiny_dataset}", *TINY, f"hydra.run.dir={tmp_path / 'first'}")
    assert first.returncode == 0, first.stderr[-3000:]
    start = tmp_path / "first" / "checkpoints" / "best.ckpt"

    # A learning rate too small to move any weight: what the second run ends with is what it started from.
    second = run_train(f"data.root={tiny_dataset}", *TINY, f"init_from={start}", "optimizer.lr=1e-12",
                       f"hydra.run.dir={tmp_path / 'second'}")
    assert second.returncode == 0, second.stderr[-3000:]
    before, after = _weights(start), _weights(tmp_path / "second" / "checkpoints" / "best.ckpt")
    assert before.keys() == after.keys() and len(before) > 10
    assert all(torch.allclose(before[k], after[k], atol=1e-6) for k in before)
    runs = _runs(mlflow_uri)
    assert len(runs) == 2 and runs[1].data.tags["init_from"] == str(start) and "init_from" not in runs[0].data.tags
    # Before training, the second run scored its start model on the same test split at the model's own threshold:
    # the first run's own test scores, exactly; the trained model's test/* metrics are logged apart.
    first_metrics, second_metrics = runs[0].data.metrics, runs[1].data.metrics
    assert "before/test/acc" not in first_metrics
    for key in ("acc", "f1", "auroc"):
        assert second_metrics[f"before/test/{key}"] == pytest.approx(first_metrics[f"test/{key}"], abs=1e-6), key
    client = MlflowClient(mlflow_uri)
    assert len(client.get_metric_history(runs[1].info.run_id, "test/acc")) == 1  # the trained model's only

    # Without init_from a run starts elsewhere (a fresh random init): the check above can fail.
    third = run_train(f"data.root={tiny_dataset}", *TINY, "optimizer.lr=1e-12", "seed=7",
                      f"hydra.run.dir={tmp_path / 'third'}")
    assert third.returncode == 0, third.stderr[-3000:]
    fresh = _weights(tmp_path / "third" / "checkpoints" / "best.ckpt")
    assert not all(torch.allclose(before[k], fresh[k], atol=1e-6) for k in before)

    # Another backbone than the model's: a clear message, no traceback, nothing trained.
    other = run_train(f"data.root={tiny_dataset}", *TINY, "backbone=resnet10t", f"init_from={start}",
                      f"hydra.run.dir={tmp_path / 'other'}")
    assert other.returncode == 2 and "Traceback" not in other.stderr
    assert "is a lcnet_050 model but this run builds backbone=resnet10t" in other.stderr
    assert "backbone=lcnet_050" in other.stderr  # the fix


def test_a_missing_start_model_is_named_before_any_data_is_read(tiny_dataset, tmp_path, mlflow_uri):
    result = run_train(f"data.root={tiny_dataset}", f"init_from={tmp_path / 'nope.ckpt'}",
                       f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"init_from={tmp_path / 'nope.ckpt'} is not a file" in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
