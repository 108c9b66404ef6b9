"""How a model holds up when the camera, light or file changes: accuracy on the test split, re-rendered.

The issue's real check (crack photos the project has never seen, from other cameras and surfaces) needs data that
is not here. This is the nearest measurement: every test image of the model's own split is re-rendered as another
camera or file would give it (JPEG quality, exposure, contrast, white balance, focus, resolution, sensor noise,
grey scale), then classified through the normal prediction path (bytes -> the one image opener -> Predictor).

    .venv/bin/python scripts/bench_shift.py --model <best.ckpt | runs:/id | .onnx> \
        --split <the run's data/split-*.csv> --data ../shared/data/concrete_crack [--out bench/shift.json]

Prints, per condition, accuracy, crack recall and false-alarm rate at the model's threshold, and the change of
accuracy against the unchanged images.
"""

from __future__ import annotations

import argparse
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from _bench import environment, write_json
from crackclf.data.images import open_image
from crackclf.data.split import read_split
from crackclf.inference.predictor import Predictor


def _jpeg(image: Image.Image, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def _noise(image: Image.Image, sigma: float, seed: int) -> Image.Image:
    pixels = np.asarray(image, dtype=np.float32)
    noisy = pixels + np.random.default_rng(seed).normal(0.0, sigma, pixels.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def _white_balance(image: Image.Image, gains: tuple[float, float, float]) -> Image.Image:
    pixels = np.asarray(image, dtype=np.float32) * np.asarray(gains, dtype=np.float32)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _resolution(image: Image.Image, factor: float) -> Image.Image:
    small = image.resize((round(image.width * factor), round(image.height * factor)), Image.Resampling.BILINEAR)
    return small.resize(image.size, Image.Resampling.BILINEAR)


#: name -> (image -> encoded file bytes). Every condition ends as a JPEG file, as a camera would deliver it.
CONDITIONS: dict[str, Callable[[Image.Image, int], bytes]] = {
    "unchanged (re-encoded at quality 95)": lambda im, s: _jpeg(im),
    "JPEG quality 30": lambda im, s: _jpeg(im, 30),
    "darker (brightness x0.6)": lambda im, s: _jpeg(ImageEnhance.Brightness(im).enhance(0.6)),
    "brighter (brightness x1.4)": lambda im, s: _jpeg(ImageEnhance.Brightness(im).enhance(1.4)),
    "low contrast (x0.6)": lambda im, s: _jpeg(ImageEnhance.Contrast(im).enhance(0.6)),
    "warm white balance (R x1.15, B x0.85)": lambda im, s: _jpeg(_white_balance(im, (1.15, 1.0, 0.85))),
    "out of focus (Gaussian blur, radius 1.5 px)": lambda im, s: _jpeg(im.filter(ImageFilter.GaussianBlur(1.5))),
    "half the resolution (down x0.5, up again)": lambda im, s: _jpeg(_resolution(im, 0.5)),
    "sensor noise (sigma 8 grey levels)": lambda im, s: _jpeg(_noise(im, 8.0, s)),
    "grey scale": lambda im, s: _jpeg(im.convert("L").convert("RGB")),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a .ckpt, .onnx, runs:/<id> or models:/<name>/<version>")
    parser.add_argument("--split", type=Path, required=True, help="the model's split CSV (its test rows are used)")
    parser.add_argument("--data", type=Path, required=True, help="the data root the split's paths are relative to")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args()

    rows = [row for row in read_split(args.split) if row.split == "test"]
    if not rows:
        raise SystemExit(f"{args.split}: no test rows; pass the split CSV logged with the model's training run.")
    originals = [open_image(args.data / row.path) for row in rows]
    labels = np.array([row.label for row in rows])
    predictor = Predictor.load(args.model)
    print(f"model {predictor.model_id} ({predictor.backend}), threshold {predictor.threshold:.3f}, "
          f"{len(rows)} test images ({int(labels.sum())} cracks)")

    results, baseline = [], None
    for name, render in CONDITIONS.items():
        files = [render(image, index) for index, image in enumerate(originals)]
        predictions = list(predictor.predict_sources(files))
        failed = [p.error for p in predictions if not p.ok]
        if failed:
            raise SystemExit(f"{name}: {len(failed)} image(s) could not be read, e.g. {failed[0]}")
        cracked = np.array([p.is_crack for p in predictions], dtype=bool)
        accuracy = float((cracked == (labels == 1)).mean())
        baseline = accuracy if baseline is None else baseline
        result = {"condition": name, "accuracy": accuracy, "delta_points": round(100 * (accuracy - baseline), 2),
                  "crack_recall": float(cracked[labels == 1].mean()),
                  "false_alarm_rate": float(cracked[labels == 0].mean())}
        results.append(result)
        print(f"{name:<46} accuracy {100 * accuracy:6.2f} %  ({result['delta_points']:+.2f} pt)  "
              f"recall {100 * result['crack_recall']:6.2f} %  false alarms {100 * result['false_alarm_rate']:5.2f} %",
              flush=True)
    if args.out:
        write_json(args.out, {**environment(), "model": args.model, "split": str(args.split), "results": results})
        print(f"written: {args.out}")


if __name__ == "__main__":
    main()
