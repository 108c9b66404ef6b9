"""Small helpers shared by every layer: atomic file writes, stable hashing, worker counts."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from crackclf.errors import CrackclfError


def stable_hash(value: Any, length: int = 16) -> str:
    """A short, stable hex digest of any JSON-serialisable value."""
    encoded = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(encoded).hexdigest()[:length]


class DiskFullError(CrackclfError, OSError):
    """The disk filled up while writing a file; :func:`atomic_write` left nothing behind."""


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, fsync it, then rename it into place.

    A crash or a full disk at any moment leaves either the old file or the complete new one, never a torn one.

    Raises:
        DiskFullError: when the disk is full (the temporary file is removed, ``path`` is untouched).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    tmp_path = Path(tmp_name)
    try:
        write(tmp_path)
        with open(tmp_path, "rb+") as stream:
            os.fsync(stream.fileno())
        os.replace(tmp_path, path)
    except BaseException as error:
        tmp_path.unlink(missing_ok=True)
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(error.errno, f"no space left on the disk of {path} (nothing was written; the previous "
                                "file, if any, is intact). Free space there, or write elsewhere, e.g. "
                                "CRACKCLF_CACHE=/bigger/disk or hydra.run.dir=/bigger/disk/run") from error
        raise
    return path


#: File names that are not valid UTF-8 reach Python as lone surrogates (PEP 383); writing and reading text files
#: with this error handler keeps such names byte-exact instead of failing with UnicodeEncodeError.
TEXT_ERRORS = "surrogateescape"


def atomic_write_text(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (UTF-8; undecodable file names round-trip, see ``TEXT_ERRORS``)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8", errors=TEXT_ERRORS))


def reserve(path: Path) -> None:
    """Allocate every block of a (sparse) array file now. Writing into a memory map on a full disk kills the
    process with SIGBUS; reserving first turns that into an ENOSPC error before any work is done."""
    with open(path, "r+b") as handle:
        try:
            os.posix_fallocate(handle.fileno(), 0, os.fstat(handle.fileno()).st_size)
        except OSError as error:
            if error.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):  # unsupported: write as before
                raise


def worker_count() -> int:
    """CPU cores this process may use (respects affinity masks and containers)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def cpu_model() -> str:
    """The CPU's model name as ``lscpu`` shows it (``/proc/cpuinfo``), e.g. ``AMD EPYC``; ``unknown`` elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def describe_device(device: Any) -> str:
    """A torch device in words, e.g. ``cuda:0 (NVIDIA H100 80GB HBM3)`` or ``cpu (2 cores, AMD EPYC)``: epoch times
    differ by the CPU model as much as by the core count."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return f"{device.type} ({worker_count()} cores, {cpu_model()})"


def repo_root() -> Path:
    """The checkout this code runs from (where ``conf/`` and ``mlruns/`` live); outside a checkout (an installed
    wheel), the current folder."""
    checkout = Path(__file__).resolve().parents[2]
    return checkout if (checkout / "conf" / "train.yaml").is_file() else Path.cwd()


def config_dir() -> Path:
    """Hydra's config folder: the checkout's ``conf/``, else the copy a wheel ships inside the package (setup.py)."""
    checkout = Path(__file__).resolve().parents[2] / "conf"
    return checkout if (checkout / "train.yaml").is_file() else Path(__file__).resolve().parent / "conf"


def keep_freed_memory() -> bool:
    """Ask glibc's allocator to keep freed memory for reuse instead of returning it to the OS (Linux only).

    Training and inference allocate and free the same multi-megabyte tensors every batch. By default glibc serves
    such blocks with fresh ``mmap`` calls or trims them off the heap, so every batch pays for page faults on
    newly mapped memory, which made the batch augmentation slower and less steady from run to run (measured with
    `make bench-data ARGS="--breakdown"`, docs/data.md). It is the same trade jemalloc/tcmalloc make (resident
    memory stays at its peak). ``CRACKCLF_KEEP_FREED_MEMORY=0`` turns it off.

    Returns whether the settings were applied.
    """
    if os.environ.get("CRACKCLF_KEEP_FREED_MEMORY", "1") == "0":
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl): nothing to tune
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    largest_heap_block = 32 * 1024 * 1024  # glibc refuses a larger mmap threshold on 64-bit systems
    return bool(mallopt(m_mmap_threshold, largest_heap_block)) and bool(mallopt(m_trim_threshold, 2**30))


def git_commit() -> str:
    """The checkout's commit (``unknown`` outside a git checkout), recorded with every training run."""
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_root(), capture_output=True, text=True,
                              timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
