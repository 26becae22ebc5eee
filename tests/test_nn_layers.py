"""Equivariant blocks: nonlinearity, batch norm, parity-aware resampling, heads; baseline layers."""

from __future__ import annotations

import pytest
import torch

from abc_pipeline.nn import fields
from abc_pipeline.nn.baselines import ConicConv2d, DFTTransition, GroupConv, conic_masks, group_pool
from abc_pipeline.nn.layers import (
    FieldBatchNorm,
    FieldNonlinearity,
    InvariantHead,
    SegmentationHead,
    downsample_axes,
    next_spacing,
    parity_downsample,
    upsample_to,
)

F64 = torch.float64


def _x(fl, dim, size, seed=0):
    torch.manual_seed(seed)
    return torch.randn(2, fields.n_channels(fl, dim), *size, dtype=F64)


@pytest.mark.parametrize("dim, size", [(2, (6, 6)), (2, (7, 7)), (3, (4, 4, 4)), (3, (5, 5, 5))])
def test_pointwise_blocks_are_equivariant(dim, size):
    fl = [3, 2, 2]
    x = _x(fl, dim, size)
    nonlin = FieldNonlinearity(fl, "gelu").double()
    bn = FieldBatchNorm(fl).double()
    bn.train()
    bn(x * 3 + 1)  # running statistics away from the defaults
    bn.eval()
    for f in (nonlin, bn):
        assert fields.equivariance_error(f, x, None, fl, fl) < 1e-10
        assert fields.equivariance_error(f.float(), x.float(), None, fl, fl) < 1e-5
        f.double()


def test_norm_relu_values():
    nonlin = FieldNonlinearity([1, 2], "relu")
    x = torch.tensor([-1.0, 0.3, 0.4, 3.0, 4.0]).view(1, 5, 1, 1)  # scalar, |v0| = 0.5, |v1| = 5 (2D)
    y = nonlin(x).flatten()
    assert y[0] == 0 and torch.all(y[1:3] == 0)  # |v| < b = 1: zeroed, not reversed (lab quirk fixed)
    assert torch.allclose(y[3:], torch.tensor([3.0, 4.0]) * 4 / 5, atol=1e-5)  # same direction, |v| - 1


def test_batch_norm_training_mode_is_equivariant_and_keeps_directions():
    fl = [2, 2]
    x = _x(fl, 3, (4, 4, 4))
    bn = FieldBatchNorm(fl).double().train()
    y = bn(x)
    for g in fields.grid_group(3)[::7]:
        yg = bn(fields.transform(x, g, fl))
        assert (yg - fields.transform(y, g, fl)).abs().max() < 1e-10
    v, vy = fields.split_fields(x, fl)[1], fields.split_fields(y, fl)[1]
    cos = (v * vy).sum(2) / (v.norm(dim=2) * vy.norm(dim=2))
    assert torch.allclose(cos, torch.ones_like(cos))


@pytest.mark.parametrize("n", range(1, 12))
def test_down_and_up_sampling_sizes(n):
    x = torch.randn(1, 1, n, 3)
    d = parity_downsample(x, (True, False))
    assert d.shape[2] == (n + 1) // 2 and d.shape[3] == 3
    assert upsample_to(d, x.shape[2:]).shape == x.shape
    if n % 2 == 0:
        assert torch.allclose(d[0, 0, 0], x[0, 0, :2].mean(0))
    else:
        assert torch.equal(d[0, 0], x[0, 0, ::2])


def test_resampling_is_equivariant_and_upsampling_interpolates():
    for size in [(6, 6, 6), (7, 7, 7), (5, 8, 8)]:
        x = _x([1, 1], 3, size)
        group = fields.grid_group(3, None if size[0] == size[1] else (3.0, 1.0, 1.0))
        down = lambda t: parity_downsample(t, (True, True, True))  # noqa: E731
        assert fields.equivariance_error(down, x, group, [1, 1], [1, 1]) < 1e-14
        up = lambda t: upsample_to(t, [2 * s - 1 for s in t.shape[2:]])  # noqa: E731
        assert fields.equivariance_error(up, x, group, [1, 1], [1, 1]) < 1e-14
    y = upsample_to(torch.tensor([[[0.0, 2.0, 4.0]]]), [5])
    assert y.flatten().tolist() == [0, 1, 2, 3, 4]
    assert upsample_to(torch.tensor([[[1.0, 2.0]]]), [4]).flatten().tolist() == [1, 1, 2, 2]
    with pytest.raises(Exception, match="upsample"):
        upsample_to(torch.zeros(1, 1, 3), [9])


def test_downsampling_rule_for_anisotropic_spacing():
    assert downsample_axes((1, 1, 1)) == (True, True, True)
    assert downsample_axes((8, 1, 1)) == (False, True, True)
    assert downsample_axes((1.5, 1, 1)) == (True, True, True)
    sp = (8.0, 1.0, 1.0)
    seq = [sp]
    for _ in range(4):
        seq.append(next_spacing(seq[-1]))
    assert seq == [(8, 1, 1), (8, 2, 2), (8, 4, 4), (8, 8, 8), (16, 16, 16)]


def test_heads():
    x = _x([3, 2], 3, (4, 5, 6))
    head = InvariantHead(3, 4).double()
    assert head(x).shape == (2, 4)
    assert fields.equivariance_error(head, x[..., :5, :5], fields.grid_group(3)[:10], [3, 2], invariant=True) < 1e-12
    seg = SegmentationHead(3, 4, 3).double()
    assert seg(x).shape == (2, 4, 4, 5, 6)


@pytest.mark.parametrize(
    "dim, rot_only, size", [(2, False, (7, 7)), (2, True, (6, 6)), (3, False, (4, 4, 4)), (3, True, (5, 5, 5))]
)
def test_group_conv_is_equivariant(dim, rot_only, size):
    torch.manual_seed(0)
    group = fields.grid_group(dim, rotations_only=rot_only)
    reg = lambda t, g: fields.transform_regular(t, g, group)  # noqa: E731
    lift = GroupConv(2, 2, group, lifting=True).double()
    gconv = GroupConv(2, 1, group).double()
    x = torch.randn(1, 2, *size, dtype=F64)
    assert fields.equivariance_error(lift, x, group, None, reg) < 1e-10
    h = lift(x)
    assert fields.equivariance_error(gconv, h, group, reg, reg) < 1e-10
    assert fields.equivariance_error(lambda t: group_pool(gconv(t), len(group)), h, group, reg, None) < 1e-10


def test_cfnet_layers_are_rotation_equivariant_about_the_centre():
    masks = conic_masks(7)
    assert torch.allclose(masks.sum(0), torch.ones(7, 7)) and masks[0, 3, 3] == 0.25
    torch.manual_seed(0)
    c4 = [fields.rot90(2, (0, 1), k) for k in range(4)]
    conic = ConicConv2d(2, 3).double()
    dft = DFTTransition(3, nodes=5).double()
    for n in (8, 9):
        x = torch.randn(1, 2, n, n, dtype=F64)
        assert fields.equivariance_error(conic, x, c4) < 1e-10
        assert fields.equivariance_error(lambda t: dft(conic(t)), x, c4, invariant=True) < 1e-10
        assert dft(conic(x)).shape == (1, 15)
    # a plain convolution with the same weights is not rotation-equivariant
    assert fields.equivariance_error(conic.conv, x, c4) > 1e-3
