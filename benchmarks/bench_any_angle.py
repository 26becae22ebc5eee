"""Accuracy at arbitrary angles of classifiers trained by ``abc-pipeline bench-models`` on a MedMNIST-format .npz.

    python benchmarks/bench_any_angle.py --npz rings.npz --bench runs/rings [--step 15] [--samples N]

For every model folder of the bench-models output (``BENCH/<model>/checkpoint.pt``, or those of ``--models``) the
test split (or its first ``--samples`` images) is rotated by 0, step, ..., 360 - step degrees
(``abc_pipeline.metrics.rotate``: bilinear, about the image centre, zero outside) and the accuracy of the best
checkpoint is measured at every angle. Prints one markdown row per model (accuracy at 0°, mean over the angles,
worst angle and its accuracy) and writes ``BENCH/any_angle[_<models>].tsv``.
The grid-group score of bench-models covers 90° multiples and reflections only; this covers the angles between.
``bench_escnn_peer.py`` imports :func:`any_angle_accuracy` so that its rows use the same measure.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from abc_pipeline.metrics import rotate


def any_angle_accuracy(
    predict: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor, angles: Sequence[float]
) -> dict:
    """Accuracy of ``predict`` (images ``(N, C, H, W)`` -> class scores ``(N, K)``) on ``x`` rotated by each
    angle (degrees) against labels ``y`` ``(N,)``: ``{"angles", "accuracy" (per angle), "mean", "worst",
    "worst_angle"}``."""
    acc = [float((predict(rotate(x, float(a))).argmax(1).cpu() == y).float().mean()) for a in angles]
    worst = int(np.argmin(acc))
    return {
        "angles": [float(a) for a in angles],
        "accuracy": acc,
        "mean": float(np.mean(acc)),
        "worst": acc[worst],
        "worst_angle": float(angles[worst]),
    }


def format_rows(rows: Sequence[dict]) -> str:
    lines = [
        "| model | accuracy at 0° | mean over angles | worst angle | worst accuracy |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['accuracy'][0]:.3f} | {r['mean']:.3f} | {r['worst_angle']:g}° | {r['worst']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    from abc_pipeline.fileio import atomic_write_text
    from abc_pipeline.learn.checkpoint import load_model
    from abc_pipeline.learn.compare import _stack, npz_task
    from abc_pipeline.learn.inference import predict_proba

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--npz", required=True, help="the MedMNIST-format .npz that bench-models was run on")
    ap.add_argument("--bench", type=Path, required=True, help="the bench-models output directory")
    ap.add_argument("--step", type=float, default=15.0, help="angle step in degrees")
    ap.add_argument("--samples", type=int, default=None, help="first N test images only (default all)")
    ap.add_argument("--models", nargs="+", default=None, help="model folders to score (default all)")
    a = ap.parse_args()
    x, y = _stack(npz_task(a.npz).test)
    x, y = x[: a.samples], y[: a.samples]
    angles = np.arange(0.0, 360.0, a.step)
    rows = []
    for ckpt in sorted(a.bench.glob("*/checkpoint.pt")):
        if a.models and ckpt.parent.name not in a.models:
            continue
        model, _ = load_model(ckpt)
        scores = any_angle_accuracy(lambda v, m=model: predict_proba(m, v), x, y, angles)
        rows.append({"model": ckpt.parent.name, **scores})
    print(format_rows(rows))
    table = pd.DataFrame([{k: v for k, v in r.items() if k not in ("angles", "accuracy")} for r in rows])
    name = "any_angle" + ("_" + "_".join(a.models) if a.models else "") + ".tsv"
    atomic_write_text(a.bench / name, table.to_csv(sep="\t", index=False, float_format="%.6g"))


if __name__ == "__main__":
    main()
