"""scripts/bench_shift.py as a user runs it: a model, its split CSV and data root in; one row per camera/file change
out, through the normal prediction path."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
from PIL import Image

from crackclf.data.split import SplitRow, write_split
from crackclf.inference.predictor import Predictor
from tests.conftest import REPO
from tests.served_model import write_model


def jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def test_shift_benchmark_reports_every_condition_on_the_test_rows(tiny_dataset, tmp_path):
    model = write_model(tmp_path)
    files = sorted(p.relative_to(tiny_dataset).as_posix() for p in tiny_dataset.rglob("*.jpg"))
    rows = [SplitRow(path, int(path.startswith("Positive")), index, "test" if index % 4 == 0 else "train", "")
            for index, path in enumerate(files)]
    split = write_split(tmp_path / "split.csv", rows)
    out = tmp_path / "shift.json"
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_shift.py"), "--model", str(model),
                             "--split", str(split), "--data", str(tiny_dataset), "--out", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    test_rows = [r for r in rows if r.split == "test"]
    assert f"{len(test_rows)} test images ({sum(r.label for r in test_rows)} cracks)" in result.stdout
    report = json.loads(out.read_text())["results"]
    assert len(report) == 10 and report[0]["delta_points"] == 0.0
    assert {"JPEG quality 30", "grey scale"} <= {r["condition"] for r in report}
    # The unchanged condition is the model's own accuracy on those rows, as the predictor gives it directly.
    predictor = Predictor.load(model)
    predictions = list(predictor.predict_sources([tiny_dataset / r.path for r in test_rows]))
    pairs = list(zip(predictions, test_rows, strict=True))
    correct = sum(int(p.probability >= predictor.threshold) == r.label for p, r in pairs)
    assert report[0]["accuracy"] == pytest.approx(correct / len(test_rows))
    cracks = [(p, r) for p, r in pairs if r.label == 1]
    assert report[0]["crack_recall"] == pytest.approx(
        sum(p.probability >= predictor.threshold for p, _ in cracks) / len(cracks))
    # A changed condition is scored on the changed images: grey scale, rendered here as the README describes it (the
    # image's luminance in all three channels, saved as a JPEG of quality 95), against the unchanged accuracy.
    grey = [jpeg_bytes(Image.open(tiny_dataset / r.path).convert("L").convert("RGB")) for r in test_rows]
    grey_correct = sum(int(p.probability >= predictor.threshold) == r.label
                       for p, r in zip(predictor.predict_sources(grey), test_rows, strict=True))
    (grey_row,) = [r for r in report if r["condition"] == "grey scale"]
    assert grey_row["accuracy"] == pytest.approx(grey_correct / len(test_rows))
    assert grey_row["delta_points"] == pytest.approx(100 * (grey_correct - correct) / len(test_rows), abs=0.01)


def test_a_split_without_test_rows_is_refused_by_name(tiny_dataset, tmp_path):
    split = write_split(tmp_path / "split.csv", [SplitRow("Negative/00000.jpg", 0, 0, "train", "")])
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_shift.py"), "--model",
                             str(write_model(tmp_path)), "--split", str(split), "--data", str(tiny_dataset)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and f"{split}: no test rows" in result.stderr
