"""How a model does on surfaces it never trained on: one row per labelled folder (balanced accuracy, AUROC, crack
recall and false-alarm rate at the model's stored threshold), beside its own data set's test split.

    .venv/bin/python scripts/bench_transfer.py --model <best.ckpt | runs:/id | .onnx> [--model ...] \
        --surfaces ../shared/data/other_surfaces/concrete ../shared/data/other_surfaces/ceramic_tile \
        [--split <the run's data/split-*.csv> --data ../shared/data/concrete_crack] [--out bench/transfer.json]

A folder holds one sub-folder per class: ``no_crack/ crack/`` or ``Negative/ Positive/`` (found by itself), or give
``--class-dirs NEG POS``. Other surfaces are imbalanced, so read balanced accuracy and AUROC, not accuracy. Every
image goes through the normal prediction path (the one image opener, then Predictor)."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np

from _bench import environment, write_json
from crackclf.data.download import CLASS_DIRS
from crackclf.data.split import read_split
from crackclf.inference.evaluate import labelled_files
from crackclf.inference.predictor import Predictor
from crackclf.metrics import binary_metrics
from crackclf.utils import cpu_model

#: The names other labelled sets use (``other_surfaces``), then Özgenel's (the data module's default).
KNOWN_CLASS_DIRS = (("no_crack", "crack"), CLASS_DIRS)


def class_dirs_of(folder: Path, given: list[str] | None) -> tuple[str, str]:
    if given:
        return given[0], given[1]
    for pair in KNOWN_CLASS_DIRS:
        if all((folder / name).is_dir() for name in pair):
            return pair
    raise SystemExit(f"{folder}: no {' or '.join('/'.join(p) for p in KNOWN_CLASS_DIRS)} sub-folders; "
                     "pass --class-dirs NEG POS")


def score(predictor: Predictor, files: list[tuple[Path, int]]) -> dict[str, float]:
    """The metrics of ``files`` at the model's threshold (unreadable files are counted, not scored)."""
    predictions = list(predictor.predict_sources([path for path, _ in files], total=len(files)))
    good = [(p.probability, label) for p, (_, label) in zip(predictions, files, strict=True) if p.ok]
    probabilities = np.array([p for p, _ in good], dtype=np.float32)
    labels = np.array([y for _, y in good], dtype=np.int64)
    metrics, confusion = binary_metrics(probabilities, labels, predictor.threshold)
    negatives = confusion[0].sum()
    metrics["false_alarm_rate"] = float(confusion[0, 1] / negatives) if negatives else math.nan
    metrics["cracks"] = float(labels.sum())
    metrics["unreadable"] = float(len(predictions) - len(good))
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, help="a .ckpt, .onnx, runs:/<id> or models:/…"
                        " (repeat to compare models)")
    parser.add_argument("--surfaces", type=Path, nargs="+", default=[], help="labelled folders of other surfaces")
    parser.add_argument("--class-dirs", nargs=2, default=None, metavar=("NEG", "POS"))
    parser.add_argument("--split", type=Path, default=None, help="the model's split CSV: adds its test rows")
    parser.add_argument("--data", type=Path, default=None, help="the data root the split's paths are relative to")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    if bool(args.split) != bool(args.data):
        raise SystemExit("--split and --data go together (the split's paths are relative to --data)")
    sets: dict[str, list[tuple[Path, int]]] = {}
    if args.split:
        sets[f"{args.data.name} (test split)"] = [(args.data / r.path, r.label) for r in read_split(args.split)
                                                  if r.split == "test"]
    for folder in args.surfaces:
        sets[folder.name] = labelled_files(folder, class_dirs_of(folder, args.class_dirs))
    if not sets:
        raise SystemExit("nothing to score: give --surfaces and/or --split with --data")
    results = []
    print(f"CPU: {cpu_model()}")
    for model in args.model:
        predictor = Predictor.load(model)
        print(f"\nmodel {model} (threshold {predictor.threshold:.3f}, {predictor.info.backbone}, "
              f"{predictor.info.image_size} px, pretrained: {predictor.info.pretrained_status})")
        print(f"  {'set':<28} {'images':>6} {'cracks':>6} {'acc':>7} {'bal.acc':>7} {'AUROC':>6} {'recall':>7} "
              f"{'false+':>7}")
        for name, files in sets.items():
            started = time.perf_counter()
            m = score(predictor, files)
            print(f"  {name:<28} {int(m['images']):>6} {int(m['cracks']):>6} {m['acc']:>7.2%} "
                  f"{m['balanced_acc']:>7.2%} {m['auroc']:>6.3f} {m['recall']:>7.2%} {m['false_alarm_rate']:>7.2%}")
            results.append({"model": model, "set": name, "seconds": time.perf_counter() - started, **m})
    if args.out:
        write_json(args.out, {**environment(), "results": results})


if __name__ == "__main__":
    main()
