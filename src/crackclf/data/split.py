"""Leakage-free, stratified, seeded train/val/test split, persisted as a CSV.

Exact copies (same MD5) and near-copies (perceptual hash within a threshold) are joined into groups with a
union-find; a group never straddles two splits. Groups are assigned per class in a seeded order until each split
holds its share of that class's images, so the split is stratified and byte-for-byte reproducible.
"""

from __future__ import annotations

import csv
import io
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from crackclf.data.inventory import NEAR_DUPLICATE_BITS, FileRecord, near_duplicate_pairs, phash_array
from crackclf.data.shifted import SHIFTED_DUPLICATE_BITS, shifted_pairs
from crackclf.errors import UsageError
from crackclf.utils import TEXT_ERRORS, atomic_write_text, stable_hash

SPLITS = ("train", "val", "test")
SPLIT_COLUMNS = ("path", "label", "group", "split", "md5")


@dataclass(frozen=True)
class SplitRow:
    """One image of a split: its path, label, duplicate group, split and MD5; ``source``: the data source's name in
    a multi-source run (``data.sources``), empty otherwise."""

    path: str
    label: int
    group: int
    split: str
    md5: str
    source: str = ""


@dataclass
class SplitSummary:
    """What grouping did: how many images were merged into multi-image groups, and how big the groups are."""

    images: int
    groups: int
    merged_groups: int
    merged_images: int
    counts: dict[str, dict[int, int]]
    group_sizes: dict[int, int] = field(default_factory=dict)  # group size -> number of groups of that size

    @property
    def largest_group(self) -> int:
        return max(self.group_sizes, default=0)

    def describe(self) -> str:
        parts = [f"{s}: " + ", ".join(f"class {k}={v}" for k, v in sorted(c.items())) for s, c in self.counts.items()]
        sizes = ", ".join(f"{size}: {count}" for size, count in sorted(self.group_sizes.items()))
        return (
            f"{self.images} images in {self.groups} groups; {self.merged_groups} groups merge "
            f"{self.merged_images} duplicate/near-duplicate images (largest group {self.largest_group}). "
            + "; ".join(parts) + f". Group sizes (size: groups): {sizes}"
        )


def summarize(rows: list[SplitRow]) -> SplitSummary:
    """Counts per split and class, and the group-size distribution, of a split (computed or read from a CSV)."""
    sizes = Counter(row.group for row in rows if row.group >= 0)
    ungrouped = sum(1 for row in rows if row.group < 0)  # e.g. a separate test folder: each image its own group
    group_sizes = Counter(sizes.values())
    if ungrouped:
        group_sizes[1] += ungrouped
    multi = [size for size in sizes.values() if size > 1]
    counts = {s: dict(sorted(Counter(r.label for r in rows if r.split == s).items())) for s in SPLITS}
    return SplitSummary(len(rows), len(sizes) + ungrouped, len(multi), sum(multi), counts,
                        dict(sorted(group_sizes.items())))


class _UnionFind:
    def __init__(self, size: int) -> None:
        self.parent = list(range(size))

    def find(self, item: int) -> int:
        while self.parent[item] != item:
            self.parent[item] = self.parent[self.parent[item]]
            item = self.parent[item]
        return item

    def union(self, a: int, b: int) -> None:
        root_a, root_b = self.find(a), self.find(b)
        if root_a != root_b:
            self.parent[max(root_a, root_b)] = min(root_a, root_b)


def group_records(records: list[FileRecord], near_bits: int | None = NEAR_DUPLICATE_BITS,
                  parents: dict[str, str] | None = None,
                  shift_bits: int | None = SHIFTED_DUPLICATE_BITS) -> list[int]:
    """Group index per record: exact duplicates always; near-duplicates when ``near_bits`` is not None, and then
    also shifted copies of the same label (:mod:`crackclf.data.shifted`) when ``shift_bits`` is not None and every
    record has its keys; the tiles of one parent photo when ``parents`` (record path → parent, from a
    ``MANIFEST.csv``) is given."""
    union = _UnionFind(len(records))
    first_by_key: dict[str, int] = {}
    for index, record in enumerate(records):
        keys = [f"md5:{record.md5}"]
        if parents and parents.get(record.path):
            keys.append(f"parent:{parents[record.path]}")
        for key in keys:
            if key in first_by_key:
                union.union(first_by_key[key], index)
            else:
                first_by_key[key] = index
    if near_bits is not None and records:
        for i, j in near_duplicate_pairs(phash_array(records), near_bits):
            union.union(int(i), int(j))
        if shift_bits is not None and all(record.shift is not None for record in records):
            keys = np.stack([record.shift for record in records])
            for i, j in shifted_pairs(keys, shift_bits, np.array([record.label for record in records])):
                union.union(int(i), int(j))
    roots = [union.find(i) for i in range(len(records))]
    # Number groups by first appearance so ids do not depend on union order.
    ids: dict[int, int] = {}
    return [ids.setdefault(root, len(ids)) for root in roots]


def make_split(
    records: list[FileRecord],
    val_fraction: float,
    test_fraction: float,
    seed: int,
    near_bits: int | None = NEAR_DUPLICATE_BITS,
    parents: dict[str, str] | None = None,
    shift_bits: int | None = SHIFTED_DUPLICATE_BITS,
) -> tuple[list[SplitRow], SplitSummary]:
    """Assign every record to train/val/test; groups stay whole, each class is split in the same proportions.

    ``parents``: record path → parent photo (``MANIFEST.csv``); the tiles of one photo then form one group too.
    ``shift_bits``: match distance of shifted copies (:func:`group_records`; ``None``: not searched).
    """
    records = sorted(records, key=lambda r: r.path)
    groups = group_records(records, near_bits, parents, shift_bits)
    members: dict[int, list[int]] = defaultdict(list)
    for index, group in enumerate(groups):
        members[group].append(index)
    # A group's class is its majority label (conflicting groups are reported by verify, not silently split).
    group_label = {g: Counter(records[i].label for i in idx).most_common(1)[0][0] for g, idx in members.items()}
    rng = random.Random(seed)
    assignment: dict[int, str] = {}
    for label in sorted(set(group_label.values())):
        class_groups = sorted(g for g, lab in group_label.items() if lab == label)
        rng.shuffle(class_groups)
        total = sum(len(members[g]) for g in class_groups)
        targets = {"test": round(total * test_fraction), "val": round(total * val_fraction)}
        filled = {"test": 0, "val": 0}
        for group in class_groups:
            size = len(members[group])
            # Fill test, then val, each up to its target; everything else trains.
            split = next((s for s in ("test", "val") if filled[s] + size / 2 <= targets[s]), "train")
            if split != "train":
                filled[split] += size
            assignment[group] = split
    rows = [
        SplitRow(r.path, r.label, groups[i], assignment[groups[i]], r.md5) for i, r in enumerate(records)
    ]
    return rows, summarize(rows)


def split_key(records: list[FileRecord], val_fraction: float, test_fraction: float, seed: int, near_bits,
              parents: dict[str, str] | None = None, shift_bits: int | None = SHIFTED_DUPLICATE_BITS) -> str:
    """Key of a split: the data's content plus every parameter that changes the assignment."""
    content = [(r.path, r.label, r.md5, r.phash) for r in sorted(records, key=lambda r: r.path)]
    key = {"content": content, "val": val_fraction, "test": test_fraction, "seed": seed, "near_bits": near_bits,
           "version": 1}
    if near_bits is not None and shift_bits is not None:  # splits made before the shifted matcher keep their key
        key["shift_bits"] = shift_bits
    if parents:  # only then: the key of a folder without a manifest stays what it was (its cached split is reused)
        key["parents"] = sorted(parents.items())
    return stable_hash(key)


def write_split(path: Path, rows: list[SplitRow]) -> Path:
    """Write the split CSV atomically (so concurrent sweep jobs never read half a file)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    sourced = any(row.source for row in rows)  # the source column only in multi-source splits
    writer.writerow(SPLIT_COLUMNS + (("source",) if sourced else ()))
    for row in rows:
        writer.writerow([row.path, row.label, row.group, row.split, row.md5] + ([row.source] if sourced else []))
    return atomic_write_text(path, buffer.getvalue())


def read_split(path: Path) -> list[SplitRow]:
    """Read a split CSV, checking its columns and split names."""
    with open(path, newline="", encoding="utf-8", errors=TEXT_ERRORS) as handle:
        reader = csv.DictReader(handle)
        missing = {"path", "label", "split"} - set(reader.fieldnames or [])
        if missing:
            raise UsageError(f"split file {path} lacks column(s) {sorted(missing)}; expected {list(SPLIT_COLUMNS)}")
        rows = []
        for line, row in enumerate(reader, start=2):
            if row["split"] not in SPLITS:
                raise UsageError(f"split file {path}, line {line}: split {row['split']!r} is not one of {SPLITS}")
            rows.append(SplitRow(row["path"], int(row["label"]), int(row.get("group") or -1), row["split"],
                                 row.get("md5", ""), row.get("source") or ""))
    return rows


def align_split(rows: list[SplitRow], readable: list[FileRecord]) -> tuple[list[SplitRow], list[str]]:
    """Keep the rows of a supplied split CSV that are readable images of the inventory, with their MD5 filled in.

    Returns the kept rows and the paths dropped (not found, or unreadable), so the caller can name them.
    """
    by_path = {record.path: record for record in readable}
    kept, dropped = [], []
    for row in rows:
        record = by_path.get(row.path)
        if record is None:
            dropped.append(row.path)
        else:
            kept.append(SplitRow(row.path, row.label, row.group, row.split, record.md5))
    return kept, dropped


def drop_test_overlap(
    rows: list[SplitRow], readable: list[FileRecord], test_records: list[FileRecord], near_bits: int | None
) -> tuple[list[SplitRow], int]:
    """Remove train/val rows that are exact (MD5) or near (perceptual hash) copies of a separate test folder's images.

    Returns the remaining rows and how many were removed; a copy of a test image in training would leak.
    """
    test_md5 = {record.md5 for record in test_records}
    leaking = {row.path for row in rows if row.md5 in test_md5}
    if near_bits is not None and test_records:
        by_path = {record.path: record for record in readable}
        candidates = [by_path[row.path] for row in rows if row.path in by_path]
        hashes = phash_array(candidates + list(test_records))
        for i, j in near_duplicate_pairs(hashes, near_bits):
            if i < len(candidates) <= j:  # one side in train/val, the other in the test folder
                leaking.add(candidates[i].path)
    return [row for row in rows if row.path not in leaking], len(leaking)


def straddling_groups(rows: list[SplitRow], readable: list[FileRecord], near_bits: int | None) -> int:
    """How many duplicate groups (exact, and near within ``near_bits``) a given split puts in more than one split."""
    by_path = {record.path: record for record in readable}
    present = [row for row in rows if row.path in by_path]
    groups = group_records([by_path[row.path] for row in present], near_bits)
    splits_of: dict[int, set[str]] = defaultdict(set)
    for group, row in zip(groups, present, strict=True):
        splits_of[group].add(row.split)
    return sum(1 for splits in splits_of.values() if len(splits) > 1)
