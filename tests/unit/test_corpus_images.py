"""The one image opener against the whole bad-input corpus (tests/corpus.py): paths, bytes, streams, resizing."""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from crackclf.data.images import ImageError, load_resized, open_image
from tests.corpus import ITEM_NAMES, SPECIAL_NAMES, make_corpus


@pytest.fixture(scope="module")
def corpus(bad_corpus):
    return {item.name: item for item in bad_corpus}


def test_corpus_has_every_kind_the_issue_lists(bad_corpus):
    assert tuple(item.name for item in bad_corpus) == ITEM_NAMES
    # Both outcomes are represented, and every invalid entry says which reason it must get.
    assert sum(item.valid for item in bad_corpus) >= 10
    assert all(item.reason for item in bad_corpus if not item.valid)


def _assert_outcome(item, opener) -> None:
    if item.valid:
        image = opener()
        assert image.mode == "RGB"
        if item.check:
            item.check(image)
    else:
        with pytest.raises(ImageError) as caught:
            opener()
        message = str(caught.value)
        assert item.reason in caught.value.reason, message
        assert "\n" not in message and len(message) < 300, message


@pytest.mark.parametrize("name", ITEM_NAMES)
def test_open_image_from_path(corpus, name):
    item = corpus[name]
    _assert_outcome(item, lambda: open_image(item.path))
    if not item.valid:  # the message names the file, printable even for undecodable names
        with pytest.raises(ImageError) as caught:
            open_image(item.path)
        assert item.display in str(caught.value)
        str(caught.value).encode("utf-8")  # never a lone surrogate


@pytest.mark.parametrize("name", [n for n in ITEM_NAMES if n not in SPECIAL_NAMES])
def test_open_image_from_bytes_and_stream(corpus, name):
    item = corpus[name]
    data = item.path.read_bytes()
    _assert_outcome(item, lambda: open_image(data))
    _assert_outcome(item, lambda: open_image(io.BytesIO(data)))


@pytest.mark.parametrize("name", ITEM_NAMES)
def test_load_resized_gives_model_input_or_reason(corpus, name):
    item = corpus[name]
    if item.valid:
        array = load_resized(item.path, 64)
        assert array.shape == (64, 64, 3) and array.dtype == np.uint8 and array.flags.writeable
    else:
        with pytest.raises(ImageError, match=item.reason):
            load_resized(item.path, 64)


def test_exif_orientation_survives_resizing(corpus):
    array = load_resized(corpus["exif_rotated"].path, 64).astype(int)
    assert array[:16].mean(axis=(0, 1))[0] > 150 and array[-16:].mean(axis=(0, 1))[2] > 150  # red top, blue bottom


def test_vanishing_and_odd_files_become_image_errors(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)  # would block Image.open forever
    with pytest.raises(ImageError, match="not a regular file"):
        open_image(fifo)
    with pytest.raises(ImageError, match="file not found"):
        open_image(tmp_path / "gone.jpg")
    # A PNG whose chunk data is garbage: Pillow raises non-OSError exceptions on some of these.
    good = io.BytesIO()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(good, "PNG")
    data = bytearray(good.getvalue())
    data[40:60] = b"\xff" * 20
    with pytest.raises(ImageError, match="cannot decode|not a recognised"):
        open_image(bytes(data))


def test_unreadable_file_is_refused_for_an_unprivileged_user():
    """chmod 000 must give "permission denied". Root reads anything, so as root the check runs in a forked child
    that has dropped to user ``nobody`` (the corpus entry is then a valid image, honestly labelled)."""
    folder = Path(tempfile.mkdtemp(prefix="crackclf-perm-", dir="/tmp"))
    try:
        folder.chmod(0o755)
        make_corpus(folder, include_special=False)
        locked = folder / "locked.jpg"
        shutil.copy(folder / "cmyk.jpg", locked)
        locked.chmod(0)
        if os.geteuid() != 0:
            with pytest.raises(ImageError, match="permission denied"):
                open_image(locked)
            return
        Image.init()  # load every Pillow plugin before dropping privileges
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: become nobody, try to open, report the outcome through the pipe
            os.close(read_end)
            try:
                os.setgid(65534)
                os.setuid(65534)
                try:
                    open_image(locked)
                    outcome = "opened"
                except ImageError as error:
                    outcome = "ImageError: " + error.reason
                except BaseException as error:  # noqa: BLE001 - report anything else as a failure
                    outcome = f"{type(error).__name__}: {error}"
                os.write(write_end, outcome.encode())
            finally:
                os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            outcome = pipe.read().decode()
        os.waitpid(pid, 0)
        assert outcome.startswith("ImageError: permission denied"), outcome
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_the_one_folder_walker_lists_image_named_entries(tmp_path):
    """Recursive and sorted; hidden files, file symlinks (broken too) and upper-case suffixes listed; a folder named
    like an image listed only with ``folders``; a symlinked folder not followed; other suffixes left out."""
    from crackclf.data.images import iter_image_files, list_image_files

    root = tmp_path / "root"
    (root / "b" / "deep").mkdir(parents=True)
    (root / "x.jpg").mkdir()  # a folder named like an image
    for name in ("b/deep/c.PNG", "a.jpg", ".hidden.jpg", "notes.txt", "b/z.tiff"):
        (root / name).write_bytes(b"not checked here")
    (root / "dangling.jpg").symlink_to(root / "missing.jpg")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "far.jpg").write_bytes(b"x")
    (root / "linked").symlink_to(outside, target_is_directory=True)
    files = [os.path.join(root, n) for n in (".hidden.jpg", "a.jpg", "b/deep/c.PNG", "b/z.tiff", "dangling.jpg")]
    assert list_image_files(root, folders=False) == files
    assert list_image_files(root) == sorted([*files, os.path.join(root, "x.jpg")])
    assert sorted(iter_image_files(str(root))) == list_image_files(root)
    assert list_image_files(tmp_path / "absent") == []
