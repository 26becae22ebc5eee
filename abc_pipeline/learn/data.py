"""Datasets over OME-Zarr rasters: section-disjoint splits, class tables, normalisation, patches and tiles.

Everything is read lazily from the raster's level 0 (``c, z, y, x``; the last channel ``n_cells``):
one z-plane at a time through a small LRU cache (``cache_bytes``), never the whole volume.

- Splits (:func:`section_splits`) are contiguous blocks of z indices (sections of a ``section`` raster, z
  slabs of a 3D one), never random voxels; each split gets a few blocks interleaved along z (default 3) so
  that every split spans the anterior-posterior axis; the seed chooses the order of the splits. A cell
  belongs to the split of its voxel's z (:func:`cell_splits`; ``"none"`` without a voxel).
- Block splits (:func:`block_splits`, for datasets of one or a few sections): square blocks of
  ``block_size`` mm in (y, x) inside each z-plane, whole occupied blocks per split, cut like sections
  (contiguous runs of blocks in raster order, interleaved); ``splits["blocks"]`` holds the block size in
  voxels and the split code of every block, the z lists the planes that hold a block of each split.
  Readers then see only their split's blocks (:func:`split_mask`: other voxels read as empty space).
- Model input (:class:`Normalizer`): the feature channels standardised with the per-channel mean/std over
  the tissue voxels (``n_cells > 0``) of the training split, 0 in empty voxels, plus one ``tissue``
  channel (1 where ``n_cells > 0``): ``C_in = n_features + 1`` channels. Voxels outside the volume, and
  in 3D outside the split's z indices (no leakage between splits), read as 0 (and target -1).
- Targets (:class:`ClassTable`): the classes of one label level in the order of the raster's label table
  (``labels/<level>``; without it the category order of ``cells.zarr``), categories in ``ignore``
  (``"unassigned"``) left out; a voxel label / cell category maps to its class index or -1 (not counted).
- :class:`CellPatchDataset`: one sample per cell of the split with a voxel and a label: the patch of
  ``patch_size + 2 * halo`` voxels centred on the cell's voxel, target the cell's own label.
- :class:`TileDataset`: regular tiles over the split's z-blocks that contain a labelled voxel; target the
  per-voxel label volume (-1 where there are no cells).

2D models see ``(C_in, y, x)`` per z-plane (z is the batch); 3D models ``(C_in, z, y, x)``.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import dask.array as da
import numpy as np
import pandas as pd
import torch
import zarr
from torch.utils.data import Dataset

from abc_pipeline.cells import CellSource
from abc_pipeline.errors import InputError
from abc_pipeline.learn.choices import DEFAULT_FRACTIONS, DEFAULT_SPLIT_BLOCKS
from abc_pipeline.raster.ome import Raster, default_colors

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
NO_SPLIT = "none"
IGNORE_CATEGORIES = ("unassigned",)
DEFAULT_CACHE_BYTES = 1 << 30
_CELL_CHUNK = 1 << 20  # cells per read of the per-cell tables


# ----------------------------------------------------------------------------------------------- splits
def names_digest(names: zarr.Array, chunk: int = 1 << 16) -> str:
    """SHA-1 (16 hex digits) of a cell-name array, read in chunks (identifies a cells.zarr's obs order)."""
    h = hashlib.sha1()
    for s in range(0, names.shape[0], chunk):
        h.update("\n".join(str(v) for v in np.asarray(names[s : s + chunk]).tolist()).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


def section_splits(
    n_sections: int, fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0, blocks: int = DEFAULT_SPLIT_BLOCKS
) -> dict[str, list[int]]:
    """Interleaved contiguous blocks of z indices ``0..n_sections-1`` for ``train``, ``val``, ``test``.

    Split sizes are the fractions (normalised) rounded by largest remainder, each split with a positive
    fraction getting at least one section. The z axis is then cut into ``k = min(blocks, smallest
    non-empty split size)`` consecutive segments, each holding one contiguous block of every non-empty
    split (a split's size spread over the segments as evenly as possible), so that every split samples
    the whole anterior-posterior extent: with one block per split (``blocks=1``) the test block holds
    regions that training never saw. ``seed`` picks the order of the splits within a segment (the same
    in every segment).
    """
    f = np.asarray(fractions, dtype=float)
    if f.shape != (3,) or (f < 0).any() or f.sum() <= 0:
        raise InputError(f"split fractions must be 3 non-negative numbers (train val test), got {list(fractions)}")
    if int(blocks) < 1:
        raise InputError(f"split blocks must be >= 1 (blocks per split along z), got {blocks}")
    wanted = int((f > 0).sum())
    if n_sections < wanted:
        raise InputError(
            f"{n_sections} sections cannot be split into {wanted} non-empty blocks "
            f"(fractions {list(fractions)}); rasterize more sections or set a fraction to 0"
        )
    exact = f / f.sum() * n_sections
    sizes = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - sizes), kind="stable")[: n_sections - sizes.sum()]:
        sizes[i] += 1
    for i in np.flatnonzero((f > 0) & (sizes == 0)):
        sizes[np.argmax(sizes)] -= 1
        sizes[i] = 1
    k = int(min(int(blocks), sizes[sizes > 0].min()))
    per_segment = sizes[:, None] // k + (np.arange(k)[None, :] < (sizes % k)[:, None])  # (split, segment)
    order = np.random.default_rng(seed).permutation(3)
    out: dict[str, list[int]] = {name: [] for name in SPLITS}
    start = 0
    for segment in range(k):
        for i in order:
            size = int(per_segment[i, segment])
            out[SPLITS[i]] += range(start, start + size)
            start += size
    return out


def raster_splits(
    raster: Raster, fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0, blocks: int = DEFAULT_SPLIT_BLOCKS
) -> dict[str, list[int]]:
    """:func:`section_splits` of the z indices that hold cells, widened to cover every z index.

    Empty z indices (margins, gaps) join the split of the occupied index below them (those before the
    first occupied index, that of the first), so blocks stay contiguous and a split's size counts
    occupied sections only.
    """
    nz = raster.grid.shape[0]
    occupied = np.flatnonzero(np.asarray((raster.n_cells > 0).any(axis=(1, 2)).compute()))
    if not occupied.size:
        raise InputError(f"{raster.path}: the raster holds no cells")
    occupied_code = z_split_codes(section_splits(len(occupied), fractions, seed, blocks), len(occupied))
    below = np.clip(np.searchsorted(occupied, np.arange(nz), side="right") - 1, 0, None)
    code = occupied_code[below]
    return {name: np.flatnonzero(code == k).tolist() for k, name in enumerate(SPLITS)}


def block_splits(
    raster: Raster,
    block_size: float,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
    blocks: int = DEFAULT_SPLIT_BLOCKS,
) -> dict:
    """Splits of whole (y, x) blocks of ``block_size`` mm inside each z-plane, for one or a few sections.

    The occupied blocks (those holding a cell), in raster order (z, then y, then x), are cut like sections
    by :func:`section_splits` (contiguous runs, ``blocks`` interleaved segments, ``seed`` orders the
    splits), so a split is a set of whole spatial blocks, never random cells. Returns the z lists of
    :func:`raster_splits` (planes holding a block of each split) plus ``"blocks"``: ``{"size": [by, bx]``
    voxels, ``"codes"``: (nz, nby, nbx) nested lists of the index into ``SPLITS`` per block, -1 = empty``}``.
    """
    vy, vx = raster.grid.voxel_size[1:]
    if not (np.isfinite(block_size) and block_size > 0):
        raise InputError(f"split block size must be a positive number of mm, got {block_size}")
    by, bx = max(1, round(block_size / vy)), max(1, round(block_size / vx))
    nz, ny, nx = raster.grid.shape
    nby, nbx = -(-ny // by), -(-nx // bx)
    occupied = np.zeros((nz, nby * by, nbx * bx), bool)
    occupied[:, :ny, :nx] = np.asarray((raster.n_cells > 0).compute())
    occupied = occupied.reshape(nz, nby, by, nbx, bx).any(axis=(2, 4))
    ids = np.flatnonzero(occupied)
    if not ids.size:
        raise InputError(f"{raster.path}: the raster holds no cells")
    try:
        cut = section_splits(ids.size, fractions, seed, blocks)
    except InputError as exc:
        raise InputError(
            f"{raster.path}: {ids.size} occupied blocks of {block_size} mm: {exc}; choose a smaller split block size"
        ) from None
    codes = np.full(nz * nby * nbx, -1, np.int8)
    for k, name in enumerate(SPLITS):
        codes[ids[np.asarray(cut[name], dtype=np.int64)]] = k
    codes = codes.reshape(nz, nby, nbx)
    out: dict = {name: np.flatnonzero((codes == k).any(axis=(1, 2))).tolist() for k, name in enumerate(SPLITS)}
    out["blocks"] = {"size": [by, bx], "size_mm": float(block_size), "codes": codes.tolist()}
    return out


def split_mask(splits: dict, split: str, shape: Sequence[int]) -> np.ndarray | None:
    """``(nz, ny, nx)`` bool: the voxels of ``split`` under block splits; ``None`` for section splits."""
    blocks = splits.get("blocks")
    if not blocks:
        return None
    by, bx = blocks["size"]
    codes = np.asarray(blocks["codes"], dtype=np.int8) == SPLITS.index(split)
    full = codes.repeat(by, axis=1).repeat(bx, axis=2)
    return np.ascontiguousarray(full[:, : shape[1], : shape[2]])


def z_split_codes(splits: dict[str, Sequence[int]], n_z: int) -> np.ndarray:
    """``(n_z,)`` int8: index into ``SPLITS`` of each z index, -1 where it belongs to no split."""
    codes = np.full(n_z, -1, dtype=np.int8)
    for k, name in enumerate(SPLITS):
        codes[np.asarray(splits.get(name, []), dtype=np.int64)] = k
    return codes


def z_blocks(z_indices: Sequence[int]) -> list[tuple[int, int]]:
    """Maximal runs ``[start, stop)`` of consecutive z indices."""
    z = np.unique(np.asarray(z_indices, dtype=np.int64))
    if not z.size:
        return []
    cuts = np.flatnonzero(np.diff(z) > 1) + 1
    return [(int(b[0]), int(b[-1]) + 1) for b in np.split(z, cuts)]


def cell_splits(raster: Raster, splits: dict[str, Sequence[int]]) -> pd.Categorical:
    """Split of every cell (cells.zarr obs order) by its voxel's z; ``"none"`` for cells without a voxel.

    Read in chunks of the voxel index; the result holds one int8 code per cell.
    """
    lut = z_split_codes(splits, raster.grid.shape[0])
    blocks = splits.get("blocks")
    index = raster.voxel_index
    codes = np.empty(index.shape[0], dtype=np.int8)
    for s in range(0, index.shape[0], _CELL_CHUNK):
        vox = np.asarray(index[s : s + _CELL_CHUNK]).astype(np.int64)
        z = vox[:, 0]
        if blocks:  # the split of the cell's block
            by, bx = blocks["size"]
            table = np.asarray(blocks["codes"], dtype=np.int8)
            c = np.where(
                z >= 0,
                table[np.clip(z, 0, None), np.clip(vox[:, 1], 0, None) // by, np.clip(vox[:, 2], 0, None) // bx],
                -1,
            )
        else:
            c = np.where(z >= 0, lut[np.clip(z, 0, None)], -1)
        codes[s : s + len(z)] = np.where(c >= 0, c, len(SPLITS))
    return pd.Categorical.from_codes(codes, categories=[*SPLITS, NO_SPLIT])


# ----------------------------------------------------------------------------------------------- classes
@dataclass(frozen=True)
class ClassTable:
    """The classes of one label level.

    ``names`` / ``colors``: the classes (hex colours aligned); ``categories``: the source table (label value
    ``k >= 1`` of ``labels/<level>`` is ``categories[k - 1]``), a superset of ``names``.
    """

    level: str
    names: tuple[str, ...]
    colors: tuple[str, ...]
    categories: tuple[str, ...]

    def lookup(self, categories: Sequence[str]) -> np.ndarray:
        """``(len(categories),)`` int64: class index of each category name, -1 if it is not a class."""
        pos = {n: i for i, n in enumerate(self.names)}
        return np.array([pos.get(str(c), -1) for c in categories], dtype=np.int64)

    def label_lookup(self) -> np.ndarray:
        """``(len(categories) + 1,)`` int64: class index of each label value (0 = no cells -> -1)."""
        return np.concatenate([[-1], self.lookup(self.categories)])

    def to_dict(self) -> dict:
        return {
            "level": self.level,
            "names": list(self.names),
            "colors": list(self.colors),
            "categories": list(self.categories),
        }

    @classmethod
    def from_dict(cls, d: dict) -> ClassTable:
        return cls(d["level"], tuple(d["names"]), tuple(d["colors"]), tuple(d["categories"]))


def class_table(
    raster: Raster, cells: CellSource | None, level: str, ignore: Sequence[str] = IGNORE_CATEGORIES
) -> ClassTable:
    """Classes of ``level`` from ``raster.labels[level]``, else from the categorical ``cells.obs[level]``."""
    if level in raster.labels:
        lv = raster.labels[level]
        categories, colors = lv.categories, lv.colors
    elif cells is not None:
        cat = cells.categorical(level)
        categories, colors = cat.categories, cat.colors or default_colors(len(cat.categories))
    else:
        raise InputError(
            f"{raster.path}: no labels/{level} (label volumes: {', '.join(raster.labels) or 'none'}); "
            f"rasterize with --labels {level} or give the cells.zarr"
        )
    keep = [i for i, c in enumerate(categories) if c not in set(ignore)]
    if not keep:
        raise InputError(f"{raster.path}: level {level!r} has no categories besides {list(ignore)}")
    return ClassTable(level, tuple(categories[i] for i in keep), tuple(colors[i] for i in keep), tuple(categories))


# ----------------------------------------------------------------------------------------------- input
@dataclass(frozen=True)
class Normalizer:
    """Per-feature-channel ``mean`` / ``std`` ``(F,)`` over tissue voxels of the training split."""

    mean: np.ndarray
    std: np.ndarray

    @property
    def in_channels(self) -> int:
        """Model input channels: the features plus the tissue channel."""
        return len(self.mean) + 1

    def apply(self, image: np.ndarray) -> np.ndarray:
        """Raw raster values ``(F + 1, *spatial)`` (last = ``n_cells``) -> model input ``(F + 1, *spatial)``
        float32: standardised features in tissue voxels, 0 elsewhere; last channel 1 in tissue, else 0."""
        tissue = image[-1] > 0
        shape = (-1,) + (1,) * (image.ndim - 1)
        feats = (image[:-1] - self.mean.reshape(shape).astype(np.float32)) / self.std.reshape(shape).astype(np.float32)
        out = np.where(tissue, feats, np.float32(0)).astype(np.float32)
        return np.concatenate([out, tissue[None].astype(np.float32)])

    def to_dict(self) -> dict:
        return {"mean": [float(v) for v in self.mean], "std": [float(v) for v in self.std]}

    @classmethod
    def from_dict(cls, d: dict) -> Normalizer:
        return cls(np.asarray(d["mean"], dtype=np.float64), np.asarray(d["std"], dtype=np.float64))


def channel_stats(raster: Raster, z_indices: Sequence[int], mask: np.ndarray | None = None) -> Normalizer:
    """Mean and std of every feature channel over the tissue voxels of ``z_indices`` (and of ``mask``,
    (nz, ny, nx) bool, under block splits) (Dask, chunk-wise, float64 sums). Channels with std below 1e-6
    get std 1."""
    z = sorted(int(v) for v in z_indices)
    image = raster.levels[0]
    blocks = [image[:, a:b] for a, b in z_blocks(z)]
    if not blocks:
        raise InputError(f"{raster.path}: no z index to compute the input normalisation on")
    sel = da.concatenate(blocks, axis=1) if len(blocks) > 1 else blocks[0]
    tissue = sel[-1] > 0
    if mask is not None:
        tissue = tissue & da.from_array(np.concatenate([mask[a:b] for a, b in z_blocks(z)]), chunks=tissue.chunks)
    feats = da.where(tissue, sel[:-1], 0).astype(np.float64)
    s, s2, n = da.compute(feats.sum(axis=(1, 2, 3)), (feats**2).sum(axis=(1, 2, 3)), tissue.sum())
    if n == 0:
        raise InputError(
            f"{raster.path}: the training sections (z {z[0]}..{z[-1]}) hold no cells; "
            f"choose other --split-fractions or --seed"
        )
    mean = s / n
    std = np.sqrt(np.maximum(s2 / n - mean**2, 0))
    return Normalizer(mean, np.where(std < 1e-6, 1.0, std))


class RasterReader:
    """Normalised input windows and class-index label windows of a raster's level 0.

    ``allowed_z``: z indices that may be read (the split's); others, and everything outside the volume,
    read as input 0 and target -1; so do voxels outside ``mask`` ((nz, ny, nx) bool, the split's blocks
    under block splits, :func:`split_mask`). Whole z-planes are read and kept in an LRU cache of
    ``cache_bytes``.
    """

    def __init__(
        self,
        raster: Raster,
        normalizer: Normalizer,
        allowed_z: Sequence[int] | None = None,
        label: str | None = None,
        table: ClassTable | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        mask: np.ndarray | None = None,
    ) -> None:
        self.path = raster.path
        self.image = raster.level_array(0)
        self.shape = tuple(int(n) for n in raster.grid.shape)
        self.normalizer = normalizer
        self.allowed = (
            np.ones(self.shape[0], bool) if allowed_z is None else np.isin(np.arange(self.shape[0]), allowed_z)
        )
        self.labels = raster.level_array(0, label) if label is not None else None
        self.lut = table.label_lookup() if table is not None else None
        self.cache_bytes = cache_bytes
        self.mask = mask
        self._cache: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        self._bytes = 0

    @property
    def in_channels(self) -> int:
        return self.normalizer.in_channels

    def _cached(self, kind: str, z: int, read) -> np.ndarray:
        key = (kind, z)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        value = read()
        self._cache[key] = value
        self._bytes += value.nbytes
        while self._bytes > self.cache_bytes and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._bytes -= old.nbytes
        return value

    def plane(self, z: int) -> np.ndarray:
        """Model input of z-plane ``z``: ``(C_in, Y, X)`` float32."""

        def read() -> np.ndarray:
            x = self.normalizer.apply(np.asarray(self.image[:, z]))
            return x if self.mask is None else x * self.mask[z]

        return self._cached("image", z, read)

    def label_plane(self, z: int) -> np.ndarray:
        """Class indices of z-plane ``z``: ``(Y, X)`` int64, -1 where unlabelled."""
        if self.labels is None:
            raise InputError(f"{self.path}: this reader was opened without a label volume")

        def read() -> np.ndarray:
            y = self.lut[np.asarray(self.labels[z]).astype(np.int64)]
            return y if self.mask is None else np.where(self.mask[z], y, -1)

        return self._cached("label", z, read)

    def _window(self, lo: Sequence[int], size: Sequence[int], out: np.ndarray, get) -> np.ndarray:
        """Fill ``out[..., z, y, x]`` from planes ``get(z)`` over the box ``lo .. lo + size`` (z, y, x)."""
        overlap = clip_box(lo[1:], size[1:], self.shape[1:])
        if overlap is None:
            return out
        src, dst = overlap
        for k in range(size[0]):
            z = lo[0] + k
            if 0 <= z < self.shape[0] and self.allowed[z]:
                out[(..., k, *dst)] = get(z)[(..., *src)]
        return out

    def window(self, lo: Sequence[int], size: Sequence[int]) -> np.ndarray:
        """Input box starting at voxel ``lo`` (z, y, x; may be negative) of ``size`` voxels:
        ``(C_in, *size)`` float32, zero outside the volume and the allowed z indices."""
        out = np.zeros((self.in_channels, *size), dtype=np.float32)
        return self._window(lo, size, out, self.plane)

    def target_window(self, lo: Sequence[int], size: Sequence[int]) -> np.ndarray:
        """Class indices over the box: ``(*size)`` int64, -1 outside the volume/allowed z or unlabelled."""
        out = np.full(tuple(size), -1, dtype=np.int64)
        return self._window(lo, size, out, self.label_plane)


def clip_box(
    lo: Sequence[int], size: Sequence[int], shape: Sequence[int]
) -> tuple[tuple[slice, ...], tuple[slice, ...]] | None:
    """The part of the box ``lo .. lo + size`` (may reach outside) that lies in an array of ``shape``: its
    slices in the array and in the box, per axis; ``None`` when they do not overlap."""
    src = tuple(slice(max(a, 0), min(a + n, lim)) for a, n, lim in zip(lo, size, shape))
    if any(s.stop <= s.start for s in src):
        return None
    return src, tuple(slice(s.start - a, s.stop - a) for s, a in zip(src, lo))


def _box(dim: int, size: Sequence[int]) -> tuple[int, int, int]:
    """Window size (z, y, x) of a ``dim``-D model input of ``size`` (per model axis)."""
    size = tuple(int(s) for s in size)
    if len(size) != dim:
        raise InputError(f"expected {dim} sizes (one per model axis), got {size}")
    return (1, *size) if dim == 2 else size


def _split_z(splits: dict[str, Sequence[int]], split: str) -> list[int]:
    if split not in SPLITS:
        raise InputError(f"split must be one of {SPLITS}, got {split!r}")
    return sorted(int(z) for z in splits.get(split, []))


# ----------------------------------------------------------------------------------------------- patches
class CellPatchDataset(Dataset):
    """Per-cell patches of one split (``(input, target)`` pairs).

    Input ``(C_in, *(patch_size + 2 * halo))`` centred on the cell's voxel (``dim`` = 2: over (y, x) of
    its z-plane; 3: over (z, y, x)); target the class index of the cell's own ``level`` label. Cells
    without a voxel, outside the split or without a class are left out. ``max_samples``: keep a fixed
    seeded random subset of at most that many cells. Attributes: ``targets`` (N,) int64, ``cells`` (N,)
    int64 row numbers in cells.zarr, ``voxels`` (N, 3) int64.
    """

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
        *,
        max_samples: int | None = None,
        seed: int = 0,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        self.split, self.dim = split, dim
        zs = _split_z(splits, split)
        self.size = _box(dim, [p + 2 * h for p, h in zip(patch_size, halo)])
        mask = split_mask(splits, split, raster.grid.shape)
        self.reader = RasterReader(raster, normalizer, zs if dim == 3 else None, cache_bytes=cache_bytes, mask=mask)
        if cells.n_cells != raster.voxel_index.shape[0]:
            raise InputError(
                f"{cells.path} has {cells.n_cells} cells but {raster.path} indexes "
                f"{raster.voxel_index.shape[0]}; rasterize this cells.zarr"
            )
        codes = cells.categorical(table.level)
        lut = table.lookup(codes.categories)
        allowed = np.isin(np.arange(raster.grid.shape[0]), zs)
        keep_cells, keep_vox, keep_t = [], [], []
        index = raster.voxel_index
        for s in range(0, index.shape[0], _CELL_CHUNK):
            vox = np.asarray(index[s : s + _CELL_CHUNK]).astype(np.int64)
            c = np.asarray(codes.codes[s : s + len(vox)].compute()).astype(np.int64)
            t = np.where(c >= 0, lut[np.clip(c, 0, None)], -1)
            ok = (vox[:, 0] >= 0) & (t >= 0)
            ok[ok] = allowed[vox[ok, 0]] if mask is None else mask[vox[ok, 0], vox[ok, 1], vox[ok, 2]]
            keep_cells.append(np.flatnonzero(ok) + s)
            keep_vox.append(vox[ok])
            keep_t.append(t[ok])
        self.cells = np.concatenate(keep_cells)
        self.voxels = np.concatenate(keep_vox).reshape(-1, 3)
        targets = np.concatenate(keep_t)
        if max_samples is not None and len(self.cells) > max_samples:
            pick = np.sort(np.random.default_rng(seed).choice(len(self.cells), max_samples, replace=False))
            self.cells, self.voxels, targets = self.cells[pick], self.voxels[pick], targets[pick]
        if not len(self.cells):
            raise InputError(
                f"{raster.path}: split {split!r} (z {zs}) has no cell with a voxel and a "
                f"{table.level!r} class; choose other --split-fractions or --seed"
            )
        self.targets = torch.as_tensor(targets, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.cells)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        lo = [int(v) - n // 2 for v, n in zip(self.voxels[i], self.size)]
        x = self.reader.window(lo, self.size)
        return torch.from_numpy(x[:, 0] if self.dim == 2 else x), self.targets[i]


# ----------------------------------------------------------------------------------------------- tiles
def _starts(lo: int, hi: int, tile: int, stride: int) -> list[int]:
    """Tile starts covering ``[lo, hi)``; the last tile ends at ``hi`` when it fits."""
    if hi - lo <= tile:
        return [lo]
    out = list(range(lo, hi - tile + 1, stride))
    if out[-1] + tile < hi:
        out.append(hi - tile)
    return out


class TileDataset(Dataset):
    """Regular tiles of one split with per-voxel targets (``(input, target)`` pairs).

    ``tile_size``: per model axis (``dim`` sizes); tiles step by ``tile_size - overlap`` over (y, x) of
    every z-plane of the split (2D) or over (z, y, x) of every z-block of the split (3D); tiles without a
    labelled voxel are dropped. Input ``(C_in, *tile)``, target ``(*tile)`` int64 (-1: no cells, no class,
    outside the volume or the split). ``targets``: the labelled voxels' classes over all tiles (for
    class-balanced loss weights).
    """

    def __init__(
        self,
        raster: Raster,
        table: ClassTable,
        split: str,
        splits: dict[str, Sequence[int]],
        normalizer: Normalizer,
        dim: int,
        tile_size: Sequence[int],
        *,
        overlap: int = 0,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        if table.level not in raster.labels:
            raise InputError(
                f"{raster.path}: no labels/{table.level} volume for region training; rasterize with "
                f"--labels {table.level}"
            )
        self.split, self.dim = split, dim
        zs = _split_z(splits, split)
        self.size = _box(dim, tile_size)
        self.reader = RasterReader(
            raster,
            normalizer,
            zs,
            table.level,
            table,
            cache_bytes=cache_bytes,
            mask=split_mask(splits, split, raster.grid.shape),
        )
        steps = [max(1, n - overlap) for n in self.size]
        ny, nx = self.reader.shape[1:]
        zstarts = list(zs) if dim == 2 else [s for a, b in z_blocks(zs) for s in _starts(a, b, self.size[0], steps[0])]
        self.tiles: list[tuple[int, int, int]] = []
        counts = np.zeros(len(table.names), dtype=np.int64)
        for z0 in zstarts:
            for y0 in _starts(0, ny, self.size[1], steps[1]):
                for x0 in _starts(0, nx, self.size[2], steps[2]):
                    t = self.reader.target_window((z0, y0, x0), self.size)
                    t = t[t >= 0]
                    if t.size:
                        self.tiles.append((z0, y0, x0))
                        counts += np.bincount(t, minlength=len(counts))
        if not self.tiles:
            raise InputError(
                f"{raster.path}: split {split!r} (z {zs}) has no voxel labelled with a "
                f"{table.level!r} class; choose other --split-fractions or --seed"
            )
        self.targets = torch.repeat_interleave(torch.arange(len(counts)), torch.as_tensor(counts))

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        lo = self.tiles[i]
        x, y = self.reader.window(lo, self.size), self.reader.target_window(lo, self.size)
        if self.dim == 2:
            x, y = x[:, 0], y[0]
        return torch.from_numpy(x), torch.from_numpy(y)


def default_dim(raster: Raster) -> int:
    """2 for ``section`` rasters (per-section images), 3 otherwise."""
    return raster.grid.ndim_physical


def model_spacing(raster: Raster, dim: int) -> tuple[float, ...]:
    """Physical voxel size per model axis: (y, x) in 2D, (z, y, x) in 3D (mm)."""
    if dim == 3 and raster.grid.space == "section":
        raise InputError(f"{raster.path} is a section raster (2D per section); use --dim 2")
    return tuple(raster.grid.voxel_size[3 - dim :])


__all__ = [
    "CellPatchDataset",
    "ClassTable",
    "DEFAULT_FRACTIONS",
    "DEFAULT_SPLIT_BLOCKS",
    "NO_SPLIT",
    "Normalizer",
    "RasterReader",
    "SPLITS",
    "TileDataset",
    "block_splits",
    "cell_splits",
    "channel_stats",
    "class_table",
    "default_dim",
    "model_spacing",
    "raster_splits",
    "section_splits",
    "split_mask",
    "z_blocks",
    "z_split_codes",
]
