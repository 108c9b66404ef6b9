"""Model deployment on a tiny model trained here: loading from every source, predict/evaluate/export/explain as a
user runs them, bad inputs, threshold override and flip TTA."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from crackclf.bundle import BundleError, load_model
from crackclf.data.images import describe_source, load_resized
from crackclf.inference.predictor import Predictor
from tests.conftest import REPO, run_train, write_dataset
from tests.corpus import invalid_items, valid_items


@dataclass
class TinyModel:
    checkpoint: Path
    run_id: str
    uri: str  # the isolated MLflow store it was logged and registered in
    heldout: Path  # a labelled folder the model never saw
    backbone: str = "resnet10t"


def train_as_user(data: Path, root: Path, *overrides: str) -> str:
    """``python train.py`` as a user runs it (its own interpreter, Hydra's entry point, progress bars on), into
    ``root/run`` and an MLflow store and cache of its own; returns the store's URI."""
    uri = f"sqlite:///{root / 'mlflow.db'}"
    result = run_train(f"data.root={data}", f"hydra.run.dir={root / 'run'}", *overrides, user_shell=True,
                       env={"MLFLOW_TRACKING_URI": uri, "CRACKCLF_CACHE": str(root / "cache")})
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return uri


@pytest.fixture(scope="module")
def tiny_model(tiny_dataset, tmp_path_factory) -> TinyModel:
    """One short training run on the generated folder, logged and registered (register=true) in its own store."""
    root = tmp_path_factory.mktemp("tiny_model")
    uri = train_as_user(tiny_dataset, root, "backbone=resnet10t", "data.image_size=32", "trainer.max_epochs=1",
                        "register=true", "registered_model_name=tiny")
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("crack").experiment_id])
    heldout = write_dataset(root / "heldout", per_class=12, seed=11)
    return TinyModel(root / "run" / "checkpoints" / "best.ckpt", run.info.run_id, uri, heldout)


@pytest.fixture(scope="module")
def default_model(tiny_dataset, tmp_path_factory) -> TinyModel:
    """The same short run with the default backbone and size (tf_efficientnet_lite0 from its packaged ImageNet
    weights, the default recipe's frozen stages, 96 px): what users export, predict with and serve."""
    root = tmp_path_factory.mktemp("default_model")
    uri = train_as_user(tiny_dataset, root, "trainer.max_epochs=1")
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("crack").experiment_id])
    assert run.data.params["backbone.name"] == "tf_efficientnet_lite0"  # conf/train.yaml's default, not overridden
    assert run.data.params["data.image_size"] == "96"
    heldout = write_dataset(root / "heldout", per_class=12, seed=11)
    return TinyModel(root / "run" / "checkpoints" / "best.ckpt", run.info.run_id, uri, heldout,
                     "tf_efficientnet_lite0")


@pytest.fixture(params=["resnet10t", "tf_efficientnet_lite0"])
def trained(request) -> TinyModel:
    """Each deployment test below runs on the small resnet10t model and on the default backbone."""
    return request.getfixturevalue("tiny_model" if request.param == "resnet10t" else "default_model")


@pytest.fixture(scope="module")
def parity_folder(tmp_path_factory) -> Path:
    """256 generated images: the least ``crackclf export`` compares eager and ONNX on."""
    return write_dataset(tmp_path_factory.mktemp("parity"), per_class=128, size=64, seed=12)


@pytest.fixture
def store(tiny_model, monkeypatch) -> str:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tiny_model.uri)
    return tiny_model.uri


def cli(*args: str, uri: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``crackclf ...`` in a fresh process, as a user runs it."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **({"MLFLOW_TRACKING_URI": uri} if uri else {})}
    return subprocess.run([sys.executable, "-m", "crackclf.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def heldout_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.jpg"))


# ------------------------------------------------------------------------------------------------------ loading
def test_every_model_source_gives_the_same_model(tiny_model, store, tmp_path):
    files = heldout_files(tiny_model.heldout)
    reference = load_model(tiny_model.checkpoint)
    assert reference.info.run_id == tiny_model.run_id and reference.info.image_size == 32
    assert reference.info.tile_size == 96  # the generated images are 96x96: the window for whole photos
    expected = Predictor(reference).predict_arrays([load_resized(f, 32) for f in files])

    from crackclf.bundle import save_onnx

    save_onnx(reference.network, reference.info, tmp_path / "tiny.onnx")
    sources = {f"runs:/{tiny_model.run_id}": f"runs:/{tiny_model.run_id}", "models:/tiny/1": "models:/tiny/1",
               str(tmp_path / "tiny.onnx"): str((tmp_path / "tiny.onnx").resolve())}
    for source, model_id in sources.items():
        predictor = Predictor.load(source)
        assert predictor.model_id == model_id
        assert predictor.info.to_dict() == reference.info.to_dict(), source
        assert predictor.backend == "onnx"  # backend auto: ONNX Runtime on CPU, whatever the source
        got = np.array([p.probability for p in predictor.predict_sources(files)])
        np.testing.assert_allclose(got, expected, atol=1e-5, err_msg=source)


def test_registered_model_has_signature_example_and_bundle(tiny_model, store):
    client = MlflowClient(store)
    version = client.get_model_version("tiny", "1")
    assert version.run_id == tiny_model.run_id
    import mlflow.artifacts
    from mlflow.models import Model

    local = mlflow.artifacts.download_artifacts(artifact_uri="models:/tiny/1", tracking_uri=store)
    model = Model.load(local)
    assert model.signature is not None and model.saved_input_example_info is not None
    assert json.loads(model.metadata["crackclf"])["backbone"] == "resnet10t"


@pytest.mark.parametrize("source, message", [
    ("runs:/0123456789abcdef", "cannot download"), ("models:/nope/3", "cannot load it from the registry"),
    ("missing.ckpt", "no such file"), ("README.md", "not a readable checkpoint"),
])
def test_bad_model_sources_say_what_to_do(store, source, message):
    with pytest.raises(BundleError, match=message):
        load_model(REPO / source if source.endswith((".ckpt", ".md")) else source)


# ------------------------------------------------------------------------------------------------------ predict
def test_predict_cli_handles_the_bad_input_corpus(tiny_model, bad_corpus, tmp_path):
    folder = bad_corpus[0].path.parent
    out = tmp_path / "predictions.json"
    result = cli("predict", "--model", str(tiny_model.checkpoint), str(folder), str(folder / "*.jpg"),
                 str(tmp_path / "no_such.png"), str(tmp_path / "empty_dir"), "--out", str(out), "--no-progress")
    assert result.returncode == 1, result.stderr[-2000:]  # some inputs failed
    rows = json.loads(out.read_text())
    by_path: dict[str, list[dict]] = {}
    for row in rows:
        by_path.setdefault(row["path"], []).append(row)
    for item in valid_items(bad_corpus):
        for row in by_path[describe_source(item.path)]:
            assert row["error"] == "" and 0 <= row["probability"] <= 1 and row["label"] in ("no_crack", "crack")
            assert row["model_id"] == str(tiny_model.checkpoint.resolve())
    image_suffixed = [i for i in invalid_items(bad_corpus) if i.name != "directory"]  # folders are walked, not read
    for item in image_suffixed:
        if item.path.suffix.lower() in (".jpg", ".png") and os.path.lexists(item.path):
            (row, *_) = by_path[describe_source(item.path)]
            assert item.reason in row["error"] and row["probability"] == "", row
            assert f"cannot use {describe_source(item.path)}: " in result.stderr
    assert "file not found" in by_path[str(tmp_path / "no_such.png")][0]["error"]
    # Every listed file is predicted or listed with a reason: nothing silently dropped, and the summary counts both.
    rows = [row for group in by_path.values() for row in group]
    errors = sum(1 for row in rows if row["error"])
    assert f"crackclf predict: {len(rows) - errors} predicted, {errors} failed" in result.stderr
    assert errors > 0 and len(rows) - errors > 0


def crackclf(capsys, *args: str) -> tuple[int, str, str]:
    """``crackclf ...`` through the CLI entry point in this process (the subprocess path is covered by the
    predict test above and tests/e2e); returns (exit code, stdout, stderr)."""
    from crackclf.cli import main

    capsys.readouterr()
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_predictions_csv_agree_with_evaluate(tiny_model, store, tmp_path, capsys):
    model = f"runs:/{tiny_model.run_id}"
    code, out, err = crackclf(capsys, "evaluate", "--model", model, "--data", str(tiny_model.heldout), "--out",
                              str(tmp_path / "eval"), "--no-progress")
    assert code == 0, err
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    code, _, err = crackclf(capsys, "predict", "--model", model, str(tiny_model.heldout), "--out",
                            str(tmp_path / "p.csv"), "--no-progress")
    assert code == 0, err
    with open(tmp_path / "p.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == 24 and {r["model_id"] for r in rows} == {model}
    truth = {"Negative": "no_crack", "Positive": "crack"}
    correct = sum(truth[Path(r["path"]).parent.name] == r["label"] for r in rows)
    assert metrics["acc"] == pytest.approx(correct / len(rows))
    assert metrics["images"] == 24 and np.sum(metrics["confusion"]) == 24
    assert re.search(rf"^  acc +{metrics['acc']:.4f}$", out, re.MULTILINE)
    per_class = [[truth[Path(r["path"]).parent.name] == r["label"] for r in rows if Path(r["path"]).parent.name == c]
                 for c in truth]
    balanced = sum(sum(hits) / len(hits) for hits in per_class) / 2  # the mean recall of the two classes
    assert metrics["balanced_acc"] == pytest.approx(balanced)
    assert re.search(rf"^  balanced_acc +{balanced:.4f}$", out, re.MULTILINE)
    # The evaluation run is in MLflow, linked to the model's training run, with the plots.
    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("crack").experiment_id],
                              "tags.`crackclf.kind` = 'evaluation'")
    assert len(runs) == 1 and runs[0].data.tags["crackclf.model_run_id"] == tiny_model.run_id
    assert runs[0].data.metrics["eval/acc"] == pytest.approx(metrics["acc"])
    logged = {a.path for a in client.list_artifacts(runs[0].info.run_id, "evaluation")}
    assert {f"evaluation/{n}" for n in ("roc.png", "pr.png", "worst_mistakes.png", "confusion.png",
                                         "predictions.csv", "metrics.json")} <= logged


def test_evaluate_lists_unreadable_files_and_still_scores_the_rest(tiny_model, corpus_dataset, tmp_path, capsys):
    root, items = corpus_dataset
    code, out, _ = crackclf(capsys, "evaluate", "--model", str(tiny_model.checkpoint), "--data", str(root), "--out",
                            str(tmp_path / "eval"), "--no-mlflow", "--no-progress")
    assert code == 1  # some inputs failed
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    reported = {r["path"]: r["reason"] for r in metrics["unreadable_files"]}
    for item in invalid_items(items):
        if item.name == "directory":  # a folder named x.jpg is not a candidate file at all
            continue
        assert item.reason in reported[describe_source(item.path)], item.name
        assert f"unreadable: {describe_source(item.path)}: " in out
    assert metrics["images"] == 60 + len(valid_items(items))


# --------------------------------------------------------------------------------------------- threshold, TTA
def test_threshold_override_and_flip_tta(tiny_model):
    arrays = np.stack([load_resized(f, 32) for f in heldout_files(tiny_model.heldout)])
    model = load_model(tiny_model.checkpoint)
    plain = Predictor(model)
    assert plain.threshold == model.info.threshold  # the threshold chosen at training time is the default
    probabilities = plain.predict_arrays(arrays)
    for threshold in (0.0, float(np.median(probabilities)), 1.0):
        labels = [p.is_crack for p in Predictor(model, threshold=threshold).classify_arrays(arrays)]
        assert labels == [bool(p >= threshold) for p in probabilities]
    with pytest.raises(ValueError, match="threshold=1.5"):
        Predictor(model, threshold=1.5)
    tta = Predictor(model, tta=True).predict_arrays(arrays)
    views = [arrays, arrays[:, :, ::-1], arrays[:, ::-1]]
    np.testing.assert_allclose(tta, np.mean([plain.predict_arrays(v) for v in views], axis=0), atol=1e-6)
    assert not np.allclose(tta, probabilities, atol=1e-7)  # the flips did change the input


def test_sources_arrays_bytes_and_process_pool_agree(tiny_model):
    files = heldout_files(tiny_model.heldout)[:10]
    thread = Predictor.load(tiny_model.checkpoint, batch_size=3)
    expected = [p.probability for p in thread.predict_sources(files)]
    from_bytes = [p.probability for p in thread.predict_sources([f.read_bytes() for f in files])]
    process = [p.probability for p in Predictor.load(tiny_model.checkpoint, parallel="process", workers=2)
               .predict_sources(files)]
    arrays = thread.predict_arrays([np.asarray(Image.open(f).convert("RGB")) for f in files])  # resized inside
    np.testing.assert_allclose(from_bytes, expected, atol=1e-6)
    np.testing.assert_allclose(process, expected, atol=1e-6)
    np.testing.assert_allclose(arrays, expected, atol=0.05)  # full decode vs JPEG draft decode: close, not equal
    assert thread.predict_one(b"").error == "empty file (0 bytes)"




def test_the_http_api_path_decodes_like_predict_sources_with_its_own_limits(tiny_model):
    """``classify_sources`` (what ``POST /predict`` calls) uses the predictor's one decode, with the caller's limits."""
    files = heldout_files(tiny_model.heldout)[:4]
    predictor = Predictor.load(tiny_model.checkpoint, batch_size=3)  # 4 images: two batches
    expected = [p.probability for p in predictor.predict_sources(files)]
    png = io.BytesIO()
    Image.open(files[0]).save(png, "PNG")
    names = [f.name for f in files] + ["as.png", "junk.jpg"]
    rows = predictor.classify_sources([f.read_bytes() for f in files] + [png.getvalue(), b"junk"], names,
                                      formats=("JPEG",))
    assert [r.source for r in rows] == names
    np.testing.assert_allclose([r.probability for r in rows[:4]], expected, atol=1e-6)
    assert rows[4].error == "format PNG is not accepted (accepted: JPEG)" and rows[4].probability is None
    assert rows[5].error == "not a recognised image format"
    (big,) = predictor.classify_sources([files[0]], max_pixels=100)
    assert big.source == describe_source(files[0]) and "exceeds the limit of 100" in big.error
    assert predictor.predict_one(files[0]).probability == pytest.approx(expected[0], abs=1e-6)

def test_onnx_batches_run_as_parallel_shards_in_order(tiny_model):
    arrays = np.stack([load_resized(f, 32) for f in heldout_files(tiny_model.heldout)])[:21]
    model = load_model(tiny_model.checkpoint)
    one = Predictor(model, backend="onnx", threads=1).predict_arrays(arrays)
    sharded = Predictor(model, backend="onnx", threads=3)

    class RecordingSession:  # the real session, with the batch size of every run noted
        def __init__(self, session) -> None:
            self.session, self.sizes = session, []

        def run(self, outputs, feeds):
            self.sizes.append(len(next(iter(feeds.values()))))
            return self.session.run(outputs, feeds)

    sharded._session = recording = RecordingSession(sharded._session)
    np.testing.assert_allclose(sharded.predict_arrays(arrays), one, atol=1e-6)
    assert sorted(recording.sizes) == [10, 11]  # 21 images: 2 shards of >= 8 (MIN_SHARD), not 3
    recording.sizes.clear()
    np.testing.assert_allclose(sharded.predict_arrays(arrays[:15]), one[:15], atol=1e-6)
    assert recording.sizes == [15]  # too few for two shards of 8: one run

# --------------------------------------------------------------------------------------------- export, explain
@pytest.mark.shared_data
def test_export_onnx_parity_on_real_images(tiny_model, shared_data, tmp_path):
    from crackclf.inference.export import export_onnx

    real = [f for c in ("Negative", "Positive") for f in sorted((shared_data / c).glob("*.jpg"))[:130]]
    report = export_onnx(load_model(tiny_model.checkpoint), tmp_path / "model.onnx", real)
    assert report.parity_images == 260 and report.ok and report.max_abs_diff <= 1e-4
    import onnx

    model = onnx.load(tmp_path / "model.onnx")
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"  # dynamic batch axis
    assert json.loads({p.key: p.value for p in model.metadata_props}["crackclf"])["run_id"] == tiny_model.run_id
    with pytest.raises(BundleError, match="needs >= 256 readable images"):
        export_onnx(load_model(tiny_model.checkpoint), tmp_path / "few.onnx", real[:100])


def test_explain_writes_gradcam_and_refuses_onnx(tiny_model, tmp_path, capsys):
    from crackclf.bundle import save_onnx
    from crackclf.inference.explain import explain

    files = heldout_files(tiny_model.heldout)[:3]
    predictor = Predictor.load(tiny_model.checkpoint)
    picture, results = explain(predictor, [*files, tmp_path / "missing.jpg"], tmp_path / "cam.png")
    assert Image.open(picture).size[0] > 300 and [p.ok for p in results] == [True, True, True, False]
    loaded = load_model(tiny_model.checkpoint)
    save_onnx(loaded.network, loaded.info, tmp_path / "m.onnx")
    code, _, err = crackclf(capsys, "explain", "--model", str(tmp_path / "m.onnx"), str(files[0]), "--out",
                            str(tmp_path / "x.png"))
    assert code == 2 and "Grad-CAM needs PyTorch weights" in err


def test_export_cli_writes_onnx_that_predicts_like_the_eager_model(trained, parity_folder, tmp_path):
    """``crackclf export`` as a user runs it: parity within the default 1e-4 on 256 images (float32 kernels differ
    between ONNX Runtime and PyTorch by ~1e-5 on some CPUs: 1.1e-5 measured on an Intel Xeon with AVX-512), a
    tolerance below what the export reaches fails it, and the ONNX file then predicts what the PyTorch weights do."""
    tolerance = 1e-4
    strict = cli("export", "--model", str(trained.checkpoint), "--out", str(tmp_path / "strict.onnx"),
                 "--parity-data", str(parity_folder), "--tolerance", "1e-12", "--no-progress")
    assert strict.returncode == 1 and "FAILED (above 1e-12)" in strict.stdout, strict.stdout + strict.stderr[-2000:]
    out = tmp_path / "exported.onnx"
    result = cli("export", "--model", str(trained.checkpoint), "--out", str(out), "--parity-data", str(parity_folder),
                 "--tolerance", f"{tolerance:g}", "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]
    parity = re.search(r"parity on (\d+) real images: max \|Δp\| = (\S+),", result.stdout)
    assert parity and int(parity.group(1)) == 256 and float(parity.group(2)) <= tolerance, result.stdout
    assert "OK" in result.stdout
    files = heldout_files(trained.heldout)
    eager = Predictor.load(trained.checkpoint, backend="torch")
    exported = Predictor.load(out)
    assert exported.backend == "onnx" and exported.info.to_dict() == eager.info.to_dict()
    np.testing.assert_allclose([p.probability for p in exported.predict_sources(files)],
                               [p.probability for p in eager.predict_sources(files)], atol=tolerance)


def test_predict_cli_maps_a_whole_photo_and_classifies_a_crop(trained, tmp_path, capsys):
    """``crackclf predict --map``: a photo larger than the training crop is tiled (one window per crop here) and
    mapped with the model's own probabilities; a crop-sized image in the same call is classified whole."""
    files = heldout_files(trained.heldout)
    crops = [np.asarray(Image.open(f).convert("RGB")) for f in files[:3] + files[-3:]]  # 96 px: 3 no-crack, 3 crack
    photo = tmp_path / "wall.png"
    Image.fromarray(np.concatenate([np.concatenate(crops[:3], 1), np.concatenate(crops[3:], 1)], 0)).save(photo)
    code, _, err = crackclf(capsys, "predict", "--model", str(trained.checkpoint), str(photo), str(files[0]),
                            "--map", str(tmp_path / "maps"), "--out", str(tmp_path / "p.json"), "--no-progress")
    assert code == 0, err
    predictor = Predictor.load(trained.checkpoint)
    summary = json.loads((tmp_path / "maps" / "wall_map.json").read_text())
    assert (summary["window"], summary["tiles"]) == (96, 6)  # the run's tile size: its 96 px source images
    probabilities = predictor.predict_arrays(crops)
    tiles = sorted(summary["tile_results"], key=lambda t: (t["y"], t["x"]))
    np.testing.assert_allclose([t["probability"] for t in tiles], probabilities, atol=1e-5)
    assert [t["cracked"] for t in tiles] == [bool(p >= predictor.threshold) for p in probabilities]
    mapped, whole = json.loads((tmp_path / "p.json").read_text())
    assert mapped["label"] == ("crack" if (probabilities >= predictor.threshold).any() else "no_crack")
    assert mapped["probability"] == pytest.approx(float(probabilities.max()), abs=1e-5)
    assert Image.open(mapped["map"]).size == (288, 192)
    assert whole["map"] == "" and whole["path"] == str(files[0])
    assert whole["probability"] == pytest.approx(predictor.predict_one(files[0]).probability, abs=1e-6)


def test_explain_cli_writes_gradcam_of_each_image(trained, tmp_path):
    """``crackclf explain`` with PyTorch weights: one Grad-CAM panel per image, each line the model's answer."""
    files = heldout_files(trained.heldout)[:2]
    result = cli("explain", "--model", str(trained.checkpoint), *map(str, files), "--out", str(tmp_path / "cam.png"))
    assert result.returncode == 0, result.stderr[-3000:]
    predictor = Predictor.load(trained.checkpoint, backend="torch")
    lines = [line.split("\t") for line in result.stdout.splitlines() if "\t" in line]
    assert [line[0] for line in lines] == [str(f) for f in files]
    for (_, label, probability), prediction in zip(lines, predictor.predict_sources(files), strict=True):
        assert label == prediction.label and float(probability) == pytest.approx(prediction.probability, abs=1e-4)
    picture = Image.open(tmp_path / "cam.png")
    assert picture.size[0] > 300 and len(set(picture.convert("L").getdata())) > 16  # drawn, not blank
    assert f"written: {tmp_path / 'cam.png'}" in result.stdout


def test_device_option_is_checked(tiny_model, capsys):
    """``--device`` picks where the PyTorch backend runs; a GPU that is not there is named, not silently replaced."""
    import torch

    from crackclf.inference.predictor import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad, message in (("mps", "only cpu and cuda"), ("gpu0", "not a device name")):
        code, _, err = crackclf(capsys, "predict", "--model", str(tiny_model.checkpoint), "--device", bad,
                                str(tiny_model.heldout), "--no-progress")
        assert code == 2 and message in err and repr(bad) in err
    if not torch.cuda.is_available():
        code, _, err = crackclf(capsys, "predict", "--model", str(tiny_model.checkpoint), "--device", "cuda",
                                str(tiny_model.heldout), "--no-progress")
        assert code == 2 and "sees no CUDA GPU" in err
