"""Field layout and grid-group helpers: the group, its action on scalars/vectors/matrices/regular fields."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from abc_pipeline.errors import InputError
from abc_pipeline.nn import fields as F


@pytest.mark.parametrize(
    "dim, spacing, rot_only, size",
    [
        (2, None, False, 8),
        (2, None, True, 4),
        (2, (2, 1), False, 4),
        (3, None, False, 48),
        (3, None, True, 24),
        (3, (4, 1, 1), False, 16),
        (3, (4, 1, 1), True, 8),
        (3, (3, 2, 1), False, 8),
    ],
)
def test_group_sizes_and_closure(dim, spacing, rot_only, size):
    group = F.grid_group(dim, spacing, rotations_only=rot_only)
    assert len(group) == size and len(set(group)) == size
    assert group[0] == F.identity(dim)
    table = F.group_table(group)  # raises if not closed
    assert all(sorted(row) == list(range(size)) for row in table)
    for g in group:
        m = g.matrix
        assert np.array_equal(m @ m.T, np.eye(dim))
        assert F.GridSymmetry.from_matrix(m) == g and (g @ g.inverse()) == F.identity(dim)


def test_scalar_action_is_torch_rot90_and_flip():
    x3 = torch.randn(2, 3, 4, 5, 6)
    for plane in [(0, 1), (0, 2), (1, 2)]:
        for k in range(4):
            expected = torch.rot90(x3, k, (2 + plane[0], 2 + plane[1]))
            assert torch.equal(F.transform(x3, F.rot90(3, plane, k)), expected)
    for axis in range(3):
        assert torch.equal(F.transform(x3, F.flip(3, axis)), x3.flip(2 + axis))
    x2 = torch.randn(1, 2, 5, 7)
    assert torch.equal(F.transform(x2, F.rot90(2)), torch.rot90(x2, 1, (2, 3)))


def _grad(s: torch.Tensor) -> torch.Tensor:
    """Central-difference gradient of scalar fields ``(B, 1, *sp)`` -> one vector field ``(B, d, *sp)``."""
    d = s.ndim - 2
    return torch.cat([(s.roll(-1, 2 + i) - s.roll(1, 2 + i)) / 2 for i in range(d)], dim=1)


@pytest.mark.parametrize("dim", [2, 3])
def test_vector_and_matrix_action_match_geometry(dim):
    """The gradient of a scalar field is a vector field, its outer product a matrix field: transforming
    the scalar and differentiating must equal transforming the derived fields (checks component order,
    permutation and signs of the contract layout)."""
    torch.manual_seed(0)
    s = torch.randn(2, 1, *([6] * dim), dtype=torch.float64)
    for g in F.grid_group(dim):
        v, vg = _grad(s), _grad(F.transform(s, g))
        assert torch.equal(F.transform(v, g, [0, 1]), vg)
        outer = lambda u: (u[:, :, None] * u[:, None, :]).reshape(u.shape[0], dim * dim, *u.shape[2:])  # noqa
        assert torch.equal(F.transform(outer(v), g, [0, 0, 1]), outer(vg))
        full = torch.cat([s, v, outer(v)], 1)
        assert torch.equal(F.transform(full, g, [1, 1, 1]), torch.cat([F.transform(s, g), vg, outer(vg)], 1))


def test_actions_compose():
    torch.manual_seed(1)
    group = F.grid_group(3)
    x = torch.randn(1, F.n_channels([1, 2, 1], 3), 3, 3, 3)
    r = torch.randn(1, 2 * len(group), 3, 3, 3)
    for g, h in [(group[5], group[17]), (group[40], group[3]), (group[47], group[47])]:
        assert torch.equal(F.transform(F.transform(x, h, [1, 2, 1]), g, [1, 2, 1]), F.transform(x, g @ h, [1, 2, 1]))
        lhs = F.transform_regular(F.transform_regular(r, h, group), g, group)
        assert torch.equal(lhs, F.transform_regular(r, g @ h, group))


def test_layout_helpers():
    assert F.n_channels([2, 3, 1], 3) == 2 + 9 + 9 and F.n_channels([4], 2) == 4
    a = torch.arange(2 + 2 * 2, dtype=torch.float32).view(1, -1, 1, 1)  # fields [2, 2] in 2D
    b = 100 + torch.arange(1 + 1 * 2, dtype=torch.float32).view(1, -1, 1, 1)  # fields [1, 1]
    out, fields = F.cat_fields(a, [2, 2], b, [1, 1])
    assert fields == (3, 3)
    assert out.flatten().tolist() == [0, 1, 100, 2, 3, 4, 5, 101, 102]
    parts = F.split_fields(out, fields)
    assert [tuple(p.shape[1:3]) for p in parts] == [(3, 1), (3, 2)]
    assert torch.equal(F.merge_fields(parts), out)
    with pytest.raises(InputError):
        F.split_fields(out, [2, 2])
    with pytest.raises(InputError):
        F.grid_group(3, (1, 1))


def test_equivariance_error_detects_a_broken_map():
    x = torch.randn(1, 1, 5, 5, dtype=torch.float64)
    assert F.equivariance_error(lambda t: t * 2, x) == 0.0
    assert F.equivariance_error(lambda t: t.roll(1, 2), x) > 0.1
    assert F.equivariance_error(lambda t: t.sum((2, 3)), x, invariant=True) < 1e-14
