"""Neighbourhood means: each voxel's mean expression over discs (2D) or balls (3D) of fixed physical radii.

The voxels of a MERFISH raster are sparse (a 100 µm voxel of a section holds 0-2 cells), so a learned trunk
sees speckle. :class:`NeighborhoodMeans` gives a model the smooth local summaries a scientist's
``logreg-neighborhood`` baseline uses (the mean expression of the cell's neighbours), computed on the
raster in one fixed convolution per radius:

``mean_r(v) = sum_{|o| <= r} tissue(v + o) * features(v + o) / max(1, sum_{|o| <= r} tissue(v + o))``

over integer offsets ``o`` whose physical length ``sqrt(sum_i (o_i * spacing_i)^2)`` is at most ``r``, i.e.
the tissue-weighted mean of the (standardised) voxel means within ``r``, 0 where the disc holds no tissue; and
the disc's tissue fraction ``sum tissue(v + o) / |disc|`` (how densely the neighbourhood is populated, which the
means alone do not say).
Radii are in units of the smallest voxel side (``1.5`` on a 0.1 mm grid = 150 µm). The convolutions run as
products of Fourier transforms (``torch.fft`` in float32, float64 for float64 inputs; zero-padded to a linear
convolution and on to a length the FFT factors fast, :func:`scipy.fft.next_fast_len`; the tissue counts rounded
to the integers they are), so a wide disc costs what a narrow one does; the discs' spectra are kept per
transform size (a training run meets the same section sizes every epoch). Each kernel is
symmetric under every axis flip and every swap of equally spaced axes, so the map is exactly equivariant to
the grid group (:func:`abc_pipeline.nn.fields.grid_group`), and its value at a voxel exactly invariant.
Nothing is learned (the kernels are buffers).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.fft import next_fast_len
from torch import nn

from abc_pipeline.errors import InputError


def disc_kernel(radius: float, spacing: Sequence[float]) -> np.ndarray:
    """Boolean kernel ``(2 h_0 + 1, ..., 2 h_{d-1} + 1)``, ``h_i = floor(radius / spacing_i)``: True at the
    offsets within ``radius`` (same unit as ``spacing``) of the centre."""
    half = [int(np.floor(radius / s + 1e-9)) for s in spacing]
    grids = np.meshgrid(*[np.arange(-h, h + 1) * s for h, s in zip(half, spacing)], indexing="ij")
    return sum(g**2 for g in grids) <= radius**2 * (1 + 1e-9)


class NeighborhoodMeans(nn.Module):
    """Fixed tissue-weighted disc means of the feature channels; see the module docstring.

    ``n_features``: ``F``, the feature channels (the input's last channel is the tissue indicator);
    ``radii``: disc radii in units of the smallest voxel side (ascending not required, each > 0);
    ``spacing``: voxel size per spatial axis (only ratios matter). Input ``(B, F + 1, *spatial)`` ->
    output ``(B, (F + 1) * len(radii), *spatial)``: per radius (in the order given) the ``F`` means, then the
    tissue fraction.
    """

    def __init__(self, n_features: int, radii: Sequence[float], spacing: Sequence[float]) -> None:
        super().__init__()
        self.radii = tuple(float(r) for r in radii)
        if not self.radii or min(self.radii) <= 0:
            raise InputError(f"neighbourhood radii must be positive numbers, got {list(radii)}")
        rel = np.asarray(spacing, dtype=float) / min(spacing)
        self.n_features = int(n_features)
        self.kernels = []
        for i, r in enumerate(self.radii):
            name = f"disc_{i}"
            self.register_buffer(name, torch.from_numpy(disc_kernel(r, rel).astype(np.float32)), persistent=False)
            self.kernels.append(name)
        #: voxels of context per side each axis needs (the largest disc's half size)
        self.margin = tuple(int(np.floor(max(self.radii) / s + 1e-9)) for s in rel)
        #: the discs' stacked spectra ``(R, *rfft size)`` per (transform size, dtype, device), most recent last
        self._spectra: dict[tuple, torch.Tensor] = {}

    @property
    def out_channels(self) -> int:
        return (self.n_features + 1) * len(self.radii)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, F + 1, *spatial)`` -> ``(B, (F + 1) * R, *spatial)``; zero padding outside the input."""
        n_features, spatial = self.n_features, x.shape[2:]
        axes = tuple(range(2, x.ndim))
        # linear, not circular, convolution: room for the largest disc's reach past the end of every axis
        size = tuple(next_fast_len(n + 2 * m, real=True) for n, m in zip(spatial, self.margin))
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        signal = torch.cat([x[:, :n_features] * x[:, -1:], x[:, -1:]], dim=1).to(dtype)
        spectrum = torch.fft.rfftn(signal, s=size, dim=axes)
        crop = (Ellipsis, *(slice(0, n) for n in spatial))
        out = []
        for disc, disc_spectrum in zip(self._discs(), self._disc_spectra(size, dtype, x.device)):
            sums = torch.fft.irfftn(spectrum * disc_spectrum, s=size, dim=axes)[crop]
            count = sums[:, n_features:].round()  # the tissue channel is 0/1: the disc's tissue voxels
            out += [sums[:, :n_features] / count.clamp(min=1.0), count / disc.sum()]
        return torch.cat(out, dim=1).to(x.dtype)

    def _discs(self) -> list[torch.Tensor]:
        return [getattr(self, name) for name in self.kernels]

    def _disc_spectra(self, size: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The discs' spectra over ``size`` ``(R, *rfft size)``, computed once per size, dtype and device (the
        last :data:`SPECTRA_KEPT` kept)."""
        key = (size, dtype, device)
        spectra = self._spectra.pop(key, None)
        if spectra is None:
            spectra = torch.stack([_centred_spectrum(disc, size, dtype) for disc in self._discs()])
            while len(self._spectra) >= SPECTRA_KEPT:
                self._spectra.pop(next(iter(self._spectra)))
        self._spectra[key] = spectra
        return spectra


#: disc spectra a :class:`NeighborhoodMeans` keeps (per transform size, dtype and device)
SPECTRA_KEPT = 8


def _centred_spectrum(kernel: torch.Tensor, size: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """``rfftn`` over ``size`` of ``kernel`` placed with its centre voxel at the origin (wrapped around): multiplying
    a signal's spectrum by it convolves the signal with the (symmetric) kernel."""
    padded = torch.zeros(size, dtype=dtype, device=kernel.device)
    padded[tuple(slice(0, n) for n in kernel.shape)] = kernel
    padded = torch.roll(padded, shifts=[-(n // 2) for n in kernel.shape], dims=list(range(kernel.ndim)))
    return torch.fft.rfftn(padded)
