"""Patch classifier usable densely: one network for per-cell patches and for whole tiles.

``PatchClassifier`` (``build_model(..., head="patch", patch_size=P)``) is a trunk of ``depth`` stride-1
stages (the family's conv -> norm -> nonlinearity, all ``width`` fields; the last stage scalar-only via the
family's ``to_scalars``), a mean over the centred window of ``P`` voxels per axis (odd), and a linear layer.
No downsampling, so the same weights run in two modes:

- ``forward(x)``: ``x`` ``(B, C, *(P + 2*halo))``, a patch centred on the voxel to classify (``halo`` =
  :attr:`PatchClassifier.halo`, the receptive-field radius of the trunk, per axis) -> trunk (``same`` zero
  padding) -> crop the centred ``P`` window -> mean -> linear -> logits ``(B, n_classes)``. Larger inputs
  work as long as every axis exceeds ``P`` by an even number (the window stays centred).
- ``forward_dense(x)``: ``x`` ``(B, C, *spatial)`` a tile -> trunk -> the linear layer per voxel ->
  stride-1 average pooling with window ``P`` (zero padded, ``same`` size; the mean commutes with the linear
  map) -> logits ``(B, n_classes, *spatial)``.

For every voxel whose ``P + 2*halo`` neighbourhood lies inside the tile, the dense logits equal the patch
logits of that neighbourhood (same arithmetic, up to float summation order); a tile read with a margin of
:attr:`PatchClassifier.margin` = ``P // 2 + halo`` voxels (zero outside the volume) therefore reproduces the
patch classifier at every voxel of its core. In eval mode (batch norm on running statistics) the trunk is
equivariant and the window mean invariant, so for the moment and group-CNN families the patch logits are
invariant and the dense logits equivariant under :func:`abc_pipeline.nn.fields.grid_group` (spacing-aware).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from abc_pipeline.errors import InputError

_AVG_POOL = {2: F.avg_pool2d, 3: F.avg_pool3d}


def check_patch_size(patch_size: int | Sequence[int], dim: int) -> tuple[int, ...]:
    """``P`` as one odd positive size per spatial axis (an int applies to every axis)."""
    size = (int(patch_size),) * dim if isinstance(patch_size, int) else tuple(int(p) for p in patch_size)
    if len(size) != dim or any(p < 1 or p % 2 == 0 for p in size):
        raise InputError(f"patch_size must be one odd size >= 1 or {dim} of them (z y x order), got {patch_size}")
    return size


class PatchClassifier(nn.Module):
    """Stride-1 trunk + centred-window mean + linear; see the module docstring.

    ``family``: a zoo family (``abc_pipeline.nn.zoo._Family``) giving conv/norm/nonlinearity per field spec.
    ``spacing``: physical voxel size per axis (only ratios matter) for spacing-aware kernels.
    """

    def __init__(
        self,
        family,
        in_channels: int,
        n_classes: int,
        width: int,
        depth: int,
        spacing: tuple[float, ...],
        patch_size: int | Sequence[int],
    ) -> None:
        super().__init__()
        if depth < 1:
            raise InputError(f"depth must be >= 1, got {depth}")
        self.dim = family.dim
        self.patch_size = check_patch_size(patch_size, self.dim)
        specs = [family.input(in_channels)] + [family.stage(width)] * (depth - 1) + [family.last(width)]
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [
                family.conv(specs[i], specs[i + 1], spacing),
                family.norm(specs[i + 1]),
                family.act(specs[i + 1]),
            ]
        self.trunk = nn.Sequential(*layers)
        self.pool, n_scalars = family.to_scalars(specs[-1])
        self.linear = nn.Linear(n_scalars, n_classes)
        self.first_spec = specs[1]
        self.halo = (depth * (family.kernel_size // 2),) * self.dim

    @property
    def margin(self) -> tuple[int, ...]:
        """Voxels of input context needed on each side of a voxel: ``P // 2 + halo`` per axis."""
        return tuple(p // 2 + h for p, h in zip(self.patch_size, self.halo))

    @property
    def input_size(self) -> tuple[int, ...]:
        """Patch size ``P + 2 * halo`` per axis that :meth:`forward` expects."""
        return tuple(p + 2 * h for p, h in zip(self.patch_size, self.halo))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Invariant per-voxel features ``(B, n_scalars, *spatial)`` of the trunk."""
        if x.ndim != self.dim + 2:
            raise InputError(f"expected (B, C, *{self.dim} spatial axes), got shape {tuple(x.shape)}")
        return self.pool(self.trunk(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Patch ``(B, C, *spatial)`` -> logits ``(B, n_classes)`` from the centred ``P`` window."""
        crops = []
        for n, p in zip(x.shape[2:], self.patch_size):
            if n < p or (n - p) % 2:
                raise InputError(
                    f"patch of shape {tuple(x.shape[2:])} has no centred {self.patch_size} window; "
                    f"give {self.input_size} voxels (patch_size + 2 * halo)"
                )
            crops.append(slice((n - p) // 2, (n - p) // 2 + p))
        h = self.features(x)[(slice(None), slice(None), *crops)]
        return self.linear(h.flatten(2).mean(dim=2))

    def forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        """Tile ``(B, C, *spatial)`` -> per-voxel logits ``(B, n_classes, *spatial)`` (same size).

        The window mean and the linear map commute, so the linear weights are applied per voxel first and
        the ``n_classes`` (not ``n_scalars``) channels are pooled; the bias is added after pooling.
        """
        z = torch.einsum("bc...,kc->bk...", self.features(x), self.linear.weight)
        z = _AVG_POOL[self.dim](
            z, self.patch_size, stride=1, padding=tuple(p // 2 for p in self.patch_size), count_include_pad=True
        )
        return z + self.linear.bias.view(1, -1, *(1,) * self.dim)
