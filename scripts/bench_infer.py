"""Inference benchmark: eager PyTorch vs ONNX Runtime (batch 1 and 32), and ``predict`` end to end on a folder vs
the bare JPEG decode+resize rate of the same files (the ceiling), in one run.

    make bench-infer                                   # default backbone, untrained weights, 10k shared images
    .venv/bin/python scripts/bench_infer.py --model runs:/<id> --data ../shared/data/concrete_crack --images 10000

Throughput does not depend on the weights, so without ``--model`` an untrained bundle of the default recipe's
backbone and image size (composed from conf/ as ``python train.py`` does) is measured. Every rate is images/s.
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from _bench import alternate_rounds, environment, write_json
from crackclf.bundle import BundleInfo, LoadedModel, build_network, load_model
from crackclf.config import compose_config
from crackclf.data.images import list_image_files, load_resized
from crackclf.inference.predictor import Predictor
from crackclf.models.backbone import IMAGENET_MEAN, IMAGENET_STD
from crackclf.utils import describe_device, keep_freed_memory, repo_root, worker_count


def default_model() -> LoadedModel:
    """An untrained bundle of the default recipe's backbone and image size (composed from conf/, as train.py)."""
    cfg = compose_config()
    backbone, size = str(cfg.backbone.name), int(cfg.data.image_size)
    info = BundleInfo(backbone, size, IMAGENET_MEAN, IMAGENET_STD, tile_size=227)
    return LoadedModel(info, f"untrained:{backbone}@{size}px", network=build_network(info).eval())


def rate(call, images_per_call: int, min_seconds: float = 3.0, warmup: int = 3) -> float:
    """Images/s of ``call`` repeated for at least ``min_seconds`` after ``warmup`` calls."""
    for _ in range(warmup):
        call()
    calls, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < min_seconds or calls < 5:
        call()
        calls += 1
    return calls * images_per_call / elapsed


def list_images(folder: Path, count: int) -> list[str]:
    files = list_image_files(folder, folders=False)
    step = max(1, len(files) // count)  # spread over the class folders
    return files[::step][:count]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a model source (default: untrained default backbone)")
    parser.add_argument("--data", type=Path, default=repo_root().parent / "shared" / "data" / "concrete_crack")
    parser.add_argument("--images", type=int, default=10_000, help="files for the end-to-end comparison")
    parser.add_argument("--seconds", type=float, default=3.0, help="minimum time per model measurement")
    parser.add_argument("--threads", type=int, default=None,
                        help="Predictor threads= (ONNX Runtime: parallel shards of a batch; PyTorch: torch threads; "
                             "default: the usable cores for ONNX Runtime, PyTorch as it is)")
    parser.add_argument("--device", default="cpu",
                        help="where eager PyTorch runs: cpu (default), cuda, cuda:N, auto (ONNX Runtime stays on CPU)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="alternating eager/ONNX Runtime rounds per batch size; medians are reported (default 5)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32], help="batch sizes to time (default 1 32)")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    keep_freed_memory()  # as the crackclf command does

    model = load_model(args.model) if args.model else default_model()
    size = model.info.image_size
    results: dict = {**environment(), "model": model.model_id, "backbone": model.info.backbone, "image_size": size,
                     "model_threads": args.threads or "default"}
    eager = Predictor(model, backend="torch", threads=args.threads, device=args.device)
    onnx = Predictor(model, backend="onnx", threads=args.threads)
    results["eager_device"] = describe_device(eager.device)
    print(f"model {model.model_id} ({model.info.backbone}, {size} px), {worker_count()} usable cores, eager PyTorch "
          f"on {results['eager_device']}")

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (max(args.batches), size, size, 3), dtype=np.uint8)
    results["repeats"] = args.repeats
    for batch in args.batches:
        images = pixels[:batch]
        measure = {name: (lambda p=predictor, x=images, n=batch: rate(lambda: p.predict_arrays(x), n, args.seconds))
                   for name, predictor in (("eager", eager), ("onnxruntime", onnx))}
        rates = alternate_rounds(measure, args.repeats)  # eager, ONNX Runtime, eager, ...: a slow spell hits both
        for name, values in rates.items():
            results[f"{name}_batch{batch}"] = round(statistics.median(values), 1)
        ratios = [o / e for o, e in zip(rates["onnxruntime"], rates["eager"], strict=True)]
        speedup = statistics.median(ratios)
        results[f"onnx_speedup_batch{batch}"] = round(speedup, 2)
        results[f"onnx_speedup_batch{batch}_range"] = [round(min(ratios), 2), round(max(ratios), 2)]
        print(f"batch {batch:>3}: eager {results[f'eager_batch{batch}']:>8.1f} img/s   onnxruntime "
              f"{results[f'onnxruntime_batch{batch}']:>8.1f} img/s   ({speedup:.2f}x, median of {args.repeats} "
              f"alternating rounds; range {min(ratios):.2f}-{max(ratios):.2f}x)")

    files = list_images(args.data, args.images)
    if not files:
        raise SystemExit(f"no images under {args.data}; pass --data <folder>")
    for path in files:  # read every file once so that no measurement pays for the first disk read
        with open(path, "rb") as stream:
            stream.read()
    results["files"] = len(files)
    results["torch_threads"] = torch.get_num_threads()
    with ThreadPoolExecutor(worker_count()) as pool:
        started = time.perf_counter()
        for _ in pool.map(lambda f: load_resized(f, size), files, chunksize=64):
            pass
        results["bare_decode_resize"] = round(len(files) / (time.perf_counter() - started), 1)
    print(f"bare decode+resize ({worker_count()} threads, {len(files)} files): "
          f"{results['bare_decode_resize']:.1f} img/s")
    for name, backend in (("predict_torch", "torch"), ("predict_onnx", "onnx")):
        predictor = eager if backend == "torch" else onnx
        started = time.perf_counter()
        count = sum(1 for p in predictor.predict_sources(files) if p.ok)
        value = count / (time.perf_counter() - started)
        results[name] = round(value, 1)
        results[f"{name}_vs_decode"] = round(value / results["bare_decode_resize"], 3)
        print(f"predict end to end, {backend:>5} backend: {value:.1f} img/s = "
              f"{results[f'{name}_vs_decode']:.2f} x the bare decode rate")
    if args.out:
        write_json(args.out, results)
        print(f"written: {args.out}")


if __name__ == "__main__":
    main()
