"""SE(2,N) group convolutions (2D) whose filters are rotated to N angles by bilinear interpolation.

The interpolation group CNN of the literature (Bekkers et al. 2018, "Roto-translation covariant
convolutional networks for medical image analysis"; the "SE(2,N) interpolation U-Net" of the moment-kernel
slides): a finer rotation group than the grid's four quarter turns, at the price of exactness.

- :class:`RotationGroup`: the N rotations ``R_r`` by ``r * 360°/N`` (``r = 0..N-1``) and, with
  ``reflections=True``, their products with the mirror ``F``: the dihedral group D_N (``2N`` elements;
  element ``m * N + r`` is ``R_r F^m``). ``R_r`` turns axis y towards axis x (the direction of
  ``torch.rot90(x, 1, dims=(-2, -1))``, ``fields.rot90(2)``); ``F`` reverses axis y (``torch.flip(x, (-2,))``,
  ``fields.flip(2, 0)``).
- :func:`interpolation_matrices` / :func:`rotate_filters`: ``g`` turns a ``k x k`` filter ``W`` into
  ``W_g(p) = W(g^-1 p)`` (``p``: offsets from the filter centre, in pixels), sampled bilinearly with zeros
  outside the filter grid. This is a fixed ``(|G|, k*k, k*k)`` matrix applied with one einsum, so gradients
  flow to ``W``. For the elements that are pixel-grid symmetries (multiples of 90°, their mirrors) ``g^-1 p``
  is a grid point and the matrix is an exact permutation; elements ``q g`` of one coset of that subgroup share
  ``g``'s matrix with rows permuted by ``q``, so ``W_{qg} = q.W_g`` holds to the last bit.
- :class:`InterpGroupConv`: lifting (image channels -> regular fields) and group convolution (regular ->
  regular). A regular field has ``|G|`` channels (channel ``c * |G| + h`` = field ``c`` at orientation ``h``);
  the kernel of output orientation ``g`` is ``W_g[h] = rotate_g(W[g^-1 h])``; all orientations are stacked
  into one dense kernel and applied with one ``conv2d`` (as :class:`abc_pipeline.nn.baselines.GroupConv`,
  with interpolated rotations in place of exact ones).
- :class:`SE2NFamily`: the zoo family of ``se2n-interp`` (N = 8 with reflections = D8, 16 channels per
  field): these layers with batch norm shared per field, pointwise ReLU, the zoo's classifier / patch
  classifier / U-Net, and group pooling (mean over the orientations) to invariant outputs.

Exactness: a network of these layers is equivariant up to float round-off under the grid symmetries that lie
in the group: all 8 of D4 when ``N % 4 == 0`` and reflections are on (the half-turn and the two axis mirrors
when ``N % 4 == 2``); under the other elements of G only approximately (filter interpolation, and the input's
own resampling), which the equivariance curve and the any-angle evaluation measure.
"""

from __future__ import annotations

import math
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from abc_pipeline.errors import InputError
from abc_pipeline.nn.baselines import _kernel_point_map
from abc_pipeline.nn.fields import GridSymmetry, check_spacing, transform
from abc_pipeline.nn.zoo import _GCNN

_SNAP = 1e-9  # coordinates this close to an integer are that integer (exact 90° multiples)


class RotationGroup:
    """The cyclic group C_N of rotations by multiples of ``360°/N``, or with ``reflections`` the dihedral D_N.

    Elements are indices ``m * N + r`` (``R_r F^m``; identity first). ``R_r`` acts on ``(y, x)`` pixel offsets
    by ``[[cos, -sin], [sin, cos]]`` of ``2 pi r / N``; ``F = diag(-1, 1)``.
    """

    def __init__(self, n_rotations: int = 8, reflections: bool = True) -> None:
        if int(n_rotations) != n_rotations or n_rotations < 1:
            raise InputError(f"n_rotations must be a positive integer, got {n_rotations!r}")
        self.n_rotations, self.reflections = int(n_rotations), bool(reflections)

    def __len__(self) -> int:
        return self.n_rotations * (2 if self.reflections else 1)

    def __repr__(self) -> str:
        return f"{'D' if self.reflections else 'C'}{self.n_rotations}"

    def element(self, index: int) -> tuple[int, int]:
        """``(m, r)`` of element ``index``: ``R_r F^m``."""
        return divmod(index, self.n_rotations)

    def matrix(self, index: int) -> np.ndarray:
        """The ``(2, 2)`` orthogonal matrix of an element on ``(y, x)`` offsets (exact for 90° multiples)."""
        m, r = self.element(index)
        theta = 2 * math.pi * r / self.n_rotations
        c, s = (round(v) if abs(v - round(v)) < _SNAP else v for v in (math.cos(theta), math.sin(theta)))
        rot = np.array([[c, -s], [s, c]], dtype=np.float64)
        return rot @ np.diag([-1.0, 1.0]) if m else rot

    @cached_property
    def table(self) -> np.ndarray:
        """Multiplication table ``(|G|, |G|)``: ``table[a, b] = index(a ∘ b)`` (``F R_r = R_-r F``)."""
        n = self.n_rotations
        out = np.empty((len(self), len(self)), dtype=np.int64)
        for a in range(len(self)):
            m1, r1 = self.element(a)
            for b in range(len(self)):
                m2, r2 = self.element(b)
                out[a, b] = ((m1 + m2) % 2) * n + (r1 + (-1) ** m1 * r2) % n
        return out

    @cached_property
    def inverse(self) -> np.ndarray:
        """``inverse[a]`` = index of ``a^-1``."""
        return np.argmax(self.table == 0, axis=1)

    def index_of(self, g: GridSymmetry) -> int:
        """The element equal to the 2D grid symmetry ``g``; ``InputError`` if ``g`` is not in the group."""
        mat = g.matrix.astype(np.float64)
        if mat.shape != (2, 2):
            raise InputError(f"{self!r} acts on 2D grids; {g} is a {g.dim}D symmetry")
        m = int(round(np.linalg.det(mat)) < 0)
        rot = mat @ np.diag([-1.0, 1.0]) if m else mat
        turns = math.atan2(rot[1, 0], rot[0, 0]) / (2 * math.pi) * self.n_rotations
        r = round(turns) % self.n_rotations
        if (m and not self.reflections) or abs(turns - round(turns)) > _SNAP:
            raise InputError(f"the grid symmetry {g} is not an element of {self!r}")
        return m * self.n_rotations + r

    @cached_property
    def grid_elements(self) -> list[tuple[int, GridSymmetry]]:
        """The elements that are pixel-grid symmetries (integer matrices), as ``(index, GridSymmetry)``:
        the subgroup under which networks of these layers are exactly equivariant."""
        out = []
        for i in range(len(self)):
            mat = self.matrix(i)
            if np.all(mat == np.round(mat)):
                out.append((i, GridSymmetry.from_matrix(mat.astype(np.int64))))
        return out

    def transform_regular(self, x: torch.Tensor, g: GridSymmetry) -> torch.Tensor:
        """Apply the grid symmetry ``g`` (an element of the group) to regular fields ``(B, n * |G|, H, W)``:
        ``[g.f](p, h) = f(g^-1 p, g^-1 h)``, a spatial transform and a permutation of the orientations."""
        src = self.table[self.inverse[self.index_of(g)]]  # new orientation h holds old orientation g^-1 h
        x = transform(x, g)
        y = x.reshape(x.shape[0], -1, len(self), *x.shape[2:])[:, :, torch.as_tensor(src)]
        return y.reshape(x.shape)


def _bilinear_rows(src: np.ndarray, kernel_size: int) -> np.ndarray:
    """Bilinear weights ``(P, k*k)`` sampling a ``k x k`` grid (zero outside) at ``src`` ``(P, 2)`` offsets."""
    h = kernel_size // 2
    src = np.where(np.abs(src - np.round(src)) < _SNAP, np.round(src), src)
    lo = np.floor(src)
    t = src - lo
    out = np.zeros((len(src), kernel_size * kernel_size))
    rows = np.arange(len(src))
    for dy in (0, 1):
        for dx in (0, 1):
            w = (t[:, 0] if dy else 1 - t[:, 0]) * (t[:, 1] if dx else 1 - t[:, 1])
            yy, xx = (lo[:, 0] + dy).astype(np.int64), (lo[:, 1] + dx).astype(np.int64)
            ok = (w > 0) & (np.abs(yy) <= h) & (np.abs(xx) <= h)
            np.add.at(out, (rows[ok], (yy[ok] + h) * kernel_size + xx[ok] + h), w[ok])
    return out


def interpolation_matrices(group: RotationGroup, kernel_size: int) -> np.ndarray:
    """``M`` ``(|G|, k*k, k*k)`` float64 with ``W_g = M[g] @ W`` for a flattened (row-major) ``k x k`` filter:
    ``W_g(p) = W(g^-1 p)`` sampled bilinearly, zero outside the filter grid.

    One coset ``{q g}`` of the grid symmetries ``q`` in the group is interpolated once (at ``g``) and the
    others are exact row permutations of it (``M[qg][p] = M[g][q^-1 p]``), so grid symmetries are exact.
    """
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise InputError(f"kernel_size must be odd and >= 1, got {kernel_size}")
    h = kernel_size // 2
    pts = np.stack(np.meshgrid(*[np.arange(-h, h + 1)] * 2, indexing="ij")).reshape(2, -1).T  # (K, 2) (y, x)
    out = np.zeros((len(group), kernel_size**2, kernel_size**2))
    done = np.zeros(len(group), dtype=bool)
    for g in range(len(group)):
        if done[g]:
            continue
        base = _bilinear_rows(pts @ group.matrix(g), kernel_size)  # rows: g^-1 p = g^T p, i.e. p^T g
        for q_index, q in group.grid_elements:
            e = group.table[q_index, g]
            out[e] = base[_kernel_point_map(q, kernel_size)]
            done[e] = True
    return out


def rotate_filters(weight: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """All rotated copies of filters: ``weight`` ``(..., k, k)``, ``matrices`` ``(|G|, k*k, k*k)`` from
    :func:`interpolation_matrices` -> ``(..., |G|, k, k)`` (linear in ``weight``; differentiable)."""
    n_g, k = matrices.shape[0], weight.shape[-1]
    out = F.linear(weight.flatten(-2), matrices.to(weight.dtype).reshape(n_g * k * k, k * k))
    return out.unflatten(-1, (n_g, k, k))


class InterpGroupConv(nn.Module):
    """Group convolution over a :class:`RotationGroup` with interpolated filter rotations.

    ``lifting=True``: ``(B, in_fields, H, W)`` scalars -> ``(B, out_fields * |G|, H, W)`` regular fields;
    otherwise regular fields in and out. Equivariant to the grid symmetries in the group
    (:meth:`RotationGroup.transform_regular` on regular fields, ``fields.transform`` on scalars): exactly;
    to the other elements approximately. Parameters: ``out * in * k * k`` (lifting) or
    ``out * in * |G| * k * k``; ``padding_mode`` ``"zeros"`` or ``"circular"`` (``same`` size).
    """

    def __init__(
        self,
        in_fields: int,
        out_fields: int,
        group: RotationGroup,
        kernel_size: int = 3,
        lifting: bool = False,
        bias: bool = True,
        padding_mode: str = "zeros",
    ) -> None:
        super().__init__()
        if padding_mode not in ("zeros", "circular"):
            raise InputError(f"padding_mode must be 'zeros' or 'circular', got {padding_mode!r}")
        self.group, self.kernel_size, self.lifting, self.padding_mode = group, kernel_size, lifting, padding_mode
        self.in_fields, self.out_fields = in_fields, out_fields
        matrices = interpolation_matrices(group, kernel_size)
        n_g = len(group)
        n_in = 1 if lifting else n_g
        bound = math.sqrt(3.0 / (in_fields * n_in * kernel_size**2))
        self.weight = nn.Parameter(
            torch.empty(out_fields, in_fields, n_in, kernel_size, kernel_size).uniform_(-bound, bound)
        )
        self.bias = nn.Parameter(torch.zeros(out_fields)) if bias else None
        self.register_buffer("matrices", torch.tensor(matrices, dtype=torch.get_default_dtype()), persistent=False)
        # orient[g, h] = index of g^-1 h: the input orientation whose filter output orientation g reads at h
        orient = group.table[group.inverse] if not lifting else np.zeros((n_g, 1), dtype=np.int64)
        self.register_buffer("orient", torch.as_tensor(orient), persistent=False)

    def extra_repr(self) -> str:
        return (
            f"in_fields={self.in_fields}, out_fields={self.out_fields}, group={self.group!r}, "
            f"kernel_size={self.kernel_size}, lifting={self.lifting}"
        )

    def kernel(self) -> torch.Tensor:
        """Dense kernel ``(out_fields * |G|, in_channels, k, k)``: output channel ``o * |G| + g``, input
        channel ``i`` (lifting) or ``i * |G| + h``."""
        n_g, k = len(self.group), self.kernel_size
        rotated = rotate_filters(self.weight, self.matrices)  # (O, I, n_in, G, k, k): [.., h', g] = rot_g W[h']
        # [o, i, g, h] = rot_g W[g^-1 h]
        w = rotated[:, :, self.orient, torch.arange(n_g, device=self.orient.device)[:, None]]
        return w.permute(0, 2, 1, 3, 4, 5).reshape(self.out_fields * n_g, -1, k, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.repeat_interleave(len(self.group))
        p = self.kernel_size // 2
        if self.padding_mode == "circular" and p:
            x, p = F.pad(x, (p,) * 4, mode="circular"), 0
        return F.conv2d(x, self.kernel(), bias, padding=p)


class SE2NFamily(_GCNN):
    """Zoo family of the interpolation G-CNN: regular fields of a :class:`RotationGroup` (default D8, the
    ``se2n-interp`` model), :class:`InterpGroupConv` layers, batch norm shared per field, pointwise
    nonlinearity, group pooling to invariant scalars. 2D with square pixels only (filters turn by any angle).

    Use it with the zoo's ``Classifier`` / ``UNet`` / ``PatchClassifier`` for other ``n_rotations`` or
    without reflections; ``build_model("se2n-interp", ...)`` uses the defaults.
    """

    def __init__(
        self,
        dim: int,
        kernel_size: int,
        padding_mode: str,
        scalar_act: str,
        *,
        spacing=None,
        n_rotations: int = 8,
        reflections: bool = True,
    ) -> None:
        if dim != 2:
            raise InputError(f"se2n-interp is a 2D model (rotations in the image plane); got dim={dim}")
        spacing = check_spacing(spacing, 2)
        if spacing[0] != spacing[1]:
            raise InputError(
                f"se2n-interp rotates filters by arbitrary angles and needs square pixels, got spacing {spacing}"
            )
        super().__init__(dim, kernel_size, padding_mode, scalar_act, spacing=spacing)
        self.group = RotationGroup(n_rotations, reflections)

    def conv(self, a, b, spacing):
        return InterpGroupConv(
            a[0] + a[1], b[1], self.group, self.kernel_size, lifting=a[1] == 0, padding_mode=self.padding_mode
        )

    def describe(self, spec):
        return f"{spec[1]} regular (|G|={len(self.group)}, {self.group!r} interpolated)"
