"""Export sections of an assembled (synthetic) atlas as a user's "new experiment": an AnnData in µm or a MERSCOPE
folder, rotated and shifted, with a gene subset in shuffled order. Shared by the import / transfer tests."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd


def export_sections(
    cells: Path,
    sections: Sequence[str],
    *,
    angle_deg: float = 0.0,
    center_mm=(0.0, 0.0),
    shift_mm=(0.0, 0.0),
    genes: Sequence[str] | None = None,
    var_names: str = "ids",
    labels: dict[str, str] | None = None,
) -> ad.AnnData:
    """The cells of ``sections`` as a user AnnData: ``obsm['spatial']`` = (R(angle) (xy - center) + center + shift)
    in µm, X = log2 expression of ``genes`` (ids, in the given order; default all), var_names gene ids
    (``var_names="ids"``, no symbol column) or symbols (``"symbols"``), obs ``slide`` (the section) and the
    ``labels`` columns renamed (atlas column -> user column). Cell names are the atlas's."""
    atlas = ad.read_zarr(cells)
    sub = atlas[atlas.obs["brain_section_label"].isin(list(sections))]
    if genes is not None:
        sub = sub[:, list(genes)]
    theta = np.deg2rad(angle_deg)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    xy = (sub.obsm["spatial"] - np.asarray(center_mm)) @ rot.T + np.asarray(center_mm) + np.asarray(shift_mm)
    obs = pd.DataFrame({"slide": sub.obs["brain_section_label"].astype(str).to_numpy()}, index=sub.obs_names)
    for src, dst in (labels or {}).items():
        obs[dst] = sub.obs[src].astype(str).to_numpy()
    var = pd.DataFrame(index=sub.var_names if var_names == "ids" else sub.var["gene_symbol"].to_numpy())
    return ad.AnnData(X=np.asarray(sub.X, dtype=np.float32), obs=obs, var=var, obsm={"spatial": xy * 1000.0})


def write_merscope(folder: Path, adata: ad.AnnData) -> Path:
    """A MERSCOPE output folder of ``adata`` (var_names = gene symbols): counts ``2**X - 1`` in cell_by_gene.csv,
    centres (µm) in cell_metadata.csv (rows in another order, as the instrument does not promise one)."""
    folder.mkdir(parents=True, exist_ok=True)
    counts = pd.DataFrame(
        np.exp2(np.asarray(adata.X, dtype=np.float64)) - 1, index=adata.obs_names, columns=adata.var_names
    )
    counts.index.name = "cell"
    counts.to_csv(folder / "cell_by_gene.csv", float_format="%.9g")
    xy = adata.obsm["spatial"]
    meta = pd.DataFrame({"fov": 0, "volume": 800.0, "center_x": xy[:, 0], "center_y": xy[:, 1]}, index=adata.obs_names)
    meta.iloc[::-1].to_csv(folder / "cell_metadata.csv", float_format="%.12g")
    return folder
