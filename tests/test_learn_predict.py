"""Tile planning of dense prediction: equal cores partition every axis, none longer than the tile size."""

from __future__ import annotations

import pytest

from abc_pipeline.learn.predict import _core_length, _tiles


@pytest.mark.parametrize("n", [1, 5, 91, 184, 218, 256, 257, 437])
@pytest.mark.parametrize("size", [1, 7, 40, 128, 192, 256])
def test_tiles_partition_the_axis_into_equal_cores(n, size):
    cores = _tiles(3, 3 + n, size)
    assert cores[0][0] == 3 and cores[-1][1] == 3 + n
    assert all(a[1] == b[0] for a, b in zip(cores, cores[1:]))  # contiguous, no overlap
    lengths = [b - a for a, b in cores]
    assert len(cores) == -(-n // size)  # the fewest cores of at most `size`
    assert max(lengths) - min(lengths) <= 1 and max(lengths) == _core_length(n, size) <= size
    assert _tiles(0, n, _core_length(n, size)) == _tiles(0, n, size)  # the core length plans the same tiles


def test_section_plane_tiles():
    assert _tiles(0, 218, 192) == [(0, 109), (109, 218)] and _tiles(0, 184, 192) == [(0, 184)]
