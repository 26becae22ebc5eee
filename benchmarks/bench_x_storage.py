"""X storage by measurement: dense float32 vs CSR (float32) for cells.zarr-like Zarr stores and for h5ad files.

Takes the first ``--cells`` rows of an ABC-layout log2 h5ad (CSR, e.g. the synthetic release's
``C57BL6J-638850-log2.h5ad``; synthesised with ``abc-pipeline synth`` when ``--h5ad`` is not given), writes
them as (a) Zarr with dense float32 X in chunks of 100,000 cells x all genes (Zarr v2, zarr's default compressor, as
assemble writes cells.zarr), (b) Zarr with CSR X (anndata), (c) h5ad with dense X, (d) h5ad with CSR X (anndata defaults,
uncompressed), then measures in a fresh child process per case: disk size, `scanpy.read_h5ad` wall s and peak
RSS, and backed-mode (`anndata.read_h5ad(backed="r")`) reads of 1,000 random cells and of one gene.

    .venv/bin/python benchmarks/bench_x_storage.py --cells 500000 --work /tmp/abc-bench-x

``--measure FILE.h5ad`` measures an existing h5ad instead (e.g. the full-size run's cells_annotated.h5ad): its
size, the `scanpy.read_h5ad` wall s and peak RSS and the backed-mode reads, nothing written.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import json, sys, time
import numpy as np

def peak_mb():  # VmHWM: this process image's peak (ru_maxrss would carry the parent's over exec)
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024

case, path = sys.argv[1], sys.argv[2]
out = {}
if case == "read":
    import scanpy as sc
    t = time.perf_counter(); adata = sc.read_h5ad(path); out["read_s"] = time.perf_counter() - t
    out["peak_rss_mb"] = peak_mb()
elif case == "backed":
    import anndata
    adata = anndata.read_h5ad(path, backed="r")
    rows = np.sort(np.random.default_rng(0).choice(adata.n_obs, 1000, replace=False))
    t = time.perf_counter(); adata.X[rows]; out["rows_s"] = time.perf_counter() - t
    t = time.perf_counter(); adata.X[:, 7]; out["gene_s"] = time.perf_counter() - t
    out["peak_rss_mb"] = peak_mb()
print(json.dumps(out))
"""


def _size_mb(path: Path) -> float:
    if path.is_file():
        return path.stat().st_size / 2**20
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def _child(case: str, path: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, case, str(path)], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _source(work: Path, cells: int, h5ad: Path | None) -> Path:
    if h5ad is not None:
        return h5ad
    root = work / "release"
    if not root.exists():
        subprocess.run(
            ["abc-pipeline", "synth", "--out", str(root), "--cells", str(cells), "--no-progress"], check=True
        )
    return next(root.rglob("C57BL6J-638850-log2.h5ad"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=200_000)
    parser.add_argument("--h5ad", type=Path, default=None, help="ABC-layout log2 h5ad (CSR X) to take rows from")
    parser.add_argument("--work", type=Path, default=Path("/tmp/abc-bench-x"))
    parser.add_argument("--measure", type=Path, default=None, help="measure this h5ad only (nothing written)")
    args = parser.parse_args()
    if args.measure is not None:
        read, backed = _child("read", args.measure), _child("backed", args.measure)
        print(
            json.dumps({"h5ad": str(args.measure), "h5ad MB": _size_mb(args.measure), "read": read, "backed": backed})
        )
        return
    import anndata
    import h5py
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp
    import zarr

    args.work.mkdir(parents=True, exist_ok=True)
    source = _source(args.work, args.cells, args.h5ad)
    with h5py.File(source, "r") as f:
        x = f["X"]
        ptr = x["indptr"][: args.cells + 1]
        n_vars = int(x.attrs["shape"][1])
        csr = sp.csr_matrix(
            (x["data"][ptr[0] : ptr[-1]].astype(np.float32), x["indices"][ptr[0] : ptr[-1]], ptr - ptr[0]),
            shape=(len(ptr) - 1, n_vars),
        )
    n = csr.shape[0]
    obs = pd.DataFrame(index=[f"cell{i}" for i in range(n)])
    var = pd.DataFrame(index=[f"gene{j}" for j in range(n_vars)])
    print(f"{n} cells x {n_vars} genes, {csr.nnz / (n * n_vars):.1%} non-zero, source {source}")
    rows = []
    for kind in ("dense", "csr"):
        matrix = csr.toarray() if kind == "dense" else csr
        zpath, hpath = args.work / f"{kind}.zarr", args.work / f"{kind}.h5ad"
        for path in (zpath, hpath):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        t = time.perf_counter()
        if kind == "dense":
            group = zarr.open_group(str(zpath), mode="w", zarr_format=2)  # as chunked_anndata writes cells.zarr
            group.create_array("X", shape=matrix.shape, chunks=(100_000, n_vars), dtype="float32")[...] = matrix
        else:
            anndata.AnnData(X=matrix, obs=obs, var=var).write_zarr(zpath)
        zarr_s = time.perf_counter() - t
        t = time.perf_counter()
        anndata.AnnData(X=matrix, obs=obs, var=var).write_h5ad(hpath)
        h5ad_s = time.perf_counter() - t
        del matrix
        read, backed = _child("read", hpath), _child("backed", hpath)
        rows.append(
            {
                "X": kind,
                "zarr MB": _size_mb(zpath),
                "zarr write s": zarr_s,
                "h5ad MB": _size_mb(hpath),
                "h5ad write s": h5ad_s,
                "read_h5ad s": read["read_s"],
                "read_h5ad peak MB": read["peak_rss_mb"],
                "backed 1000 cells s": backed["rows_s"],
                "backed 1 gene s": backed["gene_s"],
                "backed peak MB": backed["peak_rss_mb"],
            }
        )
    table = pd.DataFrame(rows).round(2)
    print(table.to_markdown(index=False))
    print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
