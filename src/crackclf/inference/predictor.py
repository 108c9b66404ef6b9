"""THE one predictor: every inference in crackclf (evaluate, predict, whole-photo maps, the HTTP API) goes through
:class:`Predictor`.

Public API (stable; the serving layer builds on it)::

    from crackclf.inference.predictor import Predictor

    predictor = Predictor.load("runs:/<run_id>")          # or a .ckpt, models:/<name>/<version>, a .onnx
    predictor.image_size, predictor.threshold, predictor.class_names, predictor.model_id, predictor.backend

    # 1. Sources (paths, raw bytes, binary streams): decoded in parallel, batched, in input order.
    for p in predictor.predict_sources(["a.jpg", b"...jpeg bytes...", "missing.png"]):
        p.source, p.probability, p.label, p.is_crack, p.error        # error: one-line reason, else None

    names_arrays_errors = predictor.decode_sources(paths)            # the same decoding, without the model

    # 2. Already-decoded images (HWC uint8 RGB arrays of any size; resized like training when needed).
    probabilities = predictor.predict_arrays(list_of_arrays)           # float32 (N,) crack probabilities
    predictions = predictor.classify_arrays(list_of_arrays, names)     # list[Prediction]

    # 3. A few sources decoded in the calling thread, with limits (the HTTP API's path).
    predictions = predictor.classify_sources([b"...", b"..."], names, max_pixels=..., formats=("JPEG", "PNG"))

    predictor.failure(name, reason)     # the row of an input rejected before the model (e.g. by an upload check)
    predictor.describe()                # model id, backend, threshold, TTA and the bundle info, as a dict

A :class:`Prediction` is what the CLI writes as one CSV/JSON row (:meth:`Prediction.to_dict`). A crack is
``probability >= threshold``.

Thread safety: one ``Predictor`` may be shared by threads (the PyTorch forward runs under ``torch.inference_mode``
and an ONNX Runtime session is thread-safe); each call to :meth:`Predictor.predict_sources` uses its own decode pool.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from crackclf.bundle import BundleInfo, LoadedModel, load_model, onnx_session
from crackclf.data.images import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    ImageSource,
    describe_source,
    load_resized,
    resize_array,
)
from crackclf.errors import UsageError
from crackclf.utils import worker_count

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnx")
MIN_SHARD = 8  # images: ONNX Runtime batches are split for parallel runs only into shards at least this big
PARALLEL = ("thread", "process")


@dataclass
class Prediction:
    """The result for one input. ``probability``/``label``/``is_crack`` are ``None`` when ``error`` is set."""

    source: str
    probability: float | None
    label: str | None
    is_crack: bool | None
    model_id: str
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Predictor:
    """Batched crack classifier over a loaded bundle, with a PyTorch (eager) or ONNX Runtime backend.

    Args:
        model: a :class:`~crackclf.bundle.LoadedModel` (see :meth:`Predictor.load` for a source string).
        backend: ``"torch"``, ``"onnx"`` or ``"auto"`` (ONNX Runtime on CPU, PyTorch on other devices).
            ``"onnx"`` on a PyTorch model exports it to ONNX in memory first.
        threshold: decision threshold on the crack probability; ``None`` uses the one stored with the model.
        tta: flip test-time augmentation — average the probabilities of the image, its horizontal and its
            vertical mirror (cracks have no preferred orientation); costs 3× the model time.
        batch_size: images per forward pass.
        workers: decode workers for :meth:`predict_sources` (default: the usable CPU cores).
        parallel: ``"thread"`` (default; Pillow releases the GIL while decoding) or ``"process"``.
        device: ``"cpu"`` (default), ``"cuda"``/``"cuda:N"``, or ``"auto"`` (the GPU when PyTorch sees one); a GPU
            runs the PyTorch backend (``backend="auto"`` picks it there).
        threads: cores one model call may use. ONNX Runtime: a batch of at least ``2 * MIN_SHARD`` images is
            split into up to ``threads`` shards run side by side, each on one thread. PyTorch: this calls
            ``torch.set_num_threads``, which is process-wide. Default: leave PyTorch as it is, ONNX Runtime on
            every usable core. On a few shared cores, 1 leaves the decode workers room (see docs/deployment.md).
    """

    def __init__(
        self,
        model: LoadedModel,
        *,
        backend: str = "auto",
        threshold: float | None = None,
        tta: bool = False,
        batch_size: int = 64,
        workers: int | None = None,
        parallel: str = "thread",
        device: str | torch.device = "cpu",
        threads: int | None = None,
    ) -> None:
        if backend not in BACKENDS:
            raise UsageError(f"backend={backend!r} must be one of {', '.join(BACKENDS)}.")
        if parallel not in PARALLEL:
            raise UsageError(f"parallel={parallel!r} must be one of {', '.join(PARALLEL)}.")
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise UsageError(f"threshold={threshold} must be a probability in [0, 1], e.g. 0.5.")
        if batch_size < 1:
            raise UsageError(f"batch_size={batch_size} must be >= 1.")
        self.model = model
        self.info: BundleInfo = model.info
        self.model_id: str = model.model_id
        self.threshold: float = float(self.info.threshold if threshold is None else threshold)
        self.tta, self.batch_size, self.parallel = tta, batch_size, parallel
        self.workers = max(1, workers if workers is not None else worker_count())
        self.device = resolve_device(device)
        if backend == "auto":
            # ONNX Runtime on CPU, where `predict` ran faster end to end than eager PyTorch (`make bench-infer`,
            # docs/deployment.md); PyTorch where it can use an accelerator.
            backend = "onnx" if model.network is None or self.device.type == "cpu" else "torch"
        self.backend = backend
        self._session = None
        if backend == "torch":
            if model.network is None:
                raise UsageError(f"model {self.model_id}: an ONNX model runs only with backend 'onnx' (or 'auto').")
            if threads:
                torch.set_num_threads(threads)
            # channels-last runs the convolutions faster on CPU (docs/recipe.md: contiguous vs channels-last).
            self._network = model.network.to(self.device, memory_format=torch.channels_last).eval()
        else:
            self._session = onnx_session(model)
            self._input_name = self._session.get_inputs()[0].name
            self._shards = max(1, threads or worker_count())
            # The calling thread runs one shard itself; the pool, the others.
            self._shard_pool = (ThreadPoolExecutor(self._shards - 1, thread_name_prefix="crackclf-onnx")
                                if self._shards > 1 else None)

    @classmethod
    def load(cls, source: str | os.PathLike, **options: Any) -> Predictor:
        """Load a model from a ``.ckpt``/``.onnx`` path, ``runs:/<run_id>`` or ``models:/<name>/<version>``.

        ``options`` are the keyword arguments of :class:`Predictor`.
        """
        return cls(load_model(source), **options)

    # ------------------------------------------------------------------------------------------------ properties
    @property
    def image_size(self) -> int:
        """Side in pixels of the square the model takes (inputs of another size are resized to it)."""
        return int(self.info.image_size)

    @property
    def class_names(self) -> tuple[str, str]:
        """Names of class 0 (no crack) and class 1 (crack)."""
        return tuple(self.info.class_names)  # type: ignore[return-value]

    def label_of(self, probability: float) -> str:
        """The class name for a crack probability at this predictor's threshold (``>=`` means crack)."""
        return self.class_names[int(probability >= self.threshold)]

    def describe(self) -> dict[str, Any]:
        """What this predictor is, for logs, CLI output and the serving ``/model`` endpoint."""
        return {"model_id": self.model_id, "backend": self.backend, "threshold": self.threshold, "tta": self.tta,
                **{k: v for k, v in self.info.to_dict().items() if k != "threshold"}}

    # --------------------------------------------------------------------------------------------------- arrays
    def predict_arrays(self, images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """Crack probabilities (float32, shape ``(N,)``) of already-decoded RGB uint8 images.

        ``images``: an ``(N, S, S, 3)`` uint8 array at the model's size, or a sequence of ``(H, W, 3)`` uint8
        arrays of any size (resized with the training resize; decode them with
        :func:`crackclf.data.images.load_resized` to get exactly the pixels ``predict_sources`` would use).
        """
        batch = self._stack(images)
        if len(batch) == 0:
            return np.zeros(0, dtype=np.float32)
        out = [self._forward(batch[i : i + self.batch_size]) for i in range(0, len(batch), self.batch_size)]
        return np.concatenate(out)

    def classify_arrays(self, images: np.ndarray | Sequence[np.ndarray], names: Sequence[str] | None = None
                        ) -> list[Prediction]:
        """:meth:`predict_arrays` turned into :class:`Prediction` rows (``names`` become their ``source``)."""
        probabilities = self.predict_arrays(images)
        names = names if names is not None else [f"<array {i}>" for i in range(len(probabilities))]
        return [self._prediction(name, p) for name, p in zip(names, probabilities, strict=True)]

    # -------------------------------------------------------------------------------------------------- sources
    def predict_sources(self, sources: Iterable[ImageSource], *, progress: bool = False,
                        total: int | None = None) -> Iterator[Prediction]:
        """Decode ``sources`` in parallel and yield one :class:`Prediction` per source, in input order.

        A source that cannot be decoded yields a Prediction with ``error`` set (a one-line reason) and never stops
        the others. Decoding of the next batches overlaps with the model's work on the current one.
        """
        sources = list(sources) if total is None and not isinstance(sources, Sequence) else sources
        total = total if total is not None else len(sources)  # type: ignore[arg-type]
        bar = tqdm(total=total, desc="predicting", unit="img", disable=not progress, leave=False)
        try:
            with self._executor() as pool:
                for chunk in self._decoded_batches(pool, sources):
                    yield from self._predict_chunk(chunk)
                    bar.update(len(chunk))
        finally:
            bar.close()

    def decode_sources(self, sources: Iterable[ImageSource]) -> Iterator[tuple[str, np.ndarray | None, str | None]]:
        """Decode ``sources`` in parallel at the model's size without predicting: yields ``(name, array, error)``
        in input order (``array`` is ``None`` and ``error`` a one-line reason for unreadable inputs)."""
        with self._executor() as pool:
            for chunk in self._decoded_batches(pool, sources):
                yield from chunk

    def classify_sources(self, sources: Sequence[ImageSource], names: Sequence[str] | None = None, *,
                         max_pixels: int = DEFAULT_MAX_PIXELS, formats: tuple[str, ...] | None = None
                         ) -> list[Prediction]:
        """Decode ``sources`` in the calling thread and classify them, one :class:`Prediction` each, in order.

        The decode of :meth:`predict_sources` (one :func:`_decode`) with the caller's limits: ``max_pixels`` and
        ``formats`` as in :func:`~crackclf.data.images.open_image` (the HTTP API passes its own). ``names``
        become the rows' ``source`` (default: :func:`~crackclf.data.images.describe_source`). A source that cannot
        be decoded gets a row with ``error`` set and never stops the others.
        """
        names = names if names is not None else [describe_source(source) for source in sources]
        return self._predict_chunk([(name, *_decode(source, self.image_size, max_pixels, formats))
                                    for name, source in zip(names, sources, strict=True)])

    def predict_one(self, source: ImageSource) -> Prediction:
        """One source (path, bytes or stream), decoded in the calling thread."""
        return self.classify_sources([source])[0]

    # ------------------------------------------------------------------------------------------------- internals
    def _executor(self) -> Executor:
        if self.parallel == "process" and self.workers > 1:
            return ProcessPoolExecutor(self.workers)
        return ThreadPoolExecutor(self.workers, thread_name_prefix="crackclf-decode")

    def _decoded_batches(self, pool: Executor, sources: Iterable[ImageSource]
                         ) -> Iterator[list[tuple[str, np.ndarray | None, str | None]]]:
        """Batches of (name, array or None, error or None), keeping ~3 batches of decode work in flight."""
        in_flight: deque[tuple[str, Future]] = deque()
        limit = 3 * self.batch_size
        batch: list[tuple[str, np.ndarray | None, str | None]] = []
        iterator = iter(sources)
        exhausted = False
        while True:
            while not exhausted and len(in_flight) < limit:
                try:
                    source = next(iterator)
                except StopIteration:
                    exhausted = True
                    break
                if isinstance(source, Path):
                    source = str(source)  # cheaper to pickle for a process pool
                in_flight.append((describe_source(source), pool.submit(_decode, source, self.image_size)))
            if not in_flight:
                break
            name, future = in_flight.popleft()
            array, error = future.result()
            batch.append((name, array, error))
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def _predict_chunk(self, chunk: list[tuple[str, np.ndarray | None, str | None]]) -> list[Prediction]:
        """Decoded (name, array or None, error) rows → Predictions in order; the decoded ones in one
        :meth:`classify_arrays` call, the others as :meth:`failure` rows."""
        good = [(name, array) for name, array, _ in chunk if array is not None]
        predictions = iter(self.classify_arrays([a for _, a in good], [n for n, _ in good]) if good else [])
        return [self.failure(name, error) if array is None else next(predictions) for name, array, error in chunk]

    def _prediction(self, name: str, probability: float) -> Prediction:
        probability = float(probability)
        crack = probability >= self.threshold
        return Prediction(name, probability, self.class_names[int(crack)], crack, self.model_id)

    def failure(self, name: str, reason: str | None) -> Prediction:
        """The Prediction row of an input that could not be used (``reason``: one line)."""
        return Prediction(name, None, None, None, self.model_id, reason or "unreadable")

    def _stack(self, images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        size = self.image_size
        if isinstance(images, np.ndarray) and images.ndim == 4:
            arrays: Sequence[np.ndarray] = images
        elif isinstance(images, np.ndarray) and images.ndim == 3:
            arrays = [images]
        else:
            arrays = list(images)
        out = np.empty((len(arrays), size, size, 3), dtype=np.uint8)
        for index, array in enumerate(arrays):
            array = np.asarray(array)
            if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
                raise UsageError(f"image {index}: expected an (H, W, 3) uint8 RGB array, got {array.dtype} "
                                 f"{array.shape}; decode files with crackclf.data.images.load_resized.")
            out[index] = array if array.shape[:2] == (size, size) else resize_array(Image.fromarray(array), size)
        return out

    def _forward(self, batch: np.ndarray) -> np.ndarray:
        """uint8 NHWC batch → float32 crack probabilities, with flip TTA when enabled."""
        images = np.ascontiguousarray(batch.transpose(0, 3, 1, 2), dtype=np.float32)
        images *= 1.0 / 255.0
        count = len(images)
        if self.tta:  # one forward pass over all three views
            images = np.concatenate([images, images[..., ::-1], images[..., ::-1, :]]).copy()
        if self.backend == "torch":
            with torch.inference_mode():
                tensor = torch.from_numpy(images).to(self.device).contiguous(memory_format=torch.channels_last)
                probabilities = self._network(tensor).float().softmax(dim=1)[:, 1].cpu().numpy()
        else:
            probabilities = self._run_onnx(images)[:, 1]
        probabilities = probabilities.astype(np.float32)
        if self.tta:
            probabilities = probabilities.reshape(3, count).mean(axis=0)
        return probabilities

    def _run_onnx(self, images: np.ndarray) -> np.ndarray:
        """Class probabilities from ONNX Runtime: shards of the batch run side by side, one thread each (faster than
        one run on several intra-op threads: `make bench-infer`, docs/deployment.md)."""
        shards = min(self._shards, len(images) // MIN_SHARD)
        if shards <= 1:
            return self._session.run(None, {self._input_name: images})[0]
        parts = np.array_split(images, shards)
        futures = [self._shard_pool.submit(self._session.run, None, {self._input_name: part}) for part in parts[1:]]
        first = self._session.run(None, {self._input_name: parts[0]})[0]
        return np.concatenate([first, *(future.result()[0] for future in futures)])


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` → the first CUDA GPU when PyTorch sees one, else the CPU; any other name is checked, not guessed."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise UsageError(f"device={device!r} is not a device name; use auto, cpu, cuda or cuda:N.") from error
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device={device!r}: PyTorch sees no CUDA GPU here; use device auto or cpu.")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise UsageError(f"device={device!r}: only {torch.cuda.device_count()} CUDA GPU(s) visible "
                             f"(cuda:0 to cuda:{torch.cuda.device_count() - 1}).")
    elif resolved.type != "cpu":
        raise UsageError(f"device={device!r}: only cpu and cuda are supported; use auto, cpu, cuda or cuda:N.")
    return resolved


def _decode(source: ImageSource, size: int, max_pixels: int = DEFAULT_MAX_PIXELS,
            formats: tuple[str, ...] | None = None) -> tuple[np.ndarray | None, str | None]:
    """The predictor's one decode: (array, None) or (None, one-line reason). Module-level so a process pool can
    pickle it."""
    try:
        return load_resized(source, size, max_pixels=max_pixels, formats=formats), None
    except ImageError as error:
        return None, error.reason
