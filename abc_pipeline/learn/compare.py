"""Model comparison (``abc-pipeline bench-models``): train zoo models parameter-matched on one benchmark and
write one table.

A benchmark is a :class:`BenchTask` adapter: train/val/test datasets of ``(input, target)`` pairs plus what a
model needs (input channels, class names, spatial dimensions, voxel spacing, the training objective and the
:func:`build_model` head).
:func:`npz_task` builds one from a MedMNIST-format ``.npz`` file (optionally keeping a stratified fraction of
the training split); :func:`abc_pipeline.learn.atlas.atlas_task` one from an atlas raster (cell patches or
region tiles, optionally with a fraction of the training sections).

For each model :func:`bench_models` builds the network with the width whose parameter count is closest to
``target_params``, trains it with :func:`abc_pipeline.learn.train.train` into ``out_dir/<model>/`` (so a
re-run resumes unfinished models and skips finished ones, whose results are cached in ``bench.json``;
a model whose settings changed is trained again from scratch),
tests the best checkpoint and measures:

- test scores: accuracy, balanced accuracy and AUC (classification) or voxel accuracy, mean Dice and mean
  IoU (segmentation);
- ``worst_<metric>``: the minimum of the test metric (accuracy / mean Dice) over the grid symmetries
  (:func:`abc_pipeline.metrics.orientation_scores`);
- ``equivariance_error``: ``max_g max|f(g.x) - f(x)| / max|f(x)|`` on the logits of a test batch over the
  grid group (for segmentation ``f(g.x)`` is compared with ``g.f(x)``);
- ``agreement_45deg``: the equivariance curve (:func:`abc_pipeline.metrics.equivariance_curve`) at 45°;
- ``seconds_per_epoch`` (training plus validation, mean over the epochs) and ``peak_memory_mb``: on CUDA
  ``torch.cuda.max_memory_allocated`` during training; on the CPU the increase of the process' resident
  set size (RSS) over its value before training, sampled every 20 ms. So that the numbers do not depend on
  the order of the models, a throw-away one-epoch run of a width-1 CNN on 4 samples first does the
  process' one-time initialisation (lazy imports of the optimizer and data loader, about 90 MiB), and
  memory freed by earlier models is handed back to the OS (glibc ``malloc_trim``) before each model.

Outputs in ``out_dir``: ``bench_models.tsv`` and ``bench_models.md`` (the table), ``equivariance_curve.png``
(all models), ``orientation.png`` (test score as is vs worst orientation), and per model the training run,
``bench.json`` (row, curve, scores per symmetry), ``training_curves.png`` and (classification)
``confusion_matrix.png``.
"""

from __future__ import annotations

import ctypes
import gc
import json
import logging
import math
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psutil
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from abc_pipeline import plots
from abc_pipeline.errors import InputError
from abc_pipeline.fileio import atomic_write_text, claim_directory
from abc_pipeline.learn.checkpoint import config_hash, write_json
from abc_pipeline.learn.choices import (
    BENCH_CURVE_ANGLES,
    BENCH_CURVE_SAMPLES,
    BENCH_EPOCHS,
    BENCH_MODELS,
    BENCH_TARGET_PARAMS,
    BENCH_TRAIN_FRACTION,
    DEFAULT_BATCH_SIZE,
    DEFAULT_DEVICE,
    DEFAULT_DOWNLOAD_ROOT,
    DEFAULT_LR,
    DEFAULT_PATIENCE,
    DEFAULT_SEED,
    DEFAULT_WEIGHT_DECAY,
    DEFAULT_WORKERS,
)
from abc_pipeline.learn.inference import pick_device, predict_proba
from abc_pipeline.learn.medmnist import NpzClassification, open_npz
from abc_pipeline.learn.train import IGNORE_INDEX, train
from abc_pipeline.metrics import equivariance_curve, orientation_scores, score
from abc_pipeline.nn import build_model, grid_group, model_table
from abc_pipeline.nn.fields import equivariance_error

log = logging.getLogger(__name__)

#: test scores in the table per objective, and the metric whose worst case over the grid group is reported
SCORES = {"classify": ("accuracy", "balanced_accuracy", "auc"), "segment": ("accuracy", "mean_dice", "mean_iou")}
WORST_METRIC = {"classify": "accuracy", "segment": "mean_dice"}
CURVE_ANGLE = 45.0
_HEADERS = {
    "model": "model",
    "first_layer_channels": "first-layer channels",
    "params": "parameters",
    "accuracy": "accuracy",
    "balanced_accuracy": "balanced accuracy",
    "auc": "AUC",
    "mean_dice": "mean Dice",
    "mean_iou": "mean IoU",
    "worst_accuracy": "worst-orientation accuracy",
    "worst_mean_dice": "worst-orientation mean Dice",
    "equivariance_error": "equivariance error",
    "agreement_45deg": "agreement at 45°",
    "seconds_per_epoch": "s / epoch",
    "epochs": "epochs",
    "peak_memory_mb": "peak memory (MiB)",
}


@dataclass
class BenchTask:
    """The benchmark adapter: one dataset and what a model needs to know about it.

    ``train`` / ``val`` / ``test``: datasets of ``(input (C, *spatial), target)`` pairs (target: class index
    for ``objective="classify"``, label map ``(*spatial)`` with ``-1`` = no cells for ``objective="segment"``;
    the models' training objective, ``spec.objective``).
    ``head``: the :func:`abc_pipeline.nn.build_model` head (default ``objective``; ``"patch"`` for atlas
    cell types); ``model_options``: further ``build_model`` keywords (``depth``, ``patch_size``);
    ``spacing``: physical voxel size per axis (anisotropic grids); ``config``: a description of the data
    (stored in every run's configuration, so a changed dataset is never silently resumed).
    """

    name: str
    train: Dataset
    val: Dataset
    test: Dataset
    class_names: list[str]
    dim: int
    in_channels: int
    objective: str = "classify"
    head: str | None = None
    spacing: tuple[float, ...] | None = None
    model_options: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.objective not in SCORES:
            raise InputError(f"objective must be one of {sorted(SCORES)}, got {self.objective!r}")
        self.head = self.head or self.objective


def subset_indices(labels: np.ndarray | torch.Tensor, fraction: float, seed: int = 0) -> np.ndarray:
    """Sorted indices of a class-stratified random ``fraction`` of ``labels`` ``(N,)``, deterministic in ``seed``.

    Each class keeps ``round(fraction * n_c)`` samples, at least one; ``fraction=1`` keeps all.
    """
    if not 0.0 < fraction <= 1.0:
        raise InputError(f"train fraction must lie in (0, 1], got {fraction}")
    labels = np.asarray(labels).reshape(-1)
    if fraction == 1.0:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        keep.append(rng.choice(idx, size=max(1, round(fraction * len(idx))), replace=False))
    return np.sort(np.concatenate(keep))


def npz_task(
    source: str | Path,
    train_fraction: float = BENCH_TRAIN_FRACTION,
    seed: int = DEFAULT_SEED,
    download_root: str | Path = DEFAULT_DOWNLOAD_ROOT,
) -> BenchTask:
    """A :class:`BenchTask` from a MedMNIST-format file (path, or MedMNIST name downloaded into
    ``download_root``), keeping a stratified ``train_fraction`` of the training split (:func:`subset_indices`
    with ``seed``); validation and test splits are kept whole."""
    data = open_npz(source, root=download_root)
    keep = torch.from_numpy(subset_indices(data.train.targets.numpy(), train_fraction, seed))
    train_ds = NpzClassification(data.train.images[keep], data.train.targets[keep], data.class_names)
    label = data.path.name if train_fraction == 1.0 else f"{data.path.name}, {train_fraction:.0%} of training data"
    config = {
        "npz": str(data.path),
        "image_shape": list(data.train.images.shape[1:]),
        "train_fraction": train_fraction,
        "subset_seed": seed,
        "n": {"train": len(train_ds), "val": len(data.val), "test": len(data.test)},
    }
    return BenchTask(
        name=label,
        train=train_ds,
        val=data.val,
        test=data.test,
        class_names=data.class_names,
        dim=data.dim,
        in_channels=data.in_channels,
        objective="classify",
        config={"data": config},
    )


def _release_freed_memory() -> None:
    """Collect garbage and return freed heap memory to the OS (glibc ``malloc_trim``; a no-op elsewhere)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Context manager measuring peak memory in MiB (``.mib``) of what runs inside it.

    CUDA: ``torch.cuda.max_memory_allocated`` (reset on entry). CPU: the largest increase of the process'
    RSS over its value on entry (after :func:`_release_freed_memory`), sampled every ``interval`` seconds by
    a background thread.
    """

    def __init__(self, device: torch.device, interval: float = 0.02) -> None:
        self.device, self.interval = device, interval
        self.mib = float("nan")
        self.kind = "cuda max_memory_allocated" if device.type == "cuda" else "CPU RSS increase"
        self._stop = threading.Event()
        self._peak = 0

    def _sample(self, process: psutil.Process) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, process.memory_info().rss)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _release_freed_memory()
            process = psutil.Process()
            self._base = self._peak = process.memory_info().rss
            self._thread = threading.Thread(target=self._sample, args=(process,), daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.mib = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.mib = (self._peak - self._base) / 2**20


def _stack(ds: Dataset, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """All pairs of ``ds`` as ``(inputs (N, C, *spatial), targets (N, ...))``."""
    xs, ys = zip(*DataLoader(ds, batch_size=batch_size))
    return torch.cat(xs), torch.cat(ys).long()


def _warm_up(task: BenchTask, device: torch.device) -> None:
    """A one-epoch run of a width-1 CNN on 4 training/validation samples into a temporary directory: the
    process' one-time initialisation then does not count in the first model's memory and time."""
    model = build_model(
        "cnn",
        task.dim,
        task.in_channels,
        len(task.class_names),
        task.head,
        width=1,
        spacing=task.spacing,
        **task.model_options,
    )
    few = range(min(4, len(task.train), len(task.val)))
    with tempfile.TemporaryDirectory() as tmp:
        train(
            model,
            Subset(task.train, few),
            Subset(task.val, few),
            tmp,
            class_names=task.class_names,
            epochs=1,
            batch_size=4,
            device=device,
            progress=False,
            resume=False,
        )


def _evaluate(
    model: torch.nn.Module,
    task: BenchTask,
    x: torch.Tensor,
    y: torch.Tensor,
    device: torch.device,
    batch_size: int,
    angles: Sequence[float],
    curve_samples: int,
    equivariance_samples: int,
) -> dict:
    """Test scores, orientation scores, equivariance error and curve of a trained model."""
    model.eval()

    def predict(v: torch.Tensor) -> torch.Tensor:
        return predict_proba(model, v, batch_size=batch_size, device=device)

    def logits(v: torch.Tensor) -> torch.Tensor:
        return model(v.to(device)).float().cpu()

    proba = predict(x)
    group = grid_group(task.dim, task.spacing)
    orient = orientation_scores(predict, x, y, group, task.class_names, metric=WORST_METRIC[task.objective])
    error = equivariance_error(logits, x[:equivariance_samples], group, invariant=task.objective == "classify")
    xc, yc = x[:curve_samples], y[:curve_samples]
    curve = equivariance_curve(
        predict, xc, angles, task=task.objective, mask=None if task.objective == "classify" else yc != IGNORE_INDEX
    )
    return {
        "test": score(
            y.numpy(), proba.numpy(), task.class_names, segment=task.objective == "segment", ignore=IGNORE_INDEX
        ),
        "orientation": orient,
        "equivariance_error": error,
        "curve": curve,
        "y_pred": proba.argmax(1),
    }


def bench_models(
    task: BenchTask,
    out_dir: str | Path,
    models: Sequence[str] = BENCH_MODELS,
    *,
    target_params: int = BENCH_TARGET_PARAMS,
    epochs: int = BENCH_EPOCHS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float = DEFAULT_LR,
    weight_decay: float = DEFAULT_WEIGHT_DECAY,
    patience: int = DEFAULT_PATIENCE,
    seed: int = DEFAULT_SEED,
    device: str = DEFAULT_DEVICE,
    num_workers: int = DEFAULT_WORKERS,
    angles: Sequence[float] = BENCH_CURVE_ANGLES,
    curve_samples: int = BENCH_CURVE_SAMPLES,
    equivariance_samples: int = 16,
    progress: bool = True,
    resume: bool = True,
    extra_rows: Sequence[dict] = (),
) -> pd.DataFrame:
    """Train every zoo model in ``models`` with about ``target_params`` parameters on ``task``; one table.

    Training arguments are those of :func:`abc_pipeline.learn.train.train` (early stopping on balanced
    accuracy / mean Dice). ``angles`` (degrees, must include 45) and ``curve_samples`` (first test samples)
    set the equivariance curve, ``equivariance_samples`` the test batch of the equivariance error.
    ``resume=True``: a model finished earlier with the same settings is reused, an unfinished one resumed,
    one whose settings changed retrained from scratch; ``resume=False`` retrains every model. Writes the outputs listed in the module docstring
    and returns the table (one row per model, columns as in ``bench_models.tsv``). ``extra_rows``: rows of
    models trained elsewhere (the scikit-learn baselines, :func:`abc_pipeline.learn.baselines.bench_baseline_rows`),
    appended to the table (not to the figures).
    """
    angles = [float(a) for a in angles]
    if CURVE_ANGLE not in angles:
        raise InputError(f"angles {angles} must include {CURVE_ANGLE:g}° (the table's agreement column)")
    if not models:
        raise InputError("no models to compare; name at least one zoo model")
    out_dir = claim_directory(Path(out_dir), "bench")
    dev = pick_device(device)
    k = len(task.class_names)
    x_test, y_test = _stack(task.test)
    _warm_up(task, dev)
    curves, rows = {}, []
    for name in models:
        torch.manual_seed(seed)
        model = build_model(
            name,
            task.dim,
            task.in_channels,
            k,
            task.head,
            target_params=target_params,
            spacing=task.spacing,
            **task.model_options,
        )
        first = model_table(
            task.dim, task.in_channels, k, task.head, width=model.width, spacing=task.spacing, names=[name]
        )[0]
        train_args = {
            "class_names": task.class_names,
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "weight_decay": weight_decay,
            "seed": seed,
            "patience": patience,
        }
        eval_args = {"angles": angles, "curve_samples": curve_samples, "equivariance_samples": equivariance_samples}
        key = config_hash(
            {
                "model_spec": model.spec.to_dict(),
                "train": train_args,
                "eval": eval_args,
                "config": task.config,
                "target_params": target_params,
            }
        )
        run_dir = out_dir / name
        cached = _cached(run_dir / "bench.json", key) if resume else None
        if cached is not None:
            log.info("%s: finished earlier (%s), reusing its results", name, run_dir / "bench.json")
            rows.append(cached["row"])
            curves[name] = (cached["curve"]["angles"], cached["curve"]["agreement"])
            continue
        with PeakMemory(dev) as memory:
            result = train(
                model,
                task.train,
                task.val,
                run_dir,
                metric=None,
                device=dev,
                num_workers=num_workers,
                progress=progress,
                config={**task.config, "target_params": target_params},
                resume="if-unchanged" if resume else False,
                **train_args,
            )
        ev = _evaluate(model, task, x_test, y_test, dev, batch_size, angles, curve_samples, equivariance_samples)
        worst = WORST_METRIC[task.objective]
        row = {
            "model": name,
            "width": model.width,
            "first_layer_channels": first["first_layer_channels"],
            "params": model.n_params,
            **{s: ev["test"][s] for s in SCORES[task.objective]},
            f"worst_{worst}": ev["orientation"]["worst"],
            "equivariance_error": ev["equivariance_error"],
            "agreement_45deg": ev["curve"]["agreement"][angles.index(CURVE_ANGLE)],
            "seconds_per_epoch": float(np.mean([h["seconds"] for h in result.history])),
            "epochs": result.epochs_run,
            "best_epoch": result.best_epoch,
            "peak_memory_mb": memory.mib,
            "memory": memory.kind,
        }
        rows.append(row)
        curves[name] = (angles, ev["curve"]["agreement"])
        plots.training_curves_figure(
            run_dir / "history.tsv", run_dir / "training_curves.png", title=f"{name} on {task.name}"
        )
        if task.objective == "classify":
            plots.confusion_matrix_figure(
                y_test.numpy(),
                ev["y_pred"].numpy(),
                task.class_names,
                run_dir / "confusion_matrix.png",
                title=f"{name}: test split",
            )
        write_json(
            {"key": key, "row": row, "test": ev["test"], "orientation": ev["orientation"], "curve": ev["curve"]},
            run_dir / "bench.json",
        )
        log.info(
            "%s: %s %.3f, worst %s %.3f, equivariance error %.2e, agreement at 45° %.3f",
            name,
            SCORES[task.objective][0],
            row[SCORES[task.objective][0]],
            worst,
            row[f"worst_{worst}"],
            row["equivariance_error"],
            row["agreement_45deg"],
        )
    table = pd.DataFrame([*rows, *extra_rows])
    _write_table(table, out_dir, task)
    plots.equivariance_curve_figure(
        curves, out_dir / "equivariance_curve.png", title=f"Equivariance under rotation: {task.name}"
    )
    worst = f"worst_{WORST_METRIC[task.objective]}"
    plain = WORST_METRIC[task.objective]
    plots.orientation_bar_figure(
        {r["model"]: (r[plain], r[worst]) for r in rows},
        out_dir / "orientation.png",
        metric=plain,
        title=f"Test {plain.replace('_', ' ')}: {task.name}",
    )
    return table


def _cached(path: Path, key: str) -> dict | None:
    """The ``bench.json`` of a finished model run with the same settings, else ``None``."""
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    return record if record.get("key") == key else None


def format_table(table: pd.DataFrame) -> str:
    """Markdown rendering of a :func:`bench_models` table (scores to 3 decimals, errors in scientific)."""
    columns = [c for c in _HEADERS if c in table.columns]
    formats: dict[str, Callable[[Any], str]] = {
        "params": lambda v: f"{int(v):,}",
        "first_layer_channels": lambda v: str(int(v)),
        "epochs": lambda v: str(int(v)),
        "equivariance_error": lambda v: f"{v:.1e}",
        "seconds_per_epoch": lambda v: f"{v:.2f}",
        "peak_memory_mb": lambda v: f"{v:.0f}",
        "model": str,
    }
    lines = [
        "| " + " | ".join(_HEADERS[c] for c in columns) + " |",
        "|" + "|".join("---" if c == "model" else "---:" for c in columns) + "|",
    ]
    for _, r in table.iterrows():
        cells = [
            "n/a" if isinstance(r[c], float) and math.isnan(r[c]) else formats.get(c, lambda v: f"{v:.3f}")(r[c])
            for c in columns
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _write_table(table: pd.DataFrame, out_dir: Path, task: BenchTask) -> None:
    """``bench_models.tsv`` and ``bench_models.md`` (a title line, the table, the memory note), atomically."""
    atomic_write_text(out_dir / "bench_models.tsv", table.to_csv(sep="\t", index=False, float_format="%.6g"))
    kinds = ", ".join(sorted(set(table["memory"])))
    atomic_write_text(
        out_dir / "bench_models.md",
        f"Models on {task.name} ({task.objective}); peak memory: {kinds}.\n\n{format_table(table)}\n",
    )


__all__ = ["BenchTask", "PeakMemory", "bench_models", "format_table", "npz_task", "subset_indices"]
