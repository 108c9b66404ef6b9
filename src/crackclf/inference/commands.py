"""``crackclf evaluate | predict | export | explain``: the deployment commands, all over one Predictor."""

from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import os
import sys
from pathlib import Path

from crackclf.data.images import IMAGE_EXTENSIONS, list_image_files
from crackclf.errors import UsageError

MODEL_HELP = "a .ckpt or .onnx file, runs:/<run_id> or models:/<name>/<version>"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``evaluate``, ``predict``, ``export`` and ``explain`` to the ``crackclf`` parser."""
    evaluate = subparsers.add_parser("evaluate", help="metrics, curves and worst mistakes on a labelled folder")
    model_arguments(evaluate)
    _batch_arguments(evaluate)
    evaluate.add_argument("--data", type=Path, required=True, help="labelled folder in the training layout")
    evaluate.add_argument("--class-dirs", nargs=2, default=None, metavar=("NEG", "POS"),
                          help="class sub-folders in label order (default: Negative Positive)")
    evaluate.add_argument("--out", type=Path, default=None, help="output folder (default: reports/eval-<time>)")
    evaluate.add_argument("--mistakes", type=int, default=16, help="images in the worst-mistakes grid (default 16)")
    evaluate.add_argument("--gradcam", action="store_true", help="also write Grad-CAM overlays of the worst mistakes")
    evaluate.add_argument("--no-mlflow", action="store_true", help="do not log an MLflow evaluation run")
    evaluate.add_argument("--experiment", default=None,
                          help="MLflow experiment of the evaluation run (default: the model's, else crack-eval)")
    evaluate.set_defaults(func=_evaluate)

    predict = subparsers.add_parser("predict", help="classify files, folders (recursive), globs; map whole photos")
    model_arguments(predict)
    _batch_arguments(predict)
    predict.add_argument("inputs", nargs="+", help="image files, folders (searched recursively) or glob patterns")
    predict.add_argument("--out", default="-", help="output file (default: standard output)")
    predict.add_argument("--format", choices=("csv", "json"), default=None,
                         help="output format (default: from the --out suffix, else csv)")
    predict.add_argument("--map", type=Path, default=None, metavar="DIR",
                         help="tile inputs larger than the training crop and write a crack map (PNG + JSON) per "
                              "photo into DIR")
    predict.add_argument("--window", type=int, default=None,
                         help="tile side in source pixels (default: the training crop size stored with the model)")
    predict.add_argument("--stride", type=int, default=None, help="tile step in pixels (default: --window)")
    predict.set_defaults(func=_predict)

    export = subparsers.add_parser("export", help="export to ONNX with a parity check on real images")
    export.add_argument("--model", required=True, help=MODEL_HELP)
    export.add_argument("--format", choices=("onnx",), default="onnx")
    export.add_argument("--out", type=Path, required=True, help="the .onnx file to write")
    export.add_argument("--parity-data", nargs="+", default=None, metavar="PATH",
                        help="images/folders for the parity check (default: held-out images of the model's run)")
    export.add_argument("--parity-images", type=int, default=256, help="images compared (>= 256, default 256)")
    export.add_argument("--tolerance", type=float, default=1e-4, help="max |Δ probability| allowed (default 1e-4)")
    export.add_argument("--no-progress", action="store_true")
    export.set_defaults(func=_export)

    explain = subparsers.add_parser("explain", help="Grad-CAM overlays of images or of an evaluation's mistakes")
    explain.add_argument("--model", required=True, help=MODEL_HELP + " (PyTorch weights, not .onnx)")
    explain.add_argument("inputs", nargs="*", help="images, folders or globs")
    explain.add_argument("--mistakes", type=Path, default=None, metavar="PREDICTIONS_CSV",
                         help="explain the worst mistakes of an evaluation (its predictions.csv)")
    explain.add_argument("--count", type=int, default=16, help="mistakes to show (default 16)")
    explain.add_argument("--layer", default=None, help="backbone module to read (default: automatic)")
    explain.add_argument("--threshold", type=float, default=None, help="decision threshold (default: the model's)")
    explain.add_argument("--out", type=Path, required=True, help="the PNG to write")
    explain.set_defaults(func=_explain)


def model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model options of ``predict``, ``evaluate`` and ``serve``, declared once so that they keep one meaning and
    one default: which model, its threshold, flip TTA, the backend and the device (see :class:`Predictor`)."""
    parser.add_argument("--model", required=True, help=MODEL_HELP)
    parser.add_argument("--threshold", type=float, default=None,
                        help="decision threshold on the crack probability (default: the one stored with the model)")
    parser.add_argument("--tta", action="store_true",
                        help="flip test-time augmentation (3 views averaged; 3x the model time)")
    parser.add_argument("--backend", choices=("auto", "torch", "onnx"), default="auto",
                        help="auto (default): ONNX Runtime on CPU (a checkpoint is converted in memory), "
                             "PyTorch on a GPU")
    parser.add_argument("--device", default="auto",
                        help="auto (default: the GPU when PyTorch sees one, else the CPU), cpu, cuda or cuda:N")


def _batch_arguments(parser: argparse.ArgumentParser) -> None:
    """How ``predict`` and ``evaluate`` run through many files (``serve`` has its own workers and threads)."""
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=None, help="decode workers (default: CPU cores)")
    parser.add_argument("--threads", type=int, default=None,
                        help="model threads (default: all cores; 1 is faster on a few busy cores)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _predictor(args: argparse.Namespace):
    from crackclf.inference.predictor import Predictor

    return Predictor.load(args.model, backend=getattr(args, "backend", "auto"), threshold=args.threshold,
                          tta=getattr(args, "tta", False), batch_size=getattr(args, "batch_size", 64),
                          workers=getattr(args, "workers", None), threads=getattr(args, "threads", None),
                          device=getattr(args, "device", "cpu"))


def expand_inputs(items: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Files from files, folders (recursive, image suffixes only) and glob patterns, in a stable order.

    Returns ``(files, problems)``: ``problems`` are (input, reason) for folders or patterns that hold no image.
    A named file that does not exist is kept, so that it is reported with its reason like any unreadable input.
    """
    files: list[str] = []
    problems: list[tuple[str, str]] = []
    for item in items:
        if os.path.isdir(item):
            found = list_image_files(item)
            files += found
            if not found:
                problems.append((item, f"folder contains no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})"))
        elif not os.path.lexists(item) and glob.has_magic(item):
            matches = sorted(glob.glob(item, recursive=True))
            found = [f for m in matches for f in (list_image_files(m) if os.path.isdir(m) else [m])]
            files += found
            if not found:
                problems.append((item, "pattern matches no file"))
        else:
            files.append(item)
    return files, problems


# ---------------------------------------------------------------------------------------------------- evaluate
def _evaluate(args: argparse.Namespace) -> int:
    from crackclf.data.download import CLASS_DIRS
    from crackclf.inference.evaluate import evaluate, format_metrics

    predictor = _predictor(args)
    result = evaluate(predictor, args.data, class_dirs=tuple(args.class_dirs or CLASS_DIRS), out_dir=args.out,
                      mistakes=args.mistakes, progress=not args.no_progress, log_mlflow=not args.no_mlflow,
                      experiment=args.experiment)
    if args.gradcam and predictor.model.network is not None and result.worst_mistakes(1):
        from crackclf.inference.explain import explain_mistakes

        picture, _ = explain_mistakes(predictor, result.out_dir / "predictions.csv",
                                      result.out_dir / "worst_mistakes_gradcam.png", args.mistakes)
        if result.run_id:
            from crackclf.tracking import mlflow as tracking

            tracking.log_artifact(result.run_id, picture, "evaluation")
    print(format_metrics(result, predictor))
    return 1 if result.failed else 0


# ----------------------------------------------------------------------------------------------------- predict
PREDICT_COLUMNS = ("path", "probability", "label", "model_id", "error")


def _predict(args: argparse.Namespace) -> int:
    from crackclf.data.images import describe_source

    predictor = _predictor(args)
    files, problems = expand_inputs(args.inputs)
    rows: list[dict] = []
    if args.map is not None:
        rows = _predict_with_maps(predictor, files, args)
    else:
        for p in predictor.predict_sources(files, progress=not args.no_progress, total=len(files)):
            rows.append(_row(p))
    rows += [_row(predictor.failure(describe_source(item), reason)) for item, reason in problems]
    fmt = args.format or ("json" if str(args.out).lower().endswith(".json") else "csv")
    _write_rows(rows, args.out, fmt, with_map=args.map is not None)
    failed = [r for r in rows if r["error"]]
    for row in failed:
        print(f"crackclf predict: cannot use {row['path']}: {row['error']}", file=sys.stderr)
    done = len(rows) - len(failed)
    print(f"crackclf predict: {done} predicted, {len(failed)} failed (model {predictor.model_id}, threshold "
          f"{predictor.threshold:.4f}){'' if args.out == '-' else f' -> {args.out}'}", file=sys.stderr)
    return 1 if failed else 0


def _row(prediction) -> dict:
    probability = "" if prediction.probability is None else round(prediction.probability, 6)
    return {"path": prediction.source, "probability": probability, "label": prediction.label or "",
            "model_id": prediction.model_id, "error": prediction.error or ""}


def _predict_with_maps(predictor, files: list[str], args: argparse.Namespace) -> list[dict]:
    """Photos larger than the training crop are tiled and mapped; the rest are classified as usual."""
    import numpy as np
    from tqdm import tqdm

    from crackclf.data.images import ImageError, describe_source, open_image
    from crackclf.inference.tiling import map_photo, needs_tiling, window_of, write_map

    window = window_of(predictor, args.window)
    rows: list[dict] = []
    small: list[tuple[int, str]] = []  # (row index, path) of inputs classified whole, batched at the end
    stems: dict[str, int] = {}
    for path in tqdm(files, desc="mapping", unit="img", disable=args.no_progress, leave=False):
        try:
            photo = np.asarray(open_image(path))
        except ImageError as error:
            rows.append(_row(predictor.failure(describe_source(path), error.reason)))
            continue
        if not needs_tiling(photo.shape[1], photo.shape[0], window):
            small.append((len(rows), path))
            rows.append({})
            continue
        crack_map = map_photo(predictor, path, window=window, stride=args.stride, photo=photo)
        stem = Path(path).stem
        stems[stem] = stems.get(stem, 0) + 1
        png, summary = write_map(crack_map, photo, args.map, stem if stems[stem] == 1 else f"{stem}-{stems[stem]}")
        cracked = bool(crack_map.cracked_tiles)
        rows.append({"path": describe_source(path), "probability": round(crack_map.max_probability, 6),
                     "label": predictor.class_names[int(cracked)], "model_id": predictor.model_id, "error": "",
                     "map": str(png), "cracked_area_fraction": round(crack_map.cracked_fraction, 6),
                     "map_summary": str(summary)})
    for (index, _), prediction in zip(small, predictor.predict_sources([p for _, p in small]), strict=True):
        rows[index] = _row(prediction)
    return rows


def _write_rows(rows: list[dict], out: str, fmt: str, with_map: bool) -> None:
    from crackclf.utils import atomic_write_text

    columns = list(PREDICT_COLUMNS) + (["map", "cracked_area_fraction", "map_summary"] if with_map else [])
    if fmt == "json":
        text = json.dumps([{c: row.get(c, "") for c in columns} for row in rows], indent=2) + "\n"
    else:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, columns, extrasaction="ignore", restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        text = buffer.getvalue()
    if out == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        atomic_write_text(Path(out), text)


# ------------------------------------------------------------------------------------------------------ export
def _export(args: argparse.Namespace) -> int:
    from crackclf.bundle import load_model
    from crackclf.inference.export import PARITY_MIN_IMAGES, export_onnx, run_parity_sources

    if args.parity_images < PARITY_MIN_IMAGES:
        raise UsageError(f"--parity-images {args.parity_images}: the parity check needs at least {PARITY_MIN_IMAGES}.")
    model = load_model(args.model)
    if args.parity_data:
        sources, _ = expand_inputs(args.parity_data)
        sources = sources[:: max(1, len(sources) // (2 * args.parity_images))][: 2 * args.parity_images]
    else:
        sources = run_parity_sources(model, args.parity_images)
    report = export_onnx(model, args.out, sources, tolerance=args.tolerance, minimum=args.parity_images)
    verdict = "OK" if report.ok else f"FAILED (above {report.tolerance:g})"
    print(f"exported {report.path}  (opset 17, dynamic batch)\nparity on {report.parity_images} real images: "
          f"max |Δp| = {report.max_abs_diff:.3g}, mean |Δp| = {report.mean_abs_diff:.3g} — {verdict}")
    return 0 if report.ok else 1


# ----------------------------------------------------------------------------------------------------- explain
def _explain(args: argparse.Namespace) -> int:
    from crackclf.data.images import describe_source
    from crackclf.inference.explain import explain, explain_mistakes

    if not args.inputs and args.mistakes is None:
        raise UsageError("give images to explain, or --mistakes <evaluation folder>/predictions.csv")
    predictor = _predictor(args)
    if args.mistakes is not None:
        picture, results = explain_mistakes(predictor, args.mistakes, args.out, args.count, args.layer)
    else:
        files, problems = expand_inputs(args.inputs)
        picture, results = explain(predictor, files, args.out, layer=args.layer)
        results += [predictor.failure(describe_source(item), reason) for item, reason in problems]
    failed = [p for p in results if not p.ok]
    for p in failed:
        print(f"crackclf explain: cannot use {p.source}: {p.error}", file=sys.stderr)
    for p in results:
        if p.ok:
            print(f"{p.source}\t{p.label}\t{p.probability:.4f}")
    print(f"written: {picture}")
    return 1 if failed else 0
