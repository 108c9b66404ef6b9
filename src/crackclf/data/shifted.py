"""A tolerant near-duplicate matcher: the same crack crop cut again a few pixels off (or slightly rescaled).

The 64-bit perceptual hash of the whole image (:func:`crackclf.data.inventory.near_duplicate_pairs`) moves by more
than its threshold when a copy is shifted by a tenth of the image: such pairs of Özgenel's set were found crossing
the train/val/test split (issue #17, docs/data.md). Here every image gets *keys*: a difference hash (dHash, 8x8
bits of the sign of horizontal differences between block means) of a centred window of a small grey thumbnail, at
every offset of up to :data:`REACH` thumbnail pixels; its centred window's hash is its *query*. Two images match when
the query of one is within ``max_bits`` bits of any key of the other: one of the offsets lines the windows up.

All windows of an image come from one integral image of its thumbnail (no per-window resize), so the keys cost a
fraction of the scan's decode; the search compares only key/query pairs that agree exactly on one of
``max_bits + 1`` bands of the 64 bits (the same pigeonhole argument as the perceptual-hash search), so it misses no
pair within ``max_bits``.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["KEYS_PER_IMAGE", "REACH", "SHIFTED_DUPLICATE_BITS", "keys_of_thumbnails", "shift_keys", "shifted_pairs",
           "thumbnail"]

#: Side of the grey thumbnail the windows are cut from, the block side of one hash cell, and the largest offset (in
#: thumbnail pixels) tried in each direction: a 45-pixel window (9x9 blocks of 5) moved by up to 6 of 64 pixels
#: covers shifts of about a tenth of the image.
THUMB, BLOCK, REACH = 64, 5, 6
KEYS_PER_IMAGE = (2 * REACH + 1) ** 2
#: Default match distance (bits). Chosen on Özgenel's set (docs/data.md, `scripts/shifted_duplicate_study.py`): the
#: known shifted copies fall within it, and no pair of different labels does.
SHIFTED_DUPLICATE_BITS = 3

_CENTRE = (THUMB - 9 * BLOCK) // 2
_OFFSETS = np.array([(dy, dx) for dy in range(-REACH, REACH + 1) for dx in range(-REACH, REACH + 1)])
#: Index of the unshifted window among the keys: the query.
QUERY = int(np.flatnonzero((_OFFSETS == 0).all(axis=1))[0])

def _window_cells() -> np.ndarray:
    """Flat indices into a (THUMB-BLOCK+1, THUMB-2·BLOCK+1) map of the top-left corners of the 8x8 cells of every
    window (the left block of each compared pair), in hash-bit order."""
    rows = _CENTRE + _OFFSETS[:, 0, None] + BLOCK * np.arange(8)[None]  # (K, 8)
    cols = _CENTRE + _OFFSETS[:, 1, None] + BLOCK * np.arange(8)[None]  # (K, 8)
    return (rows[:, :, None] * (THUMB - 2 * BLOCK + 1) + cols[:, None, :]).reshape(KEYS_PER_IMAGE, 64)


_CELLS = _window_cells()


def thumbnail(image: Image.Image) -> np.ndarray:
    """The grey ``THUMB``×``THUMB`` thumbnail the window hashes are cut from (uint8)."""
    return np.asarray(image.convert("L").resize((THUMB, THUMB), Image.Resampling.BILINEAR))


def shift_keys(image: Image.Image) -> np.ndarray:
    """The :data:`KEYS_PER_IMAGE` window hashes of ``image`` (any mode) as a uint64 array; ``[QUERY]`` is its
    centred window's."""
    return keys_of_thumbnails(thumbnail(image)[None])[0]


def keys_of_thumbnails(thumbnails: np.ndarray) -> np.ndarray:
    """(N, :data:`KEYS_PER_IMAGE`) uint64 window hashes of N thumbnails (:func:`thumbnail`), in one pass.

    Every window's bit (i, j) compares two neighbouring blocks, and the blocks of all windows lie on one grid of
    block positions: so the comparison of each block with its right neighbour is made once per thumbnail (exact
    integer block sums from an integral image) and every window's 64 bits are read from it.
    """
    count, side = len(thumbnails), THUMB + 1
    integral = np.zeros((count, side, side), dtype=np.int32)
    integral[:, 1:, 1:] = np.asarray(thumbnails, dtype=np.int32).cumsum(1).cumsum(2)
    blocks = (integral[:, BLOCK:, BLOCK:] - integral[:, :-BLOCK, BLOCK:] - integral[:, BLOCK:, :-BLOCK]
              + integral[:, :-BLOCK, :-BLOCK])  # (N, 60, 60): the sum of the block whose top-left pixel is (y, x)
    brighter = (blocks[:, :, BLOCK:] > blocks[:, :, :-BLOCK]).reshape(count, -1)  # right neighbour vs this block
    bits = brighter[:, _CELLS]  # (N, K, 64)
    return np.packbits(bits, axis=2).view(">u8").reshape(count, KEYS_PER_IMAGE).astype(np.uint64)


def shifted_pairs(keys: np.ndarray, max_bits: int = SHIFTED_DUPLICATE_BITS,
                  labels: np.ndarray | None = None) -> np.ndarray:
    """Index pairs (i < j), sorted, of images whose query is within ``max_bits`` bits of a key of the other.

    Args:
        keys: (N, :data:`KEYS_PER_IMAGE`) uint64, one row of :func:`shift_keys` per image.
        labels: when given, only images of the same label are compared (half the work for two balanced classes; a
            shifted copy under the other label is a label conflict, not something a split can fix).
    """
    keys = np.ascontiguousarray(keys, dtype=np.uint64)
    if labels is None:
        return _pairs(keys, int(max_bits))
    labels = np.asarray(labels)
    found = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        found.append(members[_pairs(keys[members], int(max_bits))])
    pairs = np.concatenate(found) if found else np.zeros((0, 2), dtype=np.int64)
    return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]


def _pairs(keys: np.ndarray, max_bits: int) -> np.ndarray:
    count = len(keys)
    if count < 2:
        return np.zeros((0, 2), dtype=np.int64)
    flat = keys.reshape(-1)
    queries = keys[:, QUERY]
    edges = np.linspace(0, 64, max_bits + 2).astype(int)
    # Bands of at most 16 bits sort as uint16, by numpy's radix sort: the N·K keys are sorted once per band.
    narrow = np.uint16 if (np.diff(edges) <= 16).all() else np.uint64
    found = []
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        mask = np.uint64((1 << int(high - low)) - 1)
        key_band = ((flat >> np.uint64(low)) & mask).astype(narrow)
        query_band = ((queries >> np.uint64(low)) & mask).astype(narrow)
        order = np.argsort(key_band, kind="stable")
        sorted_band = key_band[order]
        starts = np.searchsorted(sorted_band, query_band, side="left")
        lengths = np.searchsorted(sorted_band, query_band, side="right") - starts
        # Every (query, key) pair that agrees on this band: the query's image repeated over the run of keys.
        query_of = np.repeat(np.arange(count), lengths)
        positions = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths) + np.repeat(starts,
                                                                                                             lengths)
        key_index = order[positions]
        close = np.bitwise_count(flat[key_index] ^ queries[query_of]) <= max_bits
        owner = key_index[close] // keys.shape[1]
        query_of = query_of[close]
        keep = owner != query_of
        owner, query_of = owner[keep], query_of[keep]
        found.append(np.stack([np.minimum(owner, query_of), np.maximum(owner, query_of)], axis=1))
    pairs = np.concatenate(found)
    codes = np.unique(pairs[:, 0] * count + pairs[:, 1])  # one pair found in several bands is kept once
    return np.stack([codes // count, codes % count], axis=1).astype(np.int64)
