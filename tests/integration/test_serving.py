"""The HTTP API in process (FastAPI TestClient): answers equal the Predictor's on real and generated images, whole
photos are mapped, every limit is enforced with a 4xx and a reason, and a full queue answers 503 + Retry-After."""

from __future__ import annotations

import base64
import io
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from crackclf.data.images import load_resized, open_image
from crackclf.inference.predictor import Predictor
from crackclf.serving.app import create_app
from crackclf.serving.settings import ServeSettings
from tests.conftest import make_concrete
from tests.corpus import make_corpus
from tests.served_model import RUN_ID, TILE, encode, mosaic, write_model


@pytest.fixture(scope="module")
def predictor(tmp_path_factory) -> Predictor:
    return Predictor.load(write_model(tmp_path_factory.mktemp("served_model")))


@pytest.fixture(scope="module")
def client(predictor):
    with TestClient(create_app(predictor)) as test_client:
        yield test_client


def real_files(root: Path, per_class: int = 3) -> list[Path]:
    return [p for folder in ("Positive", "Negative") for p in sorted((root / folder).glob("*.jpg"))[:per_class]]


def upload(files: list[tuple[str, bytes]], field: str = "files") -> list[tuple[str, tuple[str, bytes, str]]]:
    return [(field, (name, data, "application/octet-stream")) for name, data in files]


# ------------------------------------------------------------------------------------------------------ /predict
def test_predict_matches_the_predictor_on_real_images(client, predictor, shared_data):
    files = real_files(shared_data)
    response = client.post("/predict", files=upload([(f.name, f.read_bytes()) for f in files]))
    assert response.status_code == 200, response.text
    body = response.json()
    expected = list(predictor.predict_sources([str(f) for f in files]))
    assert [r["source"] for r in body["results"]] == [f.name for f in files]
    np.testing.assert_allclose([r["probability"] for r in body["results"]], [p.probability for p in expected],
                               atol=1e-6)
    for result in body["results"]:
        assert result["error"] is None and result["model_id"] == predictor.model_id
        assert result["is_crack"] == (result["probability"] >= body["threshold"])
        assert result["label"] == predictor.class_names[int(result["is_crack"])]


def test_predict_generated_images_and_the_bad_input_corpus(client, predictor, tmp_path):
    accepted = set(ServeSettings().formats)
    for item in make_corpus(tmp_path, include_special=False):
        response = client.post("/predict", files=upload([(item.display, item.path.read_bytes())]))
        fmt = Image.open(item.path).format if item.valid else None
        if item.valid and fmt in accepted:
            assert response.status_code == 200, (item.name, response.text)
            (result,) = response.json()["results"]
            assert result["probability"] == pytest.approx(predictor.predict_one(item.path).probability, abs=1e-6)
        else:
            assert response.status_code == 422, (item.name, response.text)
            reason = item.reason if not item.valid else f"format {fmt} is not accepted"
            assert reason in response.json()["detail"], (item.name, response.json())
            assert item.display in response.json()["detail"]

    # One bad file among good ones: 200, and the bad one carries its reason in order.
    rng = np.random.default_rng(5)
    good = [encode(make_concrete(rng, 96, crack=c)) for c in (True, False)]
    response = client.post("/predict", files=upload([("a.jpg", good[0]), ("cut.jpg", good[1][:300]),
                                                     ("b.png", encode(make_concrete(rng, 96), "PNG"))]))
    assert response.status_code == 200
    results = response.json()["results"]
    assert [r["error"] is None for r in results] == [True, False, True]
    assert "cannot decode" in results[1]["error"] and results[1]["probability"] is None


# ------------------------------------------------------------------------------------------------------ /analyze
@pytest.mark.parametrize("kind", ["real", "generated"])
def test_analyze_maps_a_whole_photo(client, predictor, kind, request):
    if kind == "real":
        crops = [np.asarray(open_image(f)) for f in real_files(request.getfixturevalue("shared_data"))]
    else:
        rng = np.random.default_rng(7)
        crops = [np.asarray(make_concrete(rng, TILE, crack=bool(i % 2))) for i in range(6)]
    data = encode(mosaic(crops, columns=3), "PNG")  # 681 x 454: 3 x 2 windows of the recorded 227 px crop
    response = client.post("/analyze", files={"file": ("wall.png", data, "image/png")})
    assert response.status_code == 200, response.text
    body = response.json()
    summary = body["summary"]
    assert (summary["width"], summary["height"], summary["window"], summary["tiles"]) == (681, 454, TILE, 6)
    expected = predictor.predict_arrays(crops)  # the windows are exactly the crops (row by row)
    np.testing.assert_allclose([t["probability"] for t in summary["tile_results"]], expected, atol=1e-5)
    cracked = expected >= predictor.threshold
    assert summary["cracked_tiles"] == int(cracked.sum())
    assert body["verdict"]["is_crack"] == bool(cracked.any())
    assert body["verdict"]["probability"] == pytest.approx(float(expected.max()), abs=1e-5)
    prefix = "data:image/png;base64,"
    assert body["overlay"].startswith(prefix)
    overlay = Image.open(io.BytesIO(base64.b64decode(body["overlay"][len(prefix):])))
    assert overlay.format == "PNG" and overlay.size == (681, 454)

    # Overlapping windows and a summary without the per-window list.
    response = client.post("/analyze?stride=113&tiles=false", files={"file": ("wall.png", data, "image/png")})
    assert response.status_code == 200
    summary = response.json()["summary"]
    assert "tile_results" not in summary
    assert summary["tiles"] == 6 * 4  # x: 0 113 226 339 452 454, y: 0 113 226 227


def test_a_single_crop_gets_the_same_verdict_from_both_endpoints(client, predictor, shared_data):
    crop = real_files(shared_data, per_class=1)[0]
    predicted = client.post("/predict", files=upload([(crop.name, crop.read_bytes())])).json()["results"][0]
    analyzed = client.post("/analyze", files={"file": (crop.name, crop.read_bytes())}).json()
    assert analyzed["summary"]["tiles"] == 1
    assert analyzed["verdict"]["label"] == predicted["label"]
    assert analyzed["verdict"]["probability"] == pytest.approx(predicted["probability"], abs=1e-3)


# --------------------------------------------------------------------------------------------- model and health
def test_model_health_docs_and_page(client, predictor):
    model = client.get("/model").json()
    assert model["name"] == "model.onnx" and model["backbone"] == "resnet10t" and model["image_size"] == 32
    assert model["threshold"] == 0.5 and model["run_id"] == RUN_ID and model["backend"] == "onnx"
    assert model["limits"]["max_upload_bytes"] == ServeSettings().max_upload_bytes
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["queue"]["in_flight"] == 0
    schema = client.get("/openapi.json").json()
    assert {"/predict", "/analyze", "/healthz", "/model"} <= set(schema["paths"])
    assert "swagger" in client.get("/docs").text.lower()
    page = client.get("/")
    assert page.status_code == 200 and 'aria-live="polite"' in page.text and 'type="file"' in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert client.get("/static/app.js").status_code == 200 and client.get("/static/style.css").status_code == 200


# ----------------------------------------------------------------------------------------------------- limits
def test_every_limit_is_configurable_and_answers_4xx(predictor):
    settings = ServeSettings(max_upload_bytes=100_000, max_pixels=250_000, formats=("png",), max_files=2,
                             max_tiles=10)
    rng = np.random.default_rng(3)
    small_png = encode(make_concrete(rng, 96), "PNG")
    with TestClient(create_app(predictor, settings)) as client:
        too_big = rng.integers(0, 256, 150_000, dtype=np.uint8).tobytes()
        response = client.post("/predict", files=upload([("big.png", too_big)]))
        assert response.status_code == 413 and "upload limit of 100,000 bytes" in response.json()["detail"]

        def chunks():  # no Content-Length: the limit is enforced while the body streams in
            boundary = b"--b\r\nContent-Disposition: form-data; name=\"files\"; filename=\"x.png\"\r\n\r\n"
            yield boundary
            for _ in range(20):
                yield b"\0" * 10_000

        response = client.post("/predict", content=chunks(), headers={"content-type": "multipart/form-data; "
                                                                                      "boundary=b"})
        assert response.status_code == 413

        big_png = encode(np.zeros((600, 600, 3), np.uint8), "PNG")  # 360,000 pixels, a small file
        response = client.post("/predict", files=upload([("wide.png", big_png)]))
        assert response.status_code == 422 and "exceeds the limit of 250,000" in response.json()["detail"]
        response = client.post("/predict", files=upload([("photo.jpg", encode(make_concrete(rng, 96)))]))
        assert response.status_code == 422 and "format JPEG is not accepted" in response.json()["detail"]
        response = client.post("/predict", files=upload([("a.png", small_png)] * 3))
        assert response.status_code == 413 and "limit is 2" in response.json()["detail"]
        response = client.post("/analyze?window=8&stride=8", files={"file": ("a.png", small_png)})
        assert response.status_code == 422 and "more than the limit of 10" in response.json()["detail"]

        assert client.get("/healthz").status_code == 200
        assert client.post("/predict", files=upload([("a.png", small_png)])).status_code == 200
    for bad, message in [({"formats": ("NOPE",)}, "not image formats"), ({"workers": 0}, "workers=0"),
                         ({"queue_size": -1}, "queue_size=-1")]:
        with pytest.raises(ValueError, match=message):
            ServeSettings(**bad)


def test_a_full_queue_answers_503_with_retry_after(predictor, monkeypatch):
    gate, entered = threading.Event(), threading.Event()
    classify = predictor.classify_arrays

    def held(*args, **kwargs):  # the worker stays busy until the test lets it go
        entered.set()
        assert gate.wait(30)
        return classify(*args, **kwargs)

    monkeypatch.setattr(predictor, "classify_arrays", held)
    image = encode(make_concrete(np.random.default_rng(1), 96))
    app = create_app(predictor, ServeSettings(workers=1, queue_size=1))
    with TestClient(app) as client:
        answers: list[int] = []

        def post() -> None:
            answers.append(client.post("/predict", files=upload([("a.jpg", image)])).status_code)

        first, second = threading.Thread(target=post), threading.Thread(target=post)
        first.start()
        assert entered.wait(30)
        second.start()  # waits in the queue
        deadline = time.monotonic() + 30
        while app.state.pool.in_flight < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        response = client.post("/predict", files=upload([("a.jpg", image)]))
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"] == "1" and "server busy" in response.json()["detail"]
        health = client.get("/healthz")  # the event loop is free while inference is stuck
        assert health.status_code == 200 and health.json()["queue"]["in_flight"] == 2
        gate.set()
        first.join(30)
        second.join(30)
        assert answers == [200, 200]
        assert client.post("/predict", files=upload([("a.jpg", image)])).status_code == 200
        assert app.state.pool.stats()["rejected"] == 1 and app.state.pool.in_flight == 0


def test_uploads_decode_like_training(predictor, client, tmp_path):
    """The server's pixels are load_resized's (same opener, same resize): a PNG and a lossless WebP of one image
    give the same probability as the image file itself."""
    image = make_concrete(np.random.default_rng(9), 150, crack=True)
    image.save(tmp_path / "a.png")
    expected = predictor.predict_arrays(load_resized(tmp_path / "a.png", predictor.image_size)[None])[0]
    webp = io.BytesIO()
    image.save(webp, "WEBP", lossless=True)
    response = client.post("/predict", files=upload([("a.png", (tmp_path / "a.png").read_bytes()),
                                                     ("a.webp", webp.getvalue())]))
    got = [r["probability"] for r in response.json()["results"]]
    np.testing.assert_allclose(got, [expected, expected], atol=1e-6)


def test_a_fault_in_inference_is_a_json_500_and_the_next_request_works(predictor, monkeypatch):
    classify = predictor.classify_arrays
    calls = []

    def fails_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("simulated fault")
        return classify(*args, **kwargs)

    monkeypatch.setattr(predictor, "classify_arrays", fails_once)
    image = encode(make_concrete(np.random.default_rng(4), 96))
    with TestClient(create_app(predictor), raise_server_exceptions=False) as client:
        response = client.post("/predict", files=upload([("a.jpg", image)]))
        assert response.status_code == 500 and "RuntimeError" in response.json()["detail"]
        assert client.post("/predict", files=upload([("a.jpg", image)])).status_code == 200
        assert client.get("/healthz").json()["queue"]["in_flight"] == 0
