"""Scikit-learn baselines for the atlas tasks, trained, predicted and evaluated like the networks.

Two models, the ten lines of scikit-learn a scientist runs before trusting a deep model:

- ``logreg-expression``: :class:`sklearn.linear_model.LogisticRegression` on each cell's own channel values
  (the raster's channel definition applied per cell: its genes, or its PCA loadings), standardised with the
  training cells' mean and standard deviation;
- ``logreg-neighborhood``: the same on the cell's own values concatenated with the mean values of its
  ``neighbors`` (default 16) nearest other cells of the same section (``obs['brain_section_label']``), in
  section coordinates (``obsm['spatial']``; :class:`scipy.spatial.cKDTree` per section). Distances do not
  change under rotation, so the model is rotation-invariant by construction.

Both classify the cell's own label at the task's level (``celltype``: e.g. ``class``; ``region``: e.g.
``parcellation_division``), with the networks' section split (:func:`abc_pipeline.learn.data.raster_splits`
on the task's raster; a cell's split is its voxel's). Training uses the training cells with a class, at most
``max_train_cells`` of them (a seeded class-stratified subsample); ``C`` is fixed.

A run directory holds the files of a network's run: ``checkpoint.pt`` (``torch.save`` of tensors and plain
values only: coefficients, intercepts, class indices, the scaler, the feature definition; it loads with
``weights_only=True``, so reading it never executes code), ``history.tsv`` (one row: the fit) and
``metrics.json`` (validation and test per-cell scores). ``abc-pipeline predict`` writes the same
``predictions.zarr`` as for a network (:mod:`abc_pipeline.learn.predictions`): per-cell classes and
probabilities (every cell with a section; ``cells/split`` as for the networks) plus voxel volumes: ``0/``
holds per voxel the fraction of its cells predicted as each class, ``labels/pred_<task>`` the majority
class (ties: the first class), so voxel Dice / IoU apply to region baselines too.

Memory: X is streamed in chunks of rows into a disk-backed array of channel values (cells x channels x 4
bytes in a temporary directory); the coordinates, section codes, labels and splits of all cells are kept
(about 30 bytes per cell); features are computed and predicted in chunks of 65,536 cells.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import zarr
from scipy.spatial import cKDTree

from abc_pipeline import keys
from abc_pipeline.cells import CellSource, close_matches
from abc_pipeline.errors import InputError
from abc_pipeline.fileio import atomic_write_text, claim_directory, staged_output
from abc_pipeline.learn.checkpoint import (
    config_hash,
    load_checkpoint,
    publish_run,
)
from abc_pipeline.learn.choices import (
    BASELINES,
    DEFAULT_C,
    DEFAULT_MAX_TRAIN_CELLS,
    DEFAULT_NEIGHBORS,
    check_neighbors,
)
from abc_pipeline.learn.data import (
    DEFAULT_FRACTIONS,
    DEFAULT_SPLIT_BLOCKS,
    SPLITS,
    ClassTable,
    cell_splits,
    class_table,
    default_dim,
    names_digest,
    raster_splits,
)
from abc_pipeline.learn.predict import atlas_config, check_channels
from abc_pipeline.learn.predictions import (
    create_cell_tables,
    create_store,
    create_volumes,
    open_predictions,
    split_codes,
    store_attrs,
    write_attrs,
    write_volume_metadata,
)
from abc_pipeline.learn.scoring import cell_targets, score_cells, stored_metrics
from abc_pipeline.learn.tasks import by_name
from abc_pipeline.metrics import classification_metrics
from abc_pipeline.raster.channels import ChannelPlan, raster_channel_plan
from abc_pipeline.raster.ome import Raster, open_raster

log = logging.getLogger(__name__)

DEFAULT_MAX_ITER = 1000
SECTION_KEY = keys.SECTION
SECTION_COORDINATES = keys.SPATIAL
_CELL_CHUNK = 1 << 16  # cells per feature / prediction chunk


# ----------------------------------------------------------------------------------------------- inputs
@dataclass
class CellInputs:
    """Per-cell inputs of a cells.zarr: ``values`` ``(n, C)`` float32 channel values (disk-backed),
    ``xy`` ``(n, 2)`` float64 section coordinates (mm, NaN = none), ``section`` ``(n,)`` int32 section
    codes (-1 = none), ``sections`` the section names."""

    values: np.ndarray
    xy: np.ndarray
    section: np.ndarray
    sections: tuple[str, ...]

    @classmethod
    def read(cls, source: CellSource, plan: ChannelPlan, scratch: Path) -> CellInputs:
        """Stream X in chunks of rows through ``plan`` into ``scratch/values.f32``; read coordinates and
        section codes."""
        n, width = source.n_cells, len(plan.names)
        values = np.lib.format.open_memmap(Path(scratch) / "values.npy", mode="w+", dtype=np.float32, shape=(n, width))
        step = max(1, _CELL_CHUNK // source.row_chunk) * source.row_chunk
        for s in range(0, n, step):
            values[s : s + step] = plan.apply(source.read_X(s, min(n, s + step)))
        values.flush()
        xy = np.asarray(source.coordinates(SECTION_COORDINATES)[:, :2].compute(), dtype=np.float64)
        cat = source.categorical(SECTION_KEY)
        return cls(values, xy, np.asarray(cat.codes.compute()).astype(np.int32), cat.categories)


class SectionNeighbours:
    """The ``k`` nearest other cells of the same section (one :class:`scipy.spatial.cKDTree` per section,
    built when first needed) of cells with coordinates ``xy`` ``(n, 2)`` and section codes ``section``
    ``(n,)`` (-1 = none).

    :class:`InputError` when a section holds ``k`` cells or fewer (naming ``key``, the option that sets k).
    """

    def __init__(
        self, xy: np.ndarray, section: np.ndarray, k: int, sections: Sequence[str] = (), key: str = "--neighbors"
    ) -> None:
        self.xy, self.section, self.k = xy, section, check_neighbors(k, key)
        valid = (section >= 0) & np.isfinite(xy).all(axis=1)
        self.section = np.where(valid, section, -1)
        counts = np.bincount(self.section[valid], minlength=len(sections))
        small = np.flatnonzero((counts > 0) & (counts <= k))
        if small.size:
            s = int(small[np.argmin(counts[small])])
            name = sections[s] if s < len(sections) else str(s)
            raise InputError(
                f"{key} is {k}, but section {name!r} holds only {int(counts[s])} cells (each cell needs "
                f"{k} other cells of its section); set {key} to at most {int(counts[s]) - 1}"
            )
        self._members: dict[int, np.ndarray] = {}
        self._trees: dict[int, cKDTree] = {}

    def _tree(self, code: int) -> tuple[np.ndarray, cKDTree]:
        if code not in self._trees:
            members = np.flatnonzero(self.section == code)
            self._members[code], self._trees[code] = members, cKDTree(self.xy[members])
        return self._members[code], self._trees[code]

    def mean(self, rows: np.ndarray, values: np.ndarray) -> np.ndarray:
        """Mean of ``values`` ``(n, C)`` over the ``k`` nearest other cells of each of ``rows`` ->
        ``(len(rows), C)`` float32; a cell without section or coordinates gets its own values."""
        out = np.asarray(values[rows], dtype=np.float32).copy()
        codes = self.section[rows]
        for code in np.unique(codes[codes >= 0]).tolist():
            at = np.flatnonzero(codes == code)
            members, tree = self._tree(code)
            _, idx = tree.query(self.xy[rows[at]], k=self.k + 1)
            neighbours = members[idx[:, 1:]]  # column 0: the cell itself (distance 0)
            order = np.argsort(neighbours, axis=None)  # gather in row order (disk-backed values)
            gathered = np.empty((neighbours.size, values.shape[1]), dtype=np.float32)
            gathered[order] = values[neighbours.ravel()[order]]
            out[at] = gathered.reshape(len(at), self.k, -1).mean(axis=1)
        return out


def cell_features(kind: str, rows: np.ndarray, values: np.ndarray, neighbours: SectionNeighbours | None) -> np.ndarray:
    """Features ``(len(rows), F)`` float32: own values (``expression``), own + neighbourhood mean
    (``neighborhood``, ``F = 2 C``)."""
    own = np.asarray(values[rows], dtype=np.float32)
    if kind == "expression":
        return own
    return np.concatenate([own, neighbours.mean(rows, values)], axis=1)


# ----------------------------------------------------------------------------------------------- model
@dataclass(frozen=True)
class LogisticModel:
    """A fitted multinomial logistic regression over standardised features.

    ``classes`` ``(K',)`` int64: class indices (into the task's ``n_classes`` classes) seen in training;
    ``coef`` ``(K', F)``, ``intercept`` ``(K',)``; ``mean`` / ``scale`` ``(F,)`` the scaler.
    """

    kind: str
    neighbors: int
    n_classes: int
    classes: np.ndarray
    coef: np.ndarray
    intercept: np.ndarray
    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(
        cls, kind: str, neighbors: int, n_classes: int, x: np.ndarray, y: np.ndarray, c: float, max_iter: int, seed: int
    ) -> LogisticModel:
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        scaler = StandardScaler().fit(x)
        lr = LogisticRegression(C=c, max_iter=max_iter, random_state=seed).fit(scaler.transform(x), y)
        coef, intercept = lr.coef_, lr.intercept_
        if len(lr.classes_) == 2:  # binary: sigmoid(w.x + b) == softmax over (-(w.x + b)/2, (w.x + b)/2)
            coef, intercept = np.concatenate([-coef / 2, coef / 2]), np.concatenate([-intercept / 2, intercept / 2])
        return cls(
            kind,
            neighbors,
            n_classes,
            lr.classes_.astype(np.int64),
            coef.astype(np.float64),
            intercept.astype(np.float64),
            scaler.mean_.astype(np.float64),
            scaler.scale_.astype(np.float64),
        )

    @property
    def n_params(self) -> int:
        return int(self.coef.size + self.intercept.size)

    def proba(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities ``(N, n_classes)`` float32 of features ``x`` ``(N, F)`` (0 for classes
        absent from training)."""
        logits = ((np.asarray(x, np.float64) - self.mean) / self.scale) @ self.coef.T + self.intercept
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        out = np.zeros((len(x), self.n_classes), dtype=np.float32)
        out[:, self.classes] = p
        return out

    def state(self) -> dict[str, torch.Tensor]:
        return {
            k: torch.from_numpy(np.asarray(getattr(self, k)).copy())
            for k in ("classes", "coef", "intercept", "mean", "scale")
        }

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> LogisticModel:
        b, m = ckpt["baseline"], ckpt["model"]
        return cls(
            b["features"],
            int(b["neighbors"]),
            len(ckpt["class_names"]),
            *(m[k].numpy() for k in ("classes", "coef", "intercept", "mean", "scale")),
        )


# ----------------------------------------------------------------------------------------------- train
@dataclass
class _Cells:
    """What training and prediction need about every cell of a raster's cells.zarr."""

    source: CellSource
    inputs: CellInputs
    neighbours: SectionNeighbours | None


def _open_cells(source: CellSource, r: Raster, kind: str, neighbors: int, scratch: Path) -> _Cells:
    if r.voxel_index.shape[0] != source.n_cells:
        raise InputError(
            f"{source.path} has {source.n_cells} cells but {r.path} indexes {r.voxel_index.shape[0]}; "
            f"give the cells.zarr the raster was rasterized from"
        )
    inputs = CellInputs.read(source, raster_channel_plan(source, r.feature_channels, r.pca), scratch)
    neighbours = (
        SectionNeighbours(inputs.xy, inputs.section, neighbors, inputs.sections) if kind == "neighborhood" else None
    )
    return _Cells(source, inputs, neighbours)


def _check_level(source: CellSource, task: str, level: str) -> None:
    columns = source.obs_columns()
    if level not in columns:
        raise InputError(
            f"{source.path}: obs has no column {level!r} (the --level option, tasks.{task}.level in the "
            f"workflow config){close_matches(level, columns)}; choose one of {', '.join(columns)}"
        )


def _sample(rows: np.ndarray, y: np.ndarray, cap: int | None, seed: int) -> np.ndarray:
    """At most about ``cap`` of ``rows`` (labels ``y``): a seeded class-stratified subsample (every class
    keeps at least one cell), sorted."""
    if cap is None or len(rows) <= cap:
        return rows
    rng = np.random.default_rng(seed)
    keep = [
        rng.choice(np.flatnonzero(y == c), size=max(1, round(cap * int((y == c).sum()) / len(rows))), replace=False)
        for c in np.unique(y)
    ]
    return rows[np.sort(np.concatenate(keep))]


def _predict_rows(model: LogisticModel, cells: _Cells, rows: np.ndarray) -> np.ndarray:
    """Probabilities ``(len(rows), n_classes)`` float32, in chunks of cells."""
    out = np.empty((len(rows), model.n_classes), dtype=np.float32)
    for s in range(0, len(rows), _CELL_CHUNK):
        r = rows[s : s + _CELL_CHUNK]
        out[s : s + len(r)] = model.proba(cell_features(model.kind, r, cells.inputs.values, cells.neighbours))
    return out


def train_baseline(
    raster: str | Path,
    cells: str | Path | None,
    task: str,
    model_name: str,
    out_dir: str | Path,
    *,
    level: str | None = None,
    neighbors: int = DEFAULT_NEIGHBORS,
    max_train_cells: int | None = DEFAULT_MAX_TRAIN_CELLS,
    c: float = DEFAULT_C,
    max_iter: int = DEFAULT_MAX_ITER,
    seed: int = 0,
    split_fractions: Sequence[float] = DEFAULT_FRACTIONS,
    split_blocks: int = DEFAULT_SPLIT_BLOCKS,
    dim: int | str = "auto",
    train_sections: float = 1.0,
) -> dict:
    """Fit baseline ``model_name`` (a key of :data:`BASELINES`) for ``task`` on the training cells of
    ``raster``'s split; write ``out_dir`` (``checkpoint.pt``, ``history.tsv``, ``metrics.json``) and return
    ``metrics.json``'s contents.

    ``level``: the label level (default ``class`` / ``parcellation_division``); ``neighbors``: k of
    ``logreg-neighborhood``; ``max_train_cells``: cap of the training (and validation, test) cells, a
    seeded class-stratified subsample (``None``: all); ``c``: inverse regularisation strength;
    ``split_fractions`` / ``split_blocks`` / ``seed``: the networks' section split; ``train_sections``: keep
    this fraction of the training sections (evenly spaced, as ``bench-models --train-fraction``).
    """
    from abc_pipeline.learn.atlas import _thin_sections

    start = time.perf_counter()
    if model_name not in BASELINES:
        raise InputError(f"unknown baseline {model_name!r}; choose one of {', '.join(BASELINES)}")
    atlas_task = by_name(task)
    if cells is None:
        raise InputError(
            f"the {model_name} baseline reads each cell's expression: give --cells (the cells.zarr "
            f"the raster was made from)"
        )
    if max_train_cells is not None and max_train_cells < 2:
        raise InputError(
            f"max_train_cells (--max-train-cells, baselines.max_train_cells) must be >= 2 or None, "
            f"got {max_train_cells}"
        )
    kind = BASELINES[model_name]
    if kind == "neighborhood":
        check_neighbors(neighbors)
    level = level or atlas_task.default_level
    r, src = open_raster(raster), CellSource(cells)
    _check_level(src, task, level)
    table = class_table(r, src, level)
    splits = raster_splits(r, split_fractions, seed, split_blocks)
    if train_sections != 1.0:
        splits["train"] = _thin_sections(r, splits["train"], train_sections)
    split = np.asarray(cell_splits(r, splits).codes)
    y = cell_targets(src, level, table.names, np.arange(src.n_cells))
    rows = {name: np.flatnonzero((split == i) & (y >= 0)) for i, name in enumerate(SPLITS)}
    if not rows["train"].size:
        raise InputError(f"{r.path}: no training cell has a {level!r} class; choose other --split-fractions or --seed")
    present = np.unique(y[rows["train"]])
    if present.size < 2:
        raise InputError(
            f"level {level!r} has a single class ({table.names[int(present[0])]!r}) among the training "
            f"cells, nothing to classify; choose a finer level (--level, tasks.{task}.level) or other "
            f"--split-fractions"
        )
    with tempfile.TemporaryDirectory(prefix="abc_baseline_") as scratch:
        data = _open_cells(src, r, kind, neighbors, Path(scratch))
        train_rows = _sample(rows["train"], y[rows["train"]], max_train_cells, seed)
        x = cell_features(kind, train_rows, data.inputs.values, data.neighbours)
        log.info(
            "%s %s (%s): fitting on %d of %d training cells, %d features, %d classes",
            task,
            model_name,
            level,
            len(train_rows),
            len(rows["train"]),
            x.shape[1],
            present.size,
        )
        fit_start = time.perf_counter()
        model = LogisticModel.fit(kind, neighbors, len(table.names), x, y[train_rows], c, max_iter, seed)
        fit_seconds = time.perf_counter() - fit_start
        scores = {}
        for name in ("val", "test"):
            chosen = _sample(rows[name], y[rows[name]], max_train_cells, seed)
            scores[name] = (
                classification_metrics(y[chosen], _predict_rows(model, data, chosen), table.names)
                if chosen.size
                else {}
            )
    atlas = {
        "task": task,
        "raster": str(Path(r.path).resolve()),
        "channels": list(r.feature_channels),
        "space": r.grid.space,
        "grid_shape": list(r.grid.shape),
        "voxel_size": list(r.grid.voxel_size),
        "classes": table.to_dict(),
        "splits": splits,
        "split_fractions": [float(f) for f in split_fractions],
        "split_blocks": split_blocks,
        "dim": default_dim(r) if dim == "auto" else int(dim),
        "train_sections": train_sections,
    }
    baseline = {
        "features": kind,
        "neighbors": int(neighbors) if kind == "neighborhood" else 0,
        "section_key": SECTION_KEY,
        "coordinates": SECTION_COORDINATES,
        "c": float(c),
        "max_iter": max_iter,
        "max_train_cells": max_train_cells,
        "seed": seed,
    }
    run_config = {
        "config": {"atlas": atlas, "baseline": baseline},
        "model_name": model_name,
        "task": "classify",
        "model_spec": None,
    }
    chash = config_hash(run_config)
    val = scores["val"]
    history = [
        {
            "epoch": 0,
            "train_cells": len(train_rows),
            **{f"val_{k}": val.get(k) for k in ("accuracy", "balanced_accuracy", "macro_f1")},
            "seconds": fit_seconds,
        }
    ]
    out_dir = claim_directory(Path(out_dir), "train-run", inputs=[raster, cells])
    ckpt = {
        "model": model.state(),
        "model_name": model_name,
        "task": "classify",
        "class_names": list(table.names),
        "config": run_config,
        "config_hash": chash,
        "epoch": 0,
        "best_epoch": 0,
        "best_val": val,
        "history": history,
        "model_spec": None,
        "baseline": baseline,
    }
    atomic_write_text(out_dir / "history.tsv", pd.DataFrame(history).to_csv(sep="\t", index=False, float_format="%.6g"))
    metrics = {
        "model": model_name,
        "task": "classify",
        "atlas_task": task,
        "level": level,
        "metric": "balanced_accuracy",
        "best_epoch": 0,
        "epochs_run": 1,
        "val": val,
        "test": {} if atlas_task.per_voxel else scores["test"],  # per voxel: abc-pipeline evaluate
        "test_cells": scores["test"],
        "config_hash": chash,
        "device": "cpu",
        "n_params": model.n_params,
        "n_train": len(train_rows),
        "splits": splits,
        "baseline": baseline,
        "fit_seconds": fit_seconds,
        "seconds": time.perf_counter() - start,
    }
    publish_run(metrics, ckpt, out_dir)
    log.info(
        "%s %s: validation balanced accuracy %.3f, test accuracy %.3f (%d cells); %.1f s",
        task,
        model_name,
        val.get("balanced_accuracy", float("nan")),
        scores["test"].get("accuracy", float("nan")),
        len(rows["test"]),
        metrics["seconds"],
    )
    return metrics


# ----------------------------------------------------------------------------------------------- predict
def load_baseline(checkpoint: str | Path) -> tuple[LogisticModel, dict]:
    """The fitted model and the checkpoint dict of a baseline run; :class:`InputError` for a network's."""
    ckpt = load_checkpoint(checkpoint)
    if "baseline" not in ckpt:
        raise InputError(f"{checkpoint}: not a baseline checkpoint (model {ckpt['model_name']!r})")
    return LogisticModel.from_checkpoint(ckpt), ckpt


def predict_baseline(
    checkpoint: str | Path,
    raster: str | Path,
    out: str | Path,
    *,
    cells: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Predict every cell with the baseline of ``checkpoint`` and write ``out`` (a ``predictions.zarr`` in
    the layout of :func:`abc_pipeline.learn.predict.predict_raster`, voxel volumes from the cells' predicted
    classes; see the module docstring). Test-split cells are scored (attributes' ``metrics``)."""
    model, ckpt = load_baseline(checkpoint)
    atlas = atlas_config(ckpt, checkpoint)
    r = open_raster(raster)
    check_channels(atlas, r.path, r.feature_channels, checkpoint)
    if cells is None:
        raise InputError(
            f"{checkpoint} is a {ckpt['model_name']} baseline: predict needs --cells (the cells.zarr "
            f"of {r.path}) to read each cell's expression"
        )
    src = CellSource(cells)
    digest = names_digest(src.obs_names())
    if digest != names_digest(r.cell_label):
        raise InputError(
            f"{r.path} was not rasterized from {cells} (cell names/order differ); give the cells.zarr "
            f"the raster was made from"
        )
    table = ClassTable.from_dict(atlas["classes"])
    same_grid = atlas["space"] == r.grid.space and list(atlas["grid_shape"]) == list(r.grid.shape)
    splits = {k: list(v) for k, v in atlas["splits"].items()} if same_grid else {}
    task, n, k = atlas["task"], src.n_cells, len(table.names)
    out = Path(out)
    with (
        tempfile.TemporaryDirectory(prefix="abc_baseline_") as scratch,
        staged_output(out, "predictions", inputs=[checkpoint, raster, cells], overwrite=overwrite) as tmp,
    ):
        data = _open_cells(src, r, model.kind, model.neighbors, Path(scratch))
        root = create_store(tmp)
        pred = np.full(n, -1, dtype=np.int16)
        cell_pred, cell_proba, cell_split = create_cell_tables(root, n, k)
        for s in range(0, n, _CELL_CHUNK):
            rows = np.arange(s, min(n, s + _CELL_CHUNK))
            p = _predict_rows(model, data, rows)
            pred[rows] = p.argmax(1)
            cell_proba[s : s + len(rows)] = p
        cell_pred[:] = pred
        cell_split[:] = split_codes(r, splits)
        _write_voxel_votes(root, r, pred, table, task)
        meta = store_attrs(
            task=task,
            table=table,
            model=ckpt["model_name"],
            checkpoint=checkpoint,
            config_hash=ckpt["config_hash"],
            best_epoch=0,
            raster=r.path,
            splits=splits,
            dim=atlas["dim"],
            n_cells=n,
            cell_names_digest=digest,
            val_metrics=ckpt.get("best_val", {}),
            baseline=ckpt["baseline"],
            voxels="fraction of the voxel's cells predicted as each class; label = majority class",
        )
        meta["metrics"] = stored_metrics(tmp, src, table.level, table.names)
        write_attrs(root, meta)
    log.info("wrote %s predictions of %s (%s) to %s", task, r.path, ckpt["model_name"], out)
    return out


def _write_voxel_votes(root: zarr.Group, r: Raster, pred: np.ndarray, table: ClassTable, task: str) -> None:
    """``0/`` (K, z, y, x): per voxel the fraction of its cells predicted as each class; ``labels/pred_<task>``
    the majority class + 1 (0 = no cells); one z-plane at a time."""
    shape, k = r.grid.shape, len(table.names)
    proba, label = create_volumes(root, task, k, shape, (1, *shape[1:]))
    index = r.voxel_index
    voxels = np.concatenate([np.asarray(index[s : s + _CELL_CHUNK]) for s in range(0, index.shape[0], _CELL_CHUNK)])
    z = voxels[:, 0]
    order = np.argsort(z, kind="stable")
    bounds = np.searchsorted(z[order], np.arange(shape[0] + 1))
    plane = shape[1] * shape[2]
    for zi in range(shape[0]):
        rows = order[bounds[zi] : bounds[zi + 1]]
        rows = rows[pred[rows] >= 0]
        if not rows.size:
            continue
        yx = voxels[rows, 1:].astype(np.int64)
        flat = yx[:, 0] * shape[2] + yx[:, 1]
        votes = np.bincount(flat * k + pred[rows], minlength=plane * k).reshape(plane, k).astype(np.float32)
        counts = votes.sum(axis=1)
        proba[:, zi] = (votes / np.maximum(counts, 1)[:, None]).T.reshape(k, *shape[1:])
        label[zi] = np.where(counts > 0, votes.argmax(1) + 1, 0).reshape(shape[1:]).astype(np.uint16)
    write_volume_metadata(root, r.grid, task, table)


# ----------------------------------------------------------------------------------------------- bench
def bench_baseline_rows(
    raster: str | Path,
    cells: str | Path,
    task: str,
    names: Sequence[str],
    out_dir: str | Path,
    *,
    test_rows: np.ndarray | None = None,
    test_targets: np.ndarray | None = None,
    **train_kwargs,
) -> list[dict]:
    """Rows of the ``bench-models`` table (:func:`abc_pipeline.learn.compare.bench_models`) for the baselines
    ``names``, each fitted into ``out_dir/<name>/`` with :func:`train_baseline` (``train_kwargs``, e.g.
    ``train_sections``) and scored like the networks: ``celltype``: accuracy, balanced accuracy, AUC of the
    test cells ``test_rows`` (the zoo's test set; labels ``test_targets``); ``region``: voxel accuracy, mean
    Dice, mean IoU of the test split's labelled voxels (majority label volume of ``predictions.zarr``).
    Columns without meaning for a baseline (width, worst grid orientation, equivariance error, agreement
    at 45°, peak memory) are NaN; ``seconds_per_epoch`` is the fit time."""
    from abc_pipeline.learn.evaluate_run import score_test_split

    out_dir, rows = claim_directory(Path(out_dir), "bench"), []  # the bench folder, before its first run
    for name in names:
        run = out_dir / name
        metrics = train_baseline(raster, cells, task, name, run, **train_kwargs)
        model, ckpt = load_baseline(run / "checkpoint.pt")
        atlas = atlas_config(ckpt, run / "checkpoint.pt")
        table = ClassTable.from_dict(atlas["classes"])
        if not by_name(task).per_voxel:
            r, src = open_raster(raster), CellSource(cells)
            with tempfile.TemporaryDirectory(prefix="abc_baseline_") as scratch:
                data = _open_cells(src, r, model.kind, model.neighbors, Path(scratch))
                proba = _predict_rows(model, data, np.asarray(test_rows))
            scores = classification_metrics(np.asarray(test_targets), proba, table.names)
            scores = {k: scores[k] for k in ("accuracy", "balanced_accuracy", "auc")}
            worst = "worst_accuracy"
        else:
            store_path = predict_baseline(run / "checkpoint.pt", raster, run / "predictions.zarr", cells=cells)
            store, r = open_predictions(store_path), open_raster(raster)
            seg = score_test_split(by_name(task), store, store_path, r, None, table, atlas["splits"], None).test
            scores, worst = {k: seg[k] for k in ("accuracy", "mean_dice", "mean_iou")}, "worst_mean_dice"
        nan = float("nan")
        rows.append(
            {
                "model": name,
                "width": nan,
                "first_layer_channels": nan,
                "params": metrics["n_params"],
                **scores,
                worst: nan,
                "equivariance_error": nan,
                "agreement_45deg": nan,
                "seconds_per_epoch": metrics["fit_seconds"],
                "epochs": 1,
                "best_epoch": 0,
                "peak_memory_mb": nan,
                "memory": "not measured for baselines",
            }
        )
        log.info("%s: %s", name, {k: round(v, 3) for k, v in scores.items()})
    return rows


# ----------------------------------------------------------------------------------------------- evaluate
def evaluate_baseline(
    checkpoint: str | Path,
    raster: str | Path,
    predictions: str | Path,
    out: str | Path,
    *,
    cells: str | Path | None,
    map_sections: int = 3,
    max_test_cells: int | None = 500_000,
    any_angles: Sequence[float] | None = None,
    any_angle_sections: int | None = None,
    overwrite: bool = False,
) -> dict:
    """``abc-pipeline evaluate`` of a baseline run: the outputs of
    :func:`abc_pipeline.learn.evaluate_run.evaluate_run` without the grid-symmetry windows and the
    equivariance curve (the features of a cell do not change under a rotation of its section: the any-angle
    scores show it): ``test`` (``celltype``: test cells; ``region``: test voxels of the majority label
    volume), ``test_cells``, ``any_angle``, ``confusion_matrix.png``, ``maps.png``, ``any_angle.png``."""
    from abc_pipeline.learn import evaluate_run as ev
    from abc_pipeline.learn.any_angle import (
        DEFAULT_ANY_ANGLE_SECTIONS,
        DEFAULT_ANY_ANGLES,
        any_angle_scores,
    )

    start = time.perf_counter()
    checkpoint, out, predictions = Path(checkpoint), Path(out), Path(predictions)
    _, ckpt = load_baseline(checkpoint)
    if cells is None:
        raise InputError(f"evaluating the {ckpt['model_name']} baseline needs --cells (the cells.zarr of {raster})")
    run = ev.open_run(checkpoint, ckpt, raster, predictions, cells)
    test_cells = score_cells(predictions, run.cells, max_cells=max_test_cells)
    scoring = ev.score_test_split(
        run.task, run.store, predictions, run.raster, run.cells, run.table, run.splits, max_test_cells
    )
    any_angle = any_angle_scores(
        checkpoint,
        run.raster.path,
        run.cells.path,
        angles=any_angles or DEFAULT_ANY_ANGLES,
        sections=any_angle_sections or DEFAULT_ANY_ANGLE_SECTIONS,
    )
    title = run.title
    with staged_output(out, "evaluation", inputs=[checkpoint, raster, predictions, cells], overwrite=overwrite) as tmp:
        tmp.mkdir()
        figures = run.figures(scoring, map_sections, tmp)
        figures.append(ev.any_angle_plot(run.model_name, title, any_angle, tmp / "any_angle.png"))
        result = {
            **run.describe(scoring, test_cells, any_angle),
            "caps": {
                "map_sections": map_sections,
                "max_test_cells": max_test_cells,
                "any_angle_sections": any_angle_sections or DEFAULT_ANY_ANGLE_SECTIONS,
            },
            "figures": [p.name for p in figures],
            "seconds": time.perf_counter() - start,
        }
        ev.write_metrics(result, tmp)
    log.info(
        "%s: test %s; per cell accuracy %.3f; any angle: mean accuracy %.3f, worst %.3f (%g°); %.1f s -> %s",
        title,
        {k: round(v, 3) for k, v in scoring.test.items() if isinstance(v, float)},
        test_cells["accuracy"],
        any_angle["mean"]["accuracy"],
        any_angle["worst"]["accuracy"],
        any_angle["worst_angle"]["accuracy"],
        result["seconds"],
        out,
    )
    return result


__all__ = [
    "DEFAULT_NEIGHBORS",
    "CellInputs",
    "LogisticModel",
    "bench_baseline_rows",
    "SectionNeighbours",
    "cell_features",
    "evaluate_baseline",
    "load_baseline",
    "predict_baseline",
    "train_baseline",
]
