"""Field layouts and the symmetry group of the voxel grid.

Layout contract (docs/architecture.md): a feature tensor is ``(batch, channels, *spatial)`` with ``dim``
spatial axes; its channels are ``fields = [n_scalars, n_vectors, n_matrices]`` stacked as all scalars, then
the vectors (field-major, ``dim`` components each, component ``i`` along spatial axis ``i``), then the
matrices (``dim * dim`` components each, row-major). ``fields`` may be shorter (``[n]`` is scalars only).

Group: the symmetries of a (possibly anisotropic) voxel grid are the *signed permutations* ``R`` of the axes
that preserve the voxel spacing: 8 in 2D, 48 in isotropic 3D, 16 in 3D when only the two in-plane spacings
are equal. ``R`` acts on a rank-``r`` field ``T`` by

    [R.T]_{i1..ir}(x) = R_{i1 j1} ... R_{ir jr} T_{j1..jr}(R^-1 x),

with ``x`` measured from the grid centre (so the action maps the grid onto itself for any size along axes
of equal length). ``transform(x, g, fields)`` applies this to a tensor; for image channels and
segmentation logits (scalars only) it is exactly ``torch.rot90`` / ``torch.flip`` on the spatial axes.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from abc_pipeline.errors import InputError


@dataclass(frozen=True)
class GridSymmetry:
    """A signed permutation ``R`` of the spatial axes: ``R e_j = signs[j] * e_{perm[j]}``.

    ``perm[j]`` is the axis that axis ``j`` is carried to, ``signs[j]`` (+1/-1) whether it is reversed.
    """

    perm: tuple[int, ...]
    signs: tuple[int, ...]

    @property
    def dim(self) -> int:
        return len(self.perm)

    @property
    def matrix(self) -> np.ndarray:
        """The orthogonal ``(dim, dim)`` integer matrix ``R``."""
        m = np.zeros((self.dim, self.dim), dtype=np.int64)
        for j, (p, s) in enumerate(zip(self.perm, self.signs)):
            m[p, j] = s
        return m

    @classmethod
    def from_matrix(cls, m: np.ndarray) -> GridSymmetry:
        m = np.asarray(m)
        perm = tuple(int(np.flatnonzero(m[:, j])[0]) for j in range(m.shape[1]))
        return cls(perm, tuple(int(m[perm[j], j]) for j in range(m.shape[1])))

    def __matmul__(self, other: GridSymmetry) -> GridSymmetry:
        """Composition ``self ∘ other`` (apply ``other`` first)."""
        return GridSymmetry.from_matrix(self.matrix @ other.matrix)

    def inverse(self) -> GridSymmetry:
        return GridSymmetry.from_matrix(self.matrix.T)

    @property
    def is_rotation(self) -> bool:
        return round(np.linalg.det(self.matrix)) == 1

    def __str__(self) -> str:
        return "[" + ",".join(f"{'-' if s < 0 else '+'}{p}" for p, s in zip(self.perm, self.signs)) + "]"


def identity(dim: int) -> GridSymmetry:
    return GridSymmetry(tuple(range(dim)), (1,) * dim)


def rot90(dim: int, plane: tuple[int, int] = (0, 1), k: int = 1) -> GridSymmetry:
    """The element acting on scalar fields as ``torch.rot90(x, k, dims=(2 + plane[0], 2 + plane[1]))``."""
    a, b = plane
    m = np.eye(dim, dtype=np.int64)
    # torch.rot90 (k=1) maps the content at (x_a, x_b) to (-x_b, x_a): e_a -> e_b, e_b -> -e_a.
    m[[a, b, a, b], [a, b, b, a]] = [0, 0, -1, 1]
    g = identity(dim)
    for _ in range(k % 4):
        g = GridSymmetry.from_matrix(m) @ g
    return g


def flip(dim: int, axis: int) -> GridSymmetry:
    """The reflection acting on scalar fields as ``torch.flip(x, dims=(2 + axis,))``."""
    signs = [1] * dim
    signs[axis] = -1
    return GridSymmetry(tuple(range(dim)), tuple(signs))


def grid_group(dim: int, spacing: Sequence[float] | None = None, rotations_only: bool = False) -> list[GridSymmetry]:
    """All signed axis permutations that preserve ``spacing`` (identity first).

    8 elements in 2D, 48 in isotropic 3D, 16 in 3D with equal in-plane spacing only, 8 in 3D with three
    different spacings; ``rotations_only`` keeps those with determinant +1 (4, 24, 8, 4).
    """
    spacing = check_spacing(spacing, dim)
    out = []
    for perm in itertools.permutations(range(dim)):
        if any(spacing[perm[j]] != spacing[j] for j in range(dim)):
            continue
        for signs in itertools.product((1, -1), repeat=dim):
            g = GridSymmetry(tuple(perm), tuple(signs))
            if not rotations_only or g.is_rotation:
                out.append(g)
    out.sort(key=lambda g: (g != identity(dim), g.perm, [-s for s in g.signs]))
    return out


def check_spacing(spacing: Sequence[float] | None, dim: int) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * dim
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != dim or any(not s > 0 for s in spacing):
        raise InputError(f"spacing must be {dim} positive numbers (one per spatial axis, z,y,x order); got {spacing}")
    return spacing


# ----------------------------------------------------------------------------------------------- layouts
def check_fields(fields: Sequence[int]) -> tuple[int, ...]:
    """Validate a field list ``[n_scalars, n_vectors(, n_matrices)]``; returns a tuple of length 1..3."""
    fields = tuple(int(n) for n in fields)
    if not 1 <= len(fields) <= 3 or any(n < 0 for n in fields):
        raise InputError(f"fields must be [n_scalars, n_vectors(, n_matrices)] with counts >= 0; got {list(fields)}")
    return fields


def n_channels(fields: Sequence[int], dim: int) -> int:
    """Number of tensor channels of a field list: ``sum_r fields[r] * dim**r``."""
    return sum(n * dim**r for r, n in enumerate(check_fields(fields)))


def split_fields(x: torch.Tensor, fields: Sequence[int]) -> list[torch.Tensor]:
    """Split ``(B, C, *spatial)`` into one view per rank ``r``: ``(B, n_r, dim**r, *spatial)``."""
    dim = x.ndim - 2
    fields = check_fields(fields)
    if x.shape[1] != n_channels(fields, dim):
        raise InputError(f"tensor has {x.shape[1]} channels but fields {list(fields)} need {n_channels(fields, dim)}")
    sizes = [n * dim**r for r, n in enumerate(fields)]
    return [
        part.reshape(x.shape[0], n, dim**r, *x.shape[2:])
        for r, (n, part) in enumerate(zip(fields, torch.split(x, sizes, dim=1)))
    ]


def merge_fields(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`split_fields`."""
    return torch.cat([p.reshape(p.shape[0], -1, *p.shape[3:]) for p in parts], dim=1)


def cat_fields(
    xa: torch.Tensor, fields_a: Sequence[int], xb: torch.Tensor, fields_b: Sequence[int]
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Concatenate two field tensors *by type* (``[s_a, s_b | v_a, v_b | M_a, M_b]``), for skip connections.

    A plain ``torch.cat`` would give ``[s_a, v_a, s_b, v_b]``, which breaks the layout the next layer expects.
    """
    fa, fb = check_fields(fields_a), check_fields(fields_b)
    n = max(len(fa), len(fb))
    fa, fb = fa + (0,) * (n - len(fa)), fb + (0,) * (n - len(fb))
    pa, pb = split_fields(xa, fa), split_fields(xb, fb)
    return merge_fields([torch.cat([a, b], dim=1) for a, b in zip(pa, pb)]), tuple(a + b for a, b in zip(fa, fb))


# ----------------------------------------------------------------------------------------------- actions
def _transform_spatial(x: torch.Tensor, g: GridSymmetry, lead: int) -> torch.Tensor:
    """``out[..., x] = in[..., R^-1 x]`` over the last ``g.dim`` axes (``lead`` leading axes untouched)."""
    inv = np.argsort(g.perm)  # output axis a holds input axis inv[a]
    x = x.permute(*range(lead), *(lead + int(j) for j in inv))
    flips = [lead + g.perm[j] for j in range(g.dim) if g.signs[j] < 0]
    return x.flip(flips) if flips else x


def _component_map(g: GridSymmetry, rank: int) -> tuple[list[int], list[int]]:
    """For rank-``rank`` components: ``new[c] = sign[c] * old[src[c]]`` (row-major flattening)."""
    d = g.dim
    src, sign = [0] * d**rank, [1] * d**rank
    for idx in itertools.product(range(d), repeat=rank):
        new = 0
        s = 1
        for j in idx:
            new = new * d + g.perm[j]
            s *= g.signs[j]
        src[new] = int(np.ravel_multi_index(idx, (d,) * rank)) if rank else 0
        sign[new] = s
    return src, sign


def transform(x: torch.Tensor, g: GridSymmetry, fields: Sequence[int] | None = None) -> torch.Tensor:
    """Apply the grid symmetry ``g`` to a field tensor ``(B, C, *spatial)`` with layout ``fields``.

    ``fields=None`` means all channels are scalars (images, class logits, probabilities).
    Exact: only index permutations and multiplications by +-1.
    """
    dim = x.ndim - 2
    if g.dim != dim:
        raise InputError(f"a {g.dim}D symmetry cannot act on a tensor with {dim} spatial axes (shape {tuple(x.shape)})")
    x = _transform_spatial(x, g, 2)
    if fields is None:
        return x
    parts = []
    for r, part in enumerate(split_fields(x, fields)):
        if r:
            src, sign = _component_map(g, r)
            s = torch.tensor(sign, dtype=part.dtype, device=part.device).view(1, 1, -1, *([1] * dim))
            part = part[:, :, src] * s
        parts.append(part)
    return merge_fields(parts)


def group_table(group: Sequence[GridSymmetry]) -> np.ndarray:
    """Multiplication table ``T[a, b] = index(group[a] ∘ group[b])``; raises if ``group`` is not closed."""
    return _group_table(tuple(group)).copy()


@lru_cache(maxsize=64)
def _group_table(group: tuple[GridSymmetry, ...]) -> np.ndarray:
    index = {g: i for i, g in enumerate(group)}
    try:
        return np.array([[index[a @ b] for b in group] for a in group], dtype=np.int64)
    except KeyError as exc:
        raise InputError("the list of symmetries is not a group (not closed under composition)") from exc


def transform_regular(x: torch.Tensor, g: GridSymmetry, group: Sequence[GridSymmetry]) -> torch.Tensor:
    """Apply ``g`` to a regular-representation feature map ``(B, n * |G|, *spatial)`` (channel ``c*|G| + h``).

    ``[g.f](x, h) = f(g^-1 x, g^-1 h)``: a spatial transform plus a permutation of the group axis.
    """
    group = list(group)
    n_g = len(group)
    src = _group_table(tuple(group))[group.index(g.inverse())]  # new orientation h holds old orientation g^-1 h
    x = _transform_spatial(x, g, 2)
    y = x.reshape(x.shape[0], -1, n_g, *x.shape[2:])[:, :, torch.as_tensor(src)]
    return y.reshape(x.shape)


Action = Callable[[torch.Tensor, GridSymmetry], torch.Tensor]


def equivariance_error(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    group: Sequence[GridSymmetry] | None = None,
    in_fields: Sequence[int] | Action | None = None,
    out_fields: Sequence[int] | Action | None = None,
    invariant: bool = False,
) -> float:
    """Relative equivariance error ``max_g max|fn(g.x) - g.fn(x)| / max|fn(x)|`` over ``group``.

    ``group`` defaults to ``grid_group(dim)``; ``in_fields``/``out_fields`` are field layouts (``None``:
    scalars) or callables ``(tensor, g) -> tensor`` for other actions (e.g. ``transform_regular``);
    ``invariant=True`` compares ``fn(g.x)`` with ``fn(x)`` (classification logits). Transformed inputs of
    equal shape go through ``fn`` as one batch, so ``fn`` must treat batch items independently (eval mode).
    """
    group = list(group) if group is not None else grid_group(x.ndim - 2)

    def action(spec):
        return spec if callable(spec) else (lambda t, g: transform(t, g, spec))

    act_in, act_out = action(in_fields), action(out_fields)
    xs = [act_in(x, g) for g in group]
    with torch.no_grad():
        if all(t.shape == xs[0].shape for t in xs):
            ys = list(fn(torch.cat(xs)).split(x.shape[0]))
        else:
            ys = [fn(t) for t in xs]
        y = ys[group.index(identity(x.ndim - 2))] if identity(x.ndim - 2) in group else fn(x)
        scale = y.abs().max().item()
        err = max((yg - (y if invariant else act_out(y, g))).abs().max().item() for g, yg in zip(group, ys))
    return err / scale if scale > 0 else float("inf")
