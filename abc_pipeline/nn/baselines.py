"""Baseline layers from the literature: the regular-representation group convolution and CFNet.

- :class:`GroupConv`: a G-CNN layer (Cohen & Welling 2016) over any finite group of grid symmetries
  (``fields.grid_group``: D4 = 8 elements in 2D, the 48 rotations + reflections of the cube in isotropic
  3D, 16 with anisotropic z; ``rotations_only`` gives C4 / the 24 cube rotations). Features carry
  ``|G|`` channels per field (channel ``c*|G| + h`` = field ``c`` at orientation ``h``); the kernel for
  orientation ``g`` is the base kernel transformed by ``g`` (spatially and along the orientation axis),
  assembled by one gather and applied with one convolution.
- :class:`ConicConv2d` and :class:`DFTTransition`: CFNet (Chidester et al. 2018; reference §5.2) — conic
  convolution, globally rotation-equivariant about the image centre for 90° rotations of square images,
  and the rotation-invariant |DFT| transition.
The plain CNN baseline needs no layer of its own (``nn.ConvNd``; see ``zoo``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from abc_pipeline.errors import InputError
from abc_pipeline.nn.fields import GridSymmetry, group_table

_CONV = {2: F.conv2d, 3: F.conv3d}


def _kernel_point_map(g: GridSymmetry, kernel_size: int) -> np.ndarray:
    """``idx[p] = flat index of g^-1 p`` over the ``k**dim`` kernel grid (offsets about the centre)."""
    d, h = g.dim, kernel_size // 2
    pts = np.stack(np.meshgrid(*[np.arange(-h, h + 1)] * d, indexing="ij")).reshape(d, -1)
    src = g.inverse().matrix @ pts + h
    return np.ravel_multi_index(tuple(src), (kernel_size,) * d)


class GroupConv(nn.Module):
    """Group convolution over ``group`` (a list of :class:`GridSymmetry`, closed under composition).

    ``lifting=True``: input ``(B, in_fields, *spatial)`` scalars -> ``(B, out_fields*|G|, *spatial)``;
    otherwise regular fields in and out. Equivariant: ``conv(g.x) = g.conv(x)`` with
    :func:`fields.transform_regular` on the output (and input unless lifting).
    """

    def __init__(
        self,
        in_fields: int,
        out_fields: int,
        group: Sequence[GridSymmetry],
        kernel_size: int = 3,
        lifting: bool = False,
        bias: bool = True,
        padding_mode: str = "zeros",
    ) -> None:
        super().__init__()
        if kernel_size % 2 == 0:
            raise InputError(f"GroupConv needs an odd kernel_size, got {kernel_size}")
        if padding_mode not in ("zeros", "circular"):
            raise InputError(f"padding_mode must be 'zeros' or 'circular', got {padding_mode!r}")
        self.padding_mode = padding_mode
        self.group = list(group)
        self.dim = self.group[0].dim
        self.in_fields, self.out_fields, self.kernel_size, self.lifting = in_fields, out_fields, kernel_size, lifting
        n_g, k_pts = len(self.group), kernel_size**self.dim
        n_in_orient = 1 if lifting else n_g
        fan_in = in_fields * n_in_orient * k_pts
        self.weight = nn.Parameter(
            torch.empty(out_fields, in_fields, n_in_orient * k_pts).uniform_(
                -math.sqrt(3.0 / fan_in), math.sqrt(3.0 / fan_in)
            )
        )
        self.bias = nn.Parameter(torch.zeros(out_fields)) if bias else None
        table = group_table(self.group)
        inv = [self.group.index(g.inverse()) for g in self.group]
        points = np.stack([_kernel_point_map(g, kernel_size) for g in self.group])  # (G, K)
        if lifting:  # W_g[p] = W[g^-1 p]
            index = points
        else:  # W_g[h, p] = W[g^-1 h, g^-1 p]
            orient = table[inv]  # orient[g, h] = index of g^-1 h
            index = orient[:, :, None] * k_pts + points[:, None, :]
        self.register_buffer("index", torch.as_tensor(index.reshape(-1)), persistent=False)

    def extra_repr(self) -> str:
        return (
            f"in_fields={self.in_fields}, out_fields={self.out_fields}, |G|={len(self.group)}, "
            f"kernel_size={self.kernel_size}, lifting={self.lifting}"
        )

    def kernel(self) -> torch.Tensor:
        """Dense kernel ``(out_fields*|G|, in_channels, k, ..., k)``."""
        n_g, k = len(self.group), self.kernel_size
        w = self.weight[:, :, self.index]  # (O, I, G[, G], K)
        if self.lifting:
            w = w.reshape(self.out_fields, self.in_fields, n_g, -1).transpose(1, 2)
            return w.reshape(self.out_fields * n_g, self.in_fields, *(k,) * self.dim)
        w = w.reshape(self.out_fields, self.in_fields, n_g, n_g, -1).permute(0, 2, 1, 3, 4)
        return w.reshape(self.out_fields * n_g, self.in_fields * n_g, *(k,) * self.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.repeat_interleave(len(self.group))
        p = self.kernel_size // 2
        if self.padding_mode == "circular" and p:
            x, p = F.pad(x, (p,) * (2 * self.dim), mode="circular"), 0
        return _CONV[self.dim](x, self.kernel(), bias, padding=p)


class RegularBatchNorm(nn.Module):
    """Batch norm of regular fields: statistics and affine parameters shared by the ``|G|`` channels of
    each field (a per-channel norm would treat orientations differently and break equivariance)."""

    def __init__(self, n_fields: int, group_size: int, momentum: float = 0.1) -> None:
        super().__init__()
        self.n_fields, self.group_size = n_fields, group_size
        self.bn = nn.BatchNorm1d(n_fields, momentum=momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x.reshape(x.shape[0], self.n_fields, -1)).reshape(x.shape)


def group_pool(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Mean over the orientation axis: regular fields ``(B, n*|G|, *s)`` -> invariant scalars ``(B, n, *s)``."""
    return x.reshape(x.shape[0], -1, group_size, *x.shape[2:]).mean(dim=2)


# ----------------------------------------------------------------------------------------------- CFNet
def conic_masks(size: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """Weights ``(4, size, size)`` of the 4 cones (quadrants about the image centre) summing to 1:
    ``mask[r] = rot90(mask[0], r)``; points on a half-axis are shared 1/2-1/2, the centre 1/4 each."""
    c = (size - 1) / 2
    u = torch.arange(size, dtype=torch.float64) - c
    U, V = torch.meshgrid(u, u, indexing="ij")
    m0 = torch.where((U > 0) & (V > 0), 1.0, 0.0)
    m0 = m0 + 0.5 * (((U > 0) & (V == 0)) | ((U == 0) & (V > 0))) + 0.25 * ((U == 0) & (V == 0))
    return torch.stack([torch.rot90(m0, r, (0, 1)) for r in range(4)]).to(dtype=dtype, device=device)


class ConicConv2d(nn.Module):
    """Conic convolution: quadrant ``r`` of the output is the convolution with the kernel rotated by
    ``r * 90°`` (one conv call over the 4 stacked kernels, then the cone masks). Rotating a square input
    by 90° about its centre rotates the output the same way (exact for C4; not for reflections)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, bias: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)
        self.out_channels = out_channels
        self._masks: dict[tuple, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != x.shape[-2]:
            raise InputError(f"CFNet's conic convolution needs square images, got {tuple(x.shape[-2:])}")
        w = self.conv.weight
        weight = torch.cat([torch.rot90(w, r, (2, 3)) for r in range(4)])
        bias = None if self.conv.bias is None else self.conv.bias.repeat(4)
        y = F.conv2d(x, weight, bias, padding=self.conv.padding)
        y = y.reshape(x.shape[0], 4, self.out_channels, *y.shape[2:])
        key = (x.shape[-1], y.dtype, y.device)
        if key not in self._masks:
            self._masks[key] = conic_masks(x.shape[-1], y.dtype, y.device)
        return (y * self._masks[key][None, :, None]).sum(dim=1)


class DFTTransition(nn.Module):
    """CFNet's rotation-invariant transition: the final map (average-pooled to ``pool x pool``) is matched
    against the 4 rotated copies of ``nodes`` learned templates; ReLU; the magnitude of the DFT along the
    rotation axis (a cyclic shift when the input rotates) is invariant -> ``(B, nodes * 3)`` features.

    The adaptive pooling (symmetric under reversal of an axis) lets any input size share the templates,
    where CFNet fixes the input size."""

    def __init__(self, channels: int, nodes: int, pool: int = 2) -> None:
        super().__init__()
        self.pool, self.nodes = pool, nodes
        bound = 1 / math.sqrt(channels * pool * pool)
        self.weight = nn.Parameter(torch.empty(nodes, channels, pool, pool).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.zeros(nodes))
        self.out_features = nodes * 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(x, self.pool)
        w = torch.stack([torch.rot90(self.weight, r, (2, 3)) for r in range(4)], dim=1)  # (N, 4, C, P, P)
        z = F.relu(torch.einsum("bcij,nrcij->bnr", x, w) + self.bias[:, None])
        return (torch.fft.rfft(z, dim=2).abs() / (self.nodes * 4)).flatten(1)
