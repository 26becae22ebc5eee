"""Per-cell test scores of the cell-context network vs the scikit-learn baselines, per label level.

For every ``--levels`` entry: trains the cell-context model (``abc-pipeline train --architecture cell-context``
with the library's defaults but for the given size and schedule; resumed when its run folder exists) and the
pipeline's own baselines ``logreg-expression`` and ``logreg-neighborhood`` (``abc-pipeline train --model
logreg-*``: :func:`abc_pipeline.learn.baselines.train_baseline`) on the same raster, split and seed. Every model
is scored on every labelled test-section cell by its training run (``metrics.json``'s ``test``: accuracy,
balanced accuracy, macro-F1), the same function for all.

    OMP_NUM_THREADS=1 python benchmarks/bench_cell_context.py --raster R --cells C --out DIR \\
        --task celltype --levels class subclass supertype cluster --target-params 20000 --epochs 30
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd

from abc_pipeline.learn.atlas import train_atlas_task
from abc_pipeline.learn.baselines import train_baseline

SCORES = ("accuracy", "balanced_accuracy", "macro_f1")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--raster", type=Path, required=True)
    p.add_argument("--cells", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--task", default="celltype", choices=("celltype", "region"))
    p.add_argument("--levels", nargs="+", default=["class", "subclass", "supertype", "cluster"])
    p.add_argument("--model", default="moment-trivial-irrep")
    p.add_argument("--target-params", type=int, default=20000)
    p.add_argument("--patch-size", type=int, default=5)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--patience", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.003)
    p.add_argument("--max-samples", type=int, default=None, help="3D rasters (patch training): cells per epoch")
    p.add_argument("--k", type=int, default=16, help="neighbours of logreg-neighborhood")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for level in a.levels:
        t0 = time.perf_counter()
        metrics = train_atlas_task(
            a.raster,
            a.cells,
            a.task,
            a.model,
            a.out / f"{level}-{a.model}",
            level=level,
            target_params=a.target_params,
            patch_size=a.patch_size,
            epochs=a.epochs,
            batch_size=a.batch_size,
            lr=a.lr,
            patience=a.patience,
            max_samples_per_epoch=a.max_samples,
            progress=False,
            architecture="cell-context",
        )
        seconds = time.perf_counter() - t0
        rows.append(
            {
                "level": level,
                "model": f"{a.model} cell-context",
                "n_test": metrics["n_test"],
                "params": metrics["n_params"],
                "seconds": round(seconds),
                **{s: metrics["test"][s] for s in SCORES},
            }
        )
        for name in ("logreg-expression", "logreg-neighborhood"):
            t0 = time.perf_counter()
            m = train_baseline(a.raster, a.cells, a.task, name, a.out / f"{level}-{name}", level=level, neighbors=a.k)
            rows.append(
                {
                    "level": level,
                    "model": name,
                    "n_test": None,
                    "params": m["n_params"],
                    "seconds": round(time.perf_counter() - t0),
                    **{s: m["test_cells"][s] for s in SCORES},
                }
            )
        table = pd.DataFrame(rows)
        table.to_csv(a.out / "bench_cell_context.tsv", sep="\t", index=False, float_format="%.4f")
        print(table.to_string(index=False), flush=True)
    (a.out / "bench_cell_context.json").write_text(json.dumps(vars(a), default=str, indent=1))


if __name__ == "__main__":
    main()
