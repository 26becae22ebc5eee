"""Cell types, where they lie and what they express in the synthetic ABC release, with a MERFISH measurement model.

:class:`BrainModel` is built from a seed and the z of the sections to simulate, then samples blocks of cells:

* **Vocabularies** are real: the clusters, supertypes, subclasses, classes and neurotransmitters of the
  whole-mouse-brain taxonomy CCN20230722, the 688 Allen-CCF-2020 parcels with their ``parcellation_index`` and
  colours, and 500 real MERFISH panel genes (+ 50 ``Blank-NN``). A small atlas uses a seed-chosen subset of
  clusters (:func:`default_n_clusters`), chosen by supertype among those expected in the simulated sections,
  with every division present covered (:meth:`BrainModel._choose_clusters`).
* **Places.** Positions are uniform in the brain (:mod:`synthetic_geometry`); a cell's cluster is drawn from
  P(cluster | parcel) proportional to the cluster's abundance (10x cell count) x its real CCF frequency in that
  parcel (fine acronym frequencies, plus :data:`BROAD_SHARE` x the broad-division frequencies spread by volume).
* **Expression.** The log mean of a cluster is a gene baseline plus programs shared down the hierarchy: the real
  MERFISH markers of each class, subclass and supertype (weighted by how many of its clusters list them), the
  cluster's own markers, and random sibling programs; weak division and structure effects add place.
  For the 11 genes of the real basolateral-amygdala excerpt, the subclasses found there take the real
  detection rate (the zero fraction is inverted through the measurement model).
* **Measurement** (MERFISH): expected counts scale with cell volume and a per-section, per-gene detection
  efficiency; each cell picks up :data:`SPILL_FRACTION` of the transcripts of the cells within
  :data:`SPILL_RADIUS_UM` (segmentation spillover; the neighbourhood is estimated from the nearest simulated
  cells); counts are Poisson with log-normal cell-gene noise; ``log2`` is ``log2(counts * 100 / volume_um3 + 1)``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.spatial import cKDTree

from abc_pipeline.atlas import synthetic_tables
from abc_pipeline.atlas.synthetic_geometry import BrainGeometry, brain_geometry

N_GENES = synthetic_tables.N_PANEL_GENES
N_BLANKS = 50
TAXONOMY_LEVELS = ("neurotransmitter", "class", "subclass", "supertype", "cluster")
NON_NEURONAL_CLASSES = ("30 Astro-Epen", "31 OPC-Oligo", "32 OEC", "33 Vascular", "34 Immune")

# Placement.
BROAD_SHARE = 0.3  # weight of the broad-division frequencies (spread by volume) beside the fine acronyms
NON_NEURONAL_BOOST = 1.5  # 10x under-samples glia and vascular cells: x1.5 gives ~43 % non-neuronal cells
CLUSTERS_PER_SUPERTYPE = 3  # at most, in a subset
# Broad regions of ccf_broad_freq that are not CCF divisions: (division, its structures).
_BROAD_REGIONS = {
    "HIP": ("HPF", {"CA1", "CA2", "CA3", "DG", "FC", "IG"}),
    "RHP": ("HPF", {"APr", "ENTl", "ENTm", "HATA", "HPF-unassigned", "PAR", "POST", "PRE", "ProS", "SUB"}),
    "STRd": ("STR", {"CP", "STR-unassigned"}),
    "STRv": ("STR", {"ACB", "FS", "OT"}),
    "LSX": ("STR", {"LSc", "LSr", "LSv", "SF", "SH"}),
    "sAMY": ("STR", {"AAA", "BA", "CEA", "IA", "MEA"}),
}

# Expression (natural-log units of the mean count at the reference volume).
BASE_MEAN, BASE_SD = -1.7, 1.1  # gene baselines
PROGRAM_EFFECTS = {"class": 2.2, "subclass": 1.8, "supertype": 0.8}  # x marker share (normalised to 1 at the top)
CLUSTER_MARKER_EFFECT = 0.8
SIBLING_PROGRAMS = {"subclass": (12, 0.7, 0.3), "supertype": (8, 0.5, 0.3)}  # genes, mean, sd
CLUSTER_NOISE_SD = 0.1
REGION_EFFECTS = {"division": (30, 0.35), "structure": (12, 0.3)}  # genes, sd
BLANK_LOG_MEAN = np.log(0.02)

# Measurement.
REFERENCE_VOLUME_UM3 = 125.0
VOLUME_LOG_SD = 0.35
CELL_GENE_NOISE_SD = 0.8
SECTION_EFFICIENCY_SD = 0.15
SPILL_RADIUS_UM = 10.0
REAL_DENSITY_PER_MM2 = 1600.0  # ~4.3 M cells over 59 sections of ~45 mm2
SPILL_FRACTION = 0.1  # of each neighbour's transcripts within SPILL_RADIUS_UM
SPILL_NEIGHBOURS = 6  # simulated cells that estimate the local expression
_SPILL = SPILL_FRACTION * np.pi * (SPILL_RADIUS_UM / 1000) ** 2 * REAL_DENSITY_PER_MM2


def default_n_clusters(n_cells: int) -> int:
    """Clusters simulated for ``n_cells``: about one per 150 cells, at least 16, at most all 5,322."""
    return int(np.clip(round(n_cells / 150), 16, len(synthetic_tables.clusters())))


# ---------------------------------------------------------------------------------------------- colours
def _hex_color(rgb: np.ndarray, lower: bool) -> str:
    """``#RRGGBB`` from three 0-255 ints, upper or lower case (the real files mix both)."""
    text = "#{:02X}{:02X}{:02X}".format(*(int(v) for v in np.clip(rgb, 0, 255)))
    return text.lower() if lower else text


def _jitter_color(base: str, rng: np.random.Generator, spread: float) -> str:
    rgb = np.array([int(base[i : i + 2], 16) for i in (1, 3, 5)], dtype=float) + rng.normal(0, spread, 3)
    return _hex_color(rgb, lower=bool(rng.random() < 0.4))


_NT_COLOR = {
    "Glut": "#2B93DF",
    "GABA": "#FF3358",
    "GABA-Glyc": "#0a9964",
    "Dopa": "#fcf04b",
    "Sero": "#533691",
    "Glut-GABA": "#1d9db3",
    "Chol": "#73E785",
    "Nora": "#FF6F00",
    "Hist": "#c4b7a6",
    "": "#666666",
}


# ---------------------------------------------------------------------------------------------- real tables
@functools.lru_cache(maxsize=1)
def placement_frequencies() -> np.ndarray:
    """f[parcel row, cluster] (688, 5322) float32: the share of each real cluster's cells in each parcel.

    Fine acronym frequencies go to the parcels of that substructure, structure or division (by volume); the
    broad-division frequencies, weighted :data:`BROAD_SHARE`, are spread over their divisions by volume
    (``NA`` = fibre tracts, ventricles and unassigned brain).
    """
    par, tax = synthetic_tables.parcellation(), synthetic_tables.clusters()
    volume = par.volume_mm3.to_numpy().copy()
    volume[0] = 0.0
    spread: dict[str, np.ndarray] = {}
    for level in ("division", "structure", "substructure"):  # later levels win on shared names
        for name, rows in par.iloc[1:].groupby(level).indices.items():
            w = np.zeros(len(par))
            w[rows + 1] = volume[rows + 1]
            spread[name] = w / max(w.sum(), 1e-12)
    broad = {name: spread[name] for name in spread if name in set(par.division)}
    for name, (division, structures) in _BROAD_REGIONS.items():
        w = np.where((par.division == division) & par.structure.isin(structures), volume, 0.0)
        broad[name] = w / w.sum()
    w = np.where(par.category.isin(["fiber tracts", "VS", "brain-unassigned"]), volume, 0.0)
    broad["NA"] = w / w.sum()
    grey = np.where(par.category == "grey", volume, 0.0)
    f = np.zeros((len(par), len(tax)), dtype=np.float32)
    for c, (fine, coarse) in enumerate(zip(tax.ccf_acronym_freq, tax.ccf_broad_freq)):
        col = np.zeros(len(par))
        for name, freq in synthetic_tables.parse_frequencies(fine).items():
            if name in spread:
                col += freq * spread[name]
        for name, freq in synthetic_tables.parse_frequencies(coarse).items():
            if name in broad:
                col += BROAD_SHARE * freq * broad[name]
        f[:, c] = col if col.sum() > 0 else grey / grey.sum()
    return f


@functools.lru_cache(maxsize=1)
def _marker_matrix() -> np.ndarray:
    """(5322, 500) float32: 1 where a gene of the panel is one of the cluster's real MERFISH markers."""
    column = {g: i for i, g in enumerate(synthetic_tables.panel_genes())}
    m = np.zeros((len(synthetic_tables.clusters()), N_GENES), dtype=np.float32)
    for c, text in enumerate(synthetic_tables.clusters().merfish_markers):
        for g in text.split(","):
            if g in column:
                m[c, column[g]] = 1.0
    return m


def _zero_fraction_curve(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(log mean grid, P(count = 0)) of the measurement model without spillover, for inverting zero fractions."""
    n = 20_000
    mult = (
        rng.lognormal(0.0, VOLUME_LOG_SD, n)
        * rng.lognormal(0.0, CELL_GENE_NOISE_SD, n)
        * rng.lognormal(0.0, SECTION_EFFICIENCY_SD, n)
    )
    grid = np.linspace(-8.0, 6.0, 281)
    p0 = np.exp(-np.exp(grid)[:, None] * mult[None]).mean(1)
    return grid, p0


# ---------------------------------------------------------------------------------------------- cells
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
    """A seeded synthetic mouse brain for the sections at ``section_z`` (mm).

    Tables (pandas): :attr:`parcellation` (the 688 real parcels: ``parcellation_index``, the five term levels and
    their ``*_color``; row 0 = ``unassigned``), :attr:`taxonomy` (one row per simulated cluster:
    ``cluster_alias``, the five levels and their ``*_color``), :attr:`genes` (550 rows of gene.csv: 500 panel
    genes then 50 blanks).
    """

    def __init__(self, seed: int, section_z: list[float] | np.ndarray, n_clusters: int) -> None:
        rng = np.random.default_rng([seed, 0xB7A1])
        self.geometry: BrainGeometry = brain_geometry()
        self.parcellation = self.geometry.table
        self.genes = self._build_genes()
        real = synthetic_tables.clusters()
        neuronal = ~real["class"].isin(NON_NEURONAL_CLASSES).to_numpy()
        abundance = real.n_cells_10xv3.to_numpy() * np.where(neuronal, 1.0, NON_NEURONAL_BOOST)
        p_full = placement_frequencies() * abundance[None].astype(np.float32)
        p_full /= np.maximum(p_full.sum(1, keepdims=True), 1e-30)
        leaf_share = self._leaf_share(np.random.default_rng([seed, 0x5EC]), np.asarray(section_z, dtype=float))
        self._rows = self._choose_clusters(rng, p_full, leaf_share, n_clusters)
        self.taxonomy = self._build_taxonomy(rng, real)
        weights = self._subset_weights(p_full, neuronal, abundance)
        cum = np.cumsum(weights, axis=1)
        self._weights_cum = cum / cum[:, -1:]
        self._zero_curve = _zero_fraction_curve(np.random.default_rng(0x2E80))
        self._log_mean = self._build_expression(rng, real)
        self._region_effect = self._build_region_effects(rng)
        self._seed = seed

    # --------------------------------------------------------------------------------------- taxonomy
    def _leaf_share(self, rng: np.random.Generator, section_z: np.ndarray) -> np.ndarray:
        """Share of the simulated sections' cells per parcel (688,), from 3,000 sample positions per section."""
        leaves = [self.geometry.region_of(self.geometry.sample_positions(rng, z, 3000)) for z in section_z]
        weights = np.repeat([BrainGeometry.section_area(z) for z in section_z], 3000)
        share = np.bincount(np.concatenate(leaves), weights=weights, minlength=len(self.parcellation))
        return share / share.sum()

    def _choose_clusters(
        self, rng: np.random.Generator, p_full: np.ndarray, leaf_share: np.ndarray, n_clusters: int
    ) -> np.ndarray:
        """Rows of the real cluster table to simulate, ascending.

        All clusters when ``n_clusters`` >= 5,322. Otherwise whole supertypes (their up to
        :data:`CLUSTERS_PER_SUPERTYPE` most expected clusters): first the most expected supertype of every division
        holding >= 1 % of the cells and of the astrocyte and oligodendrocyte classes, then supertypes drawn without
        replacement with probability ~ sqrt(expected cells) until ``n_clusters`` is reached.
        """
        real = synthetic_tables.clusters()
        if n_clusters >= len(real):
            return np.arange(len(real))
        expected = leaf_share @ p_full  # (5322,) expected share of cells per cluster
        supertype = real.supertype.to_numpy()
        chosen: list[int] = []
        taken: set[str] = set()

        def take(name: str) -> None:
            if name in taken:
                return
            taken.add(name)
            rows = np.flatnonzero(supertype == name)
            rows = rows[np.argsort(-expected[rows], kind="stable")][:CLUSTERS_PER_SUPERTYPE]
            chosen.extend(int(r) for r in rows if expected[r] > 0)

        division = self.parcellation.division.to_numpy()
        for name in pd.unique(division[1:]):
            mass = leaf_share[division == name]
            if mass.sum() >= 0.01:
                take(supertype[np.argmax(mass @ p_full[division == name])])
        for cls in ("30 Astro-Epen", "31 OPC-Oligo"):
            rows = np.flatnonzero(real["class"].to_numpy() == cls)
            take(supertype[rows[np.argmax(expected[rows])]])
        totals = pd.Series(expected).groupby(supertype).sum()
        totals = totals[totals > 0]
        keys = np.log(totals.to_numpy()) * 0.5 + rng.gumbel(size=len(totals))  # Gumbel top-k ~ sqrt(expected)
        for name in totals.index.to_numpy()[np.argsort(-keys, kind="stable")]:
            if len(chosen) >= n_clusters:
                break
            take(name)
        return np.unique(chosen)

    def _subset_weights(self, p_full: np.ndarray, neuronal: np.ndarray, abundance: np.ndarray) -> np.ndarray:
        """P(simulated cluster | parcel) (688, n_clusters): the full atlas's neuronal and non-neuronal shares of
        each parcel, each spread over the simulated clusters of that group (the other group takes a parcel whose
        group has none; a parcel with none at all gets the non-neuronal clusters by abundance)."""
        sub = p_full[:, self._rows].astype(np.float64)
        weights = np.zeros_like(sub)
        full_neuronal = p_full[:, neuronal].sum(1)
        shares = ((neuronal[self._rows], full_neuronal), (~neuronal[self._rows], 1.0 - full_neuronal))
        for members, share in shares:
            part = np.where(members[None], sub, 0.0)
            total = part.sum(1, keepdims=True)
            weights += np.divide(part * share[:, None], total, out=np.zeros_like(part), where=total > 0)
        empty = weights.sum(1) == 0
        weights[empty] = np.where(neuronal[self._rows], 0.0, abundance[self._rows])[None]
        return weights

    def _build_taxonomy(self, rng: np.random.Generator, real: pd.DataFrame) -> pd.DataFrame:
        """The simulated clusters with real names; aliases = cluster numbers; generated hierarchical colours."""
        colors: dict[str, str] = {}
        for cls in pd.unique(real["class"]):
            colors[cls] = _hex_color(rng.integers(0, 256, 3), lower=bool(rng.random() < 0.4))
        for parent, child, spread in (
            ("class", "subclass", 40),
            ("subclass", "supertype", 25),
            ("supertype", "cluster", 15),
        ):
            for p, c in real[[parent, child]].drop_duplicates(child).itertuples(index=False):
                colors[f"{child}:{c}"] = _jitter_color(colors[p if parent == "class" else f"{parent}:{p}"], rng, spread)
        table = real.iloc[self._rows][list(TAXONOMY_LEVELS)].reset_index(drop=True)
        table.insert(0, "cluster_alias", table.cluster.str.split(" ").str[0].astype(np.int64))
        table["neurotransmitter_color"] = table.neurotransmitter.map(_NT_COLOR)
        table["class_color"] = table["class"].map(colors)
        for level in ("subclass", "supertype", "cluster"):
            table[f"{level}_color"] = [colors[f"{level}:{v}"] for v in table[level]]
        return table

    def sample_clusters(self, rng: np.random.Generator, leaf: np.ndarray) -> np.ndarray:
        """Cluster row per cell given its parcel row (n,) -> (n,) int64."""
        u = rng.random(len(leaf))
        out = np.empty(len(leaf), dtype=np.int64)
        for r in np.unique(leaf):
            sel = leaf == r
            out[sel] = np.searchsorted(self._weights_cum[r], u[sel], side="right")
        return np.minimum(out, len(self.taxonomy) - 1)

    # --------------------------------------------------------------------------------------- genes
    @staticmethod
    def _build_genes() -> pd.DataFrame:
        """gene.csv: the 500 panel symbols (identifiers generated, the same for every seed) then 50 blanks."""
        rng = np.random.default_rng(0x6E5)
        symbols = list(synthetic_tables.panel_genes())
        ids = 10_000 + rng.choice(110_000, N_GENES, replace=False)
        tx = 10_000 + rng.choice(230_000, N_GENES, replace=False)
        ncbi = 11_000 + rng.choice(110_000_000, N_GENES, replace=False)
        genes = pd.DataFrame(
            {
                "gene_identifier": [f"ENSMUSG{n:011d}" for n in ids],
                "gene_symbol": symbols,
                "transcript_identifier": [f"ENSMUST{n:011d}" for n in tx],
                "name": [f"{s} (synthetic identifier)" for s in symbols],
                "mapped_ncbi_identifier": [f"NCBIGene:{n}" for n in ncbi],
            }
        )
        blanks = [f"Blank-{i:02d}" for i in range(1, N_BLANKS + 1)]
        blank_rows = pd.DataFrame(
            {
                "gene_identifier": blanks,
                "gene_symbol": blanks,
                "transcript_identifier": blanks,
                "name": np.nan,
                "mapped_ncbi_identifier": np.nan,
            }
        )
        return pd.concat([genes, blank_rows], ignore_index=True)

    def _build_expression(self, rng: np.random.Generator, real: pd.DataFrame) -> np.ndarray:
        """Log mean counts per (simulated cluster, gene) at the reference volume, (n_clusters, 550) float32."""
        markers = _marker_matrix()
        rows = self._rows
        log_mean = np.empty((len(rows), N_GENES + N_BLANKS))
        log_mean[:, :N_GENES] = rng.normal(BASE_MEAN, BASE_SD, N_GENES)[None]
        log_mean[:, N_GENES:] = BLANK_LOG_MEAN
        for level, effect in PROGRAM_EFFECTS.items():
            share = pd.DataFrame(markers).groupby(real[level].to_numpy()).mean()
            share = share.div(share.max(axis=1).clip(lower=1e-9), axis=0)
            log_mean[:, :N_GENES] += effect * share.loc[real[level].to_numpy()[rows]].to_numpy()
        log_mean[:, :N_GENES] += CLUSTER_MARKER_EFFECT * markers[rows]
        for level, (n_genes, mu, sd) in SIBLING_PROGRAMS.items():
            nodes = real[level].to_numpy()
            for name in pd.unique(nodes):  # every node, so a cluster's programs do not depend on the subset
                genes = rng.choice(N_GENES, n_genes, replace=False)
                effect = rng.normal(mu, sd, n_genes)
                members = np.flatnonzero(nodes[rows] == name)
                if len(members):
                    log_mean[np.ix_(members, genes)] += effect
        log_mean[:, :N_GENES] += rng.normal(0.0, CLUSTER_NOISE_SD, (len(rows), N_GENES))
        self._calibrate_bla_genes(log_mean)
        return log_mean.astype(np.float32)

    def _calibrate_bla_genes(self, log_mean: np.ndarray) -> None:
        """Set the 11 BLA genes of the subclasses of the real BLA table to their real detection rate."""
        grid, p0 = self._zero_curve
        column = {g: i for i, g in enumerate(self.genes.gene_symbol)}
        subclass = self.taxonomy.subclass.to_numpy()
        for row in synthetic_tables.bla_targets().itertuples(index=False):
            members = subclass == row.subclass
            if members.any():
                target = float(np.clip(row.zero_fraction, 0.02, 0.995))
                log_mean[members, column[row.gene]] = np.interp(target, p0[::-1], grid[::-1])

    def _build_region_effects(self, rng: np.random.Generator) -> np.ndarray:
        """Weak log-mean effects per (parcel row, gene), (688, 550) float32: division and structure programs."""
        table = self.parcellation
        effect = np.zeros((len(table), N_GENES + N_BLANKS), dtype=np.float32)
        for level, (n_genes, sd) in REGION_EFFECTS.items():
            for rows in table.iloc[1:].groupby(level, sort=False).indices.values():
                genes = rng.choice(N_GENES, n_genes, replace=False)
                effect[np.ix_(rows + 1, genes)] += rng.normal(0, sd, n_genes).astype(np.float32)
        return effect

    # --------------------------------------------------------------------------------------- cells
    def section_efficiency(self, section_number: int) -> np.ndarray:
        """Detection efficiency per gene (550,) float32 of one section (log-normal around 1)."""
        rng = np.random.default_rng([self._seed, 3, section_number])
        return rng.lognormal(0.0, SECTION_EFFICIENCY_SD, N_GENES + N_BLANKS).astype(np.float32)

    def sample_block(self, rng: np.random.Generator, section_number: int, z: float, n: int) -> CellBlock:
        """Simulate ``n`` cells of section ``section_number`` at depth ``z`` mm (see :class:`CellBlock`)."""
        xyz = self.geometry.sample_positions(rng, z, n)
        leaf = self.geometry.region_of(xyz)
        cluster = self.sample_clusters(rng, leaf)
        volume = rng.lognormal(np.log(REFERENCE_VOLUME_UM3), VOLUME_LOG_SD, n)  # um^3
        expected = self._log_mean[cluster] + self._region_effect[leaf]
        np.exp(expected, out=expected)
        expected *= (volume / REFERENCE_VOLUME_UM3).astype(np.float32)[:, None]
        expected *= self.section_efficiency(section_number)[None]
        spill = self._spillover(xyz[:, :2], expected)
        expected *= np.exp(rng.standard_normal(expected.shape, dtype=np.float32) * np.float32(CELL_GENE_NOISE_SD))
        expected += spill
        counts = rng.poisson(expected)
        rows, cols = np.nonzero(counts)
        values = counts[rows, cols].astype(np.float64)
        indptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])
        log2 = np.log2(values * (100.0 / volume[rows]) + 1.0)
        return CellBlock(xyz, leaf, cluster, indptr, cols.astype(np.int32), values, log2)

    @staticmethod
    def _spillover(xy: np.ndarray, expected: np.ndarray) -> np.ndarray:
        """Transcripts (n, 550) a cell picks up from its neighbours: :data:`_SPILL` x their local mean."""
        n = len(xy)
        k = min(SPILL_NEIGHBOURS, n - 1)
        if k < 1:
            return np.zeros_like(expected)
        _, nearest = cKDTree(xy).query(xy, k=k + 1)
        mean = sp.csr_matrix(
            (np.full(n * k, 1.0 / k, dtype=np.float32), nearest[:, 1:].ravel(), np.arange(0, n * k + 1, k)),
            shape=(n, n),
        )
        return (mean @ expected) * np.float32(_SPILL)
