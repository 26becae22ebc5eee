"""Geometry of the synthetic brain: where each real Allen-CCF-2020 parcel lies, with real relative volumes.

Space is millimetres in the MERFISH *reconstructed* frame of the real atlas: ``x`` left-right (0-11), ``y``
dorsal-ventral (0-11, dorsal = small y), ``z`` anterior-posterior (the real section z, 0-14.6). The brain is a
superellipse in each section (about 10 x 8 mm at mid depth) that narrows towards both ends; left and right mirror
each other (every parcel is bilateral, as in the CCF annotation).

Parcels nest as division > structure > substructure (the real 688 parcels, :func:`synthetic_tables.parcellation`).
Each level is a power diagram (a Voronoi diagram with additive weights) in smoothly warped normalised
coordinates: divisions around hand-placed anatomical anchors (cortex as a dorsal mantle, olfactory bulb in front,
cerebellum behind and above, ...), structures and substructures around k-means seeds of their parent. The weights
are fitted on a fixed sample of points so that every region's share of its parent's volume equals the real
``volume_mm3`` share (see :data:`VOLUME_FIT_TOLERANCE`). Cortical substructures are layers by depth below the
brain surface, with real layer volume shares. The geometry does not depend on the seed; it is built once per
process.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from abc_pipeline.atlas import synthetic_tables

CENTER = np.array([5.5, 5.3])  # brain centre in a section (x, y), mm
SEMI_AXES = np.array([5.0, 3.9])  # superellipse semi-axes at mid depth (x, y), mm
SUPERELLIPSE_P = 2.4
Z_CENTER = 7.3  # mm: the real sections span z = 0.0 (.01) ... 14.6 (.69)
Z_HALF = 7.7  # brain half-length along z, mm
WARP = 0.08  # amplitude of the smooth warp of region boundaries (normalised units)
FIT_POINTS = 60_000  # sample points (one hemisphere) the region weights are fitted on
VOLUME_FIT_TOLERANCE = 0.1  # relative error of the fitted division / structure volumes (regions >= 1 mm3)
CORTEX_LAYERS = ("1", "2/3", "4", "5", "6a", "6b")

# Division anchors (|x|, y, z) in normalised coordinates: x 0 medial .. 1 lateral, y -1 dorsal .. 1 ventral,
# z -1 anterior .. 1 posterior. One fitted weight per division.
_ANCHORS: dict[str, list[tuple[float, float, float]]] = {
    "Isocortex": [
        (a, b, c) for c in (-0.62, -0.38, -0.14, 0.1, 0.32) for a, b in ((0.22, -0.88), (0.58, -0.7), (0.86, -0.25))
    ],
    "OLF": [(0.2, 0.0, -0.9), (0.32, 0.25, -0.75), (0.82, 0.5, -0.3), (0.75, 0.6, -0.02)],
    "HPF": [(0.35, -0.5, 0.22), (0.55, -0.32, 0.35), (0.72, 0.2, 0.42), (0.82, -0.05, 0.52)],
    "STR": [(0.4, 0.0, -0.45), (0.35, 0.22, -0.25), (0.55, 0.1, -0.2)],
    "PAL": [(0.2, 0.45, -0.3), (0.3, 0.32, -0.12)],
    "CTXsp": [(0.82, 0.35, -0.1), (0.86, 0.25, 0.12)],
    "TH": [(0.15, -0.05, 0.05), (0.32, -0.05, 0.16)],
    "HY": [(0.1, 0.62, -0.05), (0.15, 0.55, 0.16)],
    "MB": [(0.15, -0.2, 0.45), (0.3, -0.3, 0.45), (0.2, 0.2, 0.4)],
    "P": [(0.2, 0.55, 0.6)],
    "MY": [(0.2, 0.4, 0.88), (0.3, 0.55, 0.8)],
    "CB": [(0.3, -0.4, 0.75), (0.6, -0.2, 0.75), (0.2, -0.5, 0.9)],
    "lfbs": [(0.45, -0.55, -0.1), (0.45, -0.45, 0.15), (0.45, 0.2, -0.05)],
    "cbf": [(0.3, -0.1, 0.75)],
    "mfbs": [(0.25, 0.45, 0.05)],
    "cm": [(0.5, 0.85, 0.3), (0.3, 0.9, 0.6)],
    "scwm": [(0.65, -0.4, -0.2)],
    "eps": [(0.35, 0.55, 0.4)],
    "VL": [(0.2, -0.1, -0.25)],
    "V3": [(0.02, 0.3, 0.05)],
    "V4": [(0.05, -0.05, 0.75)],
    "AQ": [(0.02, -0.1, 0.45)],
    "c": [(0.02, 0.5, 0.95)],
    "brain-unassigned": [(0.95, 0.1, -0.5)],
    "fiber tracts-unassigned": [(0.5, 0.7, 0.1)],
}


@dataclass(frozen=True)
class _SmoothField:
    """Sum of random plane waves: a smooth scalar field per output, evaluated at points (n, 3) -> (n, n_out)."""

    freqs: np.ndarray  # (n_out, n_waves, 3), radians per normalised unit
    phases: np.ndarray  # (n_out, n_waves)
    amps: np.ndarray  # (n_out, n_waves)

    @classmethod
    def random(cls, rng: np.random.Generator, n_out: int, n_waves: int = 6, scale: float = 2.5) -> _SmoothField:
        freqs = rng.normal(0.0, scale, (n_out, n_waves, 3))
        return cls(freqs, rng.uniform(0, 2 * np.pi, (n_out, n_waves)), np.full((n_out, n_waves), 1 / np.sqrt(n_waves)))

    def __call__(self, pts: np.ndarray) -> np.ndarray:
        arg = np.einsum("nd,owd->now", pts, self.freqs) + self.phases[None]
        return (np.sin(arg) * self.amps[None]).sum(-1)


@dataclass(frozen=True)
class _PowerCells:
    """A power diagram: point -> argmin_i |p - seed_i|^2 - weight_i (z distances count 0.7x)."""

    seeds: np.ndarray  # (k, 3)
    weights: np.ndarray  # (k,)
    labels: np.ndarray  # (k,) int: what each cell stands for (a row, or a child index)

    def assign(self, pts: np.ndarray) -> np.ndarray:
        d2 = (((pts[:, None, :] - self.seeds[None]) * _METRIC) ** 2).sum(-1) - self.weights[None]
        return self.labels[np.argmin(d2, axis=1)]


_METRIC = np.array([1.0, 1.0, 0.7])


def _fit_weights(
    pts: np.ndarray, seeds: np.ndarray, owner: np.ndarray, target: np.ndarray, iterations: int = 40
) -> np.ndarray:
    """Per-owner weights (len(target),) so that owner i's power cells hold ``target[i]`` of ``pts``.

    ``seeds`` (k, 3) belong to owners ``owner`` (k,); ``target`` sums to 1. Damped log-ratio updates.
    """
    weights = np.zeros(len(target))
    if len(target) == 1:
        return weights
    d2 = (((pts[:, None, :] - seeds[None]) * _METRIC) ** 2).sum(-1)
    scale = np.median(d2.min(1)) + 1e-3
    for _ in range(iterations):
        got = np.bincount(owner[np.argmin(d2 - weights[owner][None], axis=1)], minlength=len(target)) / len(pts)
        step = np.log(np.maximum(target, 1e-7) / np.maximum(got, 0.2 / len(pts)))
        weights += 0.7 * scale * np.clip(step, -2.0, 2.0)
    return weights


def _kmeans_seeds(rng: np.random.Generator, pts: np.ndarray, k: int, iterations: int = 6) -> np.ndarray:
    seeds = pts[rng.choice(len(pts), k, replace=len(pts) < k)]
    for _ in range(iterations):
        nearest = np.argmin((((pts[:, None, :] - seeds[None]) * _METRIC) ** 2).sum(-1), axis=1)
        sums = np.zeros_like(seeds)
        np.add.at(sums, nearest, pts)
        counts = np.bincount(nearest, minlength=k)
        seeds = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], seeds)
    return seeds


class BrainGeometry:
    """Where the real parcels lie. :meth:`region_of` maps reconstructed points to parcel rows of
    :func:`synthetic_tables.parcellation` (row 0 = ``unassigned``, outside the brain)."""

    def __init__(self) -> None:
        rng = np.random.default_rng(0xB7A1)
        self.table = synthetic_tables.parcellation()
        self._warp = _SmoothField.random(rng, 3, scale=2.0)
        pts, rho = self._fit_points(rng)
        depth = 1.0 - rho
        table = self.table.iloc[1:]
        volume = table.volume_mm3.to_numpy()
        divisions = list(dict.fromkeys(table.division))
        missing = set(divisions) - set(_ANCHORS)
        if missing:
            raise ValueError(f"no anchors for divisions {sorted(missing)}")
        div_volume = np.array([volume[table.division.to_numpy() == d].sum() for d in divisions])
        seeds = np.array([a for d in divisions for a in _ANCHORS[d]], dtype=float)
        owner = np.array([i for i, d in enumerate(divisions) for _ in _ANCHORS[d]])
        weights = _fit_weights(pts, seeds, owner, div_volume / div_volume.sum())
        self._divisions = _PowerCells(seeds, weights[owner], owner)
        self._division_names = divisions
        self._structures: dict[int, _PowerCells] = {}  # division index -> structure cells (labels: structure id)
        self._leaves: dict[int, tuple[str, object]] = {}  # structure id -> ("leaf", row) / ("power", cells) / ...
        self._structure_names: list[str] = []
        div_of_pt = self._divisions.assign(pts)
        for d, division in enumerate(divisions):
            rows = table[table.division == division]
            names = list(dict.fromkeys(rows.structure))
            ids = np.arange(len(self._structure_names), len(self._structure_names) + len(names))
            self._structure_names += names
            in_div = pts[div_of_pt == d]
            st_volume = np.array([rows.volume_mm3[rows.structure == s].sum() for s in names])
            if len(names) == 1 or len(in_div) < len(names):
                seeds = _kmeans_seeds(rng, in_div, len(names)) if len(in_div) else np.zeros((len(names), 3))
                self._structures[d] = _PowerCells(seeds, np.zeros(len(names)), ids)
            else:
                seeds = _kmeans_seeds(rng, in_div, len(names))
                w = _fit_weights(in_div, seeds, np.arange(len(names)), st_volume / st_volume.sum())
                self._structures[d] = _PowerCells(seeds, w, ids)
            st_of_pt = self._structures[d].assign(in_div) if len(in_div) else np.zeros(0, dtype=int)
            for sid, name in zip(ids, names):
                sub = rows[rows.structure == name]
                sub_rows = sub.index.to_numpy()
                in_st = div_of_pt == d
                in_st[in_st] = st_of_pt == sid
                if len(sub) == 1:
                    self._leaves[sid] = ("leaf", int(sub_rows[0]))
                    continue
                share = sub.volume_mm3.to_numpy() / sub.volume_mm3.sum()
                layers = [s[len(name) :] for s in sub.substructure]
                if division == "Isocortex" and set(layers) <= set(CORTEX_LAYERS):
                    order = np.argsort([CORTEX_LAYERS.index(x) for x in layers])
                    cuts = np.cumsum(share[order])[:-1]
                    bounds = np.quantile(depth[in_st], cuts) if in_st.sum() else cuts * 0.2
                    self._leaves[sid] = ("layers", (bounds, sub_rows[order]))
                    continue
                sub_pts = pts[in_st]
                if len(sub_pts) < len(sub):
                    sub_pts = np.concatenate([sub_pts, self._structures[d].seeds[sid - ids[0]][None]])
                seeds = _kmeans_seeds(rng, sub_pts, len(sub))
                w = (
                    _fit_weights(sub_pts, seeds, np.arange(len(sub)), share)
                    if len(sub_pts) > len(sub)
                    else np.zeros(len(sub))
                )
                self._leaves[sid] = ("power", _PowerCells(seeds, w, sub_rows))

    # --------------------------------------------------------------------------------------- shape
    @staticmethod
    def profile(z: np.ndarray | float) -> np.ndarray:
        """In-plane scale of the brain at depth ``z`` mm (1 at mid depth, 0.5 at the ends)."""
        u = (np.asarray(z, dtype=float) - Z_CENTER) / Z_HALF
        return np.sqrt(np.clip(1.0 - 0.75 * u**2, 0.05, None))

    @classmethod
    def section_area(cls, z: float) -> float:
        """Relative cross-section area of the brain at depth ``z`` mm (for allocating cells to sections)."""
        return float(cls.profile(z) ** 2)

    @classmethod
    def normalised(cls, xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Normalised coordinates (|x|, y, z) in about [-1, 1] (n, 3) and the superellipse radius rho (n,)."""
        g = cls.profile(xyz[:, 2])
        nx = (xyz[:, 0] - CENTER[0]) / (SEMI_AXES[0] * g)
        ny = (xyz[:, 1] - CENTER[1]) / (SEMI_AXES[1] * g)
        rho = (np.abs(nx) ** SUPERELLIPSE_P + np.abs(ny) ** SUPERELLIPSE_P) ** (1 / SUPERELLIPSE_P)
        nu = (xyz[:, 2] - Z_CENTER) / Z_HALF
        return np.stack([np.abs(nx), ny, nu], axis=1), rho

    def sample_positions(self, rng: np.random.Generator, z: float, n: int) -> np.ndarray:
        """``n`` positions uniform inside the brain section at depth ``z`` mm; (n, 3) reconstructed mm."""
        half = SEMI_AXES * self.profile(z)
        out = np.empty((0, 2))
        while len(out) < n:
            cand = CENTER + rng.uniform(-1, 1, (max(2 * (n - len(out)), 64), 2)) * half
            _, rho = self.normalised(np.column_stack([cand, np.full(len(cand), z)]))
            out = np.concatenate([out, cand[rho < 1.0]])
        return np.column_stack([out[:n], np.full(n, z)])

    def _fit_points(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Warped normalised points uniform in the brain volume (one hemisphere) and their rho."""
        pts, rhos = [], []
        while sum(len(p) for p in pts) < FIT_POINTS:
            z = rng.uniform(Z_CENTER - Z_HALF, Z_CENTER + Z_HALF, FIT_POINTS)
            x = CENTER[0] + rng.uniform(0, 1, FIT_POINTS) * SEMI_AXES[0]
            y = CENTER[1] + rng.uniform(-1, 1, FIT_POINTS) * SEMI_AXES[1]
            p, rho = self.normalised(np.column_stack([x, y, z]))
            keep = rho < 1.0
            pts.append(p[keep] + WARP * self._warp(p[keep]))
            rhos.append(rho[keep])
        return np.concatenate(pts)[:FIT_POINTS], np.concatenate(rhos)[:FIT_POINTS]

    # --------------------------------------------------------------------------------------- regions
    def region_of(self, xyz: np.ndarray) -> np.ndarray:
        """Parcel row (n,) int64 of reconstructed points (n, 3) mm; 0 outside the brain."""
        p, rho = self.normalised(xyz)
        pw = p + WARP * self._warp(p)
        leaf = np.zeros(len(xyz), dtype=np.int64)
        inside = np.flatnonzero(rho < 1.0)
        division = self._divisions.assign(pw[inside])
        for d in np.unique(division):
            cells = inside[division == d]
            structure = self._structures[d].assign(pw[cells])
            for sid in np.unique(structure):
                here = cells[structure == sid]
                kind, spec = self._leaves[sid]
                if kind == "leaf":
                    leaf[here] = spec
                elif kind == "layers":
                    bounds, rows = spec
                    leaf[here] = rows[np.searchsorted(bounds, 1.0 - rho[here])]
                else:
                    leaf[here] = spec.assign(pw[here])
        return leaf


@functools.lru_cache(maxsize=1)
def brain_geometry() -> BrainGeometry:
    """The (seed-independent) geometry, built once per process."""
    return BrainGeometry()
