"""Any-angle evaluation: score a model per cell on test sections turned by arbitrary in-plane angles.

Real sections arrive at any in-plane rotation, not only the 90° multiples of the grid group. For each angle
(default 0-345° in 15° steps) the cells of a few test sections (``sections``, evenly spaced among the test
z indices with cells; 3D rasters: test z-blocks) have their coordinates in the raster's space rotated about
the unit's centre (a voxel corner near the centre of the cells' bounding box: 90° multiples then map voxels
exactly onto voxels), are binned onto a grid with the raster's voxel size and alignment (the rotated cells'
bounding box plus the model's context in-plane; 3D rasters keep their z indices and read ``z_halo`` zero
planes around the block, as ``abc-pipeline predict`` reads ``halo`` of them) with the rasterizer's in-memory
kernel (:func:`abc_pipeline.raster.binning.scatter_add`: channel means per voxel, cell counts), standardised
like the training input, and predicted densely; each cell reads its voxel's probabilities. Baselines are
predicted from their features on the rotated section coordinates (each section turned about its own
centre), which is how they would see a rotated section.

Scores per angle: accuracy, balanced accuracy and macro-F1 of the unit cells with a class
(:func:`abc_pipeline.metrics.classification_metrics`, the per-cell score of every model); per metric the mean
over the angles, the worst angle and its score. At 0° the binned image equals the raster's, so the 0° score
is the model's score on those sections as predicted. An exactly rotation-invariant model scores the same at
0°, 90°, 180° and 270° (its per-cell classes are identical); other angles resample the tissue, so even an
invariant model's scores move a little there.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from abc_pipeline import keys
from abc_pipeline.cells import CellSource
from abc_pipeline.errors import InputError
from abc_pipeline.learn.checkpoint import load_checkpoint, load_model
from abc_pipeline.learn.choices import DEFAULT_ANY_ANGLE_SECTIONS, DEFAULT_ANY_ANGLES, check_angles
from abc_pipeline.learn.data import ClassTable, Normalizer, z_blocks
from abc_pipeline.learn.inference import forward, pick_device
from abc_pipeline.learn.predict import DEFAULT_HALO, atlas_config, check_channels
from abc_pipeline.learn.scoring import cell_targets
from abc_pipeline.learn.tasks import PER_CELL_ARCHITECTURES, by_name
from abc_pipeline.metrics import classification_metrics
from abc_pipeline.raster import binning
from abc_pipeline.raster.channels import ChannelPlan, raster_channel_plan
from abc_pipeline.raster.grid import COORDINATE_KEYS
from abc_pipeline.raster.ome import Raster, open_raster

log = logging.getLogger(__name__)

ANY_ANGLE_METRICS = ("accuracy", "balanced_accuracy", "macro_f1")
DEFAULT_Z_HALO = 2  # zero planes around a 3D block (see any_angle_predictions)
_CELL_CHUNK = 1 << 16


def rotate_points(points: np.ndarray, centre: Sequence[float], angle: float) -> np.ndarray:
    """Points ``(n, 2)`` (``(y, x)`` in mm) turned by ``angle`` degrees about ``centre``, the direction of
    ``torch.rot90(image, 1, dims=(y, x))``; multiples of 90° use exact integer cosines and sines."""
    quarter, rest = divmod(float(angle), 90.0)
    if rest == 0.0:
        c, s = ((1, 0), (0, 1), (-1, 0), (0, -1))[int(quarter) % 4]
    else:
        c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    d = np.asarray(points, np.float64) - np.asarray(centre, np.float64)
    # rot90 of an image moves content at (y, x) to (-x, y) relative to the centre, in index order (y, x)
    return np.column_stack([c * d[:, 0] - s * d[:, 1], s * d[:, 0] + c * d[:, 1]]) + np.asarray(centre)


@dataclass
class _Unit:
    """The cells of one test section (2D) or test z-block (3D): rows in cells.zarr, local z index, raster-space
    ``(y, x)`` (mm), section coordinates ``xy`` and codes, channel values, labels; the rotation ``centre``."""

    z_range: tuple[int, int]
    rows: np.ndarray
    z: np.ndarray
    yx: np.ndarray
    xy: np.ndarray
    section: np.ndarray
    values: np.ndarray
    y: np.ndarray
    centre: np.ndarray


def _units(
    r: Raster, src: CellSource, plan: ChannelPlan, table: ClassTable, test_z: Sequence[int], dim: int, n: int
) -> list[_Unit]:
    """Up to ``n`` test units evenly spaced along z: z-planes (2D) or z-blocks (3D) of the test split with cells."""
    per_z = np.asarray((r.n_cells[list(test_z)] > 0).sum(axis=(1, 2)).compute())
    occupied = [int(z) for z, c in zip(test_z, per_z) if c > 0]
    if not occupied:
        raise InputError(f"{r.path}: the test z indices {list(test_z)} hold no cells; nothing to evaluate")
    candidates = [(z, z + 1) for z in occupied] if dim == 2 else z_blocks(occupied)
    chosen = [
        candidates[i]
        for i in np.unique(np.linspace(0, len(candidates) - 1, min(n, len(candidates))).round().astype(int))
    ]
    index = r.voxel_index
    z_all = np.concatenate([np.asarray(index[s : s + _CELL_CHUNK, 0]) for s in range(0, index.shape[0], _CELL_CHUNK)])
    unit_rows = [np.flatnonzero((z_all >= a) & (z_all < b)) for a, b in chosen]
    rows = np.unique(np.concatenate(unit_rows))
    values = _rows_of_x(src, plan, rows)
    space, section = src.coordinates(COORDINATE_KEYS[r.grid.space]), src.categorical(keys.SECTION).codes
    origin, size = np.asarray(r.grid.origin[1:]), np.asarray(r.grid.voxel_size[1:])
    out = []
    for (a, b), ur in zip(chosen, unit_rows):
        pos = np.searchsorted(rows, ur)
        yx = np.asarray(space[ur][:, [1, 0]].compute(), dtype=np.float64)
        xy = np.asarray(src.coordinates(keys.SPATIAL)[ur][:, :2].compute(), dtype=np.float64)
        mid = (yx.min(axis=0) + yx.max(axis=0)) / 2
        centre = origin + np.round((mid - origin) / size) * size  # a voxel corner: 90° turns map voxels to voxels
        out.append(
            _Unit(
                (a, b),
                ur,
                z_all[ur] - a,
                yx,
                xy,
                np.asarray(section[ur].compute()).astype(np.int32),
                values[pos],
                cell_targets(src, table.level, table.names, ur),
                centre,
            )
        )
    return out


def _rows_of_x(src: CellSource, plan: ChannelPlan, rows: np.ndarray) -> np.ndarray:
    """Channel values ``(len(rows), C)`` of the sorted ``rows``, in one pass over X in chunks of rows."""
    out = np.empty((len(rows), len(plan.names)), dtype=np.float32)
    step = max(1, _CELL_CHUNK // src.row_chunk) * src.row_chunk
    for s in range(0, src.n_cells, step):
        lo, hi = np.searchsorted(rows, [s, s + step])
        if hi > lo:
            block = src.read_X(s, min(src.n_cells, s + step))
            out[lo:hi] = plan.apply(block[rows[lo:hi] - s])
    return out


def _image(
    unit: _Unit,
    yx: np.ndarray,
    normalizer: Normalizer,
    size: np.ndarray,
    margin: int,
    margin_z: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Bin the unit's cells at ``yx`` (mm) on the raster's voxel size, aligned with the voxel corner
    ``unit.centre``, over their bounding box plus ``margin`` voxels in-plane: the model input
    ``(C_in, Z, Y, X)`` (``Z`` = the unit's z indices plus ``margin_z`` zero planes per side) and each cell's
    voxel ``(n, 3)`` in it. A 90° turn of ``yx`` about the centre turns the image exactly (``torch.rot90``)."""
    index = np.floor((yx - unit.centre) / size).astype(np.int64)  # voxels relative to the centre corner
    lo = index.min(axis=0) - margin
    iyx = index - lo
    ny, nx = (index.max(axis=0) + margin + 1 - lo).tolist()
    depth = unit.z_range[1] - unit.z_range[0]
    flat = (unit.z * ny + iyx[:, 0]) * nx + iyx[:, 1]
    sums = np.zeros((depth * ny * nx, unit.values.shape[1]), dtype=np.float32)
    binning.scatter_add(sums, flat, unit.values)
    counts = np.bincount(flat, minlength=depth * ny * nx).astype(np.float32)
    raw = np.concatenate([(sums / np.maximum(counts, 1)[:, None]).T, counts[None]]).reshape(-1, depth, ny, nx)
    x = normalizer.apply(raw)
    if margin_z:
        x = np.pad(x, ((0, 0), (margin_z, margin_z), (0, 0), (0, 0)))
    return x, np.column_stack([unit.z + margin_z, iyx])


@torch.no_grad()
def any_angle_predictions(
    checkpoint: str | Path,
    raster: str | Path,
    cells: str | Path,
    *,
    angles: Sequence[float] = DEFAULT_ANY_ANGLES,
    sections: int = DEFAULT_ANY_ANGLE_SECTIONS,
    halo: int = DEFAULT_HALO,
    z_halo: int = DEFAULT_Z_HALO,
    device: str = "auto",
) -> dict:
    """Per-cell class probabilities of the model of ``checkpoint`` (network or baseline) on its test sections
    of ``raster`` rotated by each of ``angles`` (see the module docstring).

    ``sections``: test units (2D: sections, 3D: z-blocks); ``halo``: in-plane context of a U-Net (patch
    classifiers use their receptive field); ``z_halo``: zero planes around a 3D block along z (at most the
    model's context; ``predict`` reads ``halo`` = 16, which makes a one-section block a 33-plane pass: two
    planes keep the pass about 6x cheaper and change the scores little). Returns ``{"angles", "rows" (n,) cells.zarr rows, "y" (n,)
    class index (-1: none), "proba" (n_angles, n, K) float32, "units": [...]}``.
    """
    from abc_pipeline.learn.baselines import (
        SectionNeighbours,
        cell_features,
        load_baseline,
    )
    from abc_pipeline.learn.choices import is_baseline

    angles = check_angles(angles)
    if isinstance(sections, bool) or not isinstance(sections, (int, np.integer)) or sections < 1:
        raise InputError(f"--any-angle-sections must be a positive whole number of test sections, got {sections!r}")
    ckpt = load_checkpoint(checkpoint)
    baseline = is_baseline(ckpt["model_name"])
    atlas = atlas_config(ckpt, checkpoint)
    r = open_raster(raster)
    check_channels(atlas, r.path, r.feature_channels, checkpoint)
    src = CellSource(cells)
    if src.n_cells != r.voxel_index.shape[0]:
        raise InputError(
            f"{src.path} has {src.n_cells} cells but {r.path} indexes {r.voxel_index.shape[0]}; give the "
            f"cells.zarr the raster was made from"
        )
    test_z = [int(z) for z in atlas["splits"].get("test", [])]
    if not test_z:
        raise InputError(f"{checkpoint}: the run has no test split; retrain with a positive test fraction")
    table, dim = ClassTable.from_dict(atlas["classes"]), int(atlas["dim"])
    plan = raster_channel_plan(src, r.feature_channels, r.pca)
    units = _units(r, src, plan, table, test_z, dim, sections)
    k = len(table.names)
    proba = np.zeros((len(angles), sum(len(u.rows) for u in units), k), dtype=np.float32)
    if baseline:
        model, _ = load_baseline(checkpoint)
    else:
        dev = pick_device(device)
        net, _ = load_model(checkpoint, dev)
        normalizer = Normalizer.from_dict(atlas["normalizer"])
        architecture = by_name(atlas["task"]).recorded_architecture(atlas)
        dense = architecture in PER_CELL_ARCHITECTURES
        margin = tuple(net.margin) if dense else (int(halo),) * dim
        size = np.asarray(r.grid.voxel_size[1:])
    for a, angle in enumerate(angles):
        start = 0
        for u in units:
            n = len(u.rows)
            if baseline:
                xy = u.xy.copy()
                for code in np.unique(u.section[u.section >= 0]):
                    at = u.section == code
                    mid = (u.xy[at].min(axis=0) + u.xy[at].max(axis=0)) / 2
                    xy[at] = rotate_points(u.xy[at], mid, angle)
                neighbours = (
                    SectionNeighbours(xy, u.section, model.neighbors, key="neighbors (of the checkpoint)")
                    if model.kind == "neighborhood"
                    else None
                )
                proba[a, start : start + n] = model.proba(cell_features(model.kind, np.arange(n), u.values, neighbours))
            else:
                x, vox = _image(
                    u,
                    rotate_points(u.yx, u.centre, angle),
                    normalizer,
                    size,
                    max(margin[-2:]),
                    min(margin[0], z_halo) if dim == 3 else 0,
                )
                inp = torch.from_numpy(x[:, 0] if dim == 2 else x)[None].to(dev)
                at = (slice(None), vox[:, 1], vox[:, 2]) if dim == 2 else (slice(None), *vox.T)
                if architecture == "cell-context" and dim == 2:  # the section carries the whole margin in-plane:
                    # each cell's logits from one pass (the trunk on the section less the discs' extra margin)
                    image_voxel = np.column_stack([np.zeros(n, dtype=np.int64), vox[:, 1:]])
                    inputs = (inp, torch.from_numpy(u.values), torch.from_numpy(image_voxel))
                    proba[a, start : start + n] = torch.softmax(forward(net, inputs, dev), dim=1).cpu().numpy()
                elif architecture == "cell-context":  # 3D blocks with z_halo planes: the dense context at each cell

                    def cells(image: torch.Tensor, expression: torch.Tensor, at: tuple = at) -> torch.Tensor:
                        return net.cell_logits(net.context_dense(image)[0][at].T, expression)

                    logits = forward(cells, (inp, torch.from_numpy(u.values)), dev)
                    proba[a, start : start + n] = torch.softmax(logits, dim=1).cpu().numpy()
                else:
                    logits = forward(net.forward_dense if dense else net, inp, dev)
                    p = torch.softmax(logits, dim=1)[0].cpu().numpy()  # (K, *spatial)
                    proba[a, start : start + n] = p[at].T
            start += n
    return {
        "angles": list(angles),
        "rows": np.concatenate([u.rows for u in units]),
        "y": np.concatenate([u.y for u in units]),
        "proba": proba,
        "units": [{"z": list(u.z_range), "cells": len(u.rows), "centre_mm": u.centre.tolist()} for u in units],
    }


def any_angle_scores(checkpoint: str | Path, raster: str | Path, cells: str | Path, **kwargs) -> dict:
    """Per-cell scores (:data:`ANY_ANGLE_METRICS`) at every angle of :func:`any_angle_predictions` (same
    arguments): ``{"angles", "metrics": {metric: [score per angle]}, "mean", "worst", "worst_angle" (per
    metric), "n_cells", "units"}``."""
    pred = any_angle_predictions(checkpoint, raster, cells, **kwargs)
    keep = pred["y"] >= 0
    if not keep.any():
        raise InputError(f"{raster}: the any-angle test sections hold no cell with a class; give more sections")
    table = ClassTable.from_dict(atlas_config(load_checkpoint(checkpoint), checkpoint)["classes"])
    per = {m: [] for m in ANY_ANGLE_METRICS}
    for p in pred["proba"]:
        scores = classification_metrics(pred["y"][keep], p[keep], table.names)
        for m in ANY_ANGLE_METRICS:
            per[m].append(float(scores[m]))
    worst = {m: int(np.argmin(v)) for m, v in per.items()}
    return {
        "angles": pred["angles"],
        "metrics": per,
        "mean": {m: float(np.mean(v)) for m, v in per.items()},
        "worst": {m: per[m][i] for m, i in worst.items()},
        "worst_angle": {m: pred["angles"][i] for m, i in worst.items()},
        "n_cells": int(keep.sum()),
        "units": pred["units"],
    }


__all__ = [
    "ANY_ANGLE_METRICS",
    "DEFAULT_ANY_ANGLES",
    "DEFAULT_ANY_ANGLE_SECTIONS",
    "any_angle_predictions",
    "any_angle_scores",
    "check_angles",
    "rotate_points",
]
