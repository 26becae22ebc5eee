"""Raster channels: which per-cell values are averaged into voxels.

Three modes, all linear in the expression so that a voxel mean of the channel equals the channel of
the voxel mean expression:

* ``genes`` (default): every non-blank gene, named by ``gene_symbol``;
* a gene list (symbols or ids), unknown names rejected with close matches;
* ``pca``: the first k principal components, fitted out of core on a sample of cells.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from abc_pipeline.errors import InputError
from abc_pipeline.raster.source import CellSource, close_matches

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
    mode: ``genes`` | ``pca``; pca: the fitted model in ``pca`` mode.
    """

    mode: str
    names: tuple[str, ...]
    gene_index: slice | np.ndarray
    pca: PCAModel | None = None

    def apply(self, x: np.ndarray) -> np.ndarray:
        """(n, n_genes) float32 -> (n, n_channels) float32."""
        sub = x[:, self.gene_index]
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
        raise InputError(f"{len(unknown)} gene(s) not found in var['gene_symbol'] or var_names of {source.path}: {details}")
    idx = np.array([lookup[g] for g in genes], dtype=np.int64)
    if len(set(idx.tolist())) != len(idx):
        raise InputError(f"the gene list names a gene twice: {list(genes)}")
    return idx, tuple(symbols[i] for i in idx)


def fit_pca(
    source: CellSource, gene_index: np.ndarray, genes: tuple[str, ...], k: int, n_sample: int, seed: int
) -> PCAModel:
    """Fit a k-component PCA on a random sample of about ``n_sample`` cells.

    To read a bounded fraction of X, the sample is drawn from a random subset of X's Zarr chunks
    (about 4x the sample size in rows, at least 8 chunks when there are that many), then uniformly
    within them. Memory: the sample, (n_sample, n_genes) float32.
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
    sample = np.concatenate(blocks, axis=0)[:, gene_index].astype(np.float32, copy=False)
    if sample.shape[0] > n_sample:
        sample = sample[np.sort(rng.choice(sample.shape[0], size=n_sample, replace=False))]
    if sample.shape[0] <= k:
        raise InputError(f"pca with k={k} needs more than {k} cells; {source.path} has {source.n_cells}")
    log.info("fitting PCA (k=%d) on %d cells x %d genes from %d of %d X chunks", k, sample.shape[0], sample.shape[1], take, n_chunks)
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
    source: CellSource, genes: Sequence[str] | None = None, pca: int | None = None, pca_sample: int = 100_000, seed: int = 0
) -> ChannelPlan:
    """Resolve the channel request: all non-blank genes, a gene list, or ``pca`` components of them."""
    idx, names = resolve_genes(source, genes)
    if pca is None:
        return ChannelPlan("genes", names, _as_index(idx))
    model = fit_pca(source, idx, names, int(pca), int(pca_sample), seed)
    return ChannelPlan("pca", tuple(f"PC{i + 1}" for i in range(int(pca))), _as_index(idx), model)


def raster_channel_plan(source: CellSource, feature_channels: Sequence[str], pca: dict[str, np.ndarray] | None
                        ) -> ChannelPlan:
    """The channel definition a raster was made with (``Raster.feature_channels`` and ``Raster.pca``),
    resolved on ``source``: applied to rows of X it gives each cell's own channel values, the values the
    rasterizer averaged into voxels."""
    if pca is None:
        idx, _ = resolve_genes(source, list(feature_channels))
        return ChannelPlan("genes", tuple(feature_channels), _as_index(idx))
    genes = [str(g) for g in pca["genes"]]
    idx, _ = resolve_genes(source, genes)
    model = PCAModel(tuple(genes), np.asarray(pca["components"], np.float32), np.asarray(pca["mean"], np.float32),
                     np.asarray(pca["explained_variance"]), np.asarray(pca["explained_variance_ratio"]), 0, 0)
    if model.components.shape[0] != len(feature_channels):
        raise InputError(f"the raster's PCA has {model.components.shape[0]} components but {len(feature_channels)} "
                         f"feature channels; rasterize again")
    return ChannelPlan("pca", tuple(feature_channels), _as_index(idx), model)
