"""Raster grids: coordinate space, origin, voxel size per axis and shape; coordinates <-> voxel indices.

All conversions between cell coordinates and voxel indices live here. Axes are always ordered
``(z, y, x)``; physical coordinates are millimetres (the unit of the ABC files).

Spaces
------
``section``
    2D images per section. The z "coordinate" of a cell is the index of its section in the section
    order (``Grid.sections``), so z voxels have size 1 (one section) and origin -0.5; y, x come from
    ``obsm['spatial']`` in mm. For display, the z axis gets the nominal section spacing in mm.
``reconstructed``
    3D, ``obsm['spatial_3d']``; by default z voxels are the 0.2 mm section spacing (anisotropic).
``ccf``
    3D, ``obsm['ccf']``, isotropic or anisotropic voxels.

Voxel convention
----------------
Voxel ``i`` along an axis covers the half-open interval ``[origin + i*size, origin + (i+1)*size)``:
``index = floor((coord - origin) / size)``. Cells outside ``[0, shape)`` or with a NaN coordinate get
index -1 on all three axes. Points exactly on a voxel boundary go to the upper voxel, so a mirror
image of such a point does not land in the mirrored voxel; the symmetry tests use points off the
boundaries (any exactly symmetric rule must split the central boundary, which is impossible).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from abc_pipeline import keys
from abc_pipeline.errors import InputError

SPACES = ("section", "reconstructed", "ccf")
AXES = ("z", "y", "x")
UNIT = "millimeter"
#: obsm key holding the (x, y[, z]) coordinates of each space, in mm.
COORDINATE_KEYS = {"section": keys.SPATIAL, "reconstructed": keys.SPATIAL_3D, "ccf": keys.CCF}
#: Default voxel sizes (z, y, x) in mm; z of ``section`` is one section.
DEFAULT_VOXEL_SIZE = {"section": (1.0, 0.025, 0.025), "reconstructed": (0.2, 0.05, 0.05), "ccf": (0.1, 0.1, 0.1)}
#: Section spacing (mm) assumed for display when it cannot be measured (a single section).
DEFAULT_SECTION_SPACING = 0.2
_EPS = 1e-6  # relative slack when a data extent is an exact multiple of the voxel size


def _check_space(space: str) -> str:
    if space not in SPACES:
        raise InputError(f"unknown raster space {space!r}; choose one of {', '.join(SPACES)}")
    return space


def voxel_size_zyx(space: str, voxel_size: float | Sequence[float] | None) -> tuple[float, float, float]:
    """Normalise a user voxel size (mm) to ``(z, y, x)``.

    A single number applies to y and x (and z in the 3D spaces); two numbers are ``(y, x)``; three are
    ``(z, y, x)``. In ``section`` space z is always one section. ``None`` gives ``DEFAULT_VOXEL_SIZE``.
    """
    _check_space(space)
    if voxel_size is None:
        return DEFAULT_VOXEL_SIZE[space]
    values = [float(voxel_size)] if np.isscalar(voxel_size) else [float(v) for v in voxel_size]
    if len(values) == 1:
        zyx = [values[0]] * 3
    elif len(values) == 2:
        zyx = [DEFAULT_VOXEL_SIZE[space][0], *values]
    elif len(values) == 3:
        zyx = values
    else:
        raise InputError(f"voxel size needs 1, 2 (y x) or 3 (z y x) values in mm, got {values}")
    if space == "section":
        zyx[0] = 1.0
    bad = [f"{a}={v}" for a, v in zip(AXES, zyx) if not (math.isfinite(v) and v > 0)]
    if bad:
        raise InputError(f"voxel sizes must be positive and finite (mm), got {', '.join(bad)}")
    return (zyx[0], zyx[1], zyx[2])


@dataclass(frozen=True)
class Grid:
    """A regular voxel grid over one coordinate space.

    Attributes
    ----------
    space: ``section`` | ``reconstructed`` | ``ccf``.
    origin: ``(z, y, x)`` lower corner of voxel (0, 0, 0), mm (z of ``section``: -0.5, in sections).
    voxel_size: ``(z, y, x)`` edge lengths, mm (z of ``section``: 1 section).
    shape: ``(nz, ny, nx)`` number of voxels.
    sections: ``section`` space only: ``brain_section_label`` of each z index, in order.
    section_z: ``section`` space only: z of each section (mm), for display metadata.
    """

    space: str
    origin: tuple[float, float, float]
    voxel_size: tuple[float, float, float]
    shape: tuple[int, int, int]
    sections: tuple[str, ...] = field(default=())
    section_z: tuple[float, ...] = field(default=())

    def __post_init__(self) -> None:
        _check_space(self.space)
        object.__setattr__(self, "origin", tuple(float(v) for v in self.origin))
        object.__setattr__(self, "voxel_size", tuple(float(v) for v in self.voxel_size))
        object.__setattr__(self, "shape", tuple(int(v) for v in self.shape))
        object.__setattr__(self, "sections", tuple(str(s) for s in self.sections))
        object.__setattr__(self, "section_z", tuple(float(z) for z in self.section_z))
        if len(self.origin) != 3 or len(self.voxel_size) != 3 or len(self.shape) != 3:
            raise InputError("a Grid needs origin, voxel_size and shape with 3 values each (z, y, x)")
        bad = [f"{a}={v}" for a, v in zip(AXES, self.voxel_size) if not (math.isfinite(v) and v > 0)]
        if bad:
            raise InputError(f"voxel sizes must be positive and finite (mm), got {', '.join(bad)}")
        if not all(math.isfinite(v) for v in self.origin):
            raise InputError(f"grid origin must be finite, got {self.origin}")
        if min(self.shape) < 1:
            raise InputError(
                f"empty grid: shape (z, y, x) = {self.shape}; the bounds must span at least one voxel "
                "along every axis (check the bounds and voxel size)"
            )
        if self.space == "section":
            if len(self.sections) != self.shape[0]:
                raise InputError(f"section grid: {len(self.sections)} section labels for {self.shape[0]} z voxels")
            if self.section_z and len(self.section_z) != len(self.sections):
                raise InputError("section grid: section_z must have one value per section")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_bounds(
        cls,
        space: str,
        lower: Sequence[float],
        upper: Sequence[float],
        voxel_size: float | Sequence[float] | None = None,
        sections: Sequence[str] = (),
        section_z: Sequence[float] = (),
    ) -> Grid:
        """Grid starting at ``lower`` (z, y, x; mm) and covering ``upper`` (rounded up to whole voxels).

        In ``section`` space the z bounds are ignored: z covers the given ``sections``.
        """
        size = voxel_size_zyx(space, voxel_size)
        lo, hi = [float(v) for v in lower], [float(v) for v in upper]
        if space == "section":
            lo[0], hi[0] = -0.5, len(sections) - 0.5
        for a, low, high in zip(AXES, lo, hi):
            if not (math.isfinite(low) and math.isfinite(high)) or high <= low:
                raise InputError(
                    f"empty grid: bounds along {a} are [{low}, {high}] mm; the upper bound must exceed the lower"
                )
        shape = [max(1, math.ceil((high - low) / s - _EPS)) for low, high, s in zip(lo, hi, size)]
        return cls(space, tuple(lo), size, tuple(shape), tuple(sections), tuple(section_z))

    @classmethod
    def around(
        cls,
        space: str,
        lower: Sequence[float],
        upper: Sequence[float],
        voxel_size: float | Sequence[float] | None = None,
        margin: int = 1,
        sections: Sequence[str] = (),
        section_z: Sequence[float] = (),
    ) -> Grid:
        """Grid centred on data spanning ``[lower, upper]`` (z, y, x; mm) plus ``margin`` voxels per side.

        The number of voxels is ``floor(extent / size) + 1 + 2 * margin`` per axis, so points spaced by
        exactly one voxel (sections along reconstructed z) sit at voxel centres. ``section`` space: z
        covers the sections without margin.
        """
        size = voxel_size_zyx(space, voxel_size)
        if margin < 0:
            raise InputError(f"margin must be >= 0 voxels, got {margin}")
        lo, hi = [float(v) for v in lower], [float(v) for v in upper]
        if not all(math.isfinite(v) for v in lo + hi):
            raise InputError("empty grid: no cell has finite coordinates in this space")
        origin, shape = [], []
        for axis, (low, high, s) in enumerate(zip(lo, hi, size)):
            if space == "section" and axis == 0:
                origin.append(-0.5)
                shape.append(len(sections))
                continue
            n = math.floor((high - low) / s + _EPS) + 1 + 2 * int(margin)
            origin.append((low + high) / 2 - n * s / 2)
            shape.append(n)
        return cls(space, tuple(origin), size, tuple(shape), tuple(sections), tuple(section_z))

    # ------------------------------------------------------------------ conversions
    @property
    def ndim_physical(self) -> int:
        """2 for ``section`` (z is the section index), 3 otherwise."""
        return 2 if self.space == "section" else 3

    @property
    def n_voxels(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def upper(self) -> tuple[float, float, float]:
        """Upper corner (z, y, x) of the last voxel."""
        return tuple(o + n * s for o, n, s in zip(self.origin, self.shape, self.voxel_size))

    @property
    def center(self) -> tuple[float, float, float]:
        """Centre (z, y, x) of the grid: the fixed point of its rotations and mirrors."""
        return tuple(o + n * s / 2 for o, n, s in zip(self.origin, self.shape, self.voxel_size))

    def to_index(self, coords: np.ndarray) -> np.ndarray:
        """Voxel indices of points.

        coords: (n, 3) float, ``(z, y, x)`` in grid units (mm; section index for ``section`` z).
        Returns (n, 3) int32 ``(z, y, x)``; rows are -1 where a coordinate is NaN or outside the grid.
        """
        coords = np.asarray(coords, dtype=np.float64)
        rel = (coords - np.asarray(self.origin)) / np.asarray(self.voxel_size)
        with np.errstate(invalid="ignore"):
            idx = np.floor(rel)
            inside = np.all((idx >= 0) & (idx < np.asarray(self.shape)), axis=1)  # False for NaN
        out = np.full(coords.shape, -1, dtype=np.int32)
        out[inside] = idx[inside].astype(np.int32)
        return out

    def to_physical(self, index: np.ndarray) -> np.ndarray:
        """Voxel centres (n, 3) float ``(z, y, x)`` of integer voxel indices (n, 3)."""
        index = np.asarray(index, dtype=np.float64)
        return np.asarray(self.origin) + (index + 0.5) * np.asarray(self.voxel_size)

    def ravel(self, index: np.ndarray) -> np.ndarray:
        """Flat C-order voxel numbers (n,) int64 of valid indices (n, 3)."""
        index = np.asarray(index, dtype=np.int64)
        return np.ravel_multi_index((index[:, 0], index[:, 1], index[:, 2]), self.shape)

    # ------------------------------------------------------------------ pyramid
    def downsample_factors(self) -> tuple[int, int, int]:
        """Per-level downsampling (z, y, x): y, x by 2; z by 2 only for isotropic 3D voxels."""
        vz, vy, vx = self.voxel_size
        isotropic = (
            self.space != "section" and math.isclose(vz, vy, rel_tol=1e-3) and math.isclose(vy, vx, rel_tol=1e-3)
        )
        return (2 if isotropic else 1, 2, 2)

    def level(self, k: int) -> Grid:
        """The grid of pyramid level ``k`` (0 = this grid): same origin, voxels ``factor**k`` larger."""
        f = [d**k for d in self.downsample_factors()]
        shape = tuple(math.ceil(n / fi) for n, fi in zip(self.shape, f))
        size = tuple(s * fi for s, fi in zip(self.voxel_size, f))
        return replace(self, voxel_size=size, shape=shape)

    # ------------------------------------------------------------------ display (OME) metadata
    @property
    def section_spacing(self) -> float:
        """Nominal z spacing (mm) of ``section`` grids: median gap between consecutive sections."""
        z = np.asarray(self.section_z, dtype=float)
        gaps = np.diff(z[np.isfinite(z)])
        return float(np.median(np.abs(gaps))) if gaps.size and np.median(np.abs(gaps)) > 0 else DEFAULT_SECTION_SPACING

    def physical_scale(self) -> tuple[float, float, float]:
        """Voxel size (z, y, x) in mm for OME metadata (``section`` z: the nominal section spacing)."""
        if self.space == "section":
            return (self.section_spacing, self.voxel_size[1], self.voxel_size[2])
        return self.voxel_size

    def physical_translation(self) -> tuple[float, float, float]:
        """Centre (z, y, x; mm) of voxel (0, 0, 0) for OME metadata (``section`` z: the first section's z)."""
        c = [o + s / 2 for o, s in zip(self.origin, self.voxel_size)]
        if self.space == "section":
            z0 = self.section_z[0] if self.section_z and math.isfinite(self.section_z[0]) else 0.0
            c[0] = z0
        return tuple(c)

    # ------------------------------------------------------------------ serialisation
    def to_attrs(self) -> dict:
        """JSON-serialisable description; ``Grid.from_attrs`` restores the grid exactly."""
        return {
            "space": self.space,
            "axes": list(AXES),
            "units": ["section" if self.space == "section" else UNIT, UNIT, UNIT],
            "coordinates": f"obsm['{COORDINATE_KEYS[self.space]}']",
            "origin": list(self.origin),
            "voxel_size": list(self.voxel_size),
            "shape": list(self.shape),
            "sections": list(self.sections),
            "section_z": [z if math.isfinite(z) else None for z in self.section_z],
            "convention": "index = floor((coord - origin) / voxel_size); voxel i covers [origin + i*size, origin + (i+1)*size)",
        }

    @classmethod
    def from_attrs(cls, attrs: dict) -> Grid:
        """Inverse of ``to_attrs`` (accepts the dict itself or a raster's ``abc_pipeline.raster`` attrs)."""
        if "grid" in attrs:
            attrs = attrs["grid"]
        try:
            return cls(
                space=attrs["space"],
                origin=tuple(attrs["origin"]),
                voxel_size=tuple(attrs["voxel_size"]),
                shape=tuple(attrs["shape"]),
                sections=tuple(attrs.get("sections", ())),
                section_z=tuple(np.nan if z is None else z for z in attrs.get("section_z", ())),
            )
        except KeyError as exc:
            raise InputError(f"grid attributes lack the field {exc}; expected the output of Grid.to_attrs()") from exc
