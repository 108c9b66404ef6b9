"""`make adapt` as a user runs it: a trained model, a few labelled photos of a new surface (tiles with their parent
photo in MANIFEST.csv) and a replay of the original data; one MLflow run tagged with its start model, with the start
model's scores before training and per-source scores after, and a bundle that loads."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from crackclf.bundle import load_model
from crackclf.data.split import read_split
from crackclf.inference.predictor import Predictor
from crackclf.metrics import choose_threshold
from tests.conftest import REPO, run_train, write_dataset
from tests.integration.test_multi_source import write_tiled_source


@pytest.fixture(scope="module")
def start_model(tmp_path_factory) -> tuple[Path, Path]:
    """A short default-backbone training on a generated original data set, in its own store and cache:
    (its best.ckpt, the original data)."""
    root = tmp_path_factory.mktemp("start_model")
    original = write_dataset(root / "original", per_class=40, size=64, seed=11)
    first = run_train(f"data.root={original}", "data.image_size=64", "trainer.max_epochs=1", "data.progress=false",
                      f"hydra.run.dir={root / 'first'}",
                      env={"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "CRACKCLF_CACHE": str(root / "c")})
    assert first.returncode == 0, first.stderr[-3000:]
    return root / "first" / "checkpoints" / "best.ckpt", original


@pytest.mark.slow  # two trainings of the default backbone
def test_make_adapt_starts_from_the_model_and_scores_each_source(start_model, tmp_path, mlflow_uri, cache_dir):
    model, original = start_model
    wall = tmp_path / "wall"
    write_tiled_source(wall, photos_per_class=6)

    args = f"data.image_size=64 trainer.max_epochs=2 data.progress=false adapt.replay_per_class=20 " \
           f"hydra.run.dir={tmp_path / 'adapted'}"
    result = subprocess.run(["make", "-s", "adapt", f"MODEL={model}", f"DATA={wall}", f"REPLAY={original}",
                             f"ARGS={args}"], cwd=REPO, env={**os.environ}, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]

    client = MlflowClient(mlflow_uri)
    (adapted,) = client.search_runs([client.get_experiment_by_name("crack").experiment_id])
    assert adapted.info.status == "FINISHED" and adapted.data.tags["init_from"] == str(model)
    metrics = adapted.data.metrics
    assert "val/new/acc" in metrics and "val/original/acc" in metrics
    # Each source's test accuracy before (the start model at its own threshold) and after (the adapted bundle at
    # the threshold it chose), against the logged split's test rows scored again here by each model.
    adapted_checkpoint = tmp_path / "adapted" / "checkpoints" / "best.ckpt"
    split_artifact = next(a.path for a in client.list_artifacts(adapted.info.run_id, "data") if a.path.endswith(".csv"))
    test_rows = [row for row in read_split(client.download_artifacts(adapted.info.run_id, split_artifact,
                                                                     str(tmp_path))) if row.split == "test"]
    assert {row.source for row in test_rows} == {"new", "original"}
    for prefix, checkpoint in (("before/", model), ("", adapted_checkpoint)):
        predictor = Predictor.load(checkpoint)
        for source in ("new", "original"):
            rows = [row for row in test_rows if row.source == source]
            scores = [p.probability for p in predictor.predict_sources([row.path for row in rows])]
            hits = [(score >= predictor.threshold) == bool(row.label) for score, row in zip(scores, rows, strict=True)]
            assert metrics[f"{prefix}test/{source}/acc"] == pytest.approx(sum(hits) / len(hits), abs=1e-6), prefix
    # The threshold (experiment=adapt: threshold.mode=balanced, threshold.source=new) is chosen on the new surface's
    # own validation photos, for balanced accuracy.
    split_rows = read_split(client.download_artifacts(adapted.info.run_id, split_artifact, str(tmp_path / "again")))
    new_val = [row for row in split_rows if row.split == "val" and row.source == "new"]
    assert {row.label for row in new_val} == {0, 1}
    adapted_predictor = Predictor.load(adapted_checkpoint)
    scores = np.array([p.probability for p in adapted_predictor.predict_sources([row.path for row in new_val])])
    expected = choose_threshold(scores, np.array([row.label for row in new_val]), "balanced")
    assert adapted_predictor.threshold == pytest.approx(expected, abs=1e-4)
    loaded = load_model(adapted_checkpoint)
    assert loaded.info.backbone == "tf_efficientnet_lite0" and loaded.info.image_size == 64
    assert loaded.info.run_id == adapted.info.run_id


@pytest.mark.slow  # an adaptation run per level
def test_the_adaptation_curve_adapts_on_some_photos_and_scores_the_others(start_model, tmp_path):
    """``make bench-adapt`` on a tiled surface given by a relative path (as the Makefile passes ../shared/...):
    level 0 is the start model, level 2 a real adaptation on whole photos of the pool, both scored on the same
    evaluation photos, none of which it trained on."""
    model, original = start_model
    wall = tmp_path / "surfaces" / "wall"
    parents = write_tiled_source(wall, photos_per_class=6)
    out = tmp_path / "adapt.json"
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_adapt.py"), "--model", str(model),
                             "--surfaces", "surfaces/wall", "--tiles", "0", "4", "--replay", str(original), "--out",
                             str(out), "data.image_size=64", "trainer.max_epochs=1", "adapt.replay_per_class=20",
                             "data.min_per_class=1"], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    start, adapted = json.loads(out.read_text())["results"]
    assert (start["tiles_per_class"], start["photos"], start["adapt_seconds"]) == (0, 0, 0.0)
    # Whole photos of 2x2 tiles until each class has 4; the 12 photos split 6 / 6 into evaluation and pool.
    assert adapted["used_negative"] >= 4 and adapted["used_positive"] >= 4
    assert adapted["used_negative"] + adapted["used_positive"] == 4 * adapted["photos"]
    assert start["evaluation_photos"] == adapted["evaluation_photos"] == 6
    assert start["images"] == adapted["images"] == 6 * 4 and adapted["adapt_seconds"] > 0
    # The adapted run's score on the original data's test share, before and after, read from its MLflow record.
    assert 0 <= adapted["test_original_acc"] <= 1 and 0 <= adapted["before_test_original_acc"] <= 1
    assert "test_original_acc" not in start
    assert len(set(parents.values())) == 12
    # Level 0 is the start model's own score on the evaluation photos, at its threshold.
    predictor = Predictor.load(model)
    order = sorted(set(parents.values()))
    random.Random(0).shuffle(order)  # the benchmark's draw (--seed 0)
    evaluation = set(order[: len(order) // 2])
    files = sorted(relpath for relpath, parent in parents.items() if parent in evaluation)
    said = [p.probability >= predictor.threshold for p in predictor.predict_sources([wall / f for f in files])]
    truth = [f.startswith("crack/") for f in files]
    recall = sum(s and t for s, t in zip(said, truth, strict=True)) / sum(truth)
    assert start["recall"] == pytest.approx(recall)
