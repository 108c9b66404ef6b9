"""Fetch the published data set: resumable HTTP download, size check, extraction that is atomic and idempotent.

``ensure_dataset(dest)`` leaves ``dest/concrete_crack/{Negative,Positive}`` in place and returns that folder.
A transfer that stops half-way keeps its ``.part`` file and the next attempt asks the server for the rest
(HTTP ``Range``); the archive is extracted into a temporary folder beside the target and renamed into place only
when complete, with a marker file, so a later call is a no-op and an interrupted one never leaves half a data set.

Formats are recognised by their first bytes, not by the URL: RAR (the published archive; extracted with
``rarfile``, which drives an external ``unrar``, ``unar``, ``7z`` or ``bsdtar``), ZIP and tar (stdlib).
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from filelock import FileLock
from tqdm import tqdm

from crackclf.data.images import iter_image_files
from crackclf.errors import CrackclfError
from crackclf.utils import atomic_write_text

#: Özgenel, "Concrete Crack Images for Classification", Mendeley Data 5y9wdsg2zt version 2 (a RAR archive).
MENDELEY_URL = (
    "https://data.mendeley.com/public-files/datasets/5y9wdsg2zt/files/"
    "8a70d8a5-bce9-4291-bab9-b48cfb3e87c3/file_downloaded"
)
DATASET_NAME = "concrete_crack"
CLASS_DIRS = ("Negative", "Positive")
#: Written into the extracted folder last; its presence means "complete, nothing to do".
MARKER = ".crackclf-download.json"
_CHUNK = 1 << 20
_RAR_MAGIC = (b"Rar!\x1a\x07\x00", b"Rar!\x1a\x07\x01\x00")


class DownloadError(CrackclfError, OSError):
    """The data set could not be fetched or extracted; the message says why and what to do instead."""


def ensure_dataset(
    dest: Path,
    url: str | None = None,
    *,
    name: str = DATASET_NAME,
    class_dirs: tuple[str, ...] = CLASS_DIRS,
    retries: int = 3,
    timeout: float = 60.0,
    progress: bool = True,
    keep_archive: bool = False,
) -> Path:
    """Return ``dest/name``, the folder holding one sub-folder per class, downloading and extracting it if needed.

    Args:
        dest: download folder (``data.download_dir``); the archive and the extracted folder go here.
        url: the archive (RAR, ZIP or tar, recognised by content); default ``$CRACKCLF_DATA_URL`` (a mirror),
            else :data:`MENDELEY_URL`.
        name: the extracted folder's name under ``dest``.
        class_dirs: sub-folders that must exist in the archive (somewhere; the folder holding them is kept).
        retries: how many times a dropped transfer is resumed within this call before giving up.
        timeout: seconds without data before a connection counts as dropped.
        progress: show a progress bar.
        keep_archive: keep the downloaded archive after a successful extraction.

    Raises:
        DownloadError: offline, HTTP errors, a short transfer, an unknown or unsafe archive, a missing class folder.
    """
    url = url or os.environ.get("CRACKCLF_DATA_URL") or MENDELEY_URL
    dest = Path(dest).resolve()
    target = dest / name
    if (target / MARKER).is_file():
        return target
    dest.mkdir(parents=True, exist_ok=True)
    # Two sweep jobs on a fresh machine: the second waits, then finds the marker.
    with FileLock(str(dest / f".{name}.lock")):
        if (target / MARKER).is_file():
            return target
        if target.exists():
            raise DownloadError(
                f"{target} exists but is not a complete download (no {MARKER} in it). If it holds the data set, "
                f"point data.root={target} at it; otherwise remove it and run again."
            )
        archive = dest / f"{name}.archive"
        if not archive.is_file():
            _download(url, archive, retries=retries, timeout=timeout, progress=progress)
        _extract(archive, target, class_dirs, url)
        if not keep_archive:
            archive.unlink(missing_ok=True)
    return target


# ------------------------------------------------------------------------------------------------------ download
def _offline_message(url: str, reason: object) -> str:
    return (
        f"cannot download the data set from {url} ({reason}). This machine looks offline or the server is "
        "unreachable: copy the data set here by other means and set data.root=/path/to/folder (the folder "
        f"holding {'/ and '.join(CLASS_DIRS)}/), or run `crackclf data download` where there is a network."
    )


def _download(url: str, archive: Path, *, retries: int, timeout: float, progress: bool) -> None:
    """Download ``url`` to ``archive`` through ``archive.part``, resuming with HTTP Range after a dropped transfer."""
    part = archive.with_name(archive.name + ".part")
    bar = _Bar(part.name.removesuffix(".part"), progress)
    try:
        for attempt in range(retries + 1):
            try:
                _transfer(url, part, timeout, bar)
            except _Interrupted as error:
                if attempt == retries:
                    raise DownloadError(
                        f"download of {url} stopped after {error.have:,} of {error.total or '?'} bytes "
                        f"({error}); the partial file {part} is kept, run again to resume"
                    ) from None
                time.sleep(min(0.5 * 2**attempt, 10.0))
                continue
            os.replace(part, archive)
            return
    finally:
        bar.close()


class _Interrupted(Exception):
    """A transfer that ended before its announced size; the bytes so far are in the ``.part`` file."""

    def __init__(self, have: int, total: int | None, reason: str) -> None:
        super().__init__(reason)
        self.have, self.total = have, total


class _Bar:
    """One progress bar across resumed attempts (created on the first response, when the size is known)."""

    def __init__(self, desc: str, enabled: bool) -> None:
        self.desc, self.enabled, self.bar = desc, enabled, None

    def start(self, total: int | None, have: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            self.bar = tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024, desc=self.desc)
        else:
            self.bar.reset(total)
            self.bar.update(have)

    def update(self, count: int) -> None:
        if self.bar is not None:
            self.bar.update(count)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _transfer(url: str, part: Path, timeout: float, bar: _Bar) -> None:
    """One request: append the missing bytes to ``part``; returns on a whole file, else raises _Interrupted."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "crackclf", "Accept-Encoding": "identity"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        if error.code == 416 and have:  # nothing left to send: the .part may already be whole
            total = _total_from_content_range(error.headers.get("Content-Range"))
            if total == have:
                return
            part.unlink()  # longer than the server's file: not ours, start over
            raise _Interrupted(0, total, "the partial file did not match the server's file") from None
        raise DownloadError(f"download of {url} failed: HTTP {error.code} {error.reason}") from None
    except (urllib.error.URLError, OSError) as error:
        raise DownloadError(_offline_message(url, getattr(error, "reason", error))) from None
    with response:
        if response.status == 206:
            start = _start_from_content_range(response.headers.get("Content-Range"))
            if start != have:
                raise DownloadError(f"the server resumed {url} at byte {start}, expected {have}; delete {part}")
            mode = "ab"
        else:  # 200: the server ignored Range, so this transfer starts from byte 0
            have, mode = 0, "wb"
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        bar.start(total, have)
        written = have
        try:
            with open(part, mode) as out:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    written += len(chunk)
                    bar.update(len(chunk))
        except (OSError, http.client.HTTPException) as error:  # reset, timeout, IncompleteRead
            raise _Interrupted(written, total, str(error) or type(error).__name__) from None
    # Without Content-Length (chunked) there is no size to check; the extraction then checks the archive.
    if total is not None and written != total:
        raise _Interrupted(written, total, "connection closed early")


def _start_from_content_range(value: str | None) -> int:
    # "bytes 100-199/200"
    try:
        return int(value.split()[1].split("-")[0])
    except (AttributeError, IndexError, ValueError):
        return -1


def _total_from_content_range(value: str | None) -> int | None:
    # "bytes */200"
    try:
        return int(value.rsplit("/", 1)[1])
    except (AttributeError, IndexError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------------- extraction
def archive_format(path: Path) -> str:
    """``"rar"``, ``"zip"`` or ``"tar"`` from the file's content; raises DownloadError otherwise."""
    with open(path, "rb") as handle:
        head = handle.read(8)
    if head.startswith(_RAR_MAGIC):
        return "rar"
    if zipfile.is_zipfile(path):
        return "zip"
    if tarfile.is_tarfile(path):
        return "tar"
    raise DownloadError(
        f"{path} is not a RAR, ZIP or tar archive (first bytes {head!r}); the server may have sent an error "
        "page: delete the file and try again, or download the data set by hand and set data.root"
    )


def _check_members(path: Path, names: list[str]) -> None:
    for member in names:
        pure = PurePosixPath(member.replace("\\", "/"))
        if pure.is_absolute() or ".." in pure.parts:
            raise DownloadError(f"{path} contains an unsafe path {member!r}; refusing to extract it")


def _extract_archive(archive: Path, into: Path) -> None:
    kind = archive_format(archive)
    if kind == "zip":
        with zipfile.ZipFile(archive) as handle:
            _check_members(archive, handle.namelist())
            handle.extractall(into)
    elif kind == "tar":
        with tarfile.open(archive) as handle:
            handle.extractall(into, filter="data")  # the "data" filter refuses links and paths outside ``into``
    else:
        import rarfile

        try:
            with rarfile.RarFile(archive) as handle:
                _check_members(archive, handle.namelist())
                handle.extractall(into)
        except rarfile.RarCannotExec:
            raise DownloadError(
                f"{archive} is a RAR archive and no extraction tool was found: install one of unrar, unar, 7z or "
                "bsdtar (e.g. `apt-get install unrar` or `apt-get install libarchive-tools`) and run again "
                "(the downloaded archive is kept)"
            ) from None
        except rarfile.Error as error:
            raise DownloadError(f"cannot extract {archive} ({error}); delete it and run again") from None


def _find_class_root(folder: Path, class_dirs: tuple[str, ...]) -> Path | None:
    """The shallowest folder under ``folder`` (itself included) that holds every class directory."""
    candidates = [folder, *sorted(p for p in folder.rglob("*") if p.is_dir())]
    for candidate in sorted(candidates, key=lambda p: len(p.parts)):
        if all((candidate / c).is_dir() for c in class_dirs):
            return candidate
    return None


def _extract(archive: Path, target: Path, class_dirs: tuple[str, ...], url: str) -> None:
    """Extract into a temporary folder beside ``target``; rename the class root into place when complete."""
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.extract-", dir=target.parent))
    try:
        try:
            _extract_archive(archive, scratch)
        except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error) as error:
            # Damaged, e.g. a transfer resumed onto a .part that was not the start of this file: never retry it.
            archive.unlink(missing_ok=True)
            raise DownloadError(f"{archive} (from {url}) is damaged ({error}); it was deleted, run again to "
                                "download it afresh") from None
        root = _find_class_root(scratch, class_dirs)
        if root is None:
            raise DownloadError(
                f"{archive} (from {url}) has no folder holding {', '.join(class_dirs)}; set data.class_dirs to "
                "its class folder names, or data.root to an already extracted copy"
            )
        counts = {c: sum(1 for _ in iter_image_files(root / c, folders=False)) for c in class_dirs}
        empty = [c for c, n in counts.items() if n == 0]
        if empty:
            raise DownloadError(f"{archive}: class folder(s) {', '.join(empty)} hold no images; delete it and run "
                                "again")
        atomic_write_text(root / MARKER, json.dumps({
            "url": url, "archive_bytes": archive.stat().st_size, "files": counts,
            "extracted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }, indent=2))
        os.replace(root, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
