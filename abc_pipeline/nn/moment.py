"""Moment-kernel convolution: exact equivariance to the voxel grid's rotations and reflections.

A kernel mapping a rank-``ri`` field to a rank-``ro`` field is a rank ``r = ro + ri`` tensor

    k_{i1..ir}(x) = sum_sigma f_sigma(|x|) * prod_{(a,b) in sigma} delta_{ia ib} * prod_{c not in sigma} xhat_{ic},

summed over the partial matchings ``sigma`` of the ``r`` indices (1, 1, 2, 4, 10 of them for r = 0..4),
``xhat = x/|x|`` (0 at the origin). Each radial profile ``f_sigma`` is learned at ``n_radial`` equally spaced
radii on ``[0, max |x|]`` and linearly interpolated onto the grid radii. ``x`` is the *physical* offset
(voxel offset times ``spacing``), so anisotropic grids get physically isotropic kernels, equivariant to the
grid symmetries that preserve the spacing.

Differences from the lab's ``OEConv`` (reference §1.4, §7): canonical signatures (no duplicate rank-4 term);
basis elements that vanish on the grid are dropped (a profile sample that only reaches the origin, where
``xhat = 0``), so e.g. a 3x3(x3) scalar->vector kernel has 2 parameters, not 3 with one dead; fan-in
initialisation computed from the basis. The whole kernel is assembled into one dense tensor and applied
with ONE ``conv2d``/``conv3d`` call, so the cost is that of an ordinary convolution with the same channels.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from functools import cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from abc_pipeline.errors import InputError
from abc_pipeline.nn.fields import check_fields, check_spacing, n_channels

_CONV = {2: F.conv2d, 3: F.conv3d}


def signatures(rank: int) -> list[tuple[tuple[int, int], ...]]:
    """Canonical partial matchings of ``range(rank)`` (each pair ``(a, b)`` with ``a < b``)."""

    def rec(free: tuple[int, ...]) -> list[tuple[tuple[int, int], ...]]:
        if not free:
            return [()]
        first, rest = free[0], free[1:]
        out = list(rec(rest))  # `first` carries an xhat
        for i, b in enumerate(rest):
            out += [((first, b),) + m for m in rec(rest[:i] + rest[i + 1 :])]
        return out

    return rec(tuple(range(rank)))


def default_n_radial(kernel_size: int) -> int:
    """Samples per radial profile (the lab's rule): 1 for k=1, 3 for k=3, else (k-1)//2 + 1."""
    return 3 if kernel_size == 3 else (kernel_size - 1) // 2 + 1


@cache
def _grid(dim: int, kernel_size: int, spacing: tuple[float, ...], n_radial: int) -> tuple[np.ndarray, np.ndarray]:
    """``xhat`` ``(dim, k**dim)`` and interpolation weights ``L`` ``(k**dim, n_radial)`` for the kernel grid.

    The radius is computed from the *sorted* absolute offsets, so points related by a grid symmetry get
    bit-identical radii (and hence bit-identical kernel values up to sign) for any spacing.
    """
    h = (kernel_size - 1) // 2
    offsets = np.stack(np.meshgrid(*[np.arange(-h, h + 1) * s for s in spacing], indexing="ij")).reshape(dim, -1)
    r = np.sqrt(np.sum(np.sort(offsets**2, axis=0), axis=0))
    xhat = np.divide(offsets, r, out=np.zeros_like(offsets), where=r > 0)
    rmax = r.max()
    L = np.zeros((r.size, n_radial))
    if n_radial == 1 or rmax == 0:
        L[:, 0] = 1.0
    else:
        t = r / rmax * (n_radial - 1)
        i0 = np.minimum(np.floor(t).astype(int), n_radial - 2)
        w = t - i0
        L[np.arange(r.size), i0] = 1 - w
        L[np.arange(r.size), i0 + 1] += w
    return xhat, L


@cache
def moment_basis(
    dim: int, kernel_size: int, rank_out: int, rank_in: int, spacing: tuple[float, ...], n_radial: int
) -> np.ndarray:
    """Basis kernels ``(n_basis, dim**rank_out, dim**rank_in, k**dim)`` (float64) of the equivariant maps.

    One element per (signature, radial sample), all-zero elements dropped.
    """
    xhat, L = _grid(dim, kernel_size, spacing, n_radial)
    rank = rank_out + rank_in
    eye = np.eye(dim)
    out = []
    for sig in signatures(rank):
        paired = {i for pair in sig for i in pair}
        T = np.zeros((dim,) * rank + (xhat.shape[1],))
        for idx in itertools.product(range(dim), repeat=rank):
            v = np.ones(xhat.shape[1])
            for a, b in sig:
                v = v * eye[idx[a], idx[b]]
            for c in range(rank):
                if c not in paired:
                    v = v * xhat[idx[c]]
            T[idx] = v
        T = T.reshape(dim**rank_out, dim**rank_in, -1)
        for m in range(n_radial):
            B = T * L[:, m]
            if np.abs(B).max() > 1e-12:
                out.append(B)
    if not out:
        return np.zeros((0, dim**rank_out, dim**rank_in, xhat.shape[1]))
    return np.stack(out)


class MomentConv(nn.Module):
    """Equivariant convolution between scalar/vector/matrix fields on a 2D or 3D grid.

    Parameters
    ----------
    in_fields, out_fields
        ``[n_scalars, n_vectors(, n_matrices)]``; tensors are ``(B, C, *spatial)`` with
        ``C = n_channels(fields, dim)`` in the layout of :mod:`abc_pipeline.nn.fields`.
    dim
        2 or 3 spatial axes (``(y, x)`` or ``(z, y, x)``).
    kernel_size
        odd; the output has the input's spatial size (symmetric padding ``kernel_size // 2``).
    spacing
        physical voxel size per axis (any unit; only ratios matter); ``None`` = isotropic. The layer is
        equivariant to the symmetries of ``fields.grid_group(dim, spacing)``.
    padding_mode
        ``"zeros"`` or ``"circular"`` (both symmetric, hence exact).
    bias
        a learnable bias on scalar outputs and a learnable multiple of the identity on matrix outputs
        (vector outputs get none: a constant vector is not equivariant).
    n_radial
        samples per radial profile (default :func:`default_n_radial`).
    """

    def __init__(
        self,
        in_fields: Sequence[int],
        out_fields: Sequence[int],
        dim: int,
        kernel_size: int = 3,
        spacing: Sequence[float] | None = None,
        padding_mode: str = "zeros",
        bias: bool = True,
        n_radial: int | None = None,
    ) -> None:
        super().__init__()
        if dim not in (2, 3):
            raise InputError(f"MomentConv supports dim 2 or 3, got dim={dim}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise InputError(f"MomentConv needs an odd kernel_size (symmetric about the centre), got {kernel_size}")
        if padding_mode not in ("zeros", "circular"):
            raise InputError(f"padding_mode must be 'zeros' or 'circular', got {padding_mode!r}")
        self.in_fields, self.out_fields = check_fields(in_fields), check_fields(out_fields)
        self.dim, self.kernel_size, self.padding_mode = dim, kernel_size, padding_mode
        self.spacing = check_spacing(spacing, dim)
        smin = min(self.spacing)
        self._spacing_key = tuple(s / smin for s in self.spacing)
        self.n_radial = n_radial or default_n_radial(kernel_size)
        self.in_channels, self.out_channels = n_channels(self.in_fields, dim), n_channels(self.out_fields, dim)

        self.weights = nn.ParameterDict()
        self._bases: dict[str, np.ndarray] = {}
        fan = {ro: 0.0 for ro in range(len(self.out_fields))}
        for ro, m in enumerate(self.out_fields):
            for ri, n in enumerate(self.in_fields):
                B = moment_basis(dim, kernel_size, ro, ri, self._spacing_key, self.n_radial)
                if m == 0 or n == 0 or len(B) == 0:
                    continue
                key = f"{ro}{ri}"
                self._bases[key] = B
                self.weights[key] = nn.Parameter(torch.empty(m, n, len(B)))
                # variance of one output component per unit input variance and unit weight variance
                fan[ro] += n * float(np.mean(np.sum(B**2, axis=(0, 2, 3))))
        for key, w in self.weights.items():
            bound = np.sqrt(3.0 / max(fan[int(key[0])], 1e-12))
            nn.init.uniform_(w, -bound, bound)
        n_out = self.out_fields + (0,) * (3 - len(self.out_fields))
        self.bias = nn.Parameter(torch.zeros(n_out[0])) if bias and n_out[0] else None
        self.bias_matrix = nn.Parameter(torch.zeros(n_out[2])) if bias and n_out[2] else None
        self._cache: dict[tuple, torch.Tensor] = {}
        self._frozen: tuple | None = None  # (key, pinned weights, kernel, bias) of the last inference call

    def extra_repr(self) -> str:
        s = (
            f"in_fields={list(self.in_fields)}, out_fields={list(self.out_fields)}, dim={self.dim}, "
            f"kernel_size={self.kernel_size}, n_radial={self.n_radial}"
        )
        if any(v != 1.0 for v in self._spacing_key):
            s += f", spacing={self.spacing}"
        return s + ("" if self.padding_mode == "zeros" else f", padding_mode={self.padding_mode!r}")

    def _basis(self, key: str, like: torch.Tensor) -> torch.Tensor:
        ck = (key, like.dtype, like.device)
        if ck not in self._cache:
            self._cache[ck] = torch.as_tensor(self._bases[key], dtype=like.dtype, device=like.device)
        return self._cache[ck]

    def kernel(self, dtype: torch.dtype | None = None, device: torch.device | None = None) -> torch.Tensor:
        """The dense kernel ``(C_out, C_in, k, ..., k)`` assembled from the radial-profile samples
        (``dtype``/``device`` only matter for blocks without parameters, which are zero)."""
        d, k = self.dim, self.kernel_size
        ref = next(iter(self.weights.values()), None)
        dtype = dtype or (ref.dtype if ref is not None else torch.get_default_dtype())
        device = device or (ref.device if ref is not None else None)
        rows = []
        for ro, m in enumerate(self.out_fields):
            if m == 0:
                continue
            cols = []
            for ri, n in enumerate(self.in_fields):
                if n == 0:
                    continue
                key = f"{ro}{ri}"
                if key in self.weights:
                    W = self.weights[key]
                    blk = torch.einsum("oin,nabp->oaibp", W, self._basis(key, W))
                    cols.append(blk.reshape(m * d**ro, n * d**ri, *(k,) * d))
                else:
                    cols.append(torch.zeros(m * d**ro, n * d**ri, *(k,) * d, dtype=dtype, device=device))
            rows.append(torch.cat(cols, dim=1) if len(cols) > 1 else cols[0])
        return torch.cat(rows, dim=0) if len(rows) > 1 else rows[0]

    def full_bias(self) -> torch.Tensor | None:
        """Bias over all output channels (zero on vectors and off-diagonal matrix entries)."""
        if self.bias is None and self.bias_matrix is None:
            return None
        ref = self.bias if self.bias is not None else self.bias_matrix
        n_out = self.out_fields + (0,) * (3 - len(self.out_fields))
        d = self.dim
        parts = [self.bias if self.bias is not None else ref.new_zeros(n_out[0]), ref.new_zeros(n_out[1] * d)]
        if n_out[2]:
            eye = torch.eye(d, dtype=ref.dtype, device=ref.device).reshape(1, d * d)
            bm = self.bias_matrix if self.bias_matrix is not None else ref.new_zeros(n_out[2])
            parts.append((bm[:, None] * eye).reshape(-1))
        return torch.cat(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, *spatial) -> (B, C_out, *spatial)``."""
        if x.ndim != self.dim + 2 or x.shape[1] != self.in_channels:
            raise InputError(
                f"MomentConv expects (B, {self.in_channels}, *{self.dim} spatial) for fields "
                f"{list(self.in_fields)}; got shape {tuple(x.shape)}"
            )
        p = self.kernel_size // 2
        if self.padding_mode == "circular" and p:
            x = F.pad(x, (p,) * (2 * self.dim), mode="circular")
            p = 0
        if self.training or torch.is_grad_enabled():
            kernel, bias = self.kernel(x.dtype, x.device), self.full_bias()
        else:
            kernel, bias = self._inference_weights(x.dtype, x.device)
        return _CONV[self.dim](x, kernel, bias, padding=p)

    def _inference_weights(self, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`kernel` and :meth:`full_bias`, assembled once and reused while the parameters are unchanged.

        Only for eval mode without autograd (no graph to keep). The cache key holds each parameter's storage
        address and in-place version counter (bumped by optimiser steps, ``load_state_dict``, ``copy_``),
        and the cache pins those storages, so an address cannot be reused by new values; ``.to()``,
        ``.double()`` and friends give new storages. :meth:`train` drops the cache. The kernel is built in
        full precision (outside autocast), as ``conv`` casts it anyway.
        """
        params = [p.detach() for p in self.parameters()]
        key = (dtype, device, tuple((p.data_ptr(), p._version) for p in params))
        if self._frozen is None or self._frozen[0] != key:
            with torch.autocast(device.type, enabled=False):
                self._frozen = (key, params, self.kernel(dtype, device), self.full_bias())
        return self._frozen[2], self._frozen[3]

    def train(self, mode: bool = True) -> MomentConv:
        """Set the training mode (see :class:`torch.nn.Module`) and drop the inference-weight cache."""
        self._frozen = None
        return super().train(mode)
