"""Grid: coordinates <-> voxel indices, data-derived and given bounds, serialisation, pyramid levels."""

from __future__ import annotations

import json

import numpy as np
import pytest

from abc_pipeline.errors import InputError
from abc_pipeline.raster.grid import Grid, voxel_size_zyx


def test_half_open_voxels_and_skipped_points() -> None:
    g = Grid("ccf", origin=(0.0, 0.0, 0.0), voxel_size=(0.5, 0.25, 0.25), shape=(2, 4, 4))
    pts = np.array(
        [
            [0.0, 0.0, 0.0],  # lower corner -> voxel 0
            [0.49, 0.26, 0.99],  # inside
            [0.5, 0.25, 0.75],  # on lower faces of voxel (1, 1, 3)
            [1.0, 0.1, 0.1],  # z == upper bound: outside (half-open)
            [-1e-9, 0.1, 0.1],  # just below the origin
            [np.nan, 0.1, 0.1],  # no coordinate
        ]
    )
    idx = g.to_index(pts)
    assert idx.dtype == np.int32
    np.testing.assert_array_equal(idx[:3], [[0, 0, 0], [0, 1, 3], [1, 1, 3]])
    np.testing.assert_array_equal(idx[3:], -1)
    # voxel centres map back to their own voxel
    all_idx = np.stack(np.meshgrid(*[np.arange(n) for n in g.shape], indexing="ij"), -1).reshape(-1, 3)
    np.testing.assert_array_equal(g.to_index(g.to_physical(all_idx)), all_idx)
    assert g.ravel(np.array([[1, 3, 3]]))[0] == g.n_voxels - 1


def test_around_centres_sections_in_voxels_and_adds_margin() -> None:
    z = 5.0 + 0.2 * np.arange(7)  # sections 0.2 mm apart, float-noisy like real data
    lower, upper = (z.min(), 1.0, 2.0), (z.max() - 1e-12, 3.0, 4.0)
    g = Grid.around("reconstructed", lower, upper, voxel_size=(0.2, 0.1, 0.1), margin=0)
    assert g.shape[0] == 7
    pts = np.column_stack([z, np.full(7, 2.0), np.full(7, 3.0)])
    np.testing.assert_array_equal(g.to_index(pts)[:, 0], np.arange(7))
    np.testing.assert_allclose(g.to_physical(g.to_index(pts))[:, 0], z, atol=1e-9)  # sections at voxel centres
    g2 = Grid.around("reconstructed", lower, upper, voxel_size=(0.2, 0.1, 0.1), margin=2)
    assert g2.shape == (g.shape[0] + 4, g.shape[1] + 4, g.shape[2] + 4)
    corners = np.array([lower, upper])
    assert (g2.to_index(corners) >= 2).all()  # the data extremes sit inside, margin voxels beyond


def test_from_bounds_rounds_up_and_validates() -> None:
    g = Grid.from_bounds("ccf", (0, 0, 0), (1.0, 1.05, 0.3), voxel_size=0.1)
    assert g.shape == (10, 11, 3)
    with pytest.raises(InputError, match="empty grid"):
        Grid.from_bounds("ccf", (0, 0, 0), (1.0, 0.0, 1.0), voxel_size=0.1)
    with pytest.raises(InputError, match="positive"):
        Grid.from_bounds("ccf", (0, 0, 0), (1, 1, 1), voxel_size=(0.1, 0.0, 0.1))
    with pytest.raises(InputError, match="positive"):
        voxel_size_zyx("reconstructed", -0.05)
    with pytest.raises(InputError, match="empty grid"):
        Grid("ccf", (0, 0, 0), (1, 1, 1), (0, 3, 3))
    with pytest.raises(InputError, match="unknown raster space"):
        Grid.from_bounds("atlas", (0, 0, 0), (1, 1, 1), 0.1)


def test_voxel_size_forms() -> None:
    assert voxel_size_zyx("reconstructed", 0.05) == (0.05, 0.05, 0.05)
    assert voxel_size_zyx("reconstructed", (0.05, 0.025)) == (0.2, 0.05, 0.025)
    assert voxel_size_zyx("ccf", [0.1, 0.05, 0.05]) == (0.1, 0.05, 0.05)
    assert voxel_size_zyx("section", 0.01) == (1.0, 0.01, 0.01)  # z of a section grid is one section
    with pytest.raises(InputError, match="1, 2"):
        voxel_size_zyx("ccf", [0.1, 0.1, 0.1, 0.1])


def test_attrs_round_trip_through_json() -> None:
    g = Grid.around(
        "section",
        (0, -1.0, -2.0),
        (0, 1.0, 2.0),
        voxel_size=0.05,
        sections=("S1", "S2", "S3"),
        section_z=(4.0, 4.2, float("nan")),
    )
    attrs = json.loads(json.dumps(g.to_attrs()))
    assert attrs["units"] == ["section", "millimeter", "millimeter"]
    back = Grid.from_attrs(attrs)
    assert back.shape == g.shape and back.origin == g.origin and back.voxel_size == g.voxel_size
    assert back.sections == g.sections and back.section_z[:2] == g.section_z[:2] and np.isnan(back.section_z[2])
    assert Grid.from_attrs({"grid": attrs}).shape == g.shape
    with pytest.raises(InputError, match="origin"):
        Grid.from_attrs({"space": "ccf", "shape": [1, 1, 1], "voxel_size": [1, 1, 1]})


def test_section_grid_display_metadata() -> None:
    g = Grid.around(
        "section", (0, 0, 0), (0, 1, 1), voxel_size=0.1, sections=("a", "b", "c"), section_z=(3.0, 3.2, 3.4)
    )
    assert g.shape[0] == 3 and g.voxel_size[0] == 1.0 and g.origin[0] == -0.5
    np.testing.assert_allclose(g.physical_scale(), (0.2, 0.1, 0.1))
    assert g.physical_translation()[0] == 3.0
    np.testing.assert_array_equal(g.to_index(np.array([[2.0, 0.5, 0.5]]))[0, 0], 2)


def test_pyramid_levels_keep_anisotropic_z() -> None:
    aniso = Grid("reconstructed", (0, 0, 0), (0.2, 0.05, 0.05), (10, 33, 40))
    assert aniso.downsample_factors() == (1, 2, 2)
    assert aniso.level(2).shape == (10, 9, 10) and aniso.level(2).voxel_size == (0.2, 0.2, 0.2)
    iso = Grid("ccf", (0, 0, 0), (0.1, 0.1, 0.1), (9, 8, 8))
    assert iso.downsample_factors() == (2, 2, 2)
    assert iso.level(1).shape == (5, 4, 4) and iso.level(1).origin == iso.origin
    sec = Grid("section", (-0.5, 0, 0), (1.0, 1.0, 1.0), (2, 4, 4), sections=("a", "b"))
    assert sec.downsample_factors() == (1, 2, 2)  # sections are never merged
