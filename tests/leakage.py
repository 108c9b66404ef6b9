"""An independent leakage check of a split CSV: hashes computed here (hashlib, imagehash on a plain PIL open, at the
JPEG draft scale the inventory documents: half scale for 227 px tiles), pairs found with a popcount table, copies
confirmed by an aligned pixel difference, nothing taken from crackclf's inventory or split code."""

from __future__ import annotations

import csv
import hashlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import imagehash
import numpy as np
from PIL import Image

# Bits set in every 16-bit value: a popcount that does not use numpy's bitwise_count (which crackclf uses).
_POPCOUNT16 = np.array([bin(value).count("1") for value in range(1 << 16)], dtype=np.uint8)


def read_rows(split_csv: Path) -> list[dict[str, str]]:
    with open(split_csv, newline="") as handle:
        return list(csv.DictReader(handle))


def _hash_file(path: str, draft: bool = True) -> tuple[str, int]:
    data = Path(path).read_bytes()
    with Image.open(path) as image:
        if draft:  # the decode crackclf's hashes come from (docs/data.md): libjpeg's scale for 64 px
            image.draft("RGB", (64, 64))
        return hashlib.md5(data).hexdigest(), int(str(imagehash.phash(image)), 16)


def _hash_full(path: str) -> tuple[str, int]:
    return _hash_file(path, draft=False)


def hash_files(paths: list[Path], workers: int = 2, draft: bool = True) -> tuple[list[str], np.ndarray]:
    """MD5 and 64-bit phash of each file (in parallel for big lists); ``draft=False``: phash of the full decode."""
    names = [str(p) for p in paths]
    hash_one = _hash_file if draft else _hash_full
    if len(names) > 500 and workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            results = list(pool.map(hash_one, names, chunksize=256))
    else:
        results = [hash_one(name) for name in names]
    return [md5 for md5, _ in results], np.array([ph for _, ph in results], dtype=np.uint64)


def close_pairs(hashes: np.ndarray, max_bits: int, block: int = 256) -> np.ndarray:
    """All (i, j), i < j, whose hashes differ in at most ``max_bits`` bits."""
    found = []
    for start in range(0, len(hashes), block):
        xor = hashes[start : start + block, None] ^ hashes[None, :]
        bits = _POPCOUNT16[xor.view(np.uint16)].reshape(*xor.shape, 4).sum(-1)
        rows, cols = np.nonzero(bits <= max_bits)
        rows += start
        found.append(np.stack([rows[rows < cols], cols[rows < cols]], axis=1))
    return np.concatenate(found) if found else np.zeros((0, 2), dtype=np.int64)


def straddling(rows: list[dict[str, str]], md5s: list[str], hashes: np.ndarray, max_bits: int) -> dict[str, list]:
    """Pairs of rows that are copies (same MD5) or near copies (phash within ``max_bits``) but in different splits.

    Also returns how many such pairs were checked, so a caller can tell the check was not vacuous.
    """
    splits = [row["split"] for row in rows]
    by_md5: dict[str, list[int]] = {}
    for index, md5 in enumerate(md5s):
        by_md5.setdefault(md5, []).append(index)
    exact = [(m[0], other) for m in by_md5.values() for other in m[1:]]
    near = [(int(i), int(j)) for i, j in close_pairs(hashes, max_bits) if md5s[i] != md5s[j]]
    return {
        "exact_checked": exact,
        "near_checked": near,
        "exact": [(rows[i]["path"], rows[j]["path"]) for i, j in exact if splits[i] != splits[j]],
        "near": [(rows[i]["path"], rows[j]["path"]) for i, j in near if splits[i] != splits[j]],
    }


def copies_among(pairs: list[tuple[Path, Path]], side: int = 57, reach: int = 3, levels: float = 5.0) -> list:
    """The pairs whose pictures are the same (a copy): grey at ``side`` px, mean absolute difference below ``levels``
    grey levels at the best shift up to ``reach`` px (±12 px at 227 px; distinct crops differ by 20-30 levels)."""
    found = []
    for first, second in pairs:
        a, b = (np.asarray(Image.open(p).convert("L").resize((side, side), Image.BILINEAR), dtype=np.float32)
                for p in (first, second))
        best = min(np.abs(a[max(0, dy): side + min(0, dy), max(0, dx): side + min(0, dx)]
                          - b[max(0, -dy): side + min(0, -dy), max(0, -dx): side + min(0, -dx)]).mean()
                   for dy in range(-reach, reach + 1) for dx in range(-reach, reach + 1))
        if best < levels:
            found.append((first, second))
    return found
