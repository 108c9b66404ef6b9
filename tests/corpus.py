"""A bad-input corpus: every kind of file a user or a scraped data set can throw at crackclf, with the outcome
each entry point must produce.

``make_corpus(folder)`` writes the files and returns one :class:`CorpusItem` per entry. A valid item must come
out of :func:`crackclf.data.images.open_image` as RGB (EXIF orientation applied, ``check`` passes on the decoded
image); an invalid one must be refused with an :class:`~crackclf.data.images.ImageError` whose reason contains
``reason``. ``install_corpus(root, class_dir)`` drops the corpus into a class folder of a data tree, which is how
the data, training and inference entry points are tested against it.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

#: The file name of the non-UTF-8 entry (0xFF is never valid UTF-8); kept as bytes, as the file system sees it.
NON_UTF8_NAME = b"concrete_\xff\xfe_latin1.jpg"

#: Every entry, in the order make_corpus writes them (tests parametrize over these names).
ITEM_NAMES = (
    "truncated_jpeg", "zero_bytes", "random_bytes", "html_as_jpg", "one_pixel", "decompression_bomb",
    "grayscale_jpeg", "rgba_png", "palette_gif", "animated_gif", "cmyk_jpeg", "png_16bit", "exif_rotated",
    "tiny_image", "tiff", "webp", "non_utf8_name", "broken_symlink", "directory", "unreadable",
)
#: The entries that are not regular readable files (left out where inputs arrive as bytes, e.g. HTTP uploads).
SPECIAL_NAMES = ("broken_symlink", "directory", "unreadable")

# Colours chosen far apart so that "which colour is where" survives JPEG compression and resizing.
RED, BLUE = (220, 30, 30), (30, 30, 220)


@dataclass
class CorpusItem:
    """One corpus entry: where it is, what it is, and what must happen to it."""

    name: str  # short identifier (stable across runs; used as the pytest id)
    path: Path
    valid: bool
    reason: str = ""  # substring of ImageError.reason for invalid items
    check: Callable[[Image.Image], None] | None = None  # extra assertions on the decoded RGB image
    description: str = ""

    @property
    def display(self) -> str:
        """The file name as crackclf prints it (undecodable bytes escaped)."""
        return os.fsencode(self.path.name).decode("utf-8", "backslashreplace")


def _concrete(size: tuple[int, int] = (64, 48), seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = np.clip(rng.normal(170, 15, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def _jpeg_bytes(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90, **kwargs)
    return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A 60-byte PNG whose header declares ``width``×``height`` pixels (10 gigapixels by default)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    idat = zlib.compress(b"\x00" * 16)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


# ------------------------------------------------------------------------------------------------ image checks
def _is_rgb(size: tuple[int, int] | None = None) -> Callable[[Image.Image], None]:
    def check(image: Image.Image) -> None:
        assert image.mode == "RGB", image.mode
        if size is not None:
            assert image.size == size, image.size

    return check


def _concrete_check(image: Image.Image) -> None:
    # The generated texture is grey around 170: a wrong CMYK/palette/16-bit conversion shows up as a shifted
    # or inverted mean.
    _is_rgb((64, 48))(image)
    mean = np.asarray(image, dtype=np.float64).mean(axis=(0, 1))
    assert np.all(np.abs(mean - 170) < 10), mean


def _grey_check(image: Image.Image) -> None:
    pixels = np.asarray(image, dtype=np.int16)
    assert image.mode == "RGB"
    assert np.abs(pixels[..., 0] - pixels[..., 1]).max() <= 2 and np.abs(pixels[..., 1] - pixels[..., 2]).max() <= 2


def _rgba_check(image: Image.Image) -> None:
    # Left half opaque red, right half fully transparent: transparency must become white, not black.
    pixels = np.asarray(image)
    assert image.mode == "RGB"
    assert tuple(pixels[10, 5]) == RED, tuple(pixels[10, 5])
    assert tuple(pixels[10, -5]) == (255, 255, 255), tuple(pixels[10, -5])


def _sixteen_bit_check(image: Image.Image) -> None:
    # The 16-bit ramp spans 0..65535; scaled to 8 bits it must span (almost) 0..255, not saturate or vanish.
    pixels = np.asarray(image)
    assert image.mode == "RGB"
    assert pixels.min() <= 5 and pixels.max() >= 250, (pixels.min(), pixels.max())


def _exif_check(image: Image.Image) -> None:
    # Stored 64x32 with red left / blue right and EXIF orientation 6 (display rotated 90° clockwise):
    # displayed it is 32x64 with red on top and blue at the bottom.
    assert image.size == (32, 64), image.size
    pixels = np.asarray(image, dtype=np.int16)
    top, bottom = pixels[:24].mean(axis=(0, 1)), pixels[-24:].mean(axis=(0, 1))
    assert top[0] > top[2] + 100 and bottom[2] > bottom[0] + 100, (top, bottom)


def _animated_check(image: Image.Image) -> None:
    # The first frame (red) is the image; later frames (blue) are ignored.
    pixels = np.asarray(image, dtype=np.int16).mean(axis=(0, 1))
    assert pixels[0] > pixels[2] + 100, pixels


# ------------------------------------------------------------------------------------------------ the corpus
def make_corpus(folder: Path, *, include_special: bool = True) -> list[CorpusItem]:
    """Write the corpus into ``folder`` and return its items.

    ``include_special=False`` leaves out the entries that are not regular files (symlink, directory) and the
    unreadable file, for entry points that receive bytes (the HTTP API) rather than paths.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    items: list[CorpusItem] = []

    def add(name: str, filename: str | bytes, content: bytes | None, valid: bool, reason: str = "",
            check: Callable[[Image.Image], None] | None = None, description: str = "") -> Path:
        path = Path(os.fsdecode(os.path.join(os.fsencode(folder), os.fsencode(filename))))
        if content is not None:
            path.write_bytes(content)
        items.append(CorpusItem(name, path, valid, reason, check, description))
        return path

    good = _jpeg_bytes(_concrete())
    # ---- invalid content
    add("truncated_jpeg", "truncated.jpg", good[: len(good) // 2], False, "cannot decode",
        description="a JPEG cut in half (interrupted download)")
    add("zero_bytes", "empty.jpg", b"", False, "empty file")
    add("random_bytes", "random.jpg", np.random.default_rng(1).bytes(4096), False, "not a recognised image",
        description="4 KiB of random bytes named .jpg")
    add("html_as_jpg", "page.jpg", b"<!DOCTYPE html><html><head><title>404 Not Found</title></head>"
        b"<body><h1>Not Found</h1></body></html>\n", False, "not a recognised image",
        description="an HTML error page saved as .jpg (typical of scraped data)")
    add("one_pixel", "one_pixel.png", _encode(Image.new("RGB", (1, 1), RED), "PNG"), False, "too small")
    add("decompression_bomb", "bomb.png", bomb_png(), False, "exceeds the limit",
        description="a PNG header declaring 100000x100000 pixels")

    # ---- valid, but unusual
    add("grayscale_jpeg", "grey.jpg", _jpeg_bytes(_concrete().convert("L")), True, check=_grey_check)
    rgba = Image.new("RGBA", (40, 20), (0, 0, 0, 0))
    rgba.paste(Image.new("RGBA", (20, 20), (*RED, 255)), (0, 0))
    add("rgba_png", "rgba.png", _encode(rgba, "PNG"), True, check=_rgba_check)
    add("palette_gif", "palette.gif", _encode(_concrete().convert("P", palette=Image.ADAPTIVE), "GIF"), True,
        check=_concrete_check)
    frames = [Image.new("RGB", (32, 32), RED), Image.new("RGB", (32, 32), BLUE)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    add("animated_gif", "animated.gif", buffer.getvalue(), True, check=_animated_check)
    add("cmyk_jpeg", "cmyk.jpg", _jpeg_bytes(_concrete().convert("CMYK")), True, check=_concrete_check)
    ramp = (np.arange(64 * 48, dtype=np.uint32).reshape(48, 64) * 65535 // (64 * 48 - 1)).astype(np.uint16)
    sixteen = Image.fromarray(ramp)  # mode I;16
    assert sixteen.mode.startswith("I;16"), sixteen.mode
    add("png_16bit", "depth16.png", _encode(sixteen, "PNG"), True, check=_sixteen_bit_check)
    stored = Image.new("RGB", (64, 32), RED)
    stored.paste(Image.new("RGB", (32, 32), BLUE), (32, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    add("exif_rotated", "exif_rotated.jpg", _jpeg_bytes(stored, exif=exif.tobytes()), True, check=_exif_check)
    add("tiny_image", "tiny.png", _encode(_concrete((12, 12)), "PNG"), True, check=_is_rgb((12, 12)),
        description="12x12, far below the 64 px model input")
    add("tiff", "scan.tiff", _encode(_concrete(), "TIFF"), True, check=_concrete_check)
    add("webp", "photo.webp", _encode(_concrete(), "WEBP"), True, check=_concrete_check)
    add("non_utf8_name", NON_UTF8_NAME, good, True, check=_concrete_check,
        description="a valid JPEG whose file name is not valid UTF-8")

    if include_special:
        link = add("broken_symlink", "dangling.jpg", None, False, "broken symbolic link")
        link.symlink_to(folder / "does_not_exist.jpg")
        directory = add("directory", "x.jpg", None, False, "is a directory")
        directory.mkdir()
        unreadable = add("unreadable", "locked.jpg", good, False, "permission denied")
        unreadable.chmod(0)
        if os.access(unreadable, os.R_OK):
            # Running as root: permissions do not stop reads, so the file is a perfectly good image here. The
            # refusal itself is tested as an unprivileged user (tests/unit/test_corpus_images.py).
            items[-1] = CorpusItem("unreadable", unreadable, True, check=_concrete_check,
                                   description="chmod 000, but readable because the tests run as root")
    return items


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def install_corpus(root: Path, class_dir: str = "Positive", **kwargs) -> list[CorpusItem]:
    """Put the corpus into ``root/class_dir`` (next to the good images of a data tree); returns its items."""
    return make_corpus(Path(root) / class_dir, **kwargs)


def valid_items(items: list[CorpusItem]) -> list[CorpusItem]:
    return [item for item in items if item.valid]


def invalid_items(items: list[CorpusItem]) -> list[CorpusItem]:
    return [item for item in items if not item.valid]
