"""Rasterize the cells of a ``cells.zarr`` into a multichannel OME-Zarr grid with Dask.

Pipeline (each step one Dask computation, threaded by default or on a ``dask.distributed`` cluster):

0. bounds (and section order) from the coordinates only; skipped when bounds are given in 3D; on
   local threaded runs, the occupied voxels (coordinates only again);
1. one task per chunk of cells: X decoded into a per-thread buffer, voxel index and cell labels
   (written to ``cells/``), then the chunk's values, counts and label votes are added to in-memory
   sums of the occupied voxels when those fit ``max_accumulator_gb`` on a local threaded run
   (``binning.BlockAccumulator.add``: one pass over the chunk, whole rows of X when the channels are
   most of its genes), else summed per voxel block by block and spilled to disk
   (``binning.partial_sums``);
2. one task per output block (spill: per run of blocks): add the partials and write the block's image
   and label chunks of every pyramid level (window sums of sums and counts = exact cell means of the
   coarse voxels; label modes), so no level is read back;
3. metadata, then the temporary store is renamed onto the output path.

Memory is bounded by the chunk and block sizes and by the occupied voxels, not by the number of cells.
The spill needs up to (cells with coordinates) x (channels + 3) x 4 bytes of temporary disk next to
the output.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import shutil
import threading
import time
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import zarr
from dask.delayed import Delayed

from abc_pipeline import __version__, keys
from abc_pipeline.cells import Categorical, CellSource
from abc_pipeline.errors import InputError
from abc_pipeline.fileio import check_disjoint, check_output, staged_output
from abc_pipeline.integrity import MAX_VOXELS, check_voxel_cap, nonfinite_rows
from abc_pipeline.raster import binning
from abc_pipeline.raster.channels import ChannelPlan, plan_channels
from abc_pipeline.raster.grid import COORDINATE_KEYS, Grid
from abc_pipeline.raster.ome import (
    ATTRS_KEY,
    COUNT_CHANNEL,
    NGFF_VERSION,
    copy_array,
    create_array,
    default_colors,
    write_chunks,
    write_image_metadata,
    write_labels_metadata,
)

log = logging.getLogger(__name__)

#: Label volumes written when ``labels`` is not given (those present in the store).
DEFAULT_LABELS = ("class", "subclass", "parcellation_division", "parcellation_structure")
#: Local Dask schedulers: name -> (module, function). Passing the function rather than the name spares
#: Dask importing dask.distributed to look for a default client (~0.3 s).
SCHEDULERS = {
    "threads": ("dask.threaded", "get"),
    "processes": ("dask.multiprocessing", "get"),
    "synchronous": ("dask.local", "get_sync"),
}
DEFAULT_CHUNK_CELLS = 50_000
_CHANNEL_CHUNK = 16  # channels per Zarr chunk of the image
_STAGE2_BUDGET = 64 << 20  # spilled bytes preloaded by one block task


# ----------------------------------------------------------------------------------- execution
class _Runner:
    """Runs Dask collections on the local scheduler (with a tqdm bar) or on a distributed cluster."""

    def __init__(self, scheduler: str, num_workers: int | None, address: str | None, progress: bool) -> None:
        if scheduler not in SCHEDULERS:
            raise InputError(
                f"unknown Dask scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)} (or give an address)"
            )
        self.scheduler, self.num_workers, self.address, self.progress = scheduler, num_workers, address, progress
        self.client = None

    def __enter__(self) -> _Runner:
        if self.address:
            from distributed import Client

            self.client = Client(self.address)
            log.info("using the dask.distributed cluster at %s (%s)", self.address, self.client.dashboard_link)
        return self

    @property
    def local_threads(self) -> bool:
        """True when tasks share this process's memory (threaded or synchronous local scheduler)."""
        return self.client is None and self.scheduler in ("threads", "synchronous")

    def __exit__(self, *exc: object) -> None:
        if self.client is not None:
            self.client.close()

    def compute(self, tasks: list, desc: str) -> list:
        """Compute ``tasks`` (Dask collections) and return their results; logs the wall time."""
        if not tasks:
            return []
        start = time.perf_counter()
        if self.client is not None:
            from distributed import progress

            futures = self.client.compute(tasks)
            if self.progress:
                progress(futures)
            out = self.client.gather(futures)
        else:
            from tqdm.dask import TqdmCallback

            cb = TqdmCallback(desc=desc) if self.progress else contextlib.nullcontext()
            with cb:
                get = getattr(importlib.import_module(SCHEDULERS[self.scheduler][0]), SCHEDULERS[self.scheduler][1])
                out = list(dask.compute(*tasks, scheduler=get, num_workers=self.num_workers))
        log.info("%s: %d tasks in %.1f s", desc, len(tasks), time.perf_counter() - start)
        return out


def _shared(obj: object, name: str) -> Delayed:
    """``obj`` as one node of a Dask graph, for the tasks that take it to refer to by key: Dask neither
    walks into it nor hashes it once per task (~0.4 s for 20 tasks taking a stage context)."""
    return dask.delayed(obj, name=f"{name}-{uuid.uuid4().hex}", traverse=False)


class _ThreadBuffers:
    """One reusable array per thread and name: chunk-sized arrays allocated for every task would be
    fresh memory each time, whose page faults cost about as much as decoding the chunk."""

    def __init__(self) -> None:
        self._local = threading.local()

    def __reduce__(self) -> tuple:  # pickled (dask.distributed): an empty set in each worker
        return (_ThreadBuffers, ())

    def get(self, name: str, shape: tuple[int, ...], dtype: type) -> np.ndarray:
        """A C-contiguous ``shape`` array (contents undefined) owned by the calling thread."""
        buf = getattr(self._local, name, None)
        if buf is None or buf.dtype != dtype or buf.shape[1:] != shape[1:] or buf.shape[0] < shape[0]:
            buf = np.empty(shape, dtype=dtype)
            setattr(self._local, name, buf)
        return buf[: shape[0]]


# ----------------------------------------------------------------------------------- stage contexts
@dataclass(frozen=True)
class _Stage1:
    grid: Grid
    layout: binning.BlockLayout
    source: CellSource  # X is read in the task, into a per-thread buffer
    buffers: _ThreadBuffers
    plan: ChannelPlan
    code_to_z: np.ndarray | None  # section space: category code -> z index (-1 = section not rasterized)
    label_ncat: dict[str, int]
    voxel_index: zarr.Array  # output (n_cells, 3)
    obs_names: zarr.Array | None  # input (n_cells,) str, copied by the tasks to ... (None: copied already)
    cell_label: zarr.Array  # ... this output
    spill: Path | None  # partial sums go to disk here ...
    accumulator: binning.BlockAccumulator | None  # ... or into memory
    whole_rows: bool  # the accumulator takes whole rows of X (and selects the channel columns itself)
    drop_nonfinite: bool  # cells with NaN / inf in X are skipped (else an error)


@dataclass(frozen=True)
class _Stage2:
    layout: binning.BlockLayout
    n_channels: int
    label_ncat: dict[str, int]
    spill: Path | None
    accumulator: binning.BlockAccumulator | None
    factor: tuple[int, int, int]  # downsampling per pyramid level (z, y, x)
    images: list[zarr.Array]  # image level k: (C + 1, z, y, x)
    labels: dict[str, list[zarr.Array]]  # label name -> level k: (z, y, x)


def _to_zyx(raw: np.ndarray, section_codes: np.ndarray | None, code_to_z: np.ndarray | None) -> np.ndarray:
    """(n, 3) float64 (z, y, x) grid coordinates from stored (x, y[, z]) coordinates.

    Section space: z is the section index (``code_to_z[code]``; NaN for unknown sections); without a
    mapping (bounds pass) z is 0.
    """
    raw = np.asarray(raw, dtype=np.float64)
    if section_codes is None:
        return np.ascontiguousarray(raw[:, 2::-1])
    z = np.zeros(len(raw))
    if code_to_z is not None:
        codes = np.asarray(section_codes, dtype=np.int64)
        z = np.where(codes >= 0, code_to_z[np.clip(codes, 0, None)], -1).astype(np.float64)
        z[z < 0] = np.nan
    return np.column_stack([z, raw[:, 1], raw[:, 0]])


def _occupied_voxels(
    raw, section_codes, code_to_z: np.ndarray | None, grid: Grid, layout: binning.BlockLayout
) -> np.ndarray:
    """Block-major keys (ascending, unique) of the voxels that one chunk of cells falls into."""
    index = grid.to_index(_to_zyx(raw, section_codes, code_to_z))
    return binning.unique_keys(layout.keys(index[index[:, 0] >= 0]))


def _whole_rows(plan: ChannelPlan, n_genes: int) -> bool:
    """Whether to accumulate whole rows of X rather than the channels: for gene channels that are a
    contiguous run of at least half of X's columns (copying them out of every chunk costs more than
    summing the few other columns)."""
    return (
        plan.pca is None and not plan.missing and isinstance(plan.gene_index, slice) and 2 * len(plan.names) >= n_genes
    )


def _accumulator(
    runner: _Runner,
    raw: list,
    section_codes: list,
    code_to_z: np.ndarray | None,
    grid: Grid,
    layout: binning.BlockLayout,
    plan: ChannelPlan,
    n_genes: int,
    label_ncat: dict[str, int],
    max_gb: float,
) -> binning.BlockAccumulator | None:
    """The in-memory accumulator of a local threaded run whose occupied voxels' sums fit ``max_gb``, else
    None (spill). One pass over the coordinates (``raw``, ``section_codes``: Dask blocks) finds the
    occupied voxels."""
    if not runner.local_threads:
        return None
    tasks = [dask.delayed(_occupied_voxels)(r, s, code_to_z, grid, layout) for r, s in zip(raw, section_codes)]
    keys = binning.unique_keys(np.concatenate([np.zeros(0, dtype=np.int64), *runner.compute(tasks, "occupied voxels")]))
    width, columns = (n_genes, plan.gene_index) if _whole_rows(plan, n_genes) else (len(plan.names), slice(None))
    nbytes = binning.BlockAccumulator.nbytes(keys.size, width)
    log.info("%d occupied voxels: %.2f GB of sums (in-memory budget %.2f GB)", keys.size, nbytes / 2**30, max_gb)
    return binning.BlockAccumulator(layout, width, label_ncat, keys, columns) if nbytes <= max_gb * 2**30 else None


def _stage1(raw, section_codes, label_codes, ctx: _Stage1, chunk: int, start: int) -> dict:
    """Bin one chunk of cells (rows ``start:`` as many as ``raw``) and write its rows of the per-cell
    tables; returns spill offsets and counts of skipped cells (cells with NaN / inf in X: an error unless
    ``ctx.drop_nonfinite``, then skipped like cells without coordinates)."""
    coords = _to_zyx(raw, section_codes, ctx.code_to_z)
    index = ctx.grid.to_index(coords)
    rows = slice(start, start + len(index))
    missing = np.isnan(coords).any(axis=1)
    outside = (index[:, 0] < 0) & ~missing
    x = ctx.source.read_X(rows.start, rows.stop, out=ctx.buffers.get("X", (len(index), ctx.source.n_genes), np.float32))
    nonfinite = nonfinite_rows(x)
    if nonfinite.any():
        bad = np.flatnonzero(nonfinite)
        if not ctx.drop_nonfinite:
            raise InputError(
                f"{ctx.source.path}: X holds NaN or inf in {bad.size} cells of rows {rows.start}..{rows.stop - 1} "
                f"(first row {rows.start + int(bad[0])}); fix the expression values, or pass --drop-nonfinite "
                "(drop_nonfinite=True) to skip those cells (counted and logged)"
            )
        index[nonfinite] = -1
    ctx.voxel_index[rows] = index
    if ctx.obs_names is not None:
        ctx.cell_label[rows] = ctx.obs_names[rows]
    values = x if ctx.whole_rows else ctx.plan.apply(x)
    labels = {name: (np.asarray(codes), ctx.label_ncat[name]) for name, codes in zip(ctx.label_ncat, label_codes)}
    offsets = None
    if ctx.accumulator is not None:
        ctx.accumulator.add(values, index, labels)
    else:
        offsets = binning.spill_partials(
            binning.partial_sums(values, index, labels, ctx.layout), ctx.label_ncat, ctx.layout, ctx.spill, chunk
        )
    return {
        "offsets": offsets,
        "missing": int(missing.sum()),
        "outside": int(outside.sum()),
        "n": len(index),
        "nonfinite": int((nonfinite & ~missing & ~outside).sum()),
    }


def _stage2(task: binning.BlockTask | tuple[int, ...], ctx: _Stage2) -> tuple[np.ndarray, np.ndarray]:
    """Reduce the blocks of one task (spilled: a ``BlockTask``; in memory: block ids) and write their
    chunks of every pyramid level.

    Returns per-channel (min, max) of the level-0 values over non-empty voxels (display windows).
    """
    C = ctx.n_channels
    if ctx.accumulator is None:
        reader = binning.SpillReader(ctx.spill, task, C, preload=task.nbytes <= _STAGE2_BUDGET)
        blocks = task.blocks
    else:
        blocks = task
    lo = np.full(C + 1, np.inf)
    hi = np.full(C + 1, -np.inf)
    for i, b in enumerate(blocks):
        level = (
            binning.reduce_block(reader, i, ctx.layout, C, ctx.label_ncat)
            if ctx.accumulator is None
            else ctx.accumulator.pop(b)
        )
        block_lo, block_hi = level.value_range()
        lo, hi = np.minimum(lo, block_lo), np.maximum(hi, block_hi)
        for k, image in enumerate(ctx.images):
            if k:
                level = level.coarsen(ctx.factor)
            region = ctx.layout.region(b, tuple(f**k for f in ctx.factor))  # = the shape of ``level``
            write_chunks(image, (slice(0, image.shape[0]), *region), level.means())
            for name, arrays in ctx.labels.items():
                write_chunks(arrays[k], region, level.labels[name])
    return lo, hi


# ----------------------------------------------------------------------------------- helpers
def _describe_existing(path: Path) -> str:
    try:
        meta = zarr.open_group(str(path), mode="r").attrs.get(ATTRS_KEY, {}).get("raster", {})
        g = meta.get("grid")
        if g:
            return f"a raster with grid space={g['space']}, voxel_size={g['voxel_size']} mm, shape={g['shape']}"
    except Exception:  # anything unreadable is described generically
        pass
    return "a store that is not an abc-pipeline raster"


def _check_target(out: Path, overwrite: bool) -> None:
    check_output(out, "raster", overwrite=True)  # never a file or folder of the user's, whatever the flag
    if not out.exists():
        return
    what = _describe_existing(out)
    if not overwrite:
        raise InputError(
            f"output {out} already exists ({what}); refusing to mix grids. Pass overwrite=True "
            "(CLI: --overwrite) to replace it atomically, or choose another path"
        )


def _resolve_labels(source: CellSource, labels: Sequence[str] | None) -> list[str]:
    if labels is None:
        present = set(source.obs_columns())
        return [c for c in DEFAULT_LABELS if c in present]
    out = []
    for name in labels:
        source.categorical(name)  # raises with close matches when absent or not categorical
        if name in out:
            raise InputError(f"label {name!r} requested twice")
        out.append(name)
    return out


def _row_chunk(source: CellSource, chunk_cells: int | None) -> int:
    target = chunk_cells or DEFAULT_CHUNK_CELLS
    if target < 1:
        raise InputError(f"chunk_cells must be >= 1, got {chunk_cells}")
    base = source.row_chunk
    return base * max(1, round(target / base))


def _bounds_zyx(space: str, bounds: Sequence[Sequence[float]]) -> tuple[list[float], list[float]]:
    pairs = [tuple(float(v) for v in p) for p in bounds]
    want = 2 if space == "section" else 3
    if len(pairs) != want or any(len(p) != 2 for p in pairs):
        axes = "(y, x)" if space == "section" else "(z, y, x)"
        raise InputError(
            f"bounds for space {space!r} need {want} (lower, upper) pairs in mm, ordered {axes}; got {bounds}"
        )
    if space == "section":
        pairs = [(0.0, 1.0), *pairs]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _find_grid(
    source: CellSource,
    runner: _Runner,
    space: str,
    voxel_size,
    bounds,
    margin: int,
    raw: da.Array,
    section: Categorical | None,
    section_codes: da.Array | None,
) -> tuple[Grid, np.ndarray | None]:
    """Step 0: the grid and, in section space, the section order (category code -> z index, -1 = absent).

    One Dask pass over the coordinates (extent) and section codes (order); none when ``bounds`` are
    given in a 3D space.
    """
    row_chunks = raw.chunks[0]
    todo = {}
    if bounds is None:
        zyx = (  # the section codes as a column, which Dask aligns with the rows of ``raw`` (a vector: its columns)
            da.map_blocks(_to_zyx, raw, section_codes[:, None], None, dtype=np.float64, chunks=(row_chunks, (3,)))
            if section is not None
            else raw[:, 2::-1]
        )
        todo["lower"], todo["upper"] = da.nanmin(zyx, axis=0), da.nanmax(zyx, axis=0)
    if section is not None:
        k = len(section.categories)
        zsec = (
            da.from_zarr(source.group["obs"]["z_section"]).rechunk((row_chunks,))
            if "z_section" in source.group["obs"]
            else da.full(source.n_cells, np.nan, chunks=(row_chunks,))
        )
        todo["present"] = da.bincount(section_codes + 1, minlength=k + 1)
        todo["zsum"] = da.bincount(section_codes + 1, weights=zsec, minlength=k + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns are reported below
        found = dict(zip(todo, runner.compute(list(todo.values()), "bounds")))
    sections, section_z, code_to_z = (), (), None
    if section is not None:
        present, zsum = found["present"][1:], found["zsum"][1:]
        used = np.flatnonzero(present > 0)
        sections = tuple(section.categories[i] for i in used)
        section_z = tuple((zsum[used] / present[used]).tolist())
        code_to_z = np.full(len(section.categories), -1, dtype=np.int64)
        code_to_z[used] = np.arange(used.size)
        if not sections:
            raise InputError(f"empty grid: no cell of {source.path} has a brain_section_label")
    if bounds is not None:
        lo, hi = _bounds_zyx(space, bounds)
        return Grid.from_bounds(space, lo, hi, voxel_size, sections, section_z), code_to_z
    lower, upper = found["lower"].tolist(), found["upper"].tolist()
    if not all(math.isfinite(v) for v in lower + upper):
        raise InputError(f"empty grid: no cell of {source.path} has coordinates in obsm['{COORDINATE_KEYS[space]}']")
    return Grid.around(space, lower, upper, voxel_size, margin, sections, section_z), code_to_z


# ----------------------------------------------------------------------------------- main entry
def rasterize(
    cells_path: str | Path,
    out_path: str | Path,
    *,
    space: str = "reconstructed",
    voxel_size: float | Sequence[float] | None = None,
    bounds: Sequence[Sequence[float]] | None = None,
    margin: int = 1,
    genes: Sequence[str] | None = None,
    pca: int | None = None,
    pca_sample: int = 100_000,
    labels: Sequence[str] | None = None,
    levels: int = 2,
    chunk_cells: int | None = None,
    scheduler: str = "threads",
    num_workers: int | None = None,
    address: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    seed: int = 0,
    max_accumulator_gb: float = 1.5,
    max_voxels: int | None = MAX_VOXELS,
    drop_nonfinite: bool = False,
    channels: ChannelPlan | None = None,
) -> Path:
    """Rasterize ``cells_path`` (cells.zarr) into the OME-Zarr raster ``out_path``; returns ``out_path``.

    Parameters
    ----------
    space: ``section`` (2D per section, z = section order), ``reconstructed`` or ``ccf`` (3D).
    voxel_size: mm; one value (y = x [= z in 3D]), two (y, x) or three (z, y, x); default per space
        (``grid.DEFAULT_VOXEL_SIZE``: 25 um sections, 0.2 x 0.05 x 0.05 mm reconstructed, 0.1 mm CCF).
    bounds: ((lo, hi) per axis in mm, ordered (z, y, x), or (y, x) in section space); default: the data
        extent plus ``margin`` voxels per side. Cells outside are skipped, counted and reported.
    genes: channel genes (symbols or ids; default all non-blank genes); ``pca``: use the first ``pca``
        principal components of those genes instead, fitted on ``pca_sample`` cells. ``channels``: a
        ready channel plan instead (e.g. a trained model's, :func:`abc_pipeline.raster.channels.plan_from_definition`).
    labels: categorical obs columns to rasterize as majority-label volumes (default: those of
        ``DEFAULT_LABELS`` present).
    levels: pyramid levels (>= 2); ``chunk_cells``: cells per task (rounded to X's Zarr chunks).
    scheduler / num_workers: local Dask scheduler; ``address``: a ``dask.distributed`` scheduler
        address (``tcp://host:8786``), which then runs every step (needs a filesystem shared with the workers).
    overwrite: replace an existing raster (atomically); otherwise an existing path is an error.
    max_accumulator_gb: on local threaded runs, per-voxel sums are accumulated in memory when those of
        the occupied voxels (occupied voxels x (channels + 1) x 4 bytes; genes + 1 when whole rows of X
        are summed) fit this budget; otherwise (and on clusters) partial sums are spilled to disk next to
        the output and reduced block by block.
    max_voxels: largest grid accepted (``integrity.MAX_VOXELS`` by default; None: no cap).
    drop_nonfinite: skip cells with NaN / inf in X (counted and logged) instead of failing.
    """
    out = Path(out_path)
    check_disjoint(out, [cells_path])
    _check_target(out, overwrite)
    if int(levels) < 2:
        raise InputError(f"levels must be >= 2 (a multiscale pyramid), got {levels}")
    source = CellSource(cells_path)
    label_names = _resolve_labels(source, labels)
    plan = channels or plan_channels(
        source, genes=genes, pca=pca, pca_sample=pca_sample, seed=seed, drop_nonfinite=drop_nonfinite
    )
    runner = _Runner(scheduler, num_workers, address, progress)
    with staged_output(out, "raster", inputs=[source.path], overwrite=overwrite) as tmp, runner:
        _write(
            source,
            tmp,
            out.name.removesuffix(".ome.zarr"),
            runner,
            space,
            voxel_size,
            bounds,
            margin,
            plan,
            label_names,
            int(levels),
            _row_chunk(source, chunk_cells),
            max_accumulator_gb,
            max_voxels,
            drop_nonfinite,
        )
    log.info("wrote raster %s", out)
    return out


def _write(
    source: CellSource,
    tmp: Path,
    name: str,
    runner: _Runner,
    space: str,
    voxel_size,
    bounds,
    margin: int,
    plan: ChannelPlan,
    label_names: list[str],
    n_levels: int,
    rows: int,
    max_accumulator_gb: float,
    max_voxels: int | None,
    drop_nonfinite: bool,
) -> None:
    """Steps 0-3 (module docstring) into the temporary store ``tmp``; ``name`` names the image."""
    inputs = _cell_inputs(source, space, label_names, rows)
    # step 0: bounds and section order (coordinates only), then the empty store and where partial sums go
    grid, code_to_z = _find_grid(
        source, runner, space, voxel_size, bounds, margin, inputs.raw, inputs.section, inputs.section_codes
    )
    log.info(
        "grid: space=%s shape (z, y, x)=%s voxel=%s mm origin=%s", grid.space, grid.shape, grid.voxel_size, grid.origin
    )
    check_voxel_cap(grid.n_voxels, grid.shape, max_voxels)
    store = _create_store(tmp, source, grid, len(plan.names), inputs.labels, n_levels, rows)
    accumulator = _accumulator(
        runner,
        inputs.raw_blocks(),
        inputs.section_blocks(),
        code_to_z,
        grid,
        store.layout,
        plan,
        source.n_genes,
        store.label_ncat,
        max_accumulator_gb,
    )
    spill = None if accumulator is not None else tmp / "_spill"
    if spill is not None:
        spill.mkdir()
        log.info("spilling partial sums to %s", spill)
    # step 1: bin chunks of cells
    offsets, counts = _bin_cells(
        runner, source, inputs, grid, code_to_z, store, plan, accumulator, spill, rows, drop_nonfinite
    )
    _check_counts(counts, source, space, grid)
    # step 2: reduce blocks, write every pyramid level; step 3: metadata
    windows = _write_levels(runner, store, grid, len(plan.names), accumulator, spill, offsets)
    _write_metadata(store, source, grid, plan, inputs.labels, n_levels, windows, name, counts)


@dataclass(frozen=True)
class _CellInputs:
    """The per-cell Dask inputs of a run, all chunked like X (X itself is read by the stage-1 tasks)."""

    raw: da.Array  # (n_cells, 2 or 3) float stored coordinates in mm: (x, y) per section or (x, y, z)
    section: Categorical | None  # section space: the brain_section_label column; else None
    section_codes: da.Array | None  # (n_cells,) int codes of ``section`` (-1 = missing); None outside section space
    labels: dict[str, Categorical]  # label name -> its categorical obs column, in the requested order
    label_codes: list[da.Array]  # (n_cells,) int codes per label, in the order of ``labels``

    def raw_blocks(self) -> list[Delayed]:
        """One delayed (rows, 2 or 3) coordinate block per chunk of cells."""
        return list(self.raw.to_delayed().ravel())

    def section_blocks(self) -> list[Delayed | None]:
        """One delayed section-code block per chunk of cells (``None`` each outside section space)."""
        if self.section_codes is None:
            return [None] * self.raw.numblocks[0]
        return list(self.section_codes.to_delayed().ravel())


def _cell_inputs(source: CellSource, space: str, label_names: list[str], rows: int) -> _CellInputs:
    """Coordinates of ``space``, section codes (section space) and label codes of every cell, in chunks of
    ``rows`` cells (the last one shorter); raises ``InputError`` for an unknown space or missing z column."""
    if space not in COORDINATE_KEYS:
        raise InputError(f"unknown raster space {space!r}; choose one of {', '.join(COORDINATE_KEYS)}")
    n = source.n_cells
    row_chunks = tuple(min(rows, n - start) for start in range(0, n, rows))
    raw = source.coordinates(COORDINATE_KEYS[space]).rechunk((row_chunks, -1))
    if space != "section" and raw.shape[1] < 3:
        raise InputError(f"{source.path}: obsm['{COORDINATE_KEYS[space]}'] needs x, y, z columns for space {space!r}")
    section = source.categorical(keys.SECTION) if space == "section" else None
    section_codes = section.codes.rechunk((row_chunks,)) if section is not None else None
    labels = {label: source.categorical(label) for label in label_names}
    label_codes = [labels[label].codes.rechunk((row_chunks,)) for label in label_names]
    return _CellInputs(raw, section, section_codes, labels, label_codes)


@dataclass(frozen=True)
class _Store:
    """The arrays of the temporary raster store, created empty (steps 1 and 2 fill them)."""

    root: zarr.Group
    layout: binning.BlockLayout  # output blocks of level 0 (the unit of step 2)
    level_chunks: list[tuple[int, int, int]]  # spatial (z, y, x) chunk shape per pyramid level
    level_cc: list[int]  # channels per image chunk per pyramid level
    images: list[zarr.Array]  # level k: (channels + 1, z, y, x) float32
    label_arrays: dict[str, list[zarr.Array]]  # label name -> level k: (z, y, x) category codes + 1 (0 = none)
    label_ncat: dict[str, int]  # label name -> number of categories
    voxel_index: zarr.Array  # (n_cells, 3) int32 level-0 voxel (z, y, x) of each cell, -1 = not rasterized
    cell_label: zarr.Array  # (n_cells,) str obs names
    obs_names: zarr.Array | None  # input obs names the stage-1 tasks copy into ``cell_label`` (None: copied already)


def _create_store(
    tmp: Path,
    source: CellSource,
    grid: Grid,
    n_channels: int,
    labels: dict[str, Categorical],
    n_levels: int,
    rows: int,
) -> _Store:
    """Create the empty image pyramid (``n_channels`` + the count channel), one label pyramid per entry of
    ``labels`` and the per-cell tables (``rows`` cells per chunk) in ``tmp``; copies the obs names when
    their chunk files can be copied verbatim."""
    n = source.n_cells
    factor = grid.downsample_factors()
    block = binning.choose_block(grid.shape, n_channels + 1, factor[0] > 1, multiple=2 ** (n_levels - 1))
    layout = binning.BlockLayout(grid.shape, block)
    cc = min(_CHANNEL_CHUNK, n_channels + 1)
    root = zarr.open_group(str(tmp), mode="w", zarr_format=2)
    level_chunks = [layout.level_chunks(tuple(f**k for f in factor)) for k in range(n_levels)]
    # coarser levels hold more channels per chunk, so every level's chunks have about the same bytes
    level_cc = [min(n_channels + 1, cc * int(np.prod(factor)) ** k) for k in range(n_levels)]
    # only blocks with cells are written, and their image chunks are practically never all zero
    images = [
        create_array(
            root,
            str(k),
            (n_channels + 1, *grid.level(k).shape),
            (level_cc[k], *level_chunks[k]),
            np.float32,
            write_empty_chunks=True,
        )
        for k in range(n_levels)
    ]
    label_group = root.require_group("labels") if labels else None
    label_arrays, label_ncat = {}, {}
    for label, categorical in labels.items():
        ncat = len(categorical.categories)
        label_ncat[label] = ncat
        group = label_group.require_group(label)
        label_arrays[label] = [
            create_array(group, str(k), grid.level(k).shape, level_chunks[k], np.min_scalar_type(ncat + 1))
            for k in range(n_levels)
        ]
    cells = root.require_group("cells")
    voxel_index = create_array(cells, "voxel_index", (n, 3), (rows, 3), np.int32, fill_value=-1)
    obs_names = source.obs_names()
    cell_label = copy_array(obs_names, cells, "cell_label")  # chunk files copied verbatim where possible ...
    copied = cell_label is not None
    if not copied:  # ... else the stage-1 tasks copy their rows
        cell_label = create_array(cells, "cell_label", (n,), (rows,), str, fill_value="")
    return _Store(
        root,
        layout,
        level_chunks,
        level_cc,
        images,
        label_arrays,
        label_ncat,
        voxel_index,
        cell_label,
        None if copied else obs_names,
    )


@dataclass(frozen=True)
class _CellCounts:
    """What step 1 did with the cells of a run."""

    cells: int  # all cells of the store
    missing: int  # without coordinates (or, in section space, without a section)
    outside: int  # outside the grid bounds
    nonfinite: int  # NaN / inf in X, skipped (drop_nonfinite)

    @property
    def rasterized(self) -> int:
        """Cells binned into a voxel."""
        return self.cells - self.missing - self.outside - self.nonfinite


def _bin_cells(
    runner: _Runner,
    source: CellSource,
    inputs: _CellInputs,
    grid: Grid,
    code_to_z: np.ndarray | None,
    store: _Store,
    plan: ChannelPlan,
    accumulator: binning.BlockAccumulator | None,
    spill: Path | None,
    rows: int,
    drop_nonfinite: bool,
) -> tuple[list, _CellCounts]:
    """Step 1: one ``_stage1`` task per chunk of ``rows`` cells, adding to ``accumulator`` or spilling to
    ``spill``; returns the spill offsets of every chunk (``None`` entries with an accumulator) and the counts."""
    ctx = _shared(
        _Stage1(
            grid,
            store.layout,
            source,
            _ThreadBuffers(),
            plan,
            code_to_z,
            store.label_ncat,
            store.voxel_index,
            store.obs_names,
            store.cell_label,
            spill,
            accumulator,
            accumulator is not None and _whole_rows(plan, source.n_genes),
            drop_nonfinite,
        ),
        "stage1-context",
    )
    rb, sb = inputs.raw_blocks(), inputs.section_blocks()
    lb = [codes.to_delayed().ravel() for codes in inputs.label_codes]
    tasks = [dask.delayed(_stage1)(rb[i], sb[i], [col[i] for col in lb], ctx, i, i * rows) for i in range(len(rb))]
    results = runner.compute(tasks, "binning cells")
    del tasks, ctx  # frees the per-thread X buffers
    counts = _CellCounts(
        source.n_cells,
        sum(r["missing"] for r in results),
        sum(r["outside"] for r in results),
        sum(r["nonfinite"] for r in results),
    )
    return [r["offsets"] for r in results], counts


def _check_counts(counts: _CellCounts, source: CellSource, space: str, grid: Grid) -> None:
    """Log the cells step 1 skipped; raise ``InputError`` when it binned none."""
    n = counts.cells
    if counts.missing:
        log.warning(
            "%d of %d cells have no coordinates in obsm['%s'] (skipped; voxel index -1)",
            counts.missing,
            n,
            COORDINATE_KEYS[space],
        )
    if counts.outside:
        log.warning("%d of %d cells lie outside the grid bounds (skipped; voxel index -1)", counts.outside, n)
    if counts.nonfinite:
        log.warning(
            "%d of %d cells have NaN or inf in X (skipped, --drop-nonfinite; voxel index -1)", counts.nonfinite, n
        )
    if counts.rasterized == 0:
        raise InputError(
            f"no cell of {source.path} falls inside the grid (z, y, x) {grid.origin} .. {grid.upper} mm; "
            "check the bounds"
        )


def _write_levels(
    runner: _Runner,
    store: _Store,
    grid: Grid,
    n_channels: int,
    accumulator: binning.BlockAccumulator | None,
    spill: Path | None,
    offsets: list,
) -> list[tuple[float, float]]:
    """Step 2: reduce every occupied block (from ``accumulator``, or the partial sums spilled at ``offsets``)
    and write its chunks of every pyramid level; removes the spill. Returns the display window (min, max)
    of every channel, count channel last, over the non-empty level-0 voxels."""
    if accumulator is None:
        block_tasks = binning.plan_block_tasks(offsets, n_channels, _STAGE2_BUDGET)
    else:
        block_tasks = [(b,) for b in accumulator.blocks()]  # one block per task: balanced over threads
    ctx = _shared(
        _Stage2(
            store.layout,
            n_channels,
            store.label_ncat,
            spill,
            accumulator,
            grid.downsample_factors(),
            store.images,
            store.label_arrays,
        ),
        "stage2-context",
    )
    ranges = runner.compute([dask.delayed(_stage2)(t, ctx) for t in block_tasks], "writing voxels")
    lo = np.min([r[0] for r in ranges], axis=0)
    hi = np.max([r[1] for r in ranges], axis=0)
    if spill is not None:
        shutil.rmtree(spill)
    return list(zip(lo.tolist(), hi.tolist()))


def _write_metadata(
    store: _Store,
    source: CellSource,
    grid: Grid,
    plan: ChannelPlan,
    labels: dict[str, Categorical],
    n_levels: int,
    windows: list[tuple[float, float]],
    name: str,
    counts: _CellCounts,
) -> None:
    """Step 3: OME-Zarr image and label metadata, the PCA of PCA channels and the ``abc_pipeline.raster``
    attributes; ``name`` names the image, ``windows`` are its channels' display windows."""
    root = store.root
    channels = [*plan.names, COUNT_CHANNEL]
    write_image_metadata(root, grid, n_levels, channels, windows, name=name)
    for label, c in labels.items():
        colors = c.colors if c.colors is not None else default_colors(len(c.categories))
        if c.colors is None:
            log.warning("%s: no uns['%s_colors']; label colours generated", source.path, label)
        write_labels_metadata(root["labels"], label, grid, n_levels, c.categories, colors)
    if plan.pca is not None:
        _write_pca(root.require_group("pca"), plan)
    root.attrs[ATTRS_KEY] = {
        "raster": {
            "format_version": 1,
            "created_by": f"abc_pipeline {__version__}",
            "ngff_version": NGFF_VERSION,
            "source": str(source.path),
            "grid": grid.to_attrs(),
            "channels": channels,
            "feature_channels": list(plan.names),
            "count_channel": COUNT_CHANNEL,
            "channel_mode": plan.mode,
            "aggregation": "mean over the cells of each voxel; 0 in empty voxels; n_cells = number of cells",
            "labels": list(labels),
            "levels": n_levels,
            "downsample_factors": list(grid.downsample_factors()),
            "chunks": [[c, *spatial] for c, spatial in zip(store.level_cc, store.level_chunks)],
            "voxel_index": "cells/voxel_index",
            "cell_label": "cells/cell_label",
            "counts": {
                "cells": counts.cells,
                "rasterized": counts.rasterized,
                "missing_coordinates": counts.missing,
                "outside_grid": counts.outside,
                "nonfinite_expression": counts.nonfinite,
            },
        }
    }


def _write_pca(group: zarr.Group, plan: ChannelPlan) -> None:
    """The fitted PCA of ``plan`` (components (k, genes), mean, explained variance, gene names) into ``group``."""
    pca = plan.pca
    for key, arr in (
        ("components", pca.components),
        ("mean", pca.mean),
        ("explained_variance", pca.explained_variance),
        ("explained_variance_ratio", pca.explained_variance_ratio),
    ):
        create_array(group, key, arr.shape, arr.shape, arr.dtype)[...] = arr
    create_array(group, "genes", (len(pca.genes),), (len(pca.genes),), str, fill_value="")[...] = np.array(pca.genes)
    group.attrs[ATTRS_KEY] = {
        "n_sample": pca.n_sample,
        "seed": pca.seed,
        "scores": "PCk = (x[genes] - mean) @ components[k-1]",
    }
