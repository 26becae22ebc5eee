"""Rasterizer kernels: group sums, majority votes, block layout, pyramid coarsening."""

from __future__ import annotations

import numpy as np
import pytest

from abc_pipeline.raster import binning


@pytest.mark.parametrize("n, n_keys", [(2000, 40), (2000, 3), (3000, 10**6), (0, 5)])
def test_group_sums_match_reduceat(n: int, n_keys: int) -> None:
    rng = np.random.default_rng(n_keys)
    values = rng.integers(0, 9, (n, 5)).astype(np.float32)  # integers: exact in any summation order
    keys = rng.integers(0, n_keys, n)
    rows = np.argsort(keys, kind="stable")
    starts = binning._group_starts(keys[rows])
    sizes = np.diff(np.append(starts, n))
    got = binning.group_sums(values, rows, starts, sizes)
    want = np.add.reduceat(values[rows], starts, axis=0) if n else np.zeros((0, 5))
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("n, n_rows", [(2000, 40), (3000, 10**4), (0, 5)])
def test_scatter_add_matches_add_at(n: int, n_rows: int) -> None:
    rng = np.random.default_rng(n_rows)
    values = rng.integers(0, 9, (n, 5)).astype(np.float32)  # integers: exact in any summation order
    rows = rng.integers(-1, n_rows, n)  # -1: skipped
    out = rng.integers(0, 9, (n_rows, 5)).astype(np.float32)
    want = out.copy()
    np.add.at(want, rows[rows >= 0], values[rows >= 0])
    binning.scatter_add(out, rows, values)
    np.testing.assert_array_equal(out, want)
    with pytest.raises(ValueError, match="C-contiguous float32"):
        binning.scatter_add(out[:, ::2], rows, values[:, ::2])


def test_majority_ties_go_to_the_smaller_code() -> None:
    n_cat = 5
    # voxel 0: codes 3,3,1 -> 3; voxel 1: 4 vs 2 tie (votes split over two pairs) -> 2; voxel 3: code 0
    keys = np.array([0 * n_cat + 3, 0 * n_cat + 1, 1 * n_cat + 4, 1 * n_cat + 2, 1 * n_cat + 2, 3 * n_cat + 0])
    votes = np.array([2, 1, 2, 1, 1, 7])
    np.testing.assert_array_equal(binning.majority(keys, votes, n_cat, n_vox=4), [4, 3, 0, 1])


def test_block_layout_keys_are_block_major() -> None:
    layout = binning.BlockLayout(shape=(3, 5, 6), block=(2, 2, 4))
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in layout.shape], indexing="ij"), -1).reshape(-1, 3)
    keys = layout.keys(idx)
    assert len(np.unique(keys)) == len(idx)
    q, r = np.divmod(idx, layout.block)  # reference: block id, then the C-order offset in the clipped region
    rs = np.minimum(layout.block, np.asarray(layout.shape) - q * layout.block)
    block_id = (q[:, 0] * layout.grid_blocks[1] + q[:, 1]) * layout.grid_blocks[2] + q[:, 2]
    np.testing.assert_array_equal(
        keys, block_id * layout.block_voxels + (r[:, 0] * rs[:, 1] + r[:, 1]) * rs[:, 2] + r[:, 2]
    )
    for b in range(layout.n_blocks):
        region = layout.region(b)
        inside = np.all([(idx[:, a] >= r.start) & (idx[:, a] < r.stop) for a, r in enumerate(region)], axis=0)
        np.testing.assert_array_equal(keys[inside] // layout.block_voxels, b)
    assert layout.region(layout.n_blocks - 1, (1, 2, 2)) == (slice(2, 3), slice(2, 3), slice(2, 3))
    assert layout.level_chunks((2, 2, 2)) == (1, 1, 2)


def test_choose_block_fits_budget_and_pyramid() -> None:
    aniso = binning.choose_block((59, 1000, 1000), n_channels=501, z_downsampled=False, multiple=4)
    assert aniso[0] == 1 and np.prod(aniso) * 501 * 4 <= 32 << 20 and aniso[1] % 4 == 0 and aniso[2] % 4 == 0
    iso = binning.choose_block((200, 200, 200), n_channels=9, z_downsampled=True, multiple=8)
    assert all(b % 8 == 0 for b in iso) and np.prod(iso) * 9 * 4 <= 32 << 20
    assert binning.choose_block((3, 20, 30), 4, True) == (3, 20, 30)  # small grids: one block


def test_window_sum_and_label_modes() -> None:
    a = np.arange(3 * 5 * 7 * 2, dtype=np.float32).reshape(3, 5, 7, 2)  # (z, y, x, channels)
    want = np.pad(a, ((0, 1), (0, 1), (0, 1), (0, 0))).reshape(2, 2, 3, 2, 4, 2, 2).sum(axis=(1, 3, 5))
    np.testing.assert_array_equal(binning.window_sum(a, (2, 2, 2)), want)
    np.testing.assert_array_equal(binning.window_sum(a[..., 0], (2, 2, 2)), want[..., 0])
    lab = np.array([[[0, 0, 3, 3, 5], [0, 2, 3, 1, 5]], [[4, 4, 0, 0, 0], [2, 2, 0, 0, 7]]], dtype=np.uint16)
    down = binning.coarsen_labels(lab, (1, 2, 2))
    # windows: [0,0,0,2] -> 2 (0 = empty is ignored); [3,3,3,1] -> 3; [5,5] + padding -> 5;
    # [4,4,2,2] tie -> 2 (smaller label); all empty -> 0; [0,7] + padding -> 7
    np.testing.assert_array_equal(down, [[[2, 3, 5]], [[2, 0, 7]]])
    assert down.dtype == lab.dtype


def test_plan_block_tasks_respects_the_budget() -> None:
    n_blocks, n_ch = 6, 3
    per_row = 12 + 4 * n_ch
    offs = [{binning.CELL_KIND: np.array([0, 2, 2, 5, 9, 9, 10])}, {binning.CELL_KIND: np.array([0, 0, 0, 1, 1, 4, 4])}]
    tasks = binning.plan_block_tasks(offs, n_ch, target_bytes=4 * per_row)
    covered = [b for t in tasks for b in t.blocks]
    assert covered == [0, 2, 3, 4, 5]  # block 1 is empty; every other block exactly once, in order
    assert all(t.nbytes <= 4 * per_row or len(t.blocks) == 1 for t in tasks)
    assert all(len(t.offsets[binning.CELL_KIND][j]) == len(t.blocks) + 1 for t in tasks for j in range(len(t.chunks)))
    assert n_blocks == len(offs[0][binning.CELL_KIND]) - 1


def test_block_sums_means_range_and_coarsening() -> None:
    rng = np.random.default_rng(1)
    counts = rng.integers(0, 3, (3, 5, 300)).astype(np.float32)  # > one transpose tile of voxels
    sums = (rng.integers(0, 9, (3, 5, 300, 4)) * (counts > 0)[..., None]).astype(np.float32)
    block = binning.BlockSums(sums, counts, {})
    means = block.means()
    assert means.shape == (5, 3, 5, 300)
    want = np.divide(np.moveaxis(sums, -1, 0), counts, out=np.zeros((4, 3, 5, 300), np.float32), where=counts > 0)
    np.testing.assert_array_equal(means[:4], want)
    np.testing.assert_array_equal(means[4], counts)
    lo, hi = block.value_range()
    occupied = counts > 0
    np.testing.assert_array_equal(lo, [m[occupied].min() for m in means])
    np.testing.assert_array_equal(hi, [m[occupied].max() for m in means])
    coarse = block.coarsen((1, 2, 2))
    np.testing.assert_array_equal(coarse.counts, binning.window_sum(counts, (1, 2, 2)))
    assert coarse.sums.shape == (3, 3, 150, 4)
