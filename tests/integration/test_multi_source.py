"""`data.sources` end to end: two generated folders (one with a MANIFEST.csv naming each tile's parent photo)
trained together by `python train.py`, scored per source in MLflow, every photo's tiles in one split."""

from __future__ import annotations

import csv
import hashlib
import math
from collections import defaultdict

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import make_concrete, run_train, write_dataset


def write_tiled_source(root, photos_per_class: int = 10, seed: int = 5):
    """Photos of 96 px cut into 2x2 tiles of 48 px under no_crack/ and crack/, listed in MANIFEST.csv with their
    parent photo (the layout of ../shared/data/other_surfaces)."""
    rng = np.random.default_rng(seed)
    lines = [("relpath", "label", "md5", "parent")]
    for label in ("no_crack", "crack"):
        (root / label).mkdir(parents=True, exist_ok=True)
        for number in range(photos_per_class):
            photo = make_concrete(rng, 96, crack=label == "crack")
            parent = f"{label}_photo{number:02d}"
            for row in range(2):
                for col in range(2):
                    relpath = f"{label}/{parent}_r{row}c{col}.png"
                    photo.crop((col * 48, row * 48, col * 48 + 48, row * 48 + 48)).save(root / relpath)
                    lines.append((relpath, label, hashlib.md5((root / relpath).read_bytes()).hexdigest(), parent))
    with open(root / "MANIFEST.csv", "w", newline="") as handle:
        csv.writer(handle).writerows(lines)
    return {relpath: parent for relpath, _, _, parent in lines[1:]}


@pytest.mark.slow  # two short trainings' worth of interpreter start-up and fitting
def test_two_sources_train_together_with_per_source_metrics_and_whole_photos(tmp_path, mlflow_uri, cache_dir):
    slabs = write_dataset(tmp_path / "slabs", per_class=30, size=48, seed=3)
    walls = tmp_path / "walls"
    parents = write_tiled_source(walls)
    sources = (f"data.sources=[{{root: {slabs}}}, {{root: {walls}, name: walls, class_dirs: [no_crack, crack], "
               "weight: 2.0}]")
    result = run_train(sources, "backbone=lcnet_050", "backbone.pretrained=false", "optimizer=adamw",
                       "trainer.max_epochs=3", "data.image_size=32", "data.batch_size=16", "data.min_per_class=5",
                       "data.progress=false", "callbacks.progress_bar.refresh_rate=0",
                       f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]

    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("crack").experiment_id])
    metrics = run.data.metrics
    for split in ("val", "test"):
        for source in ("slabs", "walls"):
            for name in ("acc", "balanced_acc"):
                value = metrics.get(f"{split}/{source}/{name}")
                assert isinstance(value, float) and 0.0 <= value <= 1.0 and not math.isnan(value), (split, source,
                                                                                                   name, value)
    assert "val/acc" in metrics and "test/acc" in metrics  # the overall metrics are still there

    # The split the run used (logged with it): both sources, and no parent photo in two splits.
    split_csv = client.download_artifacts(run.info.run_id, "data", str(tmp_path / "dl"))
    (path,) = [p for p in (tmp_path / "dl" / "data").iterdir() if p.name.startswith("split-sources-")]
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert split_csv and {row["source"] for row in rows} == {"slabs", "walls"}
    splits_of = defaultdict(set)
    for row in rows:
        if row["source"] == "walls":
            relative = row["path"].removeprefix(f"{walls}/")
            splits_of[parents[relative]].add(row["split"])
    assert len(splits_of) == 20 and all(len(found) == 1 for found in splits_of.values()), splits_of
    assert {split for found in splits_of.values() for split in found} == {"train", "val", "test"}
    assert sum(1 for row in rows if row["source"] == "walls") == 80 and len(rows) == 80 + 60
