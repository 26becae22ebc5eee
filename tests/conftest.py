"""Shared fixtures: one small synthetic release and its assembled AnnData per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REAL_EXCERPTS = SHARED / "data" / "abc_real_excerpts"


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tests use tiny tensors: one intra-op thread is faster and immune to oversubscription on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def real_excerpts() -> Path:
    """The real ABC files in ../shared (absent when the project is cloned alone)."""
    if not REAL_EXCERPTS.is_dir():
        pytest.skip("../shared/data/abc_real_excerpts is not present (project cloned on its own)")
    return REAL_EXCERPTS


@pytest.fixture(scope="session")
def synthetic_release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic release tree (bucket layout, manifest with true MD5s). Do not modify it in tests."""
    from abc_pipeline.atlas.synthetic import write_synthetic_release

    root = tmp_path_factory.mktemp("synthetic_release")
    write_synthetic_release(root, n_cells=3000, seed=0, release="20250531")
    return root


@pytest.fixture(scope="session")
def assembled(synthetic_release: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """cells.zarr assembled from ``synthetic_release`` (the release tree doubles as a download cache)."""
    from abc_pipeline.atlas.assemble import assemble_dataset

    out = tmp_path_factory.mktemp("results") / "cells.zarr"
    return assemble_dataset("MERFISH-C57BL6J-638850", cache_dir=synthetic_release, out=out, progress=False)


@pytest.fixture(scope="session")
def atlas(assembled: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Section and anisotropic 3D rasters (12 genes) of ``assembled``, a 2D celltype run (moment-trivial-irrep)
    and a 3D region run (moment-trivial) in ``out/models/{ct,rg}``. Do not modify them in tests."""
    from abc_pipeline.cells import CellSource
    from abc_pipeline.learn.atlas import train_atlas_task
    from abc_pipeline.raster import rasterize

    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread (the function-scoped fixture is not active yet)
    try:
        out = tmp_path_factory.mktemp("learn_atlas")
        genes = CellSource(assembled).gene_symbols[:480:40]
        kw = {"genes": genes, "labels": ["class", "parcellation_division"], "progress": False}
        section = rasterize(assembled, out / "raster" / "s.ome.zarr", space="section", voxel_size=0.1, **kw)
        recon = rasterize(assembled, out / "raster" / "r.ome.zarr", voxel_size=(0.2, 0.1, 0.1), **kw)
        celltype = train_atlas_task(
            section,
            assembled,
            "celltype",
            "moment-trivial-irrep",
            out / "models" / "ct",
            width=6,
            depth=2,
            patch_size=3,
            epochs=4,
            batch_size=64,
            lr=5e-3,
            max_samples_per_epoch=800,
            progress=False,
            architecture="patch",
        )
        region = train_atlas_task(
            recon,
            assembled,
            "region",
            "moment-trivial",
            out / "models" / "rg",
            width=4,
            depth=2,
            tile_size=(2, 32, 32),
            epochs=4,
            batch_size=4,
            lr=1e-2,
            progress=False,
        )
    finally:
        torch.set_num_threads(n)
    return {"out": out, "cells": assembled, "section": section, "recon": recon, "celltype": celltype, "region": region}
