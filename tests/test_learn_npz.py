"""`abc-pipeline train-npz`: a zoo model trains on a small synthetic MedMNIST-format file and is tested."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from abc_pipeline.cli import main
from abc_pipeline.learn.checkpoint import load_model
from abc_pipeline.learn.inference import predict_proba
from abc_pipeline.learn.medmnist import load_npz, write_synthetic_npz


def test_train_npz_cli(tmp_path: Path) -> None:
    npz = write_synthetic_npz(tmp_path / "rings.npz", size=12, n_per_split=(48, 24, 24))
    out = tmp_path / "run"
    argv = [
        "-q",
        "train-npz",
        "--npz",
        str(npz),
        "--model",
        "cnn",
        "--width",
        "4",
        "--epochs",
        "3",
        "--batch-size",
        "16",
        "--lr",
        "0.01",
        "--device",
        "cpu",
        "--no-progress",
        "--out",
        str(out),
    ]
    assert main(argv) == 0

    hist = pd.read_csv(out / "history.tsv", sep="\t")
    assert len(hist) == 3 and hist.train_loss.iloc[-1] < hist.train_loss.iloc[0]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"] == "cnn" and metrics["width"] == 4
    assert set(metrics["test"]) >= {"accuracy", "balanced_accuracy", "macro_f1", "f1", "auc"}
    orient = metrics["test_orientation"]
    assert len(orient["per_symmetry"]) == 8 and orient["worst"] <= orient["mean"]

    model, ckpt = load_model(out / "checkpoint.pt")  # rebuilt from model_spec; same test accuracy
    test = load_npz(npz).test
    acc = float((predict_proba(model, test.images).argmax(1) == test.targets).float().mean())
    assert acc == pytest.approx(metrics["test"]["accuracy"]) and ckpt["epoch"] == metrics["best_epoch"]

    # a second call resumes from last.pt: nothing left to train, same best epoch
    assert main(argv) == 0
    assert json.loads((out / "metrics.json").read_text())["best_epoch"] == metrics["best_epoch"]
    # an .npz without the expected keys: exit status 2, no traceback
    bad = tmp_path / "bad.npz"
    np.savez(bad, images=np.zeros((2, 4, 4)))
    assert main(["-q", "train-npz", "--npz", str(bad), "--model", "cnn", "--out", str(tmp_path / "x")]) == 2
