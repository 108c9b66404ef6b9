"""Scan a class-folder tree, hash every file (content and perceptual), and report what is in it.

The inventory is computed once per data set (in parallel; every file decoded in full, at the reduced scale of
:data:`HASH_DRAFT`) and stored as a CSV keyed by the files' names, sizes and modification times, so later runs and
sweep jobs reuse it. The same decode can fill the image cache's rows (``scan(decode_size=…)``).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
from filelock import FileLock
from PIL import Image
from tqdm import tqdm

from crackclf.data.cache import write_rows
from crackclf.data.images import (
    RESIZE_METHOD,
    ImageError,
    iter_image_files,
    load_resized,
    open_image,
    resize_array,
    same_draft,
)
from crackclf.data.shifted import KEYS_PER_IMAGE, keys_of_thumbnails, thumbnail
from crackclf.errors import UsageError
from crackclf.utils import (
    TEXT_ERRORS,
    DiskFullError,
    atomic_write,
    atomic_write_text,
    reserve,
    stable_hash,
    worker_count,
)

log = logging.getLogger(__name__)

#: Two images whose 64-bit perceptual hashes (``imagehash.phash``) differ in at most this many bits are
#: treated as near-duplicates: the largest threshold at which no pair crosses the classes and no group chained by
#: union-find grows large; pairs at the smallest distances are re-encoded copies, the farther ones mostly distinct
#: cracks with a similar layout. Measured by ``scripts/near_duplicate_study.py`` (docs/data.md, "The near-duplicate
#: threshold"). Distances are always even: every phash has exactly 32 bits set.
NEAR_DUPLICATE_BITS = 6


@dataclass
class FileRecord:
    """One scanned file: where it is, its class, and what decoding it found."""

    path: str  # relative to the data root, '/'-separated
    label: int
    md5: str = ""
    phash: str = ""  # 16 hex digits; empty when unreadable
    width: int = 0
    height: int = 0
    mode: str = ""
    error: str = ""  # one-line reason when unreadable
    #: Window hashes of the tolerant matcher (crackclf.data.shifted); stored beside the CSV, not in it.
    shift: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return not self.error


#: The columns of a stored inventory (every field but ``shift``).
CSV_FIELDS = tuple(f.name for f in fields(FileRecord) if f.name != "shift")


@dataclass
class Inventory:
    """All files of a data root with their hashes; ``records`` is sorted by path."""

    root: Path
    class_dirs: tuple[str, ...]
    records: list[FileRecord] = field(default_factory=list)
    #: The scan's store of every record's pixels at one image size (``scan(decode_size=…)``), where there is one.
    decoded: Path | None = None

    @property
    def readable(self) -> list[FileRecord]:
        return [r for r in self.records if r.ok]

    @property
    def unreadable(self) -> list[FileRecord]:
        return [r for r in self.records if not r.ok]

    def content_key(self) -> str:
        """A hash of what the readable data is (names, labels, contents), independent of where it lives."""
        return stable_hash([(r.path, r.label, r.md5) for r in self.readable])


def list_class_files(root: Path, class_dirs: tuple[str, ...]) -> list[tuple[str, int]]:
    """All candidate image files under ``root/<class_dir>`` (recursive), as (relative path, label index).

    Files with non-image suffixes are not candidates; anything with an image suffix is, folders named like images
    included (so a text file or a folder named ``.jpg`` is reported as unreadable, not silently skipped).
    """
    found = [(Path(path).relative_to(root).as_posix(), label)
             for label, class_dir in enumerate(class_dirs) for path in iter_image_files(root / class_dir)]
    found.sort()
    return found


#: The hashes are computed from a JPEG draft decode at this size (libjpeg scales by 1/2, 1/4 or 1/8 while both
#: sides stay at least this large): the phash needs 32 px and the window hashes 64. Decoding at reduced scale is
#: cheaper, and for the default image size (96 px) it is the very decode the image cache needs, so a cold start
#: decodes every image once (:data:`HASH_METHOD` is part of a stored inventory's key).
HASH_DRAFT = 64
HASH_METHOD = f"draft{HASH_DRAFT}"
#: Files per scan job: a worker process writes its decoded rows into the store itself.
_CHUNK = 64


def _scan_chunk(args: tuple[str, list[tuple[str, int]], int, str | None, int | None]) -> list[FileRecord]:
    """Scan ``files``; with a store, also write each one's ``decode_size`` pixels into rows ``start…`` of it."""
    root, files, start, store_file, decode_size = args
    rows = np.zeros((len(files), decode_size, decode_size, 3), dtype=np.uint8) if store_file else None
    records, thumbnails, phash_inputs = [], [], []
    for offset, (relative, label) in enumerate(files):
        record, pixels, grey = _scan_one(Path(root, relative), relative, label, decode_size)
        if rows is not None and pixels is not None:
            rows[offset] = pixels
        records.append(record)
        thumbnails.append(None if grey is None else thumbnail(grey))
        phash_inputs.append(None if grey is None else phash_input(grey))
    if rows is not None:
        write_rows(store_file, start, rows)
    readable = [row for row, small in enumerate(thumbnails) if small is not None]
    if readable:  # the perceptual and window hashes of the whole chunk at once
        keys = keys_of_thumbnails(np.stack([thumbnails[row] for row in readable]))
        hashes = phash_hex(np.stack([phash_inputs[row] for row in readable]))
        for row, own, phash in zip(readable, keys, hashes, strict=True):
            records[row].shift, records[row].phash = own, phash
    return records


#: :func:`phash_hex`'s DCT: the 8 lowest-frequency rows of the unnormalised 32-point DCT-II (scipy's default, which
#: ``imagehash.phash`` applies along both axes), so the 8x8 corner is ``D @ X @ D.T``.
_PHASH_DCT = 2 * np.cos(np.pi * np.arange(8)[:, None] * (2 * np.arange(32)[None] + 1) / 64)


def phash_input(grey: Image.Image) -> np.ndarray:
    """What the perceptual hash is computed from: the grey image at 32x32 px, as ``imagehash.phash`` resizes it."""
    return np.asarray(grey.resize((32, 32), Image.Resampling.LANCZOS))


def phash_hex(smalls: np.ndarray) -> list[str]:
    """``str(imagehash.phash(image))`` (16 hex digits) of N images at once, from their (N, 32, 32) :func:`phash_input`:
    the same bits (the low-frequency 8x8 DCT corner above its median), one matrix product for the whole batch instead
    of two FFTs an image, which made the perceptual hash the costliest part of a scan."""
    low = np.einsum("kn,bnm,lm->bkl", _PHASH_DCT, smalls.astype(np.float64), _PHASH_DCT).reshape(len(smalls), 64)
    # Rounded: where the FFT's coefficients are exactly equal (0 for every AC term of a flat image) the product's
    # differ by rounding noise, which would set bits at random instead of leaving them clear.
    low = np.round(low, 6)
    bits = low > np.median(low, axis=1, keepdims=True)
    return [f"{value:016x}" for value in np.packbits(bits, axis=1).view(">u8").ravel()]


def _scan_one(path: Path, relative: str, label: int,
              decode_size: int | None) -> tuple[FileRecord, np.ndarray | None, Image.Image | None]:
    """Hash one file's content (its image hashes are made per chunk); returns the record, with ``decode_size``
    its pixels as :func:`load_resized` gives them, and its grey image the hashes are made of (``None``: unreadable)."""
    record = FileRecord(path=relative, label=label)
    pixels = grey = None
    try:
        data = path.read_bytes() if path.is_file() else b""
        record.md5 = hashlib.md5(data).hexdigest() if data else ""
        image = open_image(data or path, draft_size=HASH_DRAFT)
        record.width, record.height = image.info["source_size"]
        record.mode = image.info["source_mode"]
        if decode_size is not None:  # the cache's decode: this one where the draft scale is the same
            same = same_draft(data, image, HASH_DRAFT, decode_size)
            pixels = resize_array(image, decode_size) if same else load_resized(data, decode_size)
        grey = image.convert("L")  # once for both hashes
    except ImageError as error:
        record.error = error.reason
        pixels = grey = None
    except OSError as error:  # unreadable (permissions) or vanished between listing and reading
        record.error = f"cannot read ({error.strerror or error})"
        pixels = grey = None
    return record, pixels, grey


def _fingerprint(root: Path, files: list[tuple[str, int]]) -> str:
    """Cheap key of the file list: names, labels, sizes and mtimes (no reading), and how the hashes are made."""
    entries = []
    for relative, label in files:
        try:
            stat = (root / relative).stat()
            entries.append((relative, label, stat.st_size, stat.st_mtime_ns))
        except OSError:
            entries.append((relative, label, -1, -1))
    return stable_hash({"files": entries, "hashes": HASH_METHOD})


def scan(root: Path, class_dirs: tuple[str, ...], cache_dir: Path | None = None, progress: bool = True,
         decode_size: int | None = None) -> Inventory:
    """Scan ``root``; reuse a stored inventory from ``cache_dir`` when the files have not changed.

    ``decode_size``: when the scan runs (nothing stored yet), also keep every readable image at this size, as
    :func:`~crackclf.data.images.load_resized` gives it, in a store beside the inventory (``Inventory.decoded``),
    from which the image caches take their rows instead of decoding the files again.
    """
    root = Path(root)
    files = list_class_files(root, class_dirs)
    if cache_dir is None:
        return _scan_files(root, class_dirs, files, None, progress, None)
    stored = Path(cache_dir) / f"inventory-{_fingerprint(root, files)}.csv"
    stored.parent.mkdir(parents=True, exist_ok=True)
    # One scanner per inventory: a second process (another run, DDP's other ranks started early) waits for the
    # first one's file instead of hashing every image again.
    with FileLock(str(stored) + ".lock"):
        if stored.exists() and _keys_file(stored).exists():  # an inventory of an older version has no keys: rescan
            records = read_records(stored)
            keys = np.load(_keys_file(stored))
            if len(keys) == len(records):
                for record, row in zip(records, keys, strict=True):
                    record.shift = row if record.ok else None
                decoded = _decoded_file(stored, decode_size) if decode_size is not None else None
                return Inventory(root, class_dirs, records, decoded if decoded and decoded.exists() else None)
        return _scan_files(root, class_dirs, files, stored, progress, decode_size)


def _scan_files(root: Path, class_dirs: tuple[str, ...], files: list[tuple[str, int]], stored: Path | None,
                progress: bool, decode_size: int | None) -> Inventory:
    """Read and hash every listed file (in worker processes); store the result at ``stored`` when given."""
    decoded = _decoded_file(stored, decode_size) if stored is not None and decode_size is not None else None
    holder: list[list[FileRecord]] = []
    if decoded is not None:  # the store is complete when it appears, and before the CSV that a waiting process reads
        try:
            atomic_write(decoded, lambda tmp: holder.append(_hash_files(root, files, tmp, decode_size, progress)))
        except DiskFullError as error:  # its space is reserved before any decoding: the scan goes on without it
            log.warning("no room to keep the images decoded at %d px beside the inventory (%s): scanning without "
                        "them; the image cache decodes them again", decode_size, error)
            decoded = None
    records = holder[0] if holder else _hash_files(root, files, None, None, progress)
    inventory = Inventory(root, class_dirs, records, decoded)
    if stored is not None:
        keys = np.zeros((len(records), KEYS_PER_IMAGE), dtype=np.uint64)
        for row, record in enumerate(records):
            if record.shift is not None:
                keys[row] = record.shift
        atomic_write(_keys_file(stored), lambda tmp: _save_array(tmp, keys))  # before the CSV that names it
        write_records(stored, records)
    return inventory


def _hash_files(root: Path, files: list[tuple[str, int]], store: Path | None, decode_size: int | None,
                progress: bool) -> list[FileRecord]:
    """The records of ``files`` in order; with ``store``, their pixels written into it (a new array file)."""
    if store is not None:
        np.lib.format.open_memmap(store, mode="w+", dtype=np.uint8, shape=(len(files), decode_size, decode_size, 3))
        reserve(store)
    jobs = [(str(root), files[i : i + _CHUNK], i, str(store) if store else None, decode_size)
            for i in range(0, len(files), _CHUNK)]
    records: list[FileRecord] = []
    with tqdm(total=len(files), desc="hashing images", disable=not progress, unit="img") as bar:
        workers = min(worker_count(), len(jobs))
        if workers > 1 and len(files) > _CHUNK:
            with ProcessPoolExecutor(workers) as pool:
                for chunk in pool.map(_scan_chunk, jobs):
                    records += chunk
                    bar.update(len(chunk))
        else:
            for job in jobs:
                records += _scan_chunk(job)
                bar.update(len(job[1]))
    return records


def _save_array(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as handle:  # np.save appends ".npy" to a bare temporary name
        np.save(handle, array)


def _decoded_file(inventory_csv: Path, size: int) -> Path:
    """The store of a stored inventory's images decoded at ``size`` (one row per record, zeros if unreadable)."""
    return inventory_csv.with_suffix(f".images-{size}px-{stable_hash(RESIZE_METHOD, 8)}.npy")


def _keys_file(inventory_csv: Path) -> Path:
    """The tolerant matcher's keys of a stored inventory, one row per record."""
    return inventory_csv.with_suffix(".shift.npy")


#: A labelled folder's optional description of its files (as in ``other_surfaces``): ``relpath`` and ``parent``.
MANIFEST = "MANIFEST.csv"


def read_parents(root: Path) -> dict[str, str] | None:
    """Relative path → parent photo, from ``root/MANIFEST.csv`` where it has a ``parent`` column; ``None`` where
    there is no manifest or it gives no parents (the split then groups by hashes alone).

    Raises:
        UsageError: the manifest has a ``parent`` column but no ``relpath`` (or ``path``) column to say whose.
    """
    manifest = Path(root) / MANIFEST
    if not manifest.is_file():
        return None
    with open(manifest, newline="", encoding="utf-8", errors=TEXT_ERRORS) as handle:
        reader = csv.DictReader(handle)
        columns = set(reader.fieldnames or [])
        if "parent" not in columns:
            return None
        path_column = next((c for c in ("relpath", "path") if c in columns), None)
        if path_column is None:
            raise UsageError(f"{manifest} has a parent column but no relpath column naming each file (relative to "
                             f"{root}); add one, or remove the parent column to group by image hashes only.")
        parents = {Path(row[path_column]).as_posix(): row["parent"] for row in reader if row.get("parent")}
    return parents or None


def write_records(path: Path, records: list[FileRecord]) -> None:
    """Write records as CSV, atomically."""
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for record in records:
        writer.writerow({name: getattr(record, name) for name in CSV_FIELDS})
    atomic_write_text(path, buffer.getvalue())


def read_records(path: Path) -> list[FileRecord]:
    with open(path, newline="", encoding="utf-8", errors=TEXT_ERRORS) as handle:
        return [
            FileRecord(
                path=row["path"], label=int(row["label"]), md5=row["md5"], phash=row["phash"],
                width=int(row["width"]), height=int(row["height"]), mode=row["mode"], error=row["error"],
            )
            for row in csv.DictReader(handle)
        ]


def phash_array(records: list[FileRecord]) -> np.ndarray:
    """The records' perceptual hashes as a uint64 array."""
    return np.array([int(r.phash, 16) for r in records], dtype=np.uint64)


#: Results of :func:`near_duplicate_pairs` in this process, by (hashes' digest, max_bits): a training run asks for
#: the same pairs twice (the verify report and the split).
_PAIRS_CACHE: dict[tuple[str, int], np.ndarray] = {}


def near_duplicate_pairs(hashes: np.ndarray, max_bits: int = NEAR_DUPLICATE_BITS) -> np.ndarray:
    """All index pairs (i < j) whose hashes differ in at most ``max_bits`` bits, as an (n, 2) int array sorted by
    (i, j).

    Exact, no pair is missed: the 64 bits are cut into ``max_bits + 1`` bands, and two hashes that differ in at most
    ``max_bits`` bits agree exactly on at least one band (pigeonhole), so only hashes that share a band's value are
    compared (multi-index hashing, Norouzi et al. 2012) instead of all n² pairs.
    """
    hashes = np.ascontiguousarray(hashes, dtype=np.uint64)
    key = (hashlib.sha1(hashes.tobytes()).hexdigest(), int(max_bits))
    if key not in _PAIRS_CACHE:
        _PAIRS_CACHE.clear()  # only the latest data set is worth keeping
        _PAIRS_CACHE[key] = _banded_pairs(hashes, int(max_bits))
    return _PAIRS_CACHE[key].copy()


def _banded_pairs(hashes: np.ndarray, max_bits: int) -> np.ndarray:
    count = len(hashes)
    if count < 2:
        return np.zeros((0, 2), dtype=np.int64)
    if max_bits >= 63:  # one band per bit or more: every pair qualifies
        rows, cols = np.triu_indices(count, 1)
        return np.stack([rows, cols], axis=1).astype(np.int64)
    bands = max_bits + 1
    edges = np.linspace(0, 64, bands + 1).astype(int)
    found: list[np.ndarray] = []
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        mask = np.uint64((1 << int(high - low)) - 1)
        band = (hashes >> np.uint64(low)) & mask
        order = np.argsort(band, kind="stable")
        sorted_band = band[order]
        starts = np.flatnonzero(np.r_[True, sorted_band[1:] != sorted_band[:-1]])
        sizes = np.diff(np.r_[starts, count])
        for start, size in zip(starts[sizes > 1], sizes[sizes > 1], strict=True):
            members = np.sort(order[start : start + size])
            found.append(_close_pairs(hashes, members, max_bits))
    if not found:
        return np.zeros((0, 2), dtype=np.int64)
    pairs = np.concatenate(found)
    codes = np.unique(pairs[:, 0] * count + pairs[:, 1])  # one pair found in several bands is kept once
    return np.stack([codes // count, codes % count], axis=1)


def _close_pairs(hashes: np.ndarray, members: np.ndarray, max_bits: int, block: int = 2048) -> np.ndarray:
    """Pairs (i < j) among ``members`` (sorted indices) within ``max_bits`` bits, compared in blocks."""
    pairs = []
    values = hashes[members]
    for start in range(0, len(members), block):
        distances = np.bitwise_count(values[start : start + block, None] ^ values[None, :])
        rows, cols = np.nonzero(distances <= max_bits)
        rows = rows + start
        keep = rows < cols
        pairs.append(np.stack([members[rows[keep]], members[cols[keep]]], axis=1))
    return np.concatenate(pairs).astype(np.int64)


def verify_report(
    inventory: Inventory, class_names: tuple[str, ...], max_bits: int | None = NEAR_DUPLICATE_BITS
) -> dict:
    """Counts per class, unreadable files, sizes/modes, exact and near duplicates, and label conflicts.

    ``max_bits=None`` looks for exact copies only.
    """
    readable = inventory.readable
    by_md5: dict[str, list[FileRecord]] = defaultdict(list)
    for record in readable:
        by_md5[record.md5].append(record)
    exact_groups = [group for group in by_md5.values() if len(group) > 1]
    conflicts = [group for group in exact_groups if len({r.label for r in group}) > 1]
    hashes = phash_array(readable)
    use_near = bool(readable) and max_bits is not None
    pairs = near_duplicate_pairs(hashes, max_bits) if use_near else np.zeros((0, 2), int)
    # Pairs with the same MD5 are exact copies, counted above; near duplicates are the others.
    near = pairs[np.array([readable[i].md5 != readable[j].md5 for i, j in pairs], dtype=bool).reshape(-1)]
    near_pairs = [(readable[i], readable[j]) for i, j in near]
    bits = np.bitwise_count(hashes[near[:, 0]] ^ hashes[near[:, 1]])
    distances = {int(k): int(v) for k, v in sorted(Counter(bits.tolist()).items())}
    near_conflicts = [(a, b) for a, b in near_pairs if a.label != b.label]
    counts = Counter(r.label for r in inventory.records)
    readable_counts = Counter(r.label for r in readable)
    return {
        "root": str(inventory.root),
        "files": len(inventory.records),
        "per_class": {
            name: {"files": counts.get(i, 0), "readable": readable_counts.get(i, 0)}
            for i, name in enumerate(class_names)
        },
        "unreadable": [{"path": r.path, "reason": r.error} for r in inventory.unreadable],
        "sizes": dict(Counter(f"{r.width}x{r.height}" for r in readable).most_common(10)),
        "modes": dict(Counter(r.mode for r in readable)),
        "exact_duplicates": {
            "groups": len(exact_groups),
            "files_in_groups": sum(len(g) for g in exact_groups),
            "redundant_files": sum(len(g) - 1 for g in exact_groups),
            "examples": [[r.path for r in g] for g in exact_groups[:10]],
        },
        "near_duplicates": {
            "threshold_bits": max_bits,
            "hash": "imagehash.phash (64-bit DCT)",
            "pairs": len(near_pairs),
            "images": len({r.path for pair in near_pairs for r in pair}),
            "pairs_by_distance": distances,
            "examples": [[a.path, b.path] for a, b in near_pairs[:10]],
        },
        "label_conflicts": {
            "exact": [[r.path for r in g] for g in conflicts],
            "near": [[a.path, b.path] for a, b in near_conflicts],
        },
    }


def format_report(report: dict) -> str:
    """A readable multi-line summary of :func:`verify_report`."""
    lines = [f"Data root: {report['root']}", f"Files found: {report['files']}"]
    for name, counts in report["per_class"].items():
        lines.append(f"  {name}: {counts['files']} files, {counts['readable']} readable")
    lines.append(f"Unreadable: {len(report['unreadable'])} (excluded from training)")
    for item in report["unreadable"][:50]:
        lines.append(f"  {item['path']}: {item['reason']}")
    if len(report["unreadable"]) > 50:
        lines.append(f"  ... and {len(report['unreadable']) - 50} more (see the JSON report)")
    lines.append("Sizes: " + ", ".join(f"{k} ({v})" for k, v in report["sizes"].items()))
    lines.append("Modes: " + ", ".join(f"{k} ({v})" for k, v in report["modes"].items()))
    exact = report["exact_duplicates"]
    lines.append(
        f"Exact duplicates: {exact['groups']} groups, {exact['files_in_groups']} files "
        f"({exact['redundant_files']} redundant copies)"
    )
    near = report["near_duplicates"]
    if near["threshold_bits"] is None:
        lines.append("Near duplicates: not searched (exact copies only)")
    else:
        by_distance = ", ".join(f"{bits} bits: {count}" for bits, count in near["pairs_by_distance"].items())
        lines.append(f"Near duplicates ({near['hash']}, <= {near['threshold_bits']} bits, different MD5): "
                     f"{near['pairs']} pairs over {near['images']} images ({by_distance or 'none'})")
    conflicts = report["label_conflicts"]
    lines.append(f"Label conflicts: {len(conflicts['exact'])} exact, {len(conflicts['near'])} near")
    return "\n".join(lines)


def write_report(report: dict, out_dir: Path) -> tuple[Path, Path]:
    """Write ``verify.json`` and ``verify.txt`` into ``out_dir``; returns both paths."""
    out_dir = Path(out_dir)
    json_path, text_path = out_dir / "verify.json", out_dir / "verify.txt"
    atomic_write_text(json_path, json.dumps(report, indent=2))
    atomic_write_text(text_path, format_report(report) + "\n")
    return json_path, text_path
