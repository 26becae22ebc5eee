"""Per-cell test scores of the cell-context classifier vs logistic regressions, per label level.

For every ``--levels`` entry: trains the cell-context model (``abc-pipeline train --architecture cell-context``,
resumed when its run folder exists), and fits scikit-learn ``LogisticRegression`` on the training sections'
cells with (1) the cell's own standardised expression (the raster's channels applied per cell:
``logreg-expression``) and (2) own + mean expression of its ``k`` nearest cells of the same section in section
coordinates (``logreg-neighborhood``). All are scored on every labelled test-section cell with
:func:`abc_pipeline.metrics.classification_metrics` (accuracy, balanced accuracy, macro-F1).

The logistic regressions here are the benchmark's references on identical cells and splits; the pipeline's
own ``logreg-*`` models (baselines work) should give the same figures.

    OMP_NUM_THREADS=1 python benchmarks/bench_cell_context.py --raster R --cells C --out DIR \\
        --task celltype --levels class subclass supertype cluster --width 12 --epochs 60
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import NearestNeighbors
from sklearn.preprocessing import StandardScaler

from abc_pipeline.learn.atlas import atlas_data, train_atlas_task
from abc_pipeline.learn.cell_context import cell_expression
from abc_pipeline.learn.data import cell_splits
from abc_pipeline.metrics import classification_metrics

SCORES = ("accuracy", "balanced_accuracy", "macro_f1")


def neighborhood_mean(expr: np.ndarray, xy: np.ndarray, section: np.ndarray, k: int) -> np.ndarray:
    """Mean expression of each cell's ``k`` nearest other cells of its section (section coordinates)."""
    out = np.zeros_like(expr)
    for s in np.unique(section):
        idx = np.flatnonzero(section == s)
        kk = min(k + 1, len(idx))
        _, nn = NearestNeighbors(n_neighbors=kk).fit(xy[idx]).kneighbors(xy[idx])
        out[idx] = expr[idx][nn[:, 1:]].mean(axis=1)
    return out


def logreg(x_train, y_train, x_test) -> np.ndarray:
    scaler = StandardScaler().fit(x_train)
    model = LogisticRegression(max_iter=500).fit(scaler.transform(x_train), y_train)
    proba = np.zeros((len(x_test), int(y_train.max()) + 1))
    proba[:, model.classes_] = model.predict_proba(scaler.transform(x_test))
    return proba


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--raster", type=Path, required=True)
    p.add_argument("--cells", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--task", default="celltype", choices=("celltype", "region"))
    p.add_argument("--levels", nargs="+", default=["class", "subclass", "supertype", "cluster"])
    p.add_argument("--model", default="moment-trivial-irrep")
    p.add_argument("--width", type=int, default=12)
    p.add_argument("--patch-size", type=int, default=5)
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--patience", type=int, default=20)
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
            width=a.width,
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
        data = atlas_data(a.raster, a.cells, a.task, level=level, architecture="cell-context")
        split = np.asarray(cell_splits(data.raster, data.splits).astype(str))
        cat = data.cells.categorical(level)
        codes = np.asarray(cat.codes.compute())
        y = np.where(codes >= 0, data.table.lookup(cat.categories)[np.clip(codes, 0, None)], -1)
        keep = (y >= 0) & np.isin(split, ["train", "test"])
        rows_all = np.flatnonzero(keep)
        expr = cell_expression(data.cells, data.plan, rows_all)
        xy = np.asarray(data.cells.coordinates("spatial")[rows_all].compute())[:, :2]
        section = np.asarray(data.cells.categorical("brain_section_label").codes[rows_all].compute())
        neigh = np.hstack([expr, neighborhood_mean(expr, xy, section, a.k)])
        tr, te = split[rows_all] == "train", split[rows_all] == "test"
        for name, x in (("logreg-expression", expr), (f"logreg-neighborhood (k={a.k})", neigh)):
            t0 = time.perf_counter()
            proba = logreg(x[tr], y[rows_all][tr], x[te])
            m = classification_metrics(y[rows_all][te], proba, data.table.names)
            rows.append(
                {
                    "level": level,
                    "model": name,
                    "n_test": int(te.sum()),
                    "params": None,
                    "seconds": round(time.perf_counter() - t0),
                    **{s: m[s] for s in SCORES},
                }
            )
        table = pd.DataFrame(rows)
        table.to_csv(a.out / "bench_cell_context.tsv", sep="\t", index=False, float_format="%.4f")
        print(table.to_string(index=False), flush=True)
    (a.out / "bench_cell_context.json").write_text(json.dumps(vars(a), default=str, indent=1))


if __name__ == "__main__":
    main()
