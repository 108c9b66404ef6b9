"""The adaptation curve: how a model does on a new surface after `make adapt` with 0 / 10 / 25 / 50 labelled tiles
per class, scored on other photos of that surface.

    .venv/bin/python scripts/bench_adapt.py --model <best.ckpt | runs:/id> \
        --surfaces ../shared/data/other_surfaces/concrete ../shared/data/other_surfaces/ceramic_tile \
        [--tiles 0 10 25 50] [--replay ../shared/data/concrete_crack] [--out bench/adapt.json]

A surface folder holds its class folders and a ``MANIFEST.csv`` with ``relpath`` and ``parent`` (the photo each
tile was cut from). Its photos are split once, by a seeded draw, into an evaluation half and a pool; for each level
the labelled tiles are whole photos drawn from the pool until the level is reached for both classes (or the pool
runs out: the counts used are reported), so no photo is both trained on and scored. Each level is one real
`python train.py experiment=adapt init_from=<model> adapt.data=<the drawn tiles>` in a fresh MLflow store; the
adapted model is scored on the evaluation half at its own threshold, beside the start model (level 0).
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from mlflow.tracking import MlflowClient

from _bench import REPO, environment, write_json
from bench_transfer import class_dirs_of, score
from crackclf.inference.predictor import Predictor
from crackclf.utils import cpu_model


def photos_of(folder: Path, class_dirs: tuple[str, str]) -> dict[str, list[tuple[str, int]]]:
    """parent photo → its tiles (relative path, label 0/1), from the folder's MANIFEST.csv."""
    manifest = folder / "MANIFEST.csv"
    if not manifest.is_file():
        raise SystemExit(f"{folder}: no MANIFEST.csv with relpath and parent columns (the photo of each tile); the "
                         "curve must keep each photo on one side")
    photos: dict[str, list[tuple[str, int]]] = defaultdict(list)
    with open(manifest, newline="") as handle:
        for row in csv.DictReader(handle):
            top = Path(row["relpath"]).parts[0]
            if top in class_dirs:
                photos[row["parent"]].append((row["relpath"], class_dirs.index(top)))
    return dict(photos)


def draw(pool: list[str], photos: dict[str, list[tuple[str, int]]], per_class: int) -> list[str]:
    """Photos from ``pool`` (already in a random order) until both classes have ``per_class`` tiles."""
    chosen, counts = [], [0, 0]
    for photo in pool:
        if min(counts) >= per_class:
            break
        chosen.append(photo)
        for _, label in photos[photo]:
            counts[label] += 1
    return chosen


def link_folder(target: Path, source: Path, photos: dict[str, list[tuple[str, int]]], chosen: list[str]) -> None:
    """A labelled folder of symlinks to the chosen photos' tiles, with its own MANIFEST.csv (relpath, parent)."""
    target.mkdir(parents=True)
    with open(target / "MANIFEST.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["relpath", "parent"])
        for photo in chosen:
            for relpath, _ in photos[photo]:
                (target / relpath).parent.mkdir(parents=True, exist_ok=True)
                # Absolute: a relative --surfaces path would make links that resolve from the temporary folder.
                os.symlink((source / relpath).absolute(), target / relpath)
                writer.writerow([relpath, photo])


class AdaptationFailed(RuntimeError):
    """One level's `make adapt` run exited with an error (the curve goes on with the next level)."""


def adapt(model: str, data: Path, work: Path, replay: Path | None, extra: list[str]) -> tuple[Path, float, dict]:
    """One `make adapt` run; returns the adapted best.ckpt, the run's wall time and what the run logged on the
    original data's test share (``test/original/acc`` after, ``before/test/original/acc`` before; empty where
    absent)."""
    uri = f"sqlite:///{work / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    command = [sys.executable, str(REPO / "train.py"), "experiment=adapt", f"init_from={model}",
               f"adapt.data={data}", f"hydra.run.dir={work / 'run'}", *extra]
    if replay is not None:
        command.append(f"adapt.replay={replay}")
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise AdaptationFailed(f"adaptation failed ({result.returncode}): {' '.join(command)}\n"
                               f"{result.stderr[-4000:]}")
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    logged = runs[0].data.metrics if runs else {}
    original = {key.replace("/", "_"): logged[key] for key in ("test/original/acc", "before/test/original/acc")
                if key in logged}
    return work / "run" / "checkpoints" / "best.ckpt", wall, original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the model to adapt: a .ckpt, runs:/<id> or models:/…")
    parser.add_argument("--surfaces", type=Path, nargs="+", required=True)
    parser.add_argument("--tiles", type=int, nargs="+", default=[0, 10, 25, 50], help="labelled tiles per class")
    parser.add_argument("--replay", type=Path, default=None, help="the original data set (default: adapt.replay)")
    parser.add_argument("--seed", type=int, default=0, help="the draw of evaluation photos and labelled photos")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("overrides", nargs="*", help="extra train.py overrides for the adaptation runs")
    args = parser.parse_args()
    start = Predictor.load(args.model)
    rows, failures = [], 0
    print(f"CPU: {cpu_model()}\nmodel {args.model} (threshold {start.threshold:.3f})")
    print(f"  {'surface':<14} {'tiles/class':>11} {'photos':>6} {'used (neg/pos)':>14} {'bal.acc':>7} {'AUROC':>6} "
          f"{'recall':>7} {'false+':>7} {'adapt s':>7} {'original test':>13}")
    for surface in args.surfaces:
        class_dirs = class_dirs_of(surface, None)
        photos = photos_of(surface, class_dirs)
        order = sorted(photos)
        random.Random(args.seed).shuffle(order)
        evaluation, pool = order[: len(order) // 2], order[len(order) // 2:]
        scored = [(surface / relpath, label) for photo in evaluation for relpath, label in photos[photo]]
        for per_class in args.tiles:
            chosen = draw(pool, photos, per_class) if per_class else []
            used = [sum(1 for photo in chosen for _, label in photos[photo] if label == k) for k in (0, 1)]
            wall, original = 0.0, {}
            with tempfile.TemporaryDirectory(prefix="crackclf-adapt-") as tmp:
                predictor = start
                if chosen:
                    link_folder(Path(tmp) / "data", surface, photos, chosen)
                    try:
                        checkpoint, wall, original = adapt(args.model, Path(tmp) / "data", Path(tmp), args.replay,
                                                 args.overrides)
                    except AdaptationFailed as failure:  # the other levels' results are kept
                        print(failure, file=sys.stderr, flush=True)
                        failures += 1
                        rows.append({"surface": surface.name, "tiles_per_class": per_class, "photos": len(chosen),
                                     "error": str(failure).splitlines()[-1]})
                        continue
                    predictor = Predictor.load(checkpoint)
                metrics = score(predictor, scored)
            rows.append({"surface": surface.name, "tiles_per_class": per_class, "photos": len(chosen),
                         "used_negative": used[0], "used_positive": used[1], "adapt_seconds": wall,
                         "evaluation_photos": len(evaluation), **metrics, **original})
            print(f"  {surface.name:<14} {per_class:>11} {len(chosen):>6} {f'{used[0]}/{used[1]}':>14} "
                  f"{metrics['balanced_acc']:>7.2%} {metrics['auroc']:>6.3f} {metrics['recall']:>7.2%} "
                  f"{metrics['false_alarm_rate']:>7.2%} {wall:>7.1f} "
                  f"{format(original['test_original_acc'], '.2%') if original else '-':>13}", flush=True)
    if args.out:
        write_json(args.out, {**environment(), "model": args.model, "results": rows})
    if failures:
        raise SystemExit(f"{failures} adaptation run(s) failed (above); the other levels' results are kept")


if __name__ == "__main__":
    main()
