"""Equivariant building blocks around :class:`~abc_pipeline.nn.moment.MomentConv`.

Every block commutes exactly with the grid symmetries (:func:`abc_pipeline.nn.fields.grid_group`):
- nonlinearities and normalisation act on scalars pointwise and on higher-rank fields through their
  magnitude only (direction untouched);
- down/upsampling is the same symmetric linear map on every channel and never a stride on an even size;
- heads read scalars only (global mean for classification, per-voxel for segmentation).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from abc_pipeline.errors import InputError
from abc_pipeline.nn.fields import check_fields, check_spacing, merge_fields, split_fields

_SCALAR_ACT = {"relu": nn.ReLU, "gelu": nn.GELU}
EPS = 1e-6


def _magnitude_sq(part: torch.Tensor) -> torch.Tensor:
    """``|v|^2`` per field of a ``(B, n, comps, *spatial)`` block -> ``(B, n, *spatial)``."""
    return part.pow(2).sum(dim=2)


class FieldNonlinearity(nn.Module):
    """Scalars: ReLU or GELU. Vectors/matrices: norm-ReLU ``v * relu(|v| - b) / |v|`` with a learnable ``b``
    per field (initialised to 1, as escnn's ``NormNonLinearity('n_relu')``; the lab's HEAD code had its
    arguments swapped, reference §3.1)."""

    def __init__(self, fields: Sequence[int], scalar_act: str = "relu") -> None:
        super().__init__()
        if scalar_act not in _SCALAR_ACT:
            raise InputError(f"scalar_act must be one of {sorted(_SCALAR_ACT)}, got {scalar_act!r}")
        self.fields = check_fields(fields)
        self.act = _SCALAR_ACT[scalar_act]()
        self.thresholds = nn.ParameterList([nn.Parameter(torch.ones(n)) for n in self.fields[1:]])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = split_fields(x, self.fields)
        out = [self.act(parts[0])]
        for part, b in zip(parts[1:], self.thresholds):
            norm = torch.sqrt(_magnitude_sq(part) + EPS)
            shape = (1, -1) + (1,) * (norm.ndim - 2)
            out.append(part * (F.relu(norm - b.view(shape)) / norm).unsqueeze(2))
        return merge_fields(out)


class FieldBatchNorm(nn.Module):
    """Batch norm per field: ordinary batch norm on scalars; for vectors/matrices batch norm of the
    log-magnitude ``m = log|v|`` and rescaling ``v * exp(m' - m)`` (direction untouched).

    The new magnitude is ``|v|**(gamma/sigma)`` times a constant: a power law, whose exponents multiply
    over layers. As in the lab's ``OEBatchnormBlock``, the log-magnitude is standardised to
    ``LOG_GAMMA = sqrt(log((1+sqrt 5)/2))/2 ~ 0.347`` (the initial ``gamma``) so that ``exp(m')`` has about
    unit variance and the exponent stays below 1 at initialisation (with gamma = 1 float32 round-off
    grows layer after layer). ``m'`` is also clamped to ``[-LOG_MAX, LOG_MAX]``, so eval-mode inputs far
    from the training distribution cannot overflow.
    """

    LOG_GAMMA = math.sqrt(math.log((1 + math.sqrt(5)) / 2)) / 2
    LOG_MAX = 10.0

    def __init__(self, fields: Sequence[int], momentum: float = 0.1) -> None:
        super().__init__()
        self.fields = check_fields(fields)
        self.norms = nn.ModuleList([nn.BatchNorm1d(n, momentum=momentum) if n else nn.Identity() for n in self.fields])
        for norm in self.norms[1:]:
            if isinstance(norm, nn.BatchNorm1d):
                nn.init.constant_(norm.weight, self.LOG_GAMMA)

    @staticmethod
    def _bn(bn: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Apply a BatchNorm1d to ``(B, n, *spatial)`` (statistics over batch and space)."""
        return bn(x.reshape(x.shape[0], x.shape[1], -1)).reshape(x.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = split_fields(x, self.fields)
        out = [self._bn(self.norms[0], parts[0][:, :, 0]).unsqueeze(2) if self.fields[0] else parts[0]]
        for r, part in enumerate(parts[1:], start=1):
            if not self.fields[r]:
                out.append(part)
                continue
            m = 0.5 * torch.log(_magnitude_sq(part) + EPS)
            m_new = self._bn(self.norms[r], m).clamp(-self.LOG_MAX, self.LOG_MAX)
            out.append(part * torch.exp(m_new - m).unsqueeze(2))
        return merge_fields(out)


# ------------------------------------------------------------------------------------- resampling
def downsample_axes(spacing: Sequence[float]) -> tuple[bool, ...]:
    """Which axes a downsampling stage halves, given the current physical spacing.

    Axes at least 2x finer than the coarsest are halved; if there is none, all axes are (so an isotropic
    grid is halved everywhere, a 25x25x200 µm grid in-plane only until it is 200x200x200). The rule
    depends only on the spacing, so it commutes with every spacing-preserving grid symmetry.
    """
    spacing = tuple(float(s) for s in spacing)
    coarse = max(spacing)
    fine = tuple(2 * s <= coarse for s in spacing)
    return fine if any(fine) else (True,) * len(spacing)


def next_spacing(spacing: Sequence[float]) -> tuple[float, ...]:
    """Spacing after one :func:`downsample_axes` stage."""
    return tuple(s * (2 if h else 1) for s, h in zip(spacing, downsample_axes(spacing)))


def parity_downsample(x: torch.Tensor, axes: Sequence[bool]) -> torch.Tensor:
    """Halve the selected spatial axes of ``(B, C, *spatial)``: even size n -> n/2 by averaging pairs,
    odd n -> (n+1)/2 by keeping every other sample (both ends kept), size 1 stays 1. Symmetric under
    reversal of the axis, hence exactly equivariant; never a stride on an even size (reference §3.3)."""
    for a, halve in enumerate(axes):
        n = x.shape[2 + a]
        if not halve or n == 1:
            continue
        ax = 2 + a
        if n % 2 == 0:
            x = 0.5 * x.unflatten(ax, (n // 2, 2)).sum(ax + 1)
        else:
            x = x.index_select(ax, torch.arange(0, n, 2, device=x.device))
    return x


def upsample_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Inverse-shape of :func:`parity_downsample`: bring each spatial axis from n to ``size``.

    Target 2n (even): repeat every sample; target 2n-1 (odd): keep the samples and insert the midpoint
    average between neighbours; target n: unchanged. Symmetric under axis reversal, hence equivariant.
    """
    for a, m in enumerate(size):
        ax, n = 2 + a, x.shape[2 + a]
        if m == n:
            continue
        if m == 2 * n:
            x = x.repeat_interleave(2, dim=ax)
        elif m == 2 * n - 1:
            head = x.narrow(ax, 0, n - 1)
            mid = 0.5 * (head + x.narrow(ax, 1, n - 1))
            x = torch.cat([torch.stack([head, mid], dim=ax + 1).flatten(ax, ax + 1), x.narrow(ax, n - 1, 1)], dim=ax)
        else:
            raise InputError(f"cannot upsample axis {a} from {n} to {m}: targets are n, 2n or 2n-1")
    return x


class ParityDownsample(nn.Module):
    """Module form of :func:`parity_downsample` for a grid of the given physical ``spacing``."""

    def __init__(self, dim: int, spacing: Sequence[float] | None = None) -> None:
        super().__init__()
        self.axes = downsample_axes(check_spacing(spacing, dim))

    def extra_repr(self) -> str:
        return f"axes={self.axes}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return parity_downsample(x, self.axes)


# ----------------------------------------------------------------------------------------------- heads
class InvariantHead(nn.Module):
    """Classification head: the first ``n_scalars`` channels -> global spatial mean -> linear logits.
    Invariant because scalars only move with the grid and the mean ignores positions."""

    def __init__(self, n_scalars: int, n_classes: int) -> None:
        super().__init__()
        self.n_scalars = n_scalars
        self.linear = nn.Linear(n_scalars, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x[:, : self.n_scalars].flatten(2).mean(dim=2))


class SegmentationHead(nn.Module):
    """Per-voxel logits from the first ``n_scalars`` channels (a 1x1 convolution on scalars, which is what
    a kernel-size-1 MomentConv reduces to: vector->scalar terms vanish at the kernel centre)."""

    def __init__(self, n_scalars: int, n_classes: int, dim: int) -> None:
        super().__init__()
        self.n_scalars = n_scalars
        self.conv = (nn.Conv2d if dim == 2 else nn.Conv3d)(n_scalars, n_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x[:, : self.n_scalars])
