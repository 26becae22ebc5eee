"""Assembly benchmark: wall time and peak RSS of `abc-pipeline assemble` on synthetic releases of several sizes.

Each size runs `synth` (cached under --work) and then `assemble` in a fresh subprocess whose peak RSS is read
with ``resource.getrusage(RUSAGE_CHILDREN)``. Prints a Markdown table.

    python benchmarks/bench_assemble.py --cells 500000 2000000 --work /tmp/abc-bench
"""

from __future__ import annotations

import argparse
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path


def _run(args: list[str]) -> tuple[float, float]:
    """Run a command in a child process; returns (seconds, peak RSS of that child in MiB)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    subprocess.run(args, check=True)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak <= before:
        raise RuntimeError("peak RSS of the child is hidden by an earlier, larger child; run one size per process")
    return seconds, peak / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cells", type=int, nargs="+", default=[500_000, 2_000_000])
    parser.add_argument("--work", type=Path, default=Path("/tmp/abc-bench-assemble"))
    parser.add_argument("--chunk-cells", type=int, default=100_000)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    cli = [sys.executable, "-m", "abc_pipeline.cli", "-q"]

    if not args.child:  # one process per size, so each size's ru_maxrss is its own
        rows = []
        for n in sorted(args.cells):
            out = (
                subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--child",
                        "--cells",
                        str(n),
                        "--work",
                        str(args.work),
                        "--chunk-cells",
                        str(args.chunk_cells),
                    ],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                .stdout.strip()
                .splitlines()[-1]
            )
            rows.append(out)
        print(
            f"machine: {platform.processor() or platform.machine()}, {platform.system()}, python {platform.python_version()}"
        )
        print("| cells | synth s | assemble s | assemble s / M cells | assemble peak RSS MiB |")
        print("|---|---|---|---|---|")
        print("\n".join(rows))
        return

    n = args.cells[0]
    release = args.work / f"release_{n}"
    if not (release / "releases").exists():
        shutil.rmtree(release, ignore_errors=True)
        synth_s, _ = _run([*cli, "synth", "--out", str(release), "--cells", str(n), "--seed", "0"])
    else:
        synth_s = float("nan")
    out = args.work / f"cells_{n}.zarr"
    seconds, rss = _run(
        [
            *cli,
            "assemble",
            "--cache",
            str(release),
            "--out",
            str(out),
            "--chunk-cells",
            str(args.chunk_cells),
            "--no-progress",
        ]
    )
    print(f"| {n:,} | {synth_s:.0f} | {seconds:.1f} | {seconds / (n / 1e6):.1f} | {rss:.0f} |")


if __name__ == "__main__":
    main()
