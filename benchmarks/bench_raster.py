"""Rasterization benchmark: time vs one Dask read pass over X, peak RSS vs cells, thread scaling.

Results: docs/benchmarks.md, "Rasterization".

    python benchmarks/bench_raster.py [--workdir /tmp/abc_bench_raster] [--reps 3]

Writes synthetic contract-conforming cells.zarr stores (``synthetic_cells.py``; 0.5 M, 1 M, 2 M cells
x 500 genes) once, then runs every measurement in a fresh subprocess (peak RSS from
``resource.getrusage``; wall time measured inside the child around the call only):

* read limit: ``da.from_zarr(X).sum(axis=0).compute()`` with 2 threads (the same X chunks);
* rasterize 1 M cells into 3D reconstructed grids (all 490 non-blank genes + n_cells, 4 label volumes,
  3 pyramid levels) with 2 threads; ratio = median rasterize time / median read time, read and
  rasterize runs interleaved so that machine noise hits both; the same ratio of process CPU times
  (all threads) is reported too, as it is less sensitive to other load on the machine;
* peak RSS of rasterize at 0.5 M and 2 M cells on the same grid;
* rasterize with 1 vs 2 threads (1 M cells).

Prints a JSON summary and a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Fixed bounds (mm; z, y, x) covering the synthetic brain, so grids are identical for every size.
BOUNDS = [(0.0, 11.0), (0.0, 8.0), (0.0, 11.0)]
GRIDS = {"200um": (0.2, 0.2, 0.2), "100um": (0.2, 0.1, 0.1), "50um": (0.2, 0.05, 0.05)}


# ----------------------------------------------------------------------------------- child side
def _child(argv: list[str]) -> None:
    import resource

    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["read", "raster"])
    p.add_argument("--cells", required=True)
    p.add_argument("--out")
    p.add_argument("--voxel", type=float, nargs=3)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    sys.path.insert(0, str(HERE.parent))
    import dask.array as da
    import zarr

    from abc_pipeline.raster import rasterize

    start, cpu = time.perf_counter(), time.process_time()
    if a.mode == "read":
        x = da.from_zarr(zarr.open_group(a.cells, mode="r")["X"])
        x.sum(axis=0).compute(scheduler="threads", num_workers=a.threads)
    else:
        rasterize(
            a.cells,
            a.out,
            space="reconstructed",
            voxel_size=tuple(a.voxel),
            bounds=BOUNDS,
            levels=3,
            num_workers=a.threads,
            progress=False,
            overwrite=True,
        )
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"wall_s": wall, "cpu_s": cpu, "peak_rss_mb": rss_mb}))


# ----------------------------------------------------------------------------------- parent side
def _run(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "_child", *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _store(workdir: Path, n: int) -> Path:
    path = workdir / f"cells_{n // 1000}k.zarr"
    if not path.exists():
        print(f"writing {path} ...", file=sys.stderr)
        subprocess.run([sys.executable, str(HERE / "synthetic_cells.py"), str(path), "--cells", str(n)], check=True)
    return path


def _raster(cells: Path, workdir: Path, grid: str, threads: int = 2) -> dict:
    # Outputs are kept until the end (``main``): on ext4, creating files shortly after deleting thousands
    # of others is slow (the inode allocator skips recently deleted inodes), which inflated later runs'
    # system CPU time 2x when each output was deleted right after its run.
    outputs = workdir / "outputs"
    out = outputs / f"raster_{grid}_{len(list(outputs.glob('*')))}.ome.zarr"
    r = _run(
        "raster", "--cells", str(cells), "--out", str(out), "--voxel", *map(str, GRIDS[grid]), "--threads", str(threads)
    )
    r["output_mb"] = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 1e6
    return r


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        _child(sys.argv[2:])
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/abc_bench_raster"))
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--grids", nargs="+", default=["200um", "100um", "50um"], choices=list(GRIDS))
    a = p.parse_args()
    a.workdir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(a.workdir / "outputs", ignore_errors=True)
    (a.workdir / "outputs").mkdir()
    c1m, c05m, c2m = _store(a.workdir, 1_000_000), _store(a.workdir, 500_000), _store(a.workdir, 2_000_000)
    x_mb = sum(f.stat().st_size for f in (c1m / "X").rglob("*") if f.is_file()) / 1e6
    results: dict = {"x_1m_on_disk_mb": x_mb, "ratio": {}}

    _run("read", "--cells", str(c1m))  # warm the page cache
    for grid in a.grids:
        reads, rasters = [], []
        for _ in range(a.reps):
            reads.append(_run("read", "--cells", str(c1m)))
            rasters.append(_raster(c1m, a.workdir, grid))
        t_read = statistics.median(r["wall_s"] for r in reads)
        t_raster = statistics.median(r["wall_s"] for r in rasters)
        cpu_read = statistics.median(r["cpu_s"] for r in reads)
        cpu_raster = statistics.median(r["cpu_s"] for r in rasters)
        results["ratio"][grid] = {
            "read_s": [r["wall_s"] for r in reads],
            "raster_s": [r["wall_s"] for r in rasters],
            "ratio": t_raster / t_read,
            "read_cpu_s": [r["cpu_s"] for r in reads],
            "raster_cpu_s": [r["cpu_s"] for r in rasters],
            "cpu_ratio": cpu_raster / cpu_read,
            "output_mb": rasters[0]["output_mb"],
            "peak_rss_mb": max(r["peak_rss_mb"] for r in rasters),
        }
        print(grid, json.dumps(results["ratio"][grid]), file=sys.stderr)

    rss_grid = "100um"
    results["rss"] = {n: _raster(c, a.workdir, rss_grid) for n, c in (("0.5M", c05m), ("2M", c2m))}
    results["rss"]["grid"] = rss_grid
    print("rss", json.dumps(results["rss"]), file=sys.stderr)

    one = [_raster(c1m, a.workdir, rss_grid, threads=1)["wall_s"] for _ in range(a.reps)]
    two = [_raster(c1m, a.workdir, rss_grid, threads=2)["wall_s"] for _ in range(a.reps)]
    results["threads"] = {
        "grid": rss_grid,
        "1": one,
        "2": two,
        "speedup": statistics.median(one) / statistics.median(two),
    }
    shutil.rmtree(a.workdir / "outputs")
    print(json.dumps(results, indent=1))

    print(
        "\n| grid (z, y, x mm) | read X (s) | rasterize (s) | ratio | CPU read / rasterize (s) | CPU ratio | output (MB) | peak RSS (MB) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for grid, r in results["ratio"].items():
        print(
            f"| {grid} {GRIDS[grid]} | {statistics.median(r['read_s']):.1f} | {statistics.median(r['raster_s']):.1f} "
            f"| {r['ratio']:.2f} | {statistics.median(r['read_cpu_s']):.1f} / {statistics.median(r['raster_cpu_s']):.1f} "
            f"| {r['cpu_ratio']:.2f} | {r['output_mb']:.0f} | {r['peak_rss_mb']:.0f} |"
        )
    rss = results["rss"]
    print(
        f"\npeak RSS ({rss_grid}): 0.5 M cells {rss['0.5M']['peak_rss_mb']:.0f} MB, 2 M cells {rss['2M']['peak_rss_mb']:.0f} MB "
        f"(ratio {rss['2M']['peak_rss_mb'] / rss['0.5M']['peak_rss_mb']:.2f}); times {rss['0.5M']['wall_s']:.1f} s, {rss['2M']['wall_s']:.1f} s"
    )
    th = results["threads"]
    print(
        f"threads ({rss_grid}, 1 M): 1 -> {statistics.median(th['1']):.1f} s, 2 -> {statistics.median(th['2']):.1f} s, "
        f"speed-up {th['speedup']:.2f}"
    )


if __name__ == "__main__":
    main()
