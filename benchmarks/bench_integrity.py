"""Cost of the data-safety checks against the work they guard.

1. ``integrity.nonfinite_rows`` on a chunk of X vs ``CellSource.read_X`` decoding that chunk (rasterize stage 1
   does both per chunk of cells);
2. ``integrity.verify_store`` (walks the store, counts chunk files) vs opening the same store with
   ``CellSource`` without it, for a store of many chunks.

Usage: python benchmarks/bench_integrity.py [--cells 200000] [--genes 500] [--chunk 50000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

from abc_pipeline.cells import CellSource
from abc_pipeline.fileio import staged_output
from abc_pipeline.integrity import chunk_counts, nonfinite_rows, verify_store


def _store(root: Path, n: int, g: int, chunk: int) -> Path:
    """A cells.zarr-like store (X float32, obs index, var index) with the pipeline's marker."""
    out = root / "cells.zarr"
    rng = np.random.default_rng(0)
    with staged_output(out, "cells") as tmp:
        group = zarr.open_group(str(tmp), mode="w", zarr_format=2)
        x = group.create_array("X", shape=(n, g), chunks=(chunk, g), dtype="float32")
        for s in range(0, n, chunk):
            block = rng.gamma(0.3, 2.0, size=(min(chunk, n - s), g)).astype(np.float32)
            block[block < 0.5] = 0
            x[s : s + len(block)] = block
        obs = group.create_group("obs")
        obs.attrs["_index"] = "_index"
        obs.create_array("_index", shape=(n,), chunks=(chunk,), dtype=str)[:] = np.array([f"c{i}" for i in range(n)])
        var = group.create_group("var")
        var.attrs["_index"] = "_index"
        var.create_array("_index", shape=(g,), chunks=(g,), dtype=str)[:] = np.array([f"g{i}" for i in range(g)])
        group.create_group("obsm")
    return out


def _best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, default=200_000)
    p.add_argument("--genes", type=int, default=500)
    p.add_argument("--chunk", type=int, default=50_000)
    p.add_argument("--repeat", type=int, default=5)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = _store(Path(tmp), a.cells, a.genes, a.chunk)
        src = CellSource(store)
        buf = np.empty((a.chunk, a.genes), np.float32)
        decode = _best(lambda: src.read_X(0, a.chunk, out=buf), a.repeat)
        check = _best(lambda: nonfinite_rows(buf), a.repeat)
        print(
            f"chunk {a.chunk} x {a.genes}: read_X {decode * 1e3:.1f} ms, nonfinite_rows {check * 1e3:.1f} ms "
            f"({check / decode:.1%} of the decode)"
        )
        n_files = sum(chunk_counts(store).values())
        verify = _best(lambda: verify_store(store, "fix"), a.repeat)
        open_ = _best(lambda: CellSource(store), a.repeat)
        print(
            f"store with {n_files} chunk files: verify_store {verify * 1e3:.1f} ms, CellSource() incl. verify "
            f"{open_ * 1e3:.1f} ms"
        )


if __name__ == "__main__":
    main()
