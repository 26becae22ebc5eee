"""Train one zoo model on an atlas raster (``abc-pipeline train``): cell types or brain regions.

Tasks:

- ``celltype``: by default a :class:`abc_pipeline.nn.cell_context.CellContextClassifier`
  (``architecture="cell-context"``): each cell's own expression (the raster's channels applied to the cell)
  fused with the invariant context embedding of the patch around its voxel
  (:class:`abc_pipeline.learn.cell_context.CellContextDataset`), at label ``level`` (default ``class``); or
  ``architecture="patch"``: the :class:`abc_pipeline.nn.patch.PatchClassifier` on the patch alone
  (:class:`abc_pipeline.learn.data.CellPatchDataset`). The context trunk later runs densely over the whole
  raster (``abc-pipeline predict``).
- ``region``: by default a U-Net (``architecture="segment"``) on tiles of the label volume ``level``
  (default ``parcellation_division``; :class:`abc_pipeline.learn.data.TileDataset`); or the cell-context
  classifier on each cell's own region label (``architecture="cell-context"``).

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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from abc_pipeline.cells import CellSource
from abc_pipeline.errors import InputError
from abc_pipeline.learn.cell_context import (
    CellContextDataset,
    CellSectionDataset,
    channel_plan,
    expression_stats,
    fit_linear_path,
)
from abc_pipeline.learn.checkpoint import write_json
from abc_pipeline.learn.choices import (
    CLASS_WEIGHTS,
    DEFAULT_BATCH_SIZE,
    DEFAULT_CLASS_WEIGHTS,
    DEFAULT_DEVICE,
    DEFAULT_EPOCHS,
    DEFAULT_LR,
    DEFAULT_PATCH_SIZE,
    DEFAULT_PATIENCE,
    DEFAULT_SEED,
    DEFAULT_TILE_SIZE,
    DEFAULT_WEIGHT_DECAY,
    DEFAULT_WORKERS,
)
from abc_pipeline.learn.compare import BenchTask
from abc_pipeline.learn.data import (
    DEFAULT_CACHE_BYTES,
    DEFAULT_FRACTIONS,
    DEFAULT_SPLIT_BLOCKS,
    CellPatchDataset,
    ClassTable,
    Normalizer,
    TileDataset,
    block_splits,
    channel_stats,
    class_table,
    default_dim,
    model_spacing,
    names_digest,
    raster_splits,
    split_mask,
)
from abc_pipeline.learn.inference import forward, pick_device, predict_proba
from abc_pipeline.learn.tasks import PER_CELL_ARCHITECTURES, by_name
from abc_pipeline.learn.train import IGNORE_INDEX, train
from abc_pipeline.metrics import score
from abc_pipeline.nn import build_model
from abc_pipeline.nn.patch import check_patch_size
from abc_pipeline.raster.channels import ChannelPlan, channel_definition
from abc_pipeline.raster.ome import Raster, open_raster

log = logging.getLogger(__name__)

#: sections per optimizer step when a 2D cell-context model trains on whole sections (all their cells)
SECTIONS_PER_BATCH = 2


def _sizes(value: int | Sequence[int], dim: int, what: str) -> tuple[int, ...]:
    size = (int(value),) * dim if isinstance(value, int) else tuple(int(v) for v in value)
    if len(size) != dim or min(size) < 1:
        raise InputError(f"{what} must be one positive size or {dim} of them (z y x order), got {value}")
    return size


@dataclass(frozen=True)
class AtlasData:
    """One atlas task's data on one raster: splits, classes, input normalisation and the datasets.

    ``splits``: z indices per split (:func:`abc_pipeline.learn.data.raster_splits`, the training split
    possibly thinned to ``train_sections``); ``patch`` (celltype) / ``tile`` (region): window sizes per
    model axis (tiles at most the volume); ``spacing``: physical voxel size per model axis (mm);
    ``cell_names_digest``: :func:`abc_pipeline.learn.data.names_digest` of the raster's cell names (equal to
    that of ``cells`` when given).
    """

    raster: Raster
    cells: CellSource | None
    task: str
    architecture: str
    level: str
    dim: int
    spacing: tuple[float, ...]
    splits: dict[str, list[int]]
    split_fractions: tuple[float, float, float]
    table: ClassTable
    normalizer: Normalizer
    patch: tuple[int, ...]
    tile: tuple[int, ...]
    seed: int
    cache_bytes: int
    cell_names_digest: str
    plan: ChannelPlan | None = None  # cell-context: the raster's channels applied to a cell's genes

    def dataset(self, split: str, halo: Sequence[int] = (), max_samples: int | None = None) -> Dataset:
        """Samples of ``split``: cell patches of ``patch + 2 * halo`` voxels (``halo`` = the model's,
        ``max_samples`` caps the cells to a fixed seeded subset), with each cell's own expression for the
        cell-context architecture in 3D; whole sections with all their cells and expression for the
        cell-context architecture in 2D (``max_samples`` does not apply); or label tiles (segment)."""
        if self.architecture == "cell-context" and self.dim == 2:
            return CellSectionDataset(
                self.raster,
                self.cells,
                self.table,
                split,
                self.splits,
                self.normalizer,
                self.plan,
                [p // 2 + h for p, h in zip(self.patch, halo)],
                cache_bytes=self.cache_bytes,
            )
        if self.architecture == "cell-context":
            return CellContextDataset(
                self.raster,
                self.cells,
                self.table,
                split,
                self.splits,
                self.normalizer,
                self.dim,
                self.patch,
                halo,
                self.plan,
                max_samples=max_samples,
                seed=self.seed,
                cache_bytes=self.cache_bytes,
            )
        if self.architecture == "patch":
            return CellPatchDataset(
                self.raster,
                self.cells,
                self.table,
                split,
                self.splits,
                self.normalizer,
                self.dim,
                self.patch,
                halo,
                max_samples=max_samples,
                seed=self.seed,
                cache_bytes=self.cache_bytes,
            )
        return TileDataset(
            self.raster,
            self.table,
            split,
            self.splits,
            self.normalizer,
            self.dim,
            self.tile,
            cache_bytes=self.cache_bytes,
        )

    def describe(self, halo: Sequence[int] = ()) -> dict:
        """What a run on this data records (``config["atlas"]`` of the checkpoint; what predict needs)."""
        r = self.raster
        sizes = (
            {"patch_size": list(self.patch), "halo": list(halo)}
            if self.architecture in PER_CELL_ARCHITECTURES
            else {"tile_size": list(self.tile)}
        )
        return {
            "task": self.task,
            "architecture": self.architecture,
            "raster": str(Path(r.path).resolve()),
            "channels": list(r.feature_channels),
            "channel_definition": channel_definition(r, self.cells),
            "space": r.grid.space,
            "grid_shape": list(r.grid.shape),
            "voxel_size": list(r.grid.voxel_size),
            "classes": self.table.to_dict(),
            "splits": self.splits,
            "split_fractions": list(self.split_fractions),
            "normalizer": self.normalizer.to_dict(),
            "dim": self.dim,
            "cell_names_digest": self.cell_names_digest,
            **sizes,
        }


def atlas_data(
    raster: str | Path,
    cells: str | Path | None,
    task: str,
    *,
    level: str | None = None,
    dim: int | str = "auto",
    patch_size: int | Sequence[int] = DEFAULT_PATCH_SIZE,
    tile_size: int | Sequence[int] = DEFAULT_TILE_SIZE,
    seed: int = DEFAULT_SEED,
    split_fractions: Sequence[float] = DEFAULT_FRACTIONS,
    split_blocks: int = DEFAULT_SPLIT_BLOCKS,
    train_sections: float = 1.0,
    split_block_size: float | None = None,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    architecture: str | None = None,
) -> AtlasData:
    """Open ``raster`` for ``task`` (``celltype`` | ``region``): splits, classes, normalisation.

    ``architecture``: what :func:`abc_pipeline.nn.build_model` builds (one of the task's
    :attr:`abc_pipeline.learn.tasks.AtlasTask.architectures`; default the first: ``cell-context`` for celltype,
    ``segment`` for region). ``cells``: the cells.zarr the raster
    was made from (required for per-cell architectures: the cells' labels and expression).
    ``dim``: ``"auto"`` (2 for section rasters, else 3), 2 (per z-plane) or 3. ``split_fractions`` /
    ``split_blocks`` / ``seed``: :func:`abc_pipeline.learn.data.raster_splits`. ``train_sections``: keep
    this fraction of the training split's occupied z indices (evenly spaced along z, at least one), to
    measure learning from little data; the input normalisation uses the kept ones only.
    ``split_block_size``: split whole (y, x) blocks of this many mm inside the sections instead of whole
    sections (:func:`abc_pipeline.learn.data.block_splits`; for datasets of one or a few sections).
    """
    architecture = by_name(task).architecture(architecture)
    r = open_raster(raster)
    level = level or by_name(task).default_level
    if architecture in PER_CELL_ARCHITECTURES and cells is None:
        raise InputError(
            f"the {architecture} architecture ({task}) needs --cells (the cells.zarr the raster was made from)"
        )
    src = CellSource(cells) if cells is not None else None
    digest = names_digest(r.cell_label)
    if src is not None and names_digest(src.obs_names()) != digest:
        raise InputError(
            f"{r.path} was not rasterized from {src.path}: the cell names or their order differ, so "
            f"the labels would not match the voxels. Give the cells.zarr the raster was made from, or "
            f"rasterize {src.path} again"
        )
    dim = default_dim(r) if dim == "auto" else int(dim)
    if dim not in (2, 3):
        raise InputError(f"dim must be 'auto', 2 or 3, got {dim}")
    if split_block_size is not None:
        if train_sections != 1.0:
            raise InputError("train_sections thins whole sections; it does not combine with block splits")
        splits = block_splits(r, float(split_block_size), split_fractions, seed, split_blocks)
    else:
        splits = raster_splits(r, split_fractions, seed, split_blocks)
    if train_sections != 1.0:
        splits["train"] = _thin_sections(r, splits["train"], train_sections)
    return AtlasData(
        raster=r,
        cells=src,
        task=task,
        architecture=architecture,
        level=level,
        dim=dim,
        spacing=model_spacing(r, dim),
        splits=splits,
        split_fractions=tuple(float(f) for f in split_fractions),
        table=class_table(r, src, level),
        normalizer=channel_stats(r, splits["train"], split_mask(splits, "train", r.grid.shape)),
        patch=check_patch_size(patch_size, dim),
        tile=_clamp_tile(r, _sizes(tile_size, dim, "tile_size")),
        seed=seed,
        cache_bytes=cache_bytes,
        cell_names_digest=digest,
        plan=channel_plan(r, src) if architecture == "cell-context" else None,
    )


def _loss_weights(class_weights: str, architecture: str) -> str | None:
    """``train``'s ``class_weights`` for the option ``class_weights`` (:data:`CLASS_WEIGHTS`)."""
    if class_weights == "auto":
        class_weights = "none" if architecture in PER_CELL_ARCHITECTURES else "balanced"
    return None if class_weights == "none" else class_weights


def _clamp_tile(raster: Raster, tile: tuple[int, ...]) -> tuple[int, ...]:
    """``tile`` (per model axis) cut to the volume's extent: a larger tile only adds padding (and memory)."""
    clamped = tuple(min(t, n) for t, n in zip(tile, raster.grid.shape[-len(tile) :]))
    if clamped != tile:
        log.info("tile %s is larger than the volume %s; using %s", tile, tuple(raster.grid.shape), clamped)
    return clamped


def _thin_sections(raster: Raster, z_indices: Sequence[int], fraction: float) -> list[int]:
    """``fraction`` of the occupied z indices among ``z_indices``, evenly spaced, at least one."""
    if not 0.0 < fraction <= 1.0:
        raise InputError(f"train_sections must lie in (0, 1], got {fraction}")
    z = np.asarray(sorted(z_indices), dtype=np.int64)
    occupied = np.asarray((raster.n_cells[z] > 0).any(axis=(1, 2)).compute())
    z = z[occupied]
    keep = max(1, round(fraction * len(z)))
    return z[np.unique(np.round(np.linspace(0, len(z) - 1, keep)).astype(np.int64))].tolist()


def train_atlas_task(
    raster: str | Path,
    cells: str | Path | None,
    task: str,
    model_name: str,
    out_dir: str | Path,
    *,
    level: str | None = None,
    width: int | None = None,
    target_params: int | None = None,
    dim: int | str = "auto",
    depth: int | None = None,
    patch_size: int | Sequence[int] = DEFAULT_PATCH_SIZE,
    tile_size: int | Sequence[int] = DEFAULT_TILE_SIZE,
    epochs: int = DEFAULT_EPOCHS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float = DEFAULT_LR,
    weight_decay: float = DEFAULT_WEIGHT_DECAY,
    patience: int = DEFAULT_PATIENCE,
    seed: int = DEFAULT_SEED,
    split_fractions: Sequence[float] = DEFAULT_FRACTIONS,
    split_blocks: int = DEFAULT_SPLIT_BLOCKS,
    split_block_size: float | None = None,
    max_samples_per_epoch: int | None = None,
    device: str = DEFAULT_DEVICE,
    num_workers: int = DEFAULT_WORKERS,
    progress: bool = True,
    resume: bool | str = True,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    architecture: str | None = None,
    neighborhood_radii: Sequence[float] | None = None,
    class_weights: str = DEFAULT_CLASS_WEIGHTS,
) -> dict:
    """Train ``model_name`` for ``task`` (``celltype`` | ``region``) on ``raster``; returns metrics.json.

    Data arguments: :func:`atlas_data` (``patch_size``: window ``P`` of the cell-type classifier, odd;
    ``tile_size``: region tiles, voxels per model axis). ``max_samples_per_epoch``: cap the cells of the
    training (and validation) split to a fixed seeded subset. ``width`` / ``target_params`` / ``depth`` /
    ``neighborhood_radii`` (cell-context: disc radii of the neighbourhood means, in voxels): see
    :func:`abc_pipeline.nn.build_model`. A cell-context model's linear path starts as the logistic regression
    on the training cells' own expression and neighbourhood means
    (:func:`abc_pipeline.learn.cell_context.fit_linear_path`). ``class_weights``: ``none`` (plain
    cross-entropy: per-cell accuracy, as the baselines), ``balanced`` (inverse class frequency: favours balanced
    accuracy and mean Dice) or ``auto`` (``none`` for per-cell architectures, ``balanced`` for the U-Net). The rest: :func:`abc_pipeline.learn.train.train`.
    """
    if class_weights not in CLASS_WEIGHTS:
        raise InputError(f"class_weights must be one of {', '.join(CLASS_WEIGHTS)}, got {class_weights!r}")
    data = atlas_data(
        raster,
        cells,
        task,
        level=level,
        dim=dim,
        patch_size=patch_size,
        tile_size=tile_size,
        seed=seed,
        split_fractions=split_fractions,
        split_blocks=split_blocks,
        split_block_size=split_block_size,
        cache_bytes=cache_bytes,
        architecture=architecture,
    )
    n_classes = len(data.table.names)
    torch.manual_seed(seed)
    model = build_model(
        model_name,
        data.dim,
        data.normalizer.in_channels,
        n_classes,
        data.architecture,
        width=width,
        target_params=target_params,
        spacing=data.spacing,
        depth=depth,
        patch_size=data.patch,
        neighborhood_radii=neighborhood_radii,
    )
    log.info(
        "%s: %s %dD, %d input channels, %d %s classes, width %d, %d parameters; splits (z) %s",
        task,
        model_name,
        data.dim,
        data.normalizer.in_channels,
        n_classes,
        data.level,
        model.width,
        model.n_params,
        {k: v for k, v in data.splits.items() if k != "blocks"},
    )
    halo = getattr(model, "halo", ())
    train_ds = data.dataset("train", halo, max_samples_per_epoch)
    val_ds = data.dataset("val", halo, max_samples_per_epoch)
    if isinstance(train_ds, CellSectionDataset):  # a batch of whole sections, every cell of them in the loss
        batch_size = SECTIONS_PER_BATCH
    if data.architecture == "cell-context":  # the cells' expression statistics and the raster's normalisation
        model.set_normalization(
            *expression_stats(train_ds.expression.numpy()), data.normalizer.mean, data.normalizer.std
        )
        if isinstance(train_ds, CellSectionDataset):  # the fixed neighbourhood means: once, not every epoch
            kept = [ds.keep_means(model) for ds in (train_ds, val_ds)]
            log.info("neighbourhood means kept for the training / validation cells: %s / %s", *kept)
        fit = fit_linear_path(model, train_ds, n_classes, seed=seed)  # a resumed run then loads last.pt
        log.info(
            "linear path: logistic regression on %d training cells (own expression + neighbourhood means), "
            "training accuracy %.3f",
            fit["cells"],
            fit["train_accuracy"],
        )
    atlas = {**data.describe(halo), "split_blocks": split_blocks, "max_samples_per_epoch": max_samples_per_epoch}
    result = train(
        model,
        train_ds,
        val_ds,
        out_dir,
        class_names=data.table.names,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        seed=seed,
        patience=patience,
        device=device,
        num_workers=num_workers,
        progress=progress,
        config={"atlas": atlas},
        resume=resume,
        inputs=[raster, cells],
        class_weights=_loss_weights(class_weights, data.architecture),
    )
    test, n_test = {}, 0
    if data.splits["test"]:
        test_ds = data.dataset("test", halo)
        dev = pick_device(device)
        per_cell = data.architecture in PER_CELL_ARCHITECTURES
        n_test = len(test_ds.targets) if per_cell else len(test_ds)  # cells or tiles
        if per_cell:
            proba = predict_proba(model, test_ds, batch_size=batch_size, device=dev)
            test = score(test_ds.targets.numpy(), proba.numpy(), data.table.names)
        else:
            test = _segment_test(model, test_ds, data.table.names, batch_size, dev)
    out_dir = Path(out_dir)
    metrics = json.loads((out_dir / "metrics.json").read_text())
    metrics.update(
        atlas_task=task,
        architecture=data.architecture,
        level=data.level,
        width=model.width,
        splits=data.splits,
        n_test=n_test,
        test=test,
    )
    write_json(metrics, out_dir / "metrics.json")
    log.info(
        "%s %s: best epoch %d, validation %s %.3f; test %s",
        task,
        model_name,
        result.best_epoch,
        result.metric,
        result.best_score,
        {k: round(v, 3) for k, v in test.items() if isinstance(v, float)},
    )
    return metrics


def atlas_task(
    raster: str | Path,
    cells: str | Path | None,
    task: str,
    *,
    depth: int | None = None,
    max_samples: int | None = None,
    **data_kwargs,
) -> BenchTask:
    """A :class:`abc_pipeline.learn.compare.BenchTask` (``abc-pipeline bench-models --raster``) for an atlas
    task; ``data_kwargs``: :func:`atlas_data` (``train_sections`` thins the training split). ``max_samples``
    caps the cells of every split (celltype) to a fixed seeded subset. The patch halo is the zoo's (every
    zoo model has the same receptive field for a given ``depth``). The comparison runs on one input tensor
    per sample: the patch classifier (celltype) and the U-Net (region), unless ``architecture`` says otherwise."""
    if data_kwargs.get("architecture") is None:
        data_kwargs["architecture"] = by_name(task).raster_architecture
    data = atlas_data(raster, cells, task, **data_kwargs)
    probe = build_model(
        "cnn",
        data.dim,
        data.normalizer.in_channels,
        len(data.table.names),
        data.architecture,
        width=1,
        spacing=data.spacing,
        depth=depth,
        patch_size=data.patch,
    )
    halo = getattr(probe, "halo", ())
    options = {"depth": depth, **({"patch_size": data.patch} if data.architecture == "patch" else {})}
    name = f"{data.task} ({data.level}) on {Path(data.raster.path).name}"
    train_sections = data_kwargs.get("train_sections", 1.0)
    if train_sections != 1.0:
        name += f", {train_sections:.0%} of training sections"
    return BenchTask(
        name=name,
        train=data.dataset("train", halo, max_samples),
        val=data.dataset("val", halo, max_samples),
        test=data.dataset("test", halo, max_samples),
        class_names=list(data.table.names),
        dim=data.dim,
        in_channels=data.normalizer.in_channels,
        objective="classify" if data.architecture == "patch" else "segment",
        head=data.architecture,
        spacing=tuple(data.spacing),
        model_options=options,
        config={"atlas": {**data.describe(halo), "train_sections": train_sections, "max_samples": max_samples}},
    )


def _segment_test(
    model: torch.nn.Module, ds: TileDataset, class_names: Sequence[str], batch_size: int, device: torch.device
) -> dict:
    """Voxel-level segmentation metrics over the labelled voxels of ``ds`` (:func:`abc_pipeline.metrics.score`)."""
    model.eval().to(device)
    y_true, y_pred = [], []
    for x, y in DataLoader(ds, batch_size=batch_size):
        pred = forward(model, x, device).argmax(1).cpu()
        keep = y != IGNORE_INDEX
        y_true.append(y[keep].numpy())
        y_pred.append(pred[keep].numpy())
    return score(np.concatenate(y_true), np.concatenate(y_pred), class_names, segment=True, ignore=IGNORE_INDEX)
