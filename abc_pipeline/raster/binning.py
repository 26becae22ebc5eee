"""NumPy kernels of the rasterizer: per-chunk binning, per-block reduction and pyramid coarsening.

The output grid is cut into blocks (the Zarr chunks of level 0, all channels). Each voxel gets a
*block-major key* ``block_id * block_voxels + offset_in_block``, so sorting by key groups voxels by
block. A two-stage reduction keeps memory bounded whatever the number or order of cells:

1. ``bin_chunk`` (one task per chunk of cells) sums the channel values, counts and label votes of its
   cells per voxel (sort + ``np.add.reduceat``; no ``np.add.at``), and spills the sorted partial
   sums to raw files, with offsets telling where each block starts.
2. ``reduce_blocks`` (one task per run of consecutive blocks) reads those slices back from every
   chunk, adds them into a dense block accumulator, divides by the counts and writes the block.

Memory: stage 1 ~ 3x a chunk of X; stage 2 ~ the spill bytes of its blocks (capped) + 2 dense blocks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CELL_KIND = "cells"


def label_kind(name: str) -> str:
    return f"label:{name}"


# ----------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class BlockLayout:
    """Blocks of ``block`` voxels (z, y, x) tiling a grid of ``shape`` voxels (edge blocks clipped)."""

    shape: tuple[int, int, int]
    block: tuple[int, int, int]

    @property
    def grid_blocks(self) -> tuple[int, int, int]:
        return tuple(math.ceil(n / b) for n, b in zip(self.shape, self.block))

    @property
    def n_blocks(self) -> int:
        return int(np.prod(self.grid_blocks))

    @property
    def block_voxels(self) -> int:
        return int(np.prod(self.block))

    def keys(self, index: np.ndarray) -> np.ndarray:
        """Block-major keys (n,) int64 of valid voxel indices (n, 3)."""
        index = index.astype(np.int64, copy=False)
        blk = np.asarray(self.block, dtype=np.int64)
        q, r = np.divmod(index, blk)
        gb = self.grid_blocks
        block_id = (q[:, 0] * gb[1] + q[:, 1]) * gb[2] + q[:, 2]
        local = (r[:, 0] * blk[1] + r[:, 1]) * blk[2] + r[:, 2]
        return block_id * self.block_voxels + local

    def region(self, block_id: int) -> tuple[slice, slice, slice]:
        """Grid slices (z, y, x) covered by a block."""
        q = np.unravel_index(block_id, self.grid_blocks)
        return tuple(slice(int(i) * b, min((int(i) + 1) * b, n)) for i, b, n in zip(q, self.block, self.shape))


def choose_block(shape: Sequence[int], n_channels: int, z_downsampled: bool, target_bytes: int = 32 << 20) -> tuple[int, int, int]:
    """Block (= Zarr chunk) shape (z, y, x) whose float32 values for all channels fit ``target_bytes``.

    Starts from (1, 512, 512) for section/anisotropic grids (z is never merged) or (128, 128, 128) for
    isotropic ones and halves the largest axis until it fits; clipped to the grid shape.
    """
    block = [128, 128, 128] if z_downsampled else [1, 512, 512]
    while np.prod(block) * n_channels * 4 > target_bytes and max(block) > 8:
        axis = int(np.argmax([block[0] if z_downsampled else 0, block[1], block[2]]))
        block[axis] //= 2
    return tuple(int(min(b, n)) for b, n in zip(block, shape))


# ----------------------------------------------------------------------------------- spill files
def _spill_path(spill: Path, chunk: int, kind: str, part: str) -> Path:
    safe = kind.replace(":", "_")
    return spill / f"{chunk:06d}.{safe}.{part}"


def _group_starts(sorted_keys: np.ndarray) -> np.ndarray:
    if sorted_keys.size == 0:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])


def _block_offsets(block_of: np.ndarray, n_blocks: int) -> np.ndarray:
    return np.searchsorted(block_of, np.arange(n_blocks + 1), side="left").astype(np.int64)


def bin_chunk(
    values: np.ndarray,
    index: np.ndarray,
    labels: dict[str, tuple[np.ndarray, int]],
    layout: BlockLayout,
    spill: Path,
    chunk: int,
) -> dict[str, np.ndarray]:
    """Stage 1: per-voxel partial sums of one chunk of cells, spilled to ``spill``.

    values: (n, C) float32 channel values; index: (n, 3) int voxel index (-1 rows skipped);
    labels: name -> ((n,) int category codes, -1 = missing; number of categories).
    Writes ``<chunk>.cells.{keys,counts,sums}`` (int64, int32, float32 (u, C)) and
    ``<chunk>.label_<name>.{keys,counts}`` (keys = voxel key * n_categories + code) in key order.
    Returns, per kind, the (n_blocks + 1,) offsets of each block's rows in those files.
    """
    ok = index[:, 0] >= 0
    rows = np.flatnonzero(ok)
    keys = layout.keys(index[rows])
    order = np.argsort(keys, kind="stable")
    rows, keys = rows[order], keys[order]
    starts = _group_starts(keys)
    ukeys = keys[starts]
    counts = np.diff(np.append(starts, keys.size)).astype(np.int32)
    if starts.size:
        sums = np.add.reduceat(values[rows], starts, axis=0).astype(np.float32, copy=False)
    else:
        sums = np.zeros((0, values.shape[1]), dtype=np.float32)
    bv = layout.block_voxels
    ukeys.tofile(_spill_path(spill, chunk, CELL_KIND, "keys"))
    counts.tofile(_spill_path(spill, chunk, CELL_KIND, "counts"))
    np.ascontiguousarray(sums).tofile(_spill_path(spill, chunk, CELL_KIND, "sums"))
    offsets = {CELL_KIND: _block_offsets(ukeys // bv, layout.n_blocks)}
    for name, (codes, n_cat) in labels.items():
        c = codes[rows].astype(np.int64)
        valid = c >= 0
        lk, lc = np.unique(keys[valid] * n_cat + c[valid], return_counts=True)
        kind = label_kind(name)
        lk.tofile(_spill_path(spill, chunk, kind, "keys"))
        lc.astype(np.int32).tofile(_spill_path(spill, chunk, kind, "counts"))
        offsets[kind] = _block_offsets(lk // n_cat // bv, layout.n_blocks)
    return offsets


def _read(path: Path, dtype: type, start: int, stop: int, width: int = 1) -> np.ndarray:
    itemsize = np.dtype(dtype).itemsize * width
    with open(path, "rb") as fh:
        fh.seek(start * itemsize)
        arr = np.fromfile(fh, dtype=dtype, count=(stop - start) * width)
    return arr.reshape(-1, width) if width > 1 else arr


@dataclass(frozen=True)
class BlockTask:
    """Stage-2 work: blocks ``blocks`` (ascending, consecutive in key order) and, for each chunk that
    has data in them, its per-kind offsets of those blocks (``offsets[kind][j]`` has
    ``len(blocks) + 1`` entries, relative to the spill files of ``chunks[j]``)."""

    blocks: tuple[int, ...]
    chunks: tuple[int, ...]
    offsets: dict[str, list[np.ndarray]]
    nbytes: int


def plan_block_tasks(
    chunk_offsets: Sequence[dict[str, np.ndarray]], n_channels: int, target_bytes: int = 64 << 20
) -> list[BlockTask]:
    """Group non-empty blocks into runs whose spilled bytes stay under ``target_bytes`` (one block may exceed it)."""
    kinds = list(chunk_offsets[0]) if chunk_offsets else [CELL_KIND]
    per_row = {k: (12 + 4 * n_channels) if k == CELL_KIND else 12 for k in kinds}
    # bytes[b] = spilled bytes of block b over all chunks
    n_blocks = len(chunk_offsets[0][CELL_KIND]) - 1 if chunk_offsets else 0
    nbytes = np.zeros(n_blocks, dtype=np.int64)
    for offs in chunk_offsets:
        for k in kinds:
            nbytes += np.diff(offs[k]) * per_row[k]
    tasks: list[BlockTask] = []
    run: list[int] = []
    run_bytes = 0

    def flush() -> None:
        nonlocal run, run_bytes
        if not run:
            return
        b0, b1 = run[0], run[-1] + 1
        chunks, offsets = [], {k: [] for k in kinds}
        for i, offs in enumerate(chunk_offsets):
            if offs[CELL_KIND][b1] > offs[CELL_KIND][b0] or any(offs[k][b1] > offs[k][b0] for k in kinds):
                chunks.append(i)
                for k in kinds:
                    offsets[k].append(offs[k][b0 : b1 + 1].copy())
        tasks.append(BlockTask(tuple(range(b0, b1)), tuple(chunks), offsets, run_bytes))
        run, run_bytes = [], 0

    for b in np.flatnonzero(nbytes > 0).tolist():
        if run and (b != run[-1] + 1 or run_bytes + nbytes[b] > target_bytes):
            flush()
        run.append(b)
        run_bytes += int(nbytes[b])
    flush()
    return tasks


class _SpillReader:
    """Reads one task's slices of the spill files, preloaded when they fit the task budget."""

    def __init__(self, spill: Path, task: BlockTask, n_channels: int, preload: bool) -> None:
        self.spill, self.task, self.C = spill, task, n_channels
        self.cache: dict[tuple[int, str, str], np.ndarray] | None = {} if preload else None

    def _spec(self, kind: str, part: str) -> tuple[type, int]:
        if part == "keys":
            return np.int64, 1
        if part == "counts":
            return np.int32, 1
        return np.float32, self.C

    def get(self, j: int, kind: str, part: str, i: int) -> np.ndarray:
        """Rows of block ``task.blocks[i]`` from chunk ``task.chunks[j]``."""
        offs = self.task.offsets[kind][j]
        lo, hi = int(offs[i]), int(offs[i + 1])
        dtype, width = self._spec(kind, part)
        path = _spill_path(self.spill, self.task.chunks[j], kind, part)
        if self.cache is None:
            return _read(path, dtype, lo, hi, width)
        key = (j, kind, part)
        if key not in self.cache:
            self.cache[key] = _read(path, dtype, int(offs[0]), int(offs[-1]), width)
        return self.cache[key][lo - int(offs[0]) : hi - int(offs[0])]


def reduce_block(
    reader: _SpillReader, i: int, layout: BlockLayout, n_channels: int, labels: dict[str, int]
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Stage 2 for one block: dense ``(C + 1, *block)`` float32 means with the cell count last, and
    per label the majority label block ``(*block,)`` int64 (0 = no vote; k = category k - 1; ties go
    to the smaller category code)."""
    b = reader.task.blocks[i]
    bv = layout.block_voxels
    acc = np.zeros((bv, n_channels), dtype=np.float32)
    cnt = np.zeros(bv, dtype=np.int64)
    for j in range(len(reader.task.chunks)):
        keys = reader.get(j, CELL_KIND, "keys", i)
        if keys.size == 0:
            continue
        local = keys - b * bv
        acc[local] += reader.get(j, CELL_KIND, "sums", i)
        cnt[local] += reader.get(j, CELL_KIND, "counts", i)
    occupied = cnt > 0
    acc[occupied] /= cnt[occupied, None].astype(np.float32)
    dense = np.empty((n_channels + 1, bv), dtype=np.float32)
    dense[:n_channels] = acc.T
    dense[n_channels] = cnt
    out_labels = {}
    for name, n_cat in labels.items():
        kind = label_kind(name)
        keys = np.concatenate([reader.get(j, kind, "keys", i) for j in range(len(reader.task.chunks))])
        votes = np.concatenate([reader.get(j, kind, "counts", i) for j in range(len(reader.task.chunks))])
        out_labels[name] = majority(keys, votes, n_cat, b * bv, bv)
    return dense.reshape((n_channels + 1, *layout.block)), {k: v.reshape(layout.block) for k, v in out_labels.items()}


def majority(keys: np.ndarray, votes: np.ndarray, n_cat: int, key0: int, n_vox: int) -> np.ndarray:
    """Majority label per voxel from (voxel_key * n_cat + code, votes) pairs (duplicates allowed).

    Returns (n_vox,) int64 with ``code + 1`` of the most voted category at voxel ``key - key0``
    (ties: smallest code) and 0 where no cell voted.
    """
    out = np.zeros(n_vox, dtype=np.int64)
    if keys.size == 0:
        return out
    order = np.argsort(keys, kind="stable")
    keys = keys[order]
    starts = _group_starts(keys)
    ukeys = keys[starts]
    total = np.add.reduceat(votes[order].astype(np.int64), starts)
    vox, code = np.divmod(ukeys, n_cat)
    # ukeys ascending => code ascending within a voxel; a stable sort on (voxel, -votes) keeps it.
    best = np.lexsort((-total, vox))
    vox_sorted = vox[best]
    first = best[_group_starts(vox_sorted)]
    out[vox[first] - key0] = code[first] + 1
    return out


# ----------------------------------------------------------------------------------- pyramid
def _pad_to(a: np.ndarray, factors: Sequence[int], axes: Sequence[int]) -> np.ndarray:
    pad = [(0, 0)] * a.ndim
    for f, ax in zip(factors, axes):
        pad[ax] = (0, (-a.shape[ax]) % f)
    return np.pad(a, pad) if any(p[1] for p in pad) else a


def _window_sum(a: np.ndarray, factors: Sequence[int]) -> np.ndarray:
    """Sum over non-overlapping (fz, fy, fx) windows of the last three axes (zero-padded)."""
    a = _pad_to(a, factors, (-3, -2, -1))
    *lead, z, y, x = a.shape
    fz, fy, fx = factors
    return a.reshape(*lead, z // fz, fz, y // fy, fy, x // fx, fx).sum(axis=(-5, -3, -1))


def coarsen_image(block: np.ndarray, counts: np.ndarray, factors: Sequence[int], count_channel: int | None) -> np.ndarray:
    """Downsample an image block (c, z, y, x) of voxel means by ``factors``.

    Feature channels become count-weighted means (= the exact mean over the cells of the coarse voxel);
    the channel at position ``count_channel`` (the cell count), if in this block, is summed.
    counts: (1, z, y, x) cell counts of the same voxels.
    """
    n = _window_sum(counts.astype(np.float64), factors)
    weighted = _window_sum(block.astype(np.float64) * counts, factors)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(n > 0, weighted / n, 0.0).astype(np.float32)
    if count_channel is not None:
        out[count_channel] = n[0]
    return out


def coarsen_labels(block: np.ndarray, factors: Sequence[int]) -> np.ndarray:
    """Downsample a label block (z, y, x) by ``factors``: the most frequent non-zero label of each
    window (ties: smallest label; 0 when the window is empty)."""
    a = _pad_to(block, factors, (0, 1, 2))
    z, y, x = a.shape
    fz, fy, fx = factors
    w = a.reshape(z // fz, fz, y // fy, fy, x // fx, fx).transpose(0, 2, 4, 1, 3, 5).reshape(z // fz, y // fy, x // fx, -1)
    w = w.astype(np.int64)
    freq = (w[..., :, None] == w[..., None, :]).sum(axis=-1)
    score = np.where(w > 0, freq * (np.int64(1) << 40) - w, np.iinfo(np.int64).min)
    best = np.take_along_axis(w, score.argmax(axis=-1)[..., None], axis=-1)[..., 0]
    return np.where(best > 0, best, 0).astype(block.dtype)
