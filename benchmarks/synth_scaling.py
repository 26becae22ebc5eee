"""Synthetic release generation: wall and CPU seconds, peak RSS and bytes written for several cell counts.

Each size runs in a subprocess and writes to a temporary folder that is removed afterwards. Peak RSS is the
largest over the children run so far (getrusage), so list sizes in increasing order.

    python benchmarks/synth_scaling.py --cells 200000 1000000 [--chunk-cells 200000] [--tmp DIR]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = """
import json, resource, sys, time
from pathlib import Path
from abc_pipeline.atlas.synthetic import write_synthetic_release
out, n, chunk = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
t = time.perf_counter()
write_synthetic_release(out, n_cells=n, chunk_cells=chunk, progress=False)
wall = time.perf_counter() - t
size = sum(p.stat().st_size for p in out.rglob('*') if p.is_file())
print(json.dumps({"wall_s": wall, "bytes": size}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, nargs="+", default=[200_000, 1_000_000])
    parser.add_argument("--chunk-cells", type=int, default=200_000)
    parser.add_argument("--tmp", type=Path, default=None, help="scratch folder (default: system temp)")
    args = parser.parse_args()
    print("| cells | chunk_cells | wall s | CPU s | peak RSS MB | written GB | wall s per M cells |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n in args.cells:
        with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            done = subprocess.run(
                [sys.executable, "-c", _CHILD, str(Path(tmp) / "release"), str(n), str(args.chunk_cells)],
                check=True,
                capture_output=True,
                text=True,
            )
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            result = json.loads(done.stdout.strip().splitlines()[-1])
            cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
            print(
                f"| {n:,} | {args.chunk_cells:,} | {result['wall_s']:.1f} | {cpu:.1f} | {after.ru_maxrss / 1024:.0f} "
                f"| {result['bytes'] / 1e9:.2f} | {result['wall_s'] / n * 1e6:.1f} |",
                flush=True,
            )
            shutil.rmtree(Path(tmp) / "release", ignore_errors=True)


if __name__ == "__main__":
    main()
