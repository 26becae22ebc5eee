"""Raster channels: which per-cell values are averaged into voxels.

Three modes, all linear in the expression so that a voxel mean of the channel equals the channel of
the voxel mean expression:

* ``genes`` (default): every non-blank gene, named by ``gene_symbol``;
* a gene list (symbols or ids), unknown names rejected with close matches;
* ``pca``: the first k principal components, fitted out of core on a sample of cells.

A raster's channel *definition* (:func:`channel_definition`: mode, genes with their ids, PCA loadings and
means, voxel size, and a digest of them) travels with the models trained on it; :func:`plan_from_definition`
rebuilds the same channels on another dataset (genes matched by id or symbol, missing ones zero-filled on
request), and :func:`definition_digest` tells channels apart that share their names (PC1..PCk of different
loadings).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from abc_pipeline.cells import CellSource, close_matches
from abc_pipeline.errors import InputError
from abc_pipeline.integrity import nonfinite_rows

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PCAModel:
    """Principal components of log2 expression over ``genes``.

    components: (k, n_genes) float32 loadings; mean: (n_genes,) float32;
    explained_variance / explained_variance_ratio: (k,) float64; n_sample: cells used for the fit.
    """

    genes: tuple[str, ...]
    components: np.ndarray
    mean: np.ndarray
    explained_variance: np.ndarray
    explained_variance_ratio: np.ndarray
    n_sample: int
    seed: int


@dataclass(frozen=True)
class ChannelPlan:
    """How one block of X (cells x all genes) becomes the channel values (cells x channels).

    gene_index: columns of X used (a slice when contiguous, to avoid a copy); names: channel names;
    mode: ``genes`` | ``pca``; pca: the fitted model in ``pca`` mode; missing: positions among the
    channel genes that X lacks, read as 0 (:func:`plan_from_definition` with ``fill_missing``).
    """

    mode: str
    names: tuple[str, ...]
    gene_index: slice | np.ndarray
    pca: PCAModel | None = None
    missing: tuple[int, ...] = ()

    def apply(self, x: np.ndarray) -> np.ndarray:
        """(n, n_genes) float32 -> (n, n_channels) float32."""
        sub = x[:, self.gene_index]
        if self.missing:
            full = np.zeros((len(x), sub.shape[1] + len(self.missing)), dtype=np.float32)
            full[:, np.setdiff1d(np.arange(full.shape[1]), self.missing)] = sub
            sub = full
        if self.pca is None:
            return sub
        return ((sub - self.pca.mean) @ self.pca.components.T).astype(np.float32, copy=False)


def _as_index(idx: np.ndarray) -> slice | np.ndarray:
    idx = np.asarray(idx, dtype=np.int64)
    if idx.size and np.array_equal(idx, np.arange(idx[0], idx[0] + idx.size)):
        return slice(int(idx[0]), int(idx[0] + idx.size))
    return idx


def resolve_genes(source: CellSource, genes: Sequence[str] | None) -> tuple[np.ndarray, tuple[str, ...]]:
    """Column indices and channel names of the requested genes (default: all non-blank genes).

    Genes may be given as ``gene_symbol`` or as ``var_names``; unknown names raise ``InputError``
    listing each with its closest symbols.
    """
    symbols = source.gene_symbols
    if genes is None:
        idx = np.flatnonzero(~source.blank)
        if idx.size == 0:
            raise InputError(f"{source.path}: every gene is flagged blank in var['blank']; nothing to rasterize")
        return idx, tuple(symbols[i] for i in idx)
    lookup = {s: i for i, s in enumerate(symbols)}
    for i, g in enumerate(source.gene_ids):
        lookup.setdefault(g, i)
    unknown = [g for g in genes if g not in lookup]
    if unknown:
        details = "; ".join(f"{g!r}{close_matches(g, symbols)}" for g in unknown)
        raise InputError(
            f"{len(unknown)} gene(s) not found in var['gene_symbol'] or var_names of {source.path}: {details}"
        )
    idx = np.array([lookup[g] for g in genes], dtype=np.int64)
    if len(set(idx.tolist())) != len(idx):
        raise InputError(f"the gene list names a gene twice: {list(genes)}")
    return idx, tuple(symbols[i] for i in idx)


def fit_pca(
    source: CellSource,
    gene_index: np.ndarray,
    genes: tuple[str, ...],
    k: int,
    n_sample: int,
    seed: int,
    drop_nonfinite: bool = False,
) -> PCAModel:
    """Fit a k-component PCA on a random sample of about ``n_sample`` cells.

    To read a bounded fraction of X, the sample is drawn from a random subset of X's Zarr chunks
    (about 4x the sample size in rows, at least 8 chunks when there are that many), then uniformly
    within them. Memory: the sample, (n_sample, n_genes) float32. Cells with NaN / inf in X are an error,
    or left out of the sample with ``drop_nonfinite``.
    """
    from sklearn.decomposition import PCA

    if k < 1 or k > len(genes):
        raise InputError(f"pca needs 1 <= k <= {len(genes)} components (number of genes), got {k}")
    rng = np.random.default_rng(seed)
    step = source.row_chunk
    n_chunks = math.ceil(source.n_cells / step)
    take = min(n_chunks, max(8, math.ceil(4 * n_sample / step)))
    chosen = np.sort(rng.choice(n_chunks, size=take, replace=False))
    x = source.group["X"]
    blocks = [x[c * step : min((c + 1) * step, source.n_cells)] for c in chosen]
    sample = np.concatenate(blocks, axis=0)
    bad = nonfinite_rows(sample)
    if bad.any():
        if not drop_nonfinite:
            raise InputError(
                f"{source.path}: X holds NaN or inf in {int(bad.sum())} of the {len(sample)} cells sampled "
                "for the PCA; fix the expression values, or pass --drop-nonfinite to skip those cells"
            )
        log.warning("PCA sample: %d cells with NaN or inf in X left out", int(bad.sum()))
        sample = sample[~bad]
    sample = sample[:, gene_index].astype(np.float32, copy=False)
    if sample.shape[0] > n_sample:
        sample = sample[np.sort(rng.choice(sample.shape[0], size=n_sample, replace=False))]
    if sample.shape[0] <= k:
        raise InputError(f"pca with k={k} needs more than {k} cells; {source.path} has {source.n_cells}")
    log.info(
        "fitting PCA (k=%d) on %d cells x %d genes from %d of %d X chunks",
        k,
        sample.shape[0],
        sample.shape[1],
        take,
        n_chunks,
    )
    pca = PCA(n_components=k, svd_solver="randomized" if k < min(sample.shape) // 2 else "full", random_state=seed)
    pca.fit(sample)
    return PCAModel(
        genes=genes,
        components=pca.components_.astype(np.float32),
        mean=pca.mean_.astype(np.float32),
        explained_variance=np.asarray(pca.explained_variance_, dtype=np.float64),
        explained_variance_ratio=np.asarray(pca.explained_variance_ratio_, dtype=np.float64),
        n_sample=int(sample.shape[0]),
        seed=seed,
    )


def plan_channels(
    source: CellSource,
    genes: Sequence[str] | None = None,
    pca: int | None = None,
    pca_sample: int = 100_000,
    seed: int = 0,
    drop_nonfinite: bool = False,
) -> ChannelPlan:
    """Resolve the channel request: all non-blank genes, a gene list, or ``pca`` components of them
    (``drop_nonfinite``: see :func:`fit_pca`)."""
    idx, names = resolve_genes(source, genes)
    if pca is None:
        return ChannelPlan("genes", names, _as_index(idx))
    model = fit_pca(source, idx, names, int(pca), int(pca_sample), seed, drop_nonfinite)
    return ChannelPlan("pca", tuple(f"PC{i + 1}" for i in range(int(pca))), _as_index(idx), model)


def raster_channel_plan(
    source: CellSource, feature_channels: Sequence[str], pca: dict[str, np.ndarray] | None
) -> ChannelPlan:
    """The channel definition a raster was made with (``Raster.feature_channels`` and ``Raster.pca``),
    resolved on ``source``: applied to rows of X it gives each cell's own channel values, the values the
    rasterizer averaged into voxels."""
    if pca is None:
        idx, _ = resolve_genes(source, list(feature_channels))
        return ChannelPlan("genes", tuple(feature_channels), _as_index(idx))
    genes = [str(g) for g in pca["genes"]]
    idx, _ = resolve_genes(source, genes)
    model = PCAModel(
        tuple(genes),
        np.asarray(pca["components"], np.float32),
        np.asarray(pca["mean"], np.float32),
        np.asarray(pca["explained_variance"]),
        np.asarray(pca["explained_variance_ratio"]),
        0,
        0,
    )
    if model.components.shape[0] != len(feature_channels):
        raise InputError(
            f"the raster's PCA has {model.components.shape[0]} components but {len(feature_channels)} "
            f"feature channels; rasterize again"
        )
    return ChannelPlan("pca", tuple(feature_channels), _as_index(idx), model)


# ----------------------------------------------------------------------------------------------- definitions
def definition_digest(
    mode: str, channels: Sequence[str], genes: Sequence[str], components: np.ndarray | None, mean: np.ndarray | None
) -> str:
    """SHA-256 (16 hex digits) of what the channels mean: mode, names, genes and the float32 PCA loadings (k, g)
    and means (g,) (None in ``genes`` mode)."""
    h = hashlib.sha256(json.dumps([mode, list(channels), list(genes)]).encode())
    for arr in (components, mean):
        if arr is not None:
            h.update(np.ascontiguousarray(arr, dtype=np.float32).tobytes())
    return h.hexdigest()[:16]


def channel_definition(raster, source: CellSource | None = None) -> dict:
    """The definition of ``raster``'s feature channels, JSON-serialisable (stored in checkpoints).

    Keys: ``mode`` (genes | pca), ``channels`` (names), ``genes`` (symbols of the genes the channels use, in
    order) and ``gene_ids`` (their var_names in ``source``, default the cells.zarr the raster was made from
    when it still exists, else the symbols), ``pca`` (``components`` (k, g) and ``mean`` (g,) as lists, or
    None), ``expression`` (what a channel value is), ``space`` and ``voxel_size`` (z, y, x; mm) of the grid,
    and ``digest`` (:func:`definition_digest`).
    """
    pca = raster.pca
    channels = list(raster.feature_channels)
    genes = [str(g) for g in pca["genes"]] if pca is not None else channels
    if source is None and raster.attrs.get("source") and Path(raster.attrs["source"]).exists():
        source = CellSource(raster.attrs["source"])
    ids = genes
    if source is not None:
        to_id = dict(zip(source.gene_symbols, source.gene_ids))
        ids = [to_id.get(g, g) for g in genes]
    comps, mean = (pca["components"], pca["mean"]) if pca is not None else (None, None)
    mode = "pca" if pca is not None else "genes"
    return {
        "mode": mode,
        "channels": channels,
        "genes": genes,
        "gene_ids": ids,
        "pca": None
        if pca is None
        else {"components": np.asarray(comps, np.float32).tolist(), "mean": np.asarray(mean, np.float32).tolist()},
        "expression": "log2 expression (cells.zarr X); a channel is the mean over the cells of a voxel"
        + (" of (x[genes] - mean) @ components[k]" if pca is not None else " of x[gene]"),
        "space": raster.grid.space,
        "voxel_size": list(raster.grid.voxel_size),
        "digest": definition_digest(mode, channels, genes, comps, mean),
    }


def raster_digest(raster) -> str:
    """:func:`definition_digest` of a raster's feature channels."""
    pca = raster.pca
    channels = list(raster.feature_channels)
    if pca is None:
        return definition_digest("genes", channels, channels, None, None)
    return definition_digest("pca", channels, [str(g) for g in pca["genes"]], pca["components"], pca["mean"])


def plan_from_definition(
    definition: dict, source: CellSource, fill_missing: bool = False
) -> tuple[ChannelPlan, list[str]]:
    """The channels of ``definition`` (:func:`channel_definition`) on ``source``: each gene matched by its id
    (``var_names``), else by its symbol (``var['gene_symbol']`` or ``var_names``). Returns the plan and the
    genes (symbols) ``source`` lacks; those raise :class:`InputError` unless ``fill_missing`` (then they read
    as 0)."""
    genes, ids = list(definition["genes"]), list(definition.get("gene_ids") or definition["genes"])
    by_id = {g: i for i, g in enumerate(source.gene_ids)}
    by_symbol = {s: i for i, s in enumerate(source.gene_symbols)}
    for i, g in enumerate(source.gene_ids):
        by_symbol.setdefault(g, i)
    index, missing = [], []
    for k, (gid, sym) in enumerate(zip(ids, genes)):
        col = by_id.get(gid, by_symbol.get(sym, by_symbol.get(gid)))
        if col is None:
            missing.append(k)
        else:
            index.append(col)
    lacking = [genes[k] for k in missing]
    if lacking and not fill_missing:
        raise InputError(
            f"{source.path} lacks {len(lacking)} of the model's {len(genes)} genes (matched by id, then "
            f"symbol): {lacking}. Add them, or pass fill_missing (CLI --fill-missing-genes) to read them "
            f"as 0 expression (predictions degrade with the missing fraction)"
        )
    if len(index) == 0:
        raise InputError(
            f"{source.path} shares no gene with the model ({genes[:10]}...); check that var_names or "
            f"var['gene_symbol'] hold gene symbols or Ensembl ids"
        )
    pca = None
    if definition["pca"] is not None:
        comps = np.asarray(definition["pca"]["components"], dtype=np.float32)
        mean = np.asarray(definition["pca"]["mean"], dtype=np.float32)
        pca = PCAModel(
            genes=tuple(genes),
            components=comps,
            mean=mean,
            explained_variance=np.zeros(len(comps)),
            explained_variance_ratio=np.zeros(len(comps)),
            n_sample=0,
            seed=0,
        )
    plan = ChannelPlan(
        definition["mode"], tuple(definition["channels"]), _as_index(np.asarray(index)), pca, tuple(missing)
    )
    return plan, lacking
