"""Train a recipe from a cold start (cache build included) and report wall time and accuracy, as JSON + a table.

    python scripts/bench_recipe.py --data ../shared/data/concrete_crack [--runs 3] [--] [extra overrides]

Each run uses a fresh cache folder and a fresh MLflow store, so nothing is reused between runs; the figures are read
back from the run's MLflow record. With several runs the median of each figure is printed too.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from _bench import append_jsonl, environment

REPO = Path(__file__).resolve().parents[1]
FIELDS = ("wall_s", "epochs", "best_val_acc", "test_acc", "test_f1", "test_auroc", "train_val_gap")


def with_recipe(overrides: list[str]) -> list[str]:
    """The shipped recipe (what `make train` runs) unless the overrides choose another experiment."""
    chosen = any(o.split("=", 1)[0].lstrip("+~") == "experiment" for o in overrides)
    return overrides if chosen else ["experiment=cpu_fast", *overrides]


def run_once(data: Path, overrides: list[str], work: Path, cache_dir: Path | None = None) -> dict:
    uri = f"sqlite:///{work / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "CRACKCLF_CACHE": str(cache_dir or work / "cache")}
    command = [sys.executable, str(REPO / "train.py"), f"data.root={data}", f"hydra.run.dir={work / 'run'}",
               *with_recipe(overrides)]  # progress bars on: the run as `make train` runs it
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"training failed ({result.returncode}):\n{result.stderr[-4000:]}")
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("crack")
    run = client.search_runs([experiment.experiment_id])[0]  # a fresh store holds exactly this run
    metrics = run.data.metrics
    val_history = client.get_metric_history(run.info.run_id, "val/acc")
    train_history = client.get_metric_history(run.info.run_id, "train/acc")  # one point per trained epoch
    # Planned by the time budget when it is on (a fraction when its last epoch is cut), else trainer.max_epochs.
    planned = float(metrics.get("budget/planned_epochs") or run.data.params.get("trainer.max_epochs") or 0)
    return {
        "wall_s": round(wall, 1),
        "epochs": len(train_history),
        "best_val_acc": max(m.value for m in val_history),
        "test_acc": metrics.get("test/acc"),
        "test_f1": metrics.get("test/f1"),
        "test_auroc": metrics.get("test/auroc"),
        "train_val_gap": metrics.get("train_val_gap"),  # unaugmented train sample - val
        "planned_epochs": planned,
        # Fewer epochs than planned: early stopping (or the budget shortened the plan).
        "early_stopped": len(train_history) < math.ceil(round(planned, 6)),
        "run_id": run.info.run_id,
        **environment(),
        "cold_cache": cache_dir is None,
        "overrides": overrides,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "concrete_crack")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "recipe.jsonl")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="reuse this data cache (warm start) instead of a fresh one per run (cold start)")
    parser.add_argument("--keep", type=Path, default=None,
                        help="keep each run's folder and MLflow store under this folder (default: deleted); its "
                             "data cache is deleted all the same (~0.9 GB a run at 30,000 images) unless --keep-cache")
    parser.add_argument("--keep-cache", action="store_true", help="with --keep, keep each run's data cache too")
    parser.add_argument("overrides", nargs="*", help="extra train.py overrides (default recipe when empty)")
    args = parser.parse_args()
    if not (args.data / "Positive").is_dir():
        raise SystemExit(f"--data {args.data}: no Positive/ folder there; point it at the concrete crack data set")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results = []
    for index in range(args.runs):
        if args.keep:  # the run folder (checkpoints, config) and its MLflow store stay for a closer look
            work = args.keep.resolve() / f"run-{time.strftime('%Y%m%d-%H%M%S')}-{index + 1}"
            work.mkdir(parents=True)
            result = run_once(args.data.resolve(), args.overrides, work, args.cache_dir)
            if not args.keep_cache and args.cache_dir is None:  # rebuilt in a minute; kept, a few runs fill a disk
                shutil.rmtree(work / "cache", ignore_errors=True)
        else:
            with tempfile.TemporaryDirectory(prefix="crackclf-bench-") as tmp:
                result = run_once(args.data.resolve(), args.overrides, Path(tmp), args.cache_dir)
        results.append(result)
        line = json.dumps(result)
        print(line, flush=True)
        append_jsonl(args.out, result)
        print(f"run {index + 1}/{args.runs}: " + "  ".join(f"{k}={result[k]}" for k in FIELDS), flush=True)
    if len(results) > 1:
        median = {k: statistics.median(r[k] for r in results if r[k] is not None) for k in FIELDS}
        print(json.dumps({"median": median, "runs": len(results)}))
    header = "| run | " + " | ".join(FIELDS) + " |"
    machine = environment()
    print(f"\nCPU: {machine['cpu']}, {machine['cores']} cores")
    print(header + "\n|" + "---|" * (len(FIELDS) + 1))
    for index, result in enumerate(results, 1):
        print(f"| {index} | " + " | ".join(str(result[k]) for k in FIELDS) + " |")


if __name__ == "__main__":
    main()
