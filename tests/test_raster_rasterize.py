"""rasterize(): exact voxel means, counts and majority labels in 2D, 3D and anisotropic 3D; the
per-cell voxel index; OME-Zarr read back with ome-zarr; channels; bad input; atomic replacement."""

from __future__ import annotations

import importlib
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import zarr
from raster_fixtures import write_cells

from abc_pipeline.cells import CellSource
from abc_pipeline.cli import main
from abc_pipeline.errors import InputError
from abc_pipeline.raster import Grid, binning, open_raster, rasterize

rasterize_module = importlib.import_module("abc_pipeline.raster.rasterize")  # the package re-exports the function

CLASSES = ["Astro", "Neuron", "Oligo"]


# ----------------------------------------------------------------------------------- references
def reference(coords_zyx: np.ndarray, grid: Grid, values: np.ndarray, codes: np.ndarray | None = None):
    """Brute-force raster: means (C, z, y, x), counts, majority labels (ties -> smallest code)."""
    idx = np.floor((coords_zyx - np.array(grid.origin)) / np.array(grid.voxel_size))
    with np.errstate(invalid="ignore"):
        ok = np.all((idx >= 0) & (idx < np.array(grid.shape)), axis=1)
    sums = np.zeros((values.shape[1], *grid.shape))
    counts = np.zeros(grid.shape)
    votes: dict[tuple, Counter] = {}
    for i in np.flatnonzero(ok):
        v = tuple(idx[i].astype(int))
        sums[(slice(None), *v)] += values[i]
        counts[v] += 1
        if codes is not None and codes[i] >= 0:
            votes.setdefault(v, Counter())[int(codes[i])] += 1
    means = np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0)
    labels = np.zeros(grid.shape, dtype=np.int64)
    for v, c in votes.items():
        top = max(c.values())
        labels[v] = min(k for k, n in c.items() if n == top) + 1
    index = np.where(ok[:, None], idx, -1).astype(np.int64)
    return means, counts, labels, index


def random_atlas(n: int, seed: int, n_genes: int = 6, nan_frac: float = 0.1):
    """Cells on a few reconstructed sections 0.2 mm apart, small-integer expression (exact float sums)."""
    rng = np.random.default_rng(seed)
    z = 1.0 + 0.2 * rng.integers(0, 5, n)
    xyz = np.column_stack([rng.uniform(0, 2, n), rng.uniform(0, 1.5, n), z])
    xyz[rng.random(n) < nan_frac] = np.nan
    expr = rng.integers(0, 16, (n, n_genes)).astype(np.float32) / 4
    cls = rng.choice(len(CLASSES), n)
    return xyz, expr, cls


@pytest.fixture(scope="module")
def atlas(tmp_path_factory: pytest.TempPathFactory):
    xyz, expr, cls = random_atlas(400, seed=1)
    symbols = ["Gad1", "Slc17a7", "Sst", "Pvalb", "Vip", "Blank-1"]
    path = tmp_path_factory.mktemp("atlas") / "cells.zarr"
    write_cells(
        path,
        expr,
        spatial_3d=xyz,
        ccf=xyz[:, [2, 1, 0]] + 3.0,
        symbols=symbols,
        labels={"class": ([CLASSES[c] for c in cls], CLASSES)},
        chunk=37,
    )
    return path, xyz, expr, cls, symbols


# ----------------------------------------------------------------------------------- exact small cases
def test_section_raster_hand_computed(tmp_path: Path) -> None:
    # two used sections (category order S9 before S1, unused S5 dropped), 1 mm pixels on [0, 2)^2
    spatial = np.array(
        [
            [0.2, 0.3],
            [0.7, 0.1],
            [0.5, 0.5],  # S9 pixel (y0, x0)
            [1.5, 1.5],
            [1.2, 1.7],  # S1 pixel (y1, x1): tie Astro/Neuron
            [0.5, 1.5],  # S1 pixel (y1, x0), x=0.5 y=1.5
            [5.0, 0.5],
        ]
    )  # S1 outside the bounds
    sections = ["S9", "S9", "S9", "S1", "S1", "S1", "S1"]
    expr = np.array([[1, 0], [2, 4], [6, 8], [1, 1], [3, 2], [5, 5], [9, 9]], dtype=np.float32)
    cls = ["Neuron", "Oligo", "Oligo", "Neuron", "Astro", "Neuron", "Astro"]
    cells = write_cells(
        tmp_path / "cells.zarr",
        expr,
        spatial=spatial,
        sections=sections,
        section_order=["S9", "S5", "S1"],
        z_section=np.array([7.0] * 3 + [7.4] * 4),
        labels={"class": (cls, CLASSES)},
        chunk=3,
    )
    out = rasterize(
        cells,
        tmp_path / "r.ome.zarr",
        space="section",
        voxel_size=1.0,
        bounds=[(0, 2), (0, 2)],
        labels=["class"],
        progress=False,
    )
    r = open_raster(out)
    assert r.grid.sections == ("S9", "S1") and r.grid.shape == (2, 2, 2)
    assert r.channels == ("Gene0", "Gene1", "n_cells")
    img = r.image.compute()
    np.testing.assert_array_equal(img[:, 0, 0, 0], [3.0, 4.0, 3.0])  # means of 3 cells, count 3
    np.testing.assert_array_equal(img[:, 1, 1, 1], [2.0, 1.5, 2.0])
    np.testing.assert_array_equal(img[:, 1, 1, 0], [5.0, 5.0, 1.0])
    assert img[2].sum() == 6  # the outside cell is not counted
    lab = r.labels["class"].data.compute()
    assert lab[0, 0, 0] == CLASSES.index("Oligo") + 1
    assert lab[1, 1, 1] == CLASSES.index("Astro") + 1  # 1:1 tie -> smaller category code
    assert lab[1, 1, 0] == CLASSES.index("Neuron") + 1
    assert lab[0, 1, 1] == 0  # no cells
    assert list(r.labels["class"].names(lab[1, 1])) == ["Neuron", "Astro"]
    np.testing.assert_array_equal(
        r.voxel_index[:], [[0, 0, 0], [0, 0, 0], [0, 0, 0], [1, 1, 1], [1, 1, 1], [1, 1, 0], [-1, -1, -1]]
    )
    assert list(r.cell_label[:2]) == ["cell-00000", "cell-00001"]
    counts = r.attrs["counts"]
    assert counts == {
        "cells": 7,
        "rasterized": 6,
        "missing_coordinates": 0,
        "outside_grid": 1,
        "nonfinite_expression": 0,
    }
    np.testing.assert_allclose(r.grid.physical_scale()[0], 0.4)  # nominal section spacing (7.0 -> 7.4 mm)


def test_section_extent_and_order_found_across_chunks(tmp_path: Path) -> None:
    """Without bounds, the section grid's extent and section order come from every chunk of cells (5 here)."""
    rng = np.random.default_rng(3)
    n = 40
    spatial = rng.uniform(0.0, 2.0, (n, 2))
    spatial[-1] = [3.9, 2.9]  # the far corner: a cell of the last chunk
    cells = write_cells(
        tmp_path / "cells.zarr",
        rng.random((n, 2), dtype=np.float32),
        spatial=spatial,
        sections=["S2"] * 20 + ["S1"] * 20,
        section_order=["S1", "S2", "S3"],
        chunk=8,
    )
    out = rasterize(
        cells, tmp_path / "r.ome.zarr", space="section", voxel_size=0.5, labels=[], chunk_cells=8, progress=False
    )
    r = open_raster(out)
    assert r.grid.sections == ("S1", "S2") and r.grid.upper[1] >= 2.9 and r.grid.upper[2] >= 3.9
    index = r.voxel_index[:]
    np.testing.assert_array_equal(index[:, 0], [1] * 20 + [0] * 20)  # z = the section's place in the order
    assert int(r.image[-1].sum().compute()) == n  # every cell binned once


@pytest.mark.parametrize("space, voxel", [("reconstructed", (0.2, 0.125, 0.125)), ("ccf", 0.25)])
@pytest.mark.parametrize("in_memory", [True, False], ids=["memory", "spill"])
def test_3d_matches_brute_force(
    atlas, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, space: str, voxel, in_memory: bool
) -> None:
    path, xyz, expr, cls, symbols = atlas
    # small blocks and a tiny stage-2 budget exercise many blocks, multi-block runs and the streaming path;
    # max_accumulator_gb=0 forces the disk spill
    monkeypatch.setattr(
        binning, "choose_block", lambda shape, n, zd, multiple: tuple(min(b, s) for b, s in zip((2, 4, 8), shape))
    )
    monkeypatch.setattr(rasterize_module, "_STAGE2_BUDGET", 600)
    out = rasterize(
        path,
        tmp_path / "r.ome.zarr",
        space=space,
        voxel_size=voxel,
        labels=["class"],
        chunk_cells=37,
        progress=False,
        levels=2,
        max_accumulator_gb=1.0 if in_memory else 0.0,
    )
    r = open_raster(out)
    coords = xyz[:, ::-1] if space == "reconstructed" else (xyz[:, [2, 1, 0]] + 3.0)[:, ::-1]
    means, counts, labels, index = reference(coords, r.grid, expr[:, :5], cls)
    img = r.image.compute()
    np.testing.assert_allclose(img[:5], means, rtol=1e-6, atol=0)
    np.testing.assert_array_equal(img[5], counts)
    np.testing.assert_array_equal(r.labels["class"].data.compute(), labels)
    np.testing.assert_array_equal(r.voxel_index[:], index)  # per-cell index == brute force
    np.testing.assert_array_equal(r.voxel_index[:], r.grid.to_index(coords))  # == the Grid
    n_nan = int(np.isnan(xyz).any(axis=1).sum())
    assert r.attrs["counts"]["missing_coordinates"] == n_nan and counts.sum() == 400 - n_nan
    # level 1 = the exact rasterization on the coarser grid (count-weighted means, summed counts)
    g1 = r.level_grid(1)
    assert g1.voxel_size[0] == (0.2 if space == "reconstructed" else 0.5)  # anisotropic z never merged
    m1, c1, _, _ = reference(coords, g1, expr[:, :5])
    lvl1 = r.levels[1].compute()
    assert lvl1.shape == (6, *g1.shape)
    np.testing.assert_allclose(lvl1[:5], m1, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(lvl1[5], c1)


def test_shuffled_cells_give_the_same_raster(atlas, tmp_path: Path) -> None:
    path, xyz, expr, cls, symbols = atlas
    perm = np.random.default_rng(5).permutation(len(expr))
    shuffled = write_cells(
        tmp_path / "shuffled.zarr",
        expr[perm],
        spatial_3d=xyz[perm],
        symbols=symbols,
        labels={"class": ([CLASSES[c] for c in cls[perm]], CLASSES)},
        chunk=50,
    )
    a = open_raster(
        rasterize(path, tmp_path / "a.ome.zarr", voxel_size=(0.2, 0.25, 0.25), labels=["class"], progress=False)
    )
    b = open_raster(
        rasterize(
            shuffled,
            tmp_path / "b.ome.zarr",
            voxel_size=(0.2, 0.25, 0.25),
            labels=["class"],
            chunk_cells=100,
            progress=False,
        )
    )
    np.testing.assert_array_equal(a.image.compute(), b.image.compute())  # quarter-integer values: exact sums
    np.testing.assert_array_equal(a.labels["class"].data.compute(), b.labels["class"].data.compute())
    np.testing.assert_array_equal(a.voxel_index[:][perm], b.voxel_index[:])


@pytest.mark.parametrize("verbatim", [True, False], ids=["chunk-files", "tasks"])
def test_cell_labels_are_the_obs_names(atlas, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, verbatim: bool) -> None:
    path = atlas[0]
    if not verbatim:  # a store whose chunk files cannot be copied: the stage-1 tasks copy their rows
        monkeypatch.setattr(rasterize_module, "copy_array", lambda *args: None)
    r = open_raster(
        rasterize(
            path, tmp_path / "c.ome.zarr", voxel_size=(0.2, 0.25, 0.25), labels=[], chunk_cells=100, progress=False
        )
    )
    names = CellSource(path).obs_names()
    np.testing.assert_array_equal(r.cell_label[:], names[:])
    task_rows = r.voxel_index.chunks[:1]  # cells per stage-1 task
    assert r.cell_label.chunks == (names.chunks if verbatim else task_rows) and names.chunks != task_rows


# ----------------------------------------------------------------------------------- OME-Zarr
def test_ome_zarr_reader_reads_axes_scales_channels_and_labels(atlas, tmp_path: Path) -> None:
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Multiscales, Reader

    path, *_ = atlas
    out = rasterize(
        path, tmp_path / "r.ome.zarr", voxel_size=(0.2, 0.1, 0.1), labels=["class"], levels=3, progress=False
    )
    nodes = list(Reader(parse_url(str(out)))())
    image = next(n for n in nodes if n.load(Multiscales) and not n.load(Label))
    axes = image.metadata["axes"]
    assert [a["name"] for a in axes] == ["c", "z", "y", "x"]
    assert [a.get("unit") for a in axes[1:]] == ["millimeter"] * 3 and axes[0]["type"] == "channel"
    assert image.metadata["channel_names"] == ["Gad1", "Slc17a7", "Sst", "Pvalb", "Vip", "n_cells"]
    scales = [t[0]["scale"] for t in image.metadata["coordinateTransformations"]]
    np.testing.assert_allclose(scales, [[1, 0.2, 0.1, 0.1], [1, 0.2, 0.2, 0.2], [1, 0.2, 0.4, 0.4]])
    assert len(image.data) == 3 and image.data[0].shape[1] == image.data[2].shape[1]  # z kept
    assert image.data[1].shape[2] == -(-image.data[0].shape[2] // 2)
    label = next(n for n in nodes if n.load(Label))
    assert label.metadata["name"] == "class"
    assert label.metadata["properties"][1]["name"] == CLASSES[0]
    assert set(label.metadata["color"]) == {0, 1, 2, 3}
    assert np.issubdtype(label.data[0].dtype, np.integer) and label.data[0].shape == image.data[0].shape[1:]
    root = zarr.open_group(str(out), mode="r")
    assert root.attrs["multiscales"][0]["version"] == "0.4"
    assert root.attrs["multiscales"][0]["name"] == "r" and root.attrs["omero"]["name"] == "r"  # not a label's name
    assert root["0"].metadata.dimension_separator == "/"
    raster = root.attrs["abc_pipeline"]["raster"]
    assert raster["channels"][-1] == "n_cells" and Grid.from_attrs(raster["grid"]).shape == image.data[0].shape[1:]


# ----------------------------------------------------------------------------------- channels
def test_gene_list_and_unknown_genes(atlas, tmp_path: Path) -> None:
    path, xyz, expr, *_ = atlas
    r = open_raster(
        rasterize(path, tmp_path / "g.ome.zarr", genes=["Sst", "ENSMUSG00000000000"], labels=[], progress=False)
    )
    assert r.channels == ("Sst", "Gad1", "n_cells") and r.labels == {}
    full = open_raster(rasterize(path, tmp_path / "f.ome.zarr", labels=[], progress=False))
    np.testing.assert_array_equal(r.image[:2].compute(), full.image[[2, 0]].compute())
    with pytest.raises(InputError, match=r"'Sstt' \(did you mean Sst\?\).*'Pvalbb'"):
        rasterize(path, tmp_path / "x.ome.zarr", genes=["Sstt", "Gad1", "Pvalbb"], progress=False)
    with pytest.raises(InputError, match="did you mean class"):
        rasterize(path, tmp_path / "x.ome.zarr", labels=["clas"], progress=False)
    assert not (tmp_path / "x.ome.zarr").exists()


def test_pca_channels_store_the_model(atlas, tmp_path: Path) -> None:
    path, xyz, expr, *_ = atlas
    r = open_raster(
        rasterize(
            path,
            tmp_path / "p.ome.zarr",
            pca=3,
            pca_sample=300,
            voxel_size=(0.2, 0.25, 0.25),
            labels=[],
            progress=False,
        )
    )
    assert r.channels == ("PC1", "PC2", "PC3", "n_cells") and r.attrs["channel_mode"] == "pca"
    p = r.pca
    assert p["components"].shape == (3, 5) and list(p["genes"]) == ["Gad1", "Slc17a7", "Sst", "Pvalb", "Vip"]
    assert np.all(np.diff(p["explained_variance"]) <= 0) and 0 < p["explained_variance_ratio"].sum() <= 1
    scores = (expr[:, :5] - p["mean"]) @ p["components"].T
    means, counts, _, _ = reference(xyz[:, ::-1], r.grid, scores)
    np.testing.assert_allclose(r.features.compute(), means, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------- bad input
def test_outside_bounds_counted_and_reported(atlas, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path, xyz, *_ = atlas
    with caplog.at_level(logging.WARNING):
        r = open_raster(
            rasterize(
                path,
                tmp_path / "b.ome.zarr",
                bounds=[(0.9, 1.9), (0, 1), (0, 1)],
                voxel_size=(0.2, 0.1, 0.1),
                labels=[],
                progress=False,
            )
        )
    ok = ~np.isnan(xyz).any(axis=1)
    inside = ok & (xyz[:, 1] < 1) & (xyz[:, 0] < 1) & (xyz[:, 2] < 1.9)
    assert r.attrs["counts"]["outside_grid"] == int((ok & ~inside).sum()) > 0
    assert r.n_cells.sum().compute() == inside.sum()
    assert "outside the grid bounds" in caplog.text and "no coordinates" in caplog.text
    assert r.grid.origin == (0.9, 0.0, 0.0) and r.grid.shape == (5, 10, 10)


def test_clear_errors_and_no_half_written_store(atlas, tmp_path: Path) -> None:
    path, *_ = atlas
    out = tmp_path / "e.ome.zarr"
    with pytest.raises(InputError, match="positive"):
        rasterize(path, out, voxel_size=0, progress=False)
    with pytest.raises(InputError, match="empty grid"):
        rasterize(path, out, bounds=[(1, 1), (0, 1), (0, 1)], progress=False)
    with pytest.raises(InputError, match=r"3 \(lower, upper\) pairs"):
        rasterize(path, out, bounds=[(0, 1), (0, 1)], progress=False)
    with pytest.raises(InputError, match="no cell .* falls inside the grid"):  # fails after binning began
        rasterize(path, out, bounds=[(50, 51), (0, 1), (0, 1)], progress=False)
    with pytest.raises(InputError, match="levels must be >= 2"):
        rasterize(path, out, levels=1, progress=False)
    assert list(tmp_path.iterdir()) == []  # no output, no temporary store left behind


def test_existing_raster_refused_or_replaced_atomically(atlas, tmp_path: Path) -> None:
    path, *_ = atlas
    out = rasterize(path, tmp_path / "r.ome.zarr", voxel_size=(0.2, 0.25, 0.25), labels=["class"], progress=False)
    with pytest.raises(InputError, match=r"already exists \(a raster with grid space=reconstructed.*overwrite"):
        rasterize(path, out, voxel_size=(0.2, 0.1, 0.1), progress=False)
    assert open_raster(out).grid.voxel_size[1] == 0.25  # untouched
    rasterize(path, out, voxel_size=(0.2, 0.1, 0.1), labels=[], overwrite=True, progress=False)
    r = open_raster(out)
    assert r.grid.voxel_size[1] == 0.1 and r.labels == {} and not (out / "labels").exists()  # nothing mixed in
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.ome.zarr"]
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not written by abc-pipeline"):
        rasterize(path, tmp_path / "plain", overwrite=True, progress=False)
    assert (tmp_path / "plain" / "notes.txt").read_text() == "mine"


# ----------------------------------------------------------------------------------- execution
def test_distributed_cluster_gives_the_same_raster(atlas, tmp_path: Path) -> None:
    from distributed import LocalCluster

    path, *_ = atlas
    local = open_raster(
        rasterize(path, tmp_path / "l.ome.zarr", labels=["class"], progress=False, scheduler="synchronous")
    )
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster:
        dist = open_raster(
            rasterize(
                path, tmp_path / "d.ome.zarr", labels=["class"], address=cluster.scheduler_address, progress=False
            )
        )
    np.testing.assert_array_equal(local.image.compute(), dist.image.compute())
    np.testing.assert_array_equal(local.levels[1].compute(), dist.levels[1].compute())
    np.testing.assert_array_equal(local.labels["class"].data.compute(), dist.labels["class"].data.compute())


def test_cli_rasterize(atlas, tmp_path: Path) -> None:
    path, *_ = atlas
    out = tmp_path / "c.ome.zarr"
    genes = tmp_path / "genes.txt"
    genes.write_text("# channels\nVip\nSst\n")
    argv = [
        "rasterize",
        "--cells",
        str(path),
        "--out",
        str(out),
        "--space",
        "ccf",
        "--voxel-size",
        "0.5",
        "--genes-file",
        str(genes),
        "--labels",
        "class",
        "--levels",
        "2",
        "--no-progress",
    ]
    assert main(argv) == 0
    r = open_raster(out)
    assert r.channels == ("Vip", "Sst", "n_cells") and r.grid.space == "ccf" and r.grid.voxel_size == (0.5, 0.5, 0.5)
    assert main(argv) == 2  # exists -> clear error, exit status 2
    assert main([*argv, "--overwrite"]) == 0
    base = ["rasterize", "--cells", str(path), "--out", str(tmp_path / "o"), "--no-progress"]
    assert main([*base, "--genes", "Vipp"]) == 2
    assert main([*base, "--bounds", "0", "1", "2"]) == 2
    assert not (tmp_path / "o").exists()


def test_assembled_synthetic_atlas(assembled: Path, tmp_path: Path) -> None:
    """The store written by `assemble` rasterizes in section and reconstructed space."""
    src = zarr.open_group(str(assembled), mode="r")
    n = src["X"].shape[0]
    has_ccf = ~np.isnan(src["obsm/spatial_3d"][:]).any(axis=1)
    sec = open_raster(rasterize(assembled, tmp_path / "s.ome.zarr", space="section", voxel_size=0.2, progress=False))
    assert sec.n_cells.sum().compute() == n and sec.attrs["counts"]["missing_coordinates"] == 0
    assert "class" in sec.labels and len(sec.grid.sections) == sec.image.shape[1]
    rec = open_raster(
        rasterize(assembled, tmp_path / "r.ome.zarr", space="reconstructed", voxel_size=(0.2, 0.2, 0.2), progress=False)
    )
    assert rec.n_cells.sum().compute() == has_ccf.sum()
    assert rec.attrs["counts"]["missing_coordinates"] == n - has_ccf.sum()
    blank = np.asarray(src["var/blank"][:]).astype(bool)
    assert len(rec.feature_channels) == int((~blank).sum())
