"""Assembly of a (synthetic) release into cells.zarr: contents, chunk independence, bad input, atomicity."""

from __future__ import annotations

import shutil
from pathlib import Path

import anndata
import h5py
import matplotlib
import numpy as np
import pandas as pd
import pytest
from plot_checks import check_spatial_scatter

from abc_pipeline.atlas.assemble import assemble_dataset
from abc_pipeline.atlas.manifest import Manifest, get_profile, manifest_relative_path
from abc_pipeline.errors import InputError

matplotlib.use("Agg")

DATASET = "MERFISH-C57BL6J-638850"
RELEASE = "20250531"


def _paths(root: Path) -> dict[str, Path]:
    manifest = Manifest.from_path(root / manifest_relative_path(RELEASE))
    return {role: e.local_path(root) for role, e in get_profile(DATASET).entries(manifest).items()}


@pytest.fixture()
def release_copy(synthetic_release: Path, tmp_path: Path) -> Path:
    """A private copy of the shared synthetic release that a test may damage."""
    dst = tmp_path / "release"
    shutil.copytree(synthetic_release, dst)
    return dst


def test_assembled_store_follows_contract(assembled: Path, synthetic_release: Path) -> None:
    adata = anndata.read_zarr(assembled)
    paths = _paths(synthetic_release)
    meta = pd.read_csv(paths["cell_metadata"], dtype={"cell_label": str})
    with h5py.File(paths["expression"], "r") as f:
        h5_labels = f["obs"]["cell_label"].asstr()[:]
    expected = pd.Index(h5_labels).intersection(pd.Index(meta["cell_label"]), sort=False)
    assert adata.n_obs == len(expected) > 0
    assert set(adata.obs_names) == set(expected)
    assert adata.obs_names.name == "cell_label"
    assert adata.X.dtype == np.float32 and adata.n_vars == 550
    assert adata.var["blank"].sum() == 50
    for col in [
        "brain_section_label",
        "class",
        "subclass",
        "supertype",
        "cluster",
        "parcellation_division",
        "parcellation_structure",
        "parcellation_substructure",
    ]:
        assert isinstance(adata.obs[col].dtype, pd.CategoricalDtype), col
        if col != "brain_section_label":
            colors = adata.uns[f"{col}_colors"]
            assert len(colors) == len(adata.obs[col].cat.categories), col
            assert all(c.startswith("#") and len(c) == 7 for c in colors)
    assert list(adata.obs["brain_section_label"].cat.categories) == list(
        adata.obs.groupby("brain_section_label", observed=True)["z_section"].first().sort_values().index
    )
    for key, width in [("spatial", 2), ("spatial_3d", 3), ("ccf", 3)]:
        assert adata.obsm[key].shape == (adata.n_obs, width)
    no_ccf = ~adata.obs["has_ccf"].to_numpy()
    assert no_ccf.any() and not no_ccf.all(), "the synthetic release has cells with and without CCF"
    assert np.isnan(adata.obsm["ccf"][no_ccf]).all()
    assert (adata.obs.loc[no_ccf, "parcellation_index"] == 0).all()
    assert np.isfinite(adata.obsm["spatial"]).all()
    # class colours are the taxonomy's, re-ordered to the categories
    colors = pd.read_csv(paths["taxonomy_colors"]).set_index("cluster_alias")["class_color"].str.lower()
    alias = adata.obs["cluster_alias"].iloc[0]
    cls = adata.obs["class"].iloc[0]
    assert adata.uns["class_colors"][list(adata.obs["class"].cat.categories).index(cls)] == colors[alias]
    assert adata.uns["abc_pipeline"]["assemble"]["release"] == RELEASE


def test_expression_rows_match_the_h5ad(assembled: Path, synthetic_release: Path) -> None:
    adata = anndata.read_zarr(assembled)
    src = anndata.read_h5ad(_paths(synthetic_release)["expression"])
    picks = adata.obs_names[[0, adata.n_obs // 2, adata.n_obs - 1]]
    np.testing.assert_allclose(adata[picks].X, src[picks].X.toarray().astype(np.float32))


def test_chunk_size_does_not_change_the_result(assembled: Path, synthetic_release: Path, tmp_path: Path) -> None:
    small = assemble_dataset(
        DATASET, cache_dir=synthetic_release, out=tmp_path / "small.zarr", chunk_cells=700, progress=False
    )
    a, b = anndata.read_zarr(assembled), anndata.read_zarr(small)
    assert a.obs_names.equals(b.obs_names)
    np.testing.assert_array_equal(a.X, b.X)
    pd.testing.assert_frame_equal(a.obs, b.obs)
    np.testing.assert_array_equal(a.obsm["ccf"], b.obsm["ccf"])


def test_opens_in_scanpy_and_squidpy(assembled: Path) -> None:
    import scanpy as sc

    adata = anndata.read_zarr(assembled)
    ax = sc.pl.embedding(adata, basis="spatial", color="parcellation_division", show=False)
    drawn = np.asarray(max(ax.collections, key=lambda c: len(c.get_offsets())).get_offsets())
    spatial = adata.obsm["spatial"][:, :2]  # every cell once at its (x, y), in scanpy's order (missing labels first)
    np.testing.assert_allclose(drawn[np.lexsort(drawn.T)], spatial[np.lexsort(spatial.T)])
    division = adata.obs["parcellation_division"]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == list(division.cat.categories) + (["NA"] if division.isna().any() else [])
    matplotlib.pyplot.close("all")
    check_spatial_scatter(adata, "class", library_key="brain_section_label")


def test_gene_table_disagreeing_with_h5ad_is_refused(release_copy: Path, tmp_path: Path) -> None:
    gene_csv = _paths(release_copy)["gene"]
    genes = pd.read_csv(gene_csv)
    genes.loc[3, "gene_identifier"] = "ENSMUSG_NOT_THERE"
    genes.to_csv(gene_csv, index=False)
    with pytest.raises(InputError, match="ENSMUSG_NOT_THERE"):
        assemble_dataset(DATASET, cache_dir=release_copy, out=tmp_path / "x.zarr", progress=False)
    assert not (tmp_path / "x.zarr").exists()


def test_missing_column_names_file_and_column(release_copy: Path, tmp_path: Path) -> None:
    meta_csv = _paths(release_copy)["cell_metadata"]
    pd.read_csv(meta_csv, dtype=str).drop(columns="cluster_alias").to_csv(meta_csv, index=False)
    with pytest.raises(InputError, match=r"cell_metadata\.csv lacks required column\(s\) \['cluster_alias'\]"):
        assemble_dataset(DATASET, cache_dir=release_copy, out=tmp_path / "x.zarr", progress=False)


def test_duplicate_cell_labels_are_refused(release_copy: Path, tmp_path: Path) -> None:
    meta_csv = _paths(release_copy)["cell_metadata"]
    meta = pd.read_csv(meta_csv, dtype=str)
    pd.concat([meta, meta.iloc[[5]]]).to_csv(meta_csv, index=False)
    with pytest.raises(InputError, match=meta.loc[5, "cell_label"]):
        assemble_dataset(DATASET, cache_dir=release_copy, out=tmp_path / "x.zarr", progress=False)


def test_nan_coordinates_are_dropped_and_counted(release_copy: Path, tmp_path: Path) -> None:
    meta_csv = _paths(release_copy)["cell_metadata"]
    meta = pd.read_csv(meta_csv, dtype=str)
    meta.loc[[1, 2, 3], "x"] = ""
    meta.to_csv(meta_csv, index=False)
    out = assemble_dataset(DATASET, cache_dir=release_copy, out=tmp_path / "x.zarr", progress=False)
    adata = anndata.read_zarr(out)
    assert adata.uns["abc_pipeline"]["assemble"]["counts"]["metadata_nan_coordinates"] == 3
    assert not set(meta.loc[[1, 2, 3], "cell_label"]) & set(adata.obs_names)


def test_missing_file_says_to_download(release_copy: Path, tmp_path: Path) -> None:
    _paths(release_copy)["ccf_coordinates"].unlink()
    with pytest.raises(InputError, match="abc-pipeline download"):
        assemble_dataset(DATASET, cache_dir=release_copy, out=tmp_path / "x.zarr", progress=False)


def test_failed_rerun_keeps_the_finished_store(release_copy: Path, tmp_path: Path) -> None:
    out = assemble_dataset(DATASET, cache_dir=release_copy, out=tmp_path / "x.zarr", progress=False)
    before = anndata.read_zarr(out).obs_names
    expression = _paths(release_copy)["expression"]
    expression.write_bytes(expression.read_bytes()[: expression.stat().st_size // 2])  # truncated download
    with pytest.raises(InputError, match="truncated"):
        assemble_dataset(DATASET, cache_dir=release_copy, out=out, progress=False)
    assert anndata.read_zarr(out).obs_names.equals(before)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
