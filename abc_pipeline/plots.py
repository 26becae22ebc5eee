"""Evaluation figures (PNG): confusion matrix, training curves, true vs predicted region maps, the
equivariance curve and plain vs worst-case-orientation scores.

Every function draws on its own :class:`matplotlib.figure.Figure` (no pyplot state, no GUI backend), writes
the PNG (``dpi`` 150 by default) to a temporary file next to ``path``, renames it, and returns ``path``.
Class and region colours are ``'#rrggbb'`` strings, as in the ABC label tables
(``uns['<column>_colors']`` of cells.zarr, the OME-Zarr label metadata); without them a qualitative
matplotlib colour map is used.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.colors import BoundaryNorm, ListedColormap, to_hex
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from sklearn.metrics import ConfusionMatrixDisplay

from abc_pipeline.errors import InputError
from abc_pipeline.fileio import staged_output

DPI = 150
_BACKGROUND = "#ffffff"
_MAX_LEGEND = 30  # region maps: legend entries shown (the most frequent regions)


def _save(fig: Figure, path: str | Path, dpi: int) -> Path:
    """Write ``fig`` as PNG to a temporary name next to ``path`` and rename it."""
    path = Path(path)
    with staged_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    return path


def default_colors(n: int) -> list[str]:
    """``n`` distinct ``'#rrggbb'`` colours (tab10 / tab20 / a sampled hsv wheel)."""
    from matplotlib import colormaps

    if n <= 10:
        cmap = colormaps["tab10"]
        return [to_hex(cmap(i)) for i in range(n)]
    if n <= 20:
        cmap = colormaps["tab20"]
        return [to_hex(cmap(i)) for i in range(n)]
    cmap = colormaps["hsv"]
    return [to_hex(cmap(i / n)) for i in range(n)]


def confusion_matrix_figure(
    y_true: Sequence[int],
    y_pred: Sequence[int],
    class_names: Sequence[str],
    path: str | Path,
    normalize: bool = True,
    title: str = "Confusion matrix",
    dpi: int = DPI,
) -> Path:
    """Confusion matrix of class indices ``y_true`` / ``y_pred`` ``(N,)`` in ``0..K-1`` (``K`` class names).

    ``normalize``: rows divided by the true-class counts (each row: fraction of that class predicted as
    each class; recall on the diagonal), else raw counts. Cell values are printed up to 20 classes.
    """
    y_true, y_pred = np.asarray(y_true).reshape(-1), np.asarray(y_pred).reshape(-1)
    k = len(class_names)
    if y_true.shape != y_pred.shape or y_true.size == 0:
        raise InputError(
            f"y_true and y_pred must be non-empty and of equal length, got {y_true.size} and {y_pred.size}"
        )
    if min(y_true.min(), y_pred.min()) < 0 or max(y_true.max(), y_pred.max()) >= k:
        raise InputError(f"labels must lie in 0..{k - 1} for {k} class names; drop unlabelled (-1) samples first")
    side = min(4.0 + 0.35 * k, 30.0)
    fig = Figure(figsize=(side + 1.5, side))
    ax = fig.add_subplot()
    ConfusionMatrixDisplay.from_predictions(
        y_true,
        y_pred,
        labels=np.arange(k),
        display_labels=list(class_names),
        normalize="true" if normalize else None,
        include_values=k <= 20,
        values_format=".2f" if normalize else "d",
        cmap="Blues",
        ax=ax,
        xticks_rotation="vertical",
        colorbar=True,
        im_kw={"vmin": 0.0, "vmax": 1.0} if normalize else None,
    )
    ax.set_title(f"{title} ({'fraction of true class' if normalize else 'counts'}, n = {y_true.size})")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    return _save(fig, path, dpi)


def training_curves_figure(history_tsv: str | Path, path: str | Path, title: str = "Training", dpi: int = DPI) -> Path:
    """Loss (train and validation) and validation metrics per epoch from a ``history.tsv`` written by
    :func:`abc_pipeline.learn.train.train` (columns ``epoch, train_loss, val_loss, val_<metric>..., lr,
    seconds``)."""
    history_tsv = Path(history_tsv)
    if not history_tsv.is_file():
        raise InputError(f"{history_tsv}: no such history file; give the history.tsv of a training run")
    h = pd.read_csv(history_tsv, sep="\t")
    missing = [c for c in ("epoch", "train_loss", "val_loss") if c not in h.columns]
    if missing or h.empty:
        raise InputError(
            f"{history_tsv}: expected the columns epoch, train_loss, val_loss and at least one row "
            f"(missing {missing}, {len(h)} rows); is it a history.tsv written by train()?"
        )
    metrics = [c for c in h.columns if c.startswith("val_") and c != "val_loss"]
    epoch = h["epoch"] + 1
    fig = Figure(figsize=(10, 4))
    ax_loss, ax_metric = fig.subplots(1, 2)
    ax_loss.plot(epoch, h["train_loss"], "o-", ms=3, label="train (class-weighted)")
    ax_loss.plot(epoch, h["val_loss"], "s-", ms=3, label="validation")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss (nats)", title="Loss")
    ax_loss.legend()
    for c in metrics:
        ax_metric.plot(epoch, h[c], "o-", ms=3, label=c.removeprefix("val_").replace("_", " "))
    ax_metric.set(xlabel="epoch", ylabel="score (fraction)", title="Validation metrics", ylim=(0.0, 1.02))
    if metrics:
        ax_metric.legend()
    fig.suptitle(title)
    return _save(fig, path, dpi)


def region_maps_figure(
    true_2d_list: Sequence[np.ndarray],
    pred_2d_list: Sequence[np.ndarray],
    names: Sequence[str],
    colors: Sequence[str] | None,
    titles: Sequence[str],
    path: str | Path,
    spacing: float | None = None,
    dpi: int = DPI,
) -> Path:
    """True (left) vs predicted (right) label maps of a few sections, one row per section.

    Each map is ``(H, W)`` integers with ``0`` = background (no cells, drawn white) and ``k >= 1`` = region
    ``names[k - 1]`` drawn in ``colors[k - 1]`` (the OME-Zarr label convention of ``predict``). ``titles``:
    one per section. ``spacing``: pixel size in µm, for axis labels in µm (else pixels). The legend lists
    the regions present (the most frequent ones when there are many).
    """
    if not (len(true_2d_list) == len(pred_2d_list) == len(titles)) or not true_2d_list:
        raise InputError(
            f"give as many true maps, predicted maps and titles (at least one), got "
            f"{len(true_2d_list)}, {len(pred_2d_list)}, {len(titles)}"
        )
    k = len(names)
    colors = list(colors) if colors is not None else default_colors(k)
    if len(colors) != k:
        raise InputError(f"{len(colors)} colours for {k} region names; give one colour per name")
    cmap = ListedColormap([_BACKGROUND, *colors])
    norm = BoundaryNorm(np.arange(-0.5, k + 1.5), cmap.N)
    counts = np.zeros(k + 1, dtype=np.int64)
    n = len(titles)
    fig = Figure(figsize=(9, 4 * n), layout="constrained")
    axes = np.atleast_2d(fig.subplots(n, 2, squeeze=False))
    for row, (true, pred, title) in enumerate(zip(true_2d_list, pred_2d_list, titles)):
        true, pred = np.asarray(true), np.asarray(pred)
        if true.ndim != 2 or true.shape != pred.shape:
            raise InputError(
                f"section {title!r}: true {true.shape} and predicted {pred.shape} maps must be 2D and of equal shape"
            )
        for ax, img, kind in ((axes[row, 0], true, "true"), (axes[row, 1], pred, "predicted")):
            if img.min() < 0 or img.max() > k:
                raise InputError(
                    f"section {title!r}: {kind} labels must lie in 0..{k} (0 = background, k = "
                    f"names[k-1]), found {img.min()}..{img.max()}"
                )
            counts += np.bincount(img.reshape(-1).astype(np.int64), minlength=k + 1)
            h, w = img.shape
            extent = None if spacing is None else (0, w * spacing, h * spacing, 0)
            ax.imshow(img, cmap=cmap, norm=norm, interpolation="nearest", extent=extent)
            ax.set_title(f"{title}: {kind}")
            unit = "pixels" if spacing is None else "µm"
            ax.set(xlabel=f"x ({unit})", ylabel=f"y ({unit})")
    present = [i for i in np.argsort(-counts[1:], kind="stable") if counts[i + 1] > 0][:_MAX_LEGEND]
    handles = [Patch(facecolor=colors[i], edgecolor="none", label=str(names[i])) for i in present]
    if handles:
        fig.legend(handles=handles, loc="outside right upper", fontsize="small", title="region")
    return _save(fig, path, dpi)


def equivariance_curve_figure(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: str | Path,
    title: str = "Equivariance under rotation of the input",
    dpi: int = DPI,
) -> Path:
    """One line per model: agreement (fraction of unchanged predictions, see
    :func:`abc_pipeline.metrics.equivariance_curve`) against the rotation angle in degrees."""
    if not curves:
        raise InputError("no curves to plot; give at least one model -> (angles, agreement)")
    fig = Figure(figsize=(6, 4.2))
    ax = fig.add_subplot()
    all_angles: set[float] = set()
    for name, (angles, agreement) in curves.items():
        if len(angles) != len(agreement):
            raise InputError(f"model {name!r}: {len(angles)} angles but {len(agreement)} agreement values")
        ax.plot(angles, agreement, "o-", ms=4, label=name)
        all_angles.update(float(a) for a in angles)
    ax.set_xticks(sorted(all_angles))
    ax.set(xlabel="rotation angle (degrees)", ylabel="agreement (fraction)", ylim=(0.0, 1.02), title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path, dpi)


def orientation_bar_figure(
    scores: Mapping[str, tuple[float, float]],
    path: str | Path,
    metric: str = "accuracy",
    title: str = "Test score: as is vs worst grid orientation",
    dpi: int = DPI,
) -> Path:
    """Grouped bars per model: ``scores[model] = (plain, worst)`` — the test ``metric`` as is and its
    minimum over the grid symmetries (:func:`abc_pipeline.metrics.orientation_scores`), fractions."""
    if not scores:
        raise InputError("no scores to plot; give at least one model -> (plain, worst)")
    names = list(scores)
    plain = np.array([scores[n][0] for n in names], dtype=float)
    worst = np.array([scores[n][1] for n in names], dtype=float)
    x = np.arange(len(names))
    fig = Figure(figsize=(max(5.0, 1.3 * len(names) + 2), 4.2))
    ax = fig.add_subplot()
    for offset, values, label in ((-0.2, plain, "test split as is"), (0.2, worst, "worst orientation")):
        bars = ax.bar(x + offset, values, width=0.4, label=label)
        ax.bar_label(bars, fmt="%.3f", fontsize="small")
    ax.set_xticks(x, names, rotation=20, ha="right")
    ax.set(ylabel=f"{metric.replace('_', ' ')} (fraction)", ylim=(0.0, 1.25), title=title)
    ax.set_yticks(np.linspace(0.0, 1.0, 6))
    ax.legend(loc="upper center", ncols=2)  # above the bars (scores <= 1)
    return _save(fig, path, dpi)


__all__ = [
    "DPI",
    "confusion_matrix_figure",
    "default_colors",
    "equivariance_curve_figure",
    "orientation_bar_figure",
    "region_maps_figure",
    "training_curves_figure",
]


def any_angle_figure(
    panels: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float]]]],
    path: str | Path,
    metric: str = "accuracy",
    dpi: int = DPI,
) -> Path:
    """One panel per title (e.g. per task), one line per model: the per-cell test ``metric`` of sections
    rotated by each angle (:func:`abc_pipeline.learn.any_angle.any_angle_scores`) against the angle."""
    if not panels or not all(panels.values()):
        raise InputError("no any-angle scores to plot; give at least one panel -> {model: (angles, scores)}")
    fig = Figure(figsize=(6.2 * len(panels), 4.2))
    for i, (title, curves) in enumerate(panels.items()):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for name, (angles, scores) in curves.items():
            if len(angles) != len(scores):
                raise InputError(f"model {name!r}: {len(angles)} angles but {len(scores)} scores")
            ax.plot(angles, scores, "o-", ms=3, label=name)
        ax.set(
            xlabel="in-plane rotation of the test sections (degrees)",
            ylabel=f"per-cell {metric.replace('_', ' ')}",
            ylim=(0.0, 1.02),
            title=title,
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path, dpi)
