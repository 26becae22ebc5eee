"""Atlas tasks end to end on the synthetic atlas: train (loss falls), dense predict (== the patch classifier
per cell), write-back to h5ad (scanpy/squidpy), grid-symmetry invariance of moment predictions, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import torch
import zarr
from plot_checks import check_spatial_scatter

from abc_pipeline.cells import CellSource
from abc_pipeline.cli import main
from abc_pipeline.errors import InputError
from abc_pipeline.learn.annotate import annotate_cells
from abc_pipeline.learn.atlas import train_atlas_task
from abc_pipeline.learn.checkpoint import load_model
from abc_pipeline.learn.data import CellPatchDataset, ClassTable, Normalizer, RasterReader
from abc_pipeline.learn.inference import predict_proba
from abc_pipeline.learn.predict import predict_raster
from abc_pipeline.nn import build_model, grid_group, transform
from abc_pipeline.raster import open_raster, rasterize


def _losses(run: Path) -> list[float]:
    return pd.read_csv(run / "history.tsv", sep="\t")["train_loss"].tolist()


def test_training_loss_falls(atlas):
    for task, run in (("celltype", "ct"), ("region", "rg")):
        losses = _losses(atlas["out"] / "models" / run)
        assert len(losses) == 4 and losses[-1] < losses[0], (task, losses)
        m = json.loads((atlas["out"] / "models" / run / "metrics.json").read_text())
        assert m["atlas_task"] == task and m["test"] and m["n_test"] > 0
        zs = sorted(z for v in m["splits"].values() for z in v)
        assert zs == list(range(len(zs)))  # the splits partition the z indices
    ckpt = torch.load(atlas["out"] / "models" / "rg" / "checkpoint.pt", weights_only=True)
    a = ckpt["config"]["config"]["atlas"]
    assert a["dim"] == 3 and a["voxel_size"] == [0.2, 0.1, 0.1] and ckpt["model_spec"]["spacing"] == [0.2, 0.1, 0.1]
    assert len(a["channels"]) == 12 and len(a["normalizer"]["mean"]) == 12 and "unassigned" not in a["classes"]["names"]


def test_dense_prediction_equals_patch_classifier_per_cell(atlas):
    run = atlas["out"] / "models" / "ct"
    out = predict_raster(
        run / "checkpoint.pt",
        atlas["section"],
        run / "predictions.zarr",
        cells=atlas["cells"],
        tile_size=40,
        progress=False,
    )
    model, ckpt = load_model(run / "checkpoint.pt")
    a = ckpt["config"]["config"]["atlas"]
    r, src = open_raster(atlas["section"]), CellSource(atlas["cells"])
    ds = CellPatchDataset(
        r,
        src,
        ClassTable.from_dict(a["classes"]),
        "test",
        a["splits"],
        Normalizer.from_dict(a["normalizer"]),
        2,
        model.patch_size,
        model.halo,
    )
    patch = predict_proba(model, ds, device="cpu").numpy()
    g = zarr.open_group(str(out), mode="r")
    dense = np.asarray(g["cells/proba"][:])[ds.cells]
    np.testing.assert_allclose(dense, patch, atol=2e-5)  # same voxel-wise arithmetic, other summation order
    np.testing.assert_array_equal(np.asarray(g["cells/pred"][:])[ds.cells], dense.argmax(1))
    meta = g.attrs["abc_pipeline"]["predictions"]
    assert meta["metrics"]["test_cells"]["accuracy"] == pytest.approx(
        json.loads((run / "metrics.json").read_text())["test"]["accuracy"], abs=1e-9
    )
    labels = np.asarray(g["labels/pred_celltype/0"][:])
    tissue = np.asarray(r.n_cells.compute()) > 0
    assert (labels[~tissue] == 0).all() and (labels[tissue] >= 1).all()
    np.testing.assert_array_equal(labels[tissue] - 1, np.asarray(g["0"][:]).argmax(0)[tissue])


def test_predictions_invariant_for_moment_model_not_cnn(atlas):
    """Random-weight patch classifiers on the real raster: rotating/reflecting the input sections rotates
    the moment model's dense prediction map exactly (logits and classes); the CNN's logits change."""
    r = open_raster(atlas["section"])
    norm = Normalizer(np.zeros(12), np.ones(12))
    plane = RasterReader(r, norm).window((1, 10, 20), (1, 48, 48))[:, 0]
    x = torch.from_numpy(plane)[None].double()
    for name, equivariant in (("moment-trivial", True), ("cnn", False)):
        torch.manual_seed(0)
        m = build_model(name, 2, 13, 5, head="patch", width=6, depth=3, patch_size=3).double().eval()
        with torch.no_grad():
            ref = m.forward_dense(x)
            errors = [
                float((m.forward_dense(transform(x, g)) - transform(ref, g)).abs().max()) for g in grid_group(2)[1:]
            ]
            changed = [
                float((m.forward_dense(transform(x, g)).argmax(1) != transform(ref, g).argmax(1)).float().mean())
                for g in grid_group(2)[1:]
            ]  # predicted classes
        if equivariant:
            assert max(errors) < 1e-10 and max(changed) == 0
        else:
            assert min(errors) > 1e-3


def test_annotate_h5ad_opens_in_scanpy_and_squidpy(atlas, tmp_path, monkeypatch):
    import scanpy as sc
    import scipy.sparse

    from abc_pipeline.learn import annotate

    rg = atlas["out"] / "models" / "rg"
    pred_rg = predict_raster(
        rg / "checkpoint.pt",
        atlas["recon"],
        tmp_path / "rg.zarr",
        cells=atlas["cells"],
        tile_size=(2, 24, 24),
        halo=(1, 4, 4),
        progress=False,
    )
    pred_rg2 = predict_raster(
        rg / "checkpoint.pt", atlas["recon"], tmp_path / "rg2.zarr", tile_size=(4, 40, 40), halo=2, progress=False
    )
    pred_ct = atlas["out"] / "models" / "ct" / "predictions.zarr"
    if not pred_ct.exists():
        predict_raster(atlas["out"] / "models" / "ct" / "checkpoint.pt", atlas["section"], pred_ct, progress=False)
    n_genes = zarr.open_group(str(atlas["cells"]), mode="r")["X"].shape[1]
    monkeypatch.setattr(annotate, "_COPY_BYTES", 1000 * n_genes * 4)  # blocks of 1,000 rows: X appended block-wise
    out = annotate_cells(atlas["cells"], [pred_rg, pred_ct, pred_rg2], tmp_path / "cells_annotated.h5ad")
    a = sc.read_h5ad(out)
    cells = anndata.read_zarr(atlas["cells"])
    assert list(a.obs_names) == list(cells.obs_names)
    assert cells.n_obs > 2000  # at least three blocks
    assert scipy.sparse.issparse(a.X) and a.X.format == "csr" and np.array_equal(a.X.toarray(), cells.X)
    np.testing.assert_array_equal(a.obsm["spatial"], cells.obsm["spatial"])
    assert "assemble" in a.uns["abc_pipeline"] and a.uns["class_colors"].tolist() == list(cells.uns["class_colors"])
    for col in ("pred_region", "pred_celltype", "pred_region__moment-trivial"):
        assert isinstance(a.obs[col].dtype, pd.CategoricalDtype)
        cats = list(a.obs[col].cat.categories)
        assert len(a.uns[f"{col}_colors"]) == len(cats)
        proba = a.obsm[f"{col}_proba"]
        assert list(proba.columns) == cats and proba.index.equals(a.obs_names)
        has = a.obs[col].notna().to_numpy()
        np.testing.assert_allclose(proba[has].sum(axis=1), 1.0, atol=1e-5)
        assert proba[~has].isna().all().all()
        assert (np.asarray(cats)[proba[has].to_numpy().argmax(1)] == a.obs.loc[has, col].astype(str)).all()
    r = open_raster(atlas["recon"])
    no_voxel = np.asarray(r.voxel_index[:, 0]) < 0
    assert no_voxel.any() and a.obs["pred_region"].isna().to_numpy().tolist() == no_voxel.tolist()
    assert (a.obs.loc[no_voxel, "split"] == "none").all() and set(a.obs["split"]) == {"train", "val", "test", "none"}
    table = dict(zip(r.labels["parcellation_division"].categories, r.labels["parcellation_division"].colors))
    assert list(a.uns["pred_region_colors"]) == [table[c] for c in a.obs["pred_region"].cat.categories]
    meta = a.uns["abc_pipeline"]["predict"]["pred_region"]
    assert meta["model"] == "moment-trivial" and meta["level"] == "parcellation_division"
    assert "test_cells" in meta["metrics"] and "accuracy" in meta["metrics"]["test_cells"]
    # Cells with a prediction only: the real CCF colours repeat (fibre tracts share #CCCCCC), and squidpy 1.6's
    # categorical colour map breaks on repeated colours when the column also holds missing values.
    check_spatial_scatter(a[~no_voxel], "pred_region", library_key="brain_section_label")


def test_cli_train_predict_annotate_and_resume(atlas, tmp_path):
    run = tmp_path / "models" / "region" / "cnn"
    args = [
        "train",
        "--raster",
        str(atlas["section"]),
        "--task",
        "region",
        "--model",
        "cnn",
        "--width",
        "4",
        "--depth",
        "2",
        "--tile-size",
        "32",
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--out",
        str(run),
        "--no-progress",
    ]
    assert main(args) == 0
    history = (run / "history.tsv").read_text()
    assert main(args) == 0 and (run / "history.tsv").read_text() == history  # finished run: resumed, nothing redone
    pred = tmp_path / "predictions.zarr"
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(run / "checkpoint.pt"),
                "--raster",
                str(atlas["section"]),
                "--cells",
                str(atlas["cells"]),
                "--out",
                str(pred),
                "--tile-size",
                "64",
                "--halo",
                "8",
                "--no-progress",
            ]
        )
        == 0
    )
    assert (
        main(
            ["annotate", "--cells", str(atlas["cells"]), "--predictions", str(pred), "--out", str(tmp_path / "a.h5ad")]
        )
        == 0
    )
    assert (tmp_path / "a.h5ad").is_file() and not list(tmp_path.glob(".*tmp*"))


def test_bad_inputs(atlas, tmp_path):
    ct = atlas["out"] / "models" / "ct" / "checkpoint.pt"
    other = rasterize(
        atlas["cells"],
        tmp_path / "other.ome.zarr",
        space="section",
        voxel_size=0.1,
        genes=CellSource(atlas["cells"]).gene_symbols[:6],
        labels=["class"],
        progress=False,
    )
    with pytest.raises(InputError, match=r"has 6 feature channels.*trained on 12"):
        predict_raster(ct, other, tmp_path / "p.zarr", progress=False)
    assert not (tmp_path / "p.zarr").exists()
    with pytest.raises(InputError, match="needs --cells"):
        train_atlas_task(atlas["section"], None, "celltype", "cnn", tmp_path / "y", progress=False)
    with pytest.raises(InputError, match="section raster"):
        train_atlas_task(atlas["section"], atlas["cells"], "celltype", "cnn", tmp_path / "z", dim=3, progress=False)
    bad_cells = tmp_path / "cells_copy.zarr"
    shutil.copytree(atlas["cells"], bad_cells)
    names = zarr.open_group(str(bad_cells), mode="a")["obs"]["cell_label"]
    names[0] = "someone-else"
    with pytest.raises(InputError, match="not rasterized from"):
        predict_raster(ct, atlas["section"], tmp_path / "q.zarr", cells=bad_cells, progress=False)
    with pytest.raises(InputError, match="another cells.zarr"):
        annotate_cells(
            bad_cells,
            [predict_raster(ct, atlas["section"], tmp_path / "c.zarr", progress=False)],
            tmp_path / "bad.h5ad",
        )
    assert not (tmp_path / "bad.h5ad").exists()
