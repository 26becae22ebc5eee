"""User-data import (``abc-pipeline import``): AnnData h5ad/zarr and MERSCOPE folders -> the cells.zarr contract,
read back with anndata, and every bad input refused with a clear message and nothing written."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from abc_pipeline.atlas.import_user import import_user_data
from abc_pipeline.cells import CellSource
from abc_pipeline.cli import main
from abc_pipeline.errors import InputError

GENES = ["Gad1", "Slc17a7", "Sst", "Pvalb", "Vip", "Blank-1", "Aqp4", "NegControlProbe_3"]


def user_adata(n_per_section: int = 150, sections: int = 3, dim: int = 2, seed: int = 0) -> ad.AnnData:
    """Cells ~12 µm apart on a jittered lattice per section (µm), counts-like log expression, two label columns."""
    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(n_per_section)))
    lattice = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2)[:n_per_section] * 12.0
    xy = np.concatenate([lattice + rng.normal(0, 2, lattice.shape) for _ in range(sections)])
    n = len(xy)
    sec = np.repeat([f"s{i}" for i in range(sections)], n_per_section)
    coords = np.column_stack([xy, np.repeat(np.arange(sections) * 200.0, n_per_section)]) if dim == 3 else xy
    x = sp.random(n, len(GENES), density=0.4, random_state=seed, format="csr", dtype=np.float32) * 5
    obs = pd.DataFrame(
        {
            "sample": sec,
            "celltype": rng.choice(["A", "B", "C"], n),
            "area": rng.random(n),
            "cluster": rng.integers(0, 4, n),
        },
        index=[f"cell{i}" for i in range(n)],
    )
    obs.loc[obs.index[:5], "celltype"] = None
    var = pd.DataFrame({"gene_ids": [f"ENSMUSG{i:011d}" for i in range(len(GENES))], "panel": "v1"}, index=GENES)
    return ad.AnnData(X=x, obs=obs, var=var, obsm={"spatial": coords})


@pytest.mark.parametrize("fmt", ["h5ad", "zarr"])
def test_anndata_import_follows_the_cells_contract(tmp_path: Path, fmt: str) -> None:
    adata = user_adata(dim=3)
    src = tmp_path / f"user.{fmt}"
    adata.write_h5ad(src) if fmt == "h5ad" else adata.write_zarr(src)
    out = import_user_data(
        "anndata",
        src,
        tmp_path / "cells.zarr",
        section="sample",
        labels=["celltype", "cluster"],
        chunk_cells=100,
        progress=False,
    )
    got = ad.read_zarr(out)
    assert list(got.obs_names) == list(adata.obs_names)  # input order kept
    np.testing.assert_allclose(got.X, adata.X.toarray(), rtol=1e-6)  # expression log2 by default: copied
    np.testing.assert_allclose(got.obsm["spatial"], adata.obsm["spatial"][:, :2] / 1000)  # µm -> mm
    np.testing.assert_allclose(got.obsm["spatial_3d"], adata.obsm["spatial"] / 1000)
    assert list(got.obs["brain_section_label"].cat.categories) == ["s0", "s1", "s2"]  # ordered by z
    np.testing.assert_allclose(
        got.obs.groupby("brain_section_label", observed=True)["z_section"].first(), [0, 0.2, 0.4]
    )
    assert got.obs["celltype"].dtype == "category" and got.obs["celltype"].isna().sum() == 5
    assert got.obs["cluster"].dtype == "category"  # a numeric label column becomes categorical
    assert got.obs["area"].dtype == np.float64 and "sample" in got.obs  # original columns kept
    assert list(got.var["gene_symbol"]) == GENES and list(got.var["panel"]) == ["v1"] * len(GENES)
    assert got.var_names[0] == "Gad1"  # var_names stay the input's names
    assert list(got.var_names[got.var["blank"]]) == ["Blank-1", "NegControlProbe_3"]
    meta = got.uns["abc_pipeline"]["import"]
    assert meta["kind"] == "anndata" and meta["input_unit"] == "um"
    assert 0.005 < meta["median_neighbour_distance_mm"] < 0.02
    src_cells = CellSource(out)  # the rasterizer's reader opens it
    assert src_cells.categorical("celltype").categories == ("A", "B", "C")


def test_ensembl_var_names_take_symbols_from_a_column(tmp_path: Path) -> None:
    adata = user_adata(sections=1)
    adata.var = adata.var.set_index("gene_ids").assign(gene_symbol=GENES)
    adata.obsm["xy_mm"] = adata.obsm.pop("spatial") / 1000
    adata.write_h5ad(tmp_path / "u.h5ad")
    out = import_user_data(
        "anndata",
        tmp_path / "u.h5ad",
        tmp_path / "c.zarr",
        coordinates="xy_mm",
        unit="mm",
        section_name="slide7",
        progress=False,
    )
    src = CellSource(out)
    assert src.gene_ids[0].startswith("ENSMUSG") and src.gene_symbols == GENES
    assert src.categorical("brain_section_label").categories == ("slide7",)


def test_counts_are_stored_as_log2(tmp_path: Path) -> None:
    adata = user_adata(sections=1)
    adata.X = adata.X.toarray().round()
    adata.write_h5ad(tmp_path / "u.h5ad")
    out = import_user_data("anndata", tmp_path / "u.h5ad", tmp_path / "c.zarr", expression="counts", progress=False)
    np.testing.assert_allclose(ad.read_zarr(out).X, np.log2(adata.X + 1), rtol=1e-6)


def write_merscope(folder: Path, adata: ad.AnnData, prefix: str = "") -> Path:
    """A MERSCOPE-like output folder: cell_by_gene.csv (counts) and cell_metadata.csv (centres in µm)."""
    folder.mkdir(parents=True, exist_ok=True)
    counts = pd.DataFrame(
        np.asarray(adata.X.todense() if sp.issparse(adata.X) else adata.X),
        index=adata.obs_names,
        columns=adata.var_names,
    )
    counts.index.name = "cell"
    counts.to_csv(folder / f"{prefix}cell_by_gene.csv")
    xy = adata.obsm["spatial"][:, :2]
    meta = pd.DataFrame({"fov": 0, "volume": 500.0, "center_x": xy[:, 0], "center_y": xy[:, 1]}, index=adata.obs_names)
    meta.sample(frac=1, random_state=0).to_csv(folder / f"{prefix}cell_metadata.csv")  # any row order
    return folder


def test_merscope_folder(tmp_path: Path) -> None:
    adata = user_adata(sections=1)
    adata.X = adata.X.toarray().round()
    folder = write_merscope(tmp_path / "region_0", adata, prefix="region_0_")
    out = tmp_path / "cells.zarr"
    assert (
        main(
            [
                "import",
                "--kind",
                "merscope",
                "--input",
                str(folder),
                "--out",
                str(out),
                "--chunk-cells",
                "64",
                "--no-progress",
            ]
        )
        == 0
    )
    got = ad.read_zarr(out)
    assert list(got.obs_names) == list(adata.obs_names)
    np.testing.assert_allclose(got.X, np.log2(adata.X + 1), rtol=1e-6)  # counts -> log2(x + 1)
    np.testing.assert_allclose(got.obsm["spatial"], adata.obsm["spatial"] / 1000)
    assert list(got.obs.columns[:2]) == ["brain_section_label", "z_section"] and "volume" in got.obs
    assert list(got.obs["brain_section_label"].cat.categories) == ["region_0"]
    assert list(got.var_names[got.var["blank"]]) == ["Blank-1", "NegControlProbe_3"]


# ------------------------------------------------------------------------------------------ bad input
def _h5ad(tmp_path: Path, adata: ad.AnnData) -> Path:
    path = tmp_path / "bad.h5ad"
    adata.write_h5ad(path)
    return path


def _refused(tmp_path: Path, kind: str, src: Path, match: str, **kw) -> None:
    out = tmp_path / "cells.zarr"
    with pytest.raises(InputError, match=match):
        import_user_data(kind, src, out, progress=False, **kw)
    assert not out.exists() and not list(tmp_path.glob(".cells.zarr*"))  # nothing half-written


def test_missing_coordinate_key(tmp_path: Path) -> None:
    _refused(
        tmp_path,
        "anndata",
        _h5ad(tmp_path, user_adata()),
        r"obsm\['X_spatial'\].*does not exist.*\['spatial'\]",
        coordinates="X_spatial",
    )


def test_one_dimensional_coordinates(tmp_path: Path) -> None:
    adata = user_adata()
    adata.obsm["spatial"] = adata.obsm["spatial"][:, :1]
    _refused(tmp_path, "anndata", _h5ad(tmp_path, adata), r"obsm\['spatial'\] has shape \(450, 1\).*2 \(x, y\)")


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nonfinite_coordinates(tmp_path: Path, value: float) -> None:
    adata = user_adata()
    adata.obsm["spatial"][7, 1] = value
    _refused(tmp_path, "anndata", _h5ad(tmp_path, adata), r"1 cell\(s\) have NaN or infinite coordinates.*cell7")


def test_nonfinite_expression_leaves_nothing(tmp_path: Path) -> None:
    adata = user_adata()
    x = adata.X.toarray()
    x[300, 2] = np.nan
    adata.X = x
    _refused(
        tmp_path,
        "anndata",
        _h5ad(tmp_path, adata),
        r"expression of 1 cell\(s\) from row 256 is NaN.*cell300",
        chunk_cells=128,
    )


def test_duplicate_cell_names(tmp_path: Path) -> None:
    adata = user_adata()
    adata.obs_names = ["c"] * 2 + list(adata.obs_names[2:])
    _refused(tmp_path, "anndata", _h5ad(tmp_path, adata), r"duplicate cell names \['c'\].*obs_names_make_unique")


def test_labels_all_missing(tmp_path: Path) -> None:
    adata = user_adata()
    adata.obs["empty"] = pd.Categorical([None] * adata.n_obs, categories=["a"])
    _refused(tmp_path, "anndata", _h5ad(tmp_path, adata), r"obs\['empty'\] is missing for every cell", labels=["empty"])


def test_unknown_section_column(tmp_path: Path) -> None:
    _refused(tmp_path, "anndata", _h5ad(tmp_path, user_adata()), r"no section column 'slide'", section="slide")


@pytest.mark.parametrize(
    "unit, declared, match",
    [(1.0, "mm", "µm declared as mm: import with unit um"), (1e-3, "um", "mm declared as µm: import with unit mm")],
)
def test_unit_density_check(tmp_path: Path, unit: float, declared: str, match: str) -> None:
    adata = user_adata()
    adata.obsm["spatial"] = adata.obsm["spatial"] * unit  # µm values; * 1e-3 = mm values
    _refused(tmp_path, "anndata", _h5ad(tmp_path, adata), match, unit=declared, section="sample")


def test_merscope_missing_file_and_column(tmp_path: Path) -> None:
    adata = user_adata(sections=1)
    folder = write_merscope(tmp_path / "run", adata)
    meta = pd.read_csv(folder / "cell_metadata.csv", index_col=0)
    meta.drop(columns="center_y").to_csv(folder / "cell_metadata.csv")
    _refused(tmp_path, "merscope", folder, r"cell_metadata.csv lacks the column\(s\) \['center_y'\]")
    (folder / "cell_metadata.csv").unlink()
    _refused(tmp_path, "merscope", folder, r"no cell_metadata.csv .*needs cell_by_gene.csv and cell_metadata.csv")


def test_merscope_cells_without_metadata(tmp_path: Path) -> None:
    folder = write_merscope(tmp_path / "run", user_adata(sections=1))
    meta = pd.read_csv(folder / "cell_metadata.csv", index_col=0)
    meta.iloc[3:].to_csv(folder / "cell_metadata.csv")
    _refused(tmp_path, "merscope", folder, r"3 cell\(s\) of cell_by_gene.csv have no row")
