"""Reading X by row ranges: chunks decoded straight into the caller's buffer match zarr-python's reads."""

from __future__ import annotations

from pathlib import Path

import numcodecs
import numpy as np
import pytest
import zarr

from abc_pipeline.cells import CellSource


@pytest.mark.parametrize("filters", [False, True], ids=["direct", "zarr"])
def test_read_x_into_buffer_matches_zarr(tmp_path: Path, filters: bool) -> None:
    root = zarr.open_group(str(tmp_path / "cells.zarr"), mode="w", zarr_format=2)
    for key in ("obs", "var", "obsm"):
        root.require_group(key)
    for key, n in (("obs", 10), ("var", 6)):  # the indexes CellSource checks against X's shape
        root[key].create_array("_index", shape=(n,), dtype="int64", fill_value=0)
    x = root.create_array(
        "X",
        shape=(10, 6),
        chunks=(4, 6),
        dtype="float32",
        fill_value=0.0,
        filters=[numcodecs.Delta(dtype="<f4")] if filters else None,
    )
    values = np.random.default_rng(0).random((10, 6), dtype=np.float32)
    x[:4], x[8:] = values[:4], values[8:]  # rows 4:8 stay an unwritten chunk (fill value); 8:10 a partial chunk
    values[4:8] = 0
    source = CellSource(tmp_path / "cells.zarr")
    assert source._direct_decode is not filters
    for start, stop in [(0, 4), (0, 10), (4, 8), (2, 9), (8, 10), (3, 4)]:
        out = np.full((stop - start, 6), np.nan, dtype=np.float32)
        assert source.read_X(start, stop, out=out) is out
        np.testing.assert_array_equal(out, values[start:stop])
        np.testing.assert_array_equal(source.read_X(start, stop), values[start:stop])
