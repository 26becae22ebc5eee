"""Calibration table and learnability profile of the synthetic atlas -> ``docs/synthetic_atlas.md``.

Writes two synthetic releases in a temporary folder and compares them with the real excerpts in
``../shared/data/abc_real_excerpts``:

* the demo atlas (``--cells``/``--sections``/``--seed``, as ``config/config.yaml``): overall non-zero fraction,
  cells in a division where their real cluster occurs, non-neuronal share, and the learnability profile
  (per-cell logistic regression on held-out sections: own expression vs own + neighbourhood mean);
* an all-cluster atlas (``--bla-cells`` in ``--bla-sections``, every one of the 5,322 clusters eligible): per
  subclass and gene of the real BLA cells, zero fraction and non-zero log2 quantiles, real vs synthetic, and the
  subclass accuracy from the 11 real genes alone, real vs synthetic.

    python benchmarks/calibrate_synth.py [--cells 30000 --sections 12 --seed 0] [--out docs/synthetic_atlas.md]
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from abc_pipeline.atlas import synthetic_calibration as calibration
from abc_pipeline.atlas import synthetic_model, synthetic_tables
from abc_pipeline.atlas.synthetic import write_synthetic_release
from abc_pipeline.atlas.synthetic_geometry import brain_geometry


def _occurs_fraction(cells: calibration.ReleaseCells) -> float:
    real = synthetic_tables.clusters()
    row_of = {c: i for i, c in enumerate(real.cluster)}
    table = brain_geometry().table
    division_f = pd.DataFrame(synthetic_model.placement_frequencies()).groupby(table.division.to_numpy()).sum()
    obs = cells.obs
    return float(np.mean([division_f.at[d, row_of[c]] > 0.01 for d, c in zip(obs.division, obs.cluster)]))


def _volume_errors(n: int = 300_000) -> pd.DataFrame:
    geometry = brain_geometry()
    rng = np.random.default_rng(5)
    xyz = np.column_stack([rng.uniform(0, 11, n), rng.uniform(0, 11, n), rng.uniform(-0.4, 15, n)])
    counts = np.bincount(geometry.region_of(xyz), minlength=len(geometry.table))[1:]
    frame = pd.DataFrame(
        {
            "division": geometry.table.division[1:],
            "structure": geometry.table.structure[1:],
            "real": geometry.table.volume_mm3[1:],
            "synthetic": counts,
        }
    )
    rows = []
    for level in ("division", "structure"):
        g = frame.groupby(level)[["real", "synthetic"]].sum()
        g = g[g.real >= 1.0]
        err = ((g.synthetic / counts.sum()) / (g.real / frame.real.sum()) - 1).abs()
        rows.append(
            {
                "level": level,
                "regions >= 1 mm3": len(g),
                "median |rel. error|": err.median(),
                "max |rel. error|": err.max(),
            }
        )
    return pd.DataFrame(rows)


def _md(frame: pd.DataFrame, digits: int = 3) -> str:
    return frame.round(digits).to_markdown(index=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=30_000)
    parser.add_argument("--sections", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bla-cells", type=int, default=12_000)
    parser.add_argument("--bla-sections", type=int, default=6)
    parser.add_argument("--shared", type=Path, default=Path("../shared"))
    parser.add_argument("--out", type=Path, default=Path("docs/synthetic_atlas.md"))
    args = parser.parse_args()
    excerpts = args.shared / "data" / "abc_real_excerpts"
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic_release(
            Path(tmp) / "demo", n_cells=args.cells, n_sections=args.sections, seed=args.seed, progress=False
        )
        demo = calibration.load_release_cells(Path(tmp) / "demo")
        write_synthetic_release(
            Path(tmp) / "all",
            n_cells=args.bla_cells,
            n_sections=args.bla_sections,
            seed=args.seed,
            n_clusters=10**6,
            progress=False,
        )
        full = calibration.load_release_cells(Path(tmp) / "all")
    bla = calibration.bla_comparison(full, excerpts)
    summary = calibration.bla_summary(bla)
    separability = calibration.bla_gene_separability(full, excerpts, sorted(bla.subclass.unique()), args.seed)
    profile = calibration.learnability(demo, n_components=30, seed=args.seed)
    nonzero = {name: c.log2.nnz / (c.log2.shape[0] * c.log2.shape[1]) for name, c in (("demo", demo), ("all", full))}
    non_neuronal = float(full.obs["class"].isin(synthetic_model.NON_NEURONAL_CLASSES).mean())
    tol = calibration.TOLERANCES
    checks = pd.DataFrame(
        [
            {
                "statistic": "non-zero entries, whole log2 matrix (demo / all-cluster atlas)",
                "real": "~0.27 (BLA 11 genes: 0.247)",
                "synthetic": f"{nonzero['demo']:.3f} / {nonzero['all']:.3f}",
                "tolerance": f"{tol['overall_nonzero'][0]}-{tol['overall_nonzero'][1]}",
            },
            *(
                {
                    "statistic": f"BLA {key.replace('_', ' ')} (over {summary['pairs']} subclass x gene pairs)",
                    "real": "0",
                    "synthetic": f"{summary[key]:.3f}",
                    "tolerance": f"<= {tol[key]}",
                }
                for key in (
                    "zero_fraction_median_abs",
                    "zero_fraction_p90_abs",
                    "quantile_median_abs",
                    "quantile_p90_abs",
                )
            ),
            {
                "statistic": f"subclass accuracy from the 11 BLA genes ({separability['subclasses']} subclasses, "
                f"{separability['cells_per_subclass']} cells each, 5-fold CV)",
                "real": f"{separability['real']:.3f}",
                "synthetic": f"{separability['synthetic']:.3f}",
                "tolerance": "reported",
            },
            {
                "statistic": "demo cells in a division where their real cluster occurs (f > 0.01)",
                "real": "1",
                "synthetic": f"{_occurs_fraction(demo):.3f}",
                "tolerance": "> 0.9",
            },
            {
                "statistic": "non-neuronal cells (all-cluster atlas)",
                "real": "~0.4 (10x counts: 0.42)",
                "synthetic": f"{non_neuronal:.3f}",
                "tolerance": "reported",
            },
        ]
    )
    bla_table = bla[
        [
            "subclass",
            "gene",
            "real_cells",
            "synthetic_cells",
            "real_zero_fraction",
            "synthetic_zero_fraction",
            "real_q25",
            "synthetic_q25",
            "real_q50",
            "synthetic_q50",
            "real_q75",
            "synthetic_q75",
        ]
    ]
    text = f"""# The synthetic atlas and how close it is to the real one

Generated by `python benchmarks/calibrate_synth.py --cells {args.cells} --sections {args.sections} --seed {args.seed}
--bla-cells {args.bla_cells} --bla-sections {args.bla_sections}` on {platform.node()} ({time.strftime("%Y-%m-%d")},
{time.perf_counter() - started:.0f} s). Do not edit by hand: re-run the command.

## What is real and what is simulated

| part | real (shipped in `abc_pipeline/atlas/data`, built by `scripts/build_synthetic_tables.py`) | simulated |
|---|---|---|
| taxonomy | the 5,322 CCN20230722 clusters, their supertype / subclass / class / neurotransmitter names; a small atlas uses a seed-chosen subset (`default_n_clusters`: one per 150 cells; whole supertypes, every division present covered) | `cluster_alias` = the cluster number; colours |
| parcellation | the 688 Allen-CCF-2020 parcels: `parcellation_index`, acronyms, colours, relative `volume_mm3` | parcel shapes (power diagrams fitted to the real volume shares, cortical layers by depth) |
| sections | the real labels and z of MERFISH-C57BL6J-638850 | in-plane shape of the brain |
| placement | each cluster's real CCF frequencies (fine acronyms + 0.3 x broad divisions) x its 10x cell count (non-neuronal x1.5) | positions |
| genes | 500 panel genes (the real MERFISH markers) + 50 `Blank-NN` | Ensembl identifiers |
| expression | each cluster's real markers and the markers of its supertype / subclass / class; for the 11 BLA genes, the real zero fraction of the BLA subclasses | baselines, sibling programs, weak region effects |
| measurement | calibrated on the real BLA cells (below) | volume, depth, per-section gene efficiency, spillover from cells within 10 um, Poisson-log-normal counts |

## Calibration against the real tables

{_md(checks)}

Volumes of the parcels (fitted on 60,000 points; relative error of each region's share of the brain; regions of
at least 1 mm3):

{_md(_volume_errors())}

### BLA: per subclass and gene, real vs synthetic

Real: the 8,238 basolateral-amygdala cells of `bla_merfish_*.csv` (subclasses with >= 50 cells). Synthetic: the
cells of the same subclass anywhere in the all-cluster atlas. The zero fractions of these 11 genes in these
subclasses are generator inputs (inverted through the measurement model); the non-zero quantiles and the
overall density are outputs of the measurement model (cell volume, noise, efficiency, spillover).

{_md(bla_table)}

## Learnability profile (demo atlas)

Per-cell multinomial logistic regression on the first 30 principal components of the 500 panel genes (own), or on
those plus the same components of the mean of the 15 nearest cells in the section (own+neighbourhood); trained
on 3 of every 4 sections, tested on the held-out sections (test cells whose label is absent from training are left
out; `chance` = the most frequent training label's share of the test cells).

{_md(profile)}
"""
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
