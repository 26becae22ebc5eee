"""NaN / inf in X are refused per chunk, or dropped with a logged count by an explicit option."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from raster_fixtures import write_cells
from test_safety_outputs import _error_line, tree

from abc_pipeline.cli import main
from abc_pipeline.errors import InputError
from abc_pipeline.raster import open_raster, rasterize


def _cells_with_nonfinite(path: Path, n: int = 400) -> tuple[Path, np.ndarray]:
    rng = np.random.default_rng(3)
    expr = rng.normal(size=(n, 6)).astype(np.float32)
    expr[5, 0], expr[150, 3] = np.nan, np.inf  # bad cells in two Zarr chunks
    expr[151, 2] = -np.inf
    xyz = np.column_stack([rng.uniform(0, 2, n), rng.uniform(0, 2, n), rng.uniform(0, 1, n)])
    return write_cells(path, expr, spatial_3d=xyz, chunk=100), np.array([5, 150, 151])


@pytest.mark.parametrize("pca", [None, 2], ids=["genes", "pca"])
def test_nonfinite_expression_is_refused(tmp_path: Path, pca: int | None, capsys) -> None:
    cells, _ = _cells_with_nonfinite(tmp_path / "cells.zarr")
    before = tree(tmp_path)
    argv = [
        "rasterize",
        "--cells",
        str(cells),
        "--out",
        str(tmp_path / "r.ome.zarr"),
        "--voxel-size",
        "0.25",
        "--labels",
        "--no-progress",
        *(["--pca", str(pca)] if pca else []),
    ]
    assert main(argv) == 2
    line = _error_line(capsys)
    assert f"{cells}: X holds NaN or inf in" in line and "pass --drop-nonfinite" in line
    if pca is None:
        assert "in 3 cells of rows 0..399 (first row 5)" in line  # one task reads all 400 rows
    assert tree(tmp_path) == before


@pytest.mark.parametrize("pca", [None, 2], ids=["genes", "pca"])
def test_nonfinite_cells_dropped_with_a_logged_count(tmp_path: Path, pca: int | None, caplog) -> None:
    cells, bad = _cells_with_nonfinite(tmp_path / "cells.zarr")
    out = rasterize(
        cells, tmp_path / "r.ome.zarr", voxel_size=0.25, labels=[], pca=pca, progress=False, drop_nonfinite=True
    )
    r = open_raster(out)
    assert r.attrs["counts"]["nonfinite_expression"] == 3 and r.attrs["counts"]["rasterized"] == 400 - 3
    assert "3 of 400 cells have NaN or inf in X (skipped" in caplog.text
    index = np.asarray(r.voxel_index[:])
    assert (index[bad] == -1).all() and (index[np.setdiff1d(np.arange(400), bad)] >= 0).all()
    image = np.asarray(r.image)
    assert np.isfinite(image).all() and image[-1].sum() == 400 - 3


def test_nonfinite_refusal_names_the_library_option(tmp_path: Path) -> None:
    cells, _ = _cells_with_nonfinite(tmp_path / "cells.zarr")
    with pytest.raises(InputError, match=r"drop_nonfinite=True"):
        rasterize(cells, tmp_path / "r.ome.zarr", voxel_size=0.25, labels=[], progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cells.zarr"]
