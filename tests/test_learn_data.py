"""learn.data: section-disjoint splits, normalisation, per-cell patches and tiles read lazily from a raster
(values checked against the raster itself), class tables, split per cell, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from abc_pipeline.cells import CellSource
from abc_pipeline.errors import InputError
from abc_pipeline.learn.data import (
    CellPatchDataset,
    Normalizer,
    RasterReader,
    TileDataset,
    cell_splits,
    channel_stats,
    class_table,
    raster_splits,
    section_splits,
    z_blocks,
)
from abc_pipeline.raster import open_raster, rasterize


@pytest.fixture(scope="module")
def rasters(assembled: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("learn_data")
    genes = CellSource(assembled).gene_symbols[:240:40]
    kw = {"genes": genes, "labels": ["class", "parcellation_division"], "progress": False}
    return {
        "section": open_raster(rasterize(assembled, out / "s.ome.zarr", space="section", voxel_size=0.1, **kw)),
        "3d": open_raster(rasterize(assembled, out / "r.ome.zarr", voxel_size=(0.2, 0.1, 0.1), **kw)),
        "cells": CellSource(assembled),
    }


@pytest.mark.parametrize("n", [3, 4, 7, 12, 20, 59])
def test_section_splits_interleaved_blocks_disjoint_covering(n):
    for seed in range(4):
        s = section_splits(n, (0.7, 0.15, 0.15), seed)
        assert s == section_splits(n, (0.7, 0.15, 0.15), seed)  # deterministic
        assert sorted(z for v in s.values() for z in v) == list(range(n))
        sizes = {name: len(z) for name, z in s.items()}
        assert min(sizes.values()) >= 1
        if n >= 20:
            assert abs(sizes["train"] - 0.7 * n) <= 1
        runs = {name: z_blocks(z) for name, z in s.items()}
        k = min(3, *sizes.values())  # blocks per split: 3, fewer when a split has fewer sections
        assert {len(r) for r in runs.values()} == {k}
        lengths = [b - a for a, b in runs["test"]]
        assert max(lengths) - min(lengths) <= 1  # a split's blocks are as even as possible
        for j in range(k - 1):  # segment j holds block j of every split: the splits all span z
            assert max(r[j][1] for r in runs.values()) <= min(r[j + 1][0] for r in runs.values())
    orders = {
        tuple(sorted(section_splits(20, seed=k), key=lambda name: section_splits(20, seed=k)[name][0]))
        for k in range(10)
    }
    assert len(orders) > 1  # the seed changes the order of the splits


def test_section_splits_one_block_per_split():
    s = section_splits(20, (0.7, 0.15, 0.15), seed=0, blocks=1)
    assert all(len(z_blocks(z)) == 1 for z in s.values())
    assert s["test"] == list(range(0, 3)) and s["train"] == list(range(3, 17))  # seed 0: test, train, val
    assert section_splits(59, seed=0)["test"] == [0, 1, 2, 20, 21, 22, 40, 41, 42]


def test_section_splits_bad_input():
    with pytest.raises(InputError, match="sections cannot be split"):
        section_splits(2)
    with pytest.raises(InputError, match="fractions"):
        section_splits(10, (0.5, -0.1, 0.6))
    with pytest.raises(InputError, match="split blocks"):
        section_splits(10, blocks=0)
    assert section_splits(2, (0.5, 0.5, 0.0))["test"] == []


def test_raster_splits_cover_empty_margins(rasters):
    r = rasters["3d"]
    counts = np.asarray((r.n_cells > 0).sum(axis=(1, 2)).compute())
    assert counts[0] == 0 and counts[-1] == 0  # the grid's z margins are empty
    s = raster_splits(r, seed=0)
    assert sorted(z for v in s.values() for z in v) == list(range(r.grid.shape[0]))
    for z in s.values():  # every split holds occupied sections
        assert counts[z].sum() > 0


def test_normalizer_and_windows(rasters):
    r = rasters["3d"]
    s = raster_splits(r)
    norm = channel_stats(r, s["train"])
    img = np.asarray(r.image.compute())
    z = np.asarray(s["train"])
    tissue = img[-1][z] > 0
    feats = img[:-1][:, z][:, tissue]
    np.testing.assert_allclose(norm.mean, feats.mean(axis=1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(norm.std, np.where(feats.std(axis=1) < 1e-6, 1, feats.std(axis=1)), rtol=1e-4)
    expected = norm.apply(img)
    assert expected.shape[0] == norm.in_channels == img.shape[0]
    assert np.all(expected[:, img[-1] == 0] == 0) and np.all(expected[-1] == (img[-1] > 0))
    reader = RasterReader(r, norm, allowed_z=s["val"], cache_bytes=1)  # tiny cache: every plane re-read
    lo, size = (s["val"][0] - 1, -2, 5), (3, 9, 7)
    win = reader.window(lo, size)
    ref = np.zeros_like(win)
    for k in range(3):
        zz = lo[0] + k
        if zz in s["val"]:
            ref[:, k, 2:] = expected[:, zz, :7, 5:12]
    np.testing.assert_array_equal(win, ref)  # zero outside the volume and outside the split's z


def test_cell_patches_are_centred_on_the_cells_voxel(rasters):
    r, cells = rasters["section"], rasters["cells"]
    s = raster_splits(r)
    table = class_table(r, cells, "class")
    norm = channel_stats(r, s["train"])
    ds = CellPatchDataset(r, cells, table, "val", s, norm, 2, (3, 3), (2, 2))
    assert len(ds) > 100 and ds.targets.dtype.is_floating_point is False
    vox = np.asarray(r.voxel_index[:])
    assert set(vox[ds.cells, 0]) == set(s["val"])
    labels = np.asarray(cells.categorical("class").codes.compute())
    cats = cells.categorical("class").categories
    np.testing.assert_array_equal(np.asarray(table.names)[ds.targets.numpy()], np.asarray(cats)[labels[ds.cells]])
    full = norm.apply(np.asarray(r.image.compute()))
    padded = np.pad(full, ((0, 0), (0, 0), (3, 3), (3, 3)))
    for i in range(0, len(ds), 97):
        x, y = ds[i]
        z, yy, xx = vox[ds.cells[i]]
        assert x.shape == (norm.in_channels, 7, 7) and int(y) == int(ds.targets[i])
        np.testing.assert_array_equal(x.numpy(), padded[:, z, yy : yy + 7, xx : xx + 7])
    capped = CellPatchDataset(r, cells, table, "val", s, norm, 2, (3, 3), (2, 2), max_samples=50, seed=1)
    assert len(capped) == 50 and set(capped.cells) <= set(ds.cells)


def test_tiles_3d_targets_and_split_isolation(rasters):
    r = rasters["3d"]
    s = raster_splits(r)
    table = class_table(r, None, "parcellation_division")
    assert "unassigned" not in table.names and len(table.colors) == len(table.names)
    norm = channel_stats(r, s["train"])
    ds = TileDataset(r, table, "train", s, norm, 3, (2, 32, 32))
    labels = np.asarray(r.labels["parcellation_division"].data.compute())
    lut = table.label_lookup()
    counts = np.zeros(len(table.names), dtype=np.int64)
    for i in range(len(ds)):
        x, y = ds[i]
        z0, y0, x0 = ds.tiles[i]
        assert x.shape == (norm.in_channels, 2, 32, 32) and y.shape == (2, 32, 32)
        for k in range(2):
            if z0 + k not in s["train"]:
                assert (x[:, k] == 0).all() and (y[k] == -1).all()
        sub = lut[labels[z0 : z0 + 2, y0 : y0 + 32, x0 : x0 + 32]]
        ok = np.isin(np.arange(z0, z0 + 2), s["train"])[: sub.shape[0]]
        ref = np.full((2, 32, 32), -1)
        ref[: sub.shape[0], : sub.shape[1], : sub.shape[2]][ok] = sub[ok]
        np.testing.assert_array_equal(y.numpy(), ref)
        counts += np.bincount(ref[ref >= 0], minlength=len(counts))
    np.testing.assert_array_equal(np.bincount(ds.targets.numpy(), minlength=len(counts)), counts)


def test_cell_splits_follow_voxel_z(rasters):
    r = rasters["3d"]
    s = raster_splits(r, seed=2)
    split = cell_splits(r, s)
    vox = np.asarray(r.voxel_index[:])
    assert (split[vox[:, 0] < 0] == "none").all() and (vox[:, 0] < 0).sum() > 0
    for name, zs in s.items():
        assert set(vox[np.asarray(split == name), 0]) <= set(zs)


def test_empty_split_is_an_input_error(rasters):
    r, cells = rasters["3d"], rasters["cells"]
    n_z = r.grid.shape[0]
    empty = {"train": list(range(1, n_z - 1)), "val": [0], "test": [n_z - 1]}  # z 0 and the last z: empty margins
    norm = Normalizer(np.zeros(len(r.feature_channels)), np.ones(len(r.feature_channels)))
    with pytest.raises(InputError, match="split 'val'.*no cell"):
        CellPatchDataset(r, cells, class_table(r, cells, "class"), "val", empty, norm, 3, (1, 3, 3), (1, 1, 1))
    with pytest.raises(InputError, match="split 'test'.*no voxel labelled"):
        TileDataset(r, class_table(r, None, "class"), "test", empty, norm, 3, (1, 8, 8))
    with pytest.raises(InputError, match="no cells"):
        channel_stats(r, [0])
    with pytest.raises(InputError, match="labels/cluster"):
        class_table(r, None, "cluster")
