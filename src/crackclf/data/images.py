"""The one place where images enter crackclf.

Every image — training data, ``data verify``, the cache, ``predict``, the HTTP API — is opened by
:func:`open_image`, which knows formats, EXIF orientation, RGB conversion, pixel limits and how to say
"this file is bad, and why" in one line.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from crackclf.errors import CrackclfError

#: File suffixes treated as images when scanning folders (lower case).
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
)
#: Refuse images with more pixels than this (decompression bombs); overridable per call.
DEFAULT_MAX_PIXELS = 40_000_000
#: Smallest accepted side: below this an image carries no usable texture.
MIN_SIDE = 8

# Pillow's own bomb check is replaced by ours (which names the file and the limit).
Image.MAX_IMAGE_PIXELS = None

ImageSource = str | os.PathLike | bytes | BinaryIO


class ImageError(CrackclfError, ValueError):
    """An input that cannot be used as an image; ``str()`` is a one-line reason naming the source."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


def iter_image_files(folder: str | os.PathLike, *, folders: bool = True) -> Iterator[str]:
    """Every entry under ``folder`` (recursive) whose name has an image suffix, as ``folder``-joined paths.

    The one folder walker of crackclf (training inventory, evaluate, predict, config checks, benchmarks). Folder
    symlinks are not followed (a link loop cannot hang a scan); file symlinks, broken ones and hidden files are
    listed like any file, so that a bad one is reported with its reason instead of silently skipped. With
    ``folders`` (the default) a folder named like an image (``x.jpg/``) is listed too, for the same reason. The
    order is the walk's; :func:`list_image_files` sorts. A missing or unreadable folder yields nothing.
    """
    for directory, subfolders, names in os.walk(folder):
        for name in [*names, *subfolders] if folders else names:
            if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                yield os.path.join(directory, name)


def list_image_files(folder: str | os.PathLike, *, folders: bool = True) -> list[str]:
    """:func:`iter_image_files`, sorted (a stable order on every file system)."""
    return sorted(iter_image_files(folder, folders=folders))


def describe_source(source: ImageSource) -> str:
    """A printable name for an image source (a path, or ``<bytes>`` / ``<stream>``).

    Bytes of a file name that are not valid UTF-8 are shown as ``\\xff`` escapes, so the message can always be
    printed, logged and stored (a raw surrogate would make a UTF-8 write fail).
    """
    if isinstance(source, (str, os.PathLike)):
        return os.fsencode(source).decode("utf-8", "backslashreplace")  # the file name's bytes, escaped
    name = "<bytes>" if isinstance(source, bytes) else getattr(source, "name", "<stream>")
    return os.fsencode(name).decode("utf-8", "backslashreplace") if isinstance(name, (str, bytes)) else str(name)


def _check_path(path: Path, name: str) -> None:
    if path.is_symlink() and not path.exists():
        raise ImageError(name, "broken symbolic link (its target does not exist)")
    if not path.exists():
        raise ImageError(name, "file not found")
    if path.is_dir():
        raise ImageError(name, "is a directory, not an image file")
    if not path.is_file():  # a FIFO or device named like an image would block or never end
        raise ImageError(name, "not a regular file")
    if path.stat().st_size == 0:
        raise ImageError(name, "empty file (0 bytes)")
    if not os.access(path, os.R_OK):
        raise ImageError(name, "permission denied (file is not readable)")


def open_image(
    source: ImageSource,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: int | None = None,
    formats: tuple[str, ...] | None = None,
) -> Image.Image:
    """Open, fully decode and return an image as RGB with EXIF orientation applied.

    ``info["source_mode"]``, ``info["source_size"]`` and ``info["source_format"]`` of the result describe the file
    (its mode, its size as displayed, its Pillow format), whatever the draft decode made of it.

    Args:
        source: a path, raw bytes or a binary stream.
        max_pixels: refuse images whose header declares more pixels (decompression bombs).
        draft_size: for JPEGs, let the decoder downscale by a power of two while keeping both sides
            ≥ this size (several times faster when the caller resizes to a small size anyway).
        formats: accepted Pillow format names (e.g. ``("JPEG", "PNG")``); ``None`` accepts all.

    Raises:
        ImageError: with a one-line reason for every kind of bad input.
    """
    name = describe_source(source)
    if isinstance(source, bytes):
        if not source:
            raise ImageError(name, "empty file (0 bytes)")
        source = io.BytesIO(source)
    image = None
    try:
        if isinstance(source, (str, os.PathLike)):
            _check_path(Path(source), name)
        elif _remaining_bytes(source) == 0:  # e.g. an empty HTTP upload
            raise ImageError(name, "empty file (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow warns on odd EXIF/palette data; errors are what matter
            image = Image.open(source)
            if formats is not None and image.format not in formats:
                raise ImageError(name, f"format {image.format} is not accepted (accepted: {', '.join(formats)})")
            width, height = image.size
            if width * height > max_pixels:
                raise ImageError(
                    name, f"{width}x{height} = {width * height:,} pixels exceeds the limit of {max_pixels:,}"
                )
            if min(width, height) < MIN_SIDE:
                raise ImageError(name, f"{width}x{height} is too small (each side must be >= {MIN_SIDE} px)")
            if draft_size is not None and image.format == "JPEG":
                image.draft("RGB", (draft_size, draft_size))
            image.load()  # decode the whole stream now: truncation must surface here, not later
            source_mode, decoded_size, image_format = image.mode, image.size, image.format
            ImageOps.exif_transpose(image, in_place=True)
            turned = image.size != decoded_size  # EXIF rotated by 90°: the stored sides swap too
            source_size = (height, width) if turned else (width, height)
            result = _to_rgb(image)
            if result is image:
                if getattr(image, "n_frames", 1) > 1:
                    result = image.copy()  # multi-frame files keep their file open: detach before closing
                else:
                    image = None  # load() already closed a single-frame file; a copy showed in serving's profile
            result.info["source_mode"] = source_mode
            result.info["source_size"] = source_size  # as displayed, before any draft downscale
            result.info["source_format"] = image_format
            return result
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(name, "not a recognised image format") from None
    except PermissionError:  # before OSError, of which it is a subclass
        raise ImageError(name, "permission denied (file is not readable)") from None
    except FileNotFoundError:  # removed between listing and reading
        raise ImageError(name, "file not found") from None
    except Exception as error:  # noqa: BLE001 - malformed files make Pillow raise struct.error, IndexError, ...
        detail = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        raise ImageError(name, f"cannot decode ({detail})") from None
    finally:
        if image is not None:
            image.close()  # multi-frame files (GIF, TIFF) keep their handle open otherwise


def _remaining_bytes(stream: BinaryIO) -> int | None:
    """Bytes left in a seekable stream (``None`` when it cannot tell without consuming it)."""
    try:
        if not stream.seekable():
            return None
        position = stream.tell()
        end = stream.seek(0, os.SEEK_END)
        stream.seek(position)
        return end - position
    except (AttributeError, OSError, ValueError):
        return None


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB; transparency is composited on white, 16-bit is scaled down."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = array.max() or 1.0
        scale = 255.0 / (65535.0 if peak > 255 else 255.0)
        return Image.fromarray(np.clip(array * scale, 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


#: (format, width, height, first, second) → whether the two draft sizes decode at the same scale.
_SAME_DRAFT: dict[tuple, bool] = {}


def same_draft(data: bytes, image: Image.Image, first: int, second: int) -> bool:
    """Whether :func:`open_image` with ``draft_size=first`` and with ``draft_size=second`` decodes ``data`` to
    the same pixels (a JPEG at the same scale, or any other format, which has no draft mode). ``image``: what
    :func:`open_image` returned for ``data``; the answer depends only on its format and size."""
    key = (image.info["source_format"], *image.info["source_size"], first, second)  # the scale is symmetric in w, h
    if key in _SAME_DRAFT:
        return _SAME_DRAFT[key]
    if key[0] != "JPEG":
        _SAME_DRAFT[key] = True
        return True
    with Image.open(io.BytesIO(data)) as probe:
        probe.draft("RGB", (first, first))  # sets the scaled size without decoding
        scaled = probe.size
    with Image.open(io.BytesIO(data)) as probe:  # a second draft() on one image object is ignored
        probe.draft("RGB", (second, second))
        _SAME_DRAFT[key] = probe.size == scaled
    return _SAME_DRAFT[key]


def load_resized(source: ImageSource, size: int, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                 formats: tuple[str, ...] | None = None) -> np.ndarray:
    """Open ``source`` and resize it to ``size``×``size``; returns a ``(size, size, 3)`` uint8 array.

    The resize is Pillow's antialiased bilinear (``Image.BILINEAR`` with reducing_gap), the same in training,
    the cache and inference, so a model never sees a resize it was not trained on. ``max_pixels`` and ``formats``
    are passed to :func:`open_image`.
    """
    image = open_image(source, max_pixels=max_pixels, draft_size=size, formats=formats)
    return resize_array(image, size)


#: Identifies the resize used by :func:`load_resized`; part of the cache key.
RESIZE_METHOD = "pil-bilinear-antialias-draft"


def resize_array(image: Image.Image, size: int) -> np.ndarray:
    """Resize an RGB image to ``size``×``size`` and return it as a uint8 HWC array."""
    if image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR, reducing_gap=None)
    return np.array(image, dtype=np.uint8)  # a writable copy: torch.from_numpy warns on read-only arrays
