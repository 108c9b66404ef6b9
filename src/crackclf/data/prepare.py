"""Preparing the rows a run trains on, with no Lightning in sight: inventory → leakage-free split → subsample →
class-size check, returned as one frozen :class:`PreparedData`.

Pure in the sense that matters for testing and reuse: the result depends only on the files and the settings (the
inventory and split CSVs in ``cache_dir`` are caches of that result, not state).
"""

from __future__ import annotations

import logging
import random
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from filelock import FileLock

from crackclf.data import inventory as inv
from crackclf.data.cache import DecodedImages
from crackclf.data.datasets import DataError
from crackclf.data.shifted import SHIFTED_DUPLICATE_BITS
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
from crackclf.errors import UsageError
from crackclf.utils import stable_hash

__all__ = ["DataSource", "PreparedData", "SplitSettings", "parse_sources", "prepare_rows", "prepare_sources",
           "subsample"]

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
    shifted_duplicate_bits: int | None = SHIFTED_DUPLICATE_BITS
    min_per_class: int = 10
    progress: bool = True
    #: A fresh inventory scan also keeps every image decoded at this size (the run's image size), so the image
    #: caches gather their rows instead of decoding the files a second time (``PreparedData.decoded``).
    decode_size: int | None = None


@dataclass(frozen=True)
class PreparedData:
    """The rows of a run (absolute paths) and what was learnt while making them."""

    root: Path
    rows: tuple[SplitRow, ...]
    split_path: Path
    split_summary: SplitSummary
    verify_report: dict | None  #: ``None`` where it was not made (DDP ranks other than zero)
    decoded: tuple[DecodedImages, ...] = ()  #: the scans' stores of decoded images, where they have them

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
    inventory = inv.scan(root, s.class_dirs, s.cache_dir, progress=s.progress, decode_size=s.decode_size)
    decoded = [_decoded(inventory, s)]
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
        rows, split_path = _own_split(readable, s, test_fraction, None)
    test_rows: list[SplitRow] = []
    if s.test_root:
        test_inventory = inv.scan(s.test_root, s.class_dirs, s.cache_dir, progress=s.progress,
                                  decode_size=s.decode_size)
        decoded.append(_decoded(test_inventory, s))
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
    return PreparedData(root, tuple(kept), split_path, summary, verify_report, tuple(d for d in decoded if d))


def _decoded(inventory: inv.Inventory, s: SplitSettings) -> DecodedImages | None:
    """The inventory's store of decoded images, where its scan kept one at ``s.decode_size``."""
    if inventory.decoded is None or s.decode_size is None:
        return None
    return DecodedImages.of(inventory.root, inventory.records, inventory.decoded, s.decode_size)


def _own_split(readable: list[inv.FileRecord], s: SplitSettings, test_fraction: float,
               parents: dict[str, str] | None) -> tuple[list[SplitRow], Path]:
    """The leakage-free split of one folder's readable records (relative paths), read from or written to the
    cache folder under a key of everything that decides it."""
    key = split_key(readable, s.val_fraction, test_fraction, s.seed, s.near_duplicate_bits, parents,
                    s.shifted_duplicate_bits)
    split_path = s.cache_dir / f"split-{key}.csv"
    split_path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(split_path) + ".lock"):  # one process splits; another (a DDP rank) reads its file
        if split_path.exists():
            return read_split(split_path), split_path
        rows, _ = make_split(readable, s.val_fraction, test_fraction, s.seed, s.near_duplicate_bits, parents,
                             s.shifted_duplicate_bits)
        write_split(split_path, rows)
    return rows, split_path


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


#: Characters a source name may hold: it becomes part of MLflow metric names (``val/<source>/acc``).
_SOURCE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
#: The name of a source without ``root`` (the reference data set, downloaded like ``data.root=null``).
REFERENCE_NAME = "concrete_crack"


@dataclass(frozen=True)
class DataSource:
    """One labelled folder of a multi-source run (``data.sources``)."""

    name: str  #: in metric names: ``val/<name>/acc``
    root: Path | None  #: ``None``: the reference data set, downloaded where ``data.download_dir`` says
    class_dirs: tuple[str, str]  #: negative class first, like ``data.class_dirs``
    weight: float = 1.0  #: how often each of its images is drawn in training, relative to the other sources'


def parse_sources(entries: Sequence[Any], class_dirs: Sequence[str]) -> tuple[DataSource, ...]:
    """``data.sources`` → sources. An entry is a folder path, or a mapping with ``root`` and optionally ``name``
    (default: the folder's name), ``class_dirs`` (default: ``data.class_dirs``) and ``weight`` (default 1).

    Raises:
        UsageError: naming the entry and what is wrong with it.
    """
    sources: list[DataSource] = []
    for index, entry in enumerate(entries):
        where = f"data.sources[{index}]"
        if isinstance(entry, (str, Path)):
            entry = {"root": str(entry)}
        if not isinstance(entry, Mapping):
            raise UsageError(f"{where}={entry!r} must be a folder path or a mapping with root (and optionally name, "
                             "class_dirs, weight), e.g. data.sources=[{root: /data/walls, class_dirs: [no_crack, "
                             "crack]}].")
        unknown = sorted(set(entry) - {"root", "name", "class_dirs", "weight"})
        if unknown:
            raise UsageError(f"{where} has unknown key(s) {unknown}; valid: root, name, class_dirs, weight.")
        root = entry.get("root")
        root = Path(str(root)).expanduser().resolve() if root not in (None, "") else None
        name = str(entry.get("name") or (root.name if root is not None else REFERENCE_NAME))
        if not _SOURCE_NAME.match(name):
            raise UsageError(f"{where}: source name {name!r} may hold only letters, digits, '_', '.' and '-' (it "
                             f"becomes part of metric names such as val/<name>/acc); give it a name: key.")
        dirs = tuple(str(d) for d in (entry.get("class_dirs") or class_dirs))
        if len(dirs) != 2:
            raise UsageError(f"{where}.class_dirs={list(dirs)} must name exactly two folders, negative class first.")
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            raise UsageError(f"{where}.weight={weight!r} must be a number > 0 (1: its images are drawn as often as "
                             "any other source's).")
        sources.append(DataSource(name, root, (dirs[0], dirs[1]), float(weight)))
    if not sources:
        raise UsageError("data.sources=[] is empty: list at least one folder, or set data.sources=null and use "
                         "data.root.")
    names = [s.name for s in sources]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UsageError(f"data.sources: the name(s) {repeated} are used twice; give each source its own name: key.")
    return tuple(sources)


def prepare_sources(sources: Sequence[DataSource], settings: SplitSettings, report: bool = True) -> PreparedData:
    """Split each source on its own (grouped by parent photo where its folder has a ``MANIFEST.csv`` with a
    ``parent`` column, by exact and near-duplicate hash always) and join the rows, each tagged with its source.

    Every source must have a root here (resolve the reference data set first). ``report``: make the verify report
    of the first source (the one the bundle's tile size is taken from).

    Raises:
        UsageError: ``data.split_file`` or ``data.test_root`` is set (each source is split itself).
        DataError: a source has fewer than ``settings.min_per_class`` training images of a class.
    """
    s = settings
    if s.split_file or s.test_root:
        raise UsageError("data.split_file and data.test_root work with data.root only; with data.sources every "
                         "source is split by itself. Unset them, or use data.root.")
    rows: list[SplitRow] = []
    verify_report = None
    split_paths = []
    decoded: list[DecodedImages | None] = []
    group_offset = 0
    for number, source in enumerate(sources):
        assert source.root is not None, "resolve the reference data set's root before preparing"
        inventory = inv.scan(source.root, source.class_dirs, s.cache_dir, progress=s.progress,
                             decode_size=s.decode_size)
        decoded.append(_decoded(inventory, s))
        if report and number == 0:
            verify_report = inv.verify_report(inventory, s.class_names, s.near_duplicate_bits)
        for bad in inventory.unreadable:
            log.warning("excluded unreadable image %s/%s: %s", source.root, bad.path, bad.error)
        readable = inventory.readable
        own, split_path = _own_split(readable, s, s.test_fraction, inv.read_parents(source.root))
        split_paths.append(split_path)
        kept = subsample(own, s.max_per_class, s.seed)
        check_class_sizes(kept, source.root, replace(s, class_dirs=source.class_dirs))
        rows += [SplitRow(str(source.root / r.path), r.label, r.group + group_offset, r.split, r.md5, source.name)
                 for r in kept]
        group_offset += max((r.group for r in own), default=-1) + 1  # groups stay distinct across sources
    rows.sort(key=lambda r: (SPLITS.index(r.split), r.path))
    combined = s.cache_dir / f"split-sources-{stable_hash([str(p) for p in split_paths] + [s.max_per_class])}.csv"
    write_split(combined, rows)
    return PreparedData(sources[0].root, tuple(rows), combined, summarize(rows), verify_report,
                        tuple(d for d in decoded if d))
