"""Training loop: AdamW + cosine schedule, class-balanced loss, early stopping, atomic checkpoints, resume.

Works for any ``torch.utils.data.Dataset`` of ``(input, target)`` pairs:

- classification: input ``(C, *spatial)`` (or a tuple of tensors, passed to the model as positional
  arguments; a dataset with a ``collate`` method batches its own samples), target a class index (batched:
  ``(B,)``); the model returns logits ``(B, K)``;
- segmentation: input ``(C, *spatial)``, target ``(*spatial)`` int64 with ``IGNORE_INDEX`` (-1) where there
  are no cells (those voxels count neither in the loss nor in the metrics); the model returns ``(B, K, *spatial)``.

Outputs in ``out_dir``: ``last.pt`` (every epoch, for resuming; it holds the best weights too),
``history.tsv`` (one row per epoch: epoch, train_loss, val_loss, val_<metric>..., lr, seconds), ``metrics.json``
and, written last when the run is complete, ``checkpoint.pt`` (the best validation score): a run that fails
(a full disk, a kill) never leaves a ``checkpoint.pt`` without its ``metrics.json``. A run that is killed and started again with the same arguments resumes from ``last.pt``
and ends in exactly the state of an uninterrupted run: the shuffling generator is re-seeded from
``(seed, epoch)`` every epoch and the torch RNG state is restored from the checkpoint.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from abc_pipeline.errors import InputError
from abc_pipeline.metrics import classification_metrics, segmentation_metrics
from abc_pipeline.fileio import atomic_write_text, claim_directory
from abc_pipeline.learn.checkpoint import (
    checkpoint_mismatches,
    config_differences,
    config_hash,
    load_checkpoint,
    publish_run,
    save_checkpoint,
)

log = logging.getLogger(__name__)

IGNORE_INDEX = -1
METRICS = {
    "classify": ("balanced_accuracy", "accuracy", "macro_f1", "auc"),
    "segment": ("mean_dice", "mean_iou", "accuracy", "ari", "nmi"),
}
_SHUFFLE_STRIDE = 1_000_003  # shuffling generator of epoch e is seeded with seed * stride + e


@dataclass
class TrainResult:
    """What :func:`train` did: best epoch (0-based) and score, epochs run, the history rows and outputs."""

    out_dir: Path
    best_epoch: int
    best_score: float
    metric: str
    epochs_run: int
    stopped_early: bool
    config_hash: str
    val_metrics: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)

    @property
    def checkpoint(self) -> Path:
        return self.out_dir / "checkpoint.pt"


def pick_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"``: CUDA when available, else CPU; otherwise ``torch.device(device)`` (:class:`InputError` for a
    device that is not a torch device or not present)."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InputError(f"--device {device!r} is not a device ({exc}); use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(
            f"--device {device}: this torch build ({torch.__version__}) sees no CUDA GPU; use "
            "--device cpu or auto, or install a CUDA build of torch"
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InputError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return dev


def class_counts(ds: Dataset, n_classes: int, batch_size: int = 256) -> torch.Tensor:
    """Labelled samples (classification) or voxels (segmentation) per class, ``(n_classes,)`` int64.

    Uses ``ds.targets`` when the dataset has it, else reads the dataset once. ``IGNORE_INDEX`` is skipped.
    """
    if hasattr(ds, "targets"):
        targets = [torch.as_tensor(ds.targets)]
    else:
        targets = [y for _, y in DataLoader(ds, batch_size=batch_size)]
    counts = torch.zeros(n_classes, dtype=torch.int64)
    for t in targets:
        t = t.reshape(-1).long()
        t = t[t != IGNORE_INDEX]
        if len(t) and (t.min() < 0 or t.max() >= n_classes):
            raise InputError(
                f"targets must lie in 0..{n_classes - 1} (or {IGNORE_INDEX} = no cells), found "
                f"{int(t.min())}..{int(t.max())}; check the class list"
            )
        counts += torch.bincount(t, minlength=n_classes)
    return counts


def balanced_weights(counts: torch.Tensor) -> torch.Tensor:
    """Loss weights ``N / (K_present * n_c)`` (1 for classes absent from training), float32 ``(K,)``."""
    present = counts > 0
    w = torch.ones(len(counts), dtype=torch.float32)
    w[present] = counts.sum().float() / (present.sum() * counts[present].float())
    return w


def model_inputs(x: torch.Tensor | Sequence[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, ...]:
    """A batch's model inputs on ``device`` as positional arguments: one tensor, or several (a dataset whose
    input is a tuple, e.g. ``(patch, expression)`` of the cell-context classifier)."""
    parts = tuple(x) if isinstance(x, (list, tuple)) else (x,)
    return tuple(t.to(device, non_blocking=True) for t in parts)


@torch.no_grad()
def predict_proba(
    model: nn.Module, x: torch.Tensor | Dataset, batch_size: int = 256, device: str | torch.device = "auto"
) -> torch.Tensor:
    """Softmax probabilities of ``model`` over inputs ``x`` ``(N, C, *spatial)`` (or a dataset of pairs).

    Returns float32 on the CPU: ``(N, K)`` for classifiers, ``(N, K, *spatial)`` for segmenters. Mixed
    precision on CUDA.
    """
    device = pick_device(device)
    model.eval().to(device)
    loader = DataLoader(x, batch_size=batch_size, collate_fn=getattr(x, "collate", None))
    out = []
    for batch in loader:
        xb = batch[0] if isinstance(batch, (list, tuple)) else batch
        with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
            logits = model(*model_inputs(xb, device))
        out.append(torch.softmax(logits.float(), dim=1).cpu())
    return torch.cat(out)


def _loss(logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy, mean over labelled targets (``IGNORE_INDEX`` skipped), computed in float32."""
    return F.cross_entropy(logits.float(), y, weight=weight, ignore_index=IGNORE_INDEX)


@torch.no_grad()
def _validate(
    model: nn.Module,
    ds: Dataset,
    task: str,
    class_names: Sequence[str],
    batch_size: int,
    device: torch.device,
    amp: bool,
    num_workers: int,
) -> tuple[float, dict]:
    """Mean unweighted loss over labelled targets and the metrics of ``ds``."""
    model.eval()
    loss_sum, n = 0.0, 0
    outs, targets = [], []
    collate = getattr(ds, "collate", None)
    for x, y in DataLoader(ds, batch_size=batch_size, num_workers=num_workers, collate_fn=collate):
        x, y = model_inputs(x, device), y.to(device, non_blocking=True).long()
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            logits = model(*x)
        labelled = int((y != IGNORE_INDEX).sum())
        if labelled:
            loss_sum += float(F.cross_entropy(logits.float(), y, ignore_index=IGNORE_INDEX, reduction="sum"))
            n += labelled
        if task == "classify":
            outs.append(torch.softmax(logits.float(), 1).cpu())
            targets.append(y.cpu())
        else:
            keep = y != IGNORE_INDEX
            outs.append(logits.argmax(1)[keep].cpu())
            targets.append(y[keep].cpu())
    if n == 0:
        raise InputError("the validation split has no labelled samples/voxels; choose other split fractions")
    y_true = torch.cat(targets).numpy()
    if task == "classify":
        metrics = classification_metrics(y_true, torch.cat(outs).numpy(), class_names)
    else:
        metrics = segmentation_metrics(y_true, torch.cat(outs).numpy(), class_names, ignore=IGNORE_INDEX)
    return loss_sum / n, metrics


def _score(value: float) -> float:
    """NaN (metric undefined) ranks below every real score."""
    return -math.inf if math.isnan(value) else value


def train(
    model: nn.Module,
    train_ds: Dataset,
    val_ds: Dataset,
    out_dir: str | Path,
    *,
    class_names: Sequence[str],
    epochs: int = 30,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    seed: int = 0,
    patience: int = 10,
    metric: str | None = None,
    class_weights: str | Sequence[float] | None = "balanced",
    device: str | torch.device = "auto",
    num_workers: int = 0,
    progress: bool = True,
    config: Mapping[str, Any] | None = None,
    resume: bool | str = True,
    inputs: Sequence[str | Path | None] = (),
) -> TrainResult:
    """Train ``model`` on ``train_ds``, early-stop on ``metric`` over ``val_ds``; ``model`` ends with the best
    weights.

    ``class_names``: one per class (``K``). ``metric``: higher is better; ``"balanced_accuracy"`` (default),
    ``"accuracy"``, ``"macro_f1"``, ``"auc"`` for classification, ``"mean_dice"`` (default), ``"mean_iou"``,
    ``"accuracy"``, ``"ari"``, ``"nmi"`` for segmentation (the task is ``model.task``, default
    ``"classify"``). ``class_weights``: ``"balanced"`` (inverse class frequency), ``None`` or ``K`` floats.
    ``patience``: epochs without improvement before stopping. ``lr``: AdamW learning rate, annealed by a
    cosine schedule over ``epochs``. ``config``: free-form run description stored (with the training
    arguments and ``model.spec``, the :class:`abc_pipeline.nn.ModelSpec` of a zoo model that rebuilds it for
    predict/evaluate; ``None`` for another network) in the checkpoints; its hash identifies the run.
    ``resume``: continue from ``out_dir/last.pt`` when it exists (its config must match, else InputError);
    ``"if-unchanged"``: the same, but a ``last.pt`` of another configuration (e.g. after the inputs changed) is
    discarded with a warning and training starts over; ``False``: always start over. ``inputs``: the files the
    datasets read (``out_dir`` may not be, contain or lie inside one; :func:`abc_pipeline.fileio.claim_directory`).
    """
    out_dir = Path(out_dir)
    spec = getattr(model, "spec", None)
    task = getattr(model, "task", "classify")
    model_name = getattr(model, "name", type(model).__name__)
    class_names = [str(c) for c in class_names]
    metric = metric or METRICS[task][0]
    if metric not in METRICS[task]:
        raise InputError(f"metric {metric!r} is not a {task} metric; choose one of {METRICS[task]}")
    if epochs < 1 or batch_size < 1 or patience < 1:
        raise InputError(f"epochs, batch_size and patience must be >= 1, got {epochs}, {batch_size}, {patience}")
    if len(train_ds) == 0 or len(val_ds) == 0:
        raise InputError(f"empty split: {len(train_ds)} training and {len(val_ds)} validation samples")
    k = len(class_names)
    if isinstance(class_weights, str):
        if class_weights != "balanced":
            raise InputError(f"class_weights must be 'balanced', None or {k} numbers, got {class_weights!r}")
        weight = balanced_weights(class_counts(train_ds, k))
    elif class_weights is None:
        weight = None
    else:
        weight = torch.as_tensor(class_weights, dtype=torch.float32)
        if weight.shape != (k,):
            raise InputError(f"class_weights has {weight.numel()} values; give one per class ({k})")
    run_config = {
        "config": dict(config or {}),
        "model_name": model_name,
        "task": task,
        "model_spec": spec.to_dict() if spec is not None else None,
        "class_names": class_names,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
        "seed": seed,
        "patience": patience,
        "metric": metric,
        "class_weights": class_weights
        if isinstance(class_weights, str) or class_weights is None
        else [float(w) for w in class_weights],
    }
    chash = config_hash(run_config)

    device = pick_device(device)
    amp = device.type == "cuda"
    if amp:
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    model.to(device)
    weight = weight.to(device) if weight is not None else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    state = {
        "epoch": -1,
        "best_score": -math.inf,
        "best_epoch": -1,
        "bad_epochs": 0,
        "stopped_early": False,
        "history": [],
        "best_val": {},
    }

    claim_directory(out_dir, "train-run", inputs=inputs)
    last = out_dir / "last.pt"
    ckpt = load_checkpoint(last) if resume and last.is_file() else None
    if ckpt is not None:
        mismatches = checkpoint_mismatches(ckpt, model_name, task, class_names)
        if not mismatches and ckpt["config_hash"] != chash:
            mismatches = [f"configuration differs in {', '.join(config_differences(ckpt['config'], run_config))}"]
        if mismatches:
            reason = f"{last} holds another run: {'; '.join(mismatches)}"
            if resume != "if-unchanged":
                raise InputError(
                    f"{reason}. Use another output directory for this model, task and class level, "
                    f"or pass resume=False (--restart) to start over"
                )
            log.warning("%s; starting over", reason)
            ckpt = None
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["rng_cpu"])
        if amp and ckpt["rng_cuda"]:
            torch.cuda.set_rng_state_all(ckpt["rng_cuda"])
        state = {key: ckpt[key] for key in state}
        best_model = ckpt["best_model"]
        log.info(
            "resuming %s from epoch %d (best %s %.4f at epoch %d)",
            out_dir,
            state["epoch"] + 1,
            metric,
            state["best_score"],
            state["best_epoch"],
        )
    else:
        torch.manual_seed(seed)
        best_model = None
    out_dir.mkdir(parents=True, exist_ok=True)

    def snapshot() -> dict:
        return {
            "model": model.state_dict(),
            "best_model": best_model,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if amp else [],
            **state,
            "config": run_config,
            "config_hash": chash,
            "class_names": class_names,
            "model_name": model_name,
            "task": task,
            "model_spec": spec.to_dict() if spec is not None else None,
        }

    start = state["epoch"] + 1
    bar = tqdm(range(start, epochs), initial=start, total=epochs, desc=f"train {model_name}", disable=not progress)
    for epoch in bar:
        if state["stopped_early"]:
            break
        t0 = time.perf_counter()
        model.train()
        generator = torch.Generator().manual_seed(seed * _SHUFFLE_STRIDE + epoch)
        loader = DataLoader(
            train_ds,
            batch_size=batch_size,
            shuffle=True,
            generator=generator,
            num_workers=num_workers,
            pin_memory=amp,
            collate_fn=getattr(train_ds, "collate", None),
            drop_last=len(train_ds) % batch_size == 1,
        )  # no 1-sample batch (batch norm)
        loss_sum, n = 0.0, 0
        for x, y in loader:
            x, y = model_inputs(x, device), y.to(device, non_blocking=True).long()
            labelled = int((y != IGNORE_INDEX).sum())
            if not labelled:
                continue
            with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                logits = model(*x)
            loss = _loss(logits, y, weight)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            loss_sum += float(loss.detach()) * labelled
            n += labelled
        lr_now = optimizer.param_groups[0]["lr"]
        scheduler.step()
        val_loss, val_metrics = _validate(model, val_ds, task, class_names, batch_size, device, amp, num_workers)
        score = _score(val_metrics[metric])
        row = {
            "epoch": epoch,
            "train_loss": loss_sum / max(n, 1),
            "val_loss": val_loss,
            **{f"val_{m}": val_metrics[m] for m in METRICS[task]},
            "lr": lr_now,
            "seconds": time.perf_counter() - t0,
        }
        state["history"].append(row)
        state["epoch"] = epoch
        improved = score > state["best_score"]
        if improved:
            state.update(best_score=score, best_epoch=epoch, bad_epochs=0, best_val=val_metrics)
            best_model = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        else:
            state["bad_epochs"] += 1
            state["stopped_early"] = state["bad_epochs"] >= patience
        save_checkpoint(snapshot(), last)
        _write_history(state["history"], out_dir / "history.tsv")
        bar.set_postfix(loss=f"{row['train_loss']:.3f}", **{metric: f"{val_metrics[metric]:.3f}"})
        log.info(
            "epoch %d: train_loss %.4f val_loss %.4f val_%s %.4f (%.1f s)",
            epoch,
            row["train_loss"],
            val_loss,
            metric,
            val_metrics[metric],
            row["seconds"],
        )
    bar.close()

    if state["best_epoch"] < 0:
        raise InputError(f"no epoch reached a defined validation {metric}; check the validation labels")
    model.load_state_dict(best_model)
    _write_history(state["history"], out_dir / "history.tsv")
    result = TrainResult(
        out_dir=out_dir,
        best_epoch=state["best_epoch"],
        best_score=state["best_score"],
        metric=metric,
        epochs_run=state["epoch"] + 1,
        stopped_early=state["stopped_early"],
        config_hash=chash,
        val_metrics=state["best_val"],
        history=state["history"],
    )
    metrics = {
        "model": model_name,
        "task": task,
        "metric": metric,
        "best_epoch": result.best_epoch,
        f"best_val_{metric}": result.best_score,
        "val": result.val_metrics,
        "epochs_run": result.epochs_run,
        "stopped_early": result.stopped_early,
        "config_hash": chash,
        "device": str(device),
        "n_params": sum(p.numel() for p in model.parameters()),
    }
    publish_run(metrics, _best_checkpoint(snapshot()), out_dir)
    return result


def _best_checkpoint(snapshot: dict) -> dict:
    """``checkpoint.pt`` content: the run state with the best epoch's weights as ``model`` and its number as
    ``epoch`` (optimizer, scheduler and RNG states are the last epoch's: resuming reads ``last.pt``).

    ``last.pt`` keeps the best weights too (``best_model``), so ``checkpoint.pt`` can always be rewritten.
    """
    rest = {k: v for k, v in snapshot.items() if k != "best_model"}
    return {**rest, "model": snapshot["best_model"], "epoch": snapshot["best_epoch"]}


def _write_history(history: list[dict], path: Path) -> None:
    atomic_write_text(path, pd.DataFrame(history).to_csv(sep="\t", index=False, float_format="%.6g"))


__all__ = [
    "IGNORE_INDEX",
    "METRICS",
    "TrainResult",
    "balanced_weights",
    "class_counts",
    "model_inputs",
    "pick_device",
    "predict_proba",
    "train",
]
