"""bench-models: training-split subsets, one table with every column, cached re-runs, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from abc_pipeline.cli import main
from abc_pipeline.errors import InputError
from abc_pipeline.learn.compare import npz_task, subset_indices
from abc_pipeline.learn.medmnist import write_synthetic_npz

COLUMNS = [
    "model",
    "width",
    "first_layer_channels",
    "params",
    "accuracy",
    "balanced_accuracy",
    "auc",
    "worst_accuracy",
    "equivariance_error",
    "agreement_45deg",
    "seconds_per_epoch",
    "epochs",
    "best_epoch",
    "peak_memory_mb",
    "memory",
]


def test_subset_indices_stratified_and_deterministic() -> None:
    labels = np.repeat([0, 1, 2], [50, 30, 3])
    a = subset_indices(labels, 0.1, seed=0)
    assert np.array_equal(a, subset_indices(labels, 0.1, seed=0))
    assert not np.array_equal(a, subset_indices(labels, 0.1, seed=1))
    assert np.array_equal(np.bincount(labels[a]), [5, 3, 1])  # every class kept, at least one sample
    assert np.all(np.diff(a) > 0)
    assert np.array_equal(subset_indices(labels, 1.0), np.arange(len(labels)))
    with pytest.raises(InputError, match="fraction"):
        subset_indices(labels, 0.0)


def test_npz_task_keeps_a_fraction_of_training_data(tmp_path: Path) -> None:
    npz = write_synthetic_npz(tmp_path / "s.npz", size=8, n_per_split=(60, 12, 12))
    full, part = npz_task(npz), npz_task(npz, train_fraction=0.25)
    assert len(full.train) == 60 and len(part.train) == 15 and len(part.val) == len(part.test) == 12
    assert np.array_equal(np.bincount(part.train.targets.numpy()), [5, 5, 5])
    again = npz_task(npz, train_fraction=0.25)
    assert torch.equal(part.train.images, again.train.images)
    assert part.config["data"]["train_fraction"] == 0.25 and "25%" in part.name


def test_bench_models_writes_one_table_and_reuses_finished_runs(tmp_path: Path) -> None:
    npz = write_synthetic_npz(tmp_path / "rings.npz", size=12, n_per_split=(48, 24, 24))
    out = tmp_path / "bench"
    argv = [
        "-q",
        "bench-models",
        "--npz",
        str(npz),
        "--out",
        str(out),
        "--models",
        "cnn",
        "moment-trivial",
        "--target-params",
        "15000",
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--curve-samples",
        "8",
        "--no-progress",
    ]
    assert main(argv) == 0
    table = pd.read_csv(out / "bench_models.tsv", sep="\t")
    assert list(table.columns) == COLUMNS and list(table["model"]) == ["cnn", "moment-trivial"]
    for col in ("accuracy", "balanced_accuracy", "auc", "worst_accuracy", "agreement_45deg"):
        assert table[col].between(0, 1).all(), col
    assert (table["worst_accuracy"] <= table["accuracy"] + 1e-9).all()
    assert table["params"].between(10000, 20000).all() and (table["first_layer_channels"] >= 1).all()
    assert (table["epochs"] == 1).all() and (table["seconds_per_epoch"] > 0).all()
    assert (table["peak_memory_mb"] >= 0).all() and set(table["memory"]) == {"CPU RSS increase"}
    errors = dict(zip(table["model"], table["equivariance_error"]))
    assert errors["moment-trivial"] < 1e-4 < errors["cnn"]  # exact invariance vs none
    md = (out / "bench_models.md").read_text()
    assert "| moment-trivial |" in md and "worst-orientation accuracy" in md and "agreement at 45°" in md
    for name in (
        "equivariance_curve.png",
        "orientation.png",
        "cnn/training_curves.png",
        "moment-trivial/confusion_matrix.png",
        "cnn/checkpoint.pt",
    ):
        assert (out / name).stat().st_size > 1000, name
    record = json.loads((out / "moment-trivial" / "bench.json").read_text())
    assert record["curve"]["angles"] == [0, 15, 30, 45, 60, 75, 90] and record["curve"]["agreement"][0] == 1.0
    assert len(record["orientation"]["per_symmetry"]) == 8

    # a re-run reuses the finished models (no retraining), and the table is the same
    stamp = (out / "cnn" / "checkpoint.pt").stat().st_mtime_ns
    assert main(argv) == 0
    assert (out / "cnn" / "checkpoint.pt").stat().st_mtime_ns == stamp
    pd.testing.assert_frame_equal(pd.read_csv(out / "bench_models.tsv", sep="\t"), table)

    # changed settings retrain from scratch instead of resuming a run made with other settings
    assert main(argv[:-1] + ["--patience", "3", "--no-progress"]) == 0
    assert (out / "cnn" / "checkpoint.pt").stat().st_mtime_ns != stamp
    assert json.loads((out / "cnn" / "bench.json").read_text())["row"]["epochs"] == 1

    assert main(argv[:-1] + ["--angles", "0", "30", "--no-progress"]) == 2  # the 45° column needs 45°


def test_atlas_task_thins_training_sections(atlas: dict) -> None:
    from abc_pipeline.learn.atlas import atlas_task

    kw = {"tile_size": (2, 32, 32), "depth": 2}
    full = atlas_task(atlas["recon"], atlas["cells"], "region", **kw)
    part = atlas_task(atlas["recon"], atlas["cells"], "region", train_sections=0.3, **kw)
    z_full, z_part = full.config["atlas"]["splits"]["train"], part.config["atlas"]["splits"]["train"]
    assert set(z_part) < set(z_full) and len(z_part) >= 1
    assert part.config["atlas"]["splits"]["test"] == full.config["atlas"]["splits"]["test"]  # same test split
    assert len(part.train.targets) < len(full.train.targets) and "30% of training sections" in part.name
    assert (full.objective, full.head, full.dim) == ("segment", "segment", 3)
    with pytest.raises(InputError, match="train_sections"):
        atlas_task(atlas["recon"], atlas["cells"], "region", train_sections=0.0, **kw)


@pytest.mark.parametrize("task", ["celltype", "region"])
def test_bench_models_on_an_atlas_raster(atlas: dict, tmp_path: Path, task: str) -> None:
    raster, size = (
        (atlas["section"], ["--patch-size", "3", "--max-samples", "200"])
        if task == "celltype"
        else (atlas["recon"], ["--tile-size", "2", "32", "32", "--batch-size", "4"])
    )
    out = tmp_path / task
    argv = [
        "-q",
        "bench-models",
        "--raster",
        str(raster),
        "--cells",
        str(atlas["cells"]),
        "--task",
        task,
        "--out",
        str(out),
        "--models",
        "cnn",
        "moment-trivial",
        "logreg-expression",  # a baseline's run is written into the bench folder first
        "--target-params",
        "3000",
        "--depth",
        "2",
        "--epochs",
        "1",
        "--train-fraction",
        "0.5",
        "--curve-samples",
        "8",
        "--no-progress",
        *size,
    ]
    assert main(argv) == 0
    table = pd.read_csv(out / "bench_models.tsv", sep="\t")
    assert list(table["model"]) == ["cnn", "moment-trivial", "logreg-expression"]
    score = "accuracy" if task == "celltype" else "mean_dice"
    nets = table[table["model"] != "logreg-expression"]  # a baseline has no grid orientations: NaN
    assert table[score].between(0, 1).all() and (nets[f"worst_{score}"] <= nets[score] + 1e-9).all()
    errors = dict(zip(table["model"], table["equivariance_error"]))
    assert errors["moment-trivial"] < 1e-4 < errors["cnn"]
    record = json.loads((out / "cnn" / "bench.json").read_text())
    assert len(record["orientation"]["per_symmetry"]) == (8 if task == "celltype" else 16)  # 2D / anisotropic 3D
    assert "50% of training sections" in (out / "bench_models.md").read_text()
    assert main(argv[:6] + argv[8:]) == 2  # --raster without --task: a clear error
