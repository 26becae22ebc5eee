"""Write predictions back to AnnData: ``cells.zarr`` + ``predictions.zarr`` files -> ``cells_annotated.h5ad``.

The h5ad holds everything of cells.zarr (X, obs, var, obsm, uns, ...; copied array by array in row chunks,
with the AnnData encoding attributes, so memory is bounded by the chunk size) plus, per prediction store
(``abc-pipeline predict``) of task ``<task>``. ``X`` (the log2 expression, dense float32 in cells.zarr) is
stored as a CSR matrix, as in the ABC release: about a quarter of its entries are non-zero, so the file and
``scanpy.read_h5ad``'s memory are about half those of a dense X (docs/benchmarks.md, "X storage").

- ``obs['pred_<task>']``: categorical over the task's classes (NA for cells without a voxel), colours in
  ``uns['pred_<task>_colors']`` (aligned with the categories, from the raster's label table);
- ``obsm['pred_<task>_proba']``: DataFrame indexed by ``obs_names``, one float32 column per class (rows sum
  to 1; NaN for cells without a voxel);
- ``uns['abc_pipeline']['predict']['pred_<task>']``: model, checkpoint, level, test-split metrics, run
  parameters (the ``assemble`` entry is kept).

When several stores predict one task, the first is ``pred_<task>`` and the others
``pred_<task>__<model>`` (``obsm['pred_<task>__<model>_proba']``). ``obs['split']`` (train / val / test /
none, by each cell's section) comes from the first store. The file is written under a temporary name and
renamed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import scipy.sparse
import zarr
from anndata.io import sparse_dataset, write_elem

from abc_pipeline import keys
from abc_pipeline.cells import CellSource
from abc_pipeline.errors import InputError
from abc_pipeline.fileio import MARKER_KEY, check_output, staged_output
from abc_pipeline.learn.data import names_digest
from abc_pipeline.learn.predictions import Predictions, open_predictions

log = logging.getLogger(__name__)

_COPY_BYTES = 64 << 20  # bytes per copied block of rows


def _h5_attr(value: Any) -> Any:
    """A JSON attribute of a Zarr node as an h5py attribute (lists of str as variable-length strings)."""
    if isinstance(value, list):
        if not value:
            return np.array([], dtype=np.float64)
        if all(isinstance(v, str) for v in value):
            return np.array(value, dtype=h5py.string_dtype())
        return np.asarray(value)
    return value


def _copy(src: zarr.Group | zarr.Array, dst: h5py.Group, name: str) -> None:
    """Copy a Zarr node (recursively) into ``dst[name]``: arrays in blocks of rows, attributes converted."""
    if isinstance(src, zarr.Group):
        node = dst.create_group(name)
        for key in src:
            _copy(src[key], node, key)
    else:
        strings = src.dtype.kind in "OUT" or str(src.dtype).startswith("StringDType")
        dtype = h5py.string_dtype() if strings else src.dtype
        if src.ndim == 0:
            value = src[()]
            node = dst.create_dataset(name, data=str(value) if strings else value, dtype=dtype)
        else:
            row_bytes = max(1, math.prod(src.shape[1:]) * (64 if strings else src.dtype.itemsize))
            step = max(src.chunks[0], (_COPY_BYTES // row_bytes) // src.chunks[0] * src.chunks[0])
            chunks = (min(src.shape[0], step, 1 << 16) or 1, *src.shape[1:]) if src.shape[0] else None
            node = dst.create_dataset(
                name, shape=src.shape, dtype=dtype, chunks=chunks, compression="lzf" if chunks and not strings else None
            )
            for s in range(0, src.shape[0], step):
                block = np.asarray(src[s : s + step])
                node[s : s + len(block)] = block.astype(object) if strings else block
    for key, value in src.attrs.items():
        node.attrs[key] = _h5_attr(value)


def _copy_csr(src: zarr.Array, dst: h5py.Group, name: str) -> None:
    """Copy a dense 2D Zarr array (n_obs, n_vars) into ``dst[name]`` as an AnnData CSR matrix, block of rows
    by block of rows (anndata's appendable sparse dataset), so memory is bounded by one block."""
    rows = max(1, _COPY_BYTES // max(1, src.shape[1] * src.dtype.itemsize))
    step = rows // src.chunks[0] * src.chunks[0] or rows  # whole Zarr chunks where a block holds one
    for s in range(0, max(src.shape[0], 1), step):
        block = scipy.sparse.csr_matrix(np.asarray(src[s : s + step]))
        if s == 0:
            write_elem(dst, name, block, dataset_kwargs={"compression": "lzf", "indptr_dtype": np.int64})
        else:
            sparse_dataset(dst[name]).append(block)


def _plain(value: Any) -> Any:
    """Metrics / parameters as AnnData-writable values (dicts, numbers, strings, arrays; None -> 'None')."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        if all(isinstance(v, str) for v in value):
            return np.array(value, dtype=object)
        if all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in value):
            return np.asarray(value, dtype=np.float64)
        return {str(i): _plain(v) for i, v in enumerate(value)}
    if value is None:
        return "None"
    return value


def annotate_cells(
    cells: str | Path, predictions: Sequence[str | Path], out: str | Path, *, overwrite: bool = False
) -> Path:
    """Write ``out`` (h5ad): ``cells`` plus the predictions of every store in ``predictions``.

    ``overwrite``: replace an existing abc-pipeline artifact of another kind at ``out``
    (:func:`abc_pipeline.fileio.check_output`)."""
    if not predictions:
        raise InputError("give at least one predictions.zarr (abc-pipeline predict) to annotate")
    check_output(Path(out), "annotated", inputs=[cells, *predictions], overwrite=overwrite)  # fail early
    src = CellSource(cells)
    n = src.n_cells
    names = src.obs_names()
    digest = names_digest(names)
    columns: list[tuple[str, Predictions]] = []
    for path in predictions:
        store = open_predictions(path)
        store.check_cells(src.path, n, digest)
        base = keys.prediction(store.task)
        col = base if all(c[0] != base for c in columns) else keys.prediction(store.task, store.model)
        if any(c[0] == col for c in columns):
            raise InputError(f"{store.path}: a second {store.model} prediction of {store.task}; give each model once")
        columns.append((col, store))
    obs_cols = set(src.obs_columns())
    clash = [c for c, *_ in columns if c in obs_cols] + ([keys.SPLIT] if keys.SPLIT in obs_cols else [])
    if clash:
        raise InputError(
            f"{src.path}: obs already has {clash}; annotate the cells.zarr of `assemble`, not an annotated one"
        )
    out = Path(out)
    with staged_output(out, "annotated", inputs=[src.path, *(s.path for _, s in columns)], overwrite=overwrite) as tmp:
        with h5py.File(tmp, "w") as f:
            for key in src.group:
                if key == "X":
                    _copy_csr(src.group[key], f, key)
                else:
                    _copy(src.group[key], f, key)
            for key, value in src.group.attrs.items():
                f.attrs[key] = _h5_attr(value)
            f.attrs[MARKER_KEY] = "annotated"
            index_key = f["obs"].attrs["_index"]
            order = list(src.obs_columns())
            for col, store in columns:
                _write_prediction(f, col, store, n, index_key)
                order.append(col)
            write_elem(f["obs"], keys.SPLIT, columns[0][1].split_categorical())
            f["obs"].attrs["column-order"] = _h5_attr(order + [keys.SPLIT])
            uns = f["uns"] if "uns" in f else f.create_group("uns")
            ours = uns.get(keys.UNS)
            entries = {
                col: _plain(
                    {k: v for k, v in store.meta.items() if k not in ("split_categories",)}
                    | {"predictions": str(store.path.resolve())}
                )
                for col, store in columns
            }
            if ours is None:
                write_elem(uns, keys.UNS, {"predict": entries})
            else:
                write_elem(ours, "predict", entries)
    log.info("wrote %s (%d cells; %s)", out, n, ", ".join(c for c, *_ in columns))
    return out


def _write_prediction(f: h5py.File, col: str, store: Predictions, n: int, index_key: str) -> None:
    """``obs[col]`` categorical, ``uns[col_colors]`` and ``obsm[col_proba]`` DataFrame of ``store``'s
    per-cell predictions, chunk by chunk."""
    classes = list(store.class_names)
    pred = np.asarray(store.cell_pred[:]).astype(np.int16)
    write_elem(f["obs"], col, pd.Categorical.from_codes(pred, categories=classes))
    write_elem(f["uns"], keys.colors(col), np.array(store.colors, dtype=object))
    obsm = f["obsm"] if "obsm" in f else f.create_group("obsm")
    frame = obsm.create_group(keys.probabilities(col))
    frame.attrs.update(
        {
            "encoding-type": "dataframe",
            "encoding-version": "0.2.0",
            "_index": "_index",
            "column-order": _h5_attr(classes),
        }
    )
    _copy_index(f["obs"][index_key], frame)
    proba = store.cell_proba
    step = proba.chunks[0]
    chunks = (min(max(n, 1), 1 << 16),)
    dsets = [frame.create_dataset(c, shape=(n,), dtype=np.float32, chunks=chunks, compression="lzf") for c in classes]
    for d in dsets:
        d.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
    for s in range(0, n, step):
        block = np.asarray(proba[s : s + step])
        for j, d in enumerate(dsets):
            d[s : s + len(block)] = block[:, j]


def _copy_index(index: h5py.Dataset, frame: h5py.Group) -> None:
    """The obs index as the DataFrame's ``_index`` (string array), in row blocks."""
    n = index.shape[0]
    d = frame.create_dataset("_index", shape=(n,), dtype=h5py.string_dtype(), chunks=(min(max(n, 1), 1 << 16),))
    d.attrs.update({"encoding-type": "string-array", "encoding-version": "0.2.0"})
    for s in range(0, n, 1 << 18):
        d[s : s + (1 << 18)] = index[s : s + (1 << 18)]
