"""Workflow report: one metrics table over every trained model and an overview figure of the predictions.

``abc-pipeline report`` reads each run directory (``results/<dataset>/models/<task>/<model>/``: ``metrics.json``
of training, ``evaluation/metrics.json`` of ``abc-pipeline evaluate`` when present) and the annotated AnnData, and
writes ``metrics.tsv`` (networks and scikit-learn baselines side by side: per-cell ``cells_*`` scores from one
scoring function, any-angle ``any_angle_*`` scores), ``predictions_overview.png`` and ``any_angle.png``;
Snakemake's ``--report`` embeds them with the per-model evaluation figures.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import anndata
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import to_hex  # noqa: E402

from abc_pipeline import keys
from abc_pipeline.errors import InputError  # noqa: E402
from abc_pipeline.fileio import atomic_write_text, claim_directory, staged_output  # noqa: E402
from abc_pipeline.learn.tasks import TASKS  # noqa: E402
from abc_pipeline.plots import any_angle_figure  # noqa: E402

log = logging.getLogger(__name__)

_HEADLINE = ("accuracy", "balanced_accuracy", "macro_f1", "auc", "mean_dice", "mean_iou", "ari", "nmi")


def _flat_scores(prefix: str, metrics: dict) -> dict[str, float]:
    """The headline scalar metrics of a metrics mapping, prefixed (``val_accuracy``, ``test_mean_dice``...)."""
    return {f"{prefix}_{k}": float(v) for k, v in metrics.items() if k in _HEADLINE and v is not None}


def metrics_table(run_dirs: Sequence[Path]) -> pd.DataFrame:
    """One row per run directory: task, model, parameters, best epoch, validation/test and orientation scores."""
    rows = []
    for run in map(Path, run_dirs):
        path = run / "metrics.json"
        if not path.is_file():
            raise InputError(f"{path} does not exist; train the model first (abc-pipeline train --out {run})")
        metrics = json.loads(path.read_text())
        row = {
            "task": run.parent.name,
            "model": run.name,
            "parameters": metrics.get("n_params"),
            "best_epoch": metrics.get("best_epoch"),
            "epochs_run": metrics.get("epochs_run"),
            **_flat_scores("val", metrics.get("val", {})),
            **_flat_scores("test", metrics.get("test", {})),
        }
        evaluation = run / "evaluation" / "metrics.json"
        if evaluation.is_file():  # abc-pipeline evaluate: test split as is, and under every grid symmetry
            ev = json.loads(evaluation.read_text())
            row.update(_flat_scores("test", ev.get("test", {})))
            symmetry = ev.get("symmetry", {}).get("metrics", {})
            if symmetry:
                name, scores = next(iter(symmetry.items()))  # accuracy (cell type) or mean Dice (region)
                row.update({f"orientation_mean_{name}": scores["mean"], f"orientation_worst_{name}": scores["worst"]})
            curve = ev.get("equivariance_curve", {})
            if 45 in curve.get("angles", []):
                row["equivariance_agreement_45deg"] = curve["agreement"][curve["angles"].index(45)]
            row.update(_flat_scores("cells", ev.get("test_cells") or {}))  # one per-cell score for every model
            angle = ev.get("any_angle") or {}
            for name in angle.get("mean", {}):
                row.update(
                    {f"any_angle_mean_{name}": angle["mean"][name], f"any_angle_worst_{name}": angle["worst"][name]}
                )
            if angle:
                row["any_angle_worst_angle"] = angle["worst_angle"]["accuracy"]
        rows.append(row)
    return pd.DataFrame(rows)


def any_angle_panels(run_dirs: Sequence[Path]) -> dict[str, dict[str, tuple[list[float], list[float]]]]:
    """Per task, per model: the any-angle per-cell accuracies of ``evaluation/metrics.json`` (runs without
    them are left out)."""
    panels: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    for run in map(Path, run_dirs):
        path = run / "evaluation" / "metrics.json"
        angle = json.loads(path.read_text()).get("any_angle") if path.is_file() else None
        if angle:
            panels.setdefault(f"{run.parent.name}: {angle['n_cells']} test cells", {})[run.name] = (
                angle["angles"],
                angle["metrics"]["accuracy"],
            )
    return panels


def overview_figure(annotated: Path, path: Path, tasks: Sequence[str], max_sections: int = 2) -> Path:
    """True vs predicted labels per cell on the largest test sections (squidpy scatter), one row per section.

    Reads only ``obs``, ``uns`` and the drawn sections' ``obsm['spatial']`` rows of the h5ad (not X, nor the
    per-model probability tables in ``obsm``, several GB at the real atlas's 4 M cells)."""
    import h5py
    import squidpy as sq
    from anndata.io import read_elem

    with h5py.File(annotated, "r") as f:
        obs, uns = read_elem(f["obs"]), read_elem(f["uns"]) if "uns" in f else {}
    truth = dict.fromkeys(TASKS)
    meta = uns.get(keys.UNS, {}).get("predict", {})
    for col, info in meta.items():
        task = keys.task_of(col)
        if col == keys.prediction(task) and task in truth and "level" in info:
            truth[task] = info["level"]
    pairs = [(truth[t], keys.prediction(t)) for t in tasks if keys.prediction(t) in obs and truth.get(t) in obs]
    if not pairs:
        raise InputError(f"{annotated}: no pred_<task> column with its true level; run abc-pipeline annotate first")
    test = obs[obs[keys.SPLIT] == "test"] if keys.SPLIT in obs else obs
    sections = test[keys.SECTION].value_counts().index[:max_sections]
    colors = [c for pair in pairs for c in pair]
    fig, axes = plt.subplots(
        len(sections), len(colors), figsize=(4.2 * len(colors), 3.6 * len(sections)), squeeze=False
    )
    with h5py.File(annotated, "r") as f:  # the drawn sections' coordinates only
        rows = [np.flatnonzero((obs[keys.SECTION] == section).to_numpy()) for section in sections]
        spatial = [f["obsm"][keys.SPATIAL][r] for r in rows]
    for i, section in enumerate(sections):
        sub = anndata.AnnData(obs=obs.iloc[rows[i]][colors].copy(), obsm={keys.SPATIAL: spatial[i]})
        for col in colors:  # the section's categories and their colours (squidpy wants one colour per category)
            palette = dict(zip(obs[col].cat.categories, uns.get(keys.colors(col), [])))
            sub.obs[col] = sub.obs[col].cat.remove_unused_categories()
            if palette:  # the CCF gives some divisions one colour; squidpy needs distinct ones
                sub.uns[keys.colors(col)] = distinct_colors([palette[c] for c in sub.obs[col].cat.categories])
        for j, col in enumerate(colors):
            sq.pl.spatial_scatter(
                sub, shape=None, color=col, size=4, ax=axes[i, j], legend_loc=None, title=f"{section}: {col}"
            )
    fig.tight_layout()
    with staged_output(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def distinct_colors(colors: Sequence[str]) -> list[str]:
    """``colors`` (hex) with repeats nudged by the smallest blue-channel steps until every entry differs.

    The real Allen CCF parcellation gives several regions one colour (e.g. grey ``#cccccc`` for five
    divisions); squidpy's categorical colouring fails on repeated colours (``'Index' object has no attribute
    'add_categories'``), and a one-unit nudge is invisible."""
    seen: set[str] = set()
    out = []
    for color in colors:
        rgb = int(to_hex(color, keep_alpha=False)[1:], 16)
        step = 0
        candidate = f"#{rgb:06x}"
        while candidate in seen:
            step += 1
            blue = rgb & 0xFF
            nudged = blue + step if blue + step <= 0xFF else blue - step
            candidate = f"#{(rgb & 0xFFFF00) | (nudged & 0xFF):06x}"
        seen.add(candidate)
        out.append(candidate)
    return out


def write_report(annotated: Path, run_dirs: Sequence[Path], out_dir: Path) -> Path:
    """Write ``metrics.tsv``, ``predictions_overview.png`` and (when the runs were evaluated at any angle)
    ``any_angle.png`` (per-cell test accuracy against the rotation of the test sections, one line per model,
    one panel per task) into ``out_dir``; returns ``out_dir``."""
    out_dir = claim_directory(Path(out_dir), "report", inputs=[annotated, *run_dirs])
    table = metrics_table(run_dirs)
    atomic_write_text(out_dir / "metrics.tsv", table.to_csv(sep="\t", index=False, float_format="%.4f"))
    tasks = sorted(table["task"].unique())
    overview_figure(Path(annotated), out_dir / "predictions_overview.png", tasks)
    panels = any_angle_panels(run_dirs)
    if panels:
        any_angle_figure(panels, out_dir / "any_angle.png")
    log.info("report: %d runs -> %s", len(table), out_dir)
    return out_dir
