"""The tolerant matcher (crackclf.data.shifted) and the split's grouping by parent photo: shifted and rescaled
crops of one generated photo are matched where the whole-image perceptual hash is too far apart, other photos are
not, and tiles named in a MANIFEST.csv stay with their photo."""

from __future__ import annotations

import csv

import imagehash
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from crackclf.data.inventory import NEAR_DUPLICATE_BITS, FileRecord, read_parents, scan
from crackclf.data.shifted import KEYS_PER_IMAGE, QUERY, SHIFTED_DUPLICATE_BITS, shift_keys, shifted_pairs
from crackclf.data.split import group_records, make_split
from crackclf.errors import UsageError

SIDE = 227  # Özgenel's tile size


def photo(seed: int, side: int = 320) -> Image.Image:
    """A smooth grey surface with blotches and a dark crack: structure at the scale the hashes see."""
    rng = np.random.default_rng(seed)
    coarse = rng.normal(0, 1, (12, 12))
    field = np.asarray(Image.fromarray(coarse.astype(np.float32), "F").resize((side, side), Image.Resampling.BICUBIC))
    pixels = np.clip(165 + 25 * field / (np.abs(field).max() + 1e-6), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "L").convert("RGB")
    draw = ImageDraw.Draw(image)
    x, y, points = int(rng.integers(side // 4, 3 * side // 4)), 0, []
    while y < side:
        points.append((x, y))
        x, y = int(np.clip(x + rng.integers(-14, 15), 0, side - 1)), y + int(rng.integers(10, 25))
    draw.line(points, fill=(45, 45, 45), width=7)
    return image.filter(ImageFilter.GaussianBlur(1))


def crop(image: Image.Image, left: int, top: int, side: int = SIDE) -> Image.Image:
    return image.crop((left, top, left + side, top + side))


def test_keys_are_one_hash_per_window_and_the_query_is_the_centred_one():
    keys = shift_keys(crop(photo(0), 40, 40))
    assert keys.shape == (KEYS_PER_IMAGE,) and keys.dtype == np.uint64
    assert len(np.unique(keys)) > KEYS_PER_IMAGE // 2  # windows at other offsets see other content
    assert shift_keys(crop(photo(0), 40, 40))[QUERY] == keys[QUERY]  # deterministic


def test_shifted_and_rescaled_copies_match_where_the_perceptual_hash_does_not():
    big = photo(1)
    original = crop(big, 40, 40)
    shifted = crop(big, 58, 52)  # 18 and 12 pixels off, like the pairs of issue #17
    rescaled = big.crop((35, 35, 35 + 236, 35 + 236)).resize((SIDE, SIDE), Image.Resampling.BILINEAR)  # 4 % zoom
    others = [crop(photo(seed), 40, 40) for seed in range(2, 10)]
    images = [original, shifted, rescaled, *others]
    phash = [imagehash.phash(image) for image in images]
    assert phash[0] - phash[1] > NEAR_DUPLICATE_BITS  # the copy the existing grouping misses
    pairs = {tuple(p) for p in shifted_pairs(np.stack([shift_keys(image) for image in images]))}
    assert (0, 1) in pairs and (0, 2) in pairs
    assert not any(i >= 3 or j >= 3 for i, j in pairs), pairs  # no other photo joins
    # Two labels: only images of the same label are compared.
    labelled = shifted_pairs(np.stack([shift_keys(image) for image in images]), SHIFTED_DUPLICATE_BITS,
                             np.array([0, 1, 0] + [0] * len(others)))
    assert {tuple(p) for p in labelled} == {(0, 2)}


def test_the_search_finds_exactly_the_pairs_within_the_distance():
    rng = np.random.default_rng(3)
    keys = rng.integers(0, 2**63, size=(60, KEYS_PER_IMAGE), dtype=np.uint64)
    flips = [0, 1, 3, 4, 9]  # bits flipped in image i+30's query against one of image i's keys
    for i, bits in enumerate(flips):
        flipped = keys[i, 7]
        for bit in rng.choice(64, size=bits, replace=False):
            flipped ^= np.uint64(1 << int(bit))
        keys[30 + i, QUERY] = flipped
    brute = {(i, j) for i in range(60) for j in range(i + 1, 60)
             if min(np.bitwise_count(keys[i] ^ keys[j, QUERY]).min(), np.bitwise_count(keys[j] ^ keys[i, QUERY]).min())
             <= SHIFTED_DUPLICATE_BITS}
    found = {tuple(p) for p in shifted_pairs(keys, SHIFTED_DUPLICATE_BITS)}
    assert found == brute == {(i, 30 + i) for i, bits in enumerate(flips) if bits <= SHIFTED_DUPLICATE_BITS}


def test_group_records_joins_shifted_copies_and_tiles_of_one_parent(tmp_path):
    big = photo(4)
    folder = tmp_path / "data"
    (folder / "crack").mkdir(parents=True)
    (folder / "no_crack").mkdir()
    crop(big, 40, 40).save(folder / "crack" / "a.png")
    crop(big, 56, 50).save(folder / "crack" / "b.png")
    for seed in range(5, 9):
        crop(photo(seed), 40, 40).save(folder / "crack" / f"other{seed}.png")
        crop(photo(seed + 10), 40, 40).save(folder / "no_crack" / f"plain{seed}.png")
    inventory = scan(folder, ("no_crack", "crack"), tmp_path / "cache", progress=False)
    records = inventory.readable
    assert all(r.shift is not None for r in records)
    again = scan(folder, ("no_crack", "crack"), tmp_path / "cache", progress=False)  # the stored inventory
    assert all((a.shift == b.shift).all() for a, b in zip(records, again.readable, strict=True))
    index = {r.path: n for n, r in enumerate(records)}
    groups = group_records(records)
    assert groups[index["crack/a.png"]] == groups[index["crack/b.png"]]
    assert len(set(groups)) == len(records) - 1
    assert len(set(group_records(records, shift_bits=None))) == len(records)  # off: the pair stays apart

    parents = {"no_crack/plain5.png": "photo1", "no_crack/plain6.png": "photo1", "crack/other5.png": "photo1"}
    grouped = group_records(records, parents=parents)
    assert len({grouped[index[p]] for p in parents}) == 1
    rows, _ = make_split(records, 0.3, 0.3, seed=0, parents=parents)
    assert len({row.split for row in rows if row.path in parents}) == 1


def test_read_parents_reads_the_manifest_and_names_a_malformed_one(tmp_path):
    assert read_parents(tmp_path) is None
    manifest = tmp_path / "MANIFEST.csv"
    with open(manifest, "w", newline="") as handle:
        csv.writer(handle).writerows([["relpath", "label", "md5", "parent"], ["crack/x.png", "crack", "0", "p1"]])
    assert read_parents(tmp_path) == {"crack/x.png": "p1"}
    manifest.write_text("relpath,label\ncrack/x.png,crack\n")
    assert read_parents(tmp_path) is None  # no parent column: grouped by hashes only
    manifest.write_text("file,parent\ncrack/x.png,p1\n")
    with pytest.raises(UsageError, match="MANIFEST.csv has a parent column but no relpath column"):
        read_parents(tmp_path)


def test_records_without_keys_are_grouped_by_the_perceptual_hash_alone():
    # e.g. records built by hand or by an older caller: no window keys, so only MD5 and phash join them
    records = [FileRecord("Negative/a.jpg", 0, md5="1", phash="ffffffff00000000"),
               FileRecord("Negative/b.jpg", 0, md5="2", phash="fffffff00f000000"),  # 8 bits away: apart
               FileRecord("Negative/c.jpg", 0, md5="3", phash="ffffffff00000003"),  # 2 bits away: joined
               FileRecord("Negative/d.jpg", 0, md5="1", phash="0000000000000000")]  # same MD5: joined
    assert group_records(records) == [0, 1, 0, 0]
