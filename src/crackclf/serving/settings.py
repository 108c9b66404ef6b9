"""The serving limits (a light module: the ``crackclf`` parser reads its defaults without importing FastAPI)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from PIL import Image

from crackclf.data.images import DEFAULT_MAX_PIXELS
from crackclf.errors import UsageError
from crackclf.utils import worker_count

#: Pillow format names accepted by default ("MPO" is how Pillow names the JPEGs many phone cameras write).
DEFAULT_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "BMP", "TIFF")


#: The ``crackclf serve`` option of each limit (named in error messages).
OPTIONS = {"max_upload_bytes": "--max-upload-mb", "max_pixels": "--max-pixels", "max_files": "--max-files",
           "max_tiles": "--max-tiles", "workers": "--workers", "formats": "--formats"}


@dataclass(frozen=True)
class ServeSettings:
    """The server's limits; every one is a ``crackclf serve`` option (see docs/serving.md)."""

    max_upload_bytes: int = 25 * 1024 * 1024  # whole request body, multipart overhead included
    max_pixels: int = DEFAULT_MAX_PIXELS  # per image, checked from the header before decoding
    formats: tuple[str, ...] = DEFAULT_FORMATS
    max_files: int = 32  # images per /predict request
    max_tiles: int = 4096  # windows per /analyze photo (a tiny stride on a huge photo would be a DoS)
    # Inference threads: one per usable core, each model call on one intra-op thread (``crackclf serve --threads``
    # default): lower latency than 1 worker x 2 threads on 2 cores (`make bench-serve`, docs/serving.md).
    workers: int = field(default_factory=worker_count)
    queue_size: int = 16  # requests waiting for a worker before the server answers 503
    retry_after_s: int = 1

    def __post_init__(self) -> None:
        for name in ("max_upload_bytes", "max_pixels", "max_files", "max_tiles", "workers", "retry_after_s"):
            if int(getattr(self, name)) < 1:
                raise UsageError(f"serving limit {name}={getattr(self, name)} ({OPTIONS.get(name, 'setting')}) "
                                 "must be >= 1.")
        if self.queue_size < 0:
            raise UsageError(f"serving limit queue_size={self.queue_size} (--queue) must be >= 0 (0: no waiting "
                             "requests).")
        formats = tuple(f.upper() for f in self.formats)
        Image.init()  # registers every plugin; MPO is opened by the JPEG plugin, so it is not a key of Image.OPEN
        known = set(Image.OPEN) | {"MPO"}
        unknown = [f for f in formats if f not in known]
        if not formats or unknown:
            raise UsageError(f"accepted formats (--formats) {', '.join(unknown) or '(none)'} are not image formats "
                             f"Pillow reads; choose from {', '.join(sorted(known))}.")
        object.__setattr__(self, "formats", formats)

    def public(self) -> dict[str, Any]:
        """The limits a client needs to know (the web page checks size and count before uploading)."""
        return {k: v for k, v in asdict(self).items() if k not in ("workers", "retry_after_s")}
