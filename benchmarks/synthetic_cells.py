"""Write a random but contract-conforming ``cells.zarr`` (docs/architecture.md) of any size, in chunks.

Used by ``bench_raster.py``; memory is bounded by ``chunk_cells`` x ``n_genes``. Cells fill a
brain-like ellipsoid of 55 sections 0.2 mm apart (11 x 8 mm in-plane); 5 % lack CCF coordinates;
expression is log2(1 + Poisson counts) (about 60 % zeros, like MERFISH); 10 of the genes are blanks.

    python benchmarks/synthetic_cells.py OUT.zarr --cells 1000000 [--genes 500] [--chunk-cells 50000]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from abc_pipeline.atlas.chunked_anndata import ChunkedAnnDataWriter  # noqa: E402

N_SECTIONS = 55
TAXONOMY = {"class": 34, "subclass": 338}
PARCELLATION = {"parcellation_division": 26, "parcellation_structure": 160}


def _colors(n: int, seed: int) -> list[str]:
    rgb = np.random.default_rng(seed).integers(0, 256, (n, 3))
    return [f"#{r:02X}{g:02X}{b:02X}" for r, g, b in rgb]


def write_cells(out: Path, n_cells: int, n_genes: int = 500, chunk_cells: int = 50_000, seed: int = 0) -> Path:
    """Write ``out`` (must not exist) with ``n_cells`` x ``n_genes``; returns ``out``."""
    n_blank = min(10, n_genes - 1)
    symbols = [f"Gene{i}" for i in range(n_genes - n_blank)] + [f"Blank-{i + 1}" for i in range(n_blank)]
    var = pd.DataFrame(
        {
            "gene_symbol": symbols,
            "transcript_identifier": [f"ENSMUST{i:011d}" for i in range(n_genes)],
            "blank": [s.startswith("Blank") for s in symbols],
        },
        index=pd.Index([f"ENSMUSG{i:011d}" if not s.startswith("Blank") else s for i, s in enumerate(symbols)]),
    )
    sections = [f"C57BL6J-638850.{i + 1:02d}" for i in range(N_SECTIONS)]
    cats = {name: [f"{name}_{k:03d}" for k in range(n)] for name, n in {**TAXONOMY, **PARCELLATION}.items()}
    writer = ChunkedAnnDataWriter(
        out,
        n_cells,
        var,
        chunk_rows=chunk_cells,
        index_name="cell_label",
        numeric_obs={
            "z_section": np.float64,
            "cluster_alias": np.int64,
            "parcellation_index": np.int64,
            "has_ccf": bool,
        },
        categorical_obs={"brain_section_label": sections, **cats},
        obsm={"spatial": 2, "spatial_3d": 3, "ccf": 3},
    )
    rng = np.random.default_rng(seed)
    for start in range(0, n_cells, chunk_cells):
        n = min(chunk_cells, n_cells - start)
        sec = rng.integers(0, N_SECTIONS, n)
        z = 0.2 * sec + 0.1
        half = np.sqrt(np.clip(1 - ((z - 5.5) / 5.6) ** 2, 0.05, 1))  # ellipsoid cross-section
        r, t = np.sqrt(rng.random(n)), rng.uniform(0, 2 * np.pi, n)
        x = 5.5 + 5.3 * half * r * np.cos(t)
        y = 4.0 + 3.8 * half * r * np.sin(t)
        has_ccf = rng.random(n) > 0.05
        xyz = np.column_stack([x, y, z])
        xyz[~has_ccf] = np.nan
        ccf = xyz[:, [2, 1, 0]] + rng.normal(0, 0.02, (n, 3))
        region = (np.nan_to_num(x) // 0.7).astype(int) * 13 + (np.nan_to_num(y) // 0.9).astype(int)
        obs = pd.DataFrame(
            {
                "z_section": z,
                "cluster_alias": rng.integers(1, 5000, n),
                "parcellation_index": region,
                "has_ccf": has_ccf,
                "brain_section_label": [sections[s] for s in sec],
                "class": rng.integers(0, TAXONOMY["class"], n),
                "subclass": rng.integers(0, TAXONOMY["subclass"], n),
                "parcellation_division": region % PARCELLATION["parcellation_division"],
                "parcellation_structure": region % PARCELLATION["parcellation_structure"],
            }
        )
        for name, c in cats.items():
            obs[name] = np.asarray(c, dtype=object)[obs[name].to_numpy()]
        expr = np.log2(1 + rng.poisson(0.9, (n, n_genes)).astype(np.float32))
        labels = [f"cell-{i:09d}" for i in range(start, start + n)]
        writer.write_rows(start, labels, expr, obs, {"spatial": np.column_stack([x, y]), "spatial_3d": xyz, "ccf": ccf})
    writer.write_uns({f"{name}_colors": _colors(len(c), k) for k, (name, c) in enumerate(cats.items())})
    writer.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--cells", type=int, required=True)
    p.add_argument("--genes", type=int, default=500)
    p.add_argument("--chunk-cells", type=int, default=50_000)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    write_cells(a.out, a.cells, a.genes, a.chunk_cells, a.seed)


if __name__ == "__main__":
    main()
