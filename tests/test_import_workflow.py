"""Your own data through the real workflow: a one-section user AnnData (µm, own label columns) imported, rasterized,
both tasks trained with spatial block splits, predicted and annotated by Snakemake (evaluate and report, which take
the same inputs, ran once on this config and are left out to keep the test short)."""

from __future__ import annotations

import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import yaml
from test_workflow import snakemake
from user_export import export_sections

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_one_section_user_dataset_trains_both_tasks_with_block_splits(assembled: Path, tmp_path: Path) -> None:
    atlas = ad.read_zarr(assembled)
    section = atlas.obs["brain_section_label"].value_counts().index[0]  # the largest section
    user = export_sections(
        assembled,
        [section],
        angle_deg=30,
        shift_mm=(2.0, -1.0),
        labels={"class": "cell_class", "parcellation_division": "domain"},
    )
    user.write_h5ad(tmp_path / "slide.h5ad")
    config = {
        "dataset": "my_slide",
        "source": {
            "kind": "anndata",
            "path": str(tmp_path / "slide.h5ad"),
            "unit": "um",
            "labels": ["cell_class", "domain"],
        },
        "assemble": {"chunk_cells": 1000},
        "rasters": [
            {"name": "slide", "space": "section", "voxel_size": [0.1], "pca": 8, "labels": ["cell_class", "domain"]}
        ],
        "tasks": {
            "celltype": {"raster": "slide", "level": "cell_class", "patch_size": [3]},
            "region": {"raster": "slide", "level": "domain", "tile_size": [16]},
        },
        "models": ["moment-trivial-irrep"],
        "training": {
            "target_params": 2000,
            "epochs": 1,
            "batch_size": 32,
            "max_samples_per_epoch": 300,
            "split_block_size": 0.5,
        },
    }
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(ROOT / "Snakefile", work / "Snakefile")
    shutil.copytree(ROOT / "workflow", work / "workflow")
    (work / "config").mkdir()
    (work / "config" / "config.yaml").write_text(yaml.safe_dump(config))
    snakemake(work, "results/my_slide/cells_annotated.h5ad")  # import, rasterize, train, predict, annotate
    results = work / "results" / "my_slide"
    annotated = ad.read_h5ad(results / "cells_annotated.h5ad")
    assert annotated.n_obs == user.n_obs and list(annotated.obs_names) == list(user.obs_names)
    assert list(annotated.obs["brain_section_label"].cat.categories) == ["slide"]  # one section
    for task, level in (("celltype", "cell_class"), ("region", "domain")):
        metrics = yaml.safe_load((results / "models" / task / "moment-trivial-irrep" / "metrics.json").read_text())
        assert metrics["level"] == level and metrics["n_test"] > 0
        blocks = metrics["splits"]["blocks"]
        assert blocks["size"] == [5, 5]  # 0.5 mm blocks of 0.1 mm voxels
        codes = np.asarray(blocks["codes"])
        assert {0, 1, 2} <= set(np.unique(codes).tolist())  # train, val and test blocks in the one section
        assert set(annotated.obs["split"].unique()) >= {"train", "val", "test"}
    # whole blocks per split: all cells of a 5 x 5-voxel block share its split
    import zarr

    vox = np.asarray(zarr.open_group(str(results / "raster" / "slide.ome.zarr"), mode="r")["cells/voxel_index"][:])
    blocks_of_cells = [tuple(v) for v in vox[:, 1:] // 5]
    splits = annotated.obs.assign(block=blocks_of_cells).groupby("block", observed=True)["split"].nunique()
    assert (splits == 1).all() and len(splits) > 10
    assert annotated.obs["pred_celltype"].notna().mean() > 0.99
