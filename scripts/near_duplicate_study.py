"""Measure how well a perceptual-hash distance separates copies from distinct images (sets NEAR_DUPLICATE_BITS).

For every pair of images with different MD5s whose ``imagehash.phash`` values differ by at most ``--max-bits``,
the pair is called a *copy* when the two pictures, in grey at 57 px, differ by less than ``--copy-mad`` grey levels
(mean absolute difference) at the best of the shifts up to ±3 px (±12 px at 227 px): re-encoded and slightly
shifted crops pass, distinct crops (typically 20-30 levels apart) do not. Prints, per distance, how many pairs are
copies, and per candidate threshold the merge precision, the union-find group sizes and cross-class merges.
``--montage DIR`` writes side-by-side examples per distance for a visual check.

    python scripts/near_duplicate_study.py --data ../shared/data/concrete_crack
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from crackclf.data.cache import build_cache  # noqa: E402
from crackclf.data.inventory import near_duplicate_pairs, phash_array, scan  # noqa: E402
from crackclf.data.split import group_records  # noqa: E402

THUMB, SHIFT = 57, 3


def aligned_difference(gray: np.ndarray, pairs: np.ndarray, block: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Per pair: mean absolute grey difference unshifted, and the smallest over shifts up to ±SHIFT pixels."""
    best = np.full(len(pairs), np.inf, dtype=np.float32)
    plain = np.zeros(len(pairs), dtype=np.float32)
    size = gray.shape[1]
    for start in range(0, len(pairs), block):
        chunk = pairs[start : start + block]
        a, b = gray[chunk[:, 0]], gray[chunk[:, 1]]
        plain[start : start + block] = np.abs(a - b).mean((1, 2))
        for dy in range(-SHIFT, SHIFT + 1):
            for dx in range(-SHIFT, SHIFT + 1):
                sa = a[:, max(0, dy) : size + min(0, dy), max(0, dx) : size + min(0, dx)]
                sb = b[:, max(0, -dy) : size + min(0, -dy), max(0, -dx) : size + min(0, -dx)]
                np.minimum(best[start : start + block], np.abs(sa - sb).mean((1, 2)), out=best[start : start + block])
    return plain, best


def montage(root: Path, records, pairs, distances, best, out_dir: Path, per_distance: int = 4) -> None:
    """Side-by-side pairs per distance: the closest (copies) and typical (median) ones."""
    from PIL import Image

    out_dir.mkdir(parents=True, exist_ok=True)
    for bits in sorted(set(distances.tolist())):
        index = np.nonzero(distances == bits)[0]
        order = index[np.argsort(best[index])]
        picks = list(order[: per_distance // 2]) + list(order[len(order) // 2 : len(order) // 2 + per_distance // 2])
        canvas = Image.new("RGB", (2 * 114 + 10, len(picks) * 118), "white")
        for row, pick in enumerate(picks):
            for column, item in enumerate(pairs[pick]):
                with Image.open(root / records[item].path) as image:
                    canvas.paste(image.convert("RGB").resize((114, 114)), (column * 124, row * 118))
        canvas.save(out_dir / f"pairs_{bits:02d}bits.png")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "concrete_crack")
    parser.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("CRACKCLF_CACHE",
                                                                               REPO / ".cache" / "crackclf")))
    parser.add_argument("--max-bits", type=int, default=12)
    parser.add_argument("--copy-mad", type=float, default=5.0, help="grey levels below which a pair is a copy")
    parser.add_argument("--montage", type=Path, default=None, help="write example pairs per distance here")
    args = parser.parse_args()

    inventory = scan(args.data, ("Negative", "Positive"), args.cache_dir)
    records = inventory.readable
    thumbs = build_cache(args.data, [r.path for r in records], [r.md5 for r in records], THUMB, args.cache_dir)
    gray = np.asarray(thumbs, dtype=np.float32).mean(-1)
    hashes = phash_array(records)
    md5 = np.array([r.md5 for r in records])
    labels = np.array([r.label for r in records])
    pairs = near_duplicate_pairs(hashes, args.max_bits)
    pairs = pairs[md5[pairs[:, 0]] != md5[pairs[:, 1]]]
    distances = np.bitwise_count(hashes[pairs[:, 0]] ^ hashes[pairs[:, 1]])
    plain, best = aligned_difference(gray, pairs)
    copy = best < args.copy_mad
    cross = labels[pairs[:, 0]] != labels[pairs[:, 1]]

    print(f"{len(records)} images; {len(pairs)} pairs with different MD5 within {args.max_bits} bits")
    print("\nbits  pairs  copies  copies_unshifted  cross_class")
    for bits in sorted(set(distances.tolist())):
        at = distances == bits
        print(f"{bits:4d} {at.sum():6d} {(copy & at).sum():7d} {(copy & at & (plain < args.copy_mad)).sum():17d} "
              f"{(cross & at).sum():12d}")
    copies_total = int(copy.sum())
    print(f"\nthreshold  merge_precision  copies_found(of {copies_total} within {args.max_bits} bits)  groups  "
          "largest_group(class)  cross_class_pairs")
    for threshold in range(0, args.max_bits + 1, 2):
        within = distances <= threshold
        assignment = group_records(records, threshold, shift_bits=None)  # the perceptual hash alone
        groups = Counter(assignment)
        largest_id, largest = groups.most_common(1)[0]
        members = [labels[i] for i, g in enumerate(assignment) if g == largest_id]
        print(f"{threshold:9d} {copy[within].sum() / max(1, within.sum()):16.1%} {copy[within].sum():13d} "
              f"({copy[within].sum() / max(1, copies_total):.1%}) {len(groups):7d} {largest:8d} "
              f"{dict(Counter(int(m) for m in members))}  {int((cross & within).sum()):8d}")
    if args.montage:
        montage(args.data, records, pairs, distances, best, args.montage)
        print(f"\nexample pairs written to {args.montage}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
