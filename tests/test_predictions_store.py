"""The predictions.zarr format in one module: the reader on a store written by the real predict path agrees with
the documented layout, and damaged or foreign stores are refused with the array / field and the fix."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from abc_pipeline.cells import CellSource
from abc_pipeline.errors import InputError
from abc_pipeline.fileio import MARKER_NAME
from abc_pipeline.learn.checkpoint import load_checkpoint
from abc_pipeline.learn.data import names_digest
from abc_pipeline.learn.predict import atlas_config, predict_raster
from abc_pipeline.learn.predictions import FIELDS, open_predictions
from abc_pipeline.raster.ome import open_raster


@pytest.fixture(scope="module")
def store(atlas: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The celltype run's predictions of the section raster, by ``predict_raster``. Do not modify it."""
    out = tmp_path_factory.mktemp("predictions_store") / "predictions.zarr"
    return predict_raster(_checkpoint(atlas, "ct"), atlas["section"], out, cells=atlas["cells"], progress=False)


def _checkpoint(atlas: dict, run: str) -> Path:
    return atlas["out"] / "models" / run / "checkpoint.pt"


def _copy(store: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "predictions.zarr"
    shutil.copytree(store, copy)
    return copy


def _edit_attrs(path: Path, **changes) -> None:
    """Replace (value) or delete (None) fields of the store's abc_pipeline.predictions attributes."""
    group = zarr.open_group(str(path), mode="a")
    meta = dict(group.attrs["abc_pipeline"]["predictions"])
    for key, value in changes.items():
        if value is None:
            del meta[key]
        else:
            meta[key] = value
    group.attrs["abc_pipeline"] = {"predictions": meta}


def test_reader_round_trips_a_predicted_store(atlas: dict, store: Path) -> None:
    checkpoint = _checkpoint(atlas, "ct")
    ckpt = load_checkpoint(checkpoint)
    config = atlas_config(ckpt, checkpoint)
    r, src = open_raster(atlas["section"]), CellSource(atlas["cells"])
    p = open_predictions(store, checkpoint)
    raw = zarr.open_group(str(store), mode="r")  # the documented paths, read without the reader
    n, k = src.n_cells, len(config["classes"]["names"])
    assert (p.task, p.model, p.config_hash) == ("celltype", ckpt["model_name"], ckpt["config_hash"])
    assert p.level == config["classes"]["level"] and list(p.class_names) == list(config["classes"]["names"])
    assert len(p.colors) == k and p.n_cells == n and p.grid_shape == tuple(r.grid.shape)
    assert set(FIELDS) <= set(p.meta) and {"tile_size", "halo", "metrics"} <= set(p.meta)
    assert p.meta == raw.attrs["abc_pipeline"]["predictions"]
    for array, path, shape, dtype in (
        (p.proba_image, "0", (k, *r.grid.shape), np.float32),
        (p.label_image, "labels/pred_celltype/0", tuple(r.grid.shape), np.uint16),
        (p.cell_pred, "cells/pred", (n,), np.int16),
        (p.cell_proba, "cells/proba", (n, k), np.float32),
        (p.cell_split, "cells/split", (n,), np.int8),
    ):
        assert array.shape == shape and array.dtype == dtype, path
        np.testing.assert_array_equal(np.asarray(array[:]), np.asarray(raw[path][:]))
    proba, pred = np.asarray(p.cell_proba[:]), np.asarray(p.cell_pred[:])
    has = pred >= 0
    assert has.any() and np.isnan(proba[~has]).all()
    np.testing.assert_array_equal(pred[has], proba[has].argmax(1))
    image, label = np.asarray(p.proba_image[:]), np.asarray(p.label_image[:])
    tissue = image.sum(axis=0) > 0
    np.testing.assert_array_equal(label[tissue], image.argmax(0)[tissue] + 1)
    assert (label[~tissue] == 0).all()
    split = p.split_categorical()
    assert list(split.categories) == ["train", "val", "test", "none"] and len(split) == n
    assert {"train", "test"} <= set(split[has])  # the checkpoint's splits on its own raster
    # the cross-checks of annotate and evaluate accept the store's own inputs
    p.check_cells(src.path, n, names_digest(src.obs_names()))
    p.check_written_by(checkpoint, ckpt, config, r, names_digest(r.cell_label))


def test_a_raster_is_not_a_predictions_store(atlas: dict) -> None:
    with pytest.raises(InputError, match=r"s\.ome\.zarr is not a predictions store of `abc-pipeline predict`"):
        open_predictions(atlas["section"])
    with pytest.raises(InputError, match="give the predictions.zarr written with .*checkpoint.pt"):
        open_predictions(atlas["section"], _checkpoint(atlas, "ct"))


def test_attributes_without_a_field_are_refused(store: Path, tmp_path: Path) -> None:
    copy = _copy(store, tmp_path)
    _edit_attrs(copy, n_cells=None)
    with pytest.raises(InputError, match=r"is not a predictions store .*lack \['n_cells'\]"):
        open_predictions(copy)


def test_a_wrong_cell_count_is_refused(atlas: dict, store: Path, tmp_path: Path) -> None:
    n = CellSource(atlas["cells"]).n_cells
    copy = _copy(store, tmp_path)
    _edit_attrs(copy, n_cells=n + 1)  # the attributes disagree with the per-cell arrays
    with pytest.raises(InputError, match=rf"cells/pred has shape \({n},\) but \({n + 1},\) is expected.*predict"):
        open_predictions(copy)
    p = open_predictions(store)  # a consistent store of other cells than the cells.zarr given
    with pytest.raises(InputError, match=rf"predicts {n} cells of another cells.zarr than .* \({n - 1} cells\)"):
        p.check_cells(Path(atlas["cells"]), n - 1, names_digest(CellSource(atlas["cells"]).obs_names()))


def test_a_missing_array_is_refused(store: Path, tmp_path: Path) -> None:
    copy = _copy(store, tmp_path)
    shutil.rmtree(copy / "cells" / "split")
    # the writer's record of the chunk files finds it first
    with pytest.raises(InputError, match=r"is damaged: array 'cells/split' has 0 chunk files.*Re-run `abc-pipeline"):
        open_predictions(copy)
    (copy / MARKER_NAME).unlink()  # a store without the record (another tool, an older version)
    with pytest.raises(
        InputError, match=r"cells/split is missing; the store is damaged\. Re-run `abc-pipeline predict"
    ):
        open_predictions(copy)


def test_a_store_of_another_checkpoint_and_raster_is_named(atlas: dict, store: Path) -> None:
    checkpoint = _checkpoint(atlas, "rg")
    ckpt = load_checkpoint(checkpoint)
    r = open_raster(atlas["recon"])
    p = open_predictions(store, checkpoint)
    with pytest.raises(InputError, match=r"was not predicted by .*task 'celltype' \(checkpoint: 'region'\).*raster "):
        p.check_written_by(checkpoint, ckpt, atlas_config(ckpt, checkpoint), r, names_digest(r.cell_label))
