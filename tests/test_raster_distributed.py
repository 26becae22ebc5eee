"""rasterize on a dask.distributed cluster of worker processes (as on cluster nodes: nothing shared in memory,
every task pickled) writes the same raster, byte for byte, as the local threaded scheduler."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from raster_fixtures import write_cells
from test_raster_rasterize import CLASSES, random_atlas

from abc_pipeline.raster import rasterize


def _all_arrays(store: Path) -> dict[str, np.ndarray]:
    """Every array of a Zarr store by path."""
    out: dict[str, np.ndarray] = {}

    def visit(group: zarr.Group, prefix: str) -> None:
        for name, array in group.arrays():
            out[f"{prefix}{name}"] = array[...]
        for name, sub in group.groups():
            visit(sub, f"{prefix}{name}/")

    visit(zarr.open_group(str(store), mode="r"), "")
    return out


@pytest.fixture(scope="module")
def cells(tmp_path_factory: pytest.TempPathFactory) -> Path:
    xyz, expr, cls = random_atlas(3000, seed=7)
    path = tmp_path_factory.mktemp("atlas") / "cells.zarr"
    write_cells(
        path,
        expr,
        spatial_3d=xyz,
        ccf=xyz[:, [2, 1, 0]] + 3.0,
        symbols=["Gad1", "Slc17a7", "Sst", "Pvalb", "Vip", "Blank-1"],
        labels={"class": ([CLASSES[c] for c in cls], CLASSES)},
        chunk=250,
    )
    return path


def test_process_workers_write_the_same_raster_as_threads(cells: Path, tmp_path: Path) -> None:
    """Gene channels (sums of quarters, exact in float32) and everything else byte-identical; PCA channels equal up
    to float32 rounding, since the threaded run sums voxels in memory and the cluster run reduces spilled partial
    sums block by block (a different summation order)."""
    from distributed import LocalCluster

    common = {
        "space": "reconstructed",
        "voxel_size": (0.2, 0.1, 0.1),
        "labels": ["class"],
        "levels": 2,
        "chunk_cells": 500,
        "progress": False,
    }
    runs = {"genes": {}, "pca": {"pca": 3}}
    for scheduler in ("threads", "distributed"):  # one folder per scheduler: same file names, same image names
        (tmp_path / scheduler).mkdir()
    threaded = {
        name: rasterize(
            cells, tmp_path / "threads" / f"{name}.ome.zarr", scheduler="threads", num_workers=2, **common, **extra
        )
        for name, extra in runs.items()
    }
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        distributed = {
            name: rasterize(
                cells,
                tmp_path / "distributed" / f"{name}.ome.zarr",
                address=cluster.scheduler_address,
                **common,
                **extra,
            )
            for name, extra in runs.items()
        }
    for name in runs:
        expected, got = _all_arrays(threaded[name]), _all_arrays(distributed[name])
        assert set(got) == set(expected) and len(expected) >= 4  # image and label levels, cell index, ...
        for path, array in expected.items():
            assert got[path].dtype == array.dtype, path
            if name == "pca" and array.dtype.kind == "f":
                np.testing.assert_allclose(got[path], array, rtol=1e-5, atol=1e-6, err_msg=path)
            else:
                np.testing.assert_array_equal(got[path], array, err_msg=f"{name}: {path}")
        attrs = [zarr.open_group(str(store[name]), mode="r").attrs.asdict() for store in (threaded, distributed)]
        assert attrs[0] == attrs[1]
