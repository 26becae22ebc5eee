"""Synthetic ABC release: real layout (paths, manifest, columns, h5ad), coordinate conventions, streaming,
determinism, atomic output, and content that makes the learning tasks real."""

from __future__ import annotations

import json
import re
from pathlib import Path

import anndata
import h5py
import numpy as np
import pandas as pd
import pytest
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.neighbors import NearestNeighbors
from sklearn.tree import DecisionTreeClassifier

from abc_pipeline.atlas.manifest import Manifest, get_profile
from abc_pipeline.atlas.synthetic import (
    CELL_METADATA_COLUMNS,
    COORDINATE_COLUMNS,
    RELEASE_FILES,
    file_md5,
    relative_path,
    write_synthetic_release,
)
from abc_pipeline.atlas.synthetic_tables import SECTION_NUMBERS, section_z
from abc_pipeline.cli import main as cli_main
from abc_pipeline.errors import InputError

MERFISH = "MERFISH-C57BL6J-638850"
REL = {name.rsplit("/", 1)[-1]: relative_path(d, k, v, name) for d, k, v, name in RELEASE_FILES}
COLOR = re.compile(r"^#[0-9A-Fa-f]{6}$")


def _csv(root: Path, name: str, **kwargs) -> pd.DataFrame:
    return pd.read_csv(root / REL[name], dtype={"cell_label": str}, **kwargs)


def _manifest(root: Path, release: str = "20250531") -> dict:
    return json.loads((root / f"releases/{release}/manifest.json").read_text())


def _file_entries(manifest: dict) -> list[tuple[str, str, str, str | None, dict]]:
    """(directory, kind, tag, variant, FILE) for every file of a manifest."""
    out = []
    for directory, kinds in manifest["file_listing"].items():
        for kind, tags in kinds.items():
            for tag, entry in tags.items():
                if "files" in entry:
                    out.append((directory, kind, tag, None, next(iter(entry["files"].values()))))
                else:
                    out.extend((directory, kind, tag, v, next(iter(e["files"].values()))) for v, e in entry.items())
    return out


@pytest.fixture(scope="module")
def joined(synthetic_release: Path) -> pd.DataFrame:
    """cell_metadata inner-joined with reconstructed coordinates, taxonomy and parcellation."""
    meta = _csv(synthetic_release, "cell_metadata.csv")
    rec = _csv(synthetic_release, "reconstructed_coordinates.csv")
    tax = _csv(synthetic_release, "cluster_to_cluster_annotation_membership_pivoted.csv", keep_default_na=False)
    par = _csv(synthetic_release, "parcellation_to_parcellation_term_membership_acronym.csv")
    return (
        meta.merge(rec, on="cell_label", suffixes=("_section", "_rec"))
        .merge(tax, on="cluster_alias")
        .merge(par, on="parcellation_index")
    )


# ---------------------------------------------------------------------------------------------- layout
def test_paths_and_manifest_keys_match_the_real_release(synthetic_release: Path, real_excerpts: Path) -> None:
    real = json.loads((real_excerpts / "manifest_20250531.json").read_text())
    ours = _manifest(synthetic_release)
    assert set(ours) == set(real) and ours["resource_uri"] == real["resource_uri"]
    entries = _file_entries(ours)
    assert len(entries) == len(RELEASE_FILES)
    for directory, kind, tag, variant, entry in entries:
        real_entry = real["file_listing"][directory][kind][tag]
        real_entry = real_entry[variant] if variant else real_entry
        real_file = next(iter(real_entry["files"].values()))
        assert set(entry) == set(real_file)
        for key in ("version", "relative_path", "url"):
            assert entry[key] == real_file[key], (directory, tag, key)
        assert (synthetic_release / entry["relative_path"]).is_file()
    for directory, listing in ours["directory_listing"].items():
        for kind, d in listing["directories"].items():
            real_d = real["directory_listing"][directory]["directories"][kind]
            assert set(d) == set(real_d)
            assert {k: d[k] for k in ("version", "relative_path", "url", "view_link")} == {
                k: real_d[k] for k in ("version", "relative_path", "url", "view_link")
            }


def test_manifest_sizes_and_md5s_are_true_and_resolve_with_the_profile(synthetic_release: Path) -> None:
    ours = _manifest(synthetic_release)
    totals: dict[tuple[str, str], int] = {}
    for directory, kind, _, _, entry in _file_entries(ours):
        path = synthetic_release / entry["relative_path"]
        assert entry["size"] == path.stat().st_size
        assert entry["file_hash"] == file_md5(path)
        assert entry["url"] == "https://allen-brain-cell-atlas.s3.us-west-2.amazonaws.com/" + entry["relative_path"]
        totals[directory, kind] = totals.get((directory, kind), 0) + entry["size"]
    for (directory, kind), total in totals.items():
        assert ours["directory_listing"][directory]["directories"][kind]["total_size"] == total
    manifest = Manifest.from_path(synthetic_release / "releases/20250531/manifest.json")
    resolved = get_profile(MERFISH).entries(manifest)
    assert resolved["expression"].relative_path == REL["C57BL6J-638850-log2.h5ad"]


def test_csv_columns_and_dtypes(synthetic_release: Path) -> None:
    meta = _csv(synthetic_release, "cell_metadata.csv")
    assert list(meta.columns) == CELL_METADATA_COLUMNS
    assert meta.cell_label.map(type).eq(str).all() and meta.cell_label.is_unique
    assert meta.cluster_alias.dtype == np.int64 and meta.average_correlation_score.dtype == np.float64
    assert (meta.average_correlation_score >= 0.5).all()
    assert all(meta[c].dtype == np.float64 for c in "xyz")
    assert set(meta.donor_genotype) == {"wt/wt"} and set(meta.donor_sex) == {"M"}
    assert meta.abc_sample_id.str.fullmatch(
        r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
    ).all()
    for name in ("reconstructed_coordinates.csv", "ccf_coordinates.csv"):
        coords = _csv(synthetic_release, name)
        assert list(coords.columns) == COORDINATE_COLUMNS and coords.parcellation_index.dtype == np.int64

    genes = _csv(synthetic_release, "gene.csv")
    assert list(genes.columns) == [
        "gene_identifier",
        "gene_symbol",
        "transcript_identifier",
        "name",
        "mapped_ncbi_identifier",
    ]
    blank = genes.gene_identifier.str.startswith("Blank-")
    assert len(genes) == 550 and blank.sum() == 50 and genes.gene_identifier.is_unique
    assert (genes[blank].gene_symbol == genes[blank].gene_identifier).all()
    assert (genes[blank].transcript_identifier == genes[blank].gene_identifier).all()
    assert genes[blank][["name", "mapped_ncbi_identifier"]].isna().all().all()
    assert genes[~blank].notna().all().all() and genes[~blank].gene_identifier.str.startswith("ENSMUSG").all()

    tax = _csv(synthetic_release, "cluster_to_cluster_annotation_membership_pivoted.csv", keep_default_na=False)
    assert list(tax.columns) == ["cluster_alias", "neurotransmitter", "class", "subclass", "supertype", "cluster"]
    assert tax.cluster_alias.is_unique and (tax.neurotransmitter == "").any()
    assert tax["class"].str.fullmatch(r"\d\d .+").all() and tax.subclass.str.fullmatch(r"\d{3} .+").all()
    assert tax.supertype.str.fullmatch(r"\d{4} .+_\d+").all() and tax.cluster.str.fullmatch(r"\d{4} .+_\d+").all()
    assert tax.groupby("subclass")["class"].nunique().eq(1).all()
    tax_colors = _csv(synthetic_release, "cluster_to_cluster_annotation_membership_color.csv")
    assert list(tax_colors.columns) == [
        "cluster_alias",
        "neurotransmitter_color",
        "class_color",
        "subclass_color",
        "supertype_color",
        "cluster_color",
    ]

    par = _csv(synthetic_release, "parcellation_to_parcellation_term_membership_acronym.csv")
    par_colors = _csv(synthetic_release, "parcellation_to_parcellation_term_membership_color.csv")
    levels = ["organ", "category", "division", "structure", "substructure"]
    assert list(par.columns) == ["parcellation_index", *levels]
    assert list(par_colors.columns) == ["parcellation_index", *(f"{lvl}_color" for lvl in levels)]
    assert par.iloc[0].tolist() == [0] + ["unassigned"] * 5 and par_colors.iloc[0].tolist() == [0] + ["#000000"] * 5
    assert par.groupby("substructure").structure.nunique().eq(1).all()
    assert par.groupby("structure").division.nunique().eq(1).all()
    assert {"Isocortex", "HPF", "TH", "HY", "STR", "CB", "lfbs"} <= set(par.division)
    assert {"MOs2/3", "DG-po", "BLAp"} <= set(par.substructure)
    colors = pd.concat([tax_colors.iloc[:, 1:].stack(), par_colors.iloc[:, 1:].stack()])
    assert colors.str.fullmatch(COLOR).all()
    assert colors.str.contains("[a-f]").any() and colors.str.contains("[A-F]").any()


def test_h5ad_layout(synthetic_release: Path) -> None:
    raw_path = synthetic_release / REL["C57BL6J-638850-raw.h5ad"]
    log_path = synthetic_release / REL["C57BL6J-638850-log2.h5ad"]
    adata = anndata.read_h5ad(log_path, backed="r")
    assert adata.shape == (3000, 550)
    assert adata.obs.index.name == "cell_label" and adata.var.index.name == "gene_identifier"
    assert list(adata.obs.columns) == ["brain_section_label"]
    assert isinstance(adata.obs.brain_section_label.dtype, pd.CategoricalDtype)
    assert list(adata.var.columns) == ["gene_symbol", "transcript_identifier"]
    assert set(adata.uns) == {"accessed_on", "src"}
    genes = _csv(synthetic_release, "gene.csv")
    assert list(adata.var_names) == genes.gene_identifier.tolist()
    sections = list(adata.obs.brain_section_label.cat.categories)
    numbers = [int(s.rsplit(".", 1)[1]) for s in sections]
    assert all(s.startswith("C57BL6J-638850.") for s in sections) and numbers == sorted(numbers)
    assert set(numbers) <= set(SECTION_NUMBERS)
    adata.file.close()

    with h5py.File(raw_path, "r") as raw, h5py.File(log_path, "r") as log2:
        for f in (raw, log2):
            assert f["X"].attrs["encoding-type"] == "csr_matrix"
            assert f["X/data"].dtype == np.float64 and len(f["X/indptr"]) == 3001
        assert np.array_equal(raw["X/indices"][:], log2["X/indices"][:])
        assert np.array_equal(raw["X/indptr"][:], log2["X/indptr"][:])
        counts, values, indptr = raw["X/data"][:], log2["X/data"][:], raw["X/indptr"][:]
    assert (counts == np.round(counts)).all() and (counts >= 1).all()
    # log2 = log2(counts * per-cell volume factor + 1): one factor per cell.
    factor = (2.0**values - 1.0) / counts
    row = np.repeat(np.arange(3000), np.diff(indptr))
    spread = pd.Series(factor).groupby(row).agg(lambda f: f.max() / f.min() - 1.0)
    assert spread.max() < 1e-9
    assert 0.2 < np.diff(indptr).mean() / 550 < 0.35  # MERFISH-like density (real: ~27 %)


# ---------------------------------------------------------------------------------------------- coordinates
def test_section_coordinates_are_a_rigid_per_section_transform(joined: pd.DataFrame) -> None:
    angles = []
    for _, cells in joined.groupby("brain_section_label"):
        src = cells[["x_rec", "y_rec"]].to_numpy()
        dst = cells[["x_section", "y_section"]].to_numpy()
        src_c, dst_c = src - src.mean(0), dst - dst.mean(0)
        u, _, vt = np.linalg.svd(src_c.T @ dst_c)
        rotation = u @ vt
        assert np.linalg.det(rotation) > 0
        assert np.abs(src_c @ rotation - dst_c).max() < 1e-9  # rigid, no scaling or shear
        angles.append(np.arctan2(rotation[0, 1], rotation[0, 0]))
        assert np.abs(src - dst).max() > 0.05  # sections are not aligned in section space
        z_sec, z_rec = cells.z_section.round(1).unique(), cells.z_rec.unique()
        assert len(z_sec) == 1 and len(z_rec) == 1 and z_sec[0] == z_rec[0]
        number = int(cells.brain_section_label.iloc[0].rsplit(".", 1)[1])
        assert z_rec[0] == section_z(number)  # the real section z (e.g. .31 at 5.4 mm, .64 at 13.0 mm)
    assert np.ptp(angles) > 0.05


def test_ccf_coordinates_are_affine_in_ccf_ranges(synthetic_release: Path) -> None:
    rec = _csv(synthetic_release, "reconstructed_coordinates.csv")
    ccf = _csv(synthetic_release, "ccf_coordinates.csv")
    assert rec.cell_label.tolist() == ccf.cell_label.tolist()
    assert (rec.parcellation_index == ccf.parcellation_index).all() and (rec.parcellation_index > 0).all()
    design = np.column_stack([rec[["x", "y", "z"]].to_numpy(), np.ones(len(rec))])
    coef, *_ = np.linalg.lstsq(design, ccf[["x", "y", "z"]].to_numpy(), rcond=None)
    assert np.abs(design @ coef - ccf[["x", "y", "z"]].to_numpy()).max() < 1e-9
    for axis, hi in zip("xyz", (13.2, 8.0, 11.4)):
        assert ccf[axis].between(0, hi).all()


def test_join_gaps_like_the_real_release(synthetic_release: Path) -> None:
    with h5py.File(synthetic_release / REL["C57BL6J-638850-log2.h5ad"], "r") as f:
        expression = pd.Index(f["obs/cell_label"].asstr()[:])
    meta = _csv(synthetic_release, "cell_metadata.csv")
    rec = _csv(synthetic_release, "reconstructed_coordinates.csv")
    assert expression.is_unique and expression.str.fullmatch(r"\d{19}(-[1-4])?").all()
    assert expression.str.contains("-").any()
    assert set(meta.cell_label) < set(expression)  # some expression cells failed QC
    assert 0.01 < 1 - len(meta) / len(expression) < 0.15
    assert set(rec.cell_label) < set(meta.cell_label)  # some metadata cells lack CCF
    assert list(meta.cell_label) != [c for c in expression if c in set(meta.cell_label)]  # not in h5ad order


# ---------------------------------------------------------------------------------------------- streaming
def test_same_seed_gives_identical_files_and_chunking_keeps_content(synthetic_release: Path, tmp_path: Path) -> None:
    again = write_synthetic_release(tmp_path / "again", n_cells=3000, seed=0, progress=False)
    assert again.read_bytes() == (synthetic_release / "releases/20250531/manifest.json").read_bytes()

    chunked = tmp_path / "chunked"
    write_synthetic_release(chunked, n_cells=3000, seed=0, chunk_cells=500, progress=False)  # one append per block
    ours, theirs = _file_entries(_manifest(synthetic_release)), _file_entries(_manifest(chunked))
    for a, b in zip(ours, theirs):
        if not a[4]["relative_path"].endswith(".h5ad"):
            assert a[4]["file_hash"] == b[4]["file_hash"], a[4]["relative_path"]
    for name in ("C57BL6J-638850-raw.h5ad", "C57BL6J-638850-log2.h5ad"):
        one, many = (anndata.read_h5ad(root / REL[name]) for root in (synthetic_release, chunked))
        assert (one.obs_names == many.obs_names).all() and (one.obs == many.obs).all().all()
        assert (one.X != many.X).nnz == 0

    other = write_synthetic_release(tmp_path / "other", n_cells=3000, seed=1, progress=False)
    assert json.loads(other.read_text())["file_listing"] != _manifest(synthetic_release)["file_listing"]


def test_bad_arguments_and_foreign_output_leave_nothing_behind(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="n_cells"):
        write_synthetic_release(tmp_path / "a", n_cells=0)
    with pytest.raises(InputError, match="n_sections"):
        write_synthetic_release(tmp_path / "a", n_cells=100, n_sections=60)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="notes.txt"):
        write_synthetic_release(foreign, n_cells=100)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign"]
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_cli_rewrites_an_earlier_tree(tmp_path: Path) -> None:
    out = tmp_path / "release"
    write_synthetic_release(out, n_cells=400, seed=3, progress=False)
    assert (
        cli_main(
            [
                "-q",
                "synth",
                "--out",
                str(out),
                "--cells",
                "600",
                "--sections",
                "2",
                "--seed",
                "4",
                "--release",
                "20240101",
                "--no-progress",
            ]
        )
        == 0
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["release"]  # no temporary or old trees left
    assert sorted(p.name for p in (out / "releases").iterdir()) == ["20240101"]
    adata = anndata.read_h5ad(out / REL["C57BL6J-638850-log2.h5ad"], backed="r")
    assert adata.n_obs == 600 and len(adata.obs.brain_section_label.cat.categories) == 2


# ---------------------------------------------------------------------------------------------- content
def test_cell_type_needs_many_genes(synthetic_release: Path, joined: pd.DataFrame) -> None:
    adata = anndata.read_h5ad(synthetic_release / REL["C57BL6J-638850-log2.h5ad"])
    x = adata[joined.cell_label.to_numpy(), :500].X.toarray()
    y = joined["class"].to_numpy()
    sections = joined.brain_section_label.to_numpy()
    test = sections == np.unique(sections)[1]
    lda = LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto")
    all_genes = lda.fit(x[~test], y[~test]).score(x[test], y[test])
    top = np.argsort(-x.var(0))[:60]
    single = max(
        DecisionTreeClassifier(max_depth=5, random_state=0)
        .fit(x[~test][:, [g]], y[~test])
        .score(x[test][:, [g]], y[test])
        for g in top
    )
    assert all_genes > 0.85 and single < all_genes - 0.3, (all_genes, single)
    blanks = adata[:, 500:].X
    assert blanks.nnz / np.prod(blanks.shape) < 0.1 < adata[:, :500].X.nnz / (adata.n_obs * 500)


def test_region_is_learnable_from_local_expression(synthetic_release: Path, joined: pd.DataFrame) -> None:
    adata = anndata.read_h5ad(synthetic_release / REL["C57BL6J-638850-log2.h5ad"])
    x = adata[joined.cell_label.to_numpy(), :500].X.toarray()
    sections = joined.brain_section_label.to_numpy()
    local = np.empty_like(x)
    for s in np.unique(sections):  # mean expression of the 15 nearest cells in the section
        cells = np.flatnonzero(sections == s)
        xy = joined[["x_section", "y_section"]].to_numpy()[cells]
        _, nn = NearestNeighbors(n_neighbors=15).fit(xy).kneighbors(xy)
        local[cells] = x[cells][nn].mean(1)
    y = joined.division.to_numpy()
    test = sections == np.unique(sections)[1]
    chance = pd.Series(y[test]).value_counts(normalize=True).iloc[0]
    lda = LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto")
    accuracy = lda.fit(local[~test], y[~test]).score(local[test], y[test])
    assert len(set(y)) >= 6 and accuracy > chance + 0.35, (accuracy, chance)
    # Cell-type proportions differ between divisions.
    mix = pd.crosstab(joined.division, joined["class"], normalize="index")
    assert mix.max(axis=0).sub(mix.min(axis=0)).max() > 0.3
