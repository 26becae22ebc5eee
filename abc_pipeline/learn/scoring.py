"""One per-cell score for every model of an atlas task: its stored per-cell predictions against each cell's
own label.

Every model (networks and the scikit-learn baselines, cell types and regions) writes the same per-cell tables
into its ``predictions.zarr`` (``cells/proba``, ``cells/split``; ``abc-pipeline predict``). :func:`score_cells`
reads the cells of one split from there and their true labels at the store's level from cells.zarr, and
scores them with :func:`abc_pipeline.evaluate.classification_metrics` (accuracy, balanced accuracy,
macro-F1, per-class F1, AUC). Nothing about the model enters: two models with the same per-cell
probabilities get the same numbers. Region models keep their voxel scores (Dice, IoU) besides.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr

from abc_pipeline.errors import InputError
from abc_pipeline.metrics import classification_metrics
from abc_pipeline.learn.data import SPLITS
from abc_pipeline.raster.ome import ATTRS_KEY
from abc_pipeline.raster.source import CellSource

_CELL_CHUNK = 1 << 16  # cells per read

#: the per-cell scores of the report and the comparison tables, in this order
CELL_SCORES = ("accuracy", "balanced_accuracy", "macro_f1")


def cell_targets(
    cells: CellSource, level: str, class_names: tuple[str, ...] | list[str], rows: np.ndarray
) -> np.ndarray:
    """Class index ``(len(rows),)`` int64 of the cells ``rows`` at ``level`` (index into ``class_names``;
    -1: missing or not a class), read in chunks."""
    cat = cells.categorical(level)
    pos = {n: i for i, n in enumerate(class_names)}
    lut = np.array([pos.get(c, -1) for c in cat.categories] + [-1], dtype=np.int64)  # code -1 -> last entry
    out = np.empty(len(rows), dtype=np.int64)
    for s in range(0, len(rows), _CELL_CHUNK):
        codes = np.asarray(cat.codes[rows[s : s + _CELL_CHUNK]].compute()).astype(np.int64)
        out[s : s + len(codes)] = lut[codes]
    return out


def split_rows(split: zarr.Array, name: str = "test", max_cells: int | None = None) -> np.ndarray:
    """Rows of the cells in split ``name`` (``cells/split`` codes into ``SPLITS + ("none",)``), at most
    ``max_cells`` of them, evenly strided."""
    if name not in SPLITS:
        raise InputError(f"split must be one of {SPLITS}, got {name!r}")
    code = SPLITS.index(name)
    rows = np.concatenate(
        [np.zeros(0, np.int64)]
        + [
            np.flatnonzero(np.asarray(split[s : s + _CELL_CHUNK]) == code) + s
            for s in range(0, split.shape[0], _CELL_CHUNK)
        ]
    )
    if max_cells is not None and len(rows) > max_cells:
        rows = rows[:: -(-len(rows) // max_cells)]
    return rows


def score_cells(
    predictions: str | Path, cells: str | Path | CellSource, *, split: str = "test", max_cells: int | None = None
) -> dict:
    """Per-cell scores of a ``predictions.zarr`` on the cells of ``split`` (at most ``max_cells``, evenly
    strided) against their own labels at the store's level in ``cells``.

    Returns :func:`abc_pipeline.evaluate.classification_metrics` plus ``n_cells`` (cells scored: with a
    prediction and a class) and ``split``. :class:`InputError` when no cell of the split can be scored.
    """
    path = Path(predictions)
    try:
        store = zarr.open_group(str(path), mode="r")
        meta = store.attrs[ATTRS_KEY]["predictions"]
    except Exception as exc:
        raise InputError(f"{path} is not a predictions store of `abc-pipeline predict` ({exc})") from exc
    src = cells if isinstance(cells, CellSource) else CellSource(cells)
    names = list(meta["class_names"])
    rows = split_rows(store["cells/split"], split, max_cells)
    y = cell_targets(src, meta["level"], names, rows)
    proba = np.concatenate(
        [np.zeros((0, len(names)), np.float32)]
        + [
            np.asarray(store["cells/proba"].get_orthogonal_selection((rows[s : s + _CELL_CHUNK], slice(None))))
            for s in range(0, len(rows), _CELL_CHUNK)
        ]
    )
    keep = (y >= 0) & np.isfinite(proba).all(axis=1)
    if not keep.any():
        raise InputError(
            f"{path}: no {split}-split cell has a prediction and a {meta['level']!r} class; nothing to "
            f"score (choose other split fractions or seed when training)"
        )
    return {"split": split, "n_cells": int(keep.sum()), **classification_metrics(y[keep], proba[keep], names)}


__all__ = ["CELL_SCORES", "cell_targets", "score_cells", "split_rows"]
