"""The biology behind the synthetic ABC release: brain shape, nested regions, cell-type taxonomy, expression.

:class:`BrainModel` is built once from a seed and then samples blocks of cells:

* **Space.** Millimetres in the MERFISH *reconstructed* frame of the real atlas: ``x`` left-right (0-11),
  ``y`` dorsal-ventral (0-11, dorsal = small y), ``z`` = ``0.2 * k`` anterior-posterior for section position ``k``
  (0-58 over the 59 real section labels). The brain is a superellipse in each section (about 10 x 8 mm at mid
  depth) that narrows towards both ends.
* **Regions.** division > structure > substructure with real CCF acronyms. Divisions are shells (cortex, corpus
  callosum, piriform) and a warped power diagram of seed points (deep nuclei); structures and substructures are
  warped Voronoi cells inside their parent, and cortical substructures are layers by depth. Boundaries are
  therefore sharp, smooth curves, and left/right mirror each other.
* **Taxonomy.** class > subclass > supertype > cluster with real-looking WMB names; subclasses have home regions,
  so cell-type proportions vary by division, structure and cortical layer.
* **Expression.** 500 genes + 50 ``Blank-NN`` barcodes. The log mean of a cluster is a baseline plus sparse
  combinatorial programs at each taxonomy level (a gene takes part in many programs, so no single gene names a
  type), plus weak division and structure effects; blanks are noise. Counts are Poisson with log-normal
  cell-gene noise, scaled by cell volume; ``log2`` is ``log2(counts * 100 / volume_um3 + 1)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

# The 59 real section numbers of MERFISH-C57BL6J-638850 (labels ``C57BL6J-638850.NN``), anterior to posterior.
SECTION_NUMBERS: tuple[int, ...] = (
    1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 35,
    36, 37, 38, 39, 40, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 54, 55, 56, 57, 58, 59, 60, 61, 62, 64, 66,
    67, 68, 69,
)
SECTION_SPACING_MM = 0.2
# Section numbers without reconstructed/CCF coordinates in the real release (reference section 2.3).
SECTIONS_WITHOUT_CCF = frozenset({1, 2, 3, 4, 68, 69})

N_GENES = 500
N_BLANKS = 50
LEVELS = ("division", "structure", "substructure")
TAXONOMY_LEVELS = ("neurotransmitter", "class", "subclass", "supertype", "cluster")

_CENTER = np.array([5.5, 5.3])  # brain centre in a section (x, y), mm
_SEMI_AXES = np.array([5.0, 3.9])  # superellipse semi-axes at mid depth (x, y), mm
_SUPERELLIPSE_P = 2.4
_Z_CENTER = SECTION_SPACING_MM * (len(SECTION_NUMBERS) - 1) / 2  # 5.8 mm
_Z_HALF = _Z_CENTER + 0.4  # brain half-length along z, mm

# ---------------------------------------------------------------------------------------------- regions
# (division, category, colour, [(structure, [substructures])]); "L:" marks cortical layers by depth.
_CORTEX_LAYERS = ("1", "2/3", "4", "5", "6a", "6b")
_LAYER_DEPTH = np.array([0.0, 0.1, 0.33, 0.46, 0.68, 0.93, 1.0])  # fractional cortical depth at layer bounds
_REGION_TREE: list[tuple[str, str, str, list[tuple[str, list[str]]]]] = [
    ("Isocortex", "grey", "#70FF71", [
        ("MOp", ["L:1", "L:2/3", "L:5", "L:6a", "L:6b"]),
        ("MOs", ["L:1", "L:2/3", "L:5", "L:6a", "L:6b"]),
        ("SSp-bfd", ["L:1", "L:2/3", "L:4", "L:5", "L:6a", "L:6b"]),
        ("SSp-ll", ["L:1", "L:2/3", "L:4", "L:5", "L:6a", "L:6b"]),
        ("SSs", ["L:1", "L:2/3", "L:4", "L:5", "L:6a", "L:6b"]),
        ("AUDp", ["L:1", "L:2/3", "L:4", "L:5", "L:6a", "L:6b"]),
        ("VISp", ["L:1", "L:2/3", "L:4", "L:5", "L:6a", "L:6b"]),
        ("RSPv", ["L:1", "L:2/3", "L:5", "L:6a", "L:6b"]),
        ("ACAd", ["L:1", "L:2/3", "L:5", "L:6a", "L:6b"]),
    ]),
    ("OLF", "grey", "#9AD2BD", [("MOB", []), ("AON", []), ("PIR", []), ("COAp", [])]),
    ("HPF", "grey", "#7ED04B", [
        ("CA1", []), ("CA2", []), ("CA3", []), ("DG", ["DG-mo", "DG-po", "DG-sg"]), ("SUB", []),
        ("ENTl", ["ENTl1", "ENTl2", "ENTl3", "ENTl5"]),
    ]),
    ("CTXsp", "grey", "#8ADA87", [
        ("CLA", []), ("EPd", []), ("LA", []), ("BLA", ["BLAa", "BLAp", "BLAv"]), ("BMA", ["BMAa", "BMAp"]),
    ]),
    ("STR", "grey", "#98D6F9", [
        ("CP", []), ("ACB", []), ("OT", []), ("LSr", []), ("CEA", ["CEAc", "CEAl", "CEAm"]), ("MEA", []),
    ]),
    ("PAL", "grey", "#8599CC", [("GPe", []), ("GPi", []), ("MS", []), ("NDB", []), ("SI", [])]),
    ("TH", "grey", "#FF7080", [
        ("VPM", []), ("VPL", []), ("LGd", ["LGd-co", "LGd-sh", "LGd-ip"]), ("MD", []), ("LP", []), ("PO", []),
        ("RT", []), ("AV", []), ("PF", []),
    ]),
    ("HY", "grey", "#E64438", [
        ("PVH", []), ("ARH", []), ("VMH", []), ("DMH", []), ("LHA", []), ("ZI", []), ("MM", []),
    ]),
    ("MB", "grey", "#FF64FF", [
        ("SCs", ["SCop", "SCsg", "SCzo"]), ("SCm", []), ("MRN", []), ("PAG", []), ("VTA", []), ("SNr", []),
        ("SNc", []), ("IC", ["ICc", "ICd", "ICe"]), ("APN", []),
    ]),
    ("P", "grey", "#FF9B88", [("PG", []), ("PRNr", []), ("TRN", []), ("NLL", []), ("PB", []), ("P-unassigned", [])]),
    ("MY", "grey", "#FF9BCD", [("IRN", []), ("MV", []), ("SPVI", []), ("NTS", []), ("GRN", []), ("MY-unassigned", [])]),
    ("CB", "grey", "#F0F080", [
        ("CUL", ["CUL4, 5"]), ("SIM", []), ("AN", ["ANcr1", "ANcr2"]), ("PFL", []), ("NOD", []), ("UVU", []),
        ("FN", []), ("IP", []), ("DN", []),
    ]),
    ("lfbs", "fiber tracts", "#CCCCCC", [("cc", ["ccb", "ccs", "fa"]), ("int", [])]),
    ("cbf", "fiber tracts", "#CCCCCC", [("arb", []), ("scp", []), ("mcp", [])]),
    ("VL", "VS", "#AAAAAA", [("VL", [])]),
]
_CATEGORY_COLOR = {"grey": "#BFDAE3", "fiber tracts": "#CCCCCC", "VS": "#AAAAAA"}
_ORGAN, _ORGAN_COLOR = "brain", "#FFFFFF"

# Deep divisions: seed points (|x|, y, z) in normalised brain coordinates and power-diagram weights.
_DEEP_SEEDS: list[tuple[str, tuple[float, float, float], float]] = [
    ("OLF", (0.25, 0.25, -0.9), 0.05),
    ("STR", (0.38, 0.05, -0.45), 0.06),
    ("PAL", (0.2, 0.4, -0.3), 0.0),
    ("CTXsp", (0.7, 0.5, -0.05), 0.0),
    ("HPF", (0.35, -0.35, 0.18), 0.04),
    ("HPF", (0.62, 0.15, 0.38), 0.0),
    ("TH", (0.15, -0.02, 0.02), 0.05),
    ("HY", (0.1, 0.6, -0.05), 0.02),
    ("MB", (0.15, -0.15, 0.45), 0.04),
    ("P", (0.15, 0.55, 0.58), 0.02),
    ("MY", (0.15, 0.45, 0.9), 0.04),
]

# ---------------------------------------------------------------------------------------------- taxonomy
# class -> [(subclass, {region tag: affinity})]; tags are division/structure/substructure acronyms or "L<layer>".
_GREY = ("Isocortex", "OLF", "HPF", "CTXsp", "STR", "PAL", "TH", "HY", "MB", "P", "MY", "CB")
_FIBERS = ("lfbs", "cbf")
_TAXONOMY: list[tuple[str, str, list[tuple[str, dict[str, float]]]]] = [
    ("01 IT-ET Glut", "Glut", [
        ("007 L2/3 IT CTX Glut", {"L2/3": 1.0}),
        ("006 L4/5 IT CTX Glut", {"L4": 1.0, "L5": 0.35}),
        ("022 L5 ET CTX Glut", {"L5": 0.8}),
        ("014 LA-BLA-BMA-PA Glut", {"LA": 1.0, "BLA": 1.0, "BMA": 0.8, "CLA": 0.3}),
        ("016 CA1-ProS Glut", {"CA1": 1.0, "SUB": 0.6}),
        ("017 CA3 Glut", {"CA3": 1.0, "CA2": 0.7}),
        ("009 L2/3 IT PIR-ENTl Glut", {"PIR": 0.8, "ENTl": 1.0, "AON": 0.4}),
        ("001 CLA-EPd-CTX Car3 Glut", {"CLA": 1.0, "EPd": 1.0, "L6a": 0.05}),
    ]),
    ("02 NP-CT-L6b Glut", "Glut", [
        ("030 L6 CT CTX Glut", {"L6a": 1.0}),
        ("032 L5 NP CTX Glut", {"L5": 0.3, "L6a": 0.15}),
        ("029 L6b CTX Glut", {"L6b": 1.0}),
    ]),
    ("04 DG-IMN Glut", "Glut", [
        ("037 DG Glut", {"DG": 1.0, "DG-sg": 1.5}),
        ("038 DG-PIR Ex IMN", {"DG-po": 0.5, "PIR": 0.2}),
    ]),
    ("05 OB-IMN GABA", "GABA", [("045 OB-STR-CTX Inh IMN", {"OLF": 0.6, "MOB": 1.2, "STR": 0.05})]),
    ("06 CTX-CGE GABA", "GABA", [
        ("046 Vip Gaba", {"Isocortex": 0.08, "CTXsp": 0.08, "HPF": 0.04, "L2/3": 0.12}),
        ("047 Sncg Gaba", {"Isocortex": 0.04, "CTXsp": 0.05, "HPF": 0.03}),
        ("049 Lamp5 Gaba", {"Isocortex": 0.05, "L1": 0.5, "CTXsp": 0.03}),
    ]),
    ("07 CTX-MGE GABA", "GABA", [
        ("052 Pvalb Gaba", {"Isocortex": 0.1, "CTXsp": 0.08, "HPF": 0.05}),
        ("053 Sst Gaba", {"Isocortex": 0.08, "CTXsp": 0.09, "HPF": 0.05}),
        ("051 Pvalb chandelier Gaba", {"Isocortex": 0.02, "CTXsp": 0.02}),
    ]),
    ("08 CNU-MGE GABA", "GABA", [
        ("057 NDB-SI-MA-STRv Lhx8 Gaba", {"PAL": 1.0, "MS": 0.6, "OT": 0.1}),
        ("058 PAL-STR Gaba-Chol", {"PAL": 0.5, "STR": 0.03}),
    ]),
    ("09 CNU-LGE GABA", "GABA", [
        ("061 STR D1 Gaba", {"CP": 1.0, "ACB": 1.0, "OT": 0.8}),
        ("062 STR D2 Gaba", {"CP": 1.0, "ACB": 0.9, "OT": 0.6}),
        ("064 STR-PAL Chst9 Gaba", {"CEA": 1.0, "LSr": 0.3}),
    ]),
    ("10 LSX GABA", "GABA", [("069 LSX Nkx2-1 Gaba", {"LSr": 1.0, "MS": 0.3})]),
    ("13 CNU-HYa Glut", "Glut", [("113 MEA-COA-BMA Ccdc42 Glut", {"MEA": 1.0, "COAp": 0.8, "BMA": 0.3})]),
    ("12 HY GABA", "GABA", [
        ("093 RT-ZI Gnrh1 Gaba", {"RT": 1.0, "ZI": 1.0}),
        ("083 HY Gaba", {"HY": 0.5, "ARH": 0.8}),
    ]),
    ("14 HY Glut", "Glut", [
        ("127 VMH Nr5a1 Glut", {"VMH": 1.0}),
        ("130 LHA Pmch Glut", {"LHA": 1.0, "ZI": 0.2}),
        ("124 PVH-SO-PVa Otp Glut", {"PVH": 1.0, "DMH": 0.4}),
        ("142 MM-Foxb1 Glut", {"MM": 1.0}),
    ]),
    ("18 TH Glut", "Glut", [
        ("151 TH Prkcd Grin2c Glut", {"VPM": 1.0, "VPL": 1.0, "LGd": 1.0, "LP": 0.8, "PO": 0.6}),
        ("154 PF Fzd5 Glut", {"PF": 1.0, "MD": 0.3}),
        ("149 PVT-PT Ntrk1 Glut", {"MD": 0.8, "AV": 0.6}),
    ]),
    ("19 MB Glut", "Glut", [
        ("200 SCs Dmbx1 Glut", {"SCs": 1.0, "SCm": 0.5}),
        ("203 MRN-APN Glut", {"MRN": 1.0, "APN": 1.0, "PAG": 0.5, "IC": 0.6}),
    ]),
    ("20 MB GABA", "GABA", [
        ("197 SNr Six3 Gaba", {"SNr": 1.0}),
        ("219 MB Pax7 Gaba", {"MB": 0.35, "IC": 0.5}),
    ]),
    ("21 MB Dopa", "Dopa", [("215 SNc-VTA-RAmb Foxa1 Dopa", {"SNc": 1.0, "VTA": 1.0})]),
    ("22 MB-HB Sero", "Sero", [("222 DR Sero", {"PAG": 0.1, "PRNr": 0.1})]),
    ("23 P Glut", "Glut", [
        ("240 PG-TRN-LRN Fat2 Glut", {"PG": 1.0, "TRN": 1.0}),
        ("245 PB Evx2 Glut", {"PB": 1.0, "NLL": 0.5}),
    ]),
    ("26 P GABA", "GABA", [("277 PRN-P Gaba", {"P": 0.4, "PRNr": 0.6})]),
    ("24 MY Glut", "Glut", [
        ("260 NTS Phox2b Glut", {"NTS": 1.0}),
        ("263 MDRN Hoxb5 Glut", {"MY": 0.4, "IRN": 0.6, "MV": 0.5}),
    ]),
    ("27 MY GABA", "GABA-Glyc", [("283 MY Lhx1 Gaba", {"MY": 0.4, "SPVI": 0.6, "GRN": 0.5})]),
    ("28 CB GABA", "GABA", [
        ("313 CBX Purkinje Gaba", {"CB": 0.15}),
        ("312 CBX MLI Cdh22 Gaba", {"CB": 0.2}),
    ]),
    ("29 CB Glut", "Glut", [
        ("314 CB Granule Glut", {"CB": 1.0}),
        ("317 CBN Dmbx1 Glut", {"FN": 1.0, "IP": 1.0, "DN": 1.0}),
    ]),
    ("30 Astro-Epen", "", [
        ("319 Astro-TE NN", {d: 1.0 for d in ("Isocortex", "OLF", "HPF", "CTXsp", "STR", "PAL")}),
        ("318 Astro-NT NN", {d: 1.0 for d in ("TH", "HY", "MB", "P", "MY", "CB", *_FIBERS)}),
        ("325 Ependymal NN", {"VL": 4.0}),
    ]),
    ("31 OPC-Oligo", "", [
        ("326 OPC NN", {d: 0.5 for d in (*_GREY, *_FIBERS)}),
        ("327 Oligo NN", {**{d: 1.0 for d in _GREY}, **{d: 8.0 for d in _FIBERS}}),
    ]),
    ("33 Vascular", "", [
        ("330 VLMC NN", {d: 0.2 for d in (*_GREY, "VL")}),
        ("331 Peri NN", {d: 0.4 for d in _GREY}),
        ("333 Endo NN", {d: 0.8 for d in (*_GREY, *_FIBERS)}),
    ]),
    ("34 Immune", "", [
        ("334 Microglia NN", {d: 0.8 for d in (*_GREY, *_FIBERS, "VL")}),
        ("335 BAM NN", {d: 0.08 for d in (*_GREY, "VL")}),
    ]),
]
_NT_COLOR = {"Glut": "#2B93DF", "GABA": "#FF3358", "GABA-Glyc": "#0a9964", "Dopa": "#fcf04b", "Sero": "#533691",
             "": "#666666"}
# Real marker genes added to every cluster of a class (a glimpse of biology; none names a class on its own).
_CLASS_MARKERS = {
    "Glut": ["Slc17a7", "Slc17a6"], "GABA": ["Gad1", "Gad2", "Slc32a1"], "GABA-Glyc": ["Gad2", "Slc6a5"],
    "Dopa": ["Slc6a3", "Th"], "Sero": ["Slc6a4", "Tph2"],
    "30 Astro-Epen": ["Aqp4", "Gfap"], "31 OPC-Oligo": ["Olig2", "Sox10"], "33 Vascular": ["Cldn5", "Flt1"],
    "34 Immune": ["Cx3cr1", "P2ry12"],
}
_REAL_SYMBOLS = (
    "Slc17a7 Slc17a6 Slc17a8 Gad1 Gad2 Slc32a1 Slc6a5 Slc6a3 Slc6a4 Th Tph2 Tac2 Aqp4 Gfap Olig2 Sox10 Cldn5 Flt1 "
    "Cx3cr1 P2ry12 Pvalb Sst Vip Lamp5 Sncg Htr1b Htr1d Htr2a Htr3a Htr7 Adra1a Adra1b Drd1 Drd2 Drd3 Drd5 Prkcq "
    "Mog Opalin Pdgfra Dcn Foxp2 Cux2 Rorb Fezf2 Bcl11b Tbr1 Satb2 Nr4a2 Prox1 Calb1 Calb2 Penk Tac1 Chat Lhx6 "
    "Lhx8 Six3 Otp Sim1 Pmch Hcrt Nr5a1 Foxb1 Gnrh1 Pax6 Pax7 Dmbx1 Phox2b Hoxb5 Lhx1 Evx2 Fat2 Gabra6 Pcp2 Car8 "
    "Cbln1 Ntrk1 Grin2c Fzd5 Ccdc42 Chst9 Nkx2-1 Car3 Cartpt Crh Trh Avp Oxt Gal Npy Agrp Pomc Kiss1 Esr1 Ar"
).split()


# ---------------------------------------------------------------------------------------------- helpers
def _hex_color(rgb: np.ndarray, lower: bool) -> str:
    """``#RRGGBB`` from three 0-255 ints, upper or lower case (the real files mix both)."""
    text = "#{:02X}{:02X}{:02X}".format(*(int(v) for v in np.clip(rgb, 0, 255)))
    return text.lower() if lower else text


def _jitter_color(base: str, rng: np.random.Generator, spread: float = 50.0) -> str:
    rgb = np.array([int(base[i : i + 2], 16) for i in (1, 3, 5)], dtype=float) + rng.normal(0, spread, 3)
    return _hex_color(rgb, lower=bool(rng.random() < 0.4))


def _random_color(rng: np.random.Generator) -> str:
    return _hex_color(rng.integers(0, 256, 3), lower=bool(rng.random() < 0.4))


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


# ---------------------------------------------------------------------------------------------- model
@dataclass
class CellBlock:
    """One block of simulated cells (n cells, all in one section).

    ``xyz`` (n, 3) reconstructed mm; ``leaf`` (n,) row into :attr:`BrainModel.parcellation`; ``cluster`` (n,) row
    into :attr:`BrainModel.taxonomy`; ``indptr`` (n + 1,) int64, ``indices`` (nnz,) int32 gene columns,
    ``counts`` (nnz,) float64 integer-valued raw counts, ``log2`` (nnz,) float64 log2(CPV + 1).
    """

    xyz: np.ndarray
    leaf: np.ndarray
    cluster: np.ndarray
    indptr: np.ndarray
    indices: np.ndarray
    counts: np.ndarray
    log2: np.ndarray


class BrainModel:
    """A seeded synthetic mouse brain: region geometry, taxonomy, genes and their expression programs.

    Tables (pandas, built once): :attr:`parcellation` (one row per leaf region: ``parcellation_index``, the five
    term levels, their ``*_color`` and the cortical ``layer``; row 0 = ``unassigned``), :attr:`taxonomy` (one row
    per cluster: ``cluster_alias``, the five levels, their ``*_color`` and the subclass ``homes`` affinities),
    :attr:`genes` (550 rows of gene.csv: 500 genes then 50 blanks).
    """

    def __init__(self, seed: int) -> None:
        rng = np.random.default_rng([seed, 0xB7A1])
        self._warp = _SmoothField.random(rng, 3, scale=2.0)
        self._shell_noise = _SmoothField.random(rng, 2, scale=3.0)
        self.parcellation = self._build_parcellation(rng)
        self._build_region_seeds(rng)
        self.taxonomy = self._build_taxonomy(rng)
        self._weights_cum = self._build_region_type_weights(rng)
        self.genes = self._build_genes(rng)
        self._log_mean = self._build_expression_programs(rng)
        self._region_effect = self._build_region_effects(rng)

    # --------------------------------------------------------------------------------------- geometry
    @staticmethod
    def _profile(z: np.ndarray | float) -> np.ndarray:
        """In-plane scale of the brain at depth ``z`` mm (1 at mid depth, 0.5 at the ends)."""
        u = (np.asarray(z, dtype=float) - _Z_CENTER) / _Z_HALF
        return np.sqrt(np.clip(1.0 - 0.75 * u**2, 0.05, None))

    @classmethod
    def section_area(cls, z: float) -> float:
        """Relative cross-section area of the brain at depth ``z`` mm (for allocating cells to sections)."""
        return float(cls._profile(z) ** 2)

    def _normalised(self, xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Normalised coordinates (|x|, y, z) in about [-1, 1] (n, 3) and the superellipse radius rho (n,)."""
        g = self._profile(xyz[:, 2])
        nx = (xyz[:, 0] - _CENTER[0]) / (_SEMI_AXES[0] * g)
        ny = (xyz[:, 1] - _CENTER[1]) / (_SEMI_AXES[1] * g)
        rho = (np.abs(nx) ** _SUPERELLIPSE_P + np.abs(ny) ** _SUPERELLIPSE_P) ** (1 / _SUPERELLIPSE_P)
        nu = (xyz[:, 2] - _Z_CENTER) / _Z_HALF
        return np.stack([np.abs(nx), ny, nu], axis=1), rho

    def sample_positions(self, rng: np.random.Generator, z: float, n: int) -> np.ndarray:
        """``n`` positions uniform inside the brain section at depth ``z`` mm; (n, 3) reconstructed mm."""
        half = _SEMI_AXES * self._profile(z)
        out = np.empty((0, 2))
        while len(out) < n:
            cand = _CENTER + rng.uniform(-1, 1, (max(2 * (n - len(out)), 64), 2)) * half
            _, rho = self._normalised(np.column_stack([cand, np.full(len(cand), z)]))
            out = np.concatenate([out, cand[rho < 1.0]])
        return np.column_stack([out[:n], np.full(n, z)])

    # --------------------------------------------------------------------------------------- regions
    def _build_parcellation(self, rng: np.random.Generator) -> pd.DataFrame:
        rows = [dict(organ="unassigned", category="unassigned", division="unassigned", structure="unassigned",
                     substructure="unassigned", **{f"{lvl}_color": "#000000" for lvl in
                                                   ("organ", "category", *LEVELS)})]
        for division, category, div_color, structures in _REGION_TREE:
            for structure, subs in structures:
                st_color = _jitter_color(div_color, rng)
                for sub in subs or [structure]:
                    name = f"{structure}{sub[2:]}" if sub.startswith("L:") else sub
                    rows.append(dict(
                        organ=_ORGAN, category=category, division=division, structure=structure, substructure=name,
                        organ_color=_ORGAN_COLOR, category_color=_CATEGORY_COLOR[category],
                        division_color=div_color if rng.random() < 0.6 else div_color.lower(),
                        structure_color=st_color,
                        substructure_color=st_color if name == structure else _jitter_color(st_color, rng, 30),
                    ))
        table = pd.DataFrame(rows)
        # Real indices are sparse integers in tree order (0 = unassigned).
        gaps = rng.integers(1, 4, len(table) - 1)
        table.insert(0, "parcellation_index", np.concatenate([[0], np.cumsum(gaps)]).astype(np.int64))
        table["layer"] = [
            sub[len(st):] if div == "Isocortex" else ""
            for div, st, sub in zip(table.division, table.structure, table.substructure)
        ]
        return table

    def _deep_division(self, p: np.ndarray) -> np.ndarray:
        """Division name per point from the warped power diagram of deep seeds; p (n, 3) normalised."""
        seeds = np.array([s for _, s, _ in _DEEP_SEEDS])
        weights = np.array([w for *_, w in _DEEP_SEEDS])
        scale = np.array([1.0, 1.0, 0.7])  # z distances count less: divisions are elongated front to back
        d2 = (((p[:, None, :] - seeds[None]) * scale) ** 2).sum(-1) - weights[None]
        return np.array([d for d, *_ in _DEEP_SEEDS])[np.argmin(d2, axis=1)]

    def _division_of(self, p: np.ndarray, rho: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Division name (n,) and fractional cortical depth (n,) of normalised points (warp applied by caller)."""
        noise = self._shell_noise(p)
        depth = 1.0 - rho + 0.02 * noise[:, 0]
        cortex_thick = 0.2 + 0.03 * noise[:, 1]
        division = self._deep_division(p)
        dorsal = p[:, 1] < 0.45 - 0.25 * p[:, 0] ** 2 + 0.5 * p[:, 0]
        mid = (p[:, 2] > -0.78) & (p[:, 2] < 0.5)
        posterior = p[:, 2] >= 0.5
        cortex = dorsal & mid & (depth < cortex_thick)
        cc = dorsal & mid & ~cortex & (depth < cortex_thick + 0.045) & (p[:, 1] < 0.25)
        piriform = ~dorsal & mid & (depth < 0.12) & (p[:, 2] < 0.2) & (p[:, 0] > 0.35)
        cb = posterior & (p[:, 1] < 0.3 + 0.3 * (p[:, 2] - 0.5))
        cbf = cb & (depth > 0.3 + 0.05 * noise[:, 1])
        ventricle = (((p - np.array([0.2, -0.02, -0.2])) / np.array([0.035, 0.14, 0.35])) ** 2).sum(1) < 1.0
        division = np.where(ventricle, "VL", division)
        division = np.where(p[:, 2] < -0.8 + 0.04 * noise[:, 0], "OLF", division)  # olfactory bulb
        division = np.where(piriform, "OLF", division)
        division = np.where(cb, np.where(cbf, "cbf", "CB"), division)
        division = np.where(cc, "lfbs", division)
        division = np.where(cortex, "Isocortex", division)
        return division, np.clip(depth / cortex_thick, 0.0, 1.0)

    def _build_region_seeds(self, rng: np.random.Generator) -> None:
        """Structure and substructure seed points, drawn from points inside each parent region."""
        z = rng.uniform(_Z_CENTER - _Z_HALF, _Z_CENTER + _Z_HALF, 60_000)
        xy = _CENTER + rng.uniform(-1, 1, (len(z), 2)) * _SEMI_AXES
        p, rho = self._normalised(np.column_stack([xy, z]))
        keep = rho < 1.0
        p, rho = p[keep], rho[keep]
        pw = p + 0.08 * self._warp(p)
        division, _ = self._division_of(pw, rho)
        table = self.parcellation
        self._structure_seeds: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._sub_seeds: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._layer_rows: dict[str, np.ndarray] = {}
        self._single_row: dict[str, int] = {}
        structure = np.full(len(p), "", dtype=object)
        for div, rows in table.iloc[1:].groupby("division", sort=False):
            names = rows.structure.unique()
            pts = pw[division == div]
            seeds = pts[rng.choice(len(pts), len(names), replace=False)]
            self._structure_seeds[div] = (seeds, names)
            structure[division == div] = names[self._nearest(pts, seeds)]
        for st, rows in table.iloc[1:].groupby("structure", sort=False):
            if (rows.layer != "").any():
                # Row per cortical layer; layers a structure lacks (no L4 in agranular areas) join the one above.
                present = [_CORTEX_LAYERS.index(x) for x in rows.layer]
                self._layer_rows[st] = rows.index.to_numpy()[
                    np.searchsorted(present, np.arange(len(_CORTEX_LAYERS)), side="right") - 1]
                continue
            if len(rows) == 1:
                self._single_row[st] = int(rows.index[0])
                continue
            pts = pw[structure == st]
            pick = rng.choice(len(pts), len(rows), replace=len(pts) < len(rows))
            self._sub_seeds[st] = (pts[pick], rows.index.to_numpy())

    @staticmethod
    def _nearest(pts: np.ndarray, seeds: np.ndarray) -> np.ndarray:
        scale = np.array([1.0, 1.0, 0.6])
        return np.argmin((((pts[:, None, :] - seeds[None]) * scale) ** 2).sum(-1), axis=1)

    def region_of(self, xyz: np.ndarray) -> np.ndarray:
        """Leaf region (row of :attr:`parcellation`, 0 = outside the brain) of reconstructed points (n, 3) mm."""
        p, rho = self._normalised(xyz)
        pw = p + 0.08 * self._warp(p)
        division, depth = self._division_of(pw, rho)
        leaf = np.zeros(len(xyz), dtype=np.int64)
        for div, (seeds, names) in self._structure_seeds.items():
            in_div = np.flatnonzero(division == div)
            if not len(in_div):
                continue
            st_idx = self._nearest(pw[in_div], seeds)
            for j, st in enumerate(names):
                cells = in_div[st_idx == j]
                if st in self._sub_seeds:
                    sub_seeds, sub_rows = self._sub_seeds[st]
                    leaf[cells] = sub_rows[self._nearest(pw[cells], sub_seeds)]
                elif st in self._layer_rows:
                    layer = np.searchsorted(_LAYER_DEPTH, depth[cells], side="right") - 1
                    leaf[cells] = self._layer_rows[st][np.clip(layer, 0, len(_CORTEX_LAYERS) - 1)]
                else:
                    leaf[cells] = self._single_row[st]
        leaf[rho >= 1.0] = 0
        return leaf

    # --------------------------------------------------------------------------------------- taxonomy
    def _build_taxonomy(self, rng: np.random.Generator) -> pd.DataFrame:
        rows = []
        for class_name, nt, subclasses in _TAXONOMY:
            class_color = _random_color(rng)
            for subclass, homes in subclasses:
                number, base = subclass.split(" ", 1)
                sub_color = _jitter_color(class_color, rng, 40)
                for i in range(int(rng.integers(1, 4))):
                    supertype = f"{round(int(number) * 3.55) + i:04d} {base}_{i + 1}"
                    sup_color = _jitter_color(sub_color, rng, 25)
                    for j in range(int(rng.integers(1, 4))):
                        cl_nt = nt
                        if nt == "Glut" and rng.random() < 0.08:
                            cl_nt = "Glut-GABA"
                        rows.append(dict(
                            neurotransmitter=cl_nt, **{"class": class_name}, subclass=subclass, supertype=supertype,
                            cluster=f"{round(int(number) * 13.5) + 3 * i + j:04d} {base}_{i + 1}",
                            neurotransmitter_color=_NT_COLOR.get(cl_nt, "#1d9db3"), class_color=class_color,
                            subclass_color=sub_color, supertype_color=sup_color,
                            cluster_color=_jitter_color(sup_color, rng, 15), homes=homes,
                        ))
        table = pd.DataFrame(rows)
        alias = 1 + np.sort(rng.choice(34_380, len(table), replace=False))
        table.insert(0, "cluster_alias", alias.astype(np.int64))
        return table

    def _build_region_type_weights(self, rng: np.random.Generator) -> np.ndarray:
        """Cumulative cluster probabilities per leaf region, (n_leaves, n_clusters)."""
        table, tax = self.parcellation, self.taxonomy
        neuronal = (tax["class"].str[:2].astype(int) < 30).to_numpy()
        base = rng.gamma(2.0, 1.0, len(tax))  # cluster abundance within its subclass
        # Structure-level modulation: proportions differ between structures of one division.
        mod = {st: rng.lognormal(0.0, 0.6, len(tax)) for st in table.structure.unique()}
        weights = np.zeros((len(table), len(tax)))
        for r, row in table.iterrows():
            if r == 0:
                weights[r] = base * ~neuronal
            else:
                tags = {row.division, row.structure, row.substructure}
                if row.layer:
                    tags.add(f"L{row.layer}")
                aff = np.array([max((w for t, w in homes.items() if t in tags), default=0.0) for homes in tax.homes])
                w = aff * base * mod[row.structure]
                f_neuronal = {"grey": 0.65, "fiber tracts": 0.03, "VS": 0.0}[row.category]
                parts = [(neuronal, f_neuronal), (~neuronal, 1.0 - f_neuronal)]
                weights[r] = sum(frac * np.where(mask, w, 0) / max(np.where(mask, w, 0).sum(), 1e-12)
                                 for mask, frac in parts)
        cum = np.cumsum(weights, axis=1)
        return cum / cum[:, -1:]

    def sample_clusters(self, rng: np.random.Generator, leaf: np.ndarray) -> np.ndarray:
        """Cluster row per cell given its leaf region (n,) -> (n,) int64."""
        u = rng.random(len(leaf))
        out = np.empty(len(leaf), dtype=np.int64)
        for r in np.unique(leaf):
            sel = leaf == r
            out[sel] = np.searchsorted(self._weights_cum[r], u[sel], side="right")
        return np.minimum(out, len(self.taxonomy) - 1)

    # --------------------------------------------------------------------------------------- genes
    def _build_genes(self, rng: np.random.Generator) -> pd.DataFrame:
        gm = 10_000 + rng.choice(90_000, N_GENES - len(_REAL_SYMBOLS), replace=False)
        symbols = list(_REAL_SYMBOLS) + [f"Gm{n}" for n in gm]
        ids = 10_000 + rng.choice(110_000, N_GENES, replace=False)
        tx = 10_000 + rng.choice(230_000, N_GENES, replace=False)
        ncbi = 11_000 + rng.choice(110_000_000, N_GENES, replace=False)
        genes = pd.DataFrame({
            "gene_identifier": [f"ENSMUSG{n:011d}" for n in ids],
            "gene_symbol": symbols,
            "transcript_identifier": [f"ENSMUST{n:011d}" for n in tx],
            "name": [f"predicted gene {s[2:]}" if s.startswith("Gm") else f"{s} (synthetic profile)"
                     for s in symbols],
            "mapped_ncbi_identifier": [f"NCBIGene:{n}" for n in ncbi],
        })
        blanks = [f"Blank-{i:02d}" for i in range(1, N_BLANKS + 1)]
        blank_rows = pd.DataFrame({"gene_identifier": blanks, "gene_symbol": blanks, "transcript_identifier": blanks,
                                   "name": np.nan, "mapped_ncbi_identifier": np.nan})
        return pd.concat([genes, blank_rows], ignore_index=True)

    def _build_expression_programs(self, rng: np.random.Generator) -> np.ndarray:
        """Log mean counts per (cluster, gene) at the reference cell volume, (n_clusters, 550) float32."""
        tax = self.taxonomy
        n_all = N_GENES + N_BLANKS
        log_mean = np.empty((len(tax), n_all))
        log_mean[:, :N_GENES] = rng.normal(-1.8, 0.9, N_GENES)[None]
        log_mean[:, N_GENES:] = np.log(0.03)
        symbol_col = {s: i for i, s in enumerate(self.genes.gene_symbol[:N_GENES])}
        # (level, genes per program, mean effect, sd): combinatorial programs, shared genes across types.
        for level, n_genes, mu, sd in (("class", 40, 1.6, 0.5), ("subclass", 24, 1.3, 0.4),
                                       ("supertype", 12, 1.0, 0.3), ("cluster", 6, 0.8, 0.3)):
            for idx in tax.groupby(level, sort=False).indices.values():
                genes = rng.choice(N_GENES, n_genes, replace=False)
                effect = rng.normal(mu, sd, n_genes) * np.where(rng.random(n_genes) < 0.15, -0.5, 1.0)
                log_mean[np.ix_(idx, genes)] += effect
        for key, markers in _CLASS_MARKERS.items():
            col = "class" if key[:2].isdigit() else "neurotransmitter"
            idx = np.flatnonzero(tax[col].str.startswith(key) if col == "neurotransmitter" else tax[col] == key)
            log_mean[np.ix_(idx, [symbol_col[m] for m in markers])] += 3.0
        return log_mean.astype(np.float32)

    def _build_region_effects(self, rng: np.random.Generator) -> np.ndarray:
        """Weak log-mean effects per (leaf region, gene), (n_leaves, 550) float32: division and structure programs."""
        table = self.parcellation
        effect = np.zeros((len(table), N_GENES + N_BLANKS), dtype=np.float32)
        for level, n_genes, sd in (("division", 30, 0.45), ("structure", 12, 0.35)):
            for rows in table.iloc[1:].groupby(level, sort=False).indices.values():
                genes = rng.choice(N_GENES, n_genes, replace=False)
                effect[np.ix_(rows + 1, genes)] += rng.normal(0, sd, n_genes).astype(np.float32)
        return effect

    # --------------------------------------------------------------------------------------- cells
    def sample_block(self, rng: np.random.Generator, z: float, n: int) -> CellBlock:
        """Simulate ``n`` cells of the section at depth ``z`` mm (see :class:`CellBlock`)."""
        xyz = self.sample_positions(rng, z, n)
        leaf = self.region_of(xyz)
        cluster = self.sample_clusters(rng, leaf)
        volume = rng.lognormal(np.log(140.0), 0.35, n)  # cell volume, um^3
        log_mu = self._log_mean[cluster] + self._region_effect[leaf]
        log_mu += rng.standard_normal(log_mu.shape, dtype=np.float32) * np.float32(0.6)
        log_mu += np.log(volume / 140.0).astype(np.float32)[:, None]
        counts = rng.poisson(np.exp(log_mu, out=log_mu))
        rows, cols = np.nonzero(counts)
        values = counts[rows, cols].astype(np.float64)
        indptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])
        log2 = np.log2(values * (100.0 / volume[rows]) + 1.0)
        return CellBlock(xyz, leaf, cluster, indptr, cols.astype(np.int32), values, log2)
