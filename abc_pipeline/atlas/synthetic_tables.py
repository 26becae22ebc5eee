"""The real ABC tables the synthetic atlas is calibrated on, shipped as compact gzip TSVs in ``atlas/data``.

Built by ``scripts/build_synthetic_tables.py`` from ``../shared/data/abc_real_excerpts`` (each file's first line
names its source); read here without ``../shared``:

* :func:`clusters`: the 5,322 clusters of the whole-mouse-brain taxonomy CCN20230722 with their supertype,
  subclass, class, neurotransmitter, 10x cell count, CCF region frequencies and MERFISH marker genes;
* :func:`parcellation`: the 688 Allen-CCF-2020 parcels (``parcellation_index``, five term-level acronyms and
  colours, ``volume_mm3``);
* :func:`section_z`: the real z (mm) of every MERFISH-C57BL6J-638850 section;
* :func:`bla_targets`: per subclass and gene, statistics of 8,238 real basolateral-amygdala cells;
* :func:`panel_genes`: the 500 gene symbols of the synthetic panel (the most used MERFISH markers).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np
import pandas as pd

DATA = Path(__file__).with_name("data")

# The 59 real section numbers of MERFISH-C57BL6J-638850 (labels ``C57BL6J-638850.NN``), anterior to posterior.
SECTION_NUMBERS: tuple[int, ...] = (
    1,
    2,
    3,
    4,
    5,
    6,
    8,
    9,
    10,
    11,
    12,
    13,
    14,
    15,
    16,
    17,
    18,
    19,
    24,
    25,
    26,
    27,
    28,
    29,
    30,
    31,
    32,
    33,
    35,
    36,
    37,
    38,
    39,
    40,
    42,
    43,
    44,
    45,
    46,
    47,
    48,
    49,
    50,
    51,
    52,
    54,
    55,
    56,
    57,
    58,
    59,
    60,
    61,
    62,
    64,
    66,
    67,
    68,
    69,
)
# Section numbers without reconstructed/CCF coordinates in the real release (reference section 2.3).
SECTIONS_WITHOUT_CCF = frozenset({1, 2, 3, 4, 68, 69})
SECTION_SPACING_MM = 0.2
N_PANEL_GENES = 500
BLA_GENES = ("Htr1b", "Htr1d", "Htr2a", "Htr3a", "Htr7", "Adra1a", "Adra1b", "Drd1", "Drd2", "Drd3", "Drd5")


def _read(name: str, **kwargs) -> pd.DataFrame:
    return pd.read_csv(DATA / name, sep="\t", skiprows=1, **kwargs)  # line 1: "# source: ..."


def parse_frequencies(text: str) -> dict[str, float]:
    """``"Isocortex:0.57,CTXsp:0.21"`` -> ``{"Isocortex": 0.57, "CTXsp": 0.21}`` (empty text -> ``{}``).

    Acronyms may hold ", " (``CUL4, 5``); items without a frequency (one real cell reads ``####...``) are skipped.
    """
    out: dict[str, float] = {}
    for item in re.split(r",(?! )", text):
        key, sep, value = item.rpartition(":")
        if sep and key:
            out[key] = float(value)
    return out


@functools.lru_cache(maxsize=1)
def clusters() -> pd.DataFrame:
    """The 5,322 real clusters, one row each, in taxonomy order (see module docstring)."""
    return _read("wmb_clusters.tsv.gz", keep_default_na=False, dtype={"n_cells_10xv3": np.int64})


@functools.lru_cache(maxsize=1)
def parcellation() -> pd.DataFrame:
    """The 688 real parcels, ``parcellation_index`` ascending (row 0 = ``unassigned``)."""
    return _read("ccf_parcellation.tsv.gz", keep_default_na=False).reset_index(drop=True)


@functools.lru_cache(maxsize=1)
def _section_z_table() -> dict[int, float]:
    table = _read("sections.tsv.gz")
    known = {int(label.rsplit(".", 1)[1]): float(z) for label, z in zip(table.brain_section_label, table.z)}
    # Sections without reconstructed coordinates (.01-.04, .68-.69) continue the 0.2 mm spacing outwards.
    first, last = min(known), max(known)
    for number in (n for n in SECTION_NUMBERS if n < first):
        known[number] = round(known[first] - SECTION_SPACING_MM * (first - number), 1)
    for number in (n for n in SECTION_NUMBERS if n > last):
        known[number] = round(known[last] + SECTION_SPACING_MM * (number - last), 1)
    return known


def section_z(number: int) -> float:
    """Real z (mm, reconstructed = section z) of section ``C57BL6J-638850.<number>``."""
    return _section_z_table()[number]


@functools.lru_cache(maxsize=1)
def bla_targets() -> pd.DataFrame:
    """Per (subclass, gene) of the real BLA cells: cells, zero_fraction, q10 ... q90 of the non-zero log2."""
    return _read("bla_targets.tsv.gz")


@functools.lru_cache(maxsize=1)
def panel_genes() -> tuple[str, ...]:
    """500 gene symbols, alphabetical: the 11 BLA genes plus the MERFISH markers used by the most clusters."""
    counts = pd.Series([g for text in clusters().merfish_markers for g in text.split(",") if g]).value_counts()
    ranked = sorted(counts.index, key=lambda g: (g not in BLA_GENES, -counts[g], g))
    return tuple(sorted(ranked[:N_PANEL_GENES]))
