"""Hand-made ``cells.zarr`` stores following docs/architecture.md, shared by the raster, safety and cell-context
tests (a helper module, not a test file)."""

from __future__ import annotations

import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd


def write_cells(
    path: Path,
    expr: np.ndarray,
    *,
    spatial: np.ndarray | None = None,
    spatial_3d: np.ndarray | None = None,
    ccf: np.ndarray | None = None,
    sections: list[str] | np.ndarray | None = None,
    section_order: list[str] | None = None,
    z_section: np.ndarray | None = None,
    labels: dict[str, tuple[list[str], list[str]]] | None = None,
    symbols: list[str] | None = None,
    blank: list[bool] | None = None,
    chunk: int = 4,
) -> Path:
    """Write an AnnData ``cells.zarr``.

    expr: (n, g) log2 expression; spatial: (n, 2) section x, y mm; spatial_3d / ccf: (n, 3) x, y, z mm
    (NaN rows = no CCF); sections: brain_section_label per cell, categories ``section_order``;
    labels: column -> (value per cell, categories), each with a fixed ``uns['<column>_colors']`` hex colour per category.
    """
    n, g = expr.shape
    nan3 = np.full((n, 3), np.nan)
    spatial_3d = nan3 if spatial_3d is None else spatial_3d
    ccf = spatial_3d if ccf is None else ccf
    spatial = spatial_3d[:, :2] if spatial is None else spatial
    if sections is None:
        sections = ["S0"] * n
    section_order = section_order or sorted(set(sections))
    obs = pd.DataFrame(
        {
            "brain_section_label": pd.Categorical(sections, categories=section_order, ordered=False),
            "z_section": np.zeros(n) if z_section is None else z_section,
            "has_ccf": ~np.isnan(ccf).any(axis=1),
        },
        index=pd.Index([f"cell-{i:05d}" for i in range(n)], name="cell_label"),
    )
    uns = {}
    for name, (values, cats) in (labels or {}).items():
        obs[name] = pd.Categorical(values, categories=cats)
        uns[f"{name}_colors"] = [
            f"#{(37 * k) % 256:02X}{(91 * k) % 256:02X}{(53 * k) % 256:02X}" for k in range(len(cats))
        ]
    symbols = symbols or [f"Gene{i}" for i in range(g)]
    var = pd.DataFrame(
        {"gene_symbol": symbols, "blank": blank or [s.startswith("Blank") for s in symbols]},
        index=[f"ENSMUSG{i:011d}" if not s.startswith("Blank") else s for i, s in enumerate(symbols)],
    )
    adata = ad.AnnData(X=np.asarray(expr, dtype=np.float32), obs=obs, var=var, uns=uns)
    adata.obsm["spatial"] = np.asarray(spatial, dtype=np.float64)
    adata.obsm["spatial_3d"] = np.asarray(spatial_3d, dtype=np.float64)
    adata.obsm["ccf"] = np.asarray(ccf, dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adata.write_zarr(path, chunks=(chunk, g))
    return path
