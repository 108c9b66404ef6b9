"""The HTTP API and web page over one :class:`~crackclf.inference.predictor.Predictor`.

Endpoints: ``POST /predict`` (one or more images → one JSON result each), ``POST /analyze`` (one whole photo → crack
map summary + overlay PNG inline), ``GET /healthz``, ``GET /model``, the page at ``/`` and OpenAPI at ``/docs``.

Robustness rules, all enforced here and configured by :class:`ServeSettings`:

* every image is opened by :func:`crackclf.data.images.open_image` with the server's pixel limit (decompression
  bombs are refused from their header) and accepted formats;
* request bodies are capped while they stream in (:class:`UploadLimit`), before multipart parsing buffers them;
* decoding and inference run in a fixed thread pool behind a bounded queue (:class:`InferencePool`); when it is
  full the answer is ``503`` with ``Retry-After`` instead of an ever-growing backlog;
* every bad request gets a 4xx with a one-line ``detail``; 5xx is reserved for faults of the server itself.
"""

from __future__ import annotations

import asyncio
import base64
import io
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from crackclf.data.images import ImageError, open_image
from crackclf.inference.predictor import Prediction, Predictor
from crackclf.inference.tiling import map_photo, overlay_png
from crackclf.serving.settings import ServeSettings

STATIC_DIR = Path(__file__).parent / "static"
T = TypeVar("T")


# ------------------------------------------------------------------------------------------------ the queue
class QueueFull(Exception):
    """Every worker is busy and the waiting queue is full."""


class InferencePool:
    """A fixed number of threads behind a bounded queue; :meth:`run` awaits a job without blocking the event loop.

    A slot is held from submission until the job finishes (even when the client has gone away, the worker is still
    busy), so ``capacity = workers + queue_size`` bounds both the backlog and the memory it holds.
    """

    def __init__(self, workers: int, queue_size: int) -> None:
        self.workers, self.capacity = workers, workers + queue_size
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="crackclf-serve")
        self._lock = threading.Lock()
        self._in_flight = 0
        self.rejected = 0

    @property
    def in_flight(self) -> int:
        """Jobs running or waiting."""
        return self._in_flight

    def _release(self, _future: object) -> None:
        with self._lock:
            self._in_flight -= 1

    async def run(self, function: Callable[..., T], *args: Any) -> T:
        """Run ``function(*args)`` on a worker; raises :class:`QueueFull` at once when no slot is free."""
        with self._lock:
            if self._in_flight >= self.capacity:
                self.rejected += 1
                raise QueueFull
            self._in_flight += 1
        try:
            future = self._executor.submit(function, *args)
        except BaseException:
            self._release(None)
            raise
        future.add_done_callback(self._release)
        return await asyncio.wrap_future(future)

    def stats(self) -> dict[str, int]:
        return {"workers": self.workers, "capacity": self.capacity, "in_flight": self._in_flight,
                "rejected": self.rejected}

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


# ---------------------------------------------------------------------------------------------- body limit
class BodyTooLarge(HTTPException):
    """Raised while the body streams in; FastAPI re-raises HTTPExceptions from form parsing, so it becomes a 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body exceeds the upload limit of {limit:,} bytes; send a smaller image "
                              "(or start the server with a larger --max-upload-mb).")


#: An over-limit body up to this many bytes past the limit is read and discarded before the 413 is sent: ordinary
#: clients send their whole body before reading the answer, and would see a reset connection instead of the 413
#: if the server closed while they were still sending. Larger bodies (and ``Expect: 100-continue``) get it at once.
DRAIN_BYTES = 64 * 1024 * 1024


class UploadLimit:
    """ASGI middleware: refuse bodies over ``limit`` bytes — from ``Content-Length`` before the app reads anything,
    and while a chunked body streams in — so that an oversized upload is never buffered or spooled to disk."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                await _send_json(send, 400, f"invalid Content-Length header {declared[:40]!r}")
                return
            if int(declared) > self.limit:
                if headers.get(b"expect", b"").lower() != b"100-continue" and int(declared) <= self.limit + DRAIN_BYTES:
                    await _drain(receive, int(declared))
                await _send_json(send, 413, BodyTooLarge(self.limit).detail)
                return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    if message.get("more_body"):
                        await _drain(receive, DRAIN_BYTES)
                    raise BodyTooLarge(self.limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge as error:  # raised outside FastAPI's exception handling (e.g. by a raw body read)
            if started:
                raise
            await _send_json(send, 413, error.detail)


async def _drain(receive: Receive, budget: int) -> None:
    """Read and discard the rest of a request body, up to ``budget`` bytes."""
    while budget > 0:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body"):
            return
        budget -= len(message.get("body", b""))


async def _send_json(send: Send, status: int, detail: str) -> None:
    response = JSONResponse({"detail": detail}, status_code=status, headers={"Connection": "close"})
    body = response.body
    await send({"type": "http.response.start", "status": status, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": body})


# --------------------------------------------------------------------------------------------------- the app
def create_app(predictor: Predictor, settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI application serving ``predictor`` under ``settings`` (defaults: :class:`ServeSettings`)."""
    settings = settings or ServeSettings()
    pool = InferencePool(settings.workers, settings.queue_size)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        pool.shutdown()

    app = FastAPI(
        title="crackclf", version=_version(), lifespan=lifespan,
        description="Concrete crack classification. `POST /predict` classifies crops (e.g. 227×227), "
                    "`POST /analyze` maps a whole photo window by window. The web page is at `/`.",
    )
    app.state.predictor, app.state.settings, app.state.pool = predictor, settings, pool
    app.add_middleware(UploadLimit, limit=settings.max_upload_bytes)
    _install_error_handlers(app)
    model_info = {"name": _model_name(predictor.model_id), **predictor.describe()}

    def predict_job(uploads: list[tuple[str, bytes]]) -> list[Prediction]:
        return predictor.classify_sources([data for _, data in uploads], [name for name, _ in uploads],
                                          max_pixels=settings.max_pixels, formats=settings.formats)

    def analyze_job(name: str, data: bytes, window: int | None, stride: int | None, tiles: bool) -> dict[str, Any]:
        photo = np.asarray(open_image(data, max_pixels=settings.max_pixels, formats=settings.formats))
        crack_map = map_photo(predictor, name, window=window, stride=stride, photo=photo, max_tiles=settings.max_tiles)
        summary = crack_map.summary()
        if not tiles:
            summary.pop("tile_results")
        buffer = io.BytesIO()
        overlay_png(crack_map, photo, buffer)
        cracked = bool(crack_map.cracked_tiles)
        return {
            "verdict": {"label": predictor.class_names[int(cracked)], "is_crack": cracked,
                        "probability": crack_map.max_probability, "threshold": predictor.threshold},
            "summary": summary,
            "overlay": "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"),
        }

    async def in_pool(function: Callable[..., T], *args: Any) -> T:
        try:
            return await pool.run(function, *args)
        except QueueFull:
            raise HTTPException(503, f"server busy: all {pool.capacity} inference slots are taken; retry in "
                                     f"{settings.retry_after_s} s.",
                                headers={"Retry-After": str(settings.retry_after_s)}) from None

    @app.post("/predict", summary="Classify one or more images (crops)", responses=_ERRORS)
    async def predict(files: list[UploadFile] = File(..., description="one or more image files (field `files`)")
                      ) -> JSONResponse:
        """Classify each uploaded image as a whole (resized to the model's input size).

        Answers 200 with one result per file, in order (a file that cannot be used has ``error`` set and no
        probability) when at least one file could be classified, and 422 when none could.
        """
        if len(files) > settings.max_files:
            raise HTTPException(413, f"{len(files)} files in one request; the limit is {settings.max_files}.")
        started = time.perf_counter()
        uploads = [(_filename(upload, index), await upload.read()) for index, upload in enumerate(files)]
        results = [p.to_dict() for p in await in_pool(predict_job, uploads)]
        body = {"model_id": predictor.model_id, "threshold": predictor.threshold, "results": results,
                "elapsed_ms": round(1000 * (time.perf_counter() - started), 2)}
        if all(r["error"] for r in results):
            reasons = "; ".join(f"{r['source']}: {r['error']}" for r in results)
            return JSONResponse({"detail": f"no usable image ({reasons})", **body}, status_code=422)
        return JSONResponse(body)

    @app.post("/analyze", summary="Map cracks over a whole photo", responses=_ERRORS)
    async def analyze(
        file: UploadFile = File(..., description="one photo (field `file`)"),
        window: int | None = Query(None, ge=8, description="window side in photo pixels (default: the training "
                                                            "crop size stored with the model)"),
        stride: int | None = Query(None, ge=1, description="step between windows (default: the window)"),
        tiles: bool = Query(True, description="include every window's probability in the summary"),
    ) -> JSONResponse:
        """Cut the photo into windows of the training crop size, classify each, and answer with the verdict (crack
        when any window is cracked; probability = the highest window's), the map summary (cracked area fraction,
        region boxes, windows) and the overlay PNG as a ``data:`` URL."""
        started = time.perf_counter()
        name = _filename(file, 0)
        data = await file.read()
        try:
            body = await in_pool(analyze_job, name, data, window, stride, tiles)
        except ImageError as error:
            raise HTTPException(422, f"{name}: {error.reason}") from None
        return JSONResponse({**body, "model_id": predictor.model_id,
                             "elapsed_ms": round(1000 * (time.perf_counter() - started), 2)})

    @app.get("/healthz", summary="Liveness and queue state")
    async def healthz() -> dict[str, Any]:
        """Answered on the event loop, never queued: it shows the server is alive even when inference is busy."""
        return {"status": "ok", "model_id": predictor.model_id, "queue": pool.stats()}

    @app.get("/model", summary="The model being served and the server's limits")
    async def model() -> dict[str, Any]:
        """Name, backbone, image size, threshold, MLflow run id (``run_id``), backend, and the upload limits."""
        return {**model_info, "limits": settings.public()}

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Content-Security-Policy": _PAGE_CSP})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


# Only our own script and style; overlays arrive as data: URLs and previews as blob: URLs.
_PAGE_CSP = ("default-src 'self'; img-src 'self' data: blob:; script-src 'self'; style-src 'self'; "
             "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"description": text, "content": {"application/json": {"example": {"detail": "one-line reason"}}}}
    for code, text in ((413, "upload or image too large"), (415, "not multipart/form-data"),
                       (422, "unusable image or missing field"), (503, "busy: retry after Retry-After seconds"))
}


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(Exception)
    async def server_fault(_request: Request, error: Exception) -> JSONResponse:
        """A fault of the server itself (never a bad request): JSON like every other answer; uvicorn logs the
        traceback."""
        return JSONResponse({"detail": f"internal server error ({type(error).__name__}); the server log has the "
                                       "details"}, status_code=500)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        """A one-line reason instead of FastAPI's nested list (kept under ``errors``)."""
        content_type = request.headers.get("content-type", "")
        field = "files" if request.url.path.endswith("/predict") else "file"
        example = f"e.g. curl -F {field}=@photo.jpg {request.url}"
        if request.method == "POST" and not content_type.lower().startswith("multipart/form-data"):
            return JSONResponse({"detail": f"expected multipart/form-data with the image in the field {field!r} "
                                           f"(got content type {content_type or 'none'!r}); {example}"},
                                status_code=415)
        problems = []
        for item in error.errors():
            location = tuple(item.get("loc", ()))
            where = ".".join(str(part) for part in location if part not in ("body", "query"))
            if item.get("type") == "missing" and location[:1] == ("body",):
                problems.append(f"missing form field {where!r}: send the image(s) in it ({example})")
            else:
                problems.append(f"{where or 'request'}: {item.get('msg', 'invalid')}")
        return JSONResponse({"detail": "; ".join(problems) or "invalid request",
                             "errors": _plain(error.errors())}, status_code=422)


def _plain(errors: Any) -> Any:
    """Validation errors as JSON (they may carry exception objects or bytes in ``ctx``/``input``)."""
    return [{k: (v if k in ("loc", "msg", "type") else str(v)[:200]) for k, v in e.items()} for e in errors]


def _filename(upload: UploadFile, index: int) -> str:
    name = (upload.filename or "").strip()
    return name[-200:] if name else f"upload-{index}"


def _model_name(model_id: str) -> str:
    """A short human name: ``models:/crackclf/3`` → ``crackclf v3``, a path → its file name, ``runs:/id`` as is."""
    if model_id.startswith("models:/"):
        parts = model_id.removeprefix("models:/").split("/")
        return f"{parts[0]} v{parts[1]}" if len(parts) > 1 else parts[0]
    return model_id if ":/" in model_id else Path(model_id).name


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("crackclf")
    except PackageNotFoundError:
        return "0"

