"""One per-cell score for every model of an atlas task: its stored per-cell predictions against each cell's
own label.

Every model (networks and the scikit-learn baselines, cell types and regions) writes the same per-cell tables
into its ``predictions.zarr`` (``cells/proba``, ``cells/split``; :mod:`abc_pipeline.learn.predictions`).
:func:`score_cells` reads the cells of one split from there and their true labels at the store's level from
cells.zarr, and scores them with :func:`abc_pipeline.metrics.classification_metrics` (accuracy, balanced
accuracy, macro-F1, per-class F1, AUC). Nothing about the model enters: two models with the same per-cell
probabilities get the same numbers. Region models keep their voxel scores (Dice, IoU) besides.

The same function serves every reader: :func:`stored_metrics` is what ``predict`` stores in a store's
attributes (``metrics.test_cells``), ``evaluate`` records :func:`score_cells` as ``test_cells`` and reads the
test cells of its figures and windows through :func:`scored_cells`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import zarr

from abc_pipeline.cells import CellSource
from abc_pipeline.errors import InputError
from abc_pipeline.learn.data import SPLITS
from abc_pipeline.learn.predictions import CELL_PROBA, CELL_SPLIT, SPLIT_CATEGORIES, open_predictions
from abc_pipeline.metrics import classification_metrics

_CELL_CHUNK = 1 << 16  # cells per read

#: the per-cell scores of the report and the comparison tables, in this order
CELL_SCORES = ("accuracy", "balanced_accuracy", "macro_f1")
#: test cells (at most, evenly strided) scored in the ``metrics`` attribute of a predictions store
STORED_CELLS = 200_000


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


def scored_cells(
    split_codes: zarr.Array,
    cell_proba: zarr.Array,
    cells: CellSource,
    level: str,
    class_names: Sequence[str],
    *,
    split: str = "test",
    max_cells: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The cells of ``split`` (at most ``max_cells``, evenly strided) that a predictions store can be scored on
    (its ``cells/split`` codes ``split_codes`` and ``cells/proba`` ``cell_proba``): those with a prediction
    (finite probabilities) and a class at ``level`` in ``cells``. Returns
    their rows ``(N,)`` in cells.zarr, class indices ``(N,)`` into ``class_names`` and stored probabilities
    ``(N, K)`` float32, read in chunks of cells; ``N`` may be 0."""
    rows = split_rows(split_codes, split, max_cells)
    y = cell_targets(cells, level, class_names, rows)
    proba = np.concatenate(
        [np.zeros((0, len(class_names)), np.float32)]
        + [
            np.asarray(cell_proba.get_orthogonal_selection((rows[s : s + _CELL_CHUNK], slice(None))))
            for s in range(0, len(rows), _CELL_CHUNK)
        ]
    )
    keep = (y >= 0) & np.isfinite(proba).all(axis=1)
    return rows[keep], y[keep], proba[keep]


def cell_scores(y: np.ndarray, proba: np.ndarray, class_names: Sequence[str], split: str = "test") -> dict:
    """The per-cell scores of ``N`` cells of ``split``: class indices ``y`` ``(N,)`` and probabilities ``proba``
    ``(N, K)`` (:func:`scored_cells`), scored by :func:`abc_pipeline.metrics.classification_metrics`, plus
    ``split`` and ``n_cells``."""
    return {"split": split, "n_cells": len(y), **classification_metrics(y, proba, list(class_names))}


def score_cells(
    predictions: str | Path, cells: str | Path | CellSource, *, split: str = "test", max_cells: int | None = None
) -> dict:
    """Per-cell scores of a ``predictions.zarr`` on the cells of ``split`` (at most ``max_cells``, evenly
    strided) against their own labels at the store's level in ``cells``.

    Returns :func:`abc_pipeline.metrics.classification_metrics` plus ``n_cells`` (cells scored: with a
    prediction and a class) and ``split`` (:func:`cell_scores`). :class:`InputError` when no cell of the split
    can be scored.
    """
    store = open_predictions(predictions)
    src = cells if isinstance(cells, CellSource) else CellSource(cells)
    _, y, proba = scored_cells(
        store.cell_split, store.cell_proba, src, store.level, store.class_names, split=split, max_cells=max_cells
    )
    if not len(y):
        raise InputError(
            f"{store.path}: no {split}-split cell has a prediction and a {store.level!r} class; nothing to "
            f"score (choose other split fractions or seed when training)"
        )
    return cell_scores(y, proba, store.class_names, split)


def stored_metrics(
    predictions: str | Path,
    cells: str | Path | CellSource,
    level: str,
    class_names: Sequence[str],
    max_cells: int | None = STORED_CELLS,
) -> dict:
    """The ``metrics`` attribute of a ``predictions.zarr`` being written (before its attributes):
    ``cells_per_split`` (cells per split code; ``"none"``: not in a split of the training run) and, when some
    test cell has a prediction and a class at ``level``, ``test_cells``: the :func:`score_cells` values of at
    most ``max_cells`` test cells."""
    store = zarr.open_group(str(predictions), mode="r")  # its attributes are not written yet
    split = np.asarray(store[CELL_SPLIT][:])
    counts = {name: int((split == i).sum()) for i, name in enumerate(SPLIT_CATEGORIES)}
    if not counts["test"]:  # e.g. a transferred dataset: no split, and perhaps no labels
        return {"cells_per_split": counts}
    src = cells if isinstance(cells, CellSource) else CellSource(cells)
    _, y, proba = scored_cells(store[CELL_SPLIT], store[CELL_PROBA], src, level, class_names, max_cells=max_cells)
    if not len(y):
        return {"cells_per_split": counts}
    return {"cells_per_split": counts, "test_cells": cell_scores(y, proba, class_names)}


__all__ = [
    "CELL_SCORES",
    "STORED_CELLS",
    "cell_scores",
    "cell_targets",
    "score_cells",
    "scored_cells",
    "split_rows",
    "stored_metrics",
]
