"""Rotation by resampling and the equivariance curve: exact at 0° and 90° for moment models, not for a CNN."""

from __future__ import annotations

import pytest
import torch

from abc_pipeline.errors import InputError
from abc_pipeline.metrics import equivariance_curve, rotate
from abc_pipeline.nn import build_model

ANGLES = [0, 15, 45, 90, 180, 270]


def test_rotate_matches_rot90_direction_and_zero_fill() -> None:
    torch.manual_seed(0)
    x = torch.rand(3, 2, 9, 9)
    # just off 90° goes through the resampling path: it must agree with the exact grid rotation
    assert torch.allclose(rotate(x, 90 + 1e-9), torch.rot90(x, 1, dims=(2, 3)), atol=1e-5)
    assert torch.allclose(rotate(x, -90 + 1e-9), torch.rot90(x, -1, dims=(2, 3)), atol=1e-5)
    assert torch.equal(rotate(x, 0), x) and torch.equal(rotate(x, 180), torch.rot90(x, 2, dims=(2, 3)))
    turned = rotate(torch.ones(1, 1, 9, 9), 45)
    assert turned[0, 0, 0, 0] == 0 and turned[0, 0, 4, 4] == 1  # corners come from outside, centre stays
    # 3D, any plane; label maps keep their dtype and values
    v = torch.rand(2, 1, 6, 5, 6)
    assert torch.allclose(rotate(v, 90 + 1e-9, plane=(2, 4)), torch.rot90(v, 1, dims=(2, 4)), atol=1e-5)
    labels = torch.randint(0, 4, (2, 1, 8, 8))
    out = rotate(labels, 30, mode="nearest")
    assert out.dtype == labels.dtype and set(out.unique().tolist()) <= {0, 1, 2, 3}
    with pytest.raises(InputError, match="spatial axes"):
        rotate(x, 10, plane=(1, 2))


def _fit(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 60) -> torch.nn.Module:
    """A few Adam steps of full-batch cross-entropy (enough to make predictions depend on the input)."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def _rings(n: int, size: int = 15) -> tuple[torch.Tensor, torch.Tensor]:
    """Class = ring radius (rotation invariant)."""
    g = torch.Generator().manual_seed(1)
    y = torch.arange(n) % 3
    axis = torch.arange(size) - (size - 1) / 2
    r = (axis[:, None] ** 2 + axis[None, :] ** 2).sqrt()
    x = torch.exp(-((r - 2.0 - 2.0 * y[:, None, None]) ** 2) / 1.5)
    return (x + 0.1 * torch.randn(x.shape, generator=g))[:, None], y


def _bars(n: int, size: int = 15) -> tuple[torch.Tensor, torch.Tensor]:
    """Class = bar orientation (0 horizontal, 1 vertical) at a random offset: a rotation by 90° flips it."""
    g = torch.Generator().manual_seed(2)
    y = torch.arange(n) % 2
    x = 0.1 * torch.randn(n, 1, size, size, generator=g)
    offsets = torch.randint(3, size - 3, (n,), generator=g)
    for i in range(n):
        if y[i]:
            x[i, 0, 2:-2, offsets[i]] += 1.0
        else:
            x[i, 0, offsets[i], 2:-2] += 1.0
    return x, y


def test_classification_curve_exact_for_moment_model_not_for_cnn() -> None:
    torch.manual_seed(0)
    x, y = _rings(48)
    moment = _fit(build_model("moment-trivial", 2, 1, 3, width=4, depth=3), x, y)
    with torch.no_grad():
        assert len(moment(x).argmax(1).unique()) >= 2  # the curve is not trivially 1 (constant prediction)
    curve = equivariance_curve(moment, x, ANGLES)
    agree = dict(zip(curve["angles"], curve["agreement"]))
    assert agree[0.0] == agree[90.0] == agree[180.0] == agree[270.0] == 1.0
    assert curve["task"] == "classify" and curve["n"] == [48] * len(ANGLES)
    assert all(0.0 <= a <= 1.0 for a in curve["agreement"])

    torch.manual_seed(0)
    xb, yb = _bars(48)
    cnn = _fit(build_model("cnn", 2, 1, 2, width=4, depth=3), xb, yb)
    with torch.no_grad():
        assert (cnn(xb).argmax(1) == yb).float().mean() > 0.9  # it learnt the orientation...
    bars = equivariance_curve(cnn, xb, ANGLES)
    agree = dict(zip(bars["angles"], bars["agreement"]))
    assert agree[0.0] == 1.0 and agree[90.0] < 0.5  # ...so a quarter turn changes its predictions


def test_segmentation_curve_exact_for_moment_unet_not_for_cnn() -> None:
    torch.manual_seed(0)
    x = torch.rand(4, 1, 15, 15)
    y = torch.bucketize(torch.roll(x[:, 0], 1, dims=-1), torch.tensor([0.33, 0.67]))  # left neighbour's level
    mask = x[:, 0] > 0.3
    for name, exact in (("moment-trivial", True), ("cnn", False)):
        torch.manual_seed(0)
        model = _fit(build_model(name, 2, 1, 3, "segment", width=4, depth=2), x, y)
        with torch.no_grad():
            assert len(model(x).argmax(1).unique()) == 3
        curve = equivariance_curve(model, x, [0, 30, 90], task="segment", mask=mask)
        agree = dict(zip(curve["angles"], curve["agreement"]))
        assert agree[0.0] == 1.0
        assert (agree[90.0] == 1.0) is exact
        # voxels compared: the mask at 0° and 90°, fewer at 30° (corners leave the field of view)
        assert curve["n"][0] == curve["n"][2] == int(mask.sum()) and curve["n"][1] < curve["n"][0]
    with pytest.raises(InputError, match="must return"):
        equivariance_curve(model, x, [0], task="classify")
