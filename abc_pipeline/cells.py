"""Read-only, chunked access to an assembled ``cells.zarr`` (AnnData on Zarr, docs/architecture.md).

Only small tables (var, categories, colours) are loaded eagerly; per-cell arrays are read by row
ranges (X) or exposed as Dask arrays chunked along cells (coordinates, categorical codes), so nothing
scales with the number of cells in memory.
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import dask.array as da
import numpy as np
import zarr
from zarr.buffer.cpu import NDBuffer
from zarr.core.buffer import default_buffer_prototype
from zarr.core.metadata import ArrayV2Metadata
from zarr.core.sync import sync

from abc_pipeline.errors import InputError
from abc_pipeline.integrity import check_shape, verify_store

log = logging.getLogger(__name__)


def _strings(values: np.ndarray) -> list[str]:
    return [str(v) for v in np.asarray(values).tolist()]


def close_matches(word: str, candidates: list[str], n: int = 3) -> str:
    """``" (did you mean a, b?)"`` or ``""`` — for error messages."""
    hits = difflib.get_close_matches(word, candidates, n=n, cutoff=0.6)
    return f" (did you mean {', '.join(hits)}?)" if hits else ""


@dataclass(frozen=True)
class Categorical:
    """One categorical ``obs`` column: codes (Dask, -1 = missing), categories and hex colours."""

    name: str
    codes: da.Array
    categories: tuple[str, ...]
    colors: tuple[str, ...] | None


class CellSource:
    """An AnnData ``cells.zarr`` opened for streaming.

    Parameters
    ----------
    path: the store written by ``abc-pipeline assemble`` (``AnnData.write_zarr``). Its chunk files are
    checked against the writer's record (:func:`abc_pipeline.integrity.verify_store`) and the obs / var
    indexes against X's shape.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"cells store {self.path} does not exist; run `abc-pipeline assemble` first")
        try:
            self.group = zarr.open_group(str(self.path), mode="r")
        except Exception as exc:  # zarr raises several types for "not a group"
            raise InputError(f"{self.path} is not a Zarr group (expected an AnnData cells.zarr): {exc}") from exc
        for key in ("X", "obs", "var", "obsm"):
            if key not in self.group:
                raise InputError(f"{self.path} has no '{key}'; expected an AnnData store written by write_zarr")
        x = self.group["X"]
        if not isinstance(x, zarr.Array) or x.ndim != 2:
            raise InputError(
                f"{self.path}/X must be a dense 2D array (cells x genes, float32); found {type(x).__name__}. "
                "Re-run assemble, which writes dense chunked X"
            )
        self._x = x
        fix = "Re-run `abc-pipeline assemble` to rebuild it"
        verify_store(self.path, fix)
        check_shape(self.path, "obs index (cell names)", self.obs_names().shape, (self.n_cells,), fix)
        var = self.group["var"]
        check_shape(self.path, "var index (genes)", var[var.attrs.get("_index", "_index")].shape, (self.n_genes,), fix)

    # ------------------------------------------------------------------ shapes
    @property
    def n_cells(self) -> int:
        return int(self._x.shape[0])

    @property
    def n_genes(self) -> int:
        return int(self._x.shape[1])

    @property
    def row_chunk(self) -> int:
        """Rows per Zarr chunk of X (reads are aligned to multiples of it)."""
        return int(self._x.chunks[0])

    # ------------------------------------------------------------------ var
    def _var_column(self, name: str) -> np.ndarray | None:
        var = self.group["var"]
        if name not in var:
            return None
        return np.asarray(var[name][:])

    @cached_property
    def gene_ids(self) -> list[str]:
        """``var_names`` (Ensembl ids or ``Blank-NN``)."""
        index_key = self.group["var"].attrs.get("_index", "_index")
        return _strings(self.group["var"][index_key][:])

    @cached_property
    def gene_symbols(self) -> list[str]:
        """``var['gene_symbol']``, falling back to ``var_names``."""
        sym = self._var_column("gene_symbol")
        return self.gene_ids if sym is None else _strings(sym)

    @cached_property
    def blank(self) -> np.ndarray:
        """(n_genes,) bool: ``var['blank']``, else genes whose id or symbol starts with ``Blank``."""
        col = self._var_column("blank")
        if col is not None:
            return col.astype(bool)
        return np.array(
            [g.startswith("Blank") or s.startswith("Blank") for g, s in zip(self.gene_ids, self.gene_symbols)]
        )

    # ------------------------------------------------------------------ per-cell arrays
    @cached_property
    def _direct_decode(self) -> bool:
        """Whether whole chunks of X can be decoded straight into a caller's array: Zarr v2, float32
        (native order), C order, chunks spanning all genes, a compressor and no filters."""
        md = self._x.metadata
        return (
            isinstance(md, ArrayV2Metadata)
            and self._x.dtype == np.dtype(np.float32)
            and md.order == "C"
            and not md.filters
            and md.compressor is not None
            and md.chunks[1] == self.n_genes
        )

    def read_X(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``start:stop`` of X as (rows, n_genes) float32, decoded into ``out`` when given (a
        C-contiguous array of that shape and dtype, reused by the caller) and X is float32.

        Complete chunks of X are decoded by its compressor straight into ``out`` when possible
        (``_direct_decode``): zarr-python decodes every chunk into fresh memory and copies it, and the
        page faults of that fresh memory cost about as much as the decompression itself.
        """
        try:
            return self._read_X(start, stop, out)
        except (RuntimeError, ValueError, OSError) as exc:  # numcodecs: "blosc decompression error", ...
            raise InputError(
                f"{self.path}: X rows {start}..{stop - 1} cannot be decoded ({exc}); a chunk file of "
                f"X is corrupt. Re-run `abc-pipeline assemble` to rebuild the store"
            ) from exc

    def _read_X(self, start: int, stop: int, out: np.ndarray | None) -> np.ndarray:
        if out is None or self._x.dtype != np.float32:
            return np.asarray(self._x[start:stop], dtype=np.float32)
        step, lo = self.row_chunk, start
        while lo < stop:  # chunk by chunk
            hi = min(stop, (lo // step + 1) * step)
            if self._direct_decode and lo % step == 0 and hi - lo == step:
                self._decode_chunk(lo // step, out[lo - start : hi - start])
            else:
                self._x.get_basic_selection(slice(lo, hi), out=NDBuffer.from_numpy_array(out[lo - start : hi - start]))
            lo = hi
        return out

    def _decode_chunk(self, i: int, out: np.ndarray) -> None:
        """Decode chunk row ``i`` of X (all genes) into ``out`` (row_chunk, n_genes) float32."""
        md = self._x.metadata
        key = f"{self._x.store_path.path}/{md.encode_chunk_key((i, 0))}".lstrip("/")
        raw = sync(self._x.store_path.store.get(key, prototype=default_buffer_prototype()))
        if raw is None:  # chunk never written
            out[...] = md.fill_value or 0
        else:
            md.compressor.decode(raw.as_numpy_array(), out=out)

    def coordinates(self, key: str) -> da.Array:
        """``obsm[key]`` as Dask (n_cells, d) float64 in mm, column order as stored (x, y[, z])."""
        obsm = self.group["obsm"]
        if key not in obsm:
            raise InputError(f"{self.path}: obsm['{key}'] is missing; it is required for this raster space")
        arr = obsm[key]
        if not isinstance(arr, zarr.Array) or arr.ndim != 2 or arr.shape[0] != self.n_cells:
            raise InputError(f"{self.path}: obsm['{key}'] must be a (n_cells, d) array of coordinates in mm")
        return da.from_zarr(arr).astype(np.float64)

    def obs_names(self) -> zarr.Array:
        """The ``obs_names`` (``cell_label``) string array."""
        obs = self.group["obs"]
        return obs[obs.attrs.get("_index", "_index")]

    def obs_columns(self) -> list[str]:
        obs = self.group["obs"]
        return [k for k in obs.attrs.get("column-order", list(obs.keys())) if k != obs.attrs.get("_index", "_index")]

    def categorical(self, name: str) -> Categorical:
        """A categorical ``obs`` column with its colours from ``uns['<name>_colors']`` (None if absent)."""
        obs = self.group["obs"]
        if name not in obs:
            cats = [c for c in self.obs_columns() if isinstance(obs.get(c), zarr.Group)]
            raise InputError(
                f"{self.path}: obs['{name}'] does not exist{close_matches(name, cats)}; "
                f"categorical columns: {', '.join(cats) or 'none'}"
            )
        node = obs[name]
        if not isinstance(node, zarr.Group) or "codes" not in node or "categories" not in node:
            raise InputError(f"{self.path}: obs['{name}'] is not categorical; labels need a categorical column")
        categories = tuple(_strings(node["categories"][:]))
        colors = None
        uns = self.group.get("uns")
        key = f"{name}_colors"
        if uns is not None and key in uns:
            values = _strings(uns[key][:])
            if len(values) == len(categories):
                colors = tuple(values)
            else:
                log.warning(
                    "%s: uns['%s'] has %d colours for %d categories; using generated colours",
                    self.path,
                    key,
                    len(values),
                    len(categories),
                )
        check_shape(
            self.path,
            f"obs['{name}'] codes",
            node["codes"].shape,
            (self.n_cells,),
            "Re-run `abc-pipeline assemble` to rebuild it",
        )
        return Categorical(name, da.from_zarr(node["codes"]), categories, colors)
