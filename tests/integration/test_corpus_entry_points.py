"""Every entry point against the bad-input corpus (tests/corpus.py): `crackclf data verify`, training data loading
(cache on and off, DataLoader workers), `python train.py`, `crackclf predict`, `crackclf evaluate` and the HTTP API.

Valid files are used (RGB, EXIF applied), invalid ones are named with their one-line reason and skipped, nothing
crashes, and a summary counts them. (tests/integration/test_serving.py also posts each corpus file on its own.)
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from crackclf.data.datamodule import CrackDataModule, DataError
from crackclf.data.images import load_resized
from tests.conftest import run_cli, run_train, write_dataset
from tests.corpus import install_corpus, invalid_items, valid_items
from tests.served_model import write_model


def expected_rows(root: Path, items) -> set[str]:
    """Paths (relative to root) a data entry point must use: the generated images plus the valid corpus items."""
    good = {p.relative_to(root).as_posix() for folder in ("Negative", "Positive")
            for p in (root / folder).glob("0*.jpg")}
    return good | {os.fsdecode(item.path.relative_to(root).as_posix()) for item in valid_items(items)}


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory) -> Path:
    return write_model(tmp_path_factory.mktemp("corpus_model"))


# ------------------------------------------------------------------------------------------------- data verify
def test_data_verify_names_each_bad_file_and_counts_them(corpus_dataset, tmp_path):
    root, items = corpus_dataset
    result = run_cli("data", "verify", str(root), "--out", str(tmp_path / "report"), "--cache-dir",
                     str(tmp_path / "cache"), "--no-progress")
    assert result.returncode == 0, result.stderr[-2000:]
    bad = invalid_items(items)
    assert f"Unreadable: {len(bad)} (excluded from training)" in result.stdout
    for item in bad:
        assert f"Positive/{item.display}: " in result.stdout and item.reason in result.stdout, item.name
    report = json.loads((tmp_path / "report" / "verify.json").read_text())
    assert {u["path"] for u in report["unreadable"]} == {f"Positive/{os.fsdecode(i.path.name)}" for i in bad}
    assert all(item.reason in next(u["reason"] for u in report["unreadable"] if u["path"].endswith(
        os.fsdecode(item.path.name))) for item in bad)
    assert report["per_class"]["crack"] == {"files": 30 + len(items), "readable": 30 + len(valid_items(items))}
    assert report["per_class"]["no_crack"] == {"files": 30, "readable": 30}

    strict = run_cli("data", "verify", str(root), "--out", str(tmp_path / "report"), "--cache-dir",
                     str(tmp_path / "cache"), "--no-progress", "--strict")
    assert strict.returncode == 1  # the same report, but bad files fail the check


# ------------------------------------------------------------------------------------------ training data loading
@pytest.mark.parametrize("cache", [True, False], ids=["cache", "no-cache-2-workers"])
def test_training_data_uses_valid_files_and_skips_invalid_ones(corpus_dataset, tmp_path, cache):
    root, items = corpus_dataset
    module = CrackDataModule(str(root), image_size=32, batch_size=8, cache=cache, num_workers=0 if cache else 2,
                             cache_dir=str(tmp_path / "cache"), min_per_class=5, progress=False)
    module.setup("fit")
    used = {Path(row.path).relative_to(root).as_posix() for row in module.rows}
    assert used == expected_rows(root, items)
    unreadable = {u["path"] for u in module.verify_report["unreadable"]}
    assert unreadable == {f"Positive/{os.fsdecode(item.path.name)}" for item in invalid_items(items)}

    for split in ("train", "val", "test"):
        loader = getattr(module, f"{split}_dataloader")()
        seen = 0
        for images, labels in loader:
            assert images.dtype == torch.uint8 and images.shape[1:] == (3, 32, 32)
            seen += len(labels)
        rows = len(module.rows_of(split))
        assert seen == (rows - rows % 8 if split == "train" and rows > 8 else rows), split

    # A valid odd file reaches the model exactly as the one opener decodes it (EXIF applied, RGB).
    exif = next(item for item in items if item.name == "exif_rotated")
    index = [Path(r.path) for r in module.rows].index(exif.path)
    row = module.rows[index]
    dataset = module._datasets[row.split]
    position = [r.path for r in module.rows_of(row.split)].index(row.path)
    image = dataset[[position]][0][0] if cache else dataset[position][0]
    np.testing.assert_array_equal(image.permute(1, 2, 0).cpu().numpy(), load_resized(exif.path, 32))


def test_a_dataloader_worker_survives_files_that_go_bad_after_the_inventory(tmp_path):
    root = write_dataset(tmp_path / "data", per_class=24, size=48, seed=11)
    module = CrackDataModule(str(root), image_size=32, batch_size=6, cache=False, num_workers=2,
                             cache_dir=str(tmp_path / "cache"), min_per_class=5, progress=False)
    module.setup("fit")
    train = [Path(r.path) for r in module.rows_of("train")]
    # After the inventory: one file truncated, one replaced by an error page, one deleted, one now a folder.
    train[0].write_bytes(train[0].read_bytes()[:200])
    train[1].write_bytes(b"<html>503 Service Unavailable</html>")
    train[2].unlink()
    train[3].unlink()
    train[3].mkdir()
    loader = module.train_dataloader()
    for epoch in range(2):  # persistent workers: the same two processes serve both epochs
        loader.batch_sampler.set_epoch(epoch)
        batches = [labels for _, labels in loader]
        assert len(batches) == len(train) // 6 and all(len(b) == 6 for b in batches)


def test_training_refuses_to_start_when_a_class_is_too_small(tmp_path):
    root = write_dataset(tmp_path / "data", per_class=20, size=48, seed=2)
    for extra in sorted((root / "Positive").glob("*.jpg"))[4:]:
        extra.unlink()  # 4 crack images left, 3 or so of them in the train split
    for item in valid_items(install_corpus(root, "Positive", include_special=False)):
        item.path.unlink()  # only the invalid corpus files stay next to the 4 good ones
    module = CrackDataModule(str(root), image_size=32, cache_dir=str(tmp_path / "cache"), min_per_class=10,
                             progress=False)
    with pytest.raises(DataError) as caught:
        module.prepare()
    message = str(caught.value)
    assert "class 'crack'" in message and f"{root}/Positive" in message and "data.min_per_class=10" in message
    assert "class 'no_crack'" not in message  # 14 training images: enough


@pytest.mark.slow
def test_train_py_refuses_to_start_on_a_class_with_no_usable_image(tmp_path):
    root = write_dataset(tmp_path / "data", per_class=20, size=48, seed=2)
    shutil.rmtree(root / "Positive")
    (root / "Positive").mkdir()
    (root / "Positive" / "page.jpg").write_bytes(b"<html></html>")  # a class folder with no usable image at all
    result = run_train(f"data.root={root}", f"hydra.run.dir={tmp_path / 'run'}", "data.progress=false",
                       "logger=none", env={"CRACKCLF_CACHE": str(tmp_path / "cache2")}, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    error = [line for line in result.stderr.splitlines() if line.startswith("crackclf: error:")]
    assert len(error) == 1 and "class 'crack'" in error[0] and "no readable training image" in error[0], \
        result.stderr[-2000:]
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------- predict and evaluate
def test_predict_classifies_valid_files_and_names_each_invalid_one(bad_corpus, onnx_model, tmp_path):
    folder = bad_corpus[0].path.parent
    out = tmp_path / "predictions.csv"
    result = run_cli("predict", str(folder), "--model", str(onnx_model), "--out", str(out), "--no-progress")
    assert result.returncode == 1, result.stderr[-2000:]  # some inputs failed: non-zero, but every row is written
    with open(out, newline="", encoding="utf-8") as handle:
        rows = {Path(row["path"]).name: row for row in csv.DictReader(handle)}
    assert set(rows) == {item.display for item in bad_corpus}
    for item in bad_corpus:
        row = rows[item.display]
        if item.valid:
            assert row["error"] == "" and 0.0 <= float(row["probability"]) <= 1.0, item.name
        else:
            assert row["probability"] == "" and item.reason in row["error"], item.name
            assert f"cannot use {folder / item.display}: " in result.stderr
    bad = len(invalid_items(bad_corpus))
    assert f"{len(bad_corpus) - bad} predicted, {bad} failed" in result.stderr


@pytest.mark.slow
def test_evaluate_scores_readable_files_and_lists_unreadable_ones(corpus_dataset, onnx_model, tmp_path):
    root, items = corpus_dataset
    result = run_cli("evaluate", "--data", str(root), "--model", str(onnx_model), "--out", str(tmp_path / "eval"),
                     "--no-mlflow", "--no-progress", "--mistakes", "4")
    assert result.returncode == 1, result.stderr[-2000:]  # unreadable inputs make the exit status non-zero
    assert "Traceback" not in result.stderr
    bad = invalid_items(items)
    for item in bad:
        assert item.display in result.stdout and item.reason in result.stdout, item.name
    with open(tmp_path / "eval" / "predictions.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    scored = [r for r in rows if not r["error"]]
    assert len(scored) == len(expected_rows(root, items))
    assert sorted(Path(r["path"]).name for r in rows if r["error"]) == sorted(i.display for i in bad)


# ------------------------------------------------------------------------------------------------------ HTTP API
def test_http_api_answers_a_whole_corpus_upload_in_order(onnx_model, tmp_path):
    from fastapi.testclient import TestClient
    from PIL import Image

    from crackclf.inference.predictor import Predictor
    from crackclf.serving.app import create_app
    from crackclf.serving.settings import ServeSettings
    from tests.corpus import make_corpus

    items = make_corpus(tmp_path / "corpus", include_special=False)
    predictor = Predictor.load(onnx_model)
    with TestClient(create_app(predictor)) as client:
        response = client.post("/predict", files=[("files", (i.display, i.path.read_bytes(), "image/jpeg"))
                                                  for i in items])
    assert response.status_code == 200, response.text  # some files are usable: the request succeeds
    results = response.json()["results"]
    assert [r["source"] for r in results] == [i.display for i in items]
    accepted = set(ServeSettings().formats)
    for item, result in zip(items, results, strict=True):
        fmt = Image.open(item.path).format if item.valid else None
        if item.valid and fmt in accepted:
            assert result["error"] is None, (item.name, result)
            assert result["probability"] == pytest.approx(predictor.predict_one(item.path).probability, abs=1e-6)
        else:  # invalid, or a valid format the server is configured to refuse: named, with its reason
            reason = item.reason if not item.valid else f"format {fmt} is not accepted"
            assert result["probability"] is None and reason in result["error"], (item.name, result)
