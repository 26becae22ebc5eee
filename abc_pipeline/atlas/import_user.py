"""Import a user's spatial data into the ``cells.zarr`` contract (``abc-pipeline import``; docs/architecture.md).

Two inputs:

- an **AnnData** file (``.h5ad``) or store (``.zarr``): coordinates in ``obsm[<key>]`` (n_cells, 2 or 3;
  x, y[, z]) in µm or mm, an optional section/batch column in ``obs`` (else one section), optional label
  columns, genes as ``var_names`` (symbols or ids) with an optional symbol column;
- a Vizgen **MERSCOPE** output folder: ``cell_by_gene.csv`` (first column the cell id, one column per gene
  including ``Blank-*`` barcodes; raw counts) and ``cell_metadata.csv`` (first column the cell id, ``center_x``,
  ``center_y`` in µm, ``fov``, ``volume``, ...): the layout that ``squidpy.read.vizgen`` and spatialdata-io read.
  A ``<prefix>_cell_by_gene.csv`` / ``<prefix>_cell_metadata.csv`` pair is accepted too.

Output (one writer for both: :class:`abc_pipeline.atlas.chunked_anndata.ChunkedAnnDataWriter`):
``X`` log2 expression float32 (``expression="counts"``: ``log2(x + 1)`` of the input; ``"log2"``: as is);
``var_names`` the gene ids (or the symbols when no id is known), ``var['gene_symbol']``, ``var['blank']``
(blank / negative-control probes flagged by name, kept), the input's var columns; ``obs`` the input's columns
(strings as categoricals) plus ``brain_section_label`` (categorical, ordered by section z when 3D, else by
name) and ``z_section`` (mm; NaN for 2D data); ``obsm['spatial']`` x, y (mm) and, for 3D input,
``obsm['spatial_3d']`` x, y, z (mm); ``uns['abc_pipeline']['import']`` the provenance. The cell order is the
input's.

Memory: per-cell metadata (obs, coordinates: about 100 bytes per cell) is held in memory; the expression
matrix is streamed ``chunk_cells`` rows at a time (h5ad/zarr: backed row slices of dense or CSR ``X``;
MERSCOPE: ``pandas.read_csv(chunksize=...)``). Every input error is raised before or while writing into a
staged store, so nothing half-written is left behind.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
import zarr
from anndata.io import read_elem, sparse_dataset

from abc_pipeline import keys
from abc_pipeline.atlas.chunked_anndata import ChunkedAnnDataWriter
from abc_pipeline.atlas.user_options import (
    DEFAULT_CHUNK_CELLS,
    DEFAULT_COORDINATES,
    DEFAULT_UNIT,
    EXPRESSION,
    KINDS,
    UNITS,
)
from abc_pipeline.errors import InputError
from abc_pipeline.fileio import staged_output

log = logging.getLogger(__name__)

SECTION = keys.SECTION
#: Blank / negative-control probe names (MERSCOPE ``Blank-NN``, Xenium ``NegControlProbe_*``, ...).
BLANK_PATTERN = re.compile(
    r"^(blank|negcontrol|negprb|neg_control|unassignedcodeword|deprecatedcodeword|"
    r"intergenic|antisense)",
    re.IGNORECASE,
)
#: Median distance (mm) between neighbouring cells that a tissue section can have; outside it the declared
#: unit is wrong (µm read as mm gives ~1000x the distance, mm read as µm ~1/1000).
NEIGHBOUR_DISTANCE_MM = (1e-4, 2.0)
_DENSITY_SAMPLE = 20_000
_SYMBOL_COLUMNS = ("gene_symbol", "gene_symbols", "symbol", "feature_name", "gene_name", "gene_names")
_ENSEMBL = re.compile(r"^ENS[A-Z]*G\d+")


# ------------------------------------------------------------------------------------------ sources
@dataclass
class UserTable:
    """A user dataset opened for import: small tables in memory, X streamed.

    ``obs``: per-cell metadata (index = cell names, input order); ``var``: per-gene table (index = the input's
    var names); ``coords``: (n_cells, d) float64 in the input unit (d = 2 or 3); ``rows``: callable
    ``(chunk) -> iterator of (start, (rows, n_genes) float32)``; ``files``: what was read, for messages.
    """

    path: Path
    kind: str
    obs: pd.DataFrame
    var: pd.DataFrame
    coords: np.ndarray
    coords_field: str
    rows: object
    files: dict = field(default_factory=dict)


def _open_anndata(path: Path, coordinates: str) -> UserTable:
    """An ``.h5ad`` file or AnnData ``.zarr`` store: obs, var and ``obsm[coordinates]`` read, X backed."""
    if not path.exists():
        raise InputError(f"{path} does not exist; give an AnnData .h5ad file or .zarr store")
    try:
        root = zarr.open_group(str(path), mode="r") if path.is_dir() else h5py.File(path, "r")
    except Exception as exc:  # noqa: BLE001 (h5py and zarr raise several types for "not this format")
        raise InputError(
            f"{path} is not a readable AnnData .h5ad / .zarr ({exc}); write it with "
            f"adata.write_h5ad or adata.write_zarr"
        ) from None
    for key in ("X", "obs", "var"):
        if key not in root:
            raise InputError(f"{path} has no '{key}'; it is not an AnnData file (write it with adata.write_h5ad)")
    obs, var = read_elem(root["obs"]), read_elem(root["var"])
    keys = list(root["obsm"].keys()) if "obsm" in root else []
    if coordinates not in keys:
        raise InputError(
            f"{path}: obsm['{coordinates}'] (the cell coordinates) does not exist; obsm has "
            f"{keys or 'no keys'}. Pass the key of your coordinates (CLI --coordinates, config "
            f"source.coordinates) or store them as adata.obsm['spatial'] (n_cells x 2 or 3)"
        )
    coords = read_elem(root["obsm"][coordinates])
    coords = coords.to_numpy() if isinstance(coords, pd.DataFrame) else np.asarray(coords)
    x = root["X"]
    sparse = isinstance(x, (zarr.Group, h5py.Group))
    matrix = sparse_dataset(x) if sparse else x
    n_obs, n_vars = matrix.shape

    def rows(chunk: int) -> Iterator[tuple[int, np.ndarray]]:
        for start in range(0, n_obs, chunk):
            block = matrix[start : min(start + chunk, n_obs)]
            yield start, (block.toarray() if sp.issparse(block) else np.asarray(block)).astype(np.float32, copy=False)

    if (n_obs, n_vars) != (len(obs), len(var)):
        raise InputError(
            f"{path}: X is {n_obs} x {n_vars} but obs/var have {len(obs)} / {len(var)} rows; the file "
            f"is corrupt: write it again"
        )
    return UserTable(path, "anndata", obs, var, coords, f"obsm['{coordinates}']", rows, {"anndata": str(path)})


def _merscope_file(folder: Path, name: str) -> Path:
    exact = folder / name
    if exact.is_file():
        return exact
    found = sorted(folder.glob(f"*{name}"))
    if len(found) == 1:
        return found[0]
    listing = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    what = f"several files end with {name}: {[p.name for p in found]}" if found else f"no {name}"
    raise InputError(
        f"MERSCOPE folder {folder}: {what} (files: {listing[:12]}); the folder needs "
        f"cell_by_gene.csv and cell_metadata.csv as written by the MERSCOPE Instrument/Vizualizer"
    )


def _open_merscope(folder: Path) -> UserTable:
    """A MERSCOPE output folder: cell ids and metadata read, ``cell_by_gene.csv`` streamed."""
    if not folder.is_dir():
        raise InputError(
            f"{folder} is not a folder; give the MERSCOPE output folder (with cell_by_gene.csv and cell_metadata.csv)"
        )
    counts, meta_path = _merscope_file(folder, "cell_by_gene.csv"), _merscope_file(folder, "cell_metadata.csv")
    header = list(pd.read_csv(counts, nrows=0).columns)
    if len(header) < 2:
        raise InputError(f"{counts}: expected a cell id column followed by one column per gene; found {header}")
    genes = header[1:]
    ids = pd.concat([c.iloc[:, 0] for c in pd.read_csv(counts, usecols=[0], dtype=str, chunksize=1 << 20)])
    meta = pd.read_csv(meta_path, index_col=0)
    meta.index = meta.index.astype(str)
    missing = [c for c in ("center_x", "center_y") if c not in meta.columns]
    if missing:
        raise InputError(
            f"{meta_path} lacks the column(s) {missing} (cell centres in µm); it has "
            f"{list(meta.columns)}. Export cell_metadata.csv from MERSCOPE with the cell centres"
        )
    ids.index = ids.to_numpy()
    absent = ids.index.difference(meta.index)
    if len(absent):
        raise InputError(
            f"{meta_path}: {len(absent)} cell(s) of {counts.name} have no row, e.g. "
            f"{absent[:5].tolist()}; both files must come from the same MERSCOPE run"
        )
    if ids.index.has_duplicates:
        dup = ids.index[ids.index.duplicated()].unique()[:5].tolist()
        raise InputError(f"{counts}: duplicate cell ids {dup} in the first column; cell names must be unique")
    obs = meta.loc[ids.index].copy()
    obs.index.name = None
    coords = obs[["center_x", "center_y"]].to_numpy(np.float64)
    obs = obs.drop(columns=["center_x", "center_y"])
    var = pd.DataFrame(index=pd.Index(genes, dtype=str))
    n_obs = len(obs)

    def rows(chunk: int) -> Iterator[tuple[int, np.ndarray]]:
        start = 0
        reader = pd.read_csv(counts, chunksize=chunk, index_col=0, dtype={g: np.float32 for g in genes})
        try:
            for block in reader:
                if list(block.columns) != genes:
                    raise InputError(f"{counts}: rows starting at cell {start} have other columns than the header")
                yield start, block.to_numpy(np.float32)
                start += len(block)
        except (ValueError, pd.errors.ParserError) as exc:
            raise InputError(f"{counts}: malformed row after cell {start} ({exc}); values must be numbers") from None
        if start != n_obs:
            raise InputError(f"{counts}: read {start} rows, expected {n_obs}; the file changed while importing")

    return UserTable(
        folder,
        "merscope",
        obs,
        var,
        coords,
        f"{meta_path.name} center_x, center_y",
        rows,
        {"counts": str(counts), "metadata": str(meta_path)},
    )


# ------------------------------------------------------------------------------------------ checks
def _check_coordinates(table: UserTable, unit: str) -> np.ndarray:
    """(n, d) float64 coordinates in mm after the shape, finiteness and density checks."""
    c = np.asarray(table.coords)
    where = f"{table.path}: {table.coords_field}"
    if c.ndim != 2 or c.shape[1] < 2:
        raise InputError(
            f"{where} has shape {c.shape}; cell coordinates need 2 (x, y) or 3 (x, y, z) columns. "
            f"Store them as an (n_cells, 2) or (n_cells, 3) array"
        )
    if c.shape[1] > 3:
        raise InputError(f"{where} has {c.shape[1]} columns; cell coordinates need 2 (x, y) or 3 (x, y, z)")
    if c.shape[0] != len(table.obs):
        raise InputError(f"{where} has {c.shape[0]} rows for {len(table.obs)} cells")
    try:
        c = c.astype(np.float64)
    except (TypeError, ValueError):
        raise InputError(f"{where} is not numeric ({c.dtype}); coordinates must be numbers") from None
    bad = ~np.isfinite(c).all(axis=1)
    if bad.any():
        names = table.obs.index[bad][:5].tolist()
        raise InputError(
            f"{where}: {int(bad.sum())} cell(s) have NaN or infinite coordinates, e.g. {names}; "
            f"drop those cells (adata = adata[np.isfinite(adata.obsm[key]).all(1)]) before importing"
        )
    if unit not in UNITS:
        raise InputError(f"unit must be one of {', '.join(UNITS)} (of the coordinates), got {unit!r}")
    return c * UNITS[unit]


def _neighbour_distance(xy: np.ndarray, sections: pd.Categorical, seed: int = 0) -> float:
    """Median distance (mm) from a cell to its nearest neighbour in the same section, on a sample."""
    from scipy.spatial import cKDTree

    rng = np.random.default_rng(seed)
    dists = []
    codes = np.asarray(sections.codes)
    for code in np.unique(codes):
        pts = xy[codes == code]
        if len(pts) < 2:
            continue
        if len(pts) > _DENSITY_SAMPLE:
            pts = pts[rng.choice(len(pts), _DENSITY_SAMPLE, replace=False)]
        d, _ = cKDTree(pts).query(pts, k=2)
        dists.append(d[:, 1])
    return float(np.median(np.concatenate(dists))) if dists else float("nan")


def _check_density(distance: float, unit: str, where: str) -> None:
    lo, hi = NEIGHBOUR_DISTANCE_MM
    if not np.isfinite(distance) or lo <= distance <= hi:
        return
    if distance > hi:
        fix = (
            "the coordinates look like µm declared as mm: import with unit um"
            if unit == "mm"
            else "the coordinates are in a unit larger than µm (pixels of a downscaled image?): convert them to µm or mm"
        )
    else:
        fix = (
            "the coordinates look like mm declared as µm: import with unit mm"
            if unit == "um"
            else "the coordinates are in a unit smaller than mm: convert them to µm or mm"
        )
    raise InputError(
        f"{where}: cells are a median {distance:.3g} mm from their nearest neighbour after reading "
        f"the coordinates as {unit}, outside the {lo}-{hi} mm a tissue section has; {fix}"
    )


def _sections(table: UserTable, section: str | None, section_name: str | None) -> pd.Series:
    if section is None:
        name = section_name or table.path.name.split(".")[0]
        return pd.Series(name, index=table.obs.index, dtype=object)
    if section not in table.obs.columns:
        raise InputError(
            f"{table.path}: obs has no section column {section!r}; columns: "
            f"{list(table.obs.columns)}. Name the section/batch column (CLI --section) or leave it "
            f"out for one section"
        )
    col = table.obs[section]
    if col.isna().any():
        raise InputError(
            f"{table.path}: obs['{section}'] is missing for {int(col.isna().sum())} cell(s); every cell needs a section"
        )
    return col.astype(str)


def _obs_columns(obs: pd.DataFrame, labels: Sequence[str], path: Path) -> tuple[dict, dict, pd.DataFrame]:
    """numeric dtypes, categorical categories and the obs frame (strings as str / NaN) to write."""
    numeric, categorical, out = {}, {}, pd.DataFrame(index=obs.index)
    for name in labels:
        if name not in obs.columns:
            raise InputError(f"{path}: label column {name!r} is not in obs; columns: {list(obs.columns)}")
        if obs[name].isna().all():
            raise InputError(
                f"{path}: label column obs['{name}'] is missing for every cell; label at least some "
                f"cells or leave it out of the labels"
            )
    for name in obs.columns:
        col = obs[name]
        if "/" in str(name):
            log.warning("%s: obs column %r skipped (a '/' in a name is not allowed in Zarr)", path, name)
            continue
        if name not in labels and (pd.api.types.is_bool_dtype(col) or pd.api.types.is_numeric_dtype(col)):
            if pd.api.types.is_bool_dtype(col) and not col.isna().any():
                numeric[name], out[name] = "bool", col.to_numpy(bool)
            elif pd.api.types.is_integer_dtype(col) and not col.isna().any():
                numeric[name], out[name] = "int64", col.to_numpy(np.int64)
            else:
                numeric[name], out[name] = "float64", col.to_numpy(np.float64, na_value=np.nan)
            continue
        values = col.astype(object).where(col.notna(), None)
        strings = values.map(lambda v: None if v is None else str(v))
        categorical[name] = sorted(strings.dropna().unique().tolist())
        out[name] = strings
    return numeric, categorical, out


def _gene_table(var: pd.DataFrame, gene_symbols: str | None, path: Path) -> pd.DataFrame:
    """var with ``gene_symbol`` and ``blank``; index = ids (or symbols when the input has no ids)."""
    var = var.copy()
    names = pd.Index(var.index.astype(str))
    if names.has_duplicates:
        dup = names[names.duplicated()].unique()[:5].tolist()
        raise InputError(
            f"{path}: duplicate gene names {dup} in var_names; make them unique (adata.var_names_make_unique())"
        )
    if gene_symbols is not None and gene_symbols not in var.columns:
        raise InputError(f"{path}: var has no gene symbol column {gene_symbols!r}; columns: {list(var.columns)}")
    if gene_symbols is None:
        gene_symbols = next((c for c in _SYMBOL_COLUMNS if c in var.columns), None)
        if gene_symbols is None and not names.str.match(_ENSEMBL.pattern).any():
            gene_symbols = ""  # var_names are the symbols
    symbols = names.to_numpy(dtype=object) if not gene_symbols else var[gene_symbols].astype(str).to_numpy(dtype=object)
    var.index = names
    var.index.name = "gene_identifier"
    var["gene_symbol"] = symbols
    var["blank"] = np.array(
        [bool(BLANK_PATTERN.match(s)) or bool(BLANK_PATTERN.match(g)) for s, g in zip(symbols, names)], dtype=bool
    )
    for col in var.columns:
        if var[col].dtype == object or isinstance(var[col].dtype, pd.StringDtype):
            var[col] = var[col].astype(str)
    return var


# ------------------------------------------------------------------------------------------ main
def import_user_data(
    kind: str,
    path: str | Path,
    out: str | Path,
    *,
    coordinates: str = DEFAULT_COORDINATES,
    unit: str = DEFAULT_UNIT,
    section: str | None = None,
    section_name: str | None = None,
    labels: Sequence[str] = (),
    gene_symbols: str | None = None,
    expression: str | None = None,
    chunk_cells: int = DEFAULT_CHUNK_CELLS,
    progress: bool = True,
) -> Path:
    """Import a user dataset into a ``cells.zarr`` at ``out`` (replaced atomically); returns ``out``.

    Args:
        kind: ``anndata`` (``path``: ``.h5ad`` or AnnData ``.zarr``) or ``merscope`` (``path``: the folder).
        coordinates: ``obsm`` key of the (x, y[, z]) coordinates (anndata only).
        unit: ``um`` or ``mm``, the unit of the coordinates (MERSCOPE: µm).
        section: ``obs`` column naming each cell's section / batch; ``None``: one section named
            ``section_name`` (default: the file or folder name).
        labels: ``obs`` columns to keep as categorical labels for training (not all missing).
        gene_symbols: ``var`` column of gene symbols (default: a column named like ``gene_symbol``, else the
            var names are symbols unless they look like Ensembl ids).
        expression: ``log2`` (X is log expression, copied) or ``counts`` (``log2(x + 1)`` is stored);
            default ``log2`` for AnnData, ``counts`` for MERSCOPE.
        chunk_cells: rows of X per chunk; sets peak memory (about 3 x chunk_cells x n_genes x 4 bytes).
    """
    t0 = time.perf_counter()
    path, out = Path(path), Path(out)
    if kind not in KINDS:
        raise InputError(f"import kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if kind == "merscope":
        table = _open_merscope(path)
        if unit != "um":
            log.warning("MERSCOPE cell centres are µm; reading them as %s as requested", unit)
    else:
        table = _open_anndata(path, coordinates)
    expression = expression or ("counts" if kind == "merscope" else "log2")
    if expression not in EXPRESSION:
        raise InputError(f"expression must be one of {', '.join(EXPRESSION)}, got {expression!r}")
    if table.obs.index.has_duplicates:
        dup = table.obs.index[table.obs.index.duplicated()].unique()[:5].tolist()
        raise InputError(
            f"{path}: duplicate cell names {dup}; cell names (obs_names) must be unique (adata.obs_names_make_unique())"
        )
    if len(table.obs) == 0:
        raise InputError(f"{path} holds no cells")
    coords = _check_coordinates(table, unit)
    sections = _sections(table, section, section_name)
    var = _gene_table(table.var, gene_symbols, path)
    labels = list(labels)
    numeric, categorical, obs = _obs_columns(table.obs, labels, path)
    section_z = (
        pd.Series(coords[:, 2], index=obs.index).groupby(sections.to_numpy()).median()
        if coords.shape[1] == 3
        else pd.Series(np.nan, index=sorted(sections.unique()))
    )
    order = sorted(section_z.index, key=lambda s: (section_z[s] if np.isfinite(section_z[s]) else 0.0, s))
    obs[SECTION] = sections.to_numpy()
    obs["z_section"] = section_z.loc[sections.to_numpy()].to_numpy(np.float64)
    categorical[SECTION], numeric["z_section"] = order, "float64"
    numeric.pop(SECTION, None)
    distance = _neighbour_distance(coords[:, :2], pd.Categorical(sections, categories=order))
    _check_density(distance, unit, f"{path} ({table.coords_field})")
    obsm = {keys.SPATIAL: 2, **({keys.SPATIAL_3D: 3} if coords.shape[1] == 3 else {})}
    columns = [c for c in obs.columns if c not in (SECTION, "z_section")]
    n, n_genes = len(obs), len(var)
    log.info(
        "importing %s (%s): %d cells x %d genes (%d blank), %d section(s), coordinates %dD in %s",
        path,
        kind,
        n,
        n_genes,
        int(var["blank"].sum()),
        len(order),
        coords.shape[1],
        unit,
    )
    with staged_output(out) as staging:
        writer = ChunkedAnnDataWriter(
            staging,
            n_obs=n,
            var=var,
            chunk_rows=chunk_cells,
            index_name="cell_label",
            numeric_obs=numeric,
            categorical_obs=categorical,
            obsm=obsm,
            obs_order=[SECTION, "z_section", *columns],
        )
        names = obs.index.to_numpy(dtype=object)
        done = 0
        from tqdm.auto import tqdm

        for start, x in tqdm(
            table.rows(chunk_cells), total=-(-n // chunk_cells), desc="import", unit="chunk", disable=not progress
        ):
            stop = start + len(x)
            finite = np.isfinite(x).all(axis=1)
            if not finite.all():
                bad = names[start:stop][~finite][:5].tolist()
                raise InputError(
                    f"{path}: expression of {int((~finite).sum())} cell(s) from row {start} is NaN "
                    f"or infinite, e.g. {bad}; fix or drop those cells before importing"
                )
            if expression == "counts":
                if (x < 0).any():
                    raise InputError(
                        f"{path}: negative values in rows {start}-{stop} but expression='counts'; "
                        f"give raw counts or import with expression log2"
                    )
                x = np.log2(x + np.float32(1))
            elif start == 0 and x.size and x.max() > 30:
                log.warning(
                    "%s: X reaches %.0f, more than log2 expression does; if X holds counts, import with "
                    "expression counts",
                    path,
                    float(x.max()),
                )
            rows = obs.iloc[start:stop]
            block = {keys.SPATIAL: coords[start:stop, :2]}
            if coords.shape[1] == 3:
                block[keys.SPATIAL_3D] = coords[start:stop]
            writer.write_rows(start, names[start:stop], x, rows, block)
            done = stop
        if done != n:
            raise InputError(f"{path}: X has {done} rows, expected {n}")
        writer.write_uns(
            {
                "abc_pipeline": {
                    "import": {
                        "kind": kind,
                        "source": str(path.resolve()),
                        "files": table.files,
                        "coordinates": table.coords_field,
                        "input_unit": unit,
                        "units": "mm",
                        "section_column": section or "None",
                        "labels": labels,
                        "expression": expression,
                        "stored": "log2(x + 1)" if expression == "counts" else "as given",
                        "n_cells": n,
                        "n_genes": n_genes,
                        "n_blank": int(var["blank"].sum()),
                        "n_sections": len(order),
                        "median_neighbour_distance_mm": distance,
                    }
                }
            }
        )
        writer.close()
    log.info("imported %d cells x %d genes in %.1f s -> %s", n, n_genes, time.perf_counter() - t0, out)
    return out
