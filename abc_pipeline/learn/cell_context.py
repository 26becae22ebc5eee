"""Data of the cell-context classifier (:class:`abc_pipeline.nn.cell_context.CellContextClassifier`): each
cell's own expression in the raster's channel definition, its statistics, the per-cell dataset and the
per-cell prediction pass of ``abc-pipeline predict``.

- :func:`channel_plan`: the raster's channels as a :class:`abc_pipeline.raster.channels.ChannelPlan` over
  the genes of cells.zarr (gene channels by symbol, or the PCA stored in the raster: ``(x - mean) @ C.T``),
  so a cell's values are exactly what the rasterizer averaged into its voxel.
- :func:`cell_expression`: those values for given cells, read X chunk by chunk (only chunks holding them).
- :class:`CellContextDataset`: :class:`abc_pipeline.learn.data.CellPatchDataset` plus each cell's expression:
  samples ``((patch, expression), target)``; :class:`CellSectionDataset`: whole sections with all their
  cells (2D training: one dense pass per section, the loss at every cell position), and their fixed
  neighbourhood means once computed (:meth:`CellSectionDataset.keep_means`).
- :func:`fit_linear_path`: the logistic regression on each training cell's own expression and neighbourhood
  means that the model's linear path starts from.
- :func:`predict_cells`: per-cell probabilities from the dense context gathered at each cell's voxel and the
  cell's own expression, in chunks of cells (bounded memory).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
import zarr
from sklearn.linear_model import LogisticRegression
from torch.utils.data import DataLoader, Dataset

from abc_pipeline.cells import CellSource
from abc_pipeline.errors import InputError
from abc_pipeline.learn.data import DEFAULT_CACHE_BYTES, CellPatchDataset, ClassTable, Normalizer
from abc_pipeline.learn.inference import forward
from abc_pipeline.raster.channels import ChannelPlan, raster_channel_plan
from abc_pipeline.raster.ome import Raster

log = logging.getLogger(__name__)

_CELL_CHUNK = 1 << 16  # cells per pass of predict_cells
#: training cells the linear path's logistic regression is fitted on, at most (a seeded random subset)
LINEAR_FIT_CELLS = 200_000
#: bytes of neighbourhood means a :class:`CellSectionDataset` keeps, at most (float32, ``(F + 1) * R`` per cell:
#: ~660 bytes with 32 channels and 5 discs, so 1 GiB holds 1.6 M cells); a larger split computes them every pass
MEANS_CACHE_BYTES = 1 << 30


def channel_plan(raster: Raster, cells: CellSource) -> ChannelPlan:
    """The raster's feature channels as a plan over the genes of ``cells`` (the raster's cells.zarr)."""
    return raster_channel_plan(cells, raster.feature_channels, raster.pca)


def cell_expression(cells: CellSource, plan: ChannelPlan, rows: np.ndarray) -> np.ndarray:
    """``(len(rows), F)`` float32 channel values of the cells ``rows`` (ascending row numbers of cells.zarr),
    read one X chunk at a time (chunks without a requested row are skipped)."""
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size and (np.any(np.diff(rows) < 0) or rows[0] < 0 or rows[-1] >= cells.n_cells):
        raise InputError(f"cell rows must be ascending within 0..{cells.n_cells - 1}")
    out = np.empty((rows.size, len(plan.names)), dtype=np.float32)
    step = cells.row_chunk
    chunk_of = rows // step
    bounds = np.flatnonzero(np.r_[True, chunk_of[1:] != chunk_of[:-1], True]) if rows.size else []
    for a, b in zip(bounds[:-1], bounds[1:]):
        lo = int(chunk_of[a]) * step
        x = cells.read_X(lo, min(lo + step, cells.n_cells))
        out[a:b] = plan.apply(x[rows[a:b] - lo])
    return out


def expression_stats(expression: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std ``(F,)`` float64 of ``(N, F)`` values (std below 1e-6 -> 1)."""
    x = np.asarray(expression, dtype=np.float64)
    mean, std = x.mean(axis=0), x.std(axis=0)
    return mean, np.where(std < 1e-6, 1.0, std)


class CellContextDataset(Dataset):
    """:class:`CellPatchDataset` samples with each cell's own channel values: ``((patch, expression), target)``
    with ``patch`` ``(C_in, *(P + 2*halo))`` and ``expression`` ``(F,)`` float32 (raw channel values; the model
    standardises them). Attributes ``targets``, ``cells``, ``voxels`` and ``expression`` ``(N, F)``."""

    def __init__(
        self,
        raster: Raster,
        cells: CellSource,
        table: ClassTable,
        split: str,
        splits: dict[str, Sequence[int]],
        normalizer: Normalizer,
        dim: int,
        patch_size: Sequence[int],
        halo: Sequence[int],
        plan: ChannelPlan,
        *,
        max_samples: int | None = None,
        seed: int = 0,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        self.patches = CellPatchDataset(
            raster,
            cells,
            table,
            split,
            splits,
            normalizer,
            dim,
            patch_size,
            halo,
            max_samples=max_samples,
            seed=seed,
            cache_bytes=cache_bytes,
        )
        self.targets, self.cells, self.voxels = self.patches.targets, self.patches.cells, self.patches.voxels
        self.expression = torch.from_numpy(cell_expression(cells, plan, self.cells))

    def __len__(self) -> int:
        return len(self.patches)

    def __getitem__(self, i: int) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        patch, target = self.patches[i]
        return (patch, self.expression[i]), target


class CellSectionDataset(Dataset):
    """Whole z-planes (sections) of one split with every labelled cell of them, for 2D cell-context models: one
    dense pass per section gives every cell's context (``CellContextClassifier.forward(images, expression,
    cells)``), instead of one patch per cell.

    Sample ``i`` (the ``i``-th plane of the split holding labelled cells): ``((plane (C_in, Y + 2 m, X + 2 m),
    voxels (n, 2) int64 (y, x) in it, expression (n, F)), targets (n,))``, the plane read with ``margin`` = ``m``
    (the model's, per axis) zero voxels around it, so every cell's context equals its zero-padded patch's; after
    :meth:`keep_means` a fourth input, the cells' neighbourhood means ``(n, (F + 1) * R)``. :meth:`collate` (the
    ``DataLoader``'s ``collate_fn``) stacks planes and prefixes each cell's voxel with its plane's position in the
    batch: the inputs of ``CellContextClassifier.forward(images, expression, cells[, means])``. Attributes
    ``targets`` / ``cells`` / ``expression``: all cells, plane by plane (the order of the samples); ``means``: None
    or ``(N, (F + 1) * R)``."""

    def __init__(
        self,
        raster: Raster,
        cells: CellSource,
        table: ClassTable,
        split: str,
        splits: dict[str, Sequence[int]],
        normalizer: Normalizer,
        plan: ChannelPlan,
        margin: Sequence[int],
        *,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        base = CellPatchDataset(
            raster, cells, table, split, splits, normalizer, 2, (1, 1), (0, 0), cache_bytes=cache_bytes
        )
        self.reader, self.margin = base.reader, tuple(int(m) for m in margin)
        self.size = (1, *(n + 2 * m for n, m in zip(raster.grid.shape[1:], self.margin)))
        expression = cell_expression(cells, plan, base.cells)
        order = np.argsort(base.voxels[:, 0], kind="stable")
        self.cells, self.voxels = base.cells[order], base.voxels[order] + np.array([0, *self.margin])
        self.targets, self.expression = base.targets[order], torch.from_numpy(expression[order])
        self.planes, starts = np.unique(self.voxels[:, 0], return_index=True)
        self.bounds = np.append(starts, len(self.cells))
        self.means: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.planes)

    def __getitem__(self, i: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        rows = slice(int(self.bounds[i]), int(self.bounds[i + 1]))
        z = int(self.planes[i])
        plane = torch.from_numpy(self.reader.window((z, -self.margin[0], -self.margin[1]), self.size)[:, 0])
        inputs = (plane, torch.from_numpy(self.voxels[rows, 1:]), self.expression[rows])
        return inputs + ((self.means[rows],) if self.means is not None else ()), self.targets[rows]

    @torch.no_grad()
    def keep_means(self, model, max_bytes: int = MEANS_CACHE_BYTES) -> bool:
        """Compute every cell's neighbourhood means once, plane by plane, with ``model`` (a
        ``CellContextClassifier``; the means are fixed, nothing in them is learned) and hand them out with the
        samples from now on, when they fit in ``max_bytes`` (float32). Returns whether they are kept."""
        if model.neighborhood is None or len(self.cells) * model.neighborhood.out_channels * 4 > max_bytes:
            return False
        device = next(model.parameters()).device
        parts = []
        for i in range(len(self)):
            (plane, voxels, _), _ = self[i]
            cells = torch.cat([torch.zeros(len(voxels), 1, dtype=torch.int64), voxels], dim=1)
            parts.append(forward(model.neighborhood_at, (plane[None], cells), device).cpu())
        self.means = torch.cat(parts)
        return True

    @staticmethod
    def collate(batch: list) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """Planes stacked ``(B, C_in, Y, X)``, expression ``(N, F)``, cells ``(N, 3)`` (plane in batch, y, x)
        and, when kept, the means ``(N, (F + 1) * R)``; targets ``(N,)``."""
        planes = torch.stack([x[0] for x, _ in batch])
        cells = torch.cat(
            [
                torch.cat([torch.full((len(x[1]), 1), b, dtype=torch.int64), x[1]], dim=1)
                for b, (x, _) in enumerate(batch)
            ]
        )
        inputs = (planes, torch.cat([x[2] for x, _ in batch]), cells)
        if len(batch[0][0]) == 4:
            inputs += (torch.cat([x[3] for x, _ in batch]),)
        return inputs, torch.cat([y for _, y in batch])


@torch.no_grad()  # not inference mode: the moment layers cache their kernel bases for the training after it
def fit_linear_path(
    model, train_ds: Dataset, n_classes: int, *, c: float = 1.0, max_cells: int = LINEAR_FIT_CELLS, seed: int = 0
) -> dict:
    """Fit a logistic regression (scikit-learn, ``C = c``, unweighted) on the training cells' linear-path
    inputs (:meth:`CellContextClassifier.linear_inputs`: standardised own expression + neighbourhood means)
    and load it into ``model``'s linear path (:meth:`CellContextClassifier.set_linear_path`), so training
    starts from that classifier. ``train_ds``: a :class:`CellSectionDataset` or :class:`CellContextDataset`;
    the model's normalisation must be set. At most ``max_cells`` cells (a seeded random subset, drawn batch by
    batch, so memory stays bounded by it). Classes absent from the training cells get weight 0 and bias
    -10. Returns ``{"cells": n, "train_accuracy": a}``."""
    model.eval()
    rng = np.random.default_rng(seed)
    keep_fraction = min(1.0, max_cells / max(1, len(train_ds.targets)))
    sections = isinstance(train_ds, CellSectionDataset)
    loader = DataLoader(train_ds, batch_size=2 if sections else 256, collate_fn=getattr(train_ds, "collate", None))
    device = next(model.parameters()).device
    features, labels = [], []
    for x, y in loader:
        image, expression, *where = x  # where: () for patches; (cells,) or (cells, means) for sections
        keep = (y >= 0).numpy() & (rng.random(len(y)) < keep_fraction)
        context = model.cell_context(image.to(device), *(t.to(device) for t in where))
        features.append(model.linear_inputs(context, expression.to(device))[torch.from_numpy(keep)].cpu().numpy())
        labels.append(y.numpy()[keep])
    x, y = np.concatenate(features), np.concatenate(labels)
    if len(np.unique(y)) < 2:
        raise InputError("the training cells hold fewer than two classes; choose another level or more sections")
    fit = LogisticRegression(C=c, max_iter=1000).fit(x, y)
    weight = np.zeros((n_classes, x.shape[1]), dtype=np.float32)
    bias = np.full(n_classes, -10.0, dtype=np.float32)
    weight[fit.classes_], bias[fit.classes_] = fit.coef_, fit.intercept_
    if len(fit.classes_) == 2:  # scikit-learn's binary case: one row for the second class
        weight[fit.classes_] = np.stack([-fit.coef_[0] / 2, fit.coef_[0] / 2])
        bias[fit.classes_] = np.array([-fit.intercept_[0] / 2, fit.intercept_[0] / 2])
    model.set_linear_path(weight, bias)
    return {"cells": len(y), "train_accuracy": float(fit.score(x, y))}


def predict_cells(
    model,
    context: zarr.Array,
    raster: Raster,
    cells: CellSource,
    plan: ChannelPlan,
    cell_proba: zarr.Array,
    cell_pred: zarr.Array,
    device: torch.device,
) -> None:
    """Per-cell probabilities of a cell-context model: ``context`` ``(context_channels, z, y, x)`` (the dense
    context of every voxel) gathered at each cell's voxel, fused with the cell's own expression; written
    to ``cell_proba`` ``(n_cells, K)`` (NaN rows: no voxel) and ``cell_pred`` ``(n_cells,)`` (-1: no voxel),
    ``_CELL_CHUNK`` cells at a time."""
    index = raster.voxel_index
    n, k = index.shape[0], cell_proba.shape[1]
    channels = np.arange(context.shape[0])[:, None]
    for s in range(0, n, _CELL_CHUNK):
        vox = np.asarray(index[s : s + _CELL_CHUNK]).astype(np.int64)
        ok = vox[:, 0] >= 0
        p = np.full((len(vox), k), np.nan, dtype=np.float32)
        if ok.any():
            v = vox[ok]
            at_cells = context.vindex[channels, v[None, :, 0], v[None, :, 1], v[None, :, 2]].T
            expr = cell_expression(cells, plan, np.flatnonzero(ok) + s)
            inputs = (torch.from_numpy(np.ascontiguousarray(at_cells)), torch.from_numpy(expr))
            p[ok] = torch.softmax(forward(model.cell_logits, inputs, device), dim=1).cpu().numpy()
        cell_proba[s : s + len(vox)] = p
        cell_pred[s : s + len(vox)] = np.where(ok, np.nan_to_num(p, nan=-1).argmax(1), -1).astype(np.int16)
