"""hash_gradient's code lookups: `nearest` (a consolidated fact's table, any radius) agrees with the
seed table's `flip_lookup` where both apply, reads the nearest key whatever the distance when the
radius is the code width, and `popcount` counts bits as numpy's own does."""

from __future__ import annotations

import numpy as np
import pytest

from lmm.memory.hash_gradient import flip_lookup, flip_masks, nearest, popcount


@pytest.mark.parametrize(("bits", "radius"), [(8, 0), (8, 1), (8, 2), (12, 3), (16, 3)])
def test_nearest_agrees_with_the_flip_mask_lookup(bits: int, radius: int) -> None:
    rng = np.random.default_rng(bits * 10 + radius)
    keys = np.unique(rng.integers(0, 1 << bits, 6 if bits == 8 else 40))
    codes = rng.integers(0, 1 << bits, 2000)
    expected = flip_lookup(codes, keys, flip_masks(bits, radius))
    found = nearest(codes, keys, radius)
    assert np.array_equal(found, expected)
    assert (found >= 0).any() and (found < 0).any()  # both outcomes occur, so the comparison can fail


def test_radius_of_the_code_width_reads_the_nearest_key() -> None:
    keys = np.array([0b0000_0000, 0b1111_0000, 0b1111_1111], np.int64)
    codes = np.array([0b0000_0001, 0b0111_0000, 0b0111_1111, 0b0011_1100], np.int64)
    assert nearest(codes, keys, 8).tolist() == [0, 1, 2, 0]  # the last is 4 from every key: the smallest
    assert nearest(codes, keys, 1).tolist() == [0, 1, 2, -1]
    assert nearest(codes, np.zeros(0, np.int64), 8).tolist() == [-1] * 4


def test_popcount_counts_bits() -> None:
    x = np.random.default_rng(0).integers(0, 1 << 24, (50, 7))
    expected = np.vectorize(lambda v: bin(int(v)).count("1"))(x)
    assert np.array_equal(popcount(x), expected)
