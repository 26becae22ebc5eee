"""Dense per-cell inference vs a per-cell patch loop (docs/benchmarks.md, "Dense prediction").

    python benchmarks/bench_dense.py [--cells 100000] [--genes 32] [--voxel 0.05] [--model moment-trivial-irrep]
                                     [--target-params 100000] [--threads 2] [--workdir /tmp/bench_dense]

Builds a synthetic atlas (release -> cells.zarr -> section raster of ``--genes`` channels at ``--voxel`` mm),
trains a cell-type patch classifier for one short epoch (a real checkpoint; speed does not depend on the
weights), then times, in the same process:

1. dense: ``predict_raster`` (tiled ``forward_dense`` over every voxel + one vectorised gather per chunk
   of cells), writing predictions.zarr;
2. patch loop: the same model's ``forward`` on every cell's patch (``CellPatchDataset`` over all
   splits, batches of 256) - the per-cell evaluation that dense inference replaces;
3. dense again (same as 1, after the loop).

Prints one JSON record: cells, voxels, wall seconds of each and their ratio (``speedup``), the process CPU
seconds (user + system, all threads) of each and their ratio (``cpu_speedup``; less sensitive to the other
jobs of a shared machine), the 1-minute load average before and after each, the wall seconds of a second
dense run after the loop (warm process, later load), and the largest difference between the two per-cell
probability tables (they are the same function).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cells", type=int, default=100_000)
    ap.add_argument("--genes", type=int, default=32)
    ap.add_argument("--voxel", type=float, default=0.05, help="section raster voxel (mm)")
    ap.add_argument("--model", default="moment-trivial-irrep")
    ap.add_argument("--target-params", type=int, default=100_000)
    ap.add_argument("--patch-size", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench_dense"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from abc_pipeline.atlas.assemble import assemble_dataset
    from abc_pipeline.atlas.synthetic import write_synthetic_release
    from abc_pipeline.cells import CellSource
    from abc_pipeline.learn.atlas import train_atlas_task
    from abc_pipeline.learn.checkpoint import load_model
    from abc_pipeline.learn.data import SPLITS, CellPatchDataset, ClassTable, Normalizer
    from abc_pipeline.learn.inference import predict_proba
    from abc_pipeline.learn.predict import predict_raster
    from abc_pipeline.learn.predictions import open_predictions
    from abc_pipeline.raster import open_raster, rasterize

    w = a.workdir
    w.mkdir(parents=True, exist_ok=True)
    cells = w / "cells.zarr"
    if not cells.exists():
        write_synthetic_release(w / "release", n_cells=a.cells, seed=0, progress=False)
        assemble_dataset("MERFISH-C57BL6J-638850", cache_dir=w / "release", out=cells, progress=False)
    raster = w / "section.ome.zarr"
    if not raster.exists():
        genes = [g for g, b in zip(CellSource(cells).gene_symbols, CellSource(cells).blank) if not b][: a.genes]
        rasterize(cells, raster, space="section", voxel_size=a.voxel, genes=genes, labels=["class"], progress=False)
    run = w / "celltype"
    if not (run / "checkpoint.pt").exists():
        train_atlas_task(
            raster,
            cells,
            "celltype",
            a.model,
            run,
            target_params=a.target_params,
            patch_size=a.patch_size,
            epochs=1,
            max_samples_per_epoch=2000,
            batch_size=128,
            progress=False,
        )

    def dense_pass() -> tuple[Path, dict]:
        with timed() as t:
            out = predict_raster(run / "checkpoint.pt", raster, w / "predictions.zarr", progress=False)
        return out, t

    out, dense_t = dense_pass()
    dense = np.asarray(open_predictions(out).cell_proba[:])

    model, ckpt = load_model(run / "checkpoint.pt")
    atlas = ckpt["config"]["config"]["atlas"]
    r, src = open_raster(raster), CellSource(cells)
    table, norm = ClassTable.from_dict(atlas["classes"]), Normalizer.from_dict(atlas["normalizer"])
    parts = []
    with timed() as loop_t:
        for split in SPLITS:
            ds = CellPatchDataset(r, src, table, split, atlas["splits"], norm, 2, model.patch_size, model.halo)
            parts.append((ds.cells, predict_proba(model, ds, batch_size=256, device="cpu").numpy()))
    _, again_t = dense_pass()
    idx = np.concatenate([c for c, _ in parts])
    loop = np.concatenate([p for _, p in parts])
    print(
        json.dumps(
            {
                "cells": int(r.voxel_index.shape[0]),
                "cells_in_loop": len(idx),
                "voxels": int(np.prod(r.grid.shape)),
                "grid": list(r.grid.shape),
                "model": a.model,
                "params": int(model.n_params),
                "patch_input": list(model.input_size),
                "threads": a.threads,
                "dense_s": round(dense_t["s"], 2),
                "patch_loop_s": round(loop_t["s"], 2),
                "speedup": round(loop_t["s"] / dense_t["s"], 1),
                "dense_cpu_s": round(dense_t["cpu_s"], 2),
                "patch_loop_cpu_s": round(loop_t["cpu_s"], 2),
                "cpu_speedup": round(loop_t["cpu_s"] / dense_t["cpu_s"], 1),
                "load_dense": dense_t["load"],
                "load_loop": loop_t["load"],
                "dense_again_s": round(again_t["s"], 2),
                "max_abs_diff": float(np.abs(dense[idx] - loop).max()),
            }
        )
    )


@contextmanager
def timed() -> Iterator[dict]:
    """Fills the yielded dict on exit: ``s`` wall seconds, ``cpu_s`` process CPU seconds (user + system,
    all threads), ``load`` the 1-minute load average before and after."""
    t, load, a, t0 = {}, os.getloadavg()[0], os.times(), time.perf_counter()
    yield t
    s, b = time.perf_counter() - t0, os.times()
    t.update(s=s, cpu_s=b.user - a.user + b.system - a.system, load=[round(load, 2), round(os.getloadavg()[0], 2)])


if __name__ == "__main__":
    main()
