"""Decode-once cache: two processes building at once make one valid file; a changed image gets a new cache."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import numpy as np

from crackclf.data.cache import build_cache, cache_path
from crackclf.data.images import load_resized
from crackclf.data.inventory import scan
from tests.conftest import REPO

BUILDER = """
import sys, time
from pathlib import Path
from crackclf.data.cache import build_cache
from crackclf.data.inventory import read_records
root, records_csv, cache, go, ready = sys.argv[1:6]
records = read_records(Path(records_csv))
Path(ready).touch()  # imports done: tell the test, then wait for the other builder
while not Path(go).exists():  # start together
    time.sleep(0.005)
array = build_cache(Path(root), [r.path for r in records], [r.md5 for r in records], 48, Path(cache))
print("shape", array.shape, flush=True)
"""


def test_concurrent_builders_make_one_valid_cache(tiny_dataset, tmp_path):
    inventory = scan(tiny_dataset, ("Negative", "Positive"), tmp_path / "inv", progress=False)
    records_csv = next((tmp_path / "inv").glob("inventory-*.csv"))
    cache, go = tmp_path / "cache", tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    ready = [tmp_path / f"ready-{i}" for i in range(2)]
    builders = [
        subprocess.Popen([sys.executable, "-c", BUILDER, str(tiny_dataset), str(records_csv), str(cache), str(go),
                          str(flag)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for flag in ready
    ]
    deadline = time.monotonic() + 120
    while not all(flag.exists() for flag in ready):  # a handshake, not a guess at how long imports take
        assert time.monotonic() < deadline and all(b.poll() is None for b in builders), "a builder did not start"
        time.sleep(0.01)
    go.touch()
    outputs = [builder.communicate(timeout=240) for builder in builders]
    assert [b.returncode for b in builders] == [0, 0], [err[-2000:] for _, err in outputs]
    assert all("shape (80, 48, 48, 3)" in out for out, _ in outputs)
    # The lock let exactly one of them decode (only a builder shows the progress bar); the other reused its file.
    assert sum("caching images" in err for _, err in outputs) == 1
    assert sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) == [
        cache_path(cache, [(r.path, r.md5) for r in inventory.records], 48).name
    ]
    array = np.load(next(cache.glob("*.npy")), mmap_mode="r")
    for index, record in enumerate(inventory.records):
        assert np.array_equal(array[index], load_resized(tiny_dataset / record.path, 48)), record.path


def test_changed_image_gets_a_new_cache(tiny_dataset, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tiny_dataset, root)
    classes = ("Negative", "Positive")
    before = scan(root, classes, tmp_path / "inv", progress=False)
    paths = [r.path for r in before.records]
    old = build_cache(root, paths, [r.md5 for r in before.records], 32, tmp_path / "cache", progress=False)
    changed = root / "Positive" / "00007.jpg"
    shutil.copyfile(root / "Negative" / "00001.jpg", changed)  # same name, new content
    after = scan(root, classes, tmp_path / "inv", progress=False)  # the stored inventory is keyed by size/mtime
    assert [r.path for r in after.records] == paths
    key_before = cache_path(tmp_path / "cache", [(r.path, r.md5) for r in before.records], 32)
    key_after = cache_path(tmp_path / "cache", [(r.path, r.md5) for r in after.records], 32)
    assert key_before != key_after
    new = build_cache(root, paths, [r.md5 for r in after.records], 32, tmp_path / "cache", progress=False)
    row = paths.index("Positive/00007.jpg")
    assert np.array_equal(new[row], load_resized(changed, 32)) and not np.array_equal(old[row], new[row])
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2
    assert cache_path(tmp_path / "cache", [(r.path, r.md5) for r in after.records], 48) != key_after  # size too


def _mixed_folder(root):
    """JPEGs whose draft scale at 64 px is (227 px) and is not (1,000 px at 200 px) the cache's, a PNG (no draft
    mode), an EXIF-rotated JPEG and an unreadable file."""
    from PIL import Image

    rng = np.random.default_rng(3)
    for folder in ("Negative", "Positive"):
        (root / folder).mkdir(parents=True)
        for index in range(3):
            pixels = rng.integers(0, 255, (227, 227, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / folder / f"tile{index}.jpg", quality=90)
    big = rng.integers(0, 255, (600, 1000, 3), dtype=np.uint8)
    Image.fromarray(big).save(root / "Positive" / "big.jpg", quality=90)
    Image.fromarray(big[:300, :300]).save(root / "Negative" / "lossless.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated by 90°: 600 wide, 1,000 high
    Image.fromarray(big).save(root / "Negative" / "turned.jpg", exif=exif, quality=90)
    (root / "Negative" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return root


def test_the_scan_decodes_once_and_the_caches_gather_exactly_what_decoding_gives(tmp_path):
    from crackclf.data.cache import DecodedImages

    root = _mixed_folder(tmp_path / "data")
    classes = ("Negative", "Positive")
    for size in (96, 200):  # 200: the big JPEGs decode at another draft scale for the cache than for the hashes
        inventory = scan(root, classes, tmp_path / f"inv{size}", progress=False, decode_size=size)
        assert inventory.decoded is not None and inventory.decoded.exists()
        decoded = DecodedImages.of(root, inventory.records, inventory.decoded, size)
        readable = inventory.readable
        assert len(decoded.rows) == len(readable) == len(inventory.records) - 1  # broken.jpg has no row
        paths = [r.path for r in readable]
        gathered = build_cache(root, paths, [r.md5 for r in readable], size, tmp_path / "cache", progress=False,
                               decoded=[decoded])
        for row, record in enumerate(readable):
            assert np.array_equal(gathered[row], load_resized(root / record.path, size)), (size, record.path)
        assert not list((tmp_path / "cache").glob("images-*.npy")), "gathered rows: no second cache file"
        # The planar layout the datamodule keeps is free to take.
        assert np.ascontiguousarray(gathered.transpose(0, 3, 1, 2)).base is gathered.base
        # Another process (a DDP rank) reading the stored inventory finds the same store.
        again = scan(root, classes, tmp_path / f"inv{size}", progress=False, decode_size=size)
        assert again.decoded == inventory.decoded
        # Sizes are the files' as displayed, whatever the draft decode made of them.
        sizes = {r.path: (r.width, r.height) for r in inventory.records}
        assert sizes["Positive/big.jpg"] == (1000, 600) and sizes["Negative/turned.jpg"] == (600, 1000)
        assert sizes["Negative/tile0.jpg"] == (227, 227)
    # A content change is a new inventory, and an image missing from the store is decoded, not gathered.
    other = scan(root, classes, tmp_path / "inv96", progress=False, decode_size=48)
    assert other.decoded is None
    stale = DecodedImages.of(root, inventory.records, inventory.decoded, 200)
    rows = inventory.readable
    built = build_cache(root, [r.path for r in rows], ["0" * 32] + [r.md5 for r in rows[1:]], 200,
                        tmp_path / "cache", progress=False, decoded=[stale])
    assert len(list((tmp_path / "cache").glob("images-*.npy"))) == 1
    assert np.array_equal(built[0], load_resized(root / rows[0].path, 200))
