"""Metrics for classification and segmentation, scores under every grid symmetry, and the equivariance
curve under arbitrary rotation angles.

All metrics come from scikit-learn; values are fractions in [0, 1] (ARI in [-1, 1]); a per-class value is
NaN when the class is absent from both the truth and the prediction (it is then left out of the mean).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import (
    accuracy_score,
    adjusted_rand_score,
    balanced_accuracy_score,
    f1_score,
    jaccard_score,
    normalized_mutual_info_score,
    roc_auc_score,
)

from abc_pipeline.errors import InputError
from abc_pipeline.nn.fields import GridSymmetry, transform

log = logging.getLogger(__name__)


def _per_class(values: np.ndarray, class_names: Sequence[str]) -> dict[str, float]:
    return {name: float(v) for name, v in zip(class_names, values)}


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def classification_metrics(y_true: np.ndarray, proba: np.ndarray, class_names: Sequence[str]) -> dict:
    """Metrics of class probabilities ``proba`` ``(N, K)`` against labels ``y_true`` ``(N,)`` in 0..K-1.

    Returns ``accuracy``, ``balanced_accuracy`` (mean recall over the classes present in ``y_true``),
    ``macro_f1`` (mean over classes present in truth or prediction), ``f1`` (per class name), ``auc``
    (one-vs-rest, mean over classes present in ``y_true`` whose complement is present too; NaN with fewer
    than two classes) and ``auc_per_class``.
    """
    y_true = np.asarray(y_true).reshape(-1)
    proba = np.asarray(proba, dtype=np.float64)
    k = len(class_names)
    if proba.ndim != 2 or proba.shape != (len(y_true), k):
        raise InputError(f"proba must have shape (N, K) = ({len(y_true)}, {k}) for {k} class names, got {proba.shape}")
    if len(y_true) == 0:
        raise InputError("no labelled samples to evaluate; check the split and its labels")
    y_pred = proba.argmax(1)
    labels = np.arange(k)
    with warnings.catch_warnings():  # absent classes are handled explicitly (NaN) below
        warnings.simplefilter("ignore")
        f1 = f1_score(y_true, y_pred, labels=labels, average=None, zero_division=0.0)
        balanced = balanced_accuracy_score(y_true, y_pred)
    f1 = np.where(np.isin(labels, np.union1d(y_true, y_pred)), f1, np.nan)
    auc = np.full(k, np.nan)
    for c in labels:
        positive = y_true == c
        if positive.any() and not positive.all():
            auc[c] = roc_auc_score(positive, proba[:, c])
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced),
        "macro_f1": _nanmean(f1),
        "f1": _per_class(f1, class_names),
        "auc": _nanmean(auc),
        "auc_per_class": _per_class(auc, class_names),
    }


def segmentation_metrics(y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str], ignore: int = -1) -> dict:
    """Metrics of a predicted label map ``y_pred`` against ``y_true`` (same shape, any number of axes).

    Voxels where ``y_true == ignore`` (no cells) do not count. Returns ``dice`` and ``iou`` per region name
    (NaN for regions absent from both maps), ``mean_dice``, ``mean_iou``, ``accuracy`` (voxel-wise), and the
    partition scores ``ari`` (adjusted Rand index) and ``nmi`` (normalised mutual information).
    """
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    if y_true.shape != y_pred.shape:
        raise InputError(f"y_true {y_true.shape} and y_pred {y_pred.shape} must have the same shape")
    keep = y_true != ignore
    t, p = y_true[keep], y_pred[keep]
    if t.size == 0:
        raise InputError(f"no labelled voxels (all equal the ignore label {ignore}); the split has no cells")
    labels = np.arange(len(class_names))
    present = np.isin(labels, np.union1d(t, p))
    dice = f1_score(t, p, labels=labels, average=None, zero_division=0.0)
    iou = jaccard_score(t, p, labels=labels, average=None, zero_division=0.0)
    dice, iou = np.where(present, dice, np.nan), np.where(present, iou, np.nan)
    return {
        "dice": _per_class(dice, class_names),
        "iou": _per_class(iou, class_names),
        "mean_dice": _nanmean(dice),
        "mean_iou": _nanmean(iou),
        "accuracy": float(accuracy_score(t, p)),
        "ari": float(adjusted_rand_score(t, p)),
        "nmi": float(normalized_mutual_info_score(t, p)),
    }


def orientation_scores(
    predict_fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    group: Sequence[GridSymmetry],
    class_names: Sequence[str],
    metric: str | None = None,
    ignore: int = -1,
) -> dict:
    """A metric on ``(g.x, g.y)`` for every grid symmetry ``g`` in ``group``: per symmetry, mean and worst.

    ``x``: inputs ``(N, C, *spatial)``. Classification: ``y`` ``(N,)`` labels and ``predict_fn(x)`` class
    probabilities ``(N, K)``; ``metric`` defaults to ``"accuracy"`` (any key of
    :func:`classification_metrics`). Segmentation: ``y`` ``(N, *spatial)`` label maps (``ignore`` = no
    cells), transformed with the input, and ``predict_fn(x)`` ``(N, K, *spatial)``; ``metric`` defaults to
    ``"mean_dice"``. Returns ``per_symmetry`` (``str(g)`` -> score), ``mean``, ``worst`` and
    ``worst_symmetry``.
    """
    segment = y.ndim == x.ndim - 1
    if not segment and y.ndim != 1:
        raise InputError(
            f"y must be (N,) labels or (N, *spatial) label maps for x of shape {tuple(x.shape)}, got {tuple(y.shape)}"
        )
    metric = metric or ("mean_dice" if segment else "accuracy")
    scores = {}
    for g in group:
        out = predict_fn(transform(x, g)).detach().float().cpu()
        if segment:
            yg = transform(y[:, None], g)[:, 0]
            value = segmentation_metrics(yg.numpy(), out.argmax(1).numpy(), class_names, ignore)[metric]
        else:
            value = classification_metrics(y.numpy(), out.numpy(), class_names)[metric]
        scores[str(g)] = float(value)
    worst = min(scores, key=scores.get)
    return {
        "metric": metric,
        "per_symmetry": scores,
        "mean": float(np.mean(list(scores.values()))),
        "worst": scores[worst],
        "worst_symmetry": worst,
    }


def _spatial_plane(x: torch.Tensor, plane: Sequence[int]) -> tuple[int, int]:
    """``plane`` (two tensor axes, negative allowed) as non-negative spatial axes of ``x`` ``(N, C, *spatial)``."""
    if x.ndim not in (4, 5):
        raise InputError(f"expected a batch of 2D or 3D images (N, C, *spatial), got shape {tuple(x.shape)}")
    if len(plane) != 2:
        raise InputError(f"plane must name two spatial axes, got {plane}")
    a, b = (int(p) % x.ndim for p in plane)
    if a == b or min(a, b) < 2:
        raise InputError(
            f"plane {tuple(plane)} must name two different spatial axes of a tensor of shape "
            f"{tuple(x.shape)} (axes 2..{x.ndim - 1} or -{x.ndim - 2}..-1)"
        )
    return a, b


def rotate(x: torch.Tensor, angle: float, plane: Sequence[int] = (-2, -1), mode: str = "bilinear") -> torch.Tensor:
    """Rotate ``x`` ``(N, C, *spatial)`` (2D or 3D) by ``angle`` degrees about the grid centre in ``plane``.

    ``plane``: two tensor axes (e.g. ``(-2, -1)`` = (y, x)); a positive angle turns axis ``plane[0]`` towards
    ``plane[1]``, the direction of ``torch.rot90(x, 1, dims=plane)``. The output has the input's shape and
    voxel grid: ``out[p] = x[R^-1 p]`` with ``p`` measured in voxels from the grid centre, sampled with
    ``mode`` (``"bilinear"``, trilinear in 3D, or ``"nearest"`` for label maps), zero outside the input.
    Multiples of 90° in a square plane are exact grid symmetries and use ``torch.rot90`` (no resampling).
    Integer inputs (label maps) are resampled as floats and returned with their dtype.
    """
    a, b = _spatial_plane(x, plane)
    quarter, rest = divmod(float(angle), 90.0)
    if rest == 0.0 and x.shape[a] == x.shape[b]:
        return torch.rot90(x, int(quarter) % 4, dims=(a, b))
    spatial = x.shape[2:]
    axes = [torch.arange(n, dtype=torch.float64) - (n - 1) / 2 for n in spatial]
    pos = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # (*spatial, dim), voxels from the centre
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    i, j = a - 2, b - 2
    src = pos.clone()
    src[..., i] = c * pos[..., i] + s * pos[..., j]  # R^-1 p
    src[..., j] = -s * pos[..., i] + c * pos[..., j]
    half = torch.tensor([(n - 1) / 2 if n > 1 else 1.0 for n in spatial], dtype=torch.float64)
    work = x if x.is_floating_point() else x.float()
    grid = (src / half).flip(-1).to(work.dtype).to(x.device)  # grid_sample wants (x, y[, z]) = reversed axes
    out = F.grid_sample(work, grid.expand(x.shape[0], *grid.shape), mode=mode, padding_mode="zeros", align_corners=True)
    return out if x.is_floating_point() else out.round().to(x.dtype)


@torch.no_grad()
def equivariance_curve(
    predict_fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    angles: Sequence[float] = range(0, 91, 15),
    plane: Sequence[int] = (-2, -1),
    task: str = "classify",
    mask: torch.Tensor | None = None,
) -> dict:
    """Agreement between the prediction of the rotated input and the rotated prediction, per angle.

    ``x``: inputs ``(N, C, *spatial)``; each angle (degrees) rotates them with :func:`rotate` (bilinear,
    about the grid centre, in ``plane``, zero outside). ``predict_fn(x)`` returns class scores (logits or
    probabilities; the argmax is used): ``(N, K)`` for ``task="classify"``, ``(N, K, *spatial)`` for
    ``task="segment"``.

    - classify: the fraction of samples whose predicted class is unchanged (an invariant classifier);
    - segment: the fraction of voxels where the prediction on the rotated input equals the rotated
      prediction (label map rotated with nearest-neighbour sampling), over voxels inside the rotated field
      of view (whose source lies inside the input grid) and, when ``mask`` ``(N, *spatial)`` (bool, in the
      frame of ``x``, e.g. voxels with cells) is given, inside the rotated mask.

    An exactly equivariant model scores 1.0 at 0° and at multiples of 90° (exact grid rotations). Returns
    ``{"task", "plane", "angles": [deg], "agreement": [fraction], "n": samples or voxels compared per
    angle}``.
    """
    if task not in ("classify", "segment"):
        raise InputError(f"task must be 'classify' or 'segment', got {task!r}")
    plane = _spatial_plane(x, plane)
    expected = 2 if task == "classify" else x.ndim
    ref = predict_fn(x)
    if ref.ndim != expected or ref.shape[0] != x.shape[0]:
        raise InputError(
            f"predict_fn returned shape {tuple(ref.shape)}; for task={task!r} and inputs "
            f"{tuple(x.shape)} it must return {'(N, K)' if task == 'classify' else '(N, K, *spatial)'}"
        )
    ref = ref.argmax(1).cpu()
    if mask is not None and tuple(mask.shape) != (x.shape[0], *x.shape[2:]):
        raise InputError(f"mask must have shape (N, *spatial) = {(x.shape[0], *x.shape[2:])}, got {tuple(mask.shape)}")
    angles = [float(a) for a in angles]
    agreement, counts = [], []
    for angle in angles:
        pred = predict_fn(rotate(x, angle, plane)).argmax(1).cpu()
        if task == "classify":
            same = pred == ref
        else:
            ref_rot = rotate(ref[:, None], angle, plane, mode="nearest")[:, 0]
            valid = rotate(torch.ones_like(x[:, :1], dtype=torch.float32), angle, plane)[:, 0].cpu() > 1 - 1e-4
            if mask is not None:
                valid &= rotate(mask[:, None].float(), angle, plane, mode="nearest")[:, 0].cpu() > 0.5
            same = (pred == ref_rot)[valid]
        counts.append(int(same.numel()))
        agreement.append(float(same.float().mean()) if same.numel() else float("nan"))
    return {"task": task, "plane": list(plane), "angles": angles, "agreement": agreement, "n": counts}


def score(
    y_true: np.ndarray, output: np.ndarray, class_names: Sequence[str], *, segment: bool = False, ignore: int = -1
) -> dict:
    """The test scores of a model's output: the one entry point of validation, the test splits of ``train``,
    ``train-npz`` and ``bench-models``, and ``evaluate``.

    Classification (``segment=False``): ``y_true`` ``(N,)`` labels in 0..K-1 and ``output`` ``(N, K)`` class
    probabilities, scored by :func:`classification_metrics`. Segmentation: ``y_true`` label maps (any shape,
    ``ignore`` = no cells) and ``output`` either the predicted labels (same shape) or class scores with the
    classes on axis 1 (one axis more; the argmax is taken), scored by :func:`segmentation_metrics`.
    """
    if not segment:
        return classification_metrics(y_true, output, class_names)
    y_true, output = np.asarray(y_true), np.asarray(output)
    y_pred = output.argmax(1) if output.ndim == y_true.ndim + 1 else output
    return segmentation_metrics(y_true, y_pred, class_names, ignore)
