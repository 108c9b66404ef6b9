"""Decode once: every image resized into one uint8 ``.npy`` array, memory-mapped by every later run.

The file name is a key of the file list, their contents (MD5), the size and the resize method, so a changed
image or a different ``image_size`` gets its own cache. Building takes a file lock and renames a finished
temporary file into place, so two sweep jobs that start together build it once and never read half of it.

Where the inventory scan already decoded the images at this size (:class:`DecodedImages`, the scan's store), the
rows are gathered from there instead: nothing is decoded twice and no second file is written.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock
from tqdm import tqdm

from crackclf.data.images import RESIZE_METHOD, ImageError, load_resized
from crackclf.utils import atomic_write, reserve, stable_hash, worker_count

_CHUNK = 256


@dataclass(frozen=True)
class DecodedImages:
    """A store of images an inventory scan decoded at ``size`` (``inventory.scan(decode_size=…)``): which file,
    with which content, is in which row of the array ``file``."""

    file: Path
    size: int
    rows: dict[tuple[str, str], int]  #: (absolute path, MD5) → row

    @classmethod
    def of(cls, root: Path, records: Sequence, file: Path, size: int) -> DecodedImages:
        """The store ``file`` of a scan of ``root`` whose records (path relative to ``root``, md5) are its rows."""
        return cls(Path(file), size, {(str(Path(root, r.path)), r.md5): row for row, r in enumerate(records) if r.ok})


def _gather(paths: list[Path], md5s: list[str], size: int, decoded: Sequence[DecodedImages]) -> np.ndarray | None:
    """The images read from the scans' stores, or ``None`` when one of them is in none of the stores.

    The result is an (N, size, size, 3) view of a planar (N, 3, size, size) array: the datamodule keeps images
    planar, so its transpose back is free, and every byte is written once (copies of large arrays are slow
    where page faults are: a virtual machine's fresh memory).
    """
    stores = [store for store in decoded if store.size == size]
    where = []
    for path, md5 in zip(paths, md5s, strict=True):
        found = next(((number, store.rows[key]) for number, store in enumerate(stores)
                      if (key := (str(path), md5)) in store.rows), None)
        if found is None:
            return None
        where.append(found)
    owners = np.array([owner for owner, _ in where], dtype=np.int64)
    sources = np.array([row for _, row in where], dtype=np.int64)
    planar = np.empty((len(paths), 3, size, size), dtype=np.uint8)
    for number, store in enumerate(stores):
        array = np.load(store.file, mmap_mode="r")
        targets = np.flatnonzero(owners == number)
        for start in range(0, len(targets), _CHUNK):
            chunk = targets[start : start + _CHUNK]
            planar[chunk] = array[sources[chunk]].transpose(0, 3, 1, 2)
    return planar.transpose(0, 2, 3, 1)


def cache_path(cache_dir: Path, files: list[tuple[str, str]], size: int) -> Path:
    """Where the cache for ``files`` (pairs of path and MD5, in order) at ``size`` px lives."""
    key = stable_hash({"files": files, "size": size, "resize": RESIZE_METHOD, "version": 1})
    return Path(cache_dir) / f"images-{size}px-{len(files)}-{key}.npy"


def write_rows(array_file: str | Path, start: int, rows: np.ndarray) -> None:
    """Write ``rows`` (uint8, the file's row shape) into rows ``start…`` of an ``.npy`` file, in one ``pwrite``.

    Not through a memory map: filling a file's pages by writing into its mapping costs a page fault per 4 KiB,
    which on a virtual machine made writing the 30,000 cached images several times slower than this.
    """
    with open(array_file, "r+b") as handle:
        version = np.lib.format.read_magic(handle)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, _ = read_header(handle)
        row_bytes = int(np.prod(shape[1:], dtype=np.int64))
        rows = np.ascontiguousarray(rows, dtype=np.uint8)
        if rows.size != len(rows) * row_bytes or start + len(rows) > shape[0]:
            raise ValueError(f"{array_file}: rows {start}..{start + len(rows)} of shape {rows.shape[1:]} do not fit "
                             f"an array of shape {shape}")
        os.pwrite(handle.fileno(), rows.data, handle.tell() + start * row_bytes)


def _fill_chunk(args: tuple[str, list[str], int, int]) -> list[tuple[int, str]]:
    """Decode ``paths`` into rows ``start…`` of the (temporary) array file; returns failures."""
    array_file, paths, start, size = args
    rows = np.zeros((len(paths), size, size, 3), dtype=np.uint8)
    failures = []
    for offset, path in enumerate(paths):
        try:
            rows[offset] = load_resized(path, size)
        except ImageError as error:
            failures.append((start + offset, str(error)))
    write_rows(array_file, start, rows)
    return failures


def build_cache(
    root: Path, relative_paths: list[str], md5s: list[str], size: int, cache_dir: Path, progress: bool = True,
    decoded: Sequence[DecodedImages] = (),
) -> np.ndarray:
    """Return the ``(N, size, size, 3)`` uint8 array of the images: gathered from ``decoded`` (the inventory
    scans' stores) when they hold every image at this size, else memory-mapped from the cache file, built if needed.

    Raises:
        ImageError: when a listed image cannot be decoded (the inventory should have excluded it).
    """
    paths = [Path(root, relative) for relative in relative_paths]
    gathered = _gather(paths, md5s, size, decoded) if decoded else None
    if gathered is not None:
        return gathered
    target = cache_path(cache_dir, list(zip(relative_paths, md5s, strict=True)), size)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not target.exists():
            atomic_write(target, lambda tmp: _build_into(tmp, paths, size, progress))
    return np.load(target, mmap_mode="r")


def _build_into(tmp: Path, paths: list[Path], size: int, progress: bool) -> None:
    # np.save appends ".npy" to names without it, so write through an explicit handle.
    array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(paths), size, size, 3))
    del array
    reserve(tmp)
    jobs = [
        (str(tmp), [str(p) for p in paths[i : i + _CHUNK]], i, size) for i in range(0, len(paths), _CHUNK)
    ]
    failures: list[tuple[int, str]] = []
    bar = tqdm(total=len(paths), desc=f"caching images at {size}px", unit="img", disable=not progress)
    workers = min(worker_count(), len(jobs))
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            for job, result in zip(jobs, pool.map(_fill_chunk, jobs), strict=True):
                failures += result
                bar.update(len(job[1]))
    else:
        for job in jobs:
            failures += _fill_chunk(job)
            bar.update(len(job[1]))
    bar.close()
    if failures:
        raise ImageError(failures[0][1].split(":")[0], f"{len(failures)} image(s) failed while caching: "
                         + "; ".join(message for _, message in failures[:5]))
