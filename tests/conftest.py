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
