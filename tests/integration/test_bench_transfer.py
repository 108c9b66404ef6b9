"""scripts/bench_transfer.py as a user runs it: a model and labelled folders of other surfaces in, one row per
folder out (balanced accuracy, AUROC, recall, false alarms at the model's threshold), through the prediction path."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from crackclf.inference.predictor import Predictor
from tests.conftest import REPO
from tests.served_model import write_model


def test_transfer_benchmark_scores_each_surface_like_the_predictor(tiny_dataset, tmp_path):
    model = write_model(tmp_path)
    # Another surface in the other naming convention, imbalanced like the real ones (12 cracks, 4 without).
    surface = tmp_path / "brick"
    for source, target, count in (("Positive", "crack", 12), ("Negative", "no_crack", 4)):
        (surface / target).mkdir(parents=True)
        for path in sorted((tiny_dataset / source).glob("*.jpg"))[:count]:
            shutil.copyfile(path, surface / target / path.name)
    out = tmp_path / "transfer.json"
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_transfer.py"), "--model", str(model),
                             "--surfaces", str(tiny_dataset), str(surface), "--out", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {r["set"]: r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {tiny_dataset.name, "brick"} and rows["brick"]["images"] == 16
    predictor = Predictor.load(model)
    files = sorted((surface / "crack").glob("*.jpg")) + sorted((surface / "no_crack").glob("*.jpg"))
    labels = np.array([1] * 12 + [0] * 4)
    said = np.array([p.probability >= predictor.threshold for p in predictor.predict_sources(files)])
    recall, specificity = said[labels == 1].mean(), 1 - said[labels == 0].mean()
    assert rows["brick"]["recall"] == pytest.approx(recall)
    assert rows["brick"]["false_alarm_rate"] == pytest.approx(1 - specificity)
    assert rows["brick"]["balanced_acc"] == pytest.approx((recall + specificity) / 2)
    assert "brick" in result.stdout and "bal.acc" in result.stdout


def test_a_folder_without_class_folders_is_refused_by_name(tmp_path):
    (tmp_path / "photos").mkdir()
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_transfer.py"), "--model",
                             str(write_model(tmp_path)), "--surfaces", str(tmp_path / "photos")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and f"{tmp_path / 'photos'}: no no_crack/crack or Negative/Positive" in result.stderr
