"""The synthetic atlas against the real ABC tables: real vocabularies and hierarchy, panel genes, cells where the
real clusters occur, BLA expression statistics within the documented tolerances, and a learnability profile in
which fine types need more than the cell's own expression."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from abc_pipeline.atlas import synthetic_calibration as calibration
from abc_pipeline.atlas import synthetic_tables
from abc_pipeline.atlas.synthetic import write_synthetic_release
from abc_pipeline.atlas.synthetic_geometry import VOLUME_FIT_TOLERANCE, brain_geometry
from abc_pipeline.atlas.synthetic_model import TAXONOMY_LEVELS, placement_frequencies


@pytest.fixture(scope="module")
def subset_cells(tmp_path_factory: pytest.TempPathFactory) -> calibration.ReleaseCells:
    """12,000 cells in 6 sections with the default seed-chosen cluster subset (80 clusters)."""
    root = tmp_path_factory.mktemp("subset")
    write_synthetic_release(root, n_cells=12_000, n_sections=6, seed=0, progress=False)
    return calibration.load_release_cells(root)


@pytest.fixture(scope="module")
def all_cluster_cells(tmp_path_factory: pytest.TempPathFactory) -> calibration.ReleaseCells:
    """8,000 cells in 5 sections drawn from all 5,322 real clusters."""
    root = tmp_path_factory.mktemp("all_clusters")
    write_synthetic_release(root, n_cells=8_000, n_sections=5, seed=0, n_clusters=10_000, progress=False)
    return calibration.load_release_cells(root)


def test_labels_and_hierarchy_are_the_real_taxonomy(
    subset_cells: calibration.ReleaseCells, synthetic_release: Path
) -> None:
    real = synthetic_tables.clusters().set_index("cluster")
    obs = subset_cells.obs.drop_duplicates("cluster").set_index("cluster")
    assert set(obs.index) <= set(real.index)
    for level in TAXONOMY_LEVELS[:-1]:
        assert (obs[level] == real.loc[obs.index, level]).all(), level  # cluster -> supertype -> ... as in the table
    assert 60 <= len(obs) <= 120 and obs["class"].nunique() >= 8
    tax = pd.read_csv(next(synthetic_release.rglob("*pivoted.csv")), keep_default_na=False)
    assert set(tax.cluster) <= set(real.index) and (tax.cluster_alias == tax.cluster.str[:4].astype(int)).all()


def test_parcellation_is_real_with_real_volume_shares() -> None:
    geometry = brain_geometry()
    table = geometry.table
    assert len(table) == 688 and table.parcellation_index.is_unique and table.iloc[0].division == "unassigned"
    rng = np.random.default_rng(5)
    xyz = np.column_stack([rng.uniform(0, 11, 200_000), rng.uniform(0, 11, 200_000), rng.uniform(-0.4, 15, 200_000)])
    counts = np.bincount(geometry.region_of(xyz), minlength=len(table))[1:]
    frame = pd.DataFrame({"division": table.division[1:], "real": table.volume_mm3[1:], "synthetic": counts})
    div = frame.groupby("division")[["real", "synthetic"]].sum()
    div = div[div.real >= 1.0]  # divisions of at least 1 mm3
    error = (div.synthetic / div.synthetic.sum()) / (div.real / frame.real.sum()) - 1
    assert error.abs().max() < VOLUME_FIT_TOLERANCE, error.sort_values()


def test_genes_are_the_real_panel(subset_cells: calibration.ReleaseCells) -> None:
    symbols = subset_cells.symbols
    markers = {g for text in synthetic_tables.clusters().merfish_markers for g in text.split(",") if g}
    assert len(symbols) == 550 and len(set(symbols[:500])) == 500 and set(symbols[:500]) <= markers
    assert set(synthetic_tables.BLA_GENES) <= set(symbols) and all(s.startswith("Blank-") for s in symbols[500:])


@pytest.mark.parametrize("atlas", ["subset_cells", "all_cluster_cells"])
def test_cells_lie_where_their_real_cluster_occurs(atlas: str, request: pytest.FixtureRequest) -> None:
    real = synthetic_tables.clusters()
    row_of = {c: i for i, c in enumerate(real.cluster)}
    table = brain_geometry().table
    division_f = pd.DataFrame(placement_frequencies()).groupby(table.division.to_numpy()).sum()
    obs = request.getfixturevalue(atlas).obs
    occurs = [division_f.at[d, row_of[c]] > 0.01 for d, c in zip(obs.division, obs.cluster)]
    assert np.mean(occurs) > 0.9
    if atlas == "all_cluster_cells":  # the whole taxonomy: classes are where the real atlas has most of them
        for cls, division in (("01 IT-ET Glut", "Isocortex"), ("18 TH Glut", "TH"), ("09 CNU-LGE GABA", "STR")):
            assert obs[obs["class"] == cls].division.value_counts().index[0] == division, cls


def test_bla_statistics_within_documented_tolerances(
    all_cluster_cells: calibration.ReleaseCells, real_excerpts: Path
) -> None:
    table = calibration.bla_comparison(all_cluster_cells, real_excerpts)
    summary = calibration.bla_summary(table)
    assert summary["subclasses"] >= 5 and summary["pairs"] >= 55, summary
    for key in ("zero_fraction_median_abs", "zero_fraction_p90_abs", "quantile_median_abs", "quantile_p90_abs"):
        assert summary[key] <= calibration.TOLERANCES[key], (key, summary)
    x = all_cluster_cells.log2
    lo, hi = calibration.TOLERANCES["overall_nonzero"]
    assert lo <= x.nnz / (x.shape[0] * x.shape[1]) <= hi


def test_fine_types_need_more_than_own_expression(subset_cells: calibration.ReleaseCells) -> None:
    profile = calibration.learnability(subset_cells, n_components=20).set_index("level")
    own, context = profile["own"], profile["own+neighbourhood"]
    assert own["class"] > own["subclass"] > own["cluster"], profile
    assert own["class"] > 0.9 and own["cluster"] < 0.8, profile  # clusters are not trivially separable
    assert (own > profile.chance + 0.3).all(), profile
    assert context["cluster"] > own["cluster"] + 0.01, profile  # neighbourhood context helps at cluster level
