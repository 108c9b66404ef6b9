"""Decode once: every image resized into one uint8 ``.npy`` array, memory-mapped by every later run.

The file name is a key of the file list, their contents (MD5), the size and the resize method, so a changed
image or a different ``image_size`` gets its own cache. Building takes a file lock and renames a finished
temporary file into place, so two sweep jobs that start together build it once and never read half of it.
"""

from __future__ import annotations

import errno
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from filelock import FileLock
from tqdm import tqdm

from crackclf.data.images import RESIZE_METHOD, ImageError, load_resized
from crackclf.utils import atomic_write, stable_hash, worker_count

_CHUNK = 256


def cache_path(cache_dir: Path, files: list[tuple[str, str]], size: int) -> Path:
    """Where the cache for ``files`` (pairs of path and MD5, in order) at ``size`` px lives."""
    key = stable_hash({"files": files, "size": size, "resize": RESIZE_METHOD, "version": 1})
    return Path(cache_dir) / f"images-{size}px-{len(files)}-{key}.npy"


def _fill_chunk(args: tuple[str, list[str], int, int]) -> list[tuple[int, str]]:
    """Decode ``paths`` into rows ``start…`` of the (temporary) array file; returns failures."""
    array_file, paths, start, size = args
    array = np.load(array_file, mmap_mode="r+")
    failures = []
    for offset, path in enumerate(paths):
        try:
            array[start + offset] = load_resized(path, size)
        except ImageError as error:
            failures.append((start + offset, str(error)))
    array.flush()
    return failures


def build_cache(
    root: Path, relative_paths: list[str], md5s: list[str], size: int, cache_dir: Path, progress: bool = True
) -> np.ndarray:
    """Return the memory-mapped ``(N, size, size, 3)`` uint8 array of the images, building it if needed.

    Raises:
        ImageError: when a listed image cannot be decoded (the inventory should have excluded it).
    """
    target = cache_path(cache_dir, list(zip(relative_paths, md5s, strict=True)), size)
    paths = [Path(root, relative) for relative in relative_paths]
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not target.exists():
            atomic_write(target, lambda tmp: _build_into(tmp, paths, size, progress))
    return np.load(target, mmap_mode="r")


def _reserve(path: Path) -> None:
    """Allocate every block of the (sparse) array file now. Writing into a memory map on a full disk kills the
    process with SIGBUS; reserving first turns that into an ENOSPC error before any image is decoded."""
    with open(path, "r+b") as handle:
        try:
            os.posix_fallocate(handle.fileno(), 0, os.fstat(handle.fileno()).st_size)
        except OSError as error:
            if error.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):  # unsupported: write as before
                raise


def _build_into(tmp: Path, paths: list[Path], size: int, progress: bool) -> None:
    # np.save appends ".npy" to names without it, so write through an explicit handle.
    array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(paths), size, size, 3))
    del array
    _reserve(tmp)
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
