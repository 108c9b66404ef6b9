"""ensure_dataset against a local HTTP server: download, cut-off + Range resume, atomic extraction, no-op, errors."""

from __future__ import annotations

import io
import shutil
import zipfile
from pathlib import Path

import pytest

from crackclf.data.download import MARKER, DownloadError, ensure_dataset
from tests.archive_server import ArchiveServer, closed_port_url, rar_tree, tar_tree, tree_files, zip_tree
from tests.conftest import write_dataset


@pytest.fixture(scope="module")
def source_tree(tmp_path_factory) -> Path:
    """The class tree the served archives contain (12 + 12 small JPEGs)."""
    return write_dataset(tmp_path_factory.mktemp("source"), per_class=12, size=64, seed=5)


@pytest.fixture(scope="module")
def zipped(source_tree) -> bytes:
    return zip_tree(source_tree)


def leftovers(dest: Path) -> list[str]:
    """Temporary extraction folders or partial files left in ``dest``."""
    return sorted(p.name for p in dest.iterdir() if ".extract-" in p.name or p.name.endswith(".part"))


def test_download_extracts_and_second_call_is_noop(tmp_path, source_tree, zipped):
    dest = tmp_path / "data"
    with ArchiveServer(zipped) as server:
        folder = ensure_dataset(dest, server.url, progress=False)
        assert folder == dest.resolve() / "concrete_crack"
        extracted = {k: v for k, v in tree_files(folder).items() if k != MARKER}
        assert extracted == tree_files(source_tree)
        assert (folder / MARKER).is_file()
        assert leftovers(dest) == [] and not (dest / "concrete_crack.archive").exists()
        assert len(server.requests) == 1 and server.requests[0]["range"] is None

        assert ensure_dataset(dest, server.url, progress=False) == folder
        assert len(server.requests) == 1  # complete copy found: nothing fetched


def test_transfer_cut_off_halfway_is_resumed_with_range(tmp_path, source_tree, zipped):
    dest = tmp_path / "data"
    half = len(zipped) // 2
    with ArchiveServer(zipped, drop_after=half) as server:
        with pytest.raises(DownloadError, match="run again to resume") as error:
            ensure_dataset(dest, server.url, retries=0, progress=False)
        assert f"{half:,} of {len(zipped)}" in str(error.value)
        part = dest / "concrete_crack.archive.part"
        assert part.stat().st_size == half
        assert not (dest / "concrete_crack").exists()  # nothing half-extracted in place

        folder = ensure_dataset(dest, server.url, retries=0, progress=False)
    assert [r["range"] for r in server.requests] == [None, f"bytes={half}-"]
    assert {k: v for k, v in tree_files(folder).items() if k != MARKER} == tree_files(source_tree)
    assert leftovers(dest) == []


def test_drops_are_resumed_within_one_call(tmp_path, source_tree, zipped):
    third = len(zipped) // 3
    with ArchiveServer(zipped, drop_after=third, drop_times=2) as server:
        folder = ensure_dataset(tmp_path / "data", server.url, retries=2, progress=False)
    assert [r["range"] for r in server.requests] == [None, f"bytes={third}-", f"bytes={2 * third}-"]
    assert {k: v for k, v in tree_files(folder).items() if k != MARKER} == tree_files(source_tree)


def test_server_ignoring_range_restarts_from_zero(tmp_path, source_tree, zipped):
    # A server that answers a Range request with the whole file (200) must not get its bytes appended.
    with ArchiveServer(zipped, drop_after=len(zipped) // 2, honour_range=False) as server:
        folder = ensure_dataset(tmp_path / "data", server.url, retries=1, progress=False)
    assert server.requests[1]["range"] is not None
    assert {k: v for k, v in tree_files(folder).items() if k != MARKER} == tree_files(source_tree)


def test_nested_tar_archive_and_kept_archive(tmp_path, source_tree):
    # The published archive may wrap the class folders in a top folder; the class root is what lands in place.
    payload = tar_tree(source_tree, prefix="Concrete Crack Images for Classification/")
    with ArchiveServer(payload) as server:
        folder = ensure_dataset(tmp_path / "data", server.url, progress=False, keep_archive=True)
    assert sorted(p.name for p in folder.iterdir()) == sorted([MARKER, "Negative", "Positive"])
    assert (tmp_path / "data" / "concrete_crack.archive").read_bytes() == payload
    assert leftovers(tmp_path / "data") == []


def test_offline_names_data_root(tmp_path):
    with closed_port_url() as url, pytest.raises(DownloadError) as error:
        ensure_dataset(tmp_path / "data", url, progress=False)
    message = str(error.value)
    assert "data.root=" in message and "offline" in message and "127.0.0.1" in message


def test_http_error_is_reported(tmp_path, zipped):
    with ArchiveServer(zipped, status=404) as server, pytest.raises(DownloadError, match="HTTP 404"):
        ensure_dataset(tmp_path / "data", server.url, progress=False)


def test_error_page_is_not_extracted(tmp_path):
    page = b"<html><body>Sign in to download</body></html>"
    with ArchiveServer(page, content_type="text/html") as server, pytest.raises(DownloadError) as error:
        ensure_dataset(tmp_path / "data", server.url, progress=False)
    assert "not a RAR, ZIP or tar archive" in str(error.value) and "<html>" in str(error.value)
    assert not (tmp_path / "data" / "concrete_crack").exists()


def test_unsafe_member_is_refused(tmp_path, source_tree):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("Negative/a.jpg", b"x")
        archive.writestr("Positive/../../escape.jpg", b"x")
    with ArchiveServer(buffer.getvalue()) as server, pytest.raises(DownloadError, match="unsafe path"):
        ensure_dataset(tmp_path / "data", server.url, progress=False)
    assert not list(tmp_path.rglob("escape.jpg"))


def test_archive_without_class_folders(tmp_path, source_tree):
    payload = zip_tree(source_tree / "Negative", prefix="Negative/")  # no Positive/
    with ArchiveServer(payload) as server, pytest.raises(DownloadError) as error:
        ensure_dataset(tmp_path / "data", server.url, progress=False)
    assert "Negative, Positive" in str(error.value) and "data.class_dirs" in str(error.value)
    assert not (tmp_path / "data" / "concrete_crack").exists() and leftovers(tmp_path / "data") == []


def test_archive_whose_class_folder_holds_no_images(tmp_path, source_tree):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted((source_tree / "Negative").iterdir()):
            archive.write(path, f"Negative/{path.name}")
        archive.writestr("Positive/README.txt", "no images here")  # a file, but not an image
    with ArchiveServer(buffer.getvalue()) as server, pytest.raises(DownloadError) as error:
        ensure_dataset(tmp_path / "data", server.url, progress=False)
    assert "Positive" in str(error.value) and "hold no images" in str(error.value)
    assert not (tmp_path / "data" / "concrete_crack").exists() and leftovers(tmp_path / "data") == []


def test_rar_archive_is_extracted(tmp_path, source_tree):
    # The published archive is a RAR: the same path, with entries rarfile reads without an external tool.
    with ArchiveServer(rar_tree(source_tree, prefix="Concrete Crack Images/")) as server:
        folder = ensure_dataset(tmp_path / "data", server.url, progress=False)
    assert {k: v for k, v in tree_files(folder).items() if k != MARKER} == tree_files(source_tree)


def test_compressed_rar_needs_a_tool_or_reports_the_failure(tmp_path, source_tree):
    payload = rar_tree(source_tree, method=0x33)  # claims compression: only an external tool can extract it
    with ArchiveServer(payload) as server, pytest.raises(DownloadError) as error:
        ensure_dataset(tmp_path / "data", server.url, progress=False)
    tools = [t for t in ("unrar", "unar", "7z", "7zz", "bsdtar") if shutil.which(t)]
    expected = "cannot extract" if tools else "install one of unrar, unar, 7z or bsdtar"
    assert expected in str(error.value)
    assert (tmp_path / "data" / "concrete_crack.archive").exists()  # kept: no need to download it again
    assert not (tmp_path / "data" / "concrete_crack").exists() and leftovers(tmp_path / "data") == []


def test_existing_incomplete_folder_is_not_overwritten(tmp_path, zipped):
    target = tmp_path / "data" / "concrete_crack"
    (target / "Negative").mkdir(parents=True)
    with ArchiveServer(zipped) as server, pytest.raises(DownloadError, match="not a complete download"):
        ensure_dataset(tmp_path / "data", server.url, progress=False)
    assert server.requests == []
