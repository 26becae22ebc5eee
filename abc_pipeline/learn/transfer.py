"""Annotate a user's dataset with trained atlas models (``abc-pipeline transfer``).

For each checkpoint (``abc-pipeline train``), the user's cells are rasterized on the model's grid spacing with the
model's channel definition (``config['atlas']['channel_definition']``: genes matched by id or symbol, the PCA
loadings and means of training; :func:`abc_pipeline.raster.channels.plan_from_definition`), in the data's own
orientation and position, and the model predicts densely over that raster (:func:`abc_pipeline.learn.predict.
predict_raster`, as one block). The voxel lattice passes through the origin of the user's coordinates
(``origin = (floor(min / voxel) - margin) * voxel`` per axis), so data whose coordinates differ by a grid symmetry
and a whole number of voxels are binned identically.

Input: an AnnData (``.h5ad`` / ``.zarr``) or a MERSCOPE folder, imported first with the checks of
:mod:`abc_pipeline.atlas.import_user`, or an imported ``cells.zarr``. Output: an ``.h5ad`` copy of the user's
AnnData (an h5ad input is copied file to file; a Zarr store, a MERSCOPE folder or a cells.zarr is converted)
plus, per checkpoint of task ``<task>`` (a second model of the same task: ``pred_<task>__<model>``):

- ``obs['pred_<task>']`` (categorical, colours in ``uns['pred_<task>_colors']``), ``obs['pred_<task>_confidence']``
  (the largest class probability, NaN for cells without a voxel) and ``obsm['pred_<task>_proba']``
  (DataFrame indexed by ``obs_names``, one column per class);
- ``uns['abc_pipeline']['transfer']['pred_<task>']``: model, checkpoint, channel definition digest, genes
  matched and missing (``missing_fraction``), grid, counts.

Scratch data (the imported cells, rasters and predictions) lives next to the output and is removed at the end;
the output appears only when complete.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import dask.array as da
import h5py
import numpy as np
import zarr
from anndata.io import write_elem

from abc_pipeline import keys
from abc_pipeline.atlas.import_user import import_user_data
from abc_pipeline.cells import CellSource
from abc_pipeline.errors import InputError
from abc_pipeline.fileio import staged_output
from abc_pipeline.learn.annotate import _copy, _h5_attr, _plain, _write_prediction
from abc_pipeline.learn.checkpoint import load_checkpoint
from abc_pipeline.learn.choices import DEFAULT_DEVICE, DEFAULT_TRANSFER_KIND, TRANSFER_KINDS
from abc_pipeline.learn.predict import atlas_config, predict_raster
from abc_pipeline.learn.predictions import open_predictions
from abc_pipeline.raster.channels import plan_from_definition
from abc_pipeline.raster.grid import COORDINATE_KEYS
from abc_pipeline.raster.ome import ATTRS_KEY
from abc_pipeline.raster.rasterize import rasterize

log = logging.getLogger(__name__)

MARGIN = 1  # empty voxels around the data (per side)
_CHUNK = 1 << 16


def lattice_bounds(
    source: CellSource, key: str, voxel_size: Sequence[float], margin: int = MARGIN
) -> list[tuple[float, float]]:
    """``(lo, hi)`` per grid axis (z, y, x order; mm) around ``obsm[key]``, on the lattice of multiples of
    ``voxel_size`` (per grid axis) plus ``margin`` voxels per side."""
    coords = source.coordinates(key)
    lo, hi = da.compute(da.nanmin(coords, axis=0), da.nanmax(coords, axis=0))
    lo, hi = np.asarray(lo)[::-1], np.asarray(hi)[::-1]  # (x, y[, z]) -> (z,) y, x
    if not np.isfinite(np.concatenate([lo, hi])).all():
        raise InputError(f"{source.path}: obsm['{key}'] has no finite coordinates")
    return [
        ((math.floor(a / s) - margin) * s, (math.floor(b / s) + 1 + margin) * s) for a, b, s in zip(lo, hi, voxel_size)
    ]


def _model_grid(atlas: dict, checkpoint: Path, source: CellSource) -> tuple[str, list[float], str]:
    """Raster space, voxel size (as rasterize takes it) and coordinate key for the model of ``atlas``."""
    definition = atlas["channel_definition"]
    space = "section" if definition["space"] == "section" or int(atlas["dim"]) == 2 else "reconstructed"
    voxel = [float(v) for v in definition["voxel_size"]]
    key = COORDINATE_KEYS[space]
    if key not in source.group["obsm"]:
        raise InputError(
            f"{checkpoint} is a 3D model ({definition['space']} grid); {source.path} has no 3D "
            f"coordinates (obsm['{key}']): import data with x, y, z coordinates, or use a 2D model"
        )
    return space, voxel[1:] if space == "section" else voxel, key


def transfer(
    checkpoints: Sequence[str | Path],
    data: str | Path,
    out: str | Path,
    *,
    kind: str = DEFAULT_TRANSFER_KIND,
    fill_missing_genes: bool = False,
    device: str = DEFAULT_DEVICE,
    batch_size: int | None = None,
    chunk_cells: int = 100_000,
    progress: bool = True,
    **import_options,
) -> Path:
    """Annotate ``data`` with the models of ``checkpoints``; writes the ``.h5ad`` ``out`` and returns it.

    Args:
        checkpoints: ``checkpoint.pt`` files of ``abc-pipeline train`` (any tasks; each adds its columns).
        data: the user's ``.h5ad`` / AnnData ``.zarr`` (``kind="anndata"``), MERSCOPE folder (``"merscope"``)
            or an imported ``cells.zarr`` (``"cells"``).
        fill_missing_genes: read genes the data lacks as 0 (with a warning; the fraction is recorded) instead
            of refusing them.
        import_options: :func:`abc_pipeline.atlas.import_user.import_user_data` keywords (``coordinates``,
            ``unit``, ``section``, ``section_name``, ``gene_symbols``, ``expression``).
    """
    t0 = time.perf_counter()
    data, out = Path(data), Path(out)
    if kind not in TRANSFER_KINDS:
        raise InputError(f"transfer kind must be one of {', '.join(TRANSFER_KINDS)}, got {kind!r}")
    if not checkpoints:
        raise InputError("give at least one checkpoint.pt (abc-pipeline train) to transfer")
    runs = []
    for path in checkpoints:
        ckpt = load_checkpoint(path)
        atlas = atlas_config(ckpt, path)
        if "channel_definition" not in atlas:
            raise InputError(
                f"{path} does not record its channel definition (trained with an older version); "
                f"retrain it to transfer it to other data"
            )
        runs.append((Path(path), ckpt, atlas))
    with staged_output(out) as tmp:
        scratch = tmp.with_name(tmp.name + "-scratch")
        scratch.mkdir()
        try:
            cells = (
                data
                if kind == "cells"
                else import_user_data(
                    kind, data, scratch / "cells.zarr", chunk_cells=chunk_cells, progress=progress, **import_options
                )
            )
            source = CellSource(cells)
            predictions = [
                _predict(i, path, atlas, source, scratch, fill_missing_genes, device, batch_size, progress)
                for i, (path, _, atlas) in enumerate(runs)
            ]
            _write_output(tmp, data, kind, source, predictions)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    log.info(
        "transferred %d model(s) to %s (%d cells) in %.1f s -> %s",
        len(runs),
        data,
        source.n_cells,
        time.perf_counter() - t0,
        out,
    )
    return out


def _predict(
    i: int,
    path: Path,
    atlas: dict,
    source: CellSource,
    scratch: Path,
    fill_missing: bool,
    device: str,
    batch_size: int | None,
    progress: bool,
) -> tuple[Path, dict]:
    """Rasterize ``source`` with the model's channels on its grid spacing and predict it; returns the
    predictions store and the provenance of the run."""
    definition = atlas["channel_definition"]
    plan, lacking = plan_from_definition(definition, source, fill_missing)
    if lacking:
        log.warning(
            "%s: %d of the %d genes of %s are missing from the data and read as 0: %s",
            source.path,
            len(lacking),
            len(definition["genes"]),
            path,
            lacking,
        )
    space, voxel, key = _model_grid(atlas, path, source)
    grid_voxel = definition["voxel_size"][1:] if space == "section" else definition["voxel_size"]
    bounds = lattice_bounds(source, key, grid_voxel)
    raster = rasterize(
        source.path,
        scratch / f"{i}.ome.zarr",
        space=space,
        voxel_size=voxel,
        bounds=bounds,
        channels=plan,
        labels=[],
        levels=2,
        progress=progress,
    )
    store = predict_raster(
        path,
        raster,
        scratch / f"{i}.predictions.zarr",
        device=device,
        batch_size=batch_size,
        progress=progress,
        cells=source.path,
        plan=plan,
    )
    grid = zarr.open_group(str(raster), mode="r").attrs[ATTRS_KEY]["raster"]
    provenance = {
        "checkpoint": str(path.resolve()),
        "channel_digest": definition["digest"],
        "channel_mode": definition["mode"],
        "genes_used": len(definition["genes"]) - len(lacking),
        "genes_missing": lacking,
        "missing_fraction": len(lacking) / len(definition["genes"]),
        "grid": {k: grid["grid"][k] for k in ("space", "origin", "voxel_size", "shape")},
        "cells": grid["counts"],
    }
    return store, provenance


def _write_output(tmp: Path, data: Path, kind: str, source: CellSource, predictions: list[tuple[Path, dict]]) -> None:
    """The user's AnnData as ``tmp`` (.h5ad) plus the prediction columns of every store."""
    if kind == "anndata" and data.is_file():
        shutil.copyfile(data, tmp)
    else:  # a Zarr AnnData (the user's store, or the imported cells of a MERSCOPE folder / cells.zarr)
        group = zarr.open_group(str(data if kind == "anndata" else source.path), mode="r")
        with h5py.File(tmp, "w") as f:
            for key in group:
                _copy(group[key], f, key)
            for key, value in group.attrs.items():
                f.attrs[key] = _h5_attr(value)
    n = source.n_cells
    with h5py.File(tmp, "r+") as f:
        obs = f["obs"]
        index_key = obs.attrs["_index"]
        if obs[index_key].shape[0] != n:
            raise InputError(
                f"{data} has {obs[index_key].shape[0]} cells but the imported data {n}; the file changed "
                f"while transferring"
            )
        order = [str(c) for c in obs.attrs.get("column-order", [])]
        if "uns" not in f:
            f.create_group("uns").attrs.update({"encoding-type": "dict", "encoding-version": "0.1.0"})
        uns = f["uns"]
        entries: dict[str, dict] = {}
        for path, provenance in predictions:
            store = open_predictions(path)
            col = keys.prediction(store.task)
            col = col if col not in entries else keys.prediction(store.task, store.model)
            if col in obs or col in entries:
                raise InputError(
                    f"{data}: obs already has {col!r}; transfer onto the original data, or give each model once"
                )
            _write_prediction(f, col, store, n, index_key)
            write_elem(obs, keys.confidence(col), _confidence(store.cell_proba))
            order += [col, keys.confidence(col)]
            entries[col] = _plain(
                {
                    "task": store.task,
                    "level": store.level,
                    "model": store.model,
                    "config_hash": store.config_hash,
                    "classes": list(store.class_names),
                    **provenance,
                }
            )
        obs.attrs["column-order"] = _h5_attr(order)
        ours = uns.get(keys.UNS)
        if ours is None:
            write_elem(uns, keys.UNS, {"transfer": entries})
        else:
            if "transfer" in ours:
                del ours["transfer"]
            write_elem(ours, "transfer", entries)


def _confidence(proba: zarr.Array) -> np.ndarray:
    """(n,) float32: the largest class probability of each cell (NaN without a voxel), chunk by chunk."""
    n = proba.shape[0]
    out = np.full(n, np.nan, dtype=np.float32)
    for s in range(0, n, _CHUNK):
        block = np.asarray(proba[s : s + _CHUNK])
        ok = np.isfinite(block).all(axis=1)
        out[s : s + len(block)][ok] = block[ok].max(axis=1)
    return out
