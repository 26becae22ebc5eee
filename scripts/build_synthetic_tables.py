"""Build the compact real tables the synthetic atlas ships with (``abc_pipeline/atlas/data/*.tsv.gz``).

Reads the real ABC excerpts in ``../shared/data/abc_real_excerpts`` (see its README.md) and writes:

* ``wmb_clusters.tsv.gz``: the 5,322 clusters of the whole-mouse-brain taxonomy CCN20230722 (cluster, supertype,
  subclass, class, neurotransmitter, n_cells_10xv3, ccf_broad_freq, ccf_acronym_freq, merfish_markers), from
  ``wmb_taxonomy_CCN20230722_clusters.tsv`` (the anatomical free-text annotation is left out).
* ``ccf_parcellation.tsv.gz``: the 688 Allen-CCF-2020 parcels (parcellation_index, the five term-level acronyms,
  their colours, volume_mm3), pivoted from ``parcellation_to_parcellation_term_membership.csv``.
* ``sections.tsv.gz``: brain_section_label and z (mm) of the 53 real sections with reconstructed coordinates,
  from ``section_metadata_C57BL6J-638850_20230830.csv``.
* ``bla_targets.tsv.gz``: per subclass (>= 50 cells) and gene of the 8,238 real basolateral-amygdala cells
  (``bla_merfish_{metadata,expression}.csv``): cells, zero fraction and the 10/25/50/75/90 % quantiles of the
  non-zero log2 values. The generator sets these 11 genes' detection in those subclasses from it; the
  calibration test and ``benchmarks/calibrate_synth.py`` compare the synthetic atlas against the real cells.

Each file starts with a ``# source:`` comment line. Run from the repository root:

    python scripts/build_synthetic_tables.py [--shared ../shared]
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import numpy as np
import pandas as pd

OUT = Path(__file__).resolve().parents[1] / "abc_pipeline" / "atlas" / "data"
LEVELS = ("organ", "category", "division", "structure", "substructure")
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
MIN_BLA_CELLS = 50


def _write(frame: pd.DataFrame, name: str, source: str) -> None:
    path = OUT / name
    text = f"# source: {source}\n" + frame.to_csv(sep="\t", index=False, lineterminator="\n")
    with gzip.GzipFile(path, "wb", mtime=0) as fh:  # mtime 0: byte-identical rebuilds
        fh.write(text.encode())
    print(f"{path}: {len(frame)} rows, {path.stat().st_size:,} B")


def bla_targets(excerpts: Path) -> pd.DataFrame:
    """Per (subclass, gene) real BLA statistics (see module docstring)."""
    meta = pd.read_csv(excerpts / "bla_merfish_metadata.csv", dtype=str, keep_default_na=False)
    expr = pd.read_csv(excerpts / "bla_merfish_expression.csv", dtype={"cell_label": str})
    if not (meta.cell_label == expr.cell_label).all():
        raise SystemExit("bla_merfish metadata and expression rows differ")
    rows = []
    for subclass, idx in meta.groupby("subclass").indices.items():
        if len(idx) < MIN_BLA_CELLS:
            continue
        for gene in expr.columns[1:]:
            values = expr[gene].to_numpy()[idx]
            nonzero = values[values > 0]
            q = np.quantile(nonzero, QUANTILES) if len(nonzero) else np.full(len(QUANTILES), np.nan)
            rows.append(
                {
                    "subclass": subclass,
                    "gene": gene,
                    "cells": len(idx),
                    "zero_fraction": round(1 - len(nonzero) / len(idx), 4),
                    **{f"q{int(p * 100)}": round(v, 4) for p, v in zip(QUANTILES, q)},
                }
            )
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=Path("../shared"))
    excerpts = parser.parse_args().shared / "data" / "abc_real_excerpts"
    OUT.mkdir(parents=True, exist_ok=True)

    tax = pd.read_csv(excerpts / "wmb_taxonomy_CCN20230722_clusters.tsv", sep="\t", keep_default_na=False)
    tax = tax.drop(columns="anatomical_annotation").replace(
        {"ccf_broad_freq": {"None": ""}, "ccf_acronym_freq": {"None": ""}}
    )
    _write(tax, "wmb_clusters.tsv.gz", "wmb_taxonomy_CCN20230722_clusters.tsv (ABC Atlas WMB-taxonomy CCN20230722)")

    par = pd.read_csv(excerpts / "parcellation_to_parcellation_term_membership.csv")
    wide = par.pivot(
        index="parcellation_index",
        columns="parcellation_term_set_name",
        values=["parcellation_term_acronym", "color_hex_triplet"],
    )
    table = pd.DataFrame({lvl: wide["parcellation_term_acronym"][lvl] for lvl in LEVELS})
    for lvl in LEVELS:
        table[f"{lvl}_color"] = wide["color_hex_triplet"][lvl]
    table["volume_mm3"] = par.drop_duplicates("parcellation_index").set_index("parcellation_index").volume_mm3
    table = table.reset_index().sort_values("parcellation_index")
    _write(
        table,
        "ccf_parcellation.tsv.gz",
        "parcellation_to_parcellation_term_membership.csv (ABC Atlas Allen-CCF-2020 20230630)",
    )

    sections = pd.read_csv(excerpts / "section_metadata_C57BL6J-638850_20230830.csv")
    _write(
        sections[["brain_section_label", "z_reconstructed"]].rename(columns={"z_reconstructed": "z"}),
        "sections.tsv.gz",
        "section_metadata_C57BL6J-638850_20230830.csv (MERFISH-C57BL6J-638850)",
    )

    _write(
        bla_targets(excerpts),
        "bla_targets.tsv.gz",
        "bla_merfish_metadata.csv + bla_merfish_expression.csv (8,238 real MERFISH-C57BL6J-638850 BLA cells)",
    )


if __name__ == "__main__":
    main()
