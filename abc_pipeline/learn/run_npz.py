"""Train and test one zoo model on a MedMNIST-format ``.npz`` file (``abc-pipeline train-npz``).

Writes into ``out_dir`` what :func:`abc_pipeline.learn.train.train` writes, and adds the test split's
metrics to ``metrics.json``: ``test`` (accuracy, balanced accuracy, macro-F1, per-class F1, AUC) and
``test_orientation`` (accuracy under every grid symmetry: per symmetry, mean and worst case).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from abc_pipeline.learn.checkpoint import write_json
from abc_pipeline.learn.choices import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_DEVICE,
    DEFAULT_DOWNLOAD_ROOT,
    DEFAULT_EPOCHS,
    DEFAULT_LR,
    DEFAULT_METRIC,
    DEFAULT_PATIENCE,
    DEFAULT_SEED,
    DEFAULT_WEIGHT_DECAY,
    DEFAULT_WORKERS,
)
from abc_pipeline.learn.inference import pick_device, predict_proba
from abc_pipeline.learn.medmnist import open_npz
from abc_pipeline.learn.train import train
from abc_pipeline.metrics import orientation_scores, score
from abc_pipeline.nn import build_model, grid_group

log = logging.getLogger(__name__)


def train_npz(
    npz: str | Path,
    model_name: str,
    out_dir: str | Path,
    *,
    width: int | None = None,
    target_params: int | None = None,
    epochs: int = DEFAULT_EPOCHS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float = DEFAULT_LR,
    weight_decay: float = DEFAULT_WEIGHT_DECAY,
    seed: int = DEFAULT_SEED,
    patience: int = DEFAULT_PATIENCE,
    metric: str = DEFAULT_METRIC,
    device: str = DEFAULT_DEVICE,
    num_workers: int = DEFAULT_WORKERS,
    progress: bool = True,
    download_root: str | Path = DEFAULT_DOWNLOAD_ROOT,
    resume: bool = True,
) -> dict:
    """Build ``model_name`` for the file's images, train it, test the best checkpoint; returns metrics.json.

    ``npz``: a MedMNIST-format file, or a MedMNIST dataset name downloaded into ``download_root`` (needs
    the ``medmnist`` package and network). ``width`` / ``target_params``: see
    :func:`abc_pipeline.nn.build_model` (default: the zoo's parameter-matched width). The other arguments
    are those of :func:`abc_pipeline.learn.train.train`.
    """
    data = open_npz(npz, root=download_root)
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    model = build_model(
        model_name,
        data.dim,
        data.in_channels,
        len(data.class_names),
        "classify",
        width=width,
        target_params=target_params,
    )
    config = {
        "data": {
            "npz": str(data.path),
            "dim": data.dim,
            "image_shape": list(data.train.images.shape[1:]),
            "n": {s: len(getattr(data, s)) for s in ("train", "val", "test")},
        }
    }
    result = train(
        model,
        data.train,
        data.val,
        out_dir,
        class_names=data.class_names,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        seed=seed,
        patience=patience,
        metric=metric,
        device=device,
        num_workers=num_workers,
        progress=progress,
        config=config,
        resume=resume,
    )
    dev = pick_device(device)
    proba = predict_proba(model, data.test.images, batch_size=batch_size, device=dev)
    test = score(data.test.targets.numpy(), proba.numpy(), data.class_names)
    orient = orientation_scores(
        lambda x: predict_proba(model, x, batch_size=batch_size, device=dev),
        data.test.images,
        data.test.targets,
        grid_group(data.dim),
        data.class_names,
        metric="accuracy",
    )
    metrics = json.loads((out_dir / "metrics.json").read_text())
    metrics.update(test=test, test_orientation=orient, width=model.width)
    write_json(metrics, out_dir / "metrics.json")
    log.info(
        "%s on %s: test accuracy %.3f, AUC %.3f, worst-orientation accuracy %.3f (best epoch %d)",
        model_name,
        data.path.name,
        test["accuracy"],
        test["auc"],
        orient["worst"],
        result.best_epoch,
    )
    return metrics
