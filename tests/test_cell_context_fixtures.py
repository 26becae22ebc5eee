"""The cell-context classifier on two hand-made atlases, against a logistic regression on each cell's own
expression (logreg-expression), both scored per cell on the test sections:

(a) the label is a function of the cell's own expression only (cells placed at random): the network matches
    logreg-expression, so the cell's own expression reaches the network;
(b) the label is the cell's neighbourhood (the dense or the sparse half of every section), while every
    cell's expression is drawn from one distribution: logreg-expression is at chance, the network is not;
(c) before any training step, the network's linear path fitted by ``fit_linear_path`` already scores as
    logreg-expression (the network starts as the baseline).
Then predict writes one class per cell that differs between cells of a voxel, and reproduces the training
run's per-cell test scores."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from raster_fixtures import write_cells
from sklearn.linear_model import LogisticRegression

from abc_pipeline.learn.atlas import atlas_data, train_atlas_task
from abc_pipeline.learn.cell_context import cell_expression, expression_stats, fit_linear_path
from abc_pipeline.learn.data import cell_splits
from abc_pipeline.learn.inference import predict_proba
from abc_pipeline.learn.predict import predict_raster
from abc_pipeline.metrics import classification_metrics
from abc_pipeline.nn import build_model
from abc_pipeline.raster import rasterize

N_SECTIONS, SIDE, GENES = 6, 2.0, 4  # sections of SIDE x SIDE mm, 0.1 mm voxels


def _atlas(tmp: Path, kind: str) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    xy, sections, labels = [], [], []
    for s in range(N_SECTIONS):
        if kind == "own":  # uniform density; label from expression below
            pts = rng.uniform(0, SIDE, (500, 2))
            lab = np.zeros(len(pts), dtype=int)
        else:  # neighbourhood: dense left half (3 cells per voxel), sparse right half (0.3 per voxel)
            dense = np.column_stack([rng.uniform(0, SIDE / 2, 600), rng.uniform(0, SIDE, 600)])
            sparse = np.column_stack([rng.uniform(SIDE / 2, SIDE, 200), rng.uniform(0, SIDE, 200)])
            pts = np.vstack([dense, sparse])
            lab = np.r_[np.zeros(len(dense), int), np.ones(len(sparse), int)]
        xy.append(pts)
        labels.append(lab)
        sections += [f"S{s}"] * len(pts)
    xy, labels = np.vstack(xy), np.concatenate(labels)
    expr = rng.normal(0, 1, (len(xy), GENES)).astype(np.float32)
    if kind == "own":
        labels = expr[:, :3].argmax(1)
    names = ["A", "B", "C"] if kind == "own" else ["dense", "sparse"]
    cells = write_cells(
        tmp / "cells.zarr",
        expr,
        spatial=xy,
        sections=sections,
        section_order=[f"S{s}" for s in range(N_SECTIONS)],
        labels={"class": ([names[k] for k in labels], names)},
        chunk=512,
    )
    raster = rasterize(cells, tmp / "r.ome.zarr", space="section", voxel_size=0.1, labels=["class"], progress=False)
    return cells, raster


def _logreg_expression(cells: Path, raster: Path) -> tuple[dict, dict]:
    """logreg-expression and the split's class indices, per test cell."""
    data = atlas_data(raster, cells, "celltype", split_fractions=(4, 1, 1))
    split = np.asarray(cell_splits(data.raster, data.splits).astype(str))
    cat = data.cells.categorical("class")
    y = data.table.lookup(cat.categories)[np.asarray(cat.codes.compute())]
    rows = np.arange(len(y))
    x = cell_expression(data.cells, data.plan, rows)
    tr, te = split == "train", split == "test"
    proba = LogisticRegression(max_iter=1000).fit(x[tr], y[tr]).predict_proba(x[te])
    return classification_metrics(y[te], proba, data.table.names), {"n_test": int(te.sum())}


def _train(cells: Path, raster: Path, out: Path) -> dict:
    return train_atlas_task(
        raster,
        cells,
        "celltype",
        "moment-trivial-irrep",
        out,
        width=4,
        depth=2,
        patch_size=3,
        epochs=40,
        lr=1e-2,
        patience=40,
        split_fractions=(4, 1, 1),
        progress=False,
    )


def _small_model(cells: Path, raster: Path, n_classes: int, **kwargs):
    """The atlas's data (patch 3, sections split 4:1:1) and a seeded width-4 moment cell-context model on it."""
    data = atlas_data(raster, cells, "celltype", patch_size=3, split_fractions=(4, 1, 1))
    torch.manual_seed(0)
    model = build_model(
        "moment-trivial-irrep",
        2,
        data.normalizer.in_channels,
        n_classes,
        "cell-context",
        width=4,
        depth=2,
        spacing=data.spacing,
        patch_size=data.patch,
        **kwargs,
    )
    return data, model


def test_own_expression_reaches_the_network(tmp_path):
    cells, raster = _atlas(tmp_path, "own")
    logreg, info = _logreg_expression(cells, raster)
    m = _train(cells, raster, tmp_path / "run")
    assert m["n_test"] == info["n_test"] and m["architecture"] == "cell-context"
    assert logreg["accuracy"] > 0.9
    assert m["test"]["accuracy"] >= logreg["accuracy"] - 0.03, (m["test"]["accuracy"], logreg["accuracy"])

    # predict: one class per cell (cells sharing a voxel differ), the run's per-cell test scores reproduced
    out = predict_raster(
        tmp_path / "run" / "checkpoint.pt", raster, tmp_path / "pred.zarr", cells=cells, progress=False
    )
    g = zarr.open_group(str(out), mode="r")
    pred, proba = np.asarray(g["cells/pred"][:]), np.asarray(g["cells/proba"][:])
    assert (pred >= 0).all() and np.allclose(proba.sum(1), 1, atol=1e-5)
    np.testing.assert_array_equal(pred, proba.argmax(1))
    vox = np.asarray(zarr.open_group(str(raster), mode="r")["cells/voxel_index"][:])
    _, first, inverse = np.unique(vox, axis=0, return_index=True, return_inverse=True)
    assert (pred != pred[first][inverse.ravel()]).any()  # not one class per voxel
    meta = g.attrs["abc_pipeline"]["predictions"]["metrics"]["test_cells"]
    assert meta["accuracy"] == pytest.approx(m["test"]["accuracy"], abs=1e-6)
    assert "_context" not in g


def test_neighbourhood_label_beats_own_expression(tmp_path):
    cells, raster = _atlas(tmp_path, "neighbourhood")
    logreg, _ = _logreg_expression(cells, raster)
    m = _train(cells, raster, tmp_path / "run")
    assert logreg["balanced_accuracy"] < 0.6  # own expression says nothing about the label
    assert m["test"]["balanced_accuracy"] > logreg["balanced_accuracy"] + 0.2, (m["test"], logreg)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["test"] == m["test"]


def test_untrained_network_with_fitted_linear_path_scores_as_logreg(tmp_path):
    cells, raster = _atlas(tmp_path, "own")
    logreg, _ = _logreg_expression(cells, raster)
    data, model = _small_model(cells, raster, 3)
    train_ds, test_ds = data.dataset("train", model.halo), data.dataset("test", model.halo)
    model.set_normalization(*expression_stats(train_ds.expression.numpy()), data.normalizer.mean, data.normalizer.std)
    fit = fit_linear_path(model, train_ds, 3)
    assert fit["cells"] == int((train_ds.targets >= 0).sum()) and fit["train_accuracy"] > 0.9
    proba = predict_proba(model, test_ds, batch_size=2, device=torch.device("cpu")).numpy()
    network = classification_metrics(test_ds.targets.numpy(), proba, data.table.names)
    assert network["accuracy"] == pytest.approx(logreg["accuracy"], abs=0.02), (network, logreg)


def test_kept_neighbourhood_means_give_the_logits_of_computing_them_per_batch(tmp_path):
    """A section dataset's means, computed once plane by plane, hand each batch what the model computes from the
    batch's planes; beyond the byte budget nothing is kept."""
    cells, raster = _atlas(tmp_path, "neighbourhood")
    data, model = _small_model(cells, raster, 2, neighborhood_radii=(1.5, 6.0))
    model.eval()
    ds = data.dataset("train", model.halo)
    batch = [ds[0], ds[1]]
    (planes, expression, where), _ = ds.collate(batch)
    assert not ds.keep_means(model, max_bytes=len(ds.cells) * 2 * 5 * 4 - 1) and ds.means is None
    assert ds.keep_means(model) and ds.means.shape == (len(ds.cells), 2 * 5)
    (planes_kept, expression_kept, where_kept, means), targets = ds.collate([ds[0], ds[1]])
    torch.testing.assert_close(means, model.neighborhood_at(planes, where), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(
            model(planes_kept, expression_kept, where_kept, means),
            model(planes, expression, where),
            rtol=1e-5,
            atol=1e-5,
        )
    assert len(targets) == len(means)
