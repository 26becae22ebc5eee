"""Assemble a downloaded release into one AnnData store (``results/<dataset>/cells.zarr``), out of core.

Inputs are the files of a dataset profile (see :mod:`abc_pipeline.atlas.manifest`): the log2 expression h5ad,
``cell_metadata.csv``, ``gene.csv``, reconstructed/CCF coordinates, the WMB taxonomy views and the Allen-CCF-2020
parcellation views. The output follows the ``cells.zarr`` contract of ``docs/architecture.md``.

Peak memory is set by ``chunk_cells``, not by the number of cells. The join runs in three streamed passes over a
scratch folder next to the output:

1. *partition*: every per-cell table (expression cell labels with their row position, metadata, coordinates) is read
   in chunks and split into hash buckets of ``cell_label``;
2. *join*: each bucket is joined in memory (expression ∩ metadata; coordinates left-joined) and its rows are
   re-bucketed by expression row position;
3. *write*: the expression matrix is streamed in row order; each block is matched with its joined rows, densified
   to float32 and written, with obs and obsm, into a pre-allocated Zarr AnnData.
The store is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from tqdm.auto import tqdm

from abc_pipeline import keys
from abc_pipeline.atlas.chunked_anndata import ChunkedAnnDataWriter
from abc_pipeline.atlas.manifest import (
    Manifest,
    cached_releases,
    get_profile,
    manifest_relative_path,
)
from abc_pipeline.errors import InputError
from abc_pipeline.fileio import staged_output
from abc_pipeline.integrity import check_shape

log = logging.getLogger(__name__)

TAXONOMY_LEVELS = ("neurotransmitter", "class", "subclass", "supertype", "cluster")
PARCELLATION_LEVELS = ("organ", "category", "division", "structure", "substructure")
UNASSIGNED = "unassigned"


# ------------------------------------------------------------------------------------------------ readers
def read_csv_checked(path: Path, required: list[str], optional: list[str] = (), **kwargs) -> pd.DataFrame:
    """Read a (small) CSV, checking its header first; raises InputError naming missing columns."""
    usecols = _check_columns(path, required, optional)
    return pd.read_csv(path, usecols=usecols, **kwargs)


def _check_columns(path: Path, required: list[str], optional: list[str] = ()) -> list[str]:
    try:
        header = list(pd.read_csv(path, nrows=0).columns)
    except FileNotFoundError:
        raise InputError(f"{path} does not exist; run `abc-pipeline download` for this dataset first") from None
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise InputError(f"{path} is not a readable CSV ({exc}); delete it and download it again") from None
    missing = [c for c in required if c not in header]
    if missing:
        raise InputError(
            f"{path} lacks required column(s) {missing}; it has {header}. The file is not the expected ABC Atlas "
            "table (wrong release or a truncated download): delete it and download it again"
        )
    return [c for c in header if c in required or c in optional]


def _iter_csv(path: Path, required: list[str], optional: list[str], chunk_rows: int, dtype: dict):
    usecols = _check_columns(path, required, optional)
    reader = pd.read_csv(
        path,
        usecols=usecols,
        dtype={k: v for k, v in dtype.items() if k in usecols},
        chunksize=chunk_rows,
        keep_default_na=False,
        na_values=["", "NA", "NaN", "nan"],
    )
    try:
        yield from reader
    except (pd.errors.ParserError, ValueError) as exc:
        raise InputError(f"{path}: malformed row ({exc}); the file may be truncated, download it again") from None


@dataclass
class LabelTable:
    """Names and colours per key (cluster_alias or parcellation_index) for each level."""

    names: pd.DataFrame  # index: key, columns: levels
    colors: pd.DataFrame  # index: key, columns: levels ('#rrggbb' lower case)


def read_taxonomy(pivoted: Path, colors: Path) -> LabelTable:
    """WMB taxonomy views: ``cluster_alias`` -> neurotransmitter/class/subclass/supertype/cluster names and colours."""
    names = read_csv_checked(
        pivoted,
        ["cluster_alias", *TAXONOMY_LEVELS],
        dtype={lvl: str for lvl in TAXONOMY_LEVELS},
        keep_default_na=False,
        na_values=[""],
    ).set_index("cluster_alias")
    cols = read_csv_checked(
        colors, ["cluster_alias", *(f"{lvl}_color" for lvl in TAXONOMY_LEVELS)], dtype=str, keep_default_na=False
    ).set_index("cluster_alias")
    cols.index = cols.index.astype(names.index.dtype)
    cols.columns = [c.removesuffix("_color") for c in cols.columns]
    return LabelTable(names=names, colors=cols.apply(lambda s: s.str.lower()))


def read_parcellation(acronyms: Path, colors: Path) -> LabelTable:
    """Allen-CCF-2020 views: ``parcellation_index`` -> organ ... substructure acronyms and colours."""
    names = read_csv_checked(
        acronyms,
        ["parcellation_index", *PARCELLATION_LEVELS],
        dtype={lvl: str for lvl in PARCELLATION_LEVELS},
        keep_default_na=False,
    ).set_index("parcellation_index")
    cols = read_csv_checked(
        colors,
        ["parcellation_index", *(f"{lvl}_color" for lvl in PARCELLATION_LEVELS)],
        dtype=str,
        keep_default_na=False,
    ).set_index("parcellation_index")
    cols.index = cols.index.astype(names.index.dtype)
    cols.columns = [c.removesuffix("_color") for c in cols.columns]
    if 0 not in names.index:
        names.loc[0] = UNASSIGNED
        cols.loc[0] = "#000000"
    return LabelTable(names=names, colors=cols.apply(lambda s: s.str.lower()))


@dataclass
class ExpressionFile:
    """Row-streaming access to an ABC expression h5ad (CSR or dense X) with h5py; no full load."""

    path: Path
    n_obs: int
    gene_ids: pd.Index

    @classmethod
    def open(cls, path: Path) -> ExpressionFile:
        """Open and check the layout: X's stated shape against the obs and var indexes, and for CSR the
        lengths of ``indptr``, ``indices`` and ``data`` (a forged shape never sizes a loop)."""
        fix = "The file is not the release's expression matrix: delete it and download it again"
        try:
            with h5py.File(path, "r") as f:
                x = f["X"]
                shape = tuple(int(n) for n in (x.attrs["shape"] if isinstance(x, h5py.Group) else x.shape))
                var_index = f["var"].attrs.get("_index", "gene_identifier")
                genes = pd.Index(f["var"][var_index].asstr()[:], name="gene_identifier")
                obs = f["obs"]
                n_names = obs[obs.attrs.get("_index", "cell_label")].shape[0]
                if len(shape) != 2:
                    raise InputError(f"{path}: X has shape {shape}; a 2D cells x genes matrix is expected. {fix}")
                check_shape(path, "X (cells x genes)", shape, (n_names, len(genes)), fix)
                if isinstance(x, h5py.Group):
                    check_shape(path, "X/indptr", x["indptr"].shape, (shape[0] + 1,), fix)
                    nnz = int(x["indptr"][-1])
                    check_shape(path, "X/indices", x["indices"].shape, (nnz,), fix)
                    check_shape(path, "X/data", x["data"].shape, (nnz,), fix)
        except (OSError, KeyError) as exc:
            raise InputError(
                f"{path} is not a readable AnnData h5ad ({exc}); it is probably truncated: delete it and download again"
            ) from None
        return cls(path=path, n_obs=shape[0], gene_ids=genes)

    def iter_cell_labels(self, chunk_rows: int):
        """Yield (start_row, labels ndarray[str]) blocks of the obs index."""
        with h5py.File(self.path, "r") as f:
            obs = f["obs"]
            labels = obs[obs.attrs.get("_index", "cell_label")].asstr()
            for start in range(0, self.n_obs, chunk_rows):
                yield start, np.asarray(labels[start : start + chunk_rows], dtype=object)

    def iter_rows(self, chunk_rows: int):
        """Yield (start_row, CSR block) over all rows, ``chunk_rows`` at a time."""
        with h5py.File(self.path, "r") as f:
            x = f["X"]
            if isinstance(x, h5py.Group):
                if x.attrs.get("encoding-type") != "csr_matrix":
                    raise InputError(f"{self.path}: X is {x.attrs.get('encoding-type')}, expected csr_matrix")
                indptr = x["indptr"]
                n_vars = int(x.attrs["shape"][1])
                for start in range(0, self.n_obs, chunk_rows):
                    stop = min(start + chunk_rows, self.n_obs)
                    ptr = indptr[start : stop + 1].astype(np.int64)
                    data = x["data"][ptr[0] : ptr[-1]]
                    indices = x["indices"][ptr[0] : ptr[-1]]
                    yield start, sp.csr_matrix((data, indices, ptr - ptr[0]), shape=(stop - start, n_vars))
            else:
                for start in range(0, self.n_obs, chunk_rows):
                    yield start, sp.csr_matrix(x[start : start + chunk_rows])


# --------------------------------------------------------------------------------------------- scratch
class _Buckets:
    """Append-only pickled DataFrame pieces per bucket in a scratch folder."""

    def __init__(self, root: Path, name: str, n_buckets: int) -> None:
        self.dir = root / name
        self.dir.mkdir(parents=True)
        self.n = n_buckets
        self._pieces = [0] * n_buckets

    def add(self, bucket_of_row: np.ndarray, frame: pd.DataFrame) -> None:
        order = np.argsort(bucket_of_row, kind="stable")
        sorted_buckets = bucket_of_row[order]
        bounds = np.searchsorted(sorted_buckets, np.arange(self.n + 1))
        frame = frame.iloc[order]
        for b in range(self.n):
            lo, hi = bounds[b], bounds[b + 1]
            if hi > lo:
                frame.iloc[lo:hi].to_pickle(self.dir / f"{b}_{self._pieces[b]}.pkl")
                self._pieces[b] += 1

    def read(self, bucket: int, columns: list[str]) -> pd.DataFrame:
        pieces = [pd.read_pickle(self.dir / f"{bucket}_{i}.pkl") for i in range(self._pieces[bucket])]
        return pd.concat(pieces, ignore_index=True) if pieces else pd.DataFrame(columns=columns)


def _hash_bucket(labels: pd.Series, n_buckets: int) -> np.ndarray:
    return (pd.util.hash_pandas_object(labels, index=False).to_numpy() % np.uint64(n_buckets)).astype(np.int64)


@dataclass
class JoinCounts:
    """What the join kept and dropped (logged and stored in ``uns['abc_pipeline']['assemble']``)."""

    expression_cells: int = 0
    metadata_cells: int = 0
    metadata_nan_coordinates: int = 0
    metadata_unknown_cluster: int = 0
    expression_without_metadata: int = 0
    metadata_without_expression: int = 0
    cells_without_ccf: int = 0
    cells: int = 0
    observed: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------- main
def assemble_dataset(
    dataset: str,
    cache_dir: Path,
    out: Path,
    release: str | None = None,
    chunk_cells: int = 100_000,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Assemble ``dataset`` from a download cache into an AnnData Zarr store at ``out``.

    Args:
        dataset: profile name, e.g. ``MERFISH-C57BL6J-638850``.
        cache_dir: download cache (files at ``<cache_dir>/<relative_path>``).
        out: output ``.zarr`` directory; an earlier cells.zarr there is replaced atomically (another abc-pipeline
            artifact only with ``overwrite``; anything else never: :func:`abc_pipeline.fileio.check_output`).
        release: release whose cached manifest to use; default the newest cached one.
        chunk_cells: cells per chunk; sets peak memory (about 3 x chunk_cells x n_genes x 4 bytes plus tables).
        progress: show progress bars.
        overwrite: allow replacing an abc-pipeline artifact of another kind at ``out``.

    Returns:
        ``out``.
    """
    t0 = time.perf_counter()
    cache_dir, out = Path(cache_dir), Path(out)
    if chunk_cells < 1:
        raise InputError(f"chunk_cells (--chunk-cells) must be >= 1, got {chunk_cells}")
    profile = get_profile(dataset)
    manifest = _cached_manifest(cache_dir, release)
    paths = {role: entry.local_path(cache_dir) for role, entry in profile.entries(manifest).items()}
    for role, path in paths.items():
        if not path.exists():
            raise InputError(
                f"{path} ({role} of {dataset}, release {manifest.version}) is not in the cache; run "
                f"`abc-pipeline download --dataset {dataset} --release {manifest.version} --cache {cache_dir}`"
            )

    expression = ExpressionFile.open(paths["expression"])
    var = _read_genes(paths["gene"], expression)
    taxonomy = read_taxonomy(paths["taxonomy"], paths["taxonomy_colors"])
    parcellation = read_parcellation(paths["parcellation"], paths["parcellation_colors"])
    n_buckets = max(1, -(-expression.n_obs // chunk_cells))
    counts = JoinCounts(expression_cells=expression.n_obs)

    with staged_output(out, "cells", inputs=paths.values(), overwrite=overwrite) as staging:
        scratch = staging.with_name(staging.name + "-scratch")
        try:
            tables = _partition(profile, paths, expression, taxonomy, scratch, n_buckets, chunk_cells, counts, progress)
            by_position = _join(tables, profile, scratch, n_buckets, chunk_cells, counts, progress)
            _write(
                staging,
                expression,
                var,
                by_position,
                taxonomy,
                parcellation,
                chunk_cells,
                counts,
                progress,
                uns_meta={
                    "dataset": dataset,
                    "release": manifest.version,
                    "files": {role: str(p.relative_to(cache_dir)) for role, p in paths.items()},
                },
            )
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    log.info(
        "assembled %s: %d cells x %d genes in %.1f s -> %s",
        dataset,
        counts.cells,
        len(var),
        time.perf_counter() - t0,
        out,
    )
    return out


def _cached_manifest(cache_dir: Path, release: str | None) -> Manifest:
    if release is None:
        releases = cached_releases(cache_dir)
        if not releases:
            raise InputError(f"no release manifest under {cache_dir}/releases/; run `abc-pipeline download` first")
        release = releases[-1]
    return Manifest.from_path(cache_dir / manifest_relative_path(release))


def _read_genes(gene_csv: Path, expression: ExpressionFile) -> pd.DataFrame:
    genes = read_csv_checked(
        gene_csv, ["gene_identifier", "gene_symbol"], ["transcript_identifier"], dtype=str, keep_default_na=False
    ).set_index("gene_identifier")
    if genes.index.has_duplicates:
        dup = genes.index[genes.index.duplicated()].unique()[:5].tolist()
        raise InputError(f"{gene_csv}: duplicate gene_identifier values {dup}; the table is corrupt")
    if not genes.index.equals(expression.gene_ids):
        only_h5 = expression.gene_ids.difference(genes.index)[:5].tolist()
        only_csv = genes.index.difference(expression.gene_ids)[:5].tolist()
        detail = (
            f"only in h5ad: {only_h5}; only in gene.csv: {only_csv}"
            if (only_h5 or only_csv)
            else "same genes, different order"
        )
        raise InputError(
            f"genes of {expression.path} disagree with {gene_csv} ({detail}); both files must come from the same "
            "dataset and release: download them again"
        )
    if "transcript_identifier" not in genes:
        genes["transcript_identifier"] = ""
    var = genes[["gene_symbol", "transcript_identifier"]].copy()
    var["blank"] = var.index.str.startswith("Blank-")
    return var


_META_DTYPES = {
    "cell_label": str,
    "brain_section_label": str,
    "cluster_alias": "Int64",
    "average_correlation_score": "float64",
    "x": "float64",
    "y": "float64",
    "z": "float64",
}
_COORD_DTYPES = {"cell_label": str, "x": "float64", "y": "float64", "z": "float64", "parcellation_index": "Int64"}


def _partition(profile, paths, expression, taxonomy, scratch, n_buckets, chunk_cells, counts, progress):
    """Pass 1: split every per-cell table into hash buckets of cell_label."""
    tables = {"expression": _Buckets(scratch, "expression", n_buckets)}
    bar = tqdm(total=expression.n_obs, desc="partition expression cells", unit="cell", disable=not progress)
    for start, labels in expression.iter_cell_labels(chunk_cells):
        frame = pd.DataFrame({"cell_label": labels, "position": np.arange(start, start + len(labels))})
        tables["expression"].add(_hash_bucket(frame["cell_label"], n_buckets), frame)
        bar.update(len(labels))
    bar.close()

    sources = {
        "metadata": (
            paths["cell_metadata"],
            ["cell_label", "brain_section_label", "cluster_alias", "x", "y", "z"],
            ["average_correlation_score"],
            _META_DTYPES,
        ),
        "ccf": (paths["ccf_coordinates"], ["cell_label", "x", "y", "z"], ["parcellation_index"], _COORD_DTYPES),
    }
    if profile.has_reconstructed:
        sources["reconstructed"] = (
            paths["reconstructed_coordinates"],
            ["cell_label", "x", "y", "z", "parcellation_index"],
            [],
            _COORD_DTYPES,
        )
    known_clusters = taxonomy.names.index
    for name, (path, required, optional, dtypes) in sources.items():
        tables[name] = _Buckets(scratch, name, n_buckets)
        bar = tqdm(desc=f"partition {path.name}", unit="row", disable=not progress)
        for chunk in _iter_csv(path, required, optional, chunk_cells, dtypes):
            chunk = chunk.dropna(subset=["cell_label"])
            if name == "metadata":
                counts.metadata_cells += len(chunk)
                bad = chunk[["x", "y", "z"]].isna().any(axis=1).to_numpy()
                counts.metadata_nan_coordinates += int(bad.sum())
                unknown = ~chunk["cluster_alias"].isin(known_clusters).to_numpy() & ~bad
                counts.metadata_unknown_cluster += int(unknown.sum())
                chunk = chunk[~bad & ~unknown]
            else:
                chunk = chunk.dropna(subset=["x", "y", "z"])
            tables[name].add(_hash_bucket(chunk["cell_label"], n_buckets), chunk)
            bar.update(len(chunk))
        bar.close()
    if counts.metadata_nan_coordinates:
        log.warning(
            "%s: dropped %d cells with NaN section coordinates", paths["cell_metadata"], counts.metadata_nan_coordinates
        )
    if counts.metadata_unknown_cluster:
        log.warning(
            "%s: dropped %d cells whose cluster_alias is not in the taxonomy",
            paths["cell_metadata"],
            counts.metadata_unknown_cluster,
        )
    return tables


def _check_unique(frame: pd.DataFrame, what: str) -> None:
    dup = frame["cell_label"].duplicated()
    if dup.any():
        examples = frame.loc[dup, "cell_label"].unique()[:5].tolist()
        raise InputError(
            f"{what}: cell_label values occur more than once (e.g. {examples}); every cell must appear once. "
            "The file is corrupt or concatenated from several releases: download it again"
        )


def _join(tables, profile, scratch, n_buckets, chunk_cells, counts, progress) -> _Buckets:
    """Pass 2: join each hash bucket, re-bucket rows by expression position."""
    by_position = _Buckets(scratch, "joined", n_buckets)
    sections: dict[str, float] = {}
    clusters: set[int] = set()
    parcels: set[int] = set()
    for b in tqdm(range(n_buckets), desc="join", unit="bucket", disable=not progress):
        expr = tables["expression"].read(b, ["cell_label", "position"])
        meta = tables["metadata"].read(b, ["cell_label"])
        _check_unique(expr, "expression h5ad obs")
        _check_unique(meta, "cell_metadata.csv")
        joined = expr.merge(
            meta.rename(columns={"x": "x_section", "y": "y_section", "z": "z_section"}), on="cell_label", how="inner"
        )
        counts.expression_without_metadata += len(expr) - len(joined)
        counts.metadata_without_expression += len(meta) - len(joined)
        ccf = tables["ccf"].read(b, ["cell_label"])
        _check_unique(ccf, "ccf_coordinates.csv")
        ccf = ccf.rename(columns={"x": "x_ccf", "y": "y_ccf", "z": "z_ccf", "parcellation_index": "parcellation_ccf"})
        joined = joined.merge(ccf, on="cell_label", how="left")
        if profile.has_reconstructed:
            rec = tables["reconstructed"].read(b, ["cell_label"])
            _check_unique(rec, "reconstructed_coordinates.csv")
            rec = rec.rename(columns={"x": "x_reconstructed", "y": "y_reconstructed", "z": "z_reconstructed"})
            joined = joined.merge(rec, on="cell_label", how="left")
        else:  # Zhuang: section coordinates are already CCF-aligned; the region comes with the CCF coordinates
            joined["x_reconstructed"], joined["y_reconstructed"] = joined["x_section"], joined["y_section"]
            joined["z_reconstructed"] = joined["z_section"]
            joined["parcellation_index"] = joined["parcellation_ccf"]
        if "parcellation_ccf" in joined:
            joined = joined.drop(columns="parcellation_ccf")
        has = joined[["x_reconstructed", "x_ccf"]].notna().all(axis=1)
        joined["has_ccf"] = has.to_numpy()
        joined.loc[~has, ["x_reconstructed", "y_reconstructed", "z_reconstructed", "x_ccf", "y_ccf", "z_ccf"]] = np.nan
        joined["parcellation_index"] = joined["parcellation_index"].where(has, 0).fillna(0).astype(np.int64)
        joined["z_section"] = joined["z_section"].round(1)
        counts.cells_without_ccf += int((~has).sum())
        counts.cells += len(joined)
        sections.update(joined.groupby("brain_section_label")["z_section"].first().to_dict())
        clusters.update(joined["cluster_alias"].astype(np.int64).unique().tolist())
        parcels.update(joined["parcellation_index"].unique().tolist())
        by_position.add((joined["position"].to_numpy() // chunk_cells).astype(np.int64), joined)
    counts.observed = {"sections": sections, "clusters": sorted(clusters), "parcels": sorted(parcels)}
    log.info(
        "join: %d expression cells, %d metadata cells -> %d cells (%d expression cells without metadata, %d metadata "
        "cells without expression, %d cells without CCF coordinates kept with parcellation 'unassigned')",
        counts.expression_cells,
        counts.metadata_cells,
        counts.cells,
        counts.expression_without_metadata,
        counts.metadata_without_expression,
        counts.cells_without_ccf,
    )
    if counts.cells == 0:
        raise InputError(
            "no cell_label is shared by the expression h5ad and cell_metadata.csv; the files belong to different "
            "datasets or releases"
        )
    return by_position


def _categories(table: LabelTable, keys: list[int], level: str) -> tuple[list[str], list[str]]:
    """Observed categories of one level in display order (sorted names) and their colours."""
    sub = table.names.loc[keys, level].dropna()
    colors = table.colors.loc[sub.index, level]
    first_color = pd.Series(colors.to_numpy(), index=sub.to_numpy()).groupby(level=0).first()
    cats = sorted(first_color.index)
    return cats, [first_color[c] for c in cats]


def _write(staging, expression, var, by_position, taxonomy, parcellation, chunk_cells, counts, progress, uns_meta):
    """Pass 3: stream the expression rows in order and fill the pre-allocated store."""
    observed = counts.observed
    section_order = sorted(observed["sections"], key=lambda s: (observed["sections"][s], s))
    categorical: dict[str, list[str]] = {keys.SECTION: section_order}
    colors: dict[str, list[str]] = {}
    for level in TAXONOMY_LEVELS:
        categorical[level], colors[level] = _categories(taxonomy, observed["clusters"], level)
    for level in PARCELLATION_LEVELS:
        col = f"parcellation_{level}"
        categorical[col], colors[col] = _categories(parcellation, observed["parcels"], level)
    numeric = {
        "z_section": "float64",
        "cluster_alias": "int64",
        "average_correlation_score": "float64",
        "parcellation_index": "int64",
        "has_ccf": "bool",
    }
    writer = ChunkedAnnDataWriter(
        staging,
        n_obs=counts.cells,
        var=var,
        chunk_rows=chunk_cells,
        index_name="cell_label",
        numeric_obs=numeric,
        categorical_obs=categorical,
        obsm={keys.SPATIAL: 2, keys.SPATIAL_3D: 3, keys.CCF: 3},
        obs_order=[
            keys.SECTION,
            "z_section",
            "cluster_alias",
            "average_correlation_score",
            *TAXONOMY_LEVELS,
            "parcellation_index",
            *(f"parcellation_{lvl}" for lvl in PARCELLATION_LEVELS),
            "has_ccf",
        ],
    )
    start_out = 0
    bar = tqdm(total=expression.n_obs, desc="write cells.zarr", unit="cell", disable=not progress)
    for block, (start, X) in enumerate(expression.iter_rows(chunk_cells)):
        rows = by_position.read(block, ["cell_label", "position"]).sort_values("position", kind="stable")
        if len(rows):
            rows = rows.reset_index(drop=True)
            if "average_correlation_score" not in rows:
                rows["average_correlation_score"] = np.nan
            alias = rows["cluster_alias"].astype(np.int64).to_numpy()
            for level in TAXONOMY_LEVELS:
                rows[level] = taxonomy.names.loc[alias, level].to_numpy()
            pidx = rows["parcellation_index"].to_numpy()
            for level in PARCELLATION_LEVELS:
                rows[f"parcellation_{level}"] = parcellation.names.loc[pidx, level].to_numpy()
            rows["cluster_alias"] = alias
            dense = X[rows["position"].to_numpy() - start].astype(np.float32).toarray()
            writer.write_rows(
                start_out,
                rows["cell_label"].to_numpy(),
                dense,
                rows,
                {
                    keys.SPATIAL: rows[["x_section", "y_section"]].to_numpy(np.float64),
                    keys.SPATIAL_3D: rows[["x_reconstructed", "y_reconstructed", "z_reconstructed"]].to_numpy(
                        np.float64
                    ),
                    keys.CCF: rows[["x_ccf", "y_ccf", "z_ccf"]].to_numpy(np.float64),
                },
            )
            start_out += len(rows)
        bar.update(X.shape[0])
    bar.close()
    join = {k: v for k, v in vars(counts).items() if k != "observed"}
    writer.write_uns(
        {
            **{keys.colors(name): cols for name, cols in colors.items()},
            keys.UNS: {"assemble": {**uns_meta, "counts": join, "units": "mm"}},
        }
    )
    writer.close()
