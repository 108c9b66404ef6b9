"""The banded near-duplicate search finds exactly the pairs an all-pairs comparison finds."""

from __future__ import annotations

import numpy as np
import pytest

from crackclf.data.inventory import near_duplicate_pairs


def _all_pairs(hashes: np.ndarray, max_bits: int) -> np.ndarray:
    distances = np.bitwise_count(hashes[:, None] ^ hashes[None, :])
    rows, cols = np.nonzero(np.triu(distances <= max_bits, k=1))
    return np.stack([rows, cols], axis=1)


def _clustered_hashes(rng: np.random.Generator, count: int) -> np.ndarray:
    """Random 64-bit hashes, and copies of some of them with 1-8 bits flipped (near and not-so-near copies)."""
    base = rng.integers(0, 2**63, size=count // 2, dtype=np.int64).astype(np.uint64) * np.uint64(2) + np.uint64(1)
    copies = base[rng.integers(0, len(base), size=count - len(base))].copy()
    for index in range(len(copies)):
        for bit in rng.choice(64, size=rng.integers(1, 9), replace=False):
            copies[index] ^= np.uint64(1) << np.uint64(int(bit))
    return np.concatenate([base, copies, base[:5]])  # and a few exact copies


@pytest.mark.parametrize("max_bits", [0, 2, 6, 8])
def test_banded_search_equals_all_pairs(max_bits):
    hashes = _clustered_hashes(np.random.default_rng(max_bits), 1500)
    found = near_duplicate_pairs(hashes, max_bits)
    expected = _all_pairs(hashes, max_bits)
    assert len(expected) > 0
    np.testing.assert_array_equal(found, expected)  # same pairs, same (i, j) order


def test_degenerate_inputs():
    assert near_duplicate_pairs(np.zeros(0, dtype=np.uint64), 6).shape == (0, 2)
    assert near_duplicate_pairs(np.array([7], dtype=np.uint64), 6).shape == (0, 2)
    same = np.full(4, 123, dtype=np.uint64)
    np.testing.assert_array_equal(near_duplicate_pairs(same, 6), _all_pairs(same, 6))


def test_batched_phash_is_imagehash_phash(tmp_path):
    """The scan's batched perceptual hash gives ``imagehash.phash``'s bits (stored inventories and the thresholds
    measured with imagehash stay valid), on generated crack images, noise and a flat image, and through a scan."""
    import imagehash
    from PIL import Image

    from crackclf.data.inventory import phash_hex, phash_input, scan
    from tests.conftest import make_concrete, write_dataset

    rng = np.random.default_rng(3)
    images = [make_concrete(rng, 96, crack=bool(i % 2)).convert("L") for i in range(40)]
    images += [Image.fromarray(rng.integers(0, 256, (70, 90), dtype=np.uint8)), Image.new("L", (64, 64), 128)]
    expected = [str(imagehash.phash(image)) for image in images]
    assert phash_hex(np.stack([phash_input(image) for image in images])) == expected
    assert len(set(expected)) > 30  # distinct images, distinct hashes: the comparison is not of constants

    root = write_dataset(tmp_path / "data", per_class=6, seed=4)
    records = scan(root, ("Negative", "Positive"), progress=False).records
    for record in records:
        with Image.open(root / record.path) as image:
            image.draft("RGB", (64, 64))  # the scan's draft decode (HASH_DRAFT)
            assert record.phash == str(imagehash.phash(image.convert("L"))), record.path
