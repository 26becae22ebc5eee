"""Train one zoo model on an atlas raster (``abc-pipeline train``): cell types or brain regions.

Tasks:

- ``celltype``: a :class:`abc_pipeline.nn.patch.PatchClassifier` (``build_model(..., task="patch")``) on
  per-cell patches (:class:`abc_pipeline.learn.data.CellPatchDataset`) at label ``level`` (default
  ``class``); the same weights later run densely over the whole raster (``abc-pipeline predict``).
- ``region``: a U-Net (``build_model(..., task="segment")``) on tiles of the label volume ``level``
  (default ``parcellation_division``; :class:`abc_pipeline.learn.data.TileDataset`).

Section rasters train 2D models over (y, x) per section; 3D rasters 3D models with the physical voxel size
(``spacing = grid.voxel_size``, anisotropic allowed). Splits are contiguous blocks of sections / z indices
(:func:`abc_pipeline.learn.data.raster_splits`). The run directory is that of
:func:`abc_pipeline.learn.train.train`; the checkpoint's ``config["atlas"]`` records everything
``predict`` needs (raster channels, classes and colours, splits, input normalisation, sizes), and
``metrics.json`` gains ``test`` (test-split metrics: per cell for ``celltype``, per voxel for ``region``;
empty when the test fraction is 0).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from abc_pipeline.errors import InputError
from abc_pipeline.evaluate import classification_metrics, segmentation_metrics
from abc_pipeline.learn.checkpoint import write_json
from abc_pipeline.learn.data import (DEFAULT_CACHE_BYTES, CellPatchDataset, TileDataset, channel_stats, class_table,
                                     default_dim, model_spacing, raster_splits)
from abc_pipeline.learn.train import IGNORE_INDEX, pick_device, predict_proba, train
from abc_pipeline.nn import build_model
from abc_pipeline.nn.patch import check_patch_size
from abc_pipeline.raster.ome import open_raster
from abc_pipeline.raster.source import CellSource

log = logging.getLogger(__name__)

#: atlas task -> build_model task
ARCHITECTURES = {"celltype": "patch", "region": "segment"}
DEFAULT_LEVELS = {"celltype": "class", "region": "parcellation_division"}


def _sizes(value: int | Sequence[int], dim: int, what: str) -> tuple[int, ...]:
    size = (int(value),) * dim if isinstance(value, int) else tuple(int(v) for v in value)
    if len(size) != dim or min(size) < 1:
        raise InputError(f"{what} must be one positive size or {dim} of them (z y x order), got {value}")
    return size


def train_atlas_task(raster: str | Path, cells: str | Path | None, task: str, model_name: str,
                     out_dir: str | Path, *, level: str | None = None, width: int | None = None,
                     target_params: int | None = None, dim: int | str = "auto", depth: int | None = None,
                     patch_size: int | Sequence[int] = 5, tile_size: int | Sequence[int] = 64, epochs: int = 30,
                     batch_size: int = 64, lr: float = 1e-3, weight_decay: float = 1e-4, patience: int = 10,
                     seed: int = 0, split_fractions: Sequence[float] = (0.7, 0.15, 0.15),
                     max_samples_per_epoch: int | None = None, device: str = "auto", num_workers: int = 0,
                     progress: bool = True, resume: bool | str = True, cache_bytes: int = DEFAULT_CACHE_BYTES) -> dict:
    """Train ``model_name`` for ``task`` (``celltype`` | ``region``) on ``raster``; returns metrics.json.

    ``cells``: the cells.zarr the raster was made from (required for ``celltype``: the per-cell labels).
    ``dim``: ``"auto"`` (2 for section rasters, else 3), 2 (per z-plane) or 3. ``patch_size``: window
    ``P`` (odd; one per model axis or one for all) of the cell-type classifier; ``tile_size``: region
    tiles (voxels per model axis). ``max_samples_per_epoch``: cap the cells of the training (and
    validation) split to a fixed seeded subset. ``width`` / ``target_params`` / ``depth``: see
    :func:`abc_pipeline.nn.build_model`. ``cache_bytes``: z-plane cache of each dataset's raster reader.
    The rest: :func:`abc_pipeline.learn.train.train`.
    """
    if task not in ARCHITECTURES:
        raise InputError(f"task must be one of {', '.join(ARCHITECTURES)}, got {task!r}")
    r = open_raster(raster)
    level = level or DEFAULT_LEVELS[task]
    if task == "celltype" and cells is None:
        raise InputError("the celltype task needs --cells (the cells.zarr the raster was made from)")
    src = CellSource(cells) if cells is not None else None
    dim = default_dim(r) if dim == "auto" else int(dim)
    if dim not in (2, 3):
        raise InputError(f"dim must be 'auto', 2 or 3, got {dim}")
    spacing = model_spacing(r, dim)
    splits = raster_splits(r, split_fractions, seed)
    table = class_table(r, src, level)
    normalizer = channel_stats(r, splits["train"])
    arch = ARCHITECTURES[task]
    patch = check_patch_size(patch_size, dim)
    torch.manual_seed(seed)
    model = build_model(model_name, dim, normalizer.in_channels, len(table.names), arch, width=width,
                        target_params=target_params, spacing=spacing, depth=depth, patch_size=patch)
    log.info("%s: %s %dD, %d input channels, %d %s classes, width %d, %d parameters; splits (z) %s", task,
             model_name, dim, normalizer.in_channels, len(table.names), level, model.width, model.n_params, splits)
    if arch == "patch":
        def make(split: str, cap: int | None):
            return CellPatchDataset(r, src, table, split, splits, normalizer, dim, patch, model.halo,
                                    max_samples=cap, seed=seed, cache_bytes=cache_bytes)
        sizes = {"patch_size": list(patch), "halo": list(model.halo)}
    else:
        tile = _sizes(tile_size, dim, "tile_size")

        def make(split: str, cap: int | None):
            return TileDataset(r, table, split, splits, normalizer, dim, tile, cache_bytes=cache_bytes)
        sizes = {"tile_size": list(tile)}
    train_ds, val_ds = make("train", max_samples_per_epoch), make("val", max_samples_per_epoch)
    model_kwargs = {"name": model_name, "dim": dim, "in_channels": normalizer.in_channels,
                    "n_classes": len(table.names), "task": arch, "width": model.width, "spacing": list(spacing),
                    "depth": depth, "patch_size": list(patch)}
    atlas = {"task": task, "raster": str(Path(raster).resolve()), "channels": list(r.feature_channels),
             "space": r.grid.space, "grid_shape": list(r.grid.shape), "voxel_size": list(r.grid.voxel_size),
             "classes": table.to_dict(), "splits": splits, "split_fractions": [float(f) for f in split_fractions],
             "normalizer": normalizer.to_dict(), "dim": dim, "max_samples_per_epoch": max_samples_per_epoch,
             **sizes}
    result = train(model, train_ds, val_ds, out_dir, class_names=table.names, epochs=epochs, batch_size=batch_size,
                   lr=lr, weight_decay=weight_decay, seed=seed, patience=patience, device=device,
                   num_workers=num_workers, progress=progress, config={"atlas": atlas}, model_kwargs=model_kwargs,
                   resume=resume)
    test, n_test = {}, 0
    if splits["test"]:
        test_ds = make("test", None)
        dev = pick_device(device)
        n_test = len(test_ds)
        if arch == "patch":
            proba = predict_proba(model, test_ds, batch_size=batch_size, device=dev)
            test = classification_metrics(test_ds.targets.numpy(), proba.numpy(), table.names)
        else:
            test = _segment_test(model, test_ds, table.names, batch_size, dev)
    out_dir = Path(out_dir)
    metrics = json.loads((out_dir / "metrics.json").read_text())
    metrics.update(atlas_task=task, level=level, width=model.width, splits=splits, n_test=n_test, test=test)
    write_json(metrics, out_dir / "metrics.json")
    log.info("%s %s: best epoch %d, validation %s %.3f; test %s", task, model_name, result.best_epoch,
             result.metric, result.best_score, {k: round(v, 3) for k, v in test.items() if isinstance(v, float)})
    return metrics


@torch.no_grad()
def _segment_test(model: torch.nn.Module, ds: TileDataset, class_names: Sequence[str], batch_size: int,
                  device: torch.device) -> dict:
    """Voxel-level segmentation metrics over the labelled voxels of ``ds``."""
    model.eval().to(device)
    y_true, y_pred = [], []
    for x, y in DataLoader(ds, batch_size=batch_size):
        pred = model(x.to(device)).argmax(1).cpu()
        keep = y != IGNORE_INDEX
        y_true.append(y[keep].numpy())
        y_pred.append(pred[keep].numpy())
    return segmentation_metrics(np.concatenate(y_true), np.concatenate(y_pred), class_names, ignore=IGNORE_INDEX)
