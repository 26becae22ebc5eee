"""MedMNIST-format .npz datasets: synthetic writer, loading, bad files, the offline/no-package path."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from abc_pipeline.errors import InputError
from abc_pipeline.learn.medmnist import REQUIRED_KEYS, load_npz, open_npz, write_synthetic_npz


def test_synthetic_file_format_and_determinism(tmp_path: Path) -> None:
    a = write_synthetic_npz(tmp_path / "a.npz", size=12, n_per_split=(9, 6, 6), seed=3)
    b = write_synthetic_npz(tmp_path / "b.npz", size=12, n_per_split=(9, 6, 6), seed=3)
    with np.load(a) as za, np.load(b) as zb:
        assert sorted(za.files) == sorted(REQUIRED_KEYS)
        for k in REQUIRED_KEYS:
            np.testing.assert_array_equal(za[k], zb[k])
        assert za["train_images"].shape == (9, 12, 12) and za["train_images"].dtype == np.uint8
        assert za["train_labels"].shape == (9, 1)
        assert np.bincount(za["train_labels"][:, 0]).tolist() == [3, 3, 3]


@pytest.mark.parametrize("dim, channels, shape", [(2, 1, (1, 10, 10)), (2, 3, (3, 10, 10)), (3, 1, (1, 10, 10, 10))])
def test_load_npz_layouts(tmp_path: Path, dim: int, channels: int, shape: tuple) -> None:
    path = write_synthetic_npz(tmp_path / "d.npz", dim=dim, size=10, channels=channels, n_per_split=(6, 3, 3))
    data = load_npz(path)
    assert data.dim == dim and data.in_channels == channels
    x, y = data.train[0]
    assert tuple(x.shape) == shape and x.dtype == torch.float32 and 0.0 <= float(x.min()) <= float(x.max()) <= 1.0
    assert y.dtype == torch.int64 and data.class_names == ["0", "1", "2"]
    assert len(data.train) == 6 and len(data.val) == len(data.test) == 3


def test_rings_have_the_class_radius(tmp_path: Path) -> None:
    """Class k's mean radial profile peaks at a radius that grows with k (the invariant class structure)."""
    data = load_npz(write_synthetic_npz(tmp_path / "r.npz", size=24, n_per_split=(60, 3, 3), noise=0.0))
    ax = torch.arange(24) - 11.5
    r = torch.sqrt(ax[:, None] ** 2 + ax[None] ** 2).round().long()
    peaks = []
    for k in range(3):
        img = data.train.images[data.train.targets == k, 0].mean(0)
        profile = torch.bincount(r.flatten(), weights=img.flatten()) / torch.bincount(r.flatten())
        peaks.append(int(profile[2:12].argmax()) + 2)
    assert peaks[0] < peaks[1] < peaks[2]


def test_missing_keys_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, train_images=np.zeros((2, 4, 4), np.uint8), train_labels=np.zeros((2, 1), np.uint8))
    with pytest.raises(InputError) as err:
        load_npz(path)
    msg = str(err.value)
    assert str(path) in msg and "'val_images'" in msg and "'test_labels'" in msg and "train_images" in msg


def test_multilabel_and_mismatch_rejected(tmp_path: Path) -> None:
    arrays = {
        k: np.zeros((2, 4, 4), np.uint8) if k.endswith("images") else np.zeros((2, 1), np.uint8) for k in REQUIRED_KEYS
    }
    np.savez(tmp_path / "ml.npz", **{**arrays, "val_labels": np.zeros((2, 14), np.uint8)})
    with pytest.raises(InputError, match="val_labels.*multi-label"):
        load_npz(tmp_path / "ml.npz")
    np.savez(tmp_path / "n.npz", **{**arrays, "test_labels": np.zeros((3, 1), np.uint8)})
    with pytest.raises(InputError, match="'test_labels' has 3 rows"):
        load_npz(tmp_path / "n.npz")


def test_dataset_name_without_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "medmnist", None)  # import medmnist -> ImportError
    with pytest.raises(InputError, match="'medmnist' package is not installed.*local .npz path"):
        open_npz("dermamnist", root=tmp_path)
    with pytest.raises(InputError, match="no such MedMNIST-format .npz file"):
        open_npz(tmp_path / "absent.npz")
