"""MomentConv: exact equivariance over the whole grid group, physical spacing, one conv call, gradcheck."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as tF

from abc_pipeline.errors import InputError
from abc_pipeline.nn import MomentConv, fields
from abc_pipeline.nn.moment import moment_basis, signatures


def _random_bias(conv: MomentConv) -> MomentConv:
    for b in (conv.bias, conv.bias_matrix):
        if b is not None:
            torch.nn.init.normal_(b)
    return conv


def test_signature_counts_and_basis_sizes():
    assert [len(signatures(r)) for r in range(6)] == [1, 1, 2, 4, 10, 26]
    # per (in field, out field) pair for k=3 (3 radial samples; samples reaching only the origin dropped)
    expected = {(0, 0): 3, (1, 0): 2, (0, 1): 2, (1, 1): 5, (2, 0): 5, (0, 2): 5, (2, 1): 8, (1, 2): 8, (2, 2): 23}
    for dim in (2, 3):
        for (ro, ri), n in expected.items():
            assert moment_basis(dim, 3, ro, ri, (1.0,) * dim, 3).shape[0] == n
    # k=1: x-hat vanishes at the centre, so scalar<->vector maps are zero and v->v is a multiple of I
    assert moment_basis(3, 1, 1, 0, (1.0,) * 3, 1).shape[0] == 0
    b = moment_basis(3, 1, 1, 1, (1.0,) * 3, 1)
    assert b.shape[0] == 1 and np.allclose(b[0, :, :, 0], np.eye(3))
    conv = MomentConv([2, 2], [3, 2, 1], 3)
    assert sum(p.numel() for p in conv.parameters()) == (
        2 * 3 * 3 + 2 * 3 * 2 + 2 * 2 * 2 + 2 * 2 * 5 + 2 * 1 * 5 + 2 * 1 * 8 + 3 + 1
    )


CASES = [  # dim, in_fields, out_fields, kernel_size, spacing, padding_mode, sizes
    (2, [2, 2, 1], [1, 2, 2], 3, None, "zeros", [(7, 7), (8, 8), (6, 9)]),
    (2, [1, 1], [2, 1], 5, None, "circular", [(9, 9), (10, 10)]),
    (2, [1, 2], [2, 2], 3, (2.0, 1.0), "zeros", [(7, 8)]),
    (3, [2, 2, 1], [1, 2, 1], 3, None, "zeros", [(5, 5, 5), (6, 6, 6)]),
    (3, [1, 1], [1, 1], 5, None, "circular", [(6, 6, 6)]),
    (3, [2, 1], [1, 2], 3, (0.2, 0.025, 0.025), "zeros", [(5, 6, 6), (4, 7, 7)]),
    (3, [0, 2], [2, 0, 1], 1, None, "zeros", [(4, 4, 4)]),
]


@pytest.mark.parametrize("dim, fin, fout, k, spacing, mode, sizes", CASES)
def test_exact_equivariance_whole_group(dim, fin, fout, k, spacing, mode, sizes):
    torch.manual_seed(0)
    conv = _random_bias(MomentConv(fin, fout, dim, k, spacing=spacing, padding_mode=mode))
    group = fields.grid_group(dim, spacing)
    for size in sizes:
        x = torch.randn(2, fields.n_channels(fin, dim), *size, dtype=torch.float64)
        y = conv.double()(x)
        assert y.shape == (2, fields.n_channels(fout, dim), *size) and y.abs().max() > 0
        assert fields.equivariance_error(conv.double(), x, group, fin, fout) < 1e-10
        assert fields.equivariance_error(conv.float(), x.float(), group, fin, fout) < 1e-5


def test_anisotropic_kernel_is_not_equivariant_to_axis_swaps():
    """With z spacing != y spacing the z<->y swap is not a symmetry, and the layer indeed breaks it."""
    torch.manual_seed(0)
    conv = MomentConv([1, 1], [1, 1], 3, spacing=(4.0, 1.0, 1.0)).double()
    x = torch.randn(1, 4, 6, 6, 6, dtype=torch.float64)
    swap = fields.GridSymmetry((1, 0, 2), (1, 1, 1))
    assert swap not in fields.grid_group(3, (4.0, 1.0, 1.0))
    assert fields.equivariance_error(conv, x, [fields.identity(3), swap], [1, 1], [1, 1]) > 1e-3


def test_physical_spacing_gives_physically_isotropic_kernels():
    conv = MomentConv([1], [1], 3, kernel_size=5, spacing=(50.0, 25.0, 25.0))
    K = conv.kernel().detach()[0, 0]
    c = 2
    # offsets (1,0,0) and (0,2,0) voxels are both 50 physical units from the centre
    assert K[c + 1, c, c] == K[c, c + 2, c] == K[c, c, c - 2] == K[c - 1, c, c]
    assert K[c, c + 1, c] != K[c + 1, c, c]
    # only ratios matter
    same = MomentConv([1], [1], 3, kernel_size=5, spacing=(2.0, 1.0, 1.0))
    same.load_state_dict(conv.state_dict())
    assert torch.equal(same.kernel(), conv.kernel())


def test_kernel_satisfies_the_constraint():
    """R-transformed kernel equals the kernel: K(g.p) = rho_out(g) K(p) rho_in(g)^T (all 48 elements)."""
    torch.manual_seed(0)
    fin, fout = [1, 1, 1], [1, 1, 1]
    conv = MomentConv(fin, fout, 3).double()
    K = conv.kernel().detach()  # (C_out, C_in, 3, 3, 3)
    for g in fields.grid_group(3):
        # act on output channels as a field, on input channels as a field, and on the kernel's grid
        Kg = fields.transform(K, g, fout)  # out index + spatial
        Kg = fields.transform(Kg.transpose(0, 1), fields.identity(3), None).transpose(0, 1)
        Kg = _act_on_channels(Kg.transpose(0, 1), g, fin).transpose(0, 1)
        assert torch.allclose(Kg, K, atol=1e-14)


def _act_on_channels(t: torch.Tensor, g, fields_) -> torch.Tensor:
    """Component action of ``g`` on dim 1 of ``t`` (no spatial motion)."""
    parts = fields.split_fields(t, fields_)
    out = [parts[0]]
    for r, part in enumerate(parts[1:], start=1):
        src, sign = fields._component_map(g, r)
        out.append(part[:, :, src] * torch.tensor(sign, dtype=t.dtype).view(1, 1, -1, 1, 1, 1))
    return fields.merge_fields(out)


def test_one_conv_call_and_same_size(monkeypatch):
    calls = []
    real = tF.conv3d
    monkeypatch.setattr(tF, "conv3d", lambda *a, **k: calls.append(1) or real(*a, **k))
    import abc_pipeline.nn.moment as moment

    monkeypatch.setitem(moment._CONV, 3, tF.conv3d)
    conv = MomentConv([8, 8], [16, 16], 3)
    y = conv(torch.randn(1, 32, 5, 6, 7))
    assert len(calls) == 1 and y.shape == (1, 64, 5, 6, 7)
    assert conv.kernel().shape == (64, 32, 3, 3, 3)


def test_bias_only_on_scalars_and_matrix_identity():
    conv = MomentConv([1], [2, 1, 1], 2)
    torch.nn.init.constant_(conv.bias, 1.5)
    torch.nn.init.constant_(conv.bias_matrix, 2.0)
    assert conv.full_bias().tolist() == [1.5, 1.5, 0, 0, 2.0, 0, 0, 2.0]


@pytest.mark.parametrize("dim", [2, 3])
def test_gradcheck(dim):
    torch.manual_seed(0)
    fl = [1, 1, 1] if dim == 2 else [1, 1]
    conv = _random_bias(MomentConv(fl, fl, dim)).double()
    x = torch.randn(1, fields.n_channels(fl, dim), *([3] * dim), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(conv, (x,))
    w = conv.weights["11"]
    f = lambda weight: torch.func.functional_call(conv, {"weights.11": weight}, (x,))  # noqa: E731
    assert torch.autograd.gradcheck(f, (w.detach().clone().requires_grad_(True),))


def test_inference_kernel_cache_follows_the_parameters():
    """Eval mode without autograd reuses the assembled kernel until a parameter changes (in place, by
    load_state_dict, by a dtype change) or train() is called; results always equal the uncached layer."""
    torch.manual_seed(0)
    conv = _random_bias(MomentConv([2, 1], [1, 2], 2)).eval()
    x = torch.randn(2, 4, 6, 6)

    def fresh() -> torch.Tensor:
        with torch.no_grad():
            return tF.conv2d(x.to(conv.bias.dtype), conv.kernel(), conv.full_bias(), padding=1)

    with torch.inference_mode():
        y = conv(x)
        assert conv._frozen is not None and torch.equal(y, fresh())
        kernel = conv._frozen[2]
        conv(x)
        assert conv._frozen[2] is kernel  # reused
    with torch.no_grad():
        conv.weights["11"].mul_(2)  # an optimiser-style in-place update
        torch.testing.assert_close(conv(x), fresh(), rtol=0, atol=0)
        conv.load_state_dict({k: v + 1 for k, v in conv.state_dict().items()})
        torch.testing.assert_close(conv(x), fresh(), rtol=0, atol=0)
        conv.double()
        assert conv(x.double()).dtype == torch.float64
        torch.testing.assert_close(conv(x.double()), fresh(), rtol=0, atol=0)
    conv.train()
    assert conv._frozen is None
    y = conv(x.double())  # training mode: built every call, with a graph
    assert y.requires_grad and conv._frozen is None


def test_rejects_bad_arguments():
    with pytest.raises(InputError, match="odd"):
        MomentConv([1], [1], 2, kernel_size=4)
    with pytest.raises(InputError, match="dim"):
        MomentConv([1], [1], 4)
    with pytest.raises(InputError, match="expects"):
        MomentConv([1, 1], [1], 2)(torch.randn(1, 2, 4, 4))
    with pytest.raises(InputError, match="spacing"):
        MomentConv([1], [1], 3, spacing=(1, 1))
