"""How close a synthetic release is to the real atlas: BLA expression statistics and a learnability profile.

* :func:`bla_comparison`: per subclass and gene of the real basolateral-amygdala excerpt (``bla_merfish_*.csv``,
  subclasses with >= 50 real cells), the zero fraction and the 25/50/75 % quantiles of the non-zero log2 values,
  real vs synthetic (the synthetic cells of that subclass anywhere in the release), within :data:`TOLERANCES`.
* :func:`learnability`: held-out-section accuracy of a per-cell multinomial logistic regression at each taxonomy
  level, from the cell's own expression and from its own plus its neighbourhood's mean expression.

Used by ``benchmarks/calibrate_synth.py`` (writes ``docs/synthetic_atlas.md``) and ``tests/test_synthetic_calibration.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import NearestNeighbors
from sklearn.preprocessing import StandardScaler

from abc_pipeline.atlas.synthetic import RELEASE_FILES, relative_path

MIN_REAL_CELLS = 50
MIN_SYNTHETIC_CELLS = 40
QUANTILES = (0.25, 0.5, 0.75)
# Documented tolerances of the calibration (docs/synthetic_atlas.md), checked by the tests.
TOLERANCES = {
    "overall_nonzero": (0.22, 0.32),  # fraction of non-zero entries of the whole log2 matrix (real ~0.27)
    "zero_fraction_median_abs": 0.05,  # median over (subclass, gene) of |synthetic - real| zero fraction
    "zero_fraction_p90_abs": 0.15,  # 90th percentile of the same
    "quantile_median_abs": 0.25,  # median over (subclass, gene, quantile) of |synthetic - real| log2
    "quantile_p90_abs": 0.6,
}


@dataclass
class ReleaseCells:
    """The cells of a release that have metadata and reconstructed coordinates, with labels and log2 values.

    ``obs``: one row per cell (cell_label, brain_section_label, x/y section mm, cluster_alias, the taxonomy levels,
    parcellation_index and the parcellation levels); ``log2``: CSR (n_cells, 550) float64 in ``obs`` order;
    ``symbols``: the 550 gene symbols.
    """

    obs: pd.DataFrame
    log2: object
    symbols: np.ndarray


def load_release_cells(root: Path) -> ReleaseCells:
    """Join a release's metadata, reconstructed coordinates, taxonomy and parcellation with its log2 matrix."""
    paths = {name.rsplit("/", 1)[-1]: Path(root) / relative_path(d, k, v, name) for d, k, v, name in RELEASE_FILES}
    meta = pd.read_csv(paths["cell_metadata.csv"], dtype={"cell_label": str})
    rec = pd.read_csv(paths["reconstructed_coordinates.csv"], dtype={"cell_label": str})
    tax = pd.read_csv(paths["cluster_to_cluster_annotation_membership_pivoted.csv"], keep_default_na=False)
    par = pd.read_csv(paths["parcellation_to_parcellation_term_membership_acronym.csv"])
    obs = (
        meta[["cell_label", "brain_section_label", "cluster_alias", "x", "y"]]
        .merge(rec[["cell_label", "parcellation_index"]], on="cell_label")
        .merge(tax, on="cluster_alias")
        .merge(par, on="parcellation_index")
    )
    adata = anndata.read_h5ad(paths["C57BL6J-638850-log2.h5ad"])
    log2 = adata[obs.cell_label.to_numpy()].X.tocsr()
    return ReleaseCells(obs, log2, adata.var.gene_symbol.to_numpy())


def _stats(values: np.ndarray) -> dict[str, float]:
    nonzero = values[values > 0]
    out = {"zero_fraction": 1.0 - len(nonzero) / max(len(values), 1)}
    for q in QUANTILES:
        out[f"q{int(q * 100)}"] = float(np.quantile(nonzero, q)) if len(nonzero) else np.nan
    return out


def bla_comparison(cells: ReleaseCells, real_excerpts: Path) -> pd.DataFrame:
    """One row per (subclass, gene) present in both: cells and statistics, ``real_*`` and ``synthetic_*``."""
    meta = pd.read_csv(real_excerpts / "bla_merfish_metadata.csv", dtype=str, keep_default_na=False)
    expr = pd.read_csv(real_excerpts / "bla_merfish_expression.csv", dtype={"cell_label": str})
    column = {s: i for i, s in enumerate(cells.symbols)}
    rows = []
    for subclass, idx in meta.groupby("subclass").indices.items():
        synthetic = np.flatnonzero(cells.obs.subclass.to_numpy() == subclass)
        if len(idx) < MIN_REAL_CELLS or len(synthetic) < MIN_SYNTHETIC_CELLS:
            continue
        for gene in expr.columns[1:]:
            real = _stats(expr[gene].to_numpy()[idx])
            synth = _stats(cells.log2[synthetic][:, column[gene]].toarray().ravel())
            rows.append(
                {
                    "subclass": subclass,
                    "gene": gene,
                    "real_cells": len(idx),
                    "synthetic_cells": len(synthetic),
                    **{f"real_{k}": v for k, v in real.items()},
                    **{f"synthetic_{k}": v for k, v in synth.items()},
                }
            )
    return pd.DataFrame(rows)


def bla_summary(table: pd.DataFrame) -> dict[str, float]:
    """Median and 90th percentile absolute differences of :func:`bla_comparison` (keys as in TOLERANCES)."""
    zero = (table.synthetic_zero_fraction - table.real_zero_fraction).abs()
    quant = pd.concat(
        [(table[f"synthetic_q{int(q * 100)}"] - table[f"real_q{int(q * 100)}"]).abs() for q in QUANTILES]
    ).dropna()
    return {
        "zero_fraction_median_abs": float(zero.median()),
        "zero_fraction_p90_abs": float(zero.quantile(0.9)),
        "quantile_median_abs": float(quant.median()),
        "quantile_p90_abs": float(quant.quantile(0.9)),
        "pairs": len(table),
        "subclasses": table.subclass.nunique(),
    }


def held_out_sections(sections: np.ndarray, every: int = 4) -> np.ndarray:
    """Boolean test mask: every ``every``-th section (in label order, starting with the second) is held out."""
    labels = np.unique(sections)
    return pd.Series(sections).isin(set(labels[1::every])).to_numpy()


def learnability(
    cells: ReleaseCells,
    levels: tuple[str, ...] = ("class", "subclass", "supertype", "cluster"),
    n_neighbours: int = 15,
    n_components: int = 50,
    seed: int = 0,
) -> pd.DataFrame:
    """Held-out-section accuracy per level of a logistic regression on the cell's own expression (first
    ``n_components`` principal components of the 500 panel genes) and on own + the mean of its ``n_neighbours``
    nearest cells in the section. Test cells whose label is absent from training are left out; ``chance`` is
    the most frequent training label's share of the test cells."""
    x = cells.log2[:, :500].toarray()
    sections = cells.obs.brain_section_label.to_numpy()
    test = held_out_sections(sections)
    local = np.empty_like(x)
    xy = cells.obs[["x", "y"]].to_numpy()
    for s in np.unique(sections):
        idx = np.flatnonzero(sections == s)
        k = min(n_neighbours + 1, len(idx))
        _, nn = NearestNeighbors(n_neighbors=k).fit(xy[idx]).kneighbors(xy[idx])
        local[idx] = x[idx][nn[:, 1:]].mean(1)
    pca = PCA(n_components, random_state=seed).fit(x[~test])
    own = StandardScaler().fit_transform(pca.transform(x))
    both = np.hstack([own, StandardScaler().fit_transform(pca.transform(local))])
    rows = []
    for level in levels:
        y = cells.obs[level].to_numpy()
        keep = test & pd.Series(y).isin(set(y[~test])).to_numpy()
        majority = pd.Series(y[~test]).value_counts().index[0]
        row = {
            "level": level,
            "labels": len(np.unique(y)),
            "train_cells": int((~test).sum()),
            "test_cells": int(keep.sum()),
            "chance": float((y[keep] == majority).mean()),
        }
        for name, features in (("own", own), ("own+neighbourhood", both)):
            model = LogisticRegression(max_iter=200, tol=1e-3, random_state=seed)
            row[name] = float(model.fit(features[~test], y[~test]).score(features[keep], y[keep]))
        rows.append(row)
    return pd.DataFrame(rows)


def bla_gene_separability(
    cells: ReleaseCells, real_excerpts: Path, subclasses: list[str], seed: int = 0
) -> dict[str, float]:
    """Subclass accuracy from the 11 real BLA genes alone (5-fold cross-validated logistic regression over the
    ``subclasses``, balanced by subsampling each to the smallest count), real cells vs synthetic cells."""
    from sklearn.model_selection import cross_val_score

    meta = pd.read_csv(real_excerpts / "bla_merfish_metadata.csv", dtype=str, keep_default_na=False)
    expr = pd.read_csv(real_excerpts / "bla_merfish_expression.csv", dtype={"cell_label": str})
    genes = list(expr.columns[1:])
    column = [int(np.flatnonzero(cells.symbols == g)[0]) for g in genes]
    real_y, synth_y = meta.subclass.to_numpy(), cells.obs.subclass.to_numpy()
    n = min(min((real_y == s).sum(), (synth_y == s).sum()) for s in subclasses)
    rng = np.random.default_rng(seed)
    out = {"subclasses": len(subclasses), "cells_per_subclass": int(n)}
    for name, x, y in (
        ("real", expr[genes].to_numpy(), real_y),
        ("synthetic", cells.log2[:, column].toarray(), synth_y),
    ):
        idx = np.concatenate([rng.choice(np.flatnonzero(y == s), n, replace=False) for s in subclasses])
        model = LogisticRegression(max_iter=500, random_state=seed)
        out[name] = float(cross_val_score(model, x[idx], y[idx], cv=5).mean())
    return out
