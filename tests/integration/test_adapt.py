"""`make adapt` as a user runs it: a trained model, a few labelled photos of a new surface (tiles with their parent
photo in MANIFEST.csv) and a replay of the original data; one MLflow run tagged with its start model, with the start
model's scores before training and per-source scores after, and a bundle that loads."""

from __future__ import annotations

import os
import subprocess

import pytest
from mlflow.tracking import MlflowClient

from crackclf.bundle import load_model
from tests.conftest import REPO, run_train, write_dataset
from tests.integration.test_multi_source import write_tiled_source


@pytest.mark.slow  # two trainings of the default backbone
def test_make_adapt_starts_from_the_model_and_scores_each_source(tmp_path, mlflow_uri, cache_dir):
    original = write_dataset(tmp_path / "original", per_class=40, size=64, seed=11)
    first = run_train(f"data.root={original}", "data.image_size=64", "trainer.max_epochs=1", "data.progress=false",
                      f"hydra.run.dir={tmp_path / 'first'}")
    assert first.returncode == 0, first.stderr[-3000:]
    model = tmp_path / "first" / "checkpoints" / "best.ckpt"
    wall = tmp_path / "wall"
    write_tiled_source(wall, photos_per_class=6)

    args = f"data.image_size=64 trainer.max_epochs=2 data.progress=false adapt.replay_per_class=20 " \
           f"hydra.run.dir={tmp_path / 'adapted'}"
    result = subprocess.run(["make", "-s", "adapt", f"MODEL={model}", f"DATA={wall}", f"REPLAY={original}",
                             f"ARGS={args}"], cwd=REPO, env={**os.environ}, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]

    client = MlflowClient(mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("crack").experiment_id], order_by=["start_time ASC"])
    assert len(runs) == 2
    adapted = runs[1]
    assert adapted.info.status == "FINISHED" and adapted.data.tags["init_from"] == str(model)
    metrics = adapted.data.metrics
    for key in ("before/test/acc", "before/test/new/acc", "before/test/original/acc", "test/acc", "test/new/acc",
                "test/original/acc", "val/new/acc"):
        assert key in metrics and 0.0 <= metrics[key] <= 1.0, key
    loaded = load_model(tmp_path / "adapted" / "checkpoints" / "best.ckpt")
    assert loaded.info.backbone == "tf_efficientnet_lite0" and loaded.info.image_size == 64
    assert loaded.info.run_id == adapted.info.run_id
