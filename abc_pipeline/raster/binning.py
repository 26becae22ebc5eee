"""NumPy kernels of the rasterizer: per-chunk binning, per-block reduction and pyramid coarsening.

The output grid is cut into blocks (the Zarr chunks of level 0, all channels). Each voxel gets a
*block-major key* ``block_id * block_voxels + offset``, the offset counted in C order within the
block's region (the block clipped at the grid edge), so sorting by key groups voxels by block. A
two-stage reduction keeps memory bounded whatever the number or order of cells:

1. One task per chunk of cells sums its channel values, counts and label votes per voxel. Values are
   summed in one pass over the chunk with scipy's sparse-times-dense kernel (a matrix of ones mapping
   cells to voxels; no sort + gather copy of the values, no ``np.add.at``):
   * in memory (local threaded runs whose occupied voxels' sums fit a memory budget):
     ``BlockAccumulator.add`` adds the chunk straight into the sums of the occupied voxels
     (``scatter_add``), which are rows ordered by key, so each block's voxels are consecutive rows;
   * spilled: ``partial_sums`` sorts the cells by key and sums them per voxel block by block
     (``group_sums``); ``spill_partials`` writes them to raw files, with offsets telling where each
     block starts.
2. One task per block (or run of blocks) gets each block's sums and counts as ``BlockSums``, from
   ``BlockAccumulator.pop`` or from ``reduce_block`` (which reads the block's slices back from every
   chunk's spill and adds them up). ``BlockSums.coarsen`` derives every pyramid level of the block
   (``window_sum``, ``coarsen_labels``: blocks are multiples of the downsampling factors, so a block's
   coarse voxels never need another block) and ``BlockSums.means`` gives the image values to write.

Sums stay voxel-major ((voxels, channels): a voxel's channels are contiguous) until ``means``
transposes them to the image's channel-major layout. Temporaries are kept well under 32 MiB where
possible: glibc serves larger ones with fresh ``mmap`` pages, whose page faults cost about as much as
the arithmetic here.

Memory: stage 1 ~ 1-2x a chunk of X (spill: ~3x); stage 2 ~ the spill bytes of its blocks (capped) +
~3 dense blocks (plus, in memory, the sums of the occupied voxels).
"""

from __future__ import annotations

import contextlib
import math
import threading
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from scipy.sparse import _sparsetools

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

    @cached_property
    def _axis_keys(self) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], ...]:
        """Per axis (z, y, x), indexed by the voxel's index on that axis: (key of its block's first voxel
        along the axis (block index x the block stride), offset in the block, size of the block's region
        on that axis) as int64 arrays."""
        gb, bv = self.grid_blocks, self.block_voxels
        strides = (gb[1] * gb[2] * bv, gb[2] * bv, bv)
        out = []
        for n, b, stride in zip(self.shape, self.block, strides):
            i = np.arange(n, dtype=np.int64)
            q = i // b
            out.append((q * stride, i - q * b, np.minimum(b, n - q * b)))
        return tuple(out)

    def keys(self, index: np.ndarray) -> np.ndarray:
        """Block-major keys (n,) int64 of valid voxel indices (n, 3): ``block_id * block_voxels`` + the
        voxel's C-order offset in its block's region (the block clipped at the grid edge).

        Sums of per-axis table lookups (``_axis_keys``): no integer division per voxel."""
        (bz, rz, _), (by, ry, sy), (bx, rx, sx) = self._axis_keys
        z, y, x = index[:, 0], index[:, 1], index[:, 2]
        return bz[z] + by[y] + bx[x] + (rz[z] * sy[y] + ry[y]) * sx[x] + rx[x]

    def region(self, block_id: int, factor: Sequence[int] = (1, 1, 1)) -> tuple[slice, slice, slice]:
        """Slices (z, y, x) covered by a block, on the pyramid level downsampled by ``factor`` per axis."""
        q = np.unravel_index(block_id, self.grid_blocks)
        return tuple(
            slice(int(i) * b // f, math.ceil(min((int(i) + 1) * b, n) / f))
            for i, b, n, f in zip(q, self.block, self.shape, factor)
        )

    def region_shape(self, block_id: int) -> tuple[int, int, int]:
        """Shape (z, y, x) of a block's level-0 region (the block clipped at the grid edge)."""
        return tuple(r.stop - r.start for r in self.region(block_id))

    def level_chunks(self, factor: Sequence[int]) -> tuple[int, int, int]:
        """Chunk shape (z, y, x) of the level downsampled by ``factor``: one chunk per block."""
        return tuple(math.ceil(b / f) for b, f in zip(self.block, factor))


def choose_block(
    shape: Sequence[int], n_channels: int, z_downsampled: bool, multiple: int = 8, target_bytes: int = 32 << 20
) -> tuple[int, int, int]:
    """Block (= level-0 Zarr chunk) shape (z, y, x) whose float32 values for all channels fit ``target_bytes``.

    Starts from (1, 512, 512) for section/anisotropic grids (z is never merged) or (128, 128, 128) for
    isotropic ones and halves the largest axis until it fits, keeping downsampled axes multiples of
    ``multiple`` (the total pyramid factor); axes longer than the grid are clipped to it.
    """
    block = [max(128, multiple) if z_downsampled else 1, max(512, multiple), max(512, multiple)]
    floor = [multiple if z_downsampled else 1, multiple, multiple]
    while np.prod(block) * n_channels * 4 > target_bytes:
        sizes = [b if b > f else 0 for b, f in zip(block, floor)]
        if max(sizes) == 0:
            break
        block[int(np.argmax(sizes))] //= 2
    return tuple(int(min(b, n)) for b, n in zip(block, shape))


# ----------------------------------------------------------------------------------- spill files
def _spill_path(spill: Path, chunk: int, kind: str, part: str) -> Path:
    safe = kind.replace(":", "_")
    return spill / f"{chunk:06d}.{safe}.{part}"


def unique_keys(keys: np.ndarray) -> np.ndarray:
    """Sorted distinct values (u,) of an int array (n,): a sort and a compare, several times faster
    than ``np.unique`` (a hash table in NumPy 2) on voxel keys."""
    keys = np.sort(keys)
    return keys[_group_starts(keys)]


def _group_starts(sorted_keys: np.ndarray) -> np.ndarray:
    if sorted_keys.size == 0:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])


def _one_entry_matvecs(
    kind: str, n_out: int, n_in: int, ptr: np.ndarray, idx: np.ndarray, values: np.ndarray, out: np.ndarray
) -> None:
    """``out += A @ values`` for a sparse (n_out, n_in) matrix ``A`` of ones in CSR (``kind="csr"``:
    ``ptr`` (n_out + 1,) row pointers, ``idx`` the column of each entry) or CSC (``"csc"``: ``ptr``
    (n_in + 1,) column pointers, ``idx`` the row of each entry) form. values: (n_in, C), out: (n_out, C).

    scipy's sparse-times-dense kernel, called directly because it adds into ``out`` in place (and
    releases the GIL): one pass over the rows of ``values``, no gathered copy.
    """
    if out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError("out must be a C-contiguous float32 array (it is updated in place)")
    values = np.ascontiguousarray(values, dtype=np.float32)
    kernel = _sparsetools.csr_matvecs if kind == "csr" else _sparsetools.csc_matvecs
    kernel(
        n_out,
        n_in,
        out.shape[1],
        ptr.astype(np.int64, copy=False),
        idx.astype(np.int64, copy=False),
        np.ones(idx.size, dtype=np.float32),
        values.reshape(-1),
        out.reshape(-1),
    )


def scatter_add(out: np.ndarray, rows: np.ndarray, values: np.ndarray) -> None:
    """In place: ``out[rows[i]] += values[i]`` for every ``i`` with ``rows[i] >= 0`` (repeated rows add up).

    out: (u, C) float32, C-contiguous; rows: (n,) int; values: (n, C) float32. One pass over ``values``
    in row order (a CSC matrix whose column ``i`` holds one entry at row ``rows[i]``).
    """
    valid = rows >= 0
    ptr = np.zeros(rows.size + 1, dtype=np.int64)
    np.cumsum(valid, out=ptr[1:])
    _one_entry_matvecs("csc", out.shape[0], rows.size, ptr, rows[valid], values, out)


def group_sums(values: np.ndarray, rows: np.ndarray, starts: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Sum ``values[rows]`` (n, C) over consecutive groups (``starts``, ``sizes``: group ``g`` is
    ``rows[starts[g] : starts[g] + sizes[g]]``, each starting where the previous ends) -> (groups, C) float32.

    One pass over the members (a CSR matrix of ones, one row per group), no gathered copy.
    """
    out = np.zeros((starts.size, values.shape[1]), dtype=np.float32)
    if starts.size:
        first, stop = int(starts[0]), int(starts[-1] + sizes[-1])
        ptr = np.append(starts, stop) - first
        _one_entry_matvecs("csr", starts.size, values.shape[0], ptr, rows[first:stop], values, out)
    return out


def _block_offsets(block_of: np.ndarray, n_blocks: int) -> np.ndarray:
    return np.searchsorted(block_of, np.arange(n_blocks + 1), side="left").astype(np.int64)


@dataclass(frozen=True)
class BlockPartial:
    """Per-voxel partial results of one chunk of cells inside one block, sorted by voxel.

    block: block id; keys (u,) int64 voxel offsets in the block's region, ascending; counts (u,) int32;
    sums (u, C) float32; votes: label -> (key * n_cat + code (v,) int64 ascending, votes (v,) int32).
    """

    block: int
    keys: np.ndarray
    counts: np.ndarray
    sums: np.ndarray
    votes: dict[str, tuple[np.ndarray, np.ndarray]]


def partial_sums(
    values: np.ndarray, index: np.ndarray, labels: dict[str, tuple[np.ndarray, int]], layout: BlockLayout
) -> Iterator[BlockPartial]:
    """Stage 1: sum one chunk's channel values, counts and label votes per voxel, block by block
    (ascending block ids; only blocks with cells).

    values: (n, C) float32 channel values; index: (n, 3) int voxel index (-1 rows skipped);
    labels: name -> ((n,) int category codes, -1 = missing; number of categories).
    Working one block at a time keeps every temporary a fraction of the chunk: large temporaries
    would be fresh memory (page faults) for every chunk.
    """
    values = np.ascontiguousarray(values, dtype=np.float32)  # once here, not in every group_sums
    rows = np.flatnonzero(index[:, 0] >= 0)
    keys = layout.keys(index[rows])
    order = np.argsort(keys, kind="stable")
    rows, keys = rows[order], keys[order]
    codes = {name: (np.asarray(c)[rows].astype(np.int64), n_cat) for name, (c, n_cat) in labels.items()}
    bv = layout.block_voxels
    offs = _block_offsets(keys // bv, layout.n_blocks)
    for b in np.flatnonzero(np.diff(offs)).tolist():
        part = slice(offs[b], offs[b + 1])
        local = keys[part] - b * bv
        starts = _group_starts(local)
        counts = np.diff(np.append(starts, local.size)).astype(np.int32)
        votes = {}
        for name, (c, n_cat) in codes.items():
            c = c[part]
            valid = c >= 0
            lk, lc = np.unique(local[valid] * n_cat + c[valid], return_counts=True)
            votes[name] = (lk, lc.astype(np.int32))
        yield BlockPartial(b, local[starts], counts, group_sums(values, rows[part], starts, counts), votes)


def spill_partials(
    parts: Iterable[BlockPartial], labels: dict[str, int], layout: BlockLayout, spill: Path, chunk: int
) -> dict[str, np.ndarray]:
    """Write one chunk's partials (ascending blocks) to ``spill``: ``<chunk>.cells.{keys,counts,sums}``
    and ``<chunk>.label_<name>.{keys,counts}``.

    Returns, per kind, the (n_blocks + 1,) offsets of each block's rows in those files.
    """
    kinds = [CELL_KIND, *(label_kind(name) for name in labels)]
    rows = {kind: np.zeros(layout.n_blocks, dtype=np.int64) for kind in kinds}
    with contextlib.ExitStack() as stack:
        files = {
            (kind, part): stack.enter_context(open(_spill_path(spill, chunk, kind, part), "wb"))
            for kind in kinds
            for part in (("keys", "counts", "sums") if kind == CELL_KIND else ("keys", "counts"))
        }
        for p in parts:
            p.keys.tofile(files[CELL_KIND, "keys"])
            p.counts.tofile(files[CELL_KIND, "counts"])
            p.sums.tofile(files[CELL_KIND, "sums"])
            rows[CELL_KIND][p.block] = p.keys.size
            for name, (lk, lc) in p.votes.items():
                kind = label_kind(name)
                lk.tofile(files[kind, "keys"])
                lc.tofile(files[kind, "counts"])
                rows[kind][p.block] = lk.size
    return {kind: np.concatenate([[0], np.cumsum(r)]) for kind, r in rows.items()}


_TILE = 256  # voxels per tile of the channel-major transpose in ``BlockSums.means``


@dataclass(frozen=True)
class BlockSums:
    """Stage-2 reduction of one block's region (the block clipped at the grid edge) on one pyramid
    level, voxel-major (whole channel rows per voxel).

    sums (z, y, x, C) float32 per-voxel channel sums; counts (z, y, x) float32 cells per voxel;
    labels: name -> (z, y, x) int64 majority label (0 = no vote; k = category k - 1).
    """

    sums: np.ndarray
    counts: np.ndarray
    labels: dict[str, np.ndarray]

    def coarsen(self, factors: Sequence[int]) -> BlockSums:
        """The next pyramid level of the block (voxels ``factors`` (z, y, x) times larger)."""
        return BlockSums(
            window_sum(self.sums, factors),
            window_sum(self.counts, factors),
            {name: coarsen_labels(lab, factors) for name, lab in self.labels.items()},
        )

    def means(self) -> np.ndarray:
        """(C + 1, z, y, x) float32 in the image's channel-major layout: channel means (0 in empty
        voxels), the count last."""
        *spatial, C = self.sums.shape
        sums = self.sums.reshape(-1, C)
        counts = self.counts.reshape(-1)
        divisor = np.maximum(counts, 1)  # empty voxels have zero sums: 0 / 1 = 0
        out = np.empty((C + 1, counts.size), dtype=np.float32)
        for i in range(0, counts.size, _TILE):  # divide and transpose tile by tile: stays in cache
            tile = slice(i, i + _TILE)
            out[:C, tile] = (sums[tile] / divisor[tile, None]).T if counts[tile].any() else 0
        out[C] = counts
        return out.reshape(C + 1, *spatial)

    def value_range(self) -> tuple[np.ndarray, np.ndarray]:
        """(C + 1,) minimum and maximum of ``means()`` over non-empty voxels (+inf / -inf if none)."""
        occupied = self.counts > 0
        if not occupied.any():
            return np.full(self.sums.shape[-1] + 1, np.inf), np.full(self.sums.shape[-1] + 1, -np.inf)
        counts = self.counts[occupied]
        means = self.sums[occupied] / counts[:, None]
        return np.append(means.min(axis=0), counts.min()), np.append(means.max(axis=0), counts.max())


class BlockAccumulator:
    """In-memory alternative to the spill for local threaded runs: per-voxel sums and counts of the
    occupied voxels only (those that will receive cells, known in advance), plus compacted label votes
    per block; thread-safe.

    keys: (u,) int64 ascending block-major keys of the occupied voxels (rows of the sums, so each
    block's voxels are consecutive rows). columns: the channels among the columns of the values given
    to ``add`` (a slice or index array; ``slice(None)``: all). Passing whole rows of X and selecting
    the channels once per voxel in ``pop`` spares copying every chunk's channel columns.
    Memory: u x (W + 1) x 4 bytes (``nbytes``; W columns of values) plus the votes, independent of
    the number of cells.
    """

    def __init__(
        self,
        layout: BlockLayout,
        width: int,
        labels: dict[str, int],
        keys: np.ndarray,
        columns: slice | np.ndarray = slice(None),
    ) -> None:
        self.layout, self.labels, self.columns = layout, labels, columns
        self._keys = keys
        self._offs = _block_offsets(keys // layout.block_voxels, layout.n_blocks)  # block b: rows offs[b]:offs[b+1]
        self._sums = np.zeros((keys.size, width), dtype=np.float32)
        self._counts = np.zeros(keys.size, dtype=np.float32)
        # (label, block) -> pending (row * n_cat + code (v,) int64 ascending, votes (v,) int32) pairs
        self._votes: dict[tuple[str, int], list[tuple[np.ndarray, np.ndarray]]] = {}
        self._lock = threading.Lock()
        self._token = uuid.uuid4().hex

    def __dask_tokenize__(self) -> str:  # never hash (or pickle) the arrays when building graphs
        return self._token

    @staticmethod
    def nbytes(n_voxels: int, width: int) -> int:
        """Memory of the sums (``width`` columns) and counts of ``n_voxels`` occupied voxels."""
        return n_voxels * (width + 1) * 4

    def add(self, values: np.ndarray, index: np.ndarray, labels: dict[str, tuple[np.ndarray, int]]) -> None:
        """Add one chunk of cells: values (n, W) float32 (C-contiguous: no copy), index (n, 3) int voxel
        index (-1 rows skipped; the others must be occupied voxels), labels: name -> ((n,) int category
        codes, -1 = missing; number of categories).

        The values are added in one pass (``scatter_add``); the label votes of the chunk are compacted
        per (voxel, category) and kept per block (merged every 8 chunks).
        """
        cells = np.flatnonzero(index[:, 0] >= 0)
        keys = self.layout.keys(index[cells])
        found = np.minimum(np.searchsorted(self._keys, keys), self._keys.size - 1)
        if not np.array_equal(self._keys[found], keys):
            raise ValueError("cells fall into voxels that are not among the occupied ones")
        rows = np.full(len(index), -1, dtype=np.int64)
        rows[cells] = found
        counts = np.bincount(found, minlength=self._keys.size).astype(np.float32)
        votes = []
        for name, (codes, n_cat) in labels.items():
            c = np.asarray(codes)[cells]
            valid = c >= 0
            vk, vc = np.unique(found[valid] * n_cat + c[valid], return_counts=True)
            bounds = np.searchsorted(vk, self._offs * n_cat)
            votes += [
                ((name, b), vk[bounds[b] : bounds[b + 1]], vc[bounds[b] : bounds[b + 1]].astype(np.int32))
                for b in np.flatnonzero(np.diff(bounds)).tolist()
            ]
        with self._lock:
            scatter_add(self._sums, rows, values)
            self._counts += counts
            for key, vk, vc in votes:
                pending = self._votes.setdefault(key, [])
                pending.append((vk, vc))
                if len(pending) >= 8:  # keep memory bounded by distinct (voxel, category) pairs
                    pending[:] = [_merge_votes(pending)]

    def blocks(self) -> list[int]:
        """Occupied blocks, ascending."""
        return np.flatnonzero(np.diff(self._offs)).tolist()

    def pop(self, b: int) -> BlockSums:
        """Dense sums (the channels), counts and majority labels of block ``b``'s level-0 region; frees
        its votes."""
        shape = self.layout.region_shape(b)
        n = math.prod(shape)
        rows = slice(self._offs[b], self._offs[b + 1])
        voxels = self._keys[rows] - b * self.layout.block_voxels
        channels = self._sums[rows][:, self.columns]
        sums = np.zeros((n, channels.shape[1]), dtype=np.float32)
        sums[voxels] = channels
        counts = np.zeros(n, dtype=np.float32)
        counts[voxels] = self._counts[rows]
        labels = {}
        for name, n_cat in self.labels.items():
            keys, votes = _merge_votes(self._votes.pop((name, b), []))
            row, code = np.divmod(keys, n_cat)
            labels[name] = majority(voxels[row - rows.start] * n_cat + code, votes, n_cat, n).reshape(shape)
        return BlockSums(sums.reshape(*shape, -1), counts.reshape(shape), labels)


def _merge_votes(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    if not parts:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int32)
    keys = np.concatenate([k for k, _ in parts])
    votes = np.concatenate([v for _, v in parts])
    order = np.argsort(keys, kind="stable")
    keys = keys[order]
    starts = _group_starts(keys)
    return keys[starts], np.add.reduceat(votes[order], starts).astype(np.int32) if starts.size else votes[:0]


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
            if offs[CELL_KIND][b1] > offs[CELL_KIND][b0]:  # label votes only come with cells
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


class SpillReader:
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
    reader: SpillReader, i: int, layout: BlockLayout, n_channels: int, labels: dict[str, int]
) -> BlockSums:
    """Stage 2 for one spilled block: add up its partial sums, counts and label votes from every chunk."""
    shape = layout.region_shape(reader.task.blocks[i])
    n = math.prod(shape)
    acc = np.zeros((n, n_channels), dtype=np.float32)  # voxel-major: parts add whole rows
    cnt = np.zeros(n, dtype=np.float32)
    for j in range(len(reader.task.chunks)):
        keys = reader.get(j, CELL_KIND, "keys", i)
        if keys.size == 0:
            continue
        acc[keys] += reader.get(j, CELL_KIND, "sums", i)  # unique within a chunk, so fancy-index += is exact
        cnt[keys] += reader.get(j, CELL_KIND, "counts", i)
    out_labels = {}
    for name, n_cat in labels.items():
        kind = label_kind(name)
        keys = np.concatenate([reader.get(j, kind, "keys", i) for j in range(len(reader.task.chunks))])
        votes = np.concatenate([reader.get(j, kind, "counts", i) for j in range(len(reader.task.chunks))])
        out_labels[name] = majority(keys, votes, n_cat, n).reshape(shape)
    return BlockSums(acc.reshape(*shape, n_channels), cnt.reshape(shape), out_labels)


def majority(keys: np.ndarray, votes: np.ndarray, n_cat: int, n_vox: int) -> np.ndarray:
    """Majority label per voxel from (voxel * n_cat + code, votes) pairs (duplicates allowed).

    Returns (n_vox,) int64 with ``code + 1`` of the most voted category at each voxel (ties: smallest
    code) and 0 where no cell voted.
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
    out[vox[first]] = code[first] + 1
    return out


# ----------------------------------------------------------------------------------- pyramid
def _pad_to(a: np.ndarray, factors: Sequence[int], axes: Sequence[int]) -> np.ndarray:
    pad = [(0, 0)] * a.ndim
    for f, ax in zip(factors, axes):
        pad[ax] = (0, (-a.shape[ax]) % f)
    return np.pad(a, pad) if any(p[1] for p in pad) else a


def window_sum(a: np.ndarray, factors: Sequence[int]) -> np.ndarray:
    """Sum over non-overlapping (fz, fy, fx) windows of the leading three axes (z, y, x; zero-padded at
    the end); trailing axes (channels) are carried along.

    Applied to per-voxel sums and counts this gives the coarse level's sums and counts, hence its exact
    cell means (count-weighted means of the children)."""
    a = _pad_to(a, factors, (0, 1, 2))
    fz, fy, fx = factors
    out = None
    for dz in range(fz):  # strided adds of whole channel rows: much faster than a reshape + multi-axis sum
        for dy in range(fy):
            for dx in range(fx):
                part = a[dz::fz, dy::fy, dx::fx]
                out = part.copy() if out is None else np.add(out, part, out=out)
    return out


def coarsen_labels(block: np.ndarray, factors: Sequence[int]) -> np.ndarray:
    """Downsample a label block (z, y, x) by ``factors``: the most frequent non-zero label of each
    window (ties: smallest label; 0 when the window is empty)."""
    a = _pad_to(block, factors, (0, 1, 2))
    z, y, x = a.shape
    fz, fy, fx = factors
    w = (
        a.reshape(z // fz, fz, y // fy, fy, x // fx, fx)
        .transpose(0, 2, 4, 1, 3, 5)
        .reshape(z // fz, y // fy, x // fx, -1)
    )
    w = w.astype(np.int64)
    freq = (w[..., :, None] == w[..., None, :]).sum(axis=-1)
    score = np.where(w > 0, freq * (np.int64(1) << 40) - w, np.iinfo(np.int64).min)
    best = np.take_along_axis(w, score.argmax(axis=-1)[..., None], axis=-1)[..., 0]
    return np.where(best > 0, best, 0).astype(block.dtype)
