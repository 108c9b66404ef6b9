"""A full disk while writing the image cache or a checkpoint fails cleanly, and leaves nothing a later run would trust;
a partial download (``.part``) is never used as a complete one.

Where the tests run as root, a real 256 KiB tmpfs is mounted and filled; everywhere, the same failure is also
simulated by making the write raise ENOSPC (the only part that differs is who raises it)."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from crackclf.data.cache import build_cache
from crackclf.data.inventory import list_class_files
from crackclf.training.checkpointing import AtomicCheckpointIO
from crackclf.utils import DiskFullError
from tests.conftest import write_dataset


@pytest.fixture
def tiny_disk(tmp_path) -> Path:
    """A 256 KiB tmpfs (needs root and permission to mount; skipped otherwise)."""
    mount_point = tmp_path / "tiny_disk"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount_point)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or 'not root'}); the simulated test covers it")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    root = write_dataset(tmp_path_factory.mktemp("disk_full_data"), per_class=20, size=64, seed=9)
    return [str(root / relative) for relative, _ in list_class_files(root, ("Negative", "Positive"))]


def no_partial_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if p.suffix in (".npy", ".tmp", ".ckpt") and p.name != "last.ckpt"]


# ---------------------------------------------------------------------------------------------------- image cache
def test_cache_build_on_a_full_disk_fails_cleanly(tiny_disk, images, tmp_path):
    # 40 images at 64 px are 480 KiB: more than the disk holds. Before the fix this died of SIGBUS.
    with pytest.raises(DiskFullError) as caught:
        build_cache(Path("/"), images, ["x"] * len(images), 64, tiny_disk / "cache", progress=False)
    assert caught.value.errno == errno.ENOSPC and str(tiny_disk / "cache") in str(caught.value)
    assert no_partial_files(tiny_disk)
    with pytest.raises(DiskFullError):  # a second attempt finds nothing half-built to trust, and fails the same way
        build_cache(Path("/"), images, ["x"] * len(images), 64, tiny_disk / "cache", progress=False)
    built = build_cache(Path("/"), images, ["x"] * len(images), 64, tmp_path / "roomy", progress=False)
    assert built.shape == (40, 64, 64, 3) and built.any()


def test_cache_build_when_the_disk_fills_up_simulated(images, tmp_path, monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("crackclf.utils.os.posix_fallocate", full)
    with pytest.raises(DiskFullError, match="no space left on the disk of .*images-64px-40-"):
        build_cache(Path("/"), images, ["x"] * len(images), 64, tmp_path / "cache", progress=False)
    assert no_partial_files(tmp_path / "cache")


# ----------------------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_on_a_full_disk_keeps_the_previous_one(tiny_disk):
    writer, path = AtomicCheckpointIO(), tiny_disk / "checkpoints" / "last.ckpt"
    writer.save_checkpoint({"epoch": 1, "weights": torch.arange(1000.0)}, path)
    with pytest.raises(DiskFullError, match="the previous file, if any, is intact"):
        writer.save_checkpoint({"epoch": 2, "weights": torch.zeros(400_000)}, path)  # 1.6 MB
    previous = torch.load(path, weights_only=False)
    assert previous["epoch"] == 1 and torch.equal(previous["weights"], torch.arange(1000.0))
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


def test_checkpoint_write_interrupted_by_enospc_simulated(tmp_path, monkeypatch):
    writer, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    writer.save_checkpoint({"epoch": 1}, path)
    real_write = Path.write_bytes

    def half_then_full(self, data):
        real_write(self, bytes(memoryview(data)[: len(data) // 2]))  # some blocks landed, then the disk was full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_bytes", half_then_full)
    with pytest.raises(DiskFullError):
        writer.save_checkpoint({"epoch": 2, "weights": torch.ones(10_000)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=False) == {"epoch": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


# -------------------------------------------------------------------------------------------------- partial files
def test_a_part_file_is_never_used_as_a_complete_download(tmp_path, images):
    from crackclf.data.download import DownloadError, ensure_dataset
    from tests.archive_server import ArchiveServer, closed_port_url, zip_tree

    archive = zip_tree(Path(images[0]).parent.parent)
    dest = tmp_path / "data"
    dest.mkdir()
    part = dest / "concrete_crack.archive.part"
    part.write_bytes(archive)  # every byte is there, but nobody confirmed that it is the whole file
    with closed_port_url() as url, pytest.raises(DownloadError, match="cannot download"):
        ensure_dataset(dest, url, retries=0, progress=False)
    assert part.read_bytes() == archive and not (dest / "concrete_crack").exists()
    assert not (dest / "concrete_crack.archive").exists()

    # A .part that is not a prefix of the server's file: the result does not extract, and nothing is installed.
    part.write_bytes(np.random.default_rng(0).bytes(len(archive) // 2))
    with ArchiveServer(archive) as server:
        with pytest.raises(DownloadError, match="is damaged .* run again to download it afresh"):
            ensure_dataset(dest, server.url, retries=0, progress=False)
        assert not (dest / "concrete_crack").exists()
        assert sorted(p.name for p in dest.iterdir()) == [".concrete_crack.lock"]  # damaged archive discarded
        assert ensure_dataset(dest, server.url, retries=0, progress=False).is_dir()  # and the next run succeeds


def test_part_files_in_a_data_folder_are_not_images(tmp_path):
    root = write_dataset(tmp_path / "data", per_class=2, size=32)
    (root / "Positive" / "00009.jpg.part").write_bytes((root / "Positive" / "00000.jpg").read_bytes()[:100])
    files = [relative for relative, _ in list_class_files(root, ("Negative", "Positive"))]
    assert files == ["Negative/00000.jpg", "Negative/00001.jpg", "Positive/00000.jpg", "Positive/00001.jpg"]


def test_a_scan_without_room_for_its_decoded_images_keeps_the_inventory(images, tmp_path, monkeypatch, caplog):
    from crackclf.data.inventory import scan

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("crackclf.utils.os.posix_fallocate", full)
    root = Path(images[0]).parents[1]
    inventory = scan(root, ("Negative", "Positive"), tmp_path / "cache", progress=False, decode_size=64)
    assert inventory.decoded is None and len(inventory.readable) == len(images)
    assert "no room to keep the images decoded at 64 px" in caplog.text
    monkeypatch.undo()  # the inventory was stored: a later scan reads it, with no store to gather from
    assert scan(root, ("Negative", "Positive"), tmp_path / "cache", progress=False, decode_size=64).decoded is None
    assert not list((tmp_path / "cache").glob("*.tmp"))
