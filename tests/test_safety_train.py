"""train refuses a cells.zarr whose cells are the raster's in another order, and records the cell-name digest."""

from __future__ import annotations

from pathlib import Path

import anndata
import numpy as np
import pytest
import torch
from test_safety_outputs import _error_line, tree

from abc_pipeline.cli import main
from abc_pipeline.learn.data import names_digest
from abc_pipeline.raster import open_raster


@pytest.fixture(scope="module")
def permuted(atlas: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The atlas's cells.zarr with its cells in another order (same names, same labels per cell)."""
    adata = anndata.read_zarr(atlas["cells"])
    order = np.random.default_rng(0).permutation(adata.n_obs)
    out = tmp_path_factory.mktemp("permuted") / "cells.zarr"
    adata[order].copy().write_zarr(out)
    return out


def test_train_refuses_the_same_cells_in_another_order(tmp_path: Path, atlas: dict, permuted: Path, capsys) -> None:
    run = tmp_path / "run"
    before = tree(tmp_path, permuted)
    assert (
        main(
            [
                "train",
                "--raster",
                str(atlas["section"]),
                "--cells",
                str(permuted),
                "--task",
                "celltype",
                "--model",
                "cnn",
                "--out",
                str(run),
                "--epochs",
                "1",
                "--no-progress",
            ]
        )
        == 2
    )
    line = _error_line(capsys)
    assert f"{atlas['section']} was not rasterized from {permuted}: the cell names or their order differ" in line
    assert tree(tmp_path, permuted) == before and not run.exists()


def test_checkpoint_records_the_cell_name_digest(atlas: dict) -> None:
    for key, run in (("section", "ct"), ("recon", "rg")):
        ckpt = torch.load(atlas["out"] / "models" / run / "checkpoint.pt", map_location="cpu", weights_only=True)
        digest = ckpt["config"]["config"]["atlas"]["cell_names_digest"]
        assert digest == names_digest(open_raster(atlas[key]).cell_label)
