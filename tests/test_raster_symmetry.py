"""Equivariance of the rasterizer: rotating (or mirroring) the cells about the grid centre rotates
(mirrors) the raster exactly, on grids symmetric under that operation.

Cells sit at voxel centres plus offsets of at most 0.3 voxel, away from voxel boundaries (a point on a
boundary cannot be binned symmetrically; see the voxel convention in abc_pipeline/raster/grid.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from raster_fixtures import write_cells

from abc_pipeline.raster import open_raster, rasterize

CLASSES = ["A", "B", "C", "D"]
N = 600


def _cells(grid_lo, size, shape, seed: int):
    """N cells (z, y, x) near voxel centres of the grid, several per voxel; values, class codes."""
    rng = np.random.default_rng(seed)
    idx = np.column_stack([rng.integers(0, n, N) for n in shape])
    zyx = np.asarray(grid_lo) + (idx + 0.5 + rng.uniform(-0.3, 0.3, (N, 3))) * np.asarray(size)
    expr = rng.integers(0, 12, (N, 3)).astype(np.float32) / 4
    cls = rng.integers(0, len(CLASSES), N)
    return zyx, expr, cls


def _raster(tmp: Path, name: str, space: str, zyx, expr, cls, sections, bounds, voxel, levels: int):
    labels = {"class": ([CLASSES[c] for c in cls], CLASSES)}
    if space == "section":
        kw = {
            "spatial": zyx[:, [2, 1]],
            "sections": [sections[int(round(z))] for z in zyx[:, 0]],
            "section_order": sections,
        }
    else:
        kw = (
            {"spatial_3d": zyx[:, ::-1]}
            if space == "reconstructed"
            else {"ccf": zyx[:, ::-1], "spatial_3d": zyx[:, ::-1]}
        )
    cells = write_cells(tmp / f"{name}.zarr", expr, labels=labels, chunk=150, **kw)
    return open_raster(
        rasterize(
            cells,
            tmp / f"{name}.ome.zarr",
            space=space,
            voxel_size=voxel,
            bounds=bounds,
            labels=["class"],
            levels=levels,
            progress=False,
        )
    )


# (space, bounds (z, y, x) in mm, voxel, operation on centred coordinates, the same operation on arrays (z, y, x))
CASES = {
    "section-rot90": (
        "section",
        [(-1, 1), (-1, 1)],
        0.25,
        lambda c: np.column_stack([c[:, 0], c[:, 2], -c[:, 1]]),
        lambda a: np.rot90(a, k=-1, axes=(-2, -1)),
    ),
    "section-mirror-x": ("section", [(-1, 1), (-1, 1)], 0.25, lambda c: c * [1, 1, -1], lambda a: a[..., ::-1]),
    "reconstructed-rot90": (
        "reconstructed",
        [(0.9, 1.9), (-1, 1), (-1, 1)],
        (0.2, 0.125, 0.125),
        lambda c: np.column_stack([c[:, 0], c[:, 2], -c[:, 1]]),
        lambda a: np.rot90(a, k=-1, axes=(-2, -1)),
    ),
    "reconstructed-mirror-z": (
        "reconstructed",
        [(0.9, 1.9), (-1, 1), (-1, 1)],
        (0.2, 0.125, 0.125),
        lambda c: c * [-1, 1, 1],
        lambda a: a[..., ::-1, :, :],
    ),
    "ccf-rot90-zy": (
        "ccf",
        [(-1, 1), (-1, 1), (-1, 1)],
        0.25,
        lambda c: np.column_stack([c[:, 1], -c[:, 0], c[:, 2]]),
        lambda a: np.rot90(a, k=-1, axes=(-3, -2)),
    ),
    "ccf-mirror-y": ("ccf", [(-1, 1), (-1, 1), (-1, 1)], 0.25, lambda c: c * [1, -1, 1], lambda a: a[..., ::-1, :]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_transformed_cells_give_the_transformed_raster(case: str, tmp_path: Path) -> None:
    space, bounds, voxel, op, op_array = CASES[case]
    sections = ["S0", "S1", "S2"]
    if space == "section":
        lo, size, shape = (-0.5, -1.0, -1.0), (1.0, 0.25, 0.25), (3, 8, 8)
    else:
        lo = tuple(b[0] for b in bounds)
        size = (voxel,) * 3 if np.isscalar(voxel) else voxel
        shape = tuple(int(round((b[1] - b[0]) / s)) for b, s in zip(bounds, size))
    zyx, expr, cls = _cells(lo, size, shape, seed=7)
    centre = np.asarray(lo) + np.asarray(shape) * np.asarray(size) / 2
    moved = op(zyx - centre) + centre
    if space == "section":
        moved[:, 0] = zyx[:, 0]  # section index untouched by in-plane operations
    levels = 3 if space != "reconstructed" else 2
    a = _raster(tmp_path, "a", space, zyx, expr, cls, sections, bounds, voxel, levels)
    b = _raster(tmp_path, "b", space, moved, expr, cls, sections, bounds, voxel, levels)
    assert a.grid == b.grid and a.grid.shape == shape
    img_a, img_b = a.image.compute(), b.image.compute()
    assert img_a[-1].sum() == N and (img_a[-1] > 1).any()  # every cell binned; voxels hold several cells
    np.testing.assert_array_equal(img_b, op_array(img_a))  # exact
    np.testing.assert_array_equal(b.labels["class"].data.compute(), op_array(a.labels["class"].data.compute()))
    # per-cell voxel index: cell i of b sits in the transformed voxel of cell i of a
    marker = np.zeros(shape, dtype=np.int64)
    va, vb = a.voxel_index[:], b.voxel_index[:]
    for i in range(0, N, 37):
        marker[:] = 0
        marker[tuple(va[i])] = 1
        np.testing.assert_array_equal(np.argwhere(op_array(marker))[0], vb[i])
    # the pyramid (even grid sizes) is symmetric too
    for k in range(1, levels):
        np.testing.assert_allclose(b.levels[k].compute(), op_array(a.levels[k].compute()), rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(
            b.labels["class"].levels[k].compute(), op_array(a.labels["class"].levels[k].compute())
        )
