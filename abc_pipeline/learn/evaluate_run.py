"""Evaluate a trained atlas model (``abc-pipeline evaluate``): test metrics, grid-symmetry scores, the
equivariance curve and figures.

Inputs: the checkpoint of ``abc-pipeline train``, its raster, the ``predictions.zarr`` that
``abc-pipeline predict`` wrote with that checkpoint, and (``celltype``: required) the cells.zarr.
Everything is read lazily, plane by plane / cell chunk by cell chunk; the model runs on bounded samples.

1. **Test split as is** (``test``), from the stored predictions:
   ``celltype``: the test-split cells' predicted probabilities (``cells/proba``) against their own labels
   in cells.zarr (:func:`abc_pipeline.metrics.classification_metrics`: accuracy, balanced accuracy,
   macro-F1, per-class F1, AUC; at most ``max_test_cells`` cells, evenly strided); ``region``: the voxel
   label volume ``labels/pred_region`` against ``labels/<level>`` of the raster over the labelled voxels of
   the test z indices (:func:`abc_pipeline.metrics.segmentation_metrics`: per-region Dice and IoU, mean
   Dice, ARI, NMI), read in z-slabs.
The model itself runs only on ``windows`` test windows (bounded): test sections (2D) or slabs of
``window_depth`` test z indices (3D), evenly spaced along z, each cropped to a square of at most
``window_size`` voxels in-plane around its tissue and read with the model's context (the patch classifier's
exact receptive field; ``halo`` voxels for the U-Net), zero outside the test split.

2. **Grid symmetries** (``symmetry``): for every element ``g`` of :func:`abc_pipeline.nn.fields.grid_group`
   (model dimension and voxel spacing) each window is transformed by ``g``, predicted densely, and the
   class scores transformed back by ``g^-1``; then scored as in 1. on the window cores: the test cells in
   them (``celltype``; the identity reproduces ``predictions.zarr`` there) or their labelled voxels
   (``region``). Per scalar metric: the identity's value, the mean and the worst case over the group, and
   which symmetry is worst. An exactly invariant / equivariant model scores the same under every ``g``.
   ``identity_agreement``: how often the identity's classes equal those of ``predictions.zarr`` there (a
   check that the windows see what prediction saw).
3. **Equivariance curve** (``equivariance_curve``): :func:`abc_pipeline.metrics.equivariance_curve` over
   ``angles`` (default 0-90° in 15° steps), in-plane (y, x) rotations about each window's centre: the
   fraction of tissue voxels whose predicted class (dense cell-type map or region map) on the rotated input
   equals the rotated prediction, pooled over the windows.

4. **Per cell and at any angle** (with ``cells``): ``test_cells``, the per-cell scores every model gets
   (:func:`abc_pipeline.learn.scoring.score_cells`), and ``any_angle``: the per-cell scores of a few test
   sections rotated in-plane by each of ``any_angles`` (:func:`abc_pipeline.learn.any_angle.any_angle_scores`).

Outputs in ``out`` (written to a temporary directory, then renamed): ``metrics.json`` (everything above
plus the inputs, caps and sample sizes), ``metrics.tsv`` (one row per metric: ``scope``, ``metric``,
``value``, ``detail``), and PNG figures (:mod:`abc_pipeline.plots`): ``confusion_matrix.png`` (test
cells / test voxels), ``maps.png`` (true vs predicted label maps of ``map_sections`` test sections or
z-slices; needs ``labels/<level>`` in the raster), ``training_curves.png`` (the ``history.tsv`` next to
the checkpoint), ``equivariance_curve.png`` and ``orientation.png`` (the sample's headline metric as is
vs its worst grid orientation); ``any_angle.png``: per-cell accuracy against the rotation angle).
"""

from __future__ import annotations

import functools
import logging
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import zarr

from abc_pipeline import plots
from abc_pipeline.cells import CellSource
from abc_pipeline.errors import InputError
from abc_pipeline.fileio import check_output, staged_output
from abc_pipeline.learn.any_angle import DEFAULT_ANY_ANGLE_SECTIONS, any_angle_scores
from abc_pipeline.learn.checkpoint import load_checkpoint, load_model, write_json
from abc_pipeline.learn.choices import DEFAULT_ANY_ANGLES, check_angles, is_baseline
from abc_pipeline.learn.data import (
    DEFAULT_CACHE_BYTES,
    SPLITS,
    ClassTable,
    Normalizer,
    RasterReader,
    clip_box,
    names_digest,
    split_mask,
    z_blocks,
)
from abc_pipeline.learn.inference import pick_device, predict_batches
from abc_pipeline.learn.predict import DEFAULT_HALO, atlas_config, check_channels
from abc_pipeline.learn.predictions import Predictions, open_predictions
from abc_pipeline.learn.scoring import score_cells, scored_cells
from abc_pipeline.learn.tasks import PER_CELL_ARCHITECTURES, AtlasTask, by_name
from abc_pipeline.learn.train import IGNORE_INDEX
from abc_pipeline.metrics import equivariance_curve, score
from abc_pipeline.nn.fields import GridSymmetry, grid_group, transform
from abc_pipeline.raster.channels import raster_digest
from abc_pipeline.raster.ome import Raster, open_raster

log = logging.getLogger(__name__)

DEFAULT_ANGLES = tuple(range(0, 91, 15))
DEFAULT_WINDOW = {2: 128, 3: 64}
_CELL_CHUNK = 1 << 16  # cells per read of the per-cell predictions


def evaluate_run(
    checkpoint: str | Path,
    raster: str | Path,
    predictions: str | Path,
    out: str | Path,
    *,
    cells: str | Path | None = None,
    windows: int = 2,
    window_size: int | None = None,
    window_depth: int = 8,
    halo: int = DEFAULT_HALO,
    angles: Sequence[float] = DEFAULT_ANGLES,
    map_sections: int = 3,
    max_test_cells: int | None = 500_000,
    batch_size: int = 8,
    device: str = "auto",
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    overwrite: bool = False,
    any_angles: Sequence[float] = DEFAULT_ANY_ANGLES,
    any_angle_sections: int = DEFAULT_ANY_ANGLE_SECTIONS,
) -> dict:
    """Evaluate the model of ``checkpoint`` on the test split of ``raster``; write ``out`` (see the module
    docstring) and return the contents of ``metrics.json``.

    ``predictions``: the ``predictions.zarr`` of this checkpoint on this raster. ``cells``: the cells.zarr
    the raster was made from (required for ``celltype``). Caps of the model runs: ``windows`` test windows
    of at most ``window_size`` voxels in-plane (default 128 in 2D, 64 in 3D) and ``window_depth`` z indices
    (3D), read with the model's context (``celltype``: its receptive field; ``region``: ``halo`` voxels per
    side); ``angles``: the curve's rotation angles in degrees; ``map_sections`` sections / z-slices in
    ``maps.png``; ``max_test_cells`` test cells scored (evenly strided; ``None`` = all); ``batch_size``:
    windows per forward pass. ``overwrite``: replace an existing abc-pipeline artifact of another kind at
    ``out`` (:func:`abc_pipeline.fileio.check_output`). With ``cells``: ``test_cells`` (every task: the per-cell scores of
    :func:`abc_pipeline.learn.scoring.score_cells`) and ``any_angle`` (the per-cell scores of
    ``any_angle_sections`` test sections rotated by each of ``any_angles``,
    :func:`abc_pipeline.learn.any_angle.any_angle_scores`; ``any_angle.png``). A scikit-learn baseline's
    run is evaluated by :func:`abc_pipeline.learn.baselines.evaluate_baseline` (no grid-symmetry windows).
    """
    from abc_pipeline.learn.baselines import evaluate_baseline

    start = time.perf_counter()
    checkpoint, out, predictions = Path(checkpoint), Path(out), Path(predictions)
    check_output(out, "evaluation", inputs=[checkpoint, raster, predictions, cells], overwrite=overwrite)  # fail early
    any_angles = check_angles(any_angles)
    if is_baseline(load_checkpoint(checkpoint)["model_name"]):
        return evaluate_baseline(
            checkpoint,
            raster,
            predictions,
            out,
            cells=cells,
            map_sections=map_sections,
            max_test_cells=max_test_cells,
            any_angles=any_angles,
            any_angle_sections=any_angle_sections,
            overwrite=overwrite,
        )
    for value, what in (
        (windows, "windows"),
        (window_size or 1, "window_size"),
        (window_depth, "window_depth"),
        (halo + 1, "halo + 1"),
        (batch_size, "batch_size"),
        (map_sections, "map_sections"),
    ):
        if value < 1:
            raise InputError(f"{what} must be >= 1, got {value}")
    dev = pick_device(device)
    model, ckpt = load_model(checkpoint, dev)
    run = open_run(checkpoint, ckpt, raster, predictions, cells)
    task, r, dim = run.task, run.raster, run.dim
    # 1.: the test split as is, from the stored predictions (per cell or per voxel, as the task says)
    scoring = score_test_split(task, run.store, predictions, r, run.cells, run.table, run.splits, max_test_cells)

    # 2. and 3.: the model on test windows, under every grid symmetry and rotated in-plane
    if task.recorded_architecture(run.atlas) in PER_CELL_ARCHITECTURES:  # dense map: each voxel's (mean) cell
        margin, net = tuple(model.margin), model.forward_dense
    else:
        margin, net = (halo,) * dim, model
    spacing = tuple(float(s) for s in ckpt["model_spec"]["spacing"])
    side = window_size or DEFAULT_WINDOW[dim]
    boxes = _windows(r, run.splits["test"], dim, spacing, side, window_depth, margin, windows)
    x, targets, stored = _read_windows(run, scoring, boxes, cache_bytes)
    logits = functools.partial(predict_batches, net, device=dev, batch_size=batch_size)  # class scores per voxel
    symmetry = _symmetry_scores(
        logits, x, boxes, targets, grid_group(dim, spacing), run.table.names, task, scoring, dim, batch_size, stored
    )
    symmetry.update(spacing=list(spacing), windows=[w.describe() for w in boxes])
    curve = equivariance_curve(logits, x, angles, plane=(-2, -1), task="segment", mask=x[:, -1] > 0)
    curve["windows"] = len(boxes)

    # 4.: per cell and at any angle
    test_cells, any_angle = {}, {}
    if run.cells is not None:
        test_cells = score_cells(predictions, run.cells, max_cells=max_test_cells)
        any_angle = any_angle_scores(
            checkpoint, r.path, run.cells.path, angles=any_angles, sections=any_angle_sections, halo=halo, device=device
        )

    with staged_output(out, "evaluation", inputs=[checkpoint, r.path, predictions, cells], overwrite=overwrite) as tmp:
        tmp.mkdir()
        figures = run.figures(scoring, map_sections, tmp) + _network_figures(run, symmetry, curve, any_angle, tmp)
        result = {
            **run.describe(scoring, test_cells, any_angle),
            "symmetry": symmetry,
            "equivariance_curve": curve,
            "caps": {
                "windows": windows,
                "window_size": side,
                "window_depth": window_depth,
                "margin": list(margin),
                "map_sections": map_sections,
                "max_test_cells": max_test_cells,
                "any_angle_sections": any_angle_sections,
            },
            "figures": [p.name for p in figures],
            "seconds": time.perf_counter() - start,
        }
        write_metrics(result, tmp)
    headline = task.symmetry_metrics[0]
    head = symmetry["metrics"][headline]
    log.info(
        "%s: test %s; worst-orientation %s %.3f (%s); agreement at %s°: %s; %.1f s -> %s",
        run.title,
        {k: round(v, 3) for k, v in scoring.test.items() if isinstance(v, float)},
        headline,
        head["worst"],
        head["worst_symmetry"],
        curve["angles"],
        [round(a, 3) for a in curve["agreement"]],
        result["seconds"],
        out,
    )
    return result


# ----------------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class EvaluatedRun:
    """A trained run opened for evaluation (:func:`open_run`): the checkpoint (path and dict), its
    ``config["atlas"]``, the raster, the ``predictions.zarr`` (path and reader) written by this checkpoint on
    this raster, the atlas task, the class table, the cells.zarr (``None`` when not given) and the splits
    (z indices per split; block splits: their ``blocks``)."""

    checkpoint: Path
    ckpt: dict
    atlas: dict
    raster: Raster
    predictions: Path
    store: Predictions
    task: AtlasTask
    table: ClassTable
    cells: CellSource | None
    splits: dict

    @property
    def dim(self) -> int:
        return int(self.atlas["dim"])

    @property
    def model_name(self) -> str:
        return self.ckpt["model_name"]

    @property
    def title(self) -> str:
        """``<model> (<task>, <level>)``: the figures' titles."""
        return f"{self.model_name} ({self.task.name}, {self.table.level})"

    def figures(self, scoring: _Scoring, map_sections: int, tmp: Path) -> list[Path]:
        """``confusion_matrix.png`` of the test split and, when the raster has the level's label volume,
        ``maps.png`` (true vs predicted maps of ``map_sections`` test sections or z-slices) in ``tmp``."""
        figures = [
            plots.confusion_matrix_figure(
                scoring.y_true,
                scoring.y_pred,
                self.table.names,
                tmp / "confusion_matrix.png",
                title=f"{self.title}: test {scoring.unit}",
            )
        ]
        r = self.raster
        if self.table.level in r.labels:
            figures.append(
                _maps_figure(self.store, r, self.table, self.splits["test"], self.dim, map_sections, tmp / "maps.png")
            )
        else:
            log.warning("%s has no labels/%s volume: no true vs predicted maps", r.path, self.table.level)
        return figures

    def describe(self, scoring: _Scoring, test_cells: dict, any_angle: dict) -> dict:
        """The part of ``metrics.json`` every model has: the run, the test split's scores, per cell, any angle."""
        return {
            "task": self.task.name,
            "level": self.table.level,
            "model": self.model_name,
            "dim": self.dim,
            "checkpoint": str(self.checkpoint.resolve()),
            "config_hash": self.ckpt["config_hash"],
            "raster": str(self.raster.path.resolve()),
            "predictions": str(self.predictions.resolve()),
            "splits": self.splits,
            "n_test": len(scoring.y_true),
            "test_unit": scoring.unit,
            "test": scoring.test,
            "test_cells": test_cells,
            "any_angle": any_angle,
        }


def open_run(
    checkpoint: Path, ckpt: dict, raster: str | Path, predictions: Path, cells: str | Path | None
) -> EvaluatedRun:
    """Open the run of ``checkpoint`` (loaded: ``ckpt``) for evaluation: :class:`InputError` unless ``raster`` is
    its training raster, ``predictions`` were written by it on that raster, ``cells`` (required for tasks scored
    per cell) is the cells.zarr of the raster, and the run has a test split."""
    atlas = atlas_config(ckpt, checkpoint)
    r = open_raster(raster)
    _check_raster(atlas, r, checkpoint)
    digest = names_digest(r.cell_label)
    store = open_predictions(predictions, checkpoint)
    store.check_written_by(checkpoint, ckpt, atlas, r, digest)
    task = by_name(atlas["task"])
    src = _cells(cells, r, digest, task)
    splits = {k: [int(z) for z in v] if k in SPLITS else v for k, v in atlas["splits"].items()}
    if not splits.get("test"):
        raise InputError(
            f"{checkpoint}: the run has no test split (test fraction 0); retrain with a positive "
            f"third --split-fractions value to evaluate"
        )
    return EvaluatedRun(
        checkpoint, ckpt, atlas, r, predictions, store, task, ClassTable.from_dict(atlas["classes"]), src, splits
    )


def _check_raster(atlas: dict, r: Raster, checkpoint: Path) -> None:
    """:class:`InputError` unless ``r`` is the checkpoint's training grid with its feature channels."""
    want = (atlas["space"], [int(n) for n in atlas["grid_shape"]])
    have = (r.grid.space, [int(n) for n in r.grid.shape])
    if want != have:
        raise InputError(
            f"{r.path} ({have[0]} grid {have[1]}) is not the raster {checkpoint} was trained on "
            f"({want[0]} grid {want[1]}, {atlas['raster']}); give --raster the training raster"
        )
    check_channels(atlas, r.path, r.feature_channels, checkpoint, raster_digest(r))


def _cells(cells: str | Path | None, r: Raster, digest: str, task: AtlasTask) -> CellSource | None:
    """The cells.zarr (required for tasks scored per cell), checked to be the one ``r`` was rasterized from
    (cell-name digest ``digest``)."""
    if cells is None:
        if not task.per_voxel:
            raise InputError(
                f"evaluating a {task.name} model needs --cells (the cells.zarr the raster was made from: "
                f"the true cell labels)"
            )
        return None
    src = CellSource(cells)
    if names_digest(src.obs_names()) != digest:
        raise InputError(
            f"{r.path} was not rasterized from {cells} (cell names/order differ); give the "
            f"cells.zarr the raster was made from"
        )
    return src


# ----------------------------------------------------------------------------------------------- test split
class _Scoring(ABC):
    """How a task's test split is scored (:attr:`abc_pipeline.learn.tasks.AtlasTask.test_unit`): ``test``, the
    scores of the stored predictions against the truth over ``y_true`` / ``y_pred`` ``(N,)`` (the confusion
    matrix's); and the scores of a model's class scores on test windows (the grid symmetries).
    ``label_target``: the label volume and class table a window's :class:`RasterReader` reads as targets."""

    unit: str
    test: dict
    y_true: np.ndarray
    y_pred: np.ndarray
    label_target: tuple[str | None, ClassTable | None] = (None, None)

    @abstractmethod
    def window_targets(
        self, r: Raster, store: Predictions, boxes: Sequence[_Window], readers: dict, dim: int
    ) -> tuple[list, np.ndarray]:
        """The targets of each window (:meth:`score_windows`) and the classes ``predictions.zarr`` holds for
        them, concatenated in window order."""

    @staticmethod
    @abstractmethod
    def window_labels(targets: Sequence) -> np.ndarray:
        """The true classes of all windows' targets in window order (-1: not scored)."""

    @abstractmethod
    def score_windows(
        self,
        back: torch.Tensor,
        y: np.ndarray,
        boxes: Sequence[_Window],
        targets: Sequence,
        names: Sequence[str],
        dim: int,
    ) -> tuple[np.ndarray, dict]:
        """The predicted classes (aligned with ``y``, :meth:`window_labels`) and the scores of the class scores
        ``back`` ``(n, K, *box)`` of the windows."""


class _CellScoring(_Scoring):
    """Per cell: the test-split cells' stored probabilities (``cells/proba``) against their labels in cells.zarr
    (at most ``cap`` cells, evenly strided); in a window, the test cells whose voxel lies in its core."""

    unit = "cells"

    def __init__(self, store: Predictions, where: Path, src: CellSource, table: ClassTable, cap: int | None) -> None:
        self.rows, self.y_true, self.proba = _test_cells(store, where, src, table, cap)
        self.y_pred = self.proba.argmax(1)
        self.test = score(self.y_true, self.proba, table.names)

    def window_targets(
        self, r: Raster, store: Predictions, boxes: Sequence[_Window], readers: dict, dim: int
    ) -> tuple[list, np.ndarray]:
        """Per window (box coordinates ``(n, dim)``, labels ``(n,)``) of its cells."""
        cells_in = _window_cells(r, boxes, self.rows, np.stack([self.y_true, self.y_pred], axis=1), dim)
        targets = [(coords, labels[:, 0]) for coords, labels in cells_in]
        return targets, np.concatenate([labels[:, 1] for _, labels in cells_in])

    @staticmethod
    def window_labels(targets: Sequence) -> np.ndarray:
        return np.concatenate([t for _, t in targets])

    def score_windows(
        self,
        back: torch.Tensor,
        y: np.ndarray,
        boxes: Sequence[_Window],
        targets: Sequence,
        names: Sequence[str],
        dim: int,
    ) -> tuple[np.ndarray, dict]:
        proba = torch.cat([torch.softmax(b[(slice(None), *c.T)].T, dim=1) for b, (c, _) in zip(back, targets)])
        return proba.argmax(1).numpy(), score(y, proba.numpy(), names)


class _VoxelScoring(_Scoring):
    """Per voxel: the label volume ``labels/pred_<task>`` against the raster's ``labels/<level>`` over the
    labelled voxels of the test z indices (and test blocks); in a window, the labelled voxels of its core."""

    unit = "voxels"

    def __init__(
        self, store: Predictions, where: Path, r: Raster, table: ClassTable, test_z: Sequence[int], mask: np.ndarray
    ) -> None:
        self.y_true, self.y_pred = _test_voxels(store, where, r, table, test_z, mask)
        self.test = score(self.y_true, self.y_pred, table.names, segment=True, ignore=IGNORE_INDEX)
        self.label_target = (table.level, table)

    def window_targets(
        self, r: Raster, store: Predictions, boxes: Sequence[_Window], readers: dict, dim: int
    ) -> tuple[list, np.ndarray]:
        """Per window its core's label map ``(1 or depth, side, side)``."""
        targets = [readers[w.block].target_window(w.lo, w.size)[w.crop(3)] for w in boxes]
        return targets, np.concatenate([_read_box(store.label_image, w.core_lo, w.core).ravel() - 1 for w in boxes])

    @staticmethod
    def window_labels(targets: Sequence) -> np.ndarray:
        return np.concatenate([t.ravel() for t in targets])

    def score_windows(
        self,
        back: torch.Tensor,
        y: np.ndarray,
        boxes: Sequence[_Window],
        targets: Sequence,
        names: Sequence[str],
        dim: int,
    ) -> tuple[np.ndarray, dict]:
        pred = np.concatenate([b.argmax(0)[w.crop(dim)].numpy().ravel() for b, w in zip(back, boxes)])
        return pred, score(y, pred, names, segment=True, ignore=IGNORE_INDEX)


def score_test_split(
    task: AtlasTask,
    store: Predictions,
    where: Path,
    r: Raster,
    src: CellSource | None,
    table: ClassTable,
    splits: dict,
    max_cells: int | None,
) -> _Scoring:
    """The test split of the run of ``store`` (at ``where``) scored as ``task`` says: per cell (``src``, at most
    ``max_cells`` cells) or per voxel (the test z indices of ``splits``, and its test blocks)."""
    if task.per_voxel:
        return _VoxelScoring(store, where, r, table, splits["test"], split_mask(splits, "test", r.grid.shape))
    return _CellScoring(store, where, src, table, max_cells)


def _test_cells(
    store: Predictions, where: Path, src: CellSource, table: ClassTable, cap: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row numbers ``(N,)`` in cells.zarr, labels ``(N,)`` and stored probabilities ``(N, K)`` of the test
    cells with a voxel and a class (at most ``cap``, evenly strided;
    :func:`abc_pipeline.learn.scoring.scored_cells`)."""
    rows, y_true, proba = scored_cells(store.cell_split, store.cell_proba, src, table.level, table.names, max_cells=cap)
    if not y_true.size:
        raise InputError(
            f"{where}: no test-split cell has a voxel and a {table.level!r} class; nothing to "
            f"evaluate (choose other --split-fractions or --seed when training)"
        )
    return rows, y_true, proba


def _test_voxels(
    store: Predictions, where: Path, r: Raster, table: ClassTable, test_z: Sequence[int], mask: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """True and predicted classes ``(N,)`` int16 of the labelled voxels of the test z indices (and of
    ``mask``, the test blocks under block splits), read in z-slabs of the prediction chunks."""
    if table.level not in r.labels:
        raise InputError(
            f"{r.path}: no labels/{table.level} volume to score regions against; rasterize with --labels {table.level}"
        )
    truth = r.labels[table.level].data
    pred = store.label_image
    lut = table.label_lookup()
    depth = pred.chunks[0]
    ys, ps = [], []
    for a, b in z_blocks(test_z):
        for z0 in range(a, b, depth):
            z1 = min(z0 + depth, b)
            t = lut[np.asarray(truth[z0:z1]).astype(np.int64)]
            p = np.asarray(pred[z0:z1]).astype(np.int64) - 1
            keep = t >= 0 if mask is None else (t >= 0) & mask[z0:z1]
            if (p[keep] < 0).any():
                raise InputError(
                    f"{where}: {int((p[keep] < 0).sum())} labelled voxels of z {z0}..{z1 - 1} "
                    f"have no prediction; predict the whole raster again"
                )
            ys.append(t[keep].astype(np.int16))
            ps.append(p[keep].astype(np.int16))
    y_true = np.concatenate(ys)
    if not y_true.size:
        raise InputError(
            f"{r.path}: the test z indices {list(test_z)} hold no voxel labelled with a "
            f"{table.level!r} class; nothing to evaluate"
        )
    return y_true, np.concatenate(ps)


# ----------------------------------------------------------------------------------------------- windows
@dataclass(frozen=True)
class _Window:
    """A test window: the input box of ``size`` voxels read at ``lo`` (z, y, x; zero outside the volume and
    outside the z range ``block``), and the evaluated core of ``core`` voxels at ``core_lo`` (volume frame)
    inside it. ``block``: the test z-block the window lies in (2D: its z-plane), read on its own exactly as
    ``abc-pipeline predict`` reads it."""

    lo: tuple[int, int, int]
    size: tuple[int, int, int]
    core_lo: tuple[int, int, int]
    core: tuple[int, int, int]
    block: tuple[int, int]

    def crop(self, dim: int) -> tuple[slice, ...]:
        """The core within the box, over the ``dim`` model axes."""
        out = tuple(slice(c - b, c - b + n) for c, b, n in zip(self.core_lo, self.lo, self.core))
        return out[3 - dim :]

    def describe(self) -> dict:
        return {
            "box_lo": list(self.lo),
            "box_size": list(self.size),
            "core_lo": list(self.core_lo),
            "core_size": list(self.core),
            "block": list(self.block),
        }


def _windows(
    r: Raster,
    test_z: Sequence[int],
    dim: int,
    spacing: Sequence[float],
    size: int,
    depth: int,
    margin: Sequence[int],
    n: int,
) -> list[_Window]:
    """Up to ``n`` test windows of one common box size, evenly spaced along z among the test slabs that hold
    cells (2D: the test z-planes; 3D: runs of ``depth`` test z indices, at most the shortest test block).

    Cores are square in-plane, as wide as the largest tissue bounding box of the chosen slabs up to
    ``size``, each centred on its slab's tissue; axes the grid group permutes (equal spacing) get equal
    sizes. The box adds ``margin`` voxels per side (model axes), also along z in 3D: the network sees the
    zero planes around its test block as in prediction and training, which a box cut at the block's edge
    would not reproduce (convolution padding inside the network is not the same as zero input planes)."""
    blocks = z_blocks(test_z)
    d = 1 if dim == 2 else min(depth, *(b - a for a, b in blocks))
    slabs = [(z, z + d, a, b) for a, b in blocks for z in sorted({*range(a, b - d + 1, d), b - d})]
    per_z = dict(zip((int(z) for z in test_z), np.asarray((r.n_cells[list(test_z)] > 0).sum(axis=(1, 2)).compute())))
    slabs = [s for s in slabs if sum(per_z[z] for z in range(s[0], s[1])) > 0]
    if not slabs:
        raise InputError(f"{r.path}: the test z indices {list(test_z)} hold no cells; nothing to evaluate")
    chosen = [slabs[i] for i in np.unique(np.linspace(0, len(slabs) - 1, min(n, len(slabs))).round().astype(int))]
    boxes = []
    for a, b, _, _ in chosen:
        yy, xx = np.nonzero(np.asarray((r.n_cells[a:b] > 0).any(axis=0).compute()))
        boxes.append((int(yy.min()), int(yy.max()), int(xx.min()), int(xx.max())))
    side = int(min(size, max(max(y1 - y0, x1 - x0) + 1 for y0, y1, x0, x1 in boxes)))
    z_turns = dim == 3 and spacing[0] in spacing[1:]
    m = (0, *margin) if dim == 2 else tuple(margin)
    core = (side if z_turns else d, side, side)
    out = []
    for (a, b, block_lo, block_hi), (y0, y1, x0, x1) in zip(chosen, boxes):
        core_lo = (
            (a + b - 1) // 2 - side // 2 if z_turns else a,
            (y0 + y1) // 2 - side // 2,
            (x0 + x1) // 2 - side // 2,
        )
        lo = tuple(c - k for c, k in zip(core_lo, m))
        block = (a, b) if dim == 2 else (block_lo, block_hi)
        out.append(_Window(lo, tuple(c + 2 * k for c, k in zip(core, m)), core_lo, core, block))
    return out


def _read_box(volume: zarr.Array, lo: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """The box ``lo .. lo + size`` (z, y, x; may reach outside) of a label volume as int64, 0 outside it."""
    out = np.zeros(tuple(size), dtype=np.int64)
    overlap = clip_box(lo, size, volume.shape)
    if overlap is not None:
        out[overlap[1]] = volume[overlap[0]]
    return out


def _read_windows(
    run: EvaluatedRun, scoring: _Scoring, boxes: Sequence[_Window], cache_bytes: int
) -> tuple[torch.Tensor, list, np.ndarray]:
    """The input windows ``(n, C, *box)`` (model axes; zero outside the test split, each z-block read on its own
    as prediction reads it), their targets and the stored predictions for them (:meth:`_Scoring.window_targets`)."""
    r, dim = run.raster, run.dim
    normalizer, mask = Normalizer.from_dict(run.atlas["normalizer"]), split_mask(run.splits, "test", r.grid.shape)
    readers = {
        w.block: RasterReader(
            r, normalizer, list(range(*w.block)), *scoring.label_target, cache_bytes=cache_bytes, mask=mask
        )
        for w in boxes
    }
    windows = [readers[w.block].window(w.lo, w.size) for w in boxes]
    x = torch.from_numpy(np.stack([w[:, 0] if dim == 2 else w for w in windows]))
    return (x, *scoring.window_targets(r, run.store, boxes, readers, dim))


def _window_cells(
    r: Raster, boxes: Sequence[_Window], rows: np.ndarray, labels: np.ndarray, dim: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per window: the box coordinates ``(n, dim)`` (model axes) and the rows of ``labels`` (``(N,)`` or
    ``(N, k)``, aligned with ``rows``) of the scored test cells whose voxel lies in the core."""
    voxels = np.concatenate(
        [
            np.asarray(r.voxel_index.get_orthogonal_selection((rows[s : s + _CELL_CHUNK], slice(None))))
            for s in range(0, len(rows), _CELL_CHUNK)
        ]
    ).astype(np.int64)
    out = []
    for w in boxes:
        lo, hi = np.asarray(w.core_lo), np.asarray(w.core_lo) + np.asarray(w.core)
        inside = ((voxels >= lo) & (voxels < hi)).all(axis=1)
        local = voxels[inside] - np.asarray(w.lo)
        out.append((local[:, 3 - dim :], labels[inside]))
    return out


# ----------------------------------------------------------------------------------------------- symmetries
def _symmetry_scores(
    logits: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    boxes: Sequence[_Window],
    targets: Sequence,
    group: Sequence[GridSymmetry],
    names: Sequence[str],
    task: AtlasTask,
    scoring: _Scoring,
    dim: int,
    batch_size: int,
    stored: np.ndarray,
) -> dict:
    """Every scalar metric of ``task.symmetry_metrics`` for each ``g`` in ``group`` (identity first): the
    windows ``x`` ``(n, C, *box)`` are transformed by ``g``, predicted, and the class scores transformed
    back by ``g^-1``, then scored by ``scoring`` (:meth:`_Scoring.score_windows`) on the windows' test
    cells (``targets`` = (box coordinates, labels) per window) or on the labelled voxels of the cores
    (``targets`` = core label maps).
    Per metric: ``identity``, ``mean``, ``worst``, ``worst_symmetry`` and ``per_symmetry``. Several group
    elements share a forward pass of at most ``batch_size`` windows.

    ``stored``: the classes ``predictions.zarr`` holds for the same cells / core voxels (in ``targets``
    order); ``identity_agreement`` is the fraction of the scored ones where the windows' identity prediction
    equals it (1 for the patch classifier; close to 1 for a U-Net, whose output also depends on where the
    tile starts relative to its pooling grid). A low value means the windows do not reproduce prediction."""
    y = scoring.window_labels(targets)
    n = int((y >= 0).sum())
    if not n:
        raise InputError("the test windows hold no labelled cell/voxel; give more --windows or a larger --window-size")
    per: dict[str, dict[str, float]] = {m: {} for m in task.symmetry_metrics}
    step = max(1, batch_size // len(x))  # group elements per forward pass
    agreement = math.nan
    for i in range(0, len(group), step):
        gs = group[i : i + step]
        out = logits(torch.cat([transform(x, g) for g in gs])).split(len(x))
        for g, back in zip(gs, out):
            pred, scores = scoring.score_windows(transform(back, g.inverse()), y, boxes, targets, names, dim)
            for m, values in per.items():
                values[str(g)] = float(scores[m])
            if g is group[0]:
                scored = y >= 0
                agreement = float((pred[scored] == stored[scored]).mean())
    metrics = {}
    for m, values in per.items():
        worst = min(values, key=lambda k: -math.inf if math.isnan(values[k]) else values[k])
        metrics[m] = {
            "identity": values[str(group[0])],
            "mean": float(np.mean(list(values.values()))),
            "worst": values[worst],
            "worst_symmetry": worst,
            "per_symmetry": values,
        }
    return {
        "metrics": metrics,
        "n": n,
        "unit": scoring.unit,
        "group_size": len(group),
        "identity_agreement": agreement,
    }


# ----------------------------------------------------------------------------------------------- figures
def _network_figures(run: EvaluatedRun, symmetry: dict, curve: dict, any_angle: dict, tmp: Path) -> list[Path]:
    """The figures of a network's evaluation beyond :meth:`EvaluatedRun.figures`, in ``tmp``:
    ``training_curves.png`` (when ``history.tsv`` lies next to the checkpoint), ``any_angle.png`` (with
    ``any_angle`` scores), ``equivariance_curve.png`` and ``orientation.png`` (the headline symmetry metric)."""
    name, title, headline = run.model_name, run.title, run.task.symmetry_metrics[0]
    figures = []
    history = run.checkpoint.parent / "history.tsv"
    if history.is_file():
        figures.append(plots.training_curves_figure(history, tmp / "training_curves.png", title=title))
    else:
        log.warning("no %s next to the checkpoint: no training curves", history)
    if any_angle:
        figures.append(any_angle_plot(name, title, any_angle, tmp / "any_angle.png"))
    figures.append(
        plots.equivariance_curve_figure(
            {name: (curve["angles"], curve["agreement"])},
            tmp / "equivariance_curve.png",
            title=f"Equivariance: {title}",
        )
    )
    head = symmetry["metrics"][headline]
    figures.append(
        plots.orientation_bar_figure(
            {name: (head["identity"], head["worst"])},
            tmp / "orientation.png",
            metric=headline,
            title=f"{title}: {symmetry['n']} test {symmetry['unit']} as is vs worst grid orientation",
        )
    )
    return figures


def _maps_figure(
    store: Predictions, r: Raster, table: ClassTable, test_z: Sequence[int], dim: int, n: int, path: Path
) -> Path:
    """True vs predicted label maps (value = class + 1, 0 = none) of ``n`` test z-planes with cells, evenly
    spaced (the sections of a 2D raster, z-slices of a 3D one)."""
    counts = np.asarray((r.n_cells[list(test_z)] > 0).sum(axis=(1, 2)).compute())
    zs = [int(z) for z, c in zip(test_z, counts) if c > 0]
    zs = [zs[i] for i in np.unique(np.linspace(0, len(zs) - 1, min(max(n, 1), len(zs))).round().astype(int))]
    lut = table.label_lookup() + 1
    truth = r.labels[table.level].data
    pred = store.label_image
    true_maps = [lut[np.asarray(truth[z]).astype(np.int64)] for z in zs]
    pred_maps = [np.asarray(pred[z]).astype(np.int64) for z in zs]
    kind = "section" if dim == 2 else "z-slice"
    return plots.region_maps_figure(
        true_maps,
        pred_maps,
        table.names,
        table.colors,
        [f"test {kind} z={z}" for z in zs],
        path,
        spacing=float(r.grid.voxel_size[-1]) * 1000.0,
    )


# ----------------------------------------------------------------------------------------------- table
def write_metrics(result: dict, folder: Path) -> None:
    """``metrics.json`` (``result``) and ``metrics.tsv`` (:func:`_metrics_table`) in ``folder``."""
    write_json(result, folder / "metrics.json")
    _metrics_table(result).to_csv(folder / "metrics.tsv", sep="\t", index=False, float_format="%.6g")


def _metrics_table(result: dict) -> pd.DataFrame:
    """One row per metric: ``scope`` (``test``, ``symmetry_identity`` / ``_mean`` / ``_worst``,
    ``equivariance_curve``), ``metric`` (per-class values as ``<metric>/<class>``), ``value``, ``detail``
    (worst symmetry; voxels compared per angle)."""
    rows = []
    for key, value in result["test"].items():
        if isinstance(value, dict):
            rows += [("test", f"{key}/{name}", v, "") for name, v in value.items()]
        else:
            rows.append(("test", key, value, f"{result['n_test']} {result['test_unit']}"))
    cells = result.get("test_cells") or {}
    rows += [
        ("test_cells", key, value, f"{cells['n_cells']} cells")
        for key, value in cells.items()
        if key not in ("split", "n_cells") and not isinstance(value, dict)
    ]
    if "symmetry" in result:
        for metric, s in result["symmetry"]["metrics"].items():
            rows += [
                ("symmetry_identity", metric, s["identity"], ""),
                ("symmetry_mean", metric, s["mean"], ""),
                ("symmetry_worst", metric, s["worst"], s["worst_symmetry"]),
            ]
        rows.append(
            (
                "symmetry_identity",
                "agreement_with_predictions",
                result["symmetry"]["identity_agreement"],
                f"{result['symmetry']['n']} {result['symmetry']['unit']}",
            )
        )
    if "equivariance_curve" in result:
        curve = result["equivariance_curve"]
        rows += [
            ("equivariance_curve", f"agreement_{a:g}deg", v, f"{n} voxels")
            for a, v, n in zip(curve["angles"], curve["agreement"], curve["n"])
        ]
    angle = result.get("any_angle") or {}
    for metric, values in angle.get("metrics", {}).items():
        rows += [
            ("any_angle", f"{metric}_{a:g}deg", v, f"{angle['n_cells']} cells") for a, v in zip(angle["angles"], values)
        ]
        rows += [
            ("any_angle_mean", metric, angle["mean"][metric], ""),
            ("any_angle_worst", metric, angle["worst"][metric], f"{angle['worst_angle'][metric]:g}deg"),
        ]
    return pd.DataFrame(rows, columns=["scope", "metric", "value", "detail"])


def any_angle_plot(model: str, title: str, any_angle: dict, path: Path) -> Path:
    """``any_angle.png``: the per-cell accuracy of the rotated test sections against the angle."""
    return plots.any_angle_figure(
        {
            f"{title}: {any_angle['n_cells']} test cells": {
                model: (any_angle["angles"], any_angle["metrics"]["accuracy"])
            }
        },
        path,
    )


__all__ = ["DEFAULT_ANGLES", "EvaluatedRun", "evaluate_run", "open_run", "score_test_split", "write_metrics"]
