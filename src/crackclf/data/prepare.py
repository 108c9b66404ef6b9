"""Preparing the rows a run trains on, with no Lightning in sight: inventory → leakage-free split → subsample →
class-size check, returned as one frozen :class:`PreparedData`.

Pure in the sense that matters for testing and reuse: the result depends only on the files and the settings (the
inventory and split CSVs in ``cache_dir`` are caches of that result, not state).
"""

from __future__ import annotations

import logging
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from crackclf.data import inventory as inv
from crackclf.data.datasets import DataError
from crackclf.data.split import (
    SPLITS,
    SplitRow,
    SplitSummary,
    align_split,
    drop_test_overlap,
    make_split,
    read_split,
    split_key,
    straddling_groups,
    summarize,
    write_split,
)

__all__ = ["PreparedData", "SplitSettings", "prepare_rows", "subsample"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SplitSettings:
    """Everything besides the data folder that decides which rows a run gets and in which split."""

    class_dirs: tuple[str, str] = ("Negative", "Positive")
    class_names: tuple[str, str] = ("no_crack", "crack")
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    max_per_class: int | None = None
    seed: int = 42
    split_file: str | None = None
    test_root: Path | None = None
    cache_dir: Path = Path(".cache/crackclf")
    near_duplicate_bits: int | None = inv.NEAR_DUPLICATE_BITS
    min_per_class: int = 10
    progress: bool = True


@dataclass(frozen=True)
class PreparedData:
    """The rows of a run (absolute paths) and what was learnt while making them."""

    root: Path
    rows: tuple[SplitRow, ...]
    split_path: Path
    split_summary: SplitSummary
    verify_report: dict | None  #: ``None`` where it was not made (DDP ranks other than zero)

    def rows_of(self, split: str) -> list[SplitRow]:
        """The rows of one split, in their stored order."""
        return [r for r in self.rows if r.split == split]


def prepare_rows(root: Path, settings: SplitSettings, report: bool = True) -> PreparedData:
    """Scan ``root``, split it (or align a given split file), subsample and check the class sizes.

    ``report``: also make the verify report (its near-duplicate search is skipped by DDP ranks other than zero).

    Raises:
        DataError: a class has fewer than ``settings.min_per_class`` readable training images.
    """
    s = settings
    inventory = inv.scan(root, s.class_dirs, s.cache_dir, progress=s.progress)
    verify_report = inv.verify_report(inventory, s.class_names, s.near_duplicate_bits) if report else None
    for bad in inventory.unreadable:
        log.warning("excluded unreadable image %s/%s: %s", root, bad.path, bad.error)
    readable = inventory.readable
    if s.split_file:
        split_path = Path(s.split_file)
        rows, dropped = align_split(read_split(split_path), readable)
        if dropped:
            log.warning("%d row(s) of data.split_file=%s are not readable images under %s and are left out: %s",
                        len(dropped), split_path, root, ", ".join(dropped[:5]))
        leaking = straddling_groups(rows, readable, s.near_duplicate_bits)
        if leaking:
            log.warning("data.split_file=%s puts %d group(s) of duplicate images in more than one split: test "
                        "scores will be optimistic (`crackclf data split` writes a leakage-free one)",
                        split_path, leaking)
    else:
        test_fraction = 0.0 if s.test_root else s.test_fraction
        key = split_key(readable, s.val_fraction, test_fraction, s.seed, s.near_duplicate_bits)
        split_path = s.cache_dir / f"split-{key}.csv"
        if split_path.exists():
            rows = read_split(split_path)
        else:
            rows, _ = make_split(readable, s.val_fraction, test_fraction, s.seed, s.near_duplicate_bits)
            write_split(split_path, rows)
    test_rows: list[SplitRow] = []
    if s.test_root:
        test_inventory = inv.scan(s.test_root, s.class_dirs, s.cache_dir, progress=s.progress)
        rows, removed = drop_test_overlap([r for r in rows if r.split != "test"], readable,
                                          test_inventory.readable, s.near_duplicate_bits)
        if removed:
            log.warning("left out %d train/val image(s) that are copies of images in data.test_root=%s",
                        removed, s.test_root)
        test_rows = [SplitRow(str(s.test_root / r.path), r.label, -1, "test", r.md5)
                     for r in test_inventory.readable]
    summary = summarize(rows + test_rows)
    rows = [SplitRow(str(root / r.path), r.label, r.group, r.split, r.md5) for r in rows] + test_rows
    kept = subsample(rows, s.max_per_class, s.seed)
    check_class_sizes(kept, root, s)
    return PreparedData(root, tuple(kept), split_path, summary, verify_report)


def subsample(rows: list[SplitRow], max_per_class: int | None, seed: int) -> list[SplitRow]:
    """At most ``max_per_class`` rows per class, spread over the splits in their proportions (``None``: all)."""
    if not max_per_class:
        return rows
    by_split_class: dict[tuple[str, int], list[SplitRow]] = defaultdict(list)
    for row in rows:
        by_split_class[(row.split, row.label)].append(row)
    per_class_total = defaultdict(int)
    for (_, label), members in by_split_class.items():
        per_class_total[label] += len(members)
    rng = random.Random(seed)
    kept = []
    for (_split, label), members in sorted(by_split_class.items()):
        share = len(members) / per_class_total[label]
        keep = max(1, round(max_per_class * share))
        kept += rng.sample(members, min(keep, len(members)))
    return sorted(kept, key=lambda r: (SPLITS.index(r.split), r.path))


def check_class_sizes(rows: list[SplitRow], root: Path, settings: SplitSettings) -> None:
    """Refuse to train when a class is empty or has fewer than ``min_per_class`` training images (all named)."""
    short = []
    for label, (class_dir, name) in enumerate(zip(settings.class_dirs, settings.class_names, strict=True)):
        count = sum(1 for r in rows if r.split == "train" and r.label == label)
        if count == 0 or count < settings.min_per_class:
            found = "no readable training image" if count == 0 else f"only {count} readable training images"
            short.append(f"class '{name}' (folder {root}/{class_dir}) has {found}")
    if short:
        raise DataError(
            "; ".join(short) + f" (data.min_per_class={settings.min_per_class}). Add images to that folder, fix "
            "the unreadable ones listed above (`crackclf data verify` lists them), or lower data.min_per_class."
        )
