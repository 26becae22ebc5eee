"""`abc-pipeline evaluate` on tiny trained atlas models: a 2D celltype patch classifier and a 3D region U-Net
(moment models, exactly invariant / equivariant) and a 2D celltype CNN (not); outputs, values, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import zarr

from abc_pipeline.cli import main
from abc_pipeline.errors import InputError
from abc_pipeline.learn.atlas import train_atlas_task
from abc_pipeline.learn.evaluate_run import _read_box, evaluate_run
from abc_pipeline.learn.predict import predict_raster
from abc_pipeline.learn.tasks import TASKS

PNG = b"\x89PNG\r\n\x1a\n"
FIGURES = ("confusion_matrix.png", "maps.png", "training_curves.png", "equivariance_curve.png", "orientation.png")


@pytest.fixture(scope="module")
def runs(atlas: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Predictions of the shared celltype (2D) and region (3D) moment runs, plus a tiny 2D celltype CNN patch
    classifier (all context: a cell-context CNN starts from its exactly invariant linear path and would differ
    under the group only after longer training)."""
    out = tmp_path_factory.mktemp("evaluate_run")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cnn = out / "cnn"
        train_atlas_task(
            atlas["section"],
            atlas["cells"],
            "celltype",
            "cnn",
            cnn,
            width=6,
            depth=2,
            patch_size=3,
            epochs=4,
            batch_size=64,
            lr=5e-3,
            max_samples_per_epoch=800,
            progress=False,
            architecture="patch",
        )
        result = {"cnn": cnn, "ct": atlas["out"] / "models" / "ct", "rg": atlas["out"] / "models" / "rg"}
        raster = {"cnn": atlas["section"], "ct": atlas["section"], "rg": atlas["recon"]}
        for key, run in result.items():
            predict_raster(
                run / "checkpoint.pt", raster[key], out / f"{key}.zarr", cells=atlas["cells"], progress=False
            )
    finally:
        torch.set_num_threads(n)
    return {"out": out, "runs": result, "raster": raster, "cells": atlas["cells"]}


def _evaluate(runs: dict, key: str, out: Path, **kw) -> dict:
    return evaluate_run(
        runs["runs"][key] / "checkpoint.pt",
        runs["raster"][key],
        runs["out"] / f"{key}.zarr",
        out,
        cells=runs["cells"],
        **kw,
    )


def _check_outputs(out: Path, result: dict) -> None:
    """Files, PNGs, metric ranges and the metrics.tsv of one evaluation."""
    for name in FIGURES:
        data = (out / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000, name
    stored = json.loads((out / "metrics.json").read_text())
    assert stored["test"].keys() == result["test"].keys() and stored["n_test"] == result["n_test"] > 0
    table = pd.read_csv(out / "metrics.tsv", sep="\t")
    assert not table.duplicated(["scope", "metric"]).any()
    per_cell = {"test_cells", "any_angle", "any_angle_mean", "any_angle_worst"} if result.get("test_cells") else set()
    assert set(table["scope"]) == {
        "test",
        "symmetry_identity",
        "symmetry_mean",
        "symmetry_worst",
        "equivariance_curve",
        *per_cell,
    }
    values = table["value"].dropna()
    ari = table["metric"] == "ari"
    assert values[~ari].between(0, 1).all() and values[ari].between(-1, 1).all()
    for metric, s in result["symmetry"]["metrics"].items():
        assert s["worst"] <= s["mean"] + 1e-12 and s["per_symmetry"][s["worst_symmetry"]] == s["worst"], metric
        assert len(s["per_symmetry"]) == result["symmetry"]["group_size"]
    curve = result["equivariance_curve"]
    assert curve["angles"] == [0, 15, 30, 45, 60, 75, 90] and curve["agreement"][0] == 1.0 and min(curve["n"]) > 0
    assert not list(out.parent.glob(f".{out.name}.tmp*"))


def test_celltype_2d_moment(runs, tmp_path):
    out = tmp_path / "evaluation"
    result = _evaluate(runs, "ct", out)
    _check_outputs(out, result)
    assert result["symmetry"]["group_size"] == 8 and result["symmetry"]["n"] > 100
    assert set(result["test"]) >= {"accuracy", "balanced_accuracy", "macro_f1", "f1", "auc"}
    stored = zarr.open_group(str(runs["out"] / "ct.zarr"), mode="r").attrs["abc_pipeline"]["predictions"]["metrics"]
    assert result["test"]["accuracy"] == pytest.approx(stored["test_cells"]["accuracy"], abs=1e-12)
    assert result["symmetry"]["identity_agreement"] == 1.0  # the windows reproduce predictions.zarr's cells
    for metric in TASKS["celltype"].symmetry_metrics:  # an invariant classifier: one score under the whole group
        values = list(result["symmetry"]["metrics"][metric]["per_symmetry"].values())
        assert max(values) - min(values) < 1e-9, metric
    assert result["equivariance_curve"]["agreement"][-1] > 0.999  # 90°: an exact grid rotation of square windows


def test_celltype_2d_cnn_differs_under_the_group(runs, tmp_path):
    result = _evaluate(runs, "cnn", tmp_path / "evaluation", windows=1)
    per = result["symmetry"]["metrics"]["accuracy"]["per_symmetry"]
    assert len(set(per.values())) > 1 and result["symmetry"]["metrics"]["accuracy"]["worst"] < max(per.values())
    assert result["equivariance_curve"]["agreement"][-1] < 1.0


def test_region_3d_moment_via_cli(runs, tmp_path):
    out = tmp_path / "evaluation"
    run = runs["runs"]["rg"]
    assert (
        main(
            [
                "evaluate",
                "--checkpoint",
                str(run / "checkpoint.pt"),
                "--raster",
                str(runs["raster"]["rg"]),
                "--predictions",
                str(runs["out"] / "rg.zarr"),
                "--out",
                str(out),
                "--window-size",
                "32",
                "--halo",
                "4",
            ]
        )
        == 0
    )
    result = json.loads((out / "metrics.json").read_text())
    _check_outputs(out, result)
    assert result["symmetry"]["group_size"] == 16 and result["symmetry"]["unit"] == "voxels"
    assert {"dice", "iou", "mean_dice", "ari", "nmi"} <= set(result["test"]) and result["test_unit"] == "voxels"
    for metric in TASKS["region"].symmetry_metrics:  # equivariant U-Net: one score under the whole group
        values = list(result["symmetry"]["metrics"][metric]["per_symmetry"].values())
        assert max(values) - min(values) < 1e-9, metric
    window = result["symmetry"]["windows"][0]
    assert window["core_size"][1:] == [32, 32] and window["box_size"] == [window["core_size"][0] + 8, 40, 40]
    # the windows see their test block with zero planes around it, as in prediction: the identity's classes
    # match predictions.zarr up to the U-Net's dependence on the tile start (pooling grid)
    assert result["symmetry"]["identity_agreement"] > 0.8


def test_bad_inputs(runs, atlas, tmp_path):
    ct, rg = runs["runs"]["ct"] / "checkpoint.pt", runs["runs"]["rg"] / "checkpoint.pt"
    out = tmp_path / "evaluation"
    with pytest.raises(InputError, match=r"was not predicted by .*task 'celltype' \(checkpoint: 'region'\)"):
        evaluate_run(rg, runs["raster"]["rg"], runs["out"] / "ct.zarr", out, cells=runs["cells"])
    with pytest.raises(InputError, match="not the raster .* was trained on"):
        evaluate_run(ct, runs["raster"]["rg"], runs["out"] / "ct.zarr", out, cells=runs["cells"])
    with pytest.raises(InputError, match=r"model 'cnn' with config hash"):
        evaluate_run(ct, runs["raster"]["ct"], runs["out"] / "cnn.zarr", out, cells=runs["cells"])
    with pytest.raises(InputError, match="needs --cells"):
        evaluate_run(ct, runs["raster"]["ct"], runs["out"] / "ct.zarr", out)
    with pytest.raises(InputError, match="not a predictions store"):
        evaluate_run(ct, runs["raster"]["ct"], atlas["section"], out, cells=runs["cells"])
    assert not out.exists() and not list(tmp_path.glob(".*tmp*"))


def test_read_box_fills_outside_the_volume(tmp_path):
    volume = zarr.open_array(str(tmp_path / "v.zarr"), mode="w", shape=(2, 3, 4), chunks=(1, 3, 4), dtype="u2")
    volume[:] = 1 + torch.arange(24).reshape(2, 3, 4).numpy()
    box = _read_box(volume, (-1, 1, 2), (4, 3, 3))
    assert box.shape == (4, 3, 3) and (box[0] == 0).all() and (box[3] == 0).all() and (box[:, 2] == 0).all()
    assert (box[1:3, :2, :2] == volume[:, 1:, 2:]).all() and (box[:, :, 2] == 0).all()
