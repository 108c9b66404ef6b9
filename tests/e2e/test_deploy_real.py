"""Deployment end to end on the real data, as a user runs it: train a short model, then `crackclf evaluate`,
`predict` (files and a whole-photo mosaic), `export` — each in its own process."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from tests.conftest import REPO, run_train

pytestmark = [pytest.mark.slow, pytest.mark.shared_data]

TILE = 227
CRACK_CELLS = {(0, 1), (1, 3), (2, 0)}  # (row, column) of the crack tiles in the 3x4 mosaic


def cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "crackclf.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def link_subset(source: Path, target: Path, files: dict[str, list[str]]) -> Path:
    """A class-folder tree of symbolic links into the shared data (never a copy)."""
    for class_dir, names in files.items():
        (target / class_dir).mkdir(parents=True, exist_ok=True)
        for name in names:
            (target / class_dir / name).symlink_to(source / class_dir / name)
    return target


def mosaic(shared: Path, negatives: list[str], positives: list[str], out: Path) -> Path:
    """A 3x4 'wall photo' of real 227 px crops with crack crops at CRACK_CELLS."""
    canvas = np.zeros((3 * TILE, 4 * TILE, 3), dtype=np.uint8)
    neg, pos = iter(negatives), iter(positives)
    for row in range(3):
        for column in range(4):
            name = next(pos) if (row, column) in CRACK_CELLS else next(neg)
            folder = "Positive" if (row, column) in CRACK_CELLS else "Negative"
            tile = Image.open(shared / folder / name).convert("RGB").resize((TILE, TILE))
            canvas[row * TILE : (row + 1) * TILE, column * TILE : (column + 1) * TILE] = np.asarray(tile)
    Image.fromarray(canvas).save(out, quality=95)
    return out


def test_real_model_evaluate_predict_map_export(shared_data, tmp_path, mlflow_uri, cache_dir):
    names = {c: sorted(p.name for p in (shared_data / c).glob("*.jpg")) for c in ("Negative", "Positive")}
    train = link_subset(shared_data, tmp_path / "train", {c: n[:700] for c, n in names.items()})
    heldout = link_subset(shared_data, tmp_path / "heldout", {c: n[-150:] for c, n in names.items()})
    result = run_train(f"data.root={train}", "backbone=lcnet_050", "optimizer=adamw",
                       "data.batch_size=64", "trainer.max_epochs=5",
                       "callbacks.early_stopping.patience=5", "data.progress=false",
                       "callbacks.progress_bar.refresh_rate=0", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("crack").experiment_id])
    model = f"runs:/{run.info.run_id}"

    # evaluate and predict on a labelled folder the model never saw: the CSV agrees with evaluate's accuracy
    evaluation = cli("evaluate", "--model", model, "--data", str(heldout), "--out", str(tmp_path / "eval"),
                     "--gradcam", "--no-progress")
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["acc"] >= 0.95 and metrics["images"] == 300, metrics
    assert (tmp_path / "eval" / "worst_mistakes_gradcam.png").is_file() or metrics["acc"] == 1.0
    prediction = cli("predict", "--model", model, str(heldout), "--out", str(tmp_path / "p.csv"), "--no-progress")
    assert prediction.returncode == 0, prediction.stderr[-3000:]
    with open(tmp_path / "p.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    truth = {"Negative": "no_crack", "Positive": "crack"}
    correct = sum(truth[Path(r["path"]).parent.name] == r["label"] for r in rows)
    assert len(rows) == 300 and correct / len(rows) == pytest.approx(metrics["acc"])

    # whole photo: a 3x4 mosaic of held-out crops; the map marks exactly the three crack tiles
    photo = mosaic(shared_data, names["Negative"][-160:-150], names["Positive"][-160:-150], tmp_path / "wall.jpg")
    mapped = cli("predict", "--model", model, str(photo), "--map", str(tmp_path / "maps"), "--out",
                 str(tmp_path / "wall.json"), "--no-progress")
    assert mapped.returncode == 0, mapped.stderr[-3000:]
    summary = json.loads((tmp_path / "maps" / "wall_map.json").read_text())
    assert summary["window"] == TILE and summary["tiles"] == 12
    cracked = {(t["y"] // TILE, t["x"] // TILE) for t in summary["tile_results"] if t["cracked"]}
    print(f"held-out accuracy {metrics['acc']:.4f}, threshold {summary['threshold']:.4f}, mosaic tile probabilities "
          f"{[round(t['probability'], 3) for t in summary['tile_results']]}")
    assert cracked == CRACK_CELLS, summary["tile_results"]
    assert summary["cracked_area_fraction"] == pytest.approx(3 / 12)
    assert len(summary["regions"]) == 3  # the three tiles touch no other cracked tile
    (row,) = json.loads((tmp_path / "wall.json").read_text())
    assert row["label"] == "crack" and Path(row["map"]).is_file()
    assert Image.open(row["map"]).size == (4 * TILE, 3 * TILE)

    # export to ONNX with the parity check on held-out images of the run's own split; ONNX predictions agree
    onnx_path = tmp_path / "model.onnx"
    export = cli("export", "--model", model, "--format", "onnx", "--out", str(onnx_path))
    assert export.returncode == 0 and "OK" in export.stdout, export.stdout + export.stderr[-3000:]
    assert float(export.stdout.split("max |Δp| = ")[1].split(",")[0]) <= 1e-4
    onnx_predict = cli("predict", "--model", str(onnx_path), str(heldout), "--out", str(tmp_path / "o.csv"),
                       "--no-progress")
    assert onnx_predict.returncode == 0, onnx_predict.stderr[-3000:]
    with open(tmp_path / "o.csv", newline="") as stream:
        onnx_rows = list(csv.DictReader(stream))
    assert [r["label"] for r in onnx_rows] == [r["label"] for r in rows]
    np.testing.assert_allclose([float(r["probability"]) for r in onnx_rows], [float(r["probability"]) for r in rows],
                               atol=1e-4)
