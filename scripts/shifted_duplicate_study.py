"""What the shifted-copy matcher (crackclf.data.shifted) adds to the split's grouping on a data set.

    python scripts/shifted_duplicate_study.py --data ../shared/data/concrete_crack [--cache-dir /tmp/study]

Prints, for MD5 + perceptual hash alone and with the matcher: groups, multi-image groups, the largest group and the
groups that mix labels; the grouping time of each; whether issue #17's shifted pairs are joined; and how many of the
new groups the former default split (seed 42, 0.15/0.15) put in more than one split. docs/data.md has the numbers.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path

from crackclf.data.inventory import NEAR_DUPLICATE_BITS, scan
from crackclf.data.shifted import SHIFTED_DUPLICATE_BITS
from crackclf.data.split import group_records, make_split

REPO = Path(__file__).resolve().parents[1]
#: The pairs issue #17 found crossing the default split (the same crack crop, cut twice).
ISSUE_PAIRS = [("Positive/00827.jpg", "Positive/06307.jpg"), ("Positive/01021.jpg", "Positive/06544.jpg"),
               ("Positive/01175.jpg", "Positive/06711.jpg"), ("Negative/10878.jpg", "Negative/16239.jpg")]


def _stats(groups: list[int], labels: list[int]) -> tuple[int, int, int, int]:
    members: dict[int, list[int]] = defaultdict(list)
    for index, group in enumerate(groups):
        members[group].append(index)
    multi = sum(1 for m in members.values() if len(m) > 1)
    mixed = sum(1 for m in members.values() if len({labels[i] for i in m}) > 1)
    return len(members), multi, max(len(m) for m in members.values()), mixed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "concrete_crack")
    parser.add_argument("--cache-dir", type=Path, default=REPO / ".cache" / "crackclf")
    parser.add_argument("--bits", type=int, default=SHIFTED_DUPLICATE_BITS)
    args = parser.parse_args()
    records = sorted(scan(args.data, ("Negative", "Positive"), args.cache_dir, progress=False).readable,
                     key=lambda r: r.path)
    labels = [r.label for r in records]
    started = time.perf_counter()
    before = group_records(records, NEAR_DUPLICATE_BITS, shift_bits=None)
    middle = time.perf_counter()
    after = group_records(records, NEAR_DUPLICATE_BITS, shift_bits=args.bits)
    ended = time.perf_counter()
    print("groups, multi-image groups, largest, mixed-label groups:")
    print(f"  MD5 + phash <= {NEAR_DUPLICATE_BITS}: {_stats(before, labels)}  ({middle - started:.2f} s)")
    print(f"  + shifted copies <= {args.bits} bits: {_stats(after, labels)}  ({ended - middle:.2f} s)")
    index = {r.path: i for i, r in enumerate(records)}
    for a, b in ISSUE_PAIRS:
        if a in index and b in index:
            print(f"  {a} & {b}: joined before {before[index[a]] == before[index[b]]}, "
                  f"after {after[index[a]] == after[index[b]]}")
    rows, _ = make_split(records, 0.15, 0.15, 42, NEAR_DUPLICATE_BITS, shift_bits=None)
    split_of = {row.path: row.split for row in rows}
    splits: dict[int, set[str]] = defaultdict(set)
    for i, group in enumerate(after):
        splits[group].add(split_of[records[i].path])
    print(f"new groups the former default split puts in more than one split: "
          f"{sum(1 for found in splits.values() if len(found) > 1)}")


if __name__ == "__main__":
    main()
