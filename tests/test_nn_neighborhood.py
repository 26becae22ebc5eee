"""Neighbourhood means: the disc kernels, the means and tissue fractions against a hand computation, exact
equivariance under the grid group."""

from __future__ import annotations

import numpy as np
import torch

from abc_pipeline.nn.fields import grid_group, transform
from abc_pipeline.nn.neighborhood import SPECTRA_KEPT, NeighborhoodMeans, disc_kernel


def test_disc_kernels_follow_the_physical_spacing():
    assert disc_kernel(1.0, (1.0, 1.0)).astype(int).tolist() == [[0, 1, 0], [1, 1, 1], [0, 1, 0]]
    assert disc_kernel(1.5, (1.0, 1.0)).all() and disc_kernel(1.5, (1.0, 1.0)).shape == (3, 3)
    ball = disc_kernel(2.0, (2.0, 1.0, 1.0))  # z voxels twice as thick: half as many of them
    assert ball.shape == (3, 5, 5) and ball[0, 2, 2] and not ball[0, 2, 3] and ball[1, 0, 2]


def test_means_and_tissue_fractions_match_a_hand_computation():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(3, 9, 11))
    tissue = rng.random((9, 11)) < 0.4
    x = torch.from_numpy(np.concatenate([features * tissue, tissue[None]]).astype(np.float64))[None]
    radii = (1.0, 2.5)
    out = NeighborhoodMeans(3, radii, (0.1, 0.1)).double()(x)[0].numpy()
    assert out.shape == (8, 9, 11)
    for r_index, r in enumerate(radii):
        h = int(r)
        disc = [(dy, dx) for dy in range(-h, h + 1) for dx in range(-h, h + 1) if dy * dy + dx * dx <= r * r]
        for y, x_ in [(0, 0), (4, 5), (8, 10), (3, 1)]:
            inside = [(y + dy, x_ + dx) for dy, dx in disc if 0 <= y + dy < 9 and 0 <= x_ + dx < 11]
            occupied = [(a, b) for a, b in inside if tissue[a, b]]
            want = features[:, [a for a, _ in occupied], [b for _, b in occupied]].mean(1) if occupied else 0
            block = out[r_index * 4 : r_index * 4 + 4, y, x_]
            np.testing.assert_allclose(block[:3], want, atol=1e-12)
            assert block[3] == len(occupied) / len(disc)


def test_exactly_equivariant_under_the_grid_group_2d_and_3d():
    rng = np.random.default_rng(1)
    for spacing, shape in [((1.0, 1.0), (10, 10)), ((2.0, 1.0, 1.0), (6, 8, 8))]:
        dim = len(spacing)
        tissue = rng.random(shape) < 0.5
        x = torch.from_numpy(np.concatenate([rng.normal(size=(2, *shape)) * tissue, tissue[None]]))[None]
        m = NeighborhoodMeans(2, (1.5, 3.0), spacing).double()
        for g in grid_group(dim, spacing):
            torch.testing.assert_close(m(transform(x, g)), transform(m(x), g), rtol=0, atol=1e-12)


def test_kept_disc_spectra_give_the_same_means_for_every_size_and_dtype():
    """The spectra kept per transform size: sizes and dtypes met again, in any order, give what a fresh module does."""
    rng = np.random.default_rng(1)
    kept = NeighborhoodMeans(2, (1.5, 3.0), (1.0, 1.0))
    shapes = [(7, 9), (12, 5), (7, 9), (30, 31), (12, 5), (8, 8), (3, 20)]  # 10 sizes and dtypes: more than kept
    for i, shape in enumerate(shapes * 3):
        tissue = rng.random(shape) < 0.5
        x = torch.from_numpy(np.concatenate([rng.normal(size=(2, *shape)) * tissue, tissue[None]]))[None]
        x = x.float() if i % 2 else x
        fresh = NeighborhoodMeans(2, (1.5, 3.0), (1.0, 1.0))
        torch.testing.assert_close(kept(x), fresh(x), rtol=0, atol=0)
    assert len(kept._spectra) <= SPECTRA_KEPT
