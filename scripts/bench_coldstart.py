"""Where a training run's cold start goes: the data preparation phases from an empty cache, timed one by one.

    python scripts/bench_coldstart.py --data ../shared/data/concrete_crack [--image-size 96]

Times, in this process and with a fresh cache folder: the heavy imports, the inventory scan (MD5, one draft decode,
perceptual and window hashes and the pixels at the image size, of every file), the verify report (near-duplicate
search included), the split and the image caches (gathered from the scan's pixels, as a run does). What a real run
adds around them (MLflow's run start, the second DDP process, the first batch) is in the run's own log (`train.log`
of `make train`): docs/recipe.md puts the two together.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _bench import environment, write_json

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "concrete_crack")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "coldstart.json")
    args = parser.parse_args()
    if not (args.data / "Positive").is_dir():
        raise SystemExit(f"--data {args.data}: no Positive/ folder there; point it at the concrete crack data set")

    phases: dict[str, float] = {}
    started = time.perf_counter()
    import mlflow  # noqa: F401 - the imports a training process pays for
    import pytorch_lightning  # noqa: F401
    import timm  # noqa: F401
    import torch  # noqa: F401

    phases["imports (torch, Lightning, timm, MLflow)"] = time.perf_counter() - started

    from crackclf.data import inventory as inv
    from crackclf.data.cache import DecodedImages, build_cache
    from crackclf.data.split import make_split

    class_dirs, class_names = ("Negative", "Positive"), ("no_crack", "crack")
    with tempfile.TemporaryDirectory(prefix="crackclf-coldstart-") as cache:
        clock = time.perf_counter()
        inventory = inv.scan(args.data, class_dirs, Path(cache), progress=False, decode_size=args.image_size)
        phases[f"inventory scan (MD5, draft decode, hashes, pixels at {args.image_size} px)"] = \
            time.perf_counter() - clock
        clock = time.perf_counter()
        inv.verify_report(inventory, class_names)
        phases["verify report (near-duplicate search included)"] = time.perf_counter() - clock
        clock = time.perf_counter()
        rows, _ = make_split(inventory.readable, 0.15, 0.15, 42)
        phases["split (groups of copies kept whole)"] = time.perf_counter() - clock
        clock = time.perf_counter()
        decoded = [DecodedImages.of(args.data, inventory.records, inventory.decoded, args.image_size)]
        for split in ("train", "val", "test"):
            chosen = [r for r in rows if r.split == split]
            build_cache(args.data, [r.path for r in chosen], [r.md5 for r in chosen], args.image_size, Path(cache),
                        progress=False, decoded=decoded)
        phases[f"image caches at {args.image_size} px (gathered from the scan's pixels)"] = time.perf_counter() - clock
    result = {**environment(), "images": len(inventory.records),
              "seconds": {name: round(value, 2) for name, value in phases.items()},
              "total_s": round(sum(phases.values()), 2)}
    write_json(args.out, result)
    print(f"{result['images']:,} images, CPU: {result['cpu']}, {result['cores']} cores\n")
    print("| phase | seconds |\n| --- | ---: |")
    for name, value in result["seconds"].items():
        print(f"| {name} | {value:.1f} |")
    print(f"| **total** | **{result['total_s']:.1f}** |")


if __name__ == "__main__":
    main()
