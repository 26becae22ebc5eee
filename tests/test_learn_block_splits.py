"""Block splits for one or a few sections: whole square blocks per split, readers that see only their split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from abc_pipeline.errors import InputError
from abc_pipeline.learn.data import (
    SPLITS,
    Normalizer,
    RasterReader,
    block_splits,
    cell_splits,
    channel_stats,
    raster_splits,
    split_mask,
)
from abc_pipeline.raster import open_raster, rasterize


@pytest.fixture(scope="module")
def raster(assembled: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("blocks") / "s.ome.zarr"
    return open_raster(
        rasterize(assembled, out, space="section", voxel_size=0.1, pca=4, labels=["class"], progress=False)
    )


def test_whole_blocks_per_split(raster) -> None:
    splits = block_splits(raster, 0.5, (0.6, 0.2, 0.2), seed=1, blocks=2)
    by, bx = splits["blocks"]["size"]
    assert (by, bx) == (5, 5)
    codes = np.asarray(splits["blocks"]["codes"])
    nz, ny, nx = raster.grid.shape
    assert codes.shape == (nz, -(-ny // 5), -(-nx // 5))
    occupied = np.asarray((raster.n_cells > 0).compute())
    masks = {name: split_mask(splits, name, raster.grid.shape) for name in SPLITS}
    assert sum(m.astype(int) for m in masks.values()).max() == 1  # disjoint
    np.testing.assert_array_equal(occupied & ~np.any(list(masks.values()), axis=0), False)  # every cell covered
    counts = np.array([(codes == k).sum() for k in range(3)])
    assert counts.sum() == (codes >= 0).sum() and np.allclose(counts / counts.sum(), (0.6, 0.2, 0.2), atol=0.02)
    for name, m in masks.items():  # a split's z list = the planes holding one of its blocks
        assert splits[name] == np.flatnonzero(m.any(axis=(1, 2))).tolist()
    # each cell gets its block's split; all cells of a block share it
    split = np.asarray(cell_splits(raster, splits).codes)
    vox = np.asarray(raster.voxel_index[:])
    ok = vox[:, 0] >= 0
    assert (split[ok] == codes[vox[ok, 0], vox[ok, 1] // 5, vox[ok, 2] // 5]).all()
    assert (split[~ok] == len(SPLITS)).all()


def test_readers_see_only_their_blocks(raster) -> None:
    splits = block_splits(raster, 0.5, seed=0)
    mask = split_mask(splits, "test", raster.grid.shape)
    z = splits["test"][0]
    norm = channel_stats(raster, splits["train"], split_mask(splits, "train", raster.grid.shape))
    reader = RasterReader(raster, norm, mask=mask)
    plane = reader.plane(z)
    assert (plane[:, ~mask[z]] == 0).all()  # other splits' voxels read as empty space
    assert plane[-1, mask[z]].sum() == (np.asarray(raster.n_cells[z])[mask[z]] > 0).sum()
    full = RasterReader(raster, Normalizer(norm.mean, norm.std)).plane(z)
    np.testing.assert_array_equal(plane[:, mask[z]], full[:, mask[z]])


def test_blocks_larger_than_the_sections_are_section_splits(raster) -> None:
    blocks = block_splits(raster, 100.0, seed=2)
    sections = raster_splits(raster, seed=2)
    assert {k: blocks[k] for k in SPLITS} == sections
    with pytest.raises(InputError, match="positive number of mm"):
        block_splits(raster, 0.0)
