"""The scikit-learn baselines as first-class models: train / predict / evaluate / annotate through the CLI,
checkpoints without pickle, one per-cell scoring function for every model, rotation invariance of the
neighbourhood features, and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import anndata
import numpy as np
import pytest
import torch
import zarr

from abc_pipeline.cells import CellSource
from abc_pipeline.cli import main
from abc_pipeline.errors import InputError
from abc_pipeline.learn.annotate import annotate_cells
from abc_pipeline.learn.any_angle import rotate_points
from abc_pipeline.learn.baselines import SectionNeighbours, train_baseline
from abc_pipeline.learn.predict import predict_raster
from abc_pipeline.learn.scoring import cell_targets, score_cells
from abc_pipeline.raster.ome import ATTRS_KEY


@pytest.fixture(scope="module")
def baseline_run(atlas, tmp_path_factory) -> Path:
    """logreg-neighborhood (k = 8) on the section raster's cell types, trained and predicted through the CLI."""
    run = tmp_path_factory.mktemp("baseline") / "logreg-neighborhood"
    common = ["--raster", str(atlas["section"]), "--cells", str(atlas["cells"])]
    assert (
        main(
            [
                "train",
                *common,
                "--task",
                "celltype",
                "--model",
                "logreg-neighborhood",
                "--neighbors",
                "8",
                "--out",
                str(run),
                "--restart-if-changed",
                "--no-progress",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(run / "checkpoint.pt"),
                *common,
                "--out",
                str(run / "predictions.zarr"),
                "--no-progress",
            ]
        )
        == 0
    )
    return run


def test_baseline_runs_like_a_network(atlas, baseline_run):
    metrics = json.loads((baseline_run / "metrics.json").read_text())
    assert metrics["model"] == "logreg-neighborhood" and metrics["atlas_task"] == "celltype"
    assert 0.0 <= metrics["test"]["accuracy"] <= 1.0 and metrics["test_cells"] == metrics["test"]
    ckpt = torch.load(baseline_run / "checkpoint.pt", weights_only=True)  # tensors and plain values only
    assert metrics["n_params"] == ckpt["model"]["coef"].numel() + ckpt["model"]["intercept"].numel()
    assert ckpt["baseline"]["neighbors"] == 8 and ckpt["model"]["coef"].shape[1] == 2 * 12
    assert (baseline_run / "history.tsv").read_text().count("\n") == 2
    store = zarr.open_group(str(baseline_run / "predictions.zarr"), mode="r")
    meta = store.attrs[ATTRS_KEY]["predictions"]
    proba = np.asarray(store["cells/proba"][:])
    assert proba.shape == (CellSource(atlas["cells"]).n_cells, len(meta["class_names"]))
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(store["cells/pred"][:]), proba.argmax(1))
    # voxel volumes: the majority class of each voxel's cells, 0 where there are no cells
    label = np.asarray(store["labels/pred_celltype/0"][:])
    voxels = np.asarray(zarr.open_group(str(atlas["section"]), mode="r")["cells/voxel_index"][:])
    z, y, x = voxels[voxels[:, 0] >= 0][0]
    in_voxel = (voxels == (z, y, x)).all(axis=1)
    votes = np.bincount(proba[in_voxel].argmax(1), minlength=proba.shape[1])
    assert label[z, y, x] == votes.argmax() + 1 and (label > 0).sum() == len({tuple(v) for v in voxels if v[0] >= 0})
    # the evaluation scores its test cells with the same function as the stored metrics
    out = baseline_run / "evaluation"
    assert (
        main(
            [
                "evaluate",
                "--checkpoint",
                str(baseline_run / "checkpoint.pt"),
                "--raster",
                str(atlas["section"]),
                "--cells",
                str(atlas["cells"]),
                "--predictions",
                str(baseline_run / "predictions.zarr"),
                "--out",
                str(out),
                "--any-angles",
                "0",
                "90",
                "45",
                "--any-angle-sections",
                "1",
            ]
        )
        == 0
    )
    ev = json.loads((out / "metrics.json").read_text())
    stored = meta["metrics"]["test_cells"]  # one score function, stored by predict and recorded by evaluate
    for key in ("n_cells", "accuracy", "balanced_accuracy", "macro_f1", "auc"):
        assert ev["test_cells"][key] == pytest.approx(stored[key], abs=1e-12), key
    assert ev["any_angle"]["angles"] == [0.0, 90.0, 45.0] and len(set(ev["any_angle"]["metrics"]["accuracy"])) == 1
    assert {"confusion_matrix.png", "maps.png", "any_angle.png"} <= {p.name for p in out.iterdir()}


def test_baseline_predictions_land_in_the_h5ad_beside_the_network(atlas, baseline_run, tmp_path):
    net = atlas["out"] / "models" / "ct"
    store = predict_raster(
        net / "checkpoint.pt", atlas["section"], tmp_path / "net.zarr", cells=atlas["cells"], progress=False
    )
    out = annotate_cells(atlas["cells"], [store, baseline_run / "predictions.zarr"], tmp_path / "annotated.h5ad")
    adata = anndata.read_h5ad(out)
    assert "pred_celltype" in adata.obs and "pred_celltype__logreg-neighborhood" in adata.obs
    assert adata.uns["abc_pipeline"]["predict"]["pred_celltype__logreg-neighborhood"]["model"] == "logreg-neighborhood"
    assert adata.obsm["pred_celltype__logreg-neighborhood_proba"].notna().all(axis=None)


def test_one_scoring_function_gives_the_hand_computed_metrics_for_any_model(atlas, baseline_run, tmp_path):
    """A network's and a baseline's stores holding the same per-cell predictions score identically, and equal
    accuracy, balanced accuracy and macro-F1 computed by hand."""
    net = predict_raster(
        atlas["out"] / "models" / "ct" / "checkpoint.pt",
        atlas["section"],
        tmp_path / "net.zarr",
        cells=atlas["cells"],
        progress=False,
    )
    same = tmp_path / "baseline_same.zarr"
    shutil.copytree(baseline_run / "predictions.zarr", same)
    network_proba = np.asarray(zarr.open_group(str(net), mode="r")["cells/proba"][:])
    zarr.open_group(str(same), mode="a")["cells/proba"][:] = network_proba
    a, b = score_cells(net, atlas["cells"]), score_cells(same, atlas["cells"])
    assert zarr.open_group(str(same), mode="r").attrs[ATTRS_KEY]["predictions"]["model"] == "logreg-neighborhood"
    # by hand: the test cells with a voxel and a class
    meta = zarr.open_group(str(net), mode="r").attrs[ATTRS_KEY]["predictions"]
    split = np.asarray(zarr.open_group(str(net), mode="r")["cells/split"][:])
    rows = np.flatnonzero(split == 2)
    y = cell_targets(CellSource(atlas["cells"]), meta["level"], meta["class_names"], rows)
    p = network_proba[rows]
    keep = (y >= 0) & np.isfinite(p).all(axis=1)
    y, pred = y[keep], p[keep].argmax(1)
    recalls = [np.mean(pred[y == c] == c) for c in np.unique(y)]
    f1 = []
    for c in np.union1d(y, pred):
        tp, fp, fn = np.sum((pred == c) & (y == c)), np.sum((pred == c) & (y != c)), np.sum((pred != c) & (y == c))
        f1.append(2 * tp / (2 * tp + fp + fn))
    hand = {"accuracy": np.mean(pred == y), "balanced_accuracy": np.mean(recalls), "macro_f1": np.mean(f1)}
    for metric, value in hand.items():
        assert a[metric] == pytest.approx(value, abs=1e-12) and b[metric] == a[metric], metric
    assert a["n_cells"] == b["n_cells"] == keep.sum()


def test_neighbourhood_features_do_not_change_under_rotation():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 3, size=(400, 2))
    section = np.repeat([0, 1], 200).astype(np.int32)
    values = rng.normal(size=(400, 5)).astype(np.float32)
    rows = np.arange(400)
    before = SectionNeighbours(xy, section, 16).mean(rows, values)
    turned = xy.copy()
    for s in (0, 1):
        at = section == s
        turned[at] = rotate_points(xy[at], xy[at].mean(axis=0), 37.0)
    np.testing.assert_allclose(SectionNeighbours(turned, section, 16).mean(rows, values), before, atol=1e-6)


def test_bad_input_names_the_key_and_the_fix(atlas, tmp_path):
    common = {"raster": atlas["section"], "cells": atlas["cells"], "task": "celltype", "out_dir": tmp_path / "run"}
    with pytest.raises(InputError, match=r"no column 'klass' \(the --level option, tasks.celltype.level"):
        train_baseline(**common, model_name="logreg-expression", level="klass")
    with pytest.raises(InputError, match=r"single class \('brain'\).*choose a finer level \(--level"):
        train_baseline(**{**common, "task": "region"}, model_name="logreg-expression", level="parcellation_organ")
    with pytest.raises(InputError, match=r"--neighbors is 100000, but section .* holds only \d+ cells.*at most"):
        train_baseline(**common, model_name="logreg-neighborhood", neighbors=100_000)
    with pytest.raises(InputError, match="--neighbors must be a positive whole number"):
        train_baseline(**common, model_name="logreg-neighborhood", neighbors=0)
    assert not (tmp_path / "run").exists()
