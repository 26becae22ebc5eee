"""CellContextClassifier: exact invariance over the whole grid group (float64, random weights and batch-norm
statistics), dense maps equivariant, per-cell logits from the dense embedding equal the patch logits; the CNN
family fails the invariance test."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from abc_pipeline.errors import InputError
from abc_pipeline.nn import build_model, fields
from abc_pipeline.nn.cell_context import CellContextClassifier

CASES = [(2, None), (3, None), (3, (3.0, 1.0, 1.0))]
IN, F, K = 4, 3, 5


def _model(name: str, dim: int, spacing=None, radii=(1.5, 3.0)) -> CellContextClassifier:
    """A random cell-context model in float64 (``radii``: its discs; ``None``: the library's defaults)."""
    torch.manual_seed(0)
    width = 1 if name == "gcnn-regular" and dim == 3 else 4
    model = build_model(
        name,
        dim,
        IN,
        K,
        "cell-context",
        width=width,
        spacing=spacing,
        depth=2,
        patch_size=3,
        neighborhood_radii=radii,
    )
    assert isinstance(model, CellContextClassifier) and model.task == "classify"
    model.set_normalization(np.arange(F) * 0.1, np.full(F, 2.0), np.full(F, -0.5), np.arange(1, F + 1))
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None
            m.weight.data.mul_(torch.empty_like(m.weight).uniform_(0.5, 1.5))
            m.bias.data.normal_(0, 0.3)
        if hasattr(m, "thresholds"):
            for t in m.thresholds:
                t.data.uniform_(0.5, 1.5)
    model.double().train()
    with torch.no_grad():
        model(torch.randn(8, IN, *model.input_size, dtype=torch.float64), torch.randn(8, F, dtype=torch.float64))
    return model.eval()


def _inputs(model, n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    patch = torch.randn(n, IN, *model.input_size, generator=g, dtype=torch.float64)
    patch[:, -1] = (patch[:, -1] > -0.5).double()  # a tissue channel
    return patch, torch.randn(n, F, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("dim, spacing", CASES)
@pytest.mark.parametrize("name", ["moment-trivial-irrep", "moment-trivial", "gcnn-regular"])
def test_cell_context_is_exactly_invariant(name, dim, spacing):
    model = _model(name, dim, spacing)
    patch, expr = _inputs(model)
    group = fields.grid_group(dim, spacing)
    assert len(group) == {2: 8, 3: 48 if spacing is None else 16}[dim]
    with torch.no_grad():
        ref = model(patch, expr)
        assert ref.abs().max() > 1e-3
        err = max(float((model(fields.transform(patch, g), expr) - ref).abs().max()) for g in group)
        assert err < 1e-10 * float(ref.abs().max())
        # dense maps: equivariant
        tile = _inputs(model, 1, seed=2)[0][:, :, *(slice(None),) * dim]
        dense = model.forward_dense(tile)
        assert dense.shape == (1, K, *tile.shape[2:])
        derr = max(
            float((model.forward_dense(fields.transform(tile, g)) - fields.transform(dense, g)).abs().max())
            for g in group
        )
        assert derr < 1e-10 * float(dense.abs().max())


@pytest.mark.parametrize("dim", [2, 3])
def test_cnn_family_is_not_invariant(dim):
    model = _model("cnn", dim)
    patch, expr = _inputs(model)
    with torch.no_grad():
        ref = model(patch, expr)
        err = max(float((model(fields.transform(patch, g), expr) - ref).abs().max()) for g in fields.grid_group(dim))
    assert err > 1e-4 * float(ref.abs().max())


@pytest.mark.parametrize("dim", [2, 3])
def test_dense_embedding_gives_the_patch_logits(dim):
    """Per-cell logits from the dense context embedding at the patch centre equal ``forward`` on the patch;
    ``forward_dense`` at the centre equals ``forward`` with the voxel's mean expression."""
    model = _model("moment-trivial-irrep", dim)
    patch, expr = _inputs(model)
    centre = (slice(None), slice(None), *(s // 2 for s in model.input_size))
    with torch.no_grad():
        ref = model(patch, expr)
        emb = model.context_dense(patch)[centre]
        torch.testing.assert_close(model.cell_logits(emb, expr), ref, rtol=1e-10, atol=1e-12)
        patch[(slice(None), -1, *(s // 2 for s in model.input_size))] = 1.0  # the centre is tissue
        voxel = patch[centre][:, :F] * model.voxel_std + model.voxel_mean
        torch.testing.assert_close(model.forward_dense(patch)[centre], model(patch, voxel), rtol=1e-10, atol=1e-12)


def test_expression_width_is_checked():
    with pytest.raises(InputError, match="n_expression"):
        build_model("moment-trivial", 2, IN, K, "cell-context", width=2, n_expression=IN)
    model = build_model("moment-trivial", 2, IN, K, "cell-context", width=2)
    with pytest.raises(InputError, match="expression"):
        model(torch.zeros(2, IN, *model.input_size), torch.zeros(2, F + 1))


def test_whole_image_mode_gives_the_patch_logits():
    """``forward(images, expression, cells)`` reads each cell's context from one dense pass over its image
    (given with ``margin`` zero voxels per side, as the section dataset reads it): equal to ``forward`` on the
    zero-padded patch centred on the cell's voxel, at the image border too; with the default discs, which
    reach further than the trunk (the trunk then reads a trimmed image)."""
    model = _model("moment-trivial-irrep", 2, radii=None)
    assert model.margin[0] > model.patch_size[0] // 2 + model.context.halo[0]
    g = torch.Generator().manual_seed(3)
    images = torch.randn(2, IN, 9, 11, generator=g, dtype=torch.float64)
    cells = torch.tensor([[0, 0, 0], [0, 4, 5], [1, 8, 10], [1, 2, 7]])
    expr = torch.randn(len(cells), F, generator=g, dtype=torch.float64)
    m = model.margin
    padded = torch.nn.functional.pad(images, (m[1], m[1], m[0], m[0]))
    patches = torch.stack([padded[b, :, y : y + 2 * m[0] + 1, x : x + 2 * m[1] + 1] for b, y, x in cells.tolist()])
    with torch.no_grad():
        shifted = cells + torch.tensor([0, m[0], m[1]])
        torch.testing.assert_close(model(padded, expr, shifted), model(patches, expr), rtol=1e-10, atol=1e-12)
