"""Export a model to ONNX (dynamic batch axis, bundle info in the metadata) and check parity on real images.

Parity: the same decoded images go through the PyTorch network and the written ``.onnx`` in ONNX Runtime; the
maximum absolute difference of the crack probabilities must stay within ``tolerance`` (1e-4) on at least 256
images, or the export is reported as failed.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from crackclf.bundle import BundleError, LoadedModel, load_onnx, save_onnx
from crackclf.data.images import ImageSource
from crackclf.errors import short_error
from crackclf.inference.predictor import Predictor

log = logging.getLogger(__name__)

PARITY_TOLERANCE = 1e-4
PARITY_MIN_IMAGES = 256


@dataclass
class ExportReport:
    path: str
    parity_images: int
    max_abs_diff: float
    mean_abs_diff: float
    tolerance: float
    seconds: float

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def run_parity_sources(model: LoadedModel, count: int = PARITY_MIN_IMAGES) -> list[Path]:
    """Real images for the parity check from the model's training run: its logged split (validation and test rows
    first) under the run's ``data.root``. Raises :class:`BundleError` when that is not available."""
    from crackclf.data.split import read_split
    from crackclf.tracking import mlflow as tracking

    hint = "pass --parity-data <folder or files> with at least {count} real images"
    if not model.info.run_id:
        raise BundleError(f"the model records no training run to take parity images from; {hint.format(count=count)}.")
    try:
        root = Path(tracking.get_run(model.info.run_id).data.params["data.root"])
        with tempfile.TemporaryDirectory(prefix="crackclf-split-") as tmp:
            folder = tracking.download_artifact(model.info.run_id, "data", Path(tmp))
            rows = [row for csv_file in sorted(folder.glob("split*.csv")) for row in read_split(csv_file)]
    except Exception as error:  # noqa: BLE001 - missing run, param or artifact all mean the same to the user
        raise BundleError(f"cannot read the split of run {model.info.run_id} ({short_error(error)}); "
                          f"{hint.format(count=count)}.") from None
    ordered = sorted(rows, key=lambda r: (r.split == "train", r.path))  # held-out images first
    paths = [root / r.path for r in ordered if (root / r.path).is_file()]
    step = max(1, len(paths) // (count * 2))  # spread over both classes rather than the first folder
    return paths[::step][: count * 2]


def export_onnx(model: LoadedModel, out: Path, parity_sources: list[ImageSource], *,
                tolerance: float = PARITY_TOLERANCE, minimum: int = PARITY_MIN_IMAGES) -> ExportReport:
    """Write ``out`` (ONNX) and compare it with the PyTorch model on ``parity_sources`` (≥ ``minimum`` readable)."""
    if model.network is None:
        raise BundleError(f"model {model.model_id} is already ONNX; export needs PyTorch weights (.ckpt, runs:/, "
                          "models:/).")
    started = time.perf_counter()
    out = Path(out)
    save_onnx(model.network, model.info, out)
    eager = Predictor(model, backend="torch")
    arrays = [array for _, array, _ in eager.decode_sources(parity_sources) if array is not None]
    if len(arrays) < minimum:
        raise BundleError(f"parity check needs >= {minimum} readable images, got {len(arrays)} of "
                          f"{len(parity_sources)}; pass --parity-data with more images.")
    batch = np.stack(arrays)
    onnx_predictor = Predictor(load_onnx(out), backend="onnx")
    difference = np.abs(eager.predict_arrays(batch).astype(np.float64) - onnx_predictor.predict_arrays(batch))
    report = ExportReport(str(out), len(arrays), float(difference.max()), float(difference.mean()), tolerance,
                          time.perf_counter() - started)
    log.info("ONNX parity on %d images: max |Δp| = %.3g (tolerance %.0e)", len(arrays), report.max_abs_diff,
             tolerance)
    return report
