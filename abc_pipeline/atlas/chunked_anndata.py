"""Write an AnnData Zarr store chunk by chunk, in anndata's on-disk format.

``anndata.AnnData.write_zarr`` needs the whole object in memory. For atlases of millions of cells we pre-allocate
the big arrays (X, obs columns, obsm) with their final shapes and fill them slice by slice; small elements
(var, uns, category tables) are written with :func:`anndata.io.write_elem`. The result reads back with
``anndata.read_zarr`` / ``scanpy`` like any other store.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import anndata
import numpy as np
import pandas as pd
import zarr

_ARRAY = {"encoding-type": "array", "encoding-version": "0.2.0"}
_STRINGS = {"encoding-type": "string-array", "encoding-version": "0.2.0"}


class ChunkedAnnDataWriter:
    """Pre-allocated AnnData store filled by row blocks.

    Args:
        path: the ``.zarr`` directory to create (must not exist).
        n_obs: number of cells (rows).
        var: the var table (index = var_names), written at once.
        chunk_rows: Zarr chunk length along cells for every per-cell array.
        index_name: name of the obs index (``cell_label``).
        numeric_obs: obs column name -> numpy dtype, for numeric/bool columns.
        categorical_obs: obs column name -> categories (list of str, in display order).
        obsm: key -> number of columns (float64 arrays such as coordinates).
        obs_order: final column order of obs (default: numeric then categorical, as given).
    """

    def __init__(
        self,
        path: Path,
        n_obs: int,
        var: pd.DataFrame,
        chunk_rows: int,
        index_name: str,
        numeric_obs: Mapping[str, Any],
        categorical_obs: Mapping[str, Sequence[str]],
        obsm: Mapping[str, int],
        obs_order: Sequence[str] | None = None,
    ) -> None:
        self.n_obs = n_obs
        self.chunk = max(1, min(chunk_rows, max(n_obs, 1)))
        self.root = zarr.open_group(str(path), mode="w-", zarr_format=2)
        self.root.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        anndata.io.write_elem(self.root, "var", var)
        n_vars = var.shape[0]
        self.X = self.root.create_array("X", shape=(n_obs, n_vars), chunks=(self.chunk, n_vars), dtype="float32")
        self.X.attrs.update(_ARRAY)

        obs = self.root.create_group("obs")
        columns = list(obs_order) if obs_order is not None else [*numeric_obs, *categorical_obs]
        obs.attrs.update(
            {"_index": index_name, "column-order": columns, "encoding-type": "dataframe", "encoding-version": "0.2.0"}
        )
        self.index = obs.create_array(index_name, shape=(n_obs,), chunks=(self.chunk,), dtype=str)
        self.index.attrs.update(_STRINGS)
        self.numeric: dict[str, zarr.Array] = {}
        for name, dtype in numeric_obs.items():
            arr = obs.create_array(name, shape=(n_obs,), chunks=(self.chunk,), dtype=dtype)
            arr.attrs.update(_ARRAY)
            self.numeric[name] = arr
        self.categorical: dict[str, tuple[pd.Index, zarr.Array]] = {}
        for name, categories in categorical_obs.items():
            group = obs.create_group(name)
            group.attrs.update({"ordered": False, "encoding-type": "categorical", "encoding-version": "0.2.0"})
            cats = pd.Index(list(categories), dtype=object)
            anndata.io.write_elem(group, "categories", np.asarray(cats, dtype=object))
            codes_dtype = np.int8 if len(cats) < 127 else np.int16 if len(cats) < 32767 else np.int32
            codes = group.create_array("codes", shape=(n_obs,), chunks=(self.chunk,), dtype=codes_dtype)
            codes.attrs.update(_ARRAY)
            self.categorical[name] = (cats, codes)

        obsm_group = self.root.create_group("obsm")
        obsm_group.attrs.update({"encoding-type": "dict", "encoding-version": "0.1.0"})
        self.obsm: dict[str, zarr.Array] = {}
        for key, width in obsm.items():
            arr = obsm_group.create_array(key, shape=(n_obs, width), chunks=(self.chunk, width), dtype="float64")
            arr.attrs.update(_ARRAY)
            self.obsm[key] = arr
        for empty in ("layers", "obsp", "varm", "varp"):
            self.root.create_group(empty).attrs.update({"encoding-type": "dict", "encoding-version": "0.1.0"})

    def write_rows(
        self,
        start: int,
        index: Sequence[str],
        X: np.ndarray,
        obs: pd.DataFrame,
        obsm: Mapping[str, np.ndarray],
    ) -> None:
        """Write rows ``start : start + len(index)``.

        Args:
            index: cell labels of the block.
            X: (rows, n_vars) float32 block.
            obs: block of obs columns (numeric columns as numbers, categorical ones as strings / NaN).
            obsm: key -> (rows, width) float64 block.
        """
        stop = start + len(index)
        self.index[start:stop] = np.asarray(index, dtype=object)
        self.X[start:stop] = np.asarray(X, dtype=np.float32)
        for name, arr in self.numeric.items():
            arr[start:stop] = obs[name].to_numpy(dtype=arr.dtype)
        for name, (cats, codes) in self.categorical.items():
            codes[start:stop] = pd.Categorical(obs[name], categories=cats).codes.astype(codes.dtype)
        for key, arr in self.obsm.items():
            arr[start:stop] = obsm[key]

    def write_uns(self, uns: Mapping[str, Any]) -> None:
        """Write the whole ``uns`` mapping (small, in memory)."""
        anndata.io.write_elem(self.root, "uns", dict(uns))

    def close(self) -> None:
        """Consolidate metadata so readers open the store with one request."""
        zarr.consolidate_metadata(self.root.store)
