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
