"""Every store is checked before it is trusted: deleted chunks, forged shapes, sizes, cells without a class."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr
from test_safety_outputs import _cells, _error_line, tree

from abc_pipeline.atlas.assemble import assemble_dataset
from abc_pipeline.atlas.manifest import Manifest, get_profile, manifest_relative_path
from abc_pipeline.cells import CellSource
from abc_pipeline.cli import main
from abc_pipeline.errors import InputError
from abc_pipeline.fileio import MARKER_NAME
from abc_pipeline.learn.atlas import atlas_data
from abc_pipeline.learn.predict import _sample_cells, predict_raster
from abc_pipeline.raster import open_raster, rasterize
from abc_pipeline.raster.ome import create_array

DATASET = "MERFISH-C57BL6J-638850"


# ------------------------------------------------------------------------------------------------ deleted chunks
def test_cells_store_with_a_deleted_chunk_is_refused(tmp_path: Path, assembled: Path, capsys) -> None:
    cells = tmp_path / "cells.zarr"
    shutil.copytree(assembled, cells)
    (cells / "X" / "0.0").unlink()
    with pytest.raises(
        InputError,
        match=r"cells.zarr is damaged: array 'X' has \d+ chunk files but abc_pipeline .* "
        r"wrote \d+ \(missing: X/0.0\); a missing chunk would read as zeros",
    ):
        CellSource(cells)
    before = tree(tmp_path)
    assert main(["rasterize", "--cells", str(cells), "--out", str(tmp_path / "r.ome.zarr"), "--no-progress"]) == 2
    line = _error_line(capsys)
    assert "(missing: X/0.0)" in line and "Re-run `abc-pipeline assemble` to rebuild it" in line
    assert tree(tmp_path) == before


def test_raster_with_deleted_chunks_is_refused_by_train(tmp_path: Path, atlas: dict, capsys) -> None:
    raster = tmp_path / "s.ome.zarr"
    shutil.copytree(atlas["section"], raster)
    for chunk in sorted(p for p in (raster / "0").rglob("*") if p.is_file() and not p.name.startswith("."))[:3]:
        chunk.unlink()
    with pytest.raises(InputError, match=r"s.ome.zarr is damaged: array '0' has \d+ chunk files but .* wrote \d+"):
        open_raster(raster)
    before = tree(tmp_path)
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--raster",
                str(raster),
                "--cells",
                str(atlas["cells"]),
                "--task",
                "celltype",
                "--model",
                "cnn",
                "--out",
                str(run),
                "--epochs",
                "1",
                "--no-progress",
            ]
        )
        == 2
    )
    assert "s.ome.zarr is damaged: array '0'" in _error_line(capsys)
    assert tree(tmp_path) == before and not run.exists()


@pytest.fixture(scope="module")
def predictions(atlas: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("safety_predict") / "predictions.zarr"
    return predict_raster(
        atlas["out"] / "models" / "ct" / "checkpoint.pt", atlas["section"], out, cells=atlas["cells"], progress=False
    )


def test_predictions_with_a_deleted_chunk_are_refused_by_annotate(
    tmp_path: Path, atlas: dict, predictions: Path, capsys
) -> None:
    store = tmp_path / "predictions.zarr"
    shutil.copytree(predictions, store)
    (store / "cells" / "pred" / "0").unlink()
    before = tree(tmp_path)
    out = tmp_path / "annotated.h5ad"
    assert main(["annotate", "--cells", str(atlas["cells"]), "--predictions", str(store), "--out", str(out)]) == 2
    line = _error_line(capsys)
    assert (
        "predictions.zarr is damaged: array 'cells/pred' has 0 chunk files" in line and "missing: cells/pred/0" in line
    )
    assert tree(tmp_path) == before


def test_cells_without_probabilities_get_no_class(tmp_path: Path, atlas: dict, predictions: Path) -> None:
    """A cell whose voxel holds no probabilities (here: half the volume never written) is missing (-1, NaN),
    never class 0 with zero probabilities."""
    r = open_raster(atlas["section"])
    k = 3
    root = zarr.open_group(str(tmp_path / "p.zarr"), mode="w", zarr_format=2)
    nz, ny, nx = r.grid.shape
    proba = create_array(root, "0", (k, nz, ny, nx), (k, nz, ny, nx), np.float32)
    half = np.zeros((k, nz, ny, nx), np.float32)
    half[2, :, : ny // 2] = 1.0  # class 2 wherever probabilities exist
    proba[...] = half
    _sample_cells(root, proba, r, {}, k)
    vox = np.asarray(r.voxel_index[:])
    pred, cell_proba = np.asarray(root["cells/pred"][:]), np.asarray(root["cells/proba"][:])
    written = (vox[:, 0] >= 0) & (vox[:, 1] < ny // 2)
    assert written.any() and (~written).any()
    assert (pred[written] == 2).all() and (pred[~written] == -1).all()
    assert np.isnan(cell_proba[~written]).all() and (cell_proba[written].sum(axis=1) == 1).all()
    # the real predictions: every cell with a class has probabilities summing to 1
    pred, cell_proba = (
        np.asarray(zarr.open_group(str(predictions))["cells/pred"][:]),
        np.asarray(zarr.open_group(str(predictions))["cells/proba"][:]),
    )
    np.testing.assert_allclose(cell_proba[pred >= 0].sum(axis=1), 1, atol=1e-4)
    assert np.isnan(cell_proba[pred < 0]).all()


# ------------------------------------------------------------------------------------------------ forged shapes
def _expression_path(release: Path) -> Path:
    manifest = Manifest.from_path(release / manifest_relative_path("20250531"))
    return get_profile(DATASET).entries(manifest)["expression"].local_path(release)


def test_h5ad_with_a_forged_shape_is_refused_before_any_scratch_file(tmp_path: Path, synthetic_release: Path) -> None:
    release = tmp_path / "release"
    shutil.copytree(synthetic_release, release)
    h5ad = _expression_path(release)
    with h5py.File(h5ad, "r+") as f:
        n_genes = int(f["X"].attrs["shape"][1])
        f["X"].attrs["shape"] = np.array([10**12, n_genes])
    results = tmp_path / "results"
    results.mkdir()
    with pytest.raises(
        InputError,
        match=rf"X \(cells x genes\) has shape \(1000000000000, {n_genes}\) but "
        rf"\(\d+, {n_genes}\) is expected; the file is damaged or forged",
    ):
        assemble_dataset(DATASET, cache_dir=release, out=results / "cells.zarr", progress=False)
    with h5py.File(h5ad, "r+") as f:  # X's shape right, its indptr short
        f["X"].attrs["shape"] = np.array([f["obs"]["cell_label"].shape[0], n_genes])
        indptr = f["X"]["indptr"][:-5]
        del f["X"]["indptr"]
        f["X"]["indptr"] = indptr
    with pytest.raises(InputError, match=r"X/indptr has shape \(\d+,\) but \(\d+,\) is expected"):
        assemble_dataset(DATASET, cache_dir=release, out=results / "cells.zarr", progress=False)
    assert list(results.iterdir()) == []


def _forge_shape(array: Path, shape: list[int]) -> None:
    meta = json.loads((array / ".zarray").read_text())
    meta["shape"] = shape
    (array / ".zarray").write_text(json.dumps(meta))
    consolidated = array.parent / ".zmetadata"
    assert not consolidated.exists()  # rasters are not consolidated: .zarray is what readers see


def test_raster_whose_levels_disagree_with_the_grid_is_refused(tmp_path: Path, atlas: dict) -> None:
    raster = tmp_path / "s.ome.zarr"
    shutil.copytree(atlas["section"], raster)
    shape = json.loads((raster / "0" / ".zarray").read_text())["shape"]
    _forge_shape(raster / "0", [shape[0], shape[1], shape[2] * 40, shape[3]])
    with pytest.raises(
        InputError, match=r"image level 0 has shape .* but .* is expected; the file is damaged or forged"
    ):
        open_raster(raster)
    _forge_shape(raster / "0", shape)
    label = raster / "labels" / "class" / "0"
    _forge_shape(label, [n + 1 for n in json.loads((label / ".zarray").read_text())["shape"]])
    with pytest.raises(InputError, match=r"labels/class level 0 has shape"):
        open_raster(raster)
    shutil.rmtree(raster / "labels" / "class")
    with pytest.raises(InputError, match=r"array 'labels/class/0' has 0 chunk files but .* wrote \d+"):
        open_raster(raster)
    (raster / MARKER_NAME).unlink()  # a raster of an older version: no record of its chunks, the layout is checked
    with pytest.raises(InputError, match=r"the label volume labels/class listed in its attributes is missing"):
        open_raster(raster)


# ------------------------------------------------------------------------------------------------ sizes
def test_voxel_cap_and_its_override(tmp_path: Path, capsys) -> None:
    cells = _cells(tmp_path / "cells.zarr")
    out = tmp_path / "r.ome.zarr"
    before = tree(tmp_path)
    assert (
        main(
            [
                "rasterize",
                "--cells",
                str(cells),
                "--out",
                str(out),
                "--voxel-size",
                "0.0001",
                "--labels",
                "--no-progress",
            ]
        )
        == 2
    )
    assert (
        "voxels, more than the cap 2,147,483,648; check the voxel size and bounds, or raise the cap with "
        "--max-voxels N" in _error_line(capsys)
    )
    assert (
        main(
            [
                "rasterize",
                "--cells",
                str(cells),
                "--out",
                str(out),
                "--voxel-size",
                "0.1",
                "--labels",
                "--no-progress",
                "--max-voxels",
                "100",
            ]
        )
        == 2
    )
    assert "more than the cap 100" in _error_line(capsys)
    assert tree(tmp_path) == before
    rasterize(cells, out, voxel_size=0.1, labels=[], progress=False, max_voxels=None)  # explicit: no cap
    assert open_raster(out).grid.n_voxels > 100


def test_tiles_are_clamped_to_the_volume(atlas: dict) -> None:
    data = atlas_data(atlas["recon"], None, "region", tile_size=10_000)
    assert data.tile == tuple(data.raster.grid.shape)
    assert max(data.dataset("train")[0][0].shape[1:]) <= max(data.raster.grid.shape)
