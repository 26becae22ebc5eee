"""Orientation scores: the metric under every grid symmetry (mean and worst case)."""

from __future__ import annotations

import torch

from abc_pipeline.metrics import orientation_scores
from abc_pipeline.nn.fields import grid_group


def test_orientation_scores_invariant_vs_oriented() -> None:
    torch.manual_seed(0)
    x = torch.rand(12, 1, 5, 5)
    y_cls = (x.mean(dim=(1, 2, 3)) > x.mean()).long()

    def invariant(v: torch.Tensor) -> torch.Tensor:  # depends on the mean intensity only
        p1 = (v.mean(dim=(1, 2, 3)) > x.mean()).float()
        return torch.stack([1 - p1, p1], 1)

    def oriented(v: torch.Tensor) -> torch.Tensor:  # looks at the top-left pixel only
        p1 = (v[:, 0, 0, 0] > 0.5).float()
        return torch.stack([1 - p1, p1], 1)

    group = grid_group(2)
    inv = orientation_scores(invariant, x, y_cls, group, ["lo", "hi"])
    assert len(inv["per_symmetry"]) == 8 and inv["mean"] == inv["worst"] == 1.0
    ori = orientation_scores(oriented, x, y_cls, group, ["lo", "hi"])
    assert ori["worst"] < ori["mean"] <= 1.0

    # segmentation: a per-voxel threshold is equivariant, so Dice is the same under every symmetry
    y_seg = (x[:, 0] > 0.5).long()
    y_seg[:, 0, 0] = -1

    def threshold(v: torch.Tensor) -> torch.Tensor:
        p1 = (v[:, 0] > 0.5).float()
        return torch.stack([1 - p1, p1], 1)

    seg = orientation_scores(threshold, x, y_seg, group, ["bg", "fg"])
    assert seg["metric"] == "mean_dice" and seg["worst"] == seg["mean"] == 1.0
