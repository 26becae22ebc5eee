"""SE(2,N) interpolation G-CNN (``nn.se2n``, zoo model ``se2n-interp``): the group, the filter-rotation
operator (bilinear = torch's grid_sample, exact permutations at 90° multiples, gradcheck), exact equivariance
of layers and models over the whole grid group in float64 with the CNN failing the same test, reflections,
shapes and parameter matching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from abc_pipeline.errors import InputError
from abc_pipeline.metrics import rotate
from abc_pipeline.nn import build_model, fields, model_table
from abc_pipeline.nn.se2n import (
    InterpGroupConv,
    RotationGroup,
    SE2NFamily,
    interpolation_matrices,
    rotate_filters,
)
from abc_pipeline.nn.zoo import Classifier, UNet

F64 = torch.float64
D4 = fields.grid_group(2)
C4 = fields.grid_group(2, rotations_only=True)


ROT180, FLIP_Y, FLIP_X = fields.rot90(2, k=2), fields.flip(2, 0), fields.flip(2, 1)
GRID_IN = {  # the pixel-grid symmetries that lie in the group
    (8, True): D4,
    (8, False): C4,
    (12, False): C4,
    (6, True): [fields.identity(2), ROT180, FLIP_Y, FLIP_X],
    (5, True): [fields.identity(2), FLIP_Y],
}


@pytest.mark.parametrize("n, reflections", list(GRID_IN))
def test_group_table_inverse_and_grid_subgroup(n, reflections):
    g = RotationGroup(n, reflections)
    t = g.table
    assert len(g) == n * (2 if reflections else 1) and (t[0] == np.arange(len(g))).all()
    assert all(sorted(row) == list(range(len(g))) for row in t)  # a Latin square: closed, invertible
    assert (t[np.arange(len(g)), g.inverse] == 0).all()
    for a in range(len(g)):  # the table is the product of the matrices
        for b in range(len(g)):
            np.testing.assert_allclose(g.matrix(a) @ g.matrix(b), g.matrix(t[a, b]), atol=1e-12)
    assert {str(q) for _, q in g.grid_elements} == {str(q) for q in GRID_IN[n, reflections]}
    for i, q in g.grid_elements:
        assert g.index_of(q) == i and np.array_equal(g.matrix(i), q.matrix)  # exact integers


def test_index_of_rejects_elements_outside_the_group():
    with pytest.raises(InputError, match="not an element of C8"):
        RotationGroup(8, reflections=False).index_of(fields.flip(2, 0))
    with pytest.raises(InputError, match="not an element of D6"):
        RotationGroup(6).index_of(fields.rot90(2))
    with pytest.raises(InputError, match="positive integer"):
        RotationGroup(0)


@pytest.mark.parametrize("n, k", [(8, 3), (8, 5), (16, 3), (6, 5)])
def test_interpolation_is_bilinear_rotation_and_exact_on_the_grid(n, k):
    """Each rotated filter equals torch's bilinear grid_sample rotation of the filter image (zeros outside)
    (``metrics.rotate``), reflections included; grid symmetries are exact 0/1 permutation matrices."""
    g = RotationGroup(n)
    mats = interpolation_matrices(g, k)
    basis = torch.eye(k * k, dtype=F64).reshape(k * k, 1, k, k)  # one image per filter tap
    for i in range(len(g)):
        m, r = g.element(i)
        img = torch.flip(basis, (-2,)) if m else basis  # W_{R F}(p) = (F.W)(R^-1 p)
        expected = rotate(img, 360.0 * r / n).reshape(k * k, k * k).T  # column q = image of tap q
        np.testing.assert_allclose(mats[i], expected.numpy(), atol=1e-12)
    for i, q in g.grid_elements:
        perm = mats[i]
        assert set(np.unique(perm)) == {0.0, 1.0} and (perm.sum(0) == 1).all() and (perm.sum(1) == 1).all()
        w = torch.randn(1, 1, k, k, dtype=F64)
        assert torch.equal(rotate_filters(w, torch.as_tensor(mats))[0, 0, i], fields.transform(w, q)[0, 0])


def test_rotation_interpolation_operator_gradcheck():
    mats = torch.as_tensor(interpolation_matrices(RotationGroup(8), 3))
    w = torch.randn(2, 1, 3, 3, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: rotate_filters(t, mats), (w,), fast_mode=True)
    conv = InterpGroupConv(1, 2, RotationGroup(8), 3).double()  # the whole layer, through the interpolation
    x = torch.randn(1, 16, 5, 5, dtype=F64)
    weight = conv.weight.detach().clone().requires_grad_(True)
    layer = lambda w: torch.func.functional_call(conv, {"weight": w}, (x,))
    assert torch.autograd.gradcheck(layer, (weight,), fast_mode=True)


@pytest.mark.parametrize("n, reflections", [(8, True), (12, True), (8, False), (6, True)])
@pytest.mark.parametrize("size", [(8, 8), (9, 9), (7, 10)])
def test_layers_are_exactly_equivariant_under_the_grid_symmetries_in_the_group(n, reflections, size):
    group = RotationGroup(n, reflections)
    torch.manual_seed(0)
    lift = InterpGroupConv(2, 3, group, 3, lifting=True).double()
    gconv = InterpGroupConv(3, 2, group, 5, padding_mode="circular").double()
    torch.nn.init.normal_(lift.bias)
    act = lambda t, g: group.transform_regular(t, g)
    elements = [q for _, q in group.grid_elements]
    assert len(elements) == (8 if n % 4 == 0 and reflections else 4)
    x = torch.randn(2, 2, *size, dtype=F64)
    assert fields.equivariance_error(lift, x, elements, None, act) < 1e-12
    h = torch.randn(2, 3 * len(group), *size, dtype=F64)
    assert fields.equivariance_error(gconv, h, elements, act, act) < 1e-12
    if n % 4:  # a quarter turn is not in D6: the layers do not commute with it
        with pytest.raises(InputError, match="not an element"):
            fields.equivariance_error(lift, x, D4, None, act)


# ------------------------------------------------------------------------------------------------ models
def _calibrated(model: torch.nn.Module, sizes, dtype=F64, seed=0) -> torch.nn.Module:
    """Random batch-norm affine parameters and statistics from random inputs of the test sizes; eval mode."""
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None
            m.weight.data.mul_(torch.empty_like(m.weight).uniform_(0.5, 1.5))
            m.bias.data.normal_(0, 0.3)
    model.to(dtype).train()
    with torch.no_grad():
        for size in sizes:
            (model.forward_dense if hasattr(model, "forward_dense") else model)(torch.randn(4, 2, *size, dtype=dtype))
    return model.eval()


SIZES = [(8, 8), (9, 9), (6, 11)]


@pytest.mark.parametrize("task", ["classify", "segment"])
def test_se2n_interp_is_exactly_invariant_and_equivariant_over_d4(task):
    torch.manual_seed(0)
    model = _calibrated(build_model("se2n-interp", 2, 2, 3, task, width=3), SIZES)
    assert model.group_size == 8 and len(D4) == 8
    for i, size in enumerate(SIZES):
        torch.manual_seed(i)
        x = torch.randn(1, 2, *size, dtype=F64)
        assert model(x).shape == ((1, 3) if task == "classify" else (1, 3, *size))
        assert fields.equivariance_error(model, x, D4, invariant=task == "classify") < 1e-10
    assert fields.equivariance_error(model.float(), x.float(), D4, invariant=task == "classify") < 1e-5
    cnn = _calibrated(build_model("cnn", 2, 2, 3, task, width=3), SIZES)  # the negative control
    assert fields.equivariance_error(cnn, x, D4, invariant=task == "classify") > 1e-6


def test_patch_classifier_invariant_and_dense_equivariant():
    torch.manual_seed(0)
    m = _calibrated(build_model("se2n-interp", 2, 2, 4, "patch", width=3, depth=2, patch_size=3), [(9, 9)])
    x = torch.randn(3, 2, *m.input_size, dtype=F64)
    assert m(x).shape == (3, 4)
    assert fields.equivariance_error(m, x, D4, invariant=True) < 1e-10
    tile = torch.randn(1, 2, 10, 9, dtype=F64)
    assert m.forward_dense(tile).shape == (1, 4, 10, 9)
    assert fields.equivariance_error(m.forward_dense, tile, D4) < 1e-10


def test_reflections_need_the_mirror_in_the_group():
    """Without reflections (C8) the network is exactly invariant to quarter turns only; mirrors fail."""
    torch.manual_seed(1)
    family = SE2NFamily(2, 3, "zeros", "relu", n_rotations=8, reflections=False)
    model = _calibrated(Classifier(family, 2, 3, width=3, depth=3, spacing=(1.0, 1.0)), [(9, 9)])
    x = torch.randn(1, 2, 9, 9, dtype=F64)
    assert fields.equivariance_error(model, x, C4, invariant=True) < 1e-10
    assert fields.equivariance_error(model, x, [fields.flip(2, 0)], invariant=True) > 1e-6
    family16 = SE2NFamily(2, 3, "zeros", "relu", n_rotations=16)  # any N % 4 == 0 with reflections: D4 exact
    unet = _calibrated(UNet(family16, 2, 3, width=2, depth=3, spacing=(1.0, 1.0)), [(9, 9)])
    assert fields.equivariance_error(unet, x, D4) < 1e-10


def test_parameter_matching_width_and_table():
    for task, target in [("classify", 1_500_000), ("segment", 200_000), ("patch", 30_000)]:
        m = build_model("se2n-interp", 2, 3, 8, task, target_params=target)
        if task == "classify":  # small budgets: |G| = 16 channels per field make widths coarse (segment 200 k: 274 k)
            assert abs(m.n_params - target) / target < 0.1, (task, m.width, m.n_params)
        below = build_model("se2n-interp", 2, 3, 8, task, width=m.width - 1).n_params
        above = build_model("se2n-interp", 2, 3, 8, task, width=m.width + 1).n_params
        assert abs(m.n_params - target) <= min(abs(below - target), abs(above - target))
    lift = InterpGroupConv(3, 5, RotationGroup(8), 3, lifting=True)
    gconv = InterpGroupConv(5, 7, RotationGroup(8), 3)
    assert lift.weight.numel() == 5 * 3 * 9 and gconv.weight.numel() == 7 * 5 * 16 * 9
    assert build_model("se2n-interp", 2, 3, 8).width == 8
    row = model_table(2, 3, 8, names=["se2n-interp"], width=4)[0]
    assert row["first_layer"] == "4 regular (|G|=16, D8 interpolated)" and row["first_layer_channels"] == 64
    assert row["group_size"] == 8
    assert "se2n-interp" not in [r["model"] for r in model_table(3, 1, 2, width=2)]


def test_bad_arguments():
    with pytest.raises(InputError, match="2D model"):
        build_model("se2n-interp", 3, 1, 2, width=2)
    with pytest.raises(InputError, match="square pixels"):
        build_model("se2n-interp", 2, 1, 2, width=2, spacing=(2.0, 1.0))
    with pytest.raises(InputError, match="odd"):
        InterpGroupConv(1, 1, RotationGroup(8), 4)
    with pytest.raises(InputError, match="padding_mode"):
        InterpGroupConv(1, 1, RotationGroup(8), 3, padding_mode="reflect")
