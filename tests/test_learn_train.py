"""Training loop: loss falls, kill-and-resume equals an uninterrupted run, checkpoint checks, segmentation."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from abc_pipeline.errors import InputError
from abc_pipeline.learn.checkpoint import load_checkpoint
from abc_pipeline.learn.medmnist import NpzDatasets, load_npz, write_synthetic_npz
from abc_pipeline.learn.train import class_counts, train

CLASSES = ["0", "1", "2"]
FAST = dict(batch_size=16, lr=5e-3, progress=False, device="cpu")


class Tiny(nn.Module):
    """A small classifier with dropout (so the RNG state matters when resuming)."""

    def __init__(self, n_classes: int = 3, name: str = "tiny") -> None:
        super().__init__()
        self.name, self.task = name, "classify"
        self.body = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(0.2),
            nn.Linear(8, n_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class InterruptAfter(Dataset):
    """Raises KeyboardInterrupt at the ``n + 1``-th item read: a run killed mid-epoch."""

    def __init__(self, ds: Dataset, n: int) -> None:
        self.ds, self.n, self.reads = ds, n, 0
        self.targets = ds.targets

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        self.reads += 1
        if self.reads > self.n:
            raise KeyboardInterrupt
        return self.ds[i]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> NpzDatasets:
    path = write_synthetic_npz(tmp_path_factory.mktemp("npz") / "s.npz", size=12, n_per_split=(48, 24, 24))
    return load_npz(path)


def _model(seed: int = 0, **kw) -> Tiny:
    torch.manual_seed(seed)
    return Tiny(**kw)


def test_loss_falls_and_outputs_written(data: NpzDatasets, tmp_path: Path) -> None:
    model = _model()
    res = train(model, data.train, data.val, tmp_path, class_names=CLASSES, epochs=6, seed=0, **{**FAST, "lr": 2e-2})
    hist = pd.read_csv(tmp_path / "history.tsv", sep="\t")
    assert list(hist.columns[:4]) == ["epoch", "train_loss", "val_loss", "val_balanced_accuracy"]
    assert {"lr", "seconds"} <= set(hist.columns) and len(hist) == res.epochs_run == 6
    assert hist.train_loss.iloc[-1] < hist.train_loss.iloc[0] - 0.05
    assert hist.lr.iloc[-1] < hist.lr.iloc[0]  # cosine schedule
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["best_epoch"] == res.best_epoch and metrics["config_hash"] == res.config_hash
    best = load_checkpoint(tmp_path / "checkpoint.pt")
    assert best["epoch"] == res.best_epoch and best["class_names"] == CLASSES and best["model_name"] == "tiny"
    assert best["config"]["lr"] == 2e-2 and best["config_hash"] == res.config_hash
    for k, v in best["model"].items():  # the returned model holds the best weights
        assert torch.equal(model.state_dict()[k], v)


def test_killed_then_resumed_equals_uninterrupted(data: NpzDatasets, tmp_path: Path) -> None:
    args = dict(class_names=CLASSES, epochs=4, seed=1, **FAST)
    straight = _model()
    train(straight, data.train, data.val, tmp_path / "a", **args)

    with pytest.raises(KeyboardInterrupt):  # dies in the 3rd epoch, after last.pt of epoch 2 was written
        train(_model(), InterruptAfter(data.train, 2 * len(data.train) + 5), data.val, tmp_path / "b", **args)
    assert load_checkpoint(tmp_path / "b" / "last.pt")["epoch"] == 1
    resumed = _model(seed=123)  # different initial weights: everything must come from last.pt
    train(resumed, data.train, data.val, tmp_path / "b", **args)

    for k, v in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k
    last_a, last_b = load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(tmp_path / "b" / "last.pt")
    for k, v in last_a["model"].items():
        assert torch.equal(last_b["model"][k], v), k
    assert torch.equal(last_a["rng_cpu"], last_b["rng_cpu"])
    ha, hb = (pd.read_csv(tmp_path / d / "history.tsv", sep="\t") for d in "ab")
    pd.testing.assert_frame_equal(ha.drop(columns="seconds"), hb.drop(columns="seconds"))


def test_checkpoint_mismatch_errors(data: NpzDatasets, tmp_path: Path) -> None:
    args = dict(epochs=1, seed=0, **FAST)
    train(_model(), data.train, data.val, tmp_path, class_names=CLASSES, **args)
    with pytest.raises(InputError, match=r"model 'tiny' != 'other'.*another output directory"):
        train(_model(name="other"), data.train, data.val, tmp_path, class_names=CLASSES, **args)
    with pytest.raises(InputError, match=r"class list differs \(3 vs 4 classes"):
        train(_model(n_classes=4), data.train, data.val, tmp_path, class_names=CLASSES + ["3"], **args)
    with pytest.raises(InputError, match=r"differs in lr"):
        train(_model(), data.train, data.val, tmp_path, class_names=CLASSES, **{**args, "lr": 1e-4})
    # resume=False starts over in the same directory
    res = train(_model(), data.train, data.val, tmp_path, class_names=CLASSES, resume=False, **{**args, "lr": 1e-4})
    assert res.epochs_run == 1


def test_resume_if_unchanged_starts_over_after_a_config_change(
    data: NpzDatasets, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The workflow's mode: a changed input (here lr) discards last.pt instead of failing; same config resumes."""
    args = dict(epochs=2, seed=0, **FAST)
    train(_model(), data.train, data.val, tmp_path, class_names=CLASSES, **args)
    with caplog.at_level(logging.WARNING, logger="abc_pipeline"):
        train(
            _model(), data.train, data.val, tmp_path, class_names=CLASSES, resume="if-unchanged", **{**args, "lr": 1e-4}
        )
    warning = next(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "configuration differs in lr; starting over" in warning and "--restart" not in warning
    history = pd.read_csv(tmp_path / "history.tsv", sep="\t")
    assert list(history["epoch"]) == [0, 1] and history["lr"].iloc[0] == pytest.approx(1e-4)  # started over
    mtime = (tmp_path / "last.pt").stat().st_mtime_ns
    train(_model(), data.train, data.val, tmp_path, class_names=CLASSES, resume="if-unchanged", **{**args, "lr": 1e-4})
    assert (tmp_path / "last.pt").stat().st_mtime_ns == mtime  # same config: resumed, nothing left to train


def test_rerun_rewrites_a_removed_best_checkpoint(data: NpzDatasets, tmp_path: Path) -> None:
    """Snakemake deletes a job's outputs before re-running it: checkpoint.pt must come back, with the best weights."""
    args = dict(epochs=3, seed=0, **FAST)
    train(_model(), data.train, data.val, tmp_path, class_names=CLASSES, **args)
    best = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    for output in ("checkpoint.pt", "metrics.json", "history.tsv"):  # the outputs Snakemake declares
        (tmp_path / output).unlink()
    train(_model(seed=1), data.train, data.val, tmp_path, class_names=CLASSES, **args)
    again = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert again["best_epoch"] == best["best_epoch"]
    for key, value in best["model"].items():
        torch.testing.assert_close(again["model"][key], value)
    assert (tmp_path / "metrics.json").is_file() and len(pd.read_csv(tmp_path / "history.tsv", sep="\t")) == 3


def test_early_stopping(data: NpzDatasets, tmp_path: Path) -> None:
    # lr = 0: nothing changes, so the validation score never improves after epoch 0
    res = train(
        _model(),
        data.train,
        data.val,
        tmp_path,
        class_names=CLASSES,
        epochs=10,
        patience=2,
        seed=0,
        **{**FAST, "lr": 0.0},
    )
    assert res.stopped_early and res.epochs_run == 3 and res.best_epoch == 0


class TinySegmenter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.name, self.task = "tiny-seg", "segment"
        self.conv = nn.Conv2d(1, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_segmentation_with_ignored_voxels(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(32, 1, 8, 8, generator=g)
    y = (x[:, 0] > 0.5).long()
    y[:, :2] = -1  # no cells in the top rows: they must count neither in the loss nor in the metric
    ds = TensorDataset(x, y)
    counts = class_counts(ds, 2)
    assert int(counts.sum()) == 32 * 6 * 8
    torch.manual_seed(0)
    res = train(TinySegmenter(), ds, ds, tmp_path, class_names=["bg", "fg"], epochs=8, seed=0, **{**FAST, "lr": 0.2})
    hist = pd.read_csv(tmp_path / "history.tsv", sep="\t")
    assert res.metric == "mean_dice" and "val_ari" in hist.columns
    assert hist.train_loss.iloc[-1] < hist.train_loss.iloc[0]
    assert res.best_score > 0.85
