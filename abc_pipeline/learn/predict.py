"""Dense prediction over a whole raster and per-cell sampling (``abc-pipeline predict``).

The network of an atlas checkpoint (``abc-pipeline train``) runs fully convolutionally over the raster in
tiles with halos: every axis is split into equal cores of at most ``tile_size`` voxels (lengths differing by
at most one), every core is read with a margin (zero outside the volume) and only the core is kept, so
memory is bounded by the tile size, not the raster. Tiles whose core holds no cells are skipped (their
output stays 0).

- ``celltype`` (patch classifier): ``forward_dense`` with margin ``patch_size // 2 + halo`` (the receptive
  field): each voxel's probabilities equal those of the patch classifier on the patch centred there.
- cell-context classifiers (``celltype`` by default): the same dense pass gives each voxel's context
  embedding and the probabilities of its mean cell (the voxel map); then every cell is classified from the
  embedding at its voxel and its own expression read from cells.zarr (``cells/pred``, ``cells/proba``: one
  prediction per cell, cells of a voxel differ).
- ``region`` (U-Net): the tile is read with ``halo`` extra voxels per side (default 16 per axis in-plane)
  and centre-cropped (stitching without seams as long as the halo covers the network's effective context).

Each z-block of the checkpoint's split is predicted on its own (input outside the block is zero), exactly
as the model saw its split in training (2D models: each z-plane on its own). Rasters other than the
training one are predicted in one block, and their cells get split ``none``.

Output: a ``predictions.zarr`` (layout: :mod:`abc_pipeline.learn.predictions`): the probability volume,
its argmax label volume and the per-cell tables; cells without a voxel get class -1 and NaN probabilities.
Per-cell values are sampled from the probability volume at each cell's voxel (``cells/voxel_index``), in
chunks of cells with one vectorised gather each; no per-cell network evaluation.
"""

from __future__ import annotations

import itertools
import logging
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import zarr
from tqdm.auto import tqdm

from abc_pipeline.cells import CellSource
from abc_pipeline.errors import InputError
from abc_pipeline.fileio import check_output, staged_output
from abc_pipeline.learn.cell_context import channel_plan, predict_cells
from abc_pipeline.learn.checkpoint import load_checkpoint, load_model
from abc_pipeline.learn.data import (
    DEFAULT_CACHE_BYTES,
    SPLITS,
    ClassTable,
    Normalizer,
    RasterReader,
    names_digest,
    split_mask,
    z_blocks,
)
from abc_pipeline.learn.inference import forward, pick_device
from abc_pipeline.learn.predictions import (
    CELL_PRED,
    CELL_PROBA,
    create_cell_tables,
    create_store,
    create_volumes,
    split_codes,
    store_attrs,
    write_attrs,
    write_volume_metadata,
)
from abc_pipeline.learn.scoring import stored_metrics
from abc_pipeline.learn.tasks import PER_CELL_ARCHITECTURES, by_name
from abc_pipeline.raster.channels import ChannelPlan, raster_digest
from abc_pipeline.raster.ome import Raster, create_array, open_raster

log = logging.getLogger(__name__)

# 2D: a section plane of up to 192 x 192 voxels is one tile, larger ones are split into equal cores
DEFAULT_TILE = {2: (192, 192), 3: (16, 64, 64)}
DEFAULT_HALO = 16
# input voxels per forward pass when batch_size is not given: on the CPU passes of ~10-40 k voxels (one 2D
# tile) run fastest, their activations (<= ~25 MB at 150 channels) stay cache-friendly and are reused by the
# allocator, while larger ones are mapped and page-faulted anew by every op (docs/benchmarks.md, dense
# prediction)
_PASS_VOXELS = {"cuda": 1 << 20}
_PASS_VOXELS_DEFAULT = 1 << 15
_CELL_CHUNK = 1 << 16  # cells per gather
_CONTEXT = "_context"  # temporary (embed, z, y, x) context embedding of a cell-context model


def atlas_config(ckpt: dict, path: str | Path) -> dict:
    """The ``atlas`` section of a checkpoint written by ``abc-pipeline train``."""
    atlas = ckpt.get("config", {}).get("config", {}).get("atlas")
    if atlas is None:
        raise InputError(
            f"{path}: not an atlas checkpoint (no config['atlas']; trained with train-npz?); "
            f"train one with `abc-pipeline train --raster ...`"
        )
    return atlas


def check_channels(
    atlas: dict, raster_path: Path, channels: Sequence[str], checkpoint: str | Path, digest: str | None = None
) -> None:
    """:class:`InputError` naming both channel lists when the raster's feature channels differ, or when they
    share their names but not their definition (``digest``: :func:`abc_pipeline.raster.channels.raster_digest`
    of the raster, compared with the checkpoint's ``channel_definition``; PC1..PCk of other loadings)."""
    want, have = list(atlas["channels"]), list(channels)
    if want != have:
        diff = next((i for i, (a, b) in enumerate(zip(want, have)) if a != b), min(len(want), len(have)))
        raise InputError(
            f"{raster_path} has {len(have)} feature channels ({have[:5]}...) but the checkpoint {checkpoint} was "
            f"trained on {len(want)} ({want[:5]}...), first difference at channel {diff}; rasterize with the "
            f"training channels (same --genes/--pca) or use a checkpoint trained on this raster"
        )
    definition = atlas.get("channel_definition")
    if digest is not None and definition is not None and definition["digest"] != digest:
        raise InputError(
            f"{raster_path} has the channel names of {checkpoint} but not their definition (digest {digest}, "
            f"checkpoint {definition['digest']}: other {definition['mode']} genes or loadings, e.g. a PCA fitted on "
            f"another dataset); make the raster with the checkpoint's channels: `abc-pipeline transfer`"
        )


def _tiles(lo: int, hi: int, size: int) -> list[tuple[int, int]]:
    """The fewest cores of at most ``size`` partitioning ``[lo, hi)``: equal lengths up to one voxel."""
    n = -(-(hi - lo) // size)
    return [(lo + i * (hi - lo) // n, lo + (i + 1) * (hi - lo) // n) for i in range(n)]


def _core_length(n: int, size: int) -> int:
    """Longest core of :func:`_tiles` over ``n`` voxels with cores of at most ``size``."""
    return -(-n // -(-n // size))


@dataclass(frozen=True)
class _Tiling:
    """How dense prediction reads ``raster``: tile cores of ``core`` voxels (z, y, x; 2D models: one z-plane)
    read with ``margin`` voxels of context per side (zero outside the volume), normalised by ``normalizer``,
    z-block by z-block (``blocks``: ``(z_start, z_stop, split)``, split = index into ``SPLITS`` under block
    splits, else -1; :func:`_prediction_blocks`); ``splits``: the checkpoint's splits (block splits: each
    split's (y, x) blocks)."""

    raster: Raster
    normalizer: Normalizer
    dim: int
    core: tuple[int, int, int]
    margin: tuple[int, int, int]
    blocks: list[tuple[int, int, int]]
    splits: dict
    cache_bytes: int = DEFAULT_CACHE_BYTES

    @property
    def size(self) -> tuple[int, ...]:
        """The input window of a tile: its core and margins, (z, y, x)."""
        return tuple(c + 2 * m for c, m in zip(self.core, self.margin))

    @property
    def masked(self) -> bool:
        """Whether block splits share z-planes between splits (each pass keeps the others' voxels)."""
        return any(b[2] >= 0 for b in self.blocks)

    def boxes(self) -> list[tuple[tuple[int, int, int], tuple[int, int], tuple[int, int], tuple[int, int]]]:
        """``(block, z, y, x)`` ranges of every tile core; 2D tiles are one z-plane each."""
        shape, core = self.raster.grid.shape, self.core
        out = []
        for block in self.blocks:
            zt = [(z, z + 1) for z in range(*block[:2])] if self.dim == 2 else _tiles(*block[:2], core[0])
            for zr in zt:
                for yr in _tiles(0, shape[1], core[1]):
                    for xr in _tiles(0, shape[2], core[2]):
                        out.append((block, zr, yr, xr))
        return out

    def windows(self, bar: tqdm) -> Iterator[tuple[tuple[slice, ...], tuple[slice, ...], np.ndarray]]:
        """(region of the volume, crop of the window, input window ``(C, *size)``) of every tile whose core holds
        tissue (the rest stays 0), one z-block at a time (only its planes in the reader's cache); ``bar``
        counts every tile."""
        reader, current, margin = None, None, self.margin
        for block, zr, yr, xr in self.boxes():
            if block != current:
                mask = split_mask(self.splits, SPLITS[block[2]], self.raster.grid.shape) if block[2] >= 0 else None
                reader = RasterReader(
                    self.raster, self.normalizer, list(range(*block[:2])), cache_bytes=self.cache_bytes, mask=mask
                )
                current = block
            x = reader.window((zr[0] - margin[0], yr[0] - margin[1], xr[0] - margin[2]), self.size)
            crop = tuple(slice(m, m + b - a) for m, (a, b) in zip(margin, (zr, yr, xr)))
            bar.update(1)
            if x[(-1, *crop)].any():
                yield (slice(*zr), slice(*yr), slice(*xr)), crop, x


@dataclass(frozen=True)
class _Network:
    """The network run over the tiles on ``device``: ``model`` itself (a U-Net) or, when ``dense``, its
    ``forward_dense`` (a per-cell classifier over its exact receptive field); ``cells``: a cell-context model's
    cells.zarr and channel plan (every cell classified from the context embedding at its voxel and its own
    expression). ``batch_size``: tiles per forward pass (``None``: as many as fit the pass's input voxels)."""

    model: torch.nn.Module
    dense: bool
    device: torch.device
    batch_size: int | None = None
    cells: tuple[CellSource, ChannelPlan] | None = None


def _prediction_blocks(atlas: dict, raster) -> tuple[dict, list[tuple[int, int, int]]]:
    """Splits and z-blocks ``(start, stop, split)`` to predict: the checkpoint's when the raster is its
    training grid, else one block. Under block splits every split's z-blocks are predicted on their own,
    seeing only the split's (y, x) blocks (``split`` = its index into ``SPLITS``; else -1)."""
    grid = raster.grid
    same = atlas["space"] == grid.space and list(atlas["grid_shape"]) == list(grid.shape)
    if not same:
        log.warning(
            "%s is not the training raster's grid (%s %s); predicting it as one block, split 'none'",
            raster.path,
            atlas["space"],
            atlas["grid_shape"],
        )
        return {}, [(0, grid.shape[0], -1)]
    splits = dict(atlas["splits"])
    if splits.get("blocks"):
        return splits, [(*b, k) for k, name in enumerate(SPLITS) for b in z_blocks(splits.get(name, []))]
    covered = sorted(z for name in SPLITS for z in splits.get(name, []))
    blocks = [b for name in SPLITS for b in z_blocks(splits.get(name, []))]
    blocks += z_blocks(sorted(set(range(grid.shape[0])) - set(covered)))
    return splits, sorted((a, b, -1) for a, b in blocks)


def predict_raster(
    checkpoint: str | Path,
    raster: str | Path,
    out: str | Path,
    *,
    cells: str | Path | None = None,
    tile_size: int | Sequence[int] | None = None,
    halo: int | Sequence[int] | None = None,
    batch_size: int | None = None,
    device: str = "auto",
    progress: bool = True,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    overwrite: bool = False,
    plan: ChannelPlan | None = None,
) -> Path:
    """Predict every voxel of ``raster`` with the model of ``checkpoint`` and sample every cell; writes
    ``out`` (see the module docstring) atomically and returns it.

    ``cells``: the cells.zarr the raster was made from; when given, its obs order is checked against the
    raster and the test-split cells are scored against their true labels (``metrics`` in the attributes).
    ``tile_size``: largest tile core per model axis (default 192 x 192 in 2D, 16 x 64 x 64 in 3D); ``halo``:
    U-Net context per side (patch classifiers always use their exact receptive field); ``batch_size``:
    tiles per forward pass (default: as many as fit 32,768 input voxels, at least one; 2**20 on CUDA).
    ``overwrite``: replace an existing abc-pipeline artifact of another kind at ``out``
    (:func:`abc_pipeline.fileio.check_output`). ``plan``: how a cell-context model reads each cell's own
    expression from ``cells`` (default: the raster's channel definition resolved on ``cells``; ``transfer``
    passes the model's definition matched to the user's genes).
    """
    check_output(Path(out), "predictions", inputs=[checkpoint, raster, cells], overwrite=overwrite)  # fail early
    from abc_pipeline.learn.baselines import predict_baseline
    from abc_pipeline.learn.choices import is_baseline

    dev = pick_device(device)  # an impossible device fails before any reading
    if is_baseline(load_checkpoint(checkpoint)["model_name"]):  # scikit-learn baseline: per cell, not per voxel
        return predict_baseline(checkpoint, raster, out, cells=cells, overwrite=overwrite)
    model, ckpt = load_model(checkpoint, dev)
    atlas = atlas_config(ckpt, checkpoint)
    r = open_raster(raster)
    check_channels(atlas, r.path, r.feature_channels, checkpoint, raster_digest(r))
    dim, task = int(atlas["dim"]), atlas["task"]
    if dim == 3 and r.grid.space == "section":
        raise InputError(f"{r.path} is a section raster but the checkpoint's model is 3D; use a 3D raster")
    table = ClassTable.from_dict(atlas["classes"])
    normalizer = Normalizer.from_dict(atlas["normalizer"])
    architecture = by_name(task).recorded_architecture(atlas)
    dense = architecture in PER_CELL_ARCHITECTURES
    if architecture == "cell-context" and cells is None:
        raise InputError(
            f"{checkpoint} is a cell-context model: predict needs --cells (the cells.zarr of the "
            f"raster), whose expression it reads per cell"
        )
    core = tuple(int(v) for v in ((tile_size,) * dim if isinstance(tile_size, int) else tile_size or DEFAULT_TILE[dim]))
    if dense:
        margin = tuple(model.margin)
    else:
        margin = (
            (DEFAULT_HALO,) * dim
            if halo is None
            else ((int(halo),) * dim if isinstance(halo, int) else tuple(int(h) for h in halo))
        )
    if len(core) != dim or len(margin) != dim or min(core) < 1 or min(margin) < 0:
        raise InputError(f"tile_size and halo need {dim} positive sizes (one per model axis), got {core}, {margin}")
    core3, margin3 = ((1, *core), (0, *margin)) if dim == 2 else (core, margin)
    core3 = (
        min(core3[0], r.grid.shape[0]),  # no tile beyond the volume
        *(_core_length(n, c) for c, n in zip(core3[1:], r.grid.shape[1:])),
    )
    splits, blocks = _prediction_blocks(atlas, r)
    digest = None
    if cells is not None:
        src = CellSource(cells)
        digest = names_digest(src.obs_names())
        if digest != names_digest(r.cell_label):
            raise InputError(
                f"{r.path} was not rasterized from {cells} (cell names/order differ); give the "
                f"cells.zarr the raster was made from"
            )
    out = Path(out)
    tiling = _Tiling(r, normalizer, dim, core3, margin3, blocks, splits, cache_bytes)
    per_cell = (src, plan or channel_plan(r, src)) if architecture == "cell-context" else None
    network = _Network(model, dense, dev, batch_size, per_cell)
    with staged_output(out, "predictions", inputs=[checkpoint, r.path, cells], overwrite=overwrite) as tmp:
        _write(tmp, network, tiling, table, task, progress)
        metrics = stored_metrics(tmp, src, table.level, table.names) if cells is not None else {}
        meta = store_attrs(
            task=task,
            table=table,
            model=ckpt["model_name"],
            checkpoint=checkpoint,
            config_hash=ckpt["config_hash"],
            best_epoch=ckpt["best_epoch"],
            raster=r.path,
            splits=splits,
            dim=dim,
            n_cells=r.voxel_index.shape[0],
            cell_names_digest=digest or names_digest(r.cell_label),
            val_metrics=ckpt.get("best_val", {}),
            tile_size=list(core),
            halo=list(margin),
            metrics=metrics,
        )
        write_attrs(zarr.open_group(str(tmp), mode="a"), meta)
    log.info("wrote %s predictions of %s to %s", task, r.path, out)
    return out


@torch.inference_mode()
def _write(tmp: Path, network: _Network, tiling: _Tiling, table: ClassTable, task: str, progress: bool) -> None:
    """Dense inference of ``network`` tile by tile of ``tiling`` into ``tmp`` (probabilities + the label volume
    of ``task``), then the per-cell tables.

    A cell-context network (``network.cells``): the dense context embedding is kept in a temporary array and
    every cell is classified from it and its own expression (:func:`abc_pipeline.learn.cell_context.predict_cells`);
    otherwise cells take their voxel's prediction."""
    model, dev, r, dim = network.model, network.device, tiling.raster, tiling.dim
    shape = r.grid.shape
    k = len(table.names)
    root = create_store(tmp)
    chunks = tuple(min(c, n) for c, n in zip(tiling.core, shape))
    proba, label = create_volumes(root, task, k, shape, chunks)
    context = (
        None
        if network.cells is None
        else create_array(root, _CONTEXT, (model.context_channels, *shape), (16, *chunks), np.float32)
    )
    pass_voxels = _PASS_VOXELS.get(dev.type, _PASS_VOXELS_DEFAULT)
    batch_size = network.batch_size or max(1, pass_voxels // int(np.prod(tiling.size)))
    masked = tiling.masked
    bar = tqdm(total=len(tiling.boxes()), desc=f"predict {task}", disable=not progress)

    def context_pass(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A cell-context model's dense context embedding and the logits of each voxel's mean cell."""
        embedding = model.context_dense(x)
        return embedding, model.forward_dense(x, embedding)

    net = context_pass if context is not None else (model.forward_dense if network.dense else model)
    tiles = tiling.windows(bar)
    while batch := list(itertools.islice(tiles, batch_size)):
        out = forward(net, torch.from_numpy(np.stack([w[:, 0] if dim == 2 else w for _, _, w in batch])), dev)
        embedding, logits = out if context is not None else (None, out)
        p = torch.softmax(logits, dim=1).cpu().numpy()
        if embedding is not None:
            embedding = embedding.cpu().numpy()
        if dim == 2:
            p = p[:, :, None]
            embedding = embedding[:, :, None] if context is not None else None
        for i, (region, crop, w) in enumerate(batch):
            t = w[(-1, *crop)] > 0
            # block splits: other splits' voxels of the region were (or will be) written by their own pass
            kept = (proba[(slice(None), *region)], label[region]) if masked else (np.float32(0), 0)
            pc = np.where(t, p[i][(slice(None), *crop)], kept[0])
            proba[(slice(None), *region)] = pc
            label[region] = np.where(t, pc.argmax(0) + 1, kept[1]).astype(np.uint16)
            if context is not None:
                context[(slice(None), *region)] = embedding[i][(slice(None), *crop)]
    bar.close()
    write_volume_metadata(root, r.grid, task, table)
    _sample_cells(root, proba, r, tiling.splits, k)
    if network.cells is not None:
        predict_cells(model, context, r, *network.cells, root[CELL_PROBA], root[CELL_PRED], dev)
        shutil.rmtree(tmp / _CONTEXT)


def _sample_cells(root: zarr.Group, proba: zarr.Array, r, splits: dict[str, list[int]], k: int) -> None:
    """Per-cell class index, probabilities and split, gathered chunk by chunk at each cell's voxel. A cell
    without a voxel, or whose voxel holds no probabilities (no tissue there), gets class -1 and NaN rows:
    missing, never class 0."""
    index = r.voxel_index
    n = index.shape[0]
    pred, cell_proba, split = create_cell_tables(root, n, k)
    split[:] = split_codes(r, splits)
    classes = np.arange(k)[:, None]
    for s in range(0, n, _CELL_CHUNK):
        vox = np.asarray(index[s : s + _CELL_CHUNK]).astype(np.int64)
        ok = vox[:, 0] >= 0
        p = np.full((len(vox), k), np.nan, dtype=np.float32)
        if ok.any():
            v = vox[ok]
            p[ok] = proba.vindex[classes, v[None, :, 0], v[None, :, 1], v[None, :, 2]].T
        has = ok & (np.nan_to_num(p, nan=0).sum(axis=1) > 0)
        p[~has] = np.nan
        cell_proba[s : s + len(vox)] = p
        pred[s : s + len(vox)] = np.where(has, np.nan_to_num(p, nan=-1).argmax(1), -1).astype(np.int16)
