"""User-data benchmark: `abc-pipeline import` of a large AnnData and `abc-pipeline transfer` of one big section.

``import``: writes a user ``.h5ad`` of ``--cells`` cells x ``--genes`` genes (CSR counts-like log2 values, 15 %
non-zero, 2D coordinates in µm on a tissue-like lattice over ``--sections`` sections, a label column), chunk by
chunk with h5py (the generator never holds the matrix), then times ``abc-pipeline import`` of it.

``transfer``: trains two tiny atlas models on a synthetic release (cached under ``--work``; celltype patch
classifier and region U-Net, moment-trivial-irrep, 2D section raster of 8 PCs of 40 genes at 0.1 mm), writes one
user section of ``--cells`` cells (µm, the models' genes plus 60 others) and times ``abc-pipeline transfer`` with
both checkpoints.

Each measured command runs in a fresh child whose peak RSS is read with ``resource.getrusage(RUSAGE_CHILDREN)``.

    python benchmarks/bench_userdata.py import --cells 1000000 --work /tmp/abc-bench-userdata
    python benchmarks/bench_userdata.py transfer --cells 100000 --work /tmp/abc-bench-userdata
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

_MEASURE = (
    "import resource, subprocess, sys, time; t = time.perf_counter(); "
    "subprocess.run(sys.argv[1:], check=True); "
    "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


def measure(cmd: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in MiB) of ``cmd`` run in a fresh child process."""
    out = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], check=True, capture_output=True, text=True)
    seconds, kib = out.stdout.split()[-2:]
    return float(seconds), float(kib) / 1024


def tissue_xy(n: int, rng: np.random.Generator, spacing_um: float = 12.0) -> np.ndarray:
    """(n, 2) µm: a jittered lattice of ``spacing_um`` filling an ellipse (one section)."""
    side = int(np.ceil(np.sqrt(n * 4 / np.pi))) + 2
    grid = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2) - side / 2
    inside = (grid[:, 0] / (side / 2)) ** 2 + (grid[:, 1] / (side / 2 * 0.7)) ** 2 <= 1
    grid = grid[inside]
    if len(grid) < n:
        grid = np.concatenate([grid, grid[: n - len(grid)] + 0.5])
    return grid[rng.permutation(len(grid))[:n]] * spacing_um + rng.normal(0, 2, (n, 2))


def write_user_h5ad(path: Path, n: int, genes: list[str], sections: int, seed: int = 0, chunk: int = 100_000) -> None:
    """An AnnData .h5ad (CSR X, obs sample / celltype, obsm spatial in µm) written chunk by chunk with h5py."""
    import anndata as ad

    rng = np.random.default_rng(seed)
    g = len(genes)
    per = -(-n // sections)
    xy = np.concatenate([tissue_xy(min(per, n - s * per), rng) for s in range(sections)])
    obs = pd.DataFrame(
        {
            "sample": pd.Categorical(np.repeat([f"s{i}" for i in range(sections)], per)[:n]),
            "celltype": pd.Categorical(rng.choice(["A", "B", "C", "D"], n)),
        },
        index=[f"cell{i}" for i in range(n)],
    )
    ad.AnnData(obs=obs, var=pd.DataFrame(index=genes), obsm={"spatial": xy}).write_h5ad(path)  # X written below
    with h5py.File(path, "r+") as f:
        if "X" in f:
            del f["X"]
        x = f.create_group("X")
        x.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": (n, g)})
        data = x.create_dataset("data", shape=(0,), maxshape=(None,), dtype=np.float32, chunks=(1 << 20,))
        indices = x.create_dataset("indices", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(1 << 20,))
        indptr = [np.zeros(1, np.int64)]
        for s in range(0, n, chunk):
            rows = min(chunk, n - s)
            mask = rng.random((rows, g)) < 0.15
            r, c = np.nonzero(mask)
            values = np.log2(rng.poisson(4, r.size) + 2).astype(np.float32)
            k = data.shape[0]
            data.resize((k + r.size,))
            indices.resize((k + r.size,))
            data[k:], indices[k:] = values, c.astype(np.int32)
            indptr.append(k + np.cumsum(np.bincount(r, minlength=rows)))
        x.create_dataset("indptr", data=np.concatenate(indptr))


def bench_import(args: argparse.Namespace, cli: list[str]) -> dict:
    args.work.mkdir(parents=True, exist_ok=True)
    src = args.work / f"user_{args.cells}.h5ad"
    if not src.exists():
        t = time.perf_counter()
        write_user_h5ad(src, args.cells, [f"Gene{i}" for i in range(args.genes)], args.sections)
        print(f"wrote {src} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    out = args.work / "imported.zarr"
    seconds, rss = measure(
        [
            *cli,
            "import",
            "--kind",
            "anndata",
            "--input",
            str(src),
            "--out",
            str(out),
            "--section",
            "sample",
            "--labels",
            "celltype",
            "--chunk-cells",
            str(args.chunk_cells),
            "--no-progress",
        ]
    )
    return {
        "step": "import",
        "cells": args.cells,
        "genes": args.genes,
        "chunk_cells": args.chunk_cells,
        "input_mb": round(src.stat().st_size / 2**20),
        "seconds": round(seconds, 1),
        "peak_rss_mib": round(rss),
    }


def _models(work: Path) -> tuple[list[Path], list[str]]:
    """Two tiny checkpoints (cached) and the gene ids they use."""
    from abc_pipeline.atlas.assemble import assemble_dataset
    from abc_pipeline.atlas.synthetic import write_synthetic_release
    from abc_pipeline.cells import CellSource
    from abc_pipeline.learn.atlas import train_atlas_task
    from abc_pipeline.raster import rasterize

    ckpts = [work / "models" / "ct" / "checkpoint.pt", work / "models" / "rg" / "checkpoint.pt"]
    release, cells = work / "release", work / "atlas_cells.zarr"
    if not cells.exists():
        write_synthetic_release(release, n_cells=20_000, seed=0, release="20250531", progress=False)
        assemble_dataset("MERFISH-C57BL6J-638850", cache_dir=release, out=cells, progress=False)
    src = CellSource(cells)
    genes = [g for g, b in zip(src.gene_symbols, src.blank) if not b][::12][:40]
    ids = [dict(zip(src.gene_symbols, src.gene_ids))[g] for g in genes]
    if not all(c.exists() for c in ckpts):
        raster = rasterize(
            cells,
            work / "atlas.ome.zarr",
            space="section",
            voxel_size=0.1,
            genes=genes,
            pca=8,
            labels=["class", "parcellation_division"],
            progress=False,
            overwrite=True,
        )
        train_atlas_task(
            raster,
            cells,
            "celltype",
            "moment-trivial-irrep",
            ckpts[0].parent,
            width=6,
            depth=2,
            patch_size=3,
            epochs=1,
            max_samples_per_epoch=500,
            progress=False,
        )
        train_atlas_task(
            raster,
            cells,
            "region",
            "moment-trivial-irrep",
            ckpts[1].parent,
            width=4,
            depth=2,
            tile_size=32,
            epochs=1,
            batch_size=4,
            progress=False,
        )
    return ckpts, ids


def bench_transfer(args: argparse.Namespace, cli: list[str]) -> dict:
    args.work.mkdir(parents=True, exist_ok=True)
    ckpts, model_genes = _models(args.work)
    src = args.work / f"section_{args.cells}.h5ad"
    if not src.exists():
        write_user_h5ad(src, args.cells, model_genes + [f"Other{i}" for i in range(60)], 1, seed=1)
    seconds, rss = measure(
        [
            *cli,
            "transfer",
            "--checkpoint",
            *map(str, ckpts),
            "--input",
            str(src),
            "--out",
            str(args.work / "transferred.h5ad"),
            "--no-progress",
        ]
    )
    return {
        "step": "transfer (celltype + region)",
        "cells": args.cells,
        "genes": len(model_genes) + 60,
        "seconds": round(seconds, 1),
        "peak_rss_mib": round(rss),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["import", "transfer"])
    parser.add_argument("--cells", type=int, default=1_000_000)
    parser.add_argument("--genes", type=int, default=500, help="import: genes in the user file")
    parser.add_argument("--sections", type=int, default=10, help="import: sections in the user file")
    parser.add_argument("--chunk-cells", type=int, default=100_000, help="import: cells per chunk")
    parser.add_argument("--work", type=Path, default=Path("/tmp/abc-bench-userdata"))
    args = parser.parse_args()
    cli = [sys.executable, "-m", "abc_pipeline.cli", "-q"]
    row = bench_import(args, cli) if args.step == "import" else bench_transfer(args, cli)
    row["machine"] = f"{platform.node()} {platform.processor() or platform.machine()}"
    print(json.dumps(row))


if __name__ == "__main__":
    main()
