"""The ``predictions.zarr`` store of ``abc-pipeline predict``: its layout, written and read here only.

Every model of an atlas task (networks, :func:`abc_pipeline.learn.predict.predict_raster`, and the
scikit-learn baselines, :func:`abc_pipeline.learn.baselines.predict_baseline`) writes the same store, an
OME-Zarr 0.4 image (opens in napari / ``ome-zarr``) plus per-cell tables (docs/learning.md, "Prediction")::

    0/                        (n_classes, z, y, x) float32 class probabilities (0 in empty voxels);
                              channels = classes
    labels/pred_<task>/0      (z, y, x) uint16: class k + 1 of the argmax (baselines: the majority of the
                              voxel's cells), 0 = no cells; colours + names
    cells/pred                (n_cells,) int16 class index per cell (cells.zarr obs order), -1 = no prediction
    cells/proba               (n_cells, n_classes) float32, NaN rows = no prediction
    cells/split               (n_cells,) int8 code into ``split_categories`` (train, val, test, none)
    .zattrs abc_pipeline.predictions    the fields of :func:`store_attrs` (:data:`FIELDS` on every store), the
                              test cells' ``metrics`` and the writer's extras (tile_size, halo; baseline)

Writing (inside :func:`abc_pipeline.fileio.staged_output`): :func:`create_store`, :func:`create_volumes` and
:func:`write_volume_metadata`, :func:`create_cell_tables` (with :func:`split_codes`), :func:`write_attrs`.
Reading: :func:`open_predictions` -> :class:`Predictions`, checked on open.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import zarr

from abc_pipeline import keys
from abc_pipeline.errors import InputError
from abc_pipeline.integrity import check_shape, verify_store
from abc_pipeline.learn.data import NO_SPLIT, SPLITS, ClassTable, cell_splits
from abc_pipeline.raster.grid import Grid
from abc_pipeline.raster.ome import (
    ATTRS_KEY,
    Raster,
    create_array,
    write_image_metadata,
    write_labels_metadata,
)

#: ``.zattrs[ATTRS_KEY][ENTRY]``: the store's description
ENTRY = "predictions"
PROBA = "0"
CELL_PRED = "cells/pred"
CELL_PROBA = "cells/proba"
CELL_SPLIT = "cells/split"
#: what the codes of ``cells/split`` mean
SPLIT_CATEGORIES = (*SPLITS, NO_SPLIT)
#: attribute fields every store has (written by :func:`store_attrs`)
FIELDS = (
    "task",
    "level",
    "model",
    "checkpoint",
    "config_hash",
    "best_epoch",
    "raster",
    "class_names",
    "colors",
    "split_categories",
    "splits",
    "dim",
    "n_cells",
    "cell_names_digest",
    "val_metrics",
)
_CELL_CHUNK = 1 << 16  # cells per chunk of the per-cell tables
_FIX = "Re-run `abc-pipeline predict` to rebuild it"


def label_path(task: str) -> str:
    """The label volume of ``task``'s predicted classes: ``labels/pred_<task>/0``."""
    return f"labels/{keys.prediction(task)}/0"


# ----------------------------------------------------------------------------------------------- writing
def create_store(path: Path) -> zarr.Group:
    """An empty predictions store at ``path`` (the staged temporary path; Zarr v2, as NGFF 0.4 requires)."""
    return zarr.open_group(str(path), mode="w", zarr_format=2)


def create_volumes(
    root: zarr.Group, task: str, n_classes: int, shape: Sequence[int], chunks: Sequence[int]
) -> tuple[zarr.Array, zarr.Array]:
    """The voxel volumes, filled with 0: probabilities ``0/`` ``(n_classes, *shape)`` float32 and labels
    ``labels/pred_<task>/0`` ``shape`` uint16; ``chunks``: the (z, y, x) chunk of both."""
    proba = create_array(root, PROBA, (n_classes, *shape), (min(n_classes, 16), *chunks), np.float32)
    group = root.require_group("labels").require_group(keys.prediction(task))
    return proba, create_array(group, "0", shape, chunks, np.uint16)


def write_volume_metadata(root: zarr.Group, grid: Grid, task: str, table: ClassTable) -> None:
    """OME-Zarr metadata of the volumes of :func:`create_volumes`: channels named by class, label colours."""
    name = keys.prediction(task)
    write_image_metadata(root, grid, 1, list(table.names), [(0.0, 1.0)] * len(table.names), name=f"{name}_proba")
    write_labels_metadata(root["labels"], name, grid, 1, table.names, table.colors)


def create_cell_tables(root: zarr.Group, n_cells: int, n_classes: int) -> tuple[zarr.Array, zarr.Array, zarr.Array]:
    """``cells/pred`` (filled with -1), ``cells/proba`` (NaN) and ``cells/split`` (0) of ``n_cells`` cells."""
    group = root.require_group("cells")
    pred = create_array(group, "pred", (n_cells,), (_CELL_CHUNK,), np.int16, fill_value=-1)
    proba = create_array(group, "proba", (n_cells, n_classes), (_CELL_CHUNK, n_classes), np.float32, fill_value=np.nan)
    split = create_array(group, "split", (n_cells,), (_CELL_CHUNK,), np.int8)
    return pred, proba, split


def split_codes(raster: Raster, splits: dict) -> np.ndarray:
    """``(n_cells,)`` int8 ``cells/split`` codes: each cell's split in ``splits`` (by its voxel), ``none``
    for every cell when ``splits`` is empty (a raster other than the training one)."""
    if not splits:
        return np.full(raster.voxel_index.shape[0], SPLIT_CATEGORIES.index(NO_SPLIT), np.int8)
    return cell_splits(raster, splits).codes


def store_attrs(
    *,
    task: str,
    table: ClassTable,
    model: str,
    checkpoint: str | Path,
    config_hash: str,
    best_epoch: int,
    raster: str | Path,
    splits: dict,
    dim: int,
    n_cells: int,
    cell_names_digest: str,
    val_metrics: dict,
    **extra,
) -> dict:
    """The store's attributes: the task and its class table, the model (name, checkpoint, config hash, best
    epoch, validation metrics of the checkpoint), the raster predicted, its splits (``{}``: another raster)
    and model dimension, the number of cells and the digest of their names (``names_digest``), plus
    ``extra`` (``metrics``: the test cells' scores; writer-specific run parameters)."""
    return {
        "task": task,
        "level": table.level,
        "model": model,
        "checkpoint": str(Path(checkpoint).resolve()),
        "config_hash": config_hash,
        "best_epoch": int(best_epoch),
        "raster": str(Path(raster).resolve()),
        "class_names": list(table.names),
        "colors": list(table.colors),
        "split_categories": list(SPLIT_CATEGORIES),
        "splits": splits,
        "dim": int(dim),
        "n_cells": int(n_cells),
        "cell_names_digest": cell_names_digest,
        "val_metrics": val_metrics,
        **extra,
    }


def write_attrs(root: zarr.Group, meta: dict) -> None:
    """Store ``meta`` (:func:`store_attrs`) as the store's ``abc_pipeline.predictions`` attributes (replacing them)."""
    root.attrs[ATTRS_KEY] = {ENTRY: meta}


# ----------------------------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class Predictions:
    """A predictions store opened lazily (see the module docstring): its attributes ``meta`` and arrays."""

    path: Path
    meta: dict
    group: zarr.Group

    @property
    def task(self) -> str:
        return self.meta["task"]

    @property
    def level(self) -> str:
        """The label level (obs column of cells.zarr) whose classes are predicted."""
        return self.meta["level"]

    @property
    def model(self) -> str:
        return self.meta["model"]

    @property
    def config_hash(self) -> str:
        return self.meta["config_hash"]

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.meta["class_names"])

    @property
    def colors(self) -> tuple[str, ...]:
        """Hex colours aligned with :attr:`class_names`."""
        return tuple(self.meta["colors"])

    @property
    def n_cells(self) -> int:
        return int(self.meta["n_cells"])

    @property
    def proba_image(self) -> zarr.Array:
        """``(n_classes, z, y, x)`` float32 class probabilities per voxel (0 in empty voxels)."""
        return self.group[PROBA]

    @property
    def label_image(self) -> zarr.Array:
        """``(z, y, x)`` uint16 predicted class + 1 per voxel, 0 = no cells."""
        return self.group[label_path(self.task)]

    @property
    def grid_shape(self) -> tuple[int, ...]:
        """``(z, y, x)`` shape of the predicted raster's grid."""
        return tuple(int(n) for n in self.proba_image.shape[1:])

    @property
    def cell_pred(self) -> zarr.Array:
        """``(n_cells,)`` int16 class index per cell (cells.zarr obs order), -1 = no prediction."""
        return self.group[CELL_PRED]

    @property
    def cell_proba(self) -> zarr.Array:
        """``(n_cells, n_classes)`` float32 class probabilities per cell, NaN rows = no prediction."""
        return self.group[CELL_PROBA]

    @property
    def cell_split(self) -> zarr.Array:
        """``(n_cells,)`` int8 split code per cell into ``meta['split_categories']``."""
        return self.group[CELL_SPLIT]

    def split_categorical(self) -> pd.Categorical:
        """Every cell's split (train / val / test / none) as a categorical (one int8 code per cell)."""
        return pd.Categorical.from_codes(np.asarray(self.cell_split[:]), categories=self.meta["split_categories"])

    def check_cells(self, cells: Path, n_cells: int, digest: str) -> None:
        """:class:`InputError` unless the store predicts the ``n_cells`` cells of ``cells`` (a cells.zarr
        whose cell names have the digest ``digest``), in their order."""
        if self.n_cells != n_cells or self.meta["cell_names_digest"] != digest:
            raise InputError(
                f"{self.path} predicts {self.n_cells} cells of another cells.zarr than {cells} "
                f"({n_cells} cells); predict with the raster made from {cells}"
            )

    def check_written_by(self, checkpoint: Path, ckpt: dict, atlas: dict, raster: Raster, digest: str) -> None:
        """:class:`InputError` naming every difference unless ``checkpoint`` (loaded: ``ckpt``, its atlas
        section ``atlas``) wrote this store on ``raster`` (whose cell names have the digest ``digest``)."""
        meta, diffs = self.meta, []
        if meta["task"] != atlas["task"]:
            diffs.append(f"task {meta['task']!r} (checkpoint: {atlas['task']!r})")
        if meta["model"] != ckpt["model_name"] or meta["config_hash"] != ckpt["config_hash"]:
            diffs.append(
                f"model {meta['model']!r} with config hash {meta['config_hash']} (checkpoint: "
                f"{ckpt['model_name']!r}, {ckpt['config_hash']})"
            )
        if list(meta["class_names"]) != list(atlas["classes"]["names"]):
            diffs.append(
                f"{len(meta['class_names'])} {meta['level']!r} classes (checkpoint: "
                f"{len(atlas['classes']['names'])} {atlas['classes']['level']!r})"
            )
        shape = list(self.grid_shape)
        if shape != [int(n) for n in raster.grid.shape] or meta["cell_names_digest"] != digest:
            diffs.append(
                f"raster {meta['raster']} (grid {shape}; --raster: {raster.path}, grid {list(raster.grid.shape)})"
            )
        if diffs:
            raise InputError(
                f"{self.path} was not predicted by {checkpoint} on {raster.path}: {'; '.join(diffs)}. Run "
                f"`abc-pipeline predict --checkpoint {checkpoint} --raster {raster.path}` and evaluate its output"
            )


def open_predictions(path: str | Path, checkpoint: str | Path | None = None) -> Predictions:
    """Open a store written by ``abc-pipeline predict`` (nothing large is read).

    Checked on open: the attributes (every field of :data:`FIELDS`), the chunk files against the writer's
    record, every array's presence and shape against the attributes and each other; :class:`InputError`
    names the array and the fix. ``checkpoint``: the checkpoint the store should come from, named in the
    errors' advice."""
    path = Path(path)
    hint = f"; give the predictions.zarr written with {checkpoint}" if checkpoint is not None else ""
    fix = f"Re-run `abc-pipeline predict --checkpoint {checkpoint}` to rebuild it" if checkpoint is not None else _FIX
    try:
        group = zarr.open_group(str(path), mode="r")
        meta = dict(group.attrs[ATTRS_KEY][ENTRY])
    except Exception as exc:
        raise InputError(f"{path} is not a predictions store of `abc-pipeline predict` ({exc}){hint}") from exc
    missing = [f for f in FIELDS if f not in meta]
    if missing:
        raise InputError(
            f"{path} is not a predictions store of `abc-pipeline predict` (its {ATTRS_KEY}.{ENTRY} attributes "
            f"lack {missing}){hint}"
        )
    verify_store(path, fix)
    store = Predictions(path, meta, group)
    n, k = store.n_cells, len(store.class_names)
    for key in (PROBA, label_path(store.task), CELL_PRED, CELL_PROBA, CELL_SPLIT):
        if not isinstance(group.get(key), zarr.Array):
            raise InputError(f"{path}: {key} is missing; the store is damaged. {fix}")
    image = group[PROBA].shape
    if len(image) != 4:
        raise InputError(f"{path}: {PROBA} has shape {image}, not (n_classes, z, y, x); the store is damaged. {fix}")
    for key, shape in (
        (PROBA, (k, *image[1:])),
        (label_path(store.task), image[1:]),
        (CELL_PRED, (n,)),
        (CELL_PROBA, (n, k)),
        (CELL_SPLIT, (n,)),
    ):
        check_shape(path, key, group[key].shape, shape, fix)
    return store


__all__ = [
    "CELL_PRED",
    "CELL_PROBA",
    "CELL_SPLIT",
    "ENTRY",
    "FIELDS",
    "PROBA",
    "SPLIT_CATEGORIES",
    "Predictions",
    "store_attrs",
    "create_cell_tables",
    "create_store",
    "create_volumes",
    "label_path",
    "open_predictions",
    "split_codes",
    "write_attrs",
    "write_volume_metadata",
]
