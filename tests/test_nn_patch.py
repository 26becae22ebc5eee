"""PatchClassifier: dense logits == patch logits (interior voxels, and every voxel of a tile read with the
model's margin), grid-group invariance of the moment and group-CNN families (not of the CNN), bad sizes."""

from __future__ import annotations

import pytest
import torch

from abc_pipeline.errors import InputError
from abc_pipeline.nn import build_model, grid_group, transform

FAMILIES = ["cnn", "moment-trivial", "moment-trivial-irrep", "gcnn-regular"]
CASES = [(2, None, 5), (3, (2.0, 1.0, 1.0), (3, 5, 5))]  # (dim, spacing z y x, patch size)


def _model(name: str, dim: int, spacing, patch, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = build_model(name, dim, 3, 4, head="patch", width=4, depth=2, spacing=spacing, patch_size=patch)
    # non-trivial batch-norm statistics, then eval mode (running statistics: pointwise, hence exact)
    m.train()
    with torch.no_grad():
        m.forward_dense(torch.randn(2, 3, *([9] * dim)))
    return m.double().eval().requires_grad_(False)


def _patch_at(x: torch.Tensor, centre, margin) -> torch.Tensor:
    return x[(slice(None), slice(None), *[slice(c - g, c + g + 1) for c, g in zip(centre, margin)])]


@pytest.mark.parametrize("dim,spacing,patch", CASES)
@pytest.mark.parametrize("name", FAMILIES)
def test_dense_equals_patch_on_interior_voxels(name, dim, spacing, patch):
    m = _model(name, dim, spacing, patch)
    assert m.task == "classify" and m.input_size == tuple(p + 2 * h for p, h in zip(m.patch_size, m.halo))
    x = torch.randn(2, 3, *([11] * dim), dtype=torch.float64)
    dense = m.forward_dense(x)
    assert dense.shape == (2, 4, *x.shape[2:])
    g = m.margin
    interior = [c for c in torch.cartesian_prod(*[torch.arange(gi, 11 - gi) for gi in g]).tolist()]
    assert interior
    for centre in interior[:: max(1, len(interior) // 6)]:
        patch_logits = m(_patch_at(x, centre, g))
        torch.testing.assert_close(dense[(slice(None), slice(None), *centre)], patch_logits, rtol=0, atol=1e-12)


def test_dense_equals_patch_everywhere_with_margin():
    """A tile padded with the margin (zeros, as outside the volume) reproduces the zero-padded patches."""
    m = _model("moment-trivial-irrep", 2, None, 3)
    x = torch.randn(1, 3, 6, 7, dtype=torch.float64)
    g = m.margin
    padded = torch.nn.functional.pad(x, (g[1], g[1], g[0], g[0]))
    dense = m.forward_dense(padded)[:, :, g[0] : -g[0], g[1] : -g[1]]
    for y in range(6):
        for xx in range(7):
            patch = _patch_at(padded, (y + g[0], xx + g[1]), g)
            torch.testing.assert_close(dense[:, :, y, xx], m(patch), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dim,spacing,patch", CASES)
@pytest.mark.parametrize("name", FAMILIES)
def test_patch_logits_invariant_for_equivariant_families(name, dim, spacing, patch):
    m = _model(name, dim, spacing, patch, seed=1)
    x = torch.randn(3, 3, *m.input_size, dtype=torch.float64)
    ref = m(x)
    errors = [float((m(transform(x, g)) - ref).abs().max()) for g in grid_group(dim, spacing)]
    if name == "cnn":
        assert max(errors) > 1e-4
    else:
        assert max(errors) < 1e-10


def test_dense_logits_equivariant():
    m = _model("moment-trivial", 3, (2.0, 1.0, 1.0), (3, 5, 5))
    x = torch.randn(1, 3, 5, 8, 8, dtype=torch.float64)
    for g in grid_group(3, (2.0, 1.0, 1.0)):
        torch.testing.assert_close(
            m.forward_dense(transform(x, g)), transform(m.forward_dense(x), g), rtol=0, atol=1e-10
        )


def test_parameter_matching_and_bad_sizes():
    a = build_model("cnn", 2, 3, 4, head="patch", target_params=20_000)
    b = build_model("moment-trivial-irrep", 2, 3, 4, head="patch", target_params=20_000)
    assert abs(a.n_params - 20_000) < 0.2 * 20_000 and abs(b.n_params - 20_000) < 0.2 * 20_000
    with pytest.raises(InputError, match="odd"):
        build_model("cnn", 2, 3, 4, head="patch", width=4, patch_size=4)
    with pytest.raises(InputError, match="cfnet"):
        build_model("cfnet", 2, 3, 4, head="patch", width=4)
    m = build_model("cnn", 2, 3, 4, head="patch", width=4, patch_size=3)
    with pytest.raises(InputError, match="centred"):
        m(torch.zeros(1, 3, 12, 12))
