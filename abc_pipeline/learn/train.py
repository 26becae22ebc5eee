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
from abc_pipeline.fileio import atomic_write_text, claim_directory
from abc_pipeline.learn.checkpoint import (
    checkpoint_mismatches,
    config_differences,
    config_hash,
    load_checkpoint,
    publish_run,
    save_checkpoint,
)
from abc_pipeline.learn.inference import autocast, forward, model_inputs, pick_device
from abc_pipeline.metrics import score

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
    num_workers: int,
) -> tuple[float, dict]:
    """Mean unweighted loss over labelled targets and the metrics of ``ds``
    (:func:`abc_pipeline.metrics.score`)."""
    model.eval()
    loss_sum, n = 0.0, 0
    outs, targets = [], []
    collate = getattr(ds, "collate", None)
    for x, y in DataLoader(ds, batch_size=batch_size, num_workers=num_workers, collate_fn=collate):
        logits = forward(model, x, device)
        y = y.to(device, non_blocking=True).long()
        labelled = int((y != IGNORE_INDEX).sum())
        if labelled:
            loss_sum += float(F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="sum"))
            n += labelled
        if task == "classify":
            outs.append(torch.softmax(logits, 1).cpu())
            targets.append(y.cpu())
        else:
            keep = y != IGNORE_INDEX
            outs.append(logits.argmax(1)[keep].cpu())
            targets.append(y[keep].cpu())
    if n == 0:
        raise InputError("the validation split has no labelled samples/voxels; choose other split fractions")
    y_true, out = torch.cat(targets).numpy(), torch.cat(outs).numpy()
    return loss_sum / n, score(y_true, out, class_names, segment=task == "segment", ignore=IGNORE_INDEX)


def _rank(value: float) -> float:
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

    Steps: :func:`_run_config` (checked arguments, loss weights, the run's configuration), :meth:`_Run.start`
    (device, optimiser, schedule), :meth:`_Run.resume` (``last.pt`` or a fresh seed), then per epoch
    :meth:`_Run.train_epoch`, :func:`_validate` and :meth:`_Run.record` (early stopping, ``last.pt``), and
    :meth:`_Run.finish` (best weights, ``metrics.json``, ``checkpoint.pt``).
    """
    out_dir = Path(out_dir)
    run_config, weight = _run_config(
        model,
        train_ds,
        val_ds,
        class_names=class_names,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        seed=seed,
        patience=patience,
        metric=metric,
        class_weights=class_weights,
        config=config,
    )
    run = _Run.start(model, run_config, weight, out_dir, device)
    claim_directory(out_dir, "train-run", inputs=inputs)
    run.resume(resume)
    out_dir.mkdir(parents=True, exist_ok=True)

    start = run.state["epoch"] + 1
    bar = tqdm(range(start, epochs), initial=start, total=epochs, desc=f"train {run.name}", disable=not progress)
    for epoch in bar:
        if run.state["stopped_early"]:
            break
        t0 = time.perf_counter()
        train_loss, lr_now = run.train_epoch(train_ds, epoch, num_workers)
        val_loss, val_metrics = _validate(model, val_ds, run.task, run.class_names, batch_size, run.device, num_workers)
        row = {
            "epoch": epoch,
            "train_loss": train_loss,
            "val_loss": val_loss,
            **{f"val_{m}": val_metrics[m] for m in METRICS[run.task]},
            "lr": lr_now,
            "seconds": time.perf_counter() - t0,
        }
        run.record(row, val_metrics)
        bar.set_postfix(loss=f"{row['train_loss']:.3f}", **{run.metric: f"{val_metrics[run.metric]:.3f}"})
    bar.close()
    return run.finish()


def _run_config(
    model: nn.Module,
    train_ds: Dataset,
    val_ds: Dataset,
    *,
    class_names: Sequence[str],
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    seed: int,
    patience: int,
    metric: str | None,
    class_weights: str | Sequence[float] | None,
    config: Mapping[str, Any] | None,
) -> tuple[dict, torch.Tensor | None]:
    """The run's configuration (stored in the checkpoints; its hash identifies the run: model name, task and
    spec, classes and every training argument) and the class weights of the loss (``(K,)`` float32 or
    ``None``), after checking the arguments (:class:`InputError`)."""
    spec = getattr(model, "spec", None)
    task = getattr(model, "task", "classify")
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
        "model_name": getattr(model, "name", type(model).__name__),
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
    return run_config, weight


@dataclass
class _Run:
    """One training run in progress: the model with its optimiser (AdamW), cosine schedule and gradient
    scaler on ``device``, the run's configuration (:func:`_run_config`) and its bookkeeping.

    ``state``: ``epoch`` (last finished, 0-based; -1 before the first), ``best_score``, ``best_epoch``,
    ``bad_epochs`` (since the best), ``stopped_early``, ``history`` (one row per epoch) and ``best_val`` (the
    best epoch's validation metrics); ``best_model``: the best epoch's weights on the CPU. Both are saved in
    every checkpoint, so a resumed run continues exactly where the killed one stopped."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    device: torch.device
    weight: torch.Tensor | None
    config: dict
    config_hash: str
    out_dir: Path
    state: dict = field(
        default_factory=lambda: {
            "epoch": -1,
            "best_score": -math.inf,
            "best_epoch": -1,
            "bad_epochs": 0,
            "stopped_early": False,
            "history": [],
            "best_val": {},
        }
    )
    best_model: dict | None = None

    @classmethod
    def start(
        cls, model: nn.Module, config: dict, weight: torch.Tensor | None, out_dir: Path, device: str | torch.device
    ) -> _Run:
        """The model on the device (deterministic cuDNN on CUDA) with a fresh optimiser, schedule over
        ``config["epochs"]`` and gradient scaler (enabled on CUDA only)."""
        device = pick_device(device)
        amp = device.type == "cuda"
        if amp:
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True
        model.to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
        return cls(
            model=model,
            optimizer=optimizer,
            scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config["epochs"]),
            scaler=torch.amp.GradScaler("cuda", enabled=amp),
            device=device,
            weight=weight.to(device) if weight is not None else None,
            config=config,
            config_hash=config_hash(config),
            out_dir=out_dir,
        )

    @property
    def amp(self) -> bool:
        return self.device.type == "cuda"

    @property
    def name(self) -> str:
        return self.config["model_name"]

    @property
    def task(self) -> str:
        return self.config["task"]

    @property
    def metric(self) -> str:
        return self.config["metric"]

    @property
    def class_names(self) -> list[str]:
        return self.config["class_names"]

    def resume(self, resume: bool | str) -> None:
        """Continue from ``out_dir/last.pt`` when ``resume`` allows it and it holds this run (weights,
        optimiser, schedule, scaler, RNG states and bookkeeping); else seed the torch RNG with the run's seed.
        A ``last.pt`` of another run is an :class:`InputError`, or (``"if-unchanged"``) discarded."""
        last = self.out_dir / "last.pt"
        ckpt = load_checkpoint(last) if resume and last.is_file() else None
        if ckpt is not None:
            mismatches = checkpoint_mismatches(ckpt, self.name, self.task, self.class_names)
            if not mismatches and ckpt["config_hash"] != self.config_hash:
                mismatches = [f"configuration differs in {', '.join(config_differences(ckpt['config'], self.config))}"]
            if mismatches:
                reason = f"{last} holds another run: {'; '.join(mismatches)}"
                if resume != "if-unchanged":
                    raise InputError(
                        f"{reason}. Use another output directory for this model, task and class level, "
                        f"or pass resume=False (--restart) to start over"
                    )
                log.warning("%s; starting over", reason)
                ckpt = None
        if ckpt is None:
            torch.manual_seed(self.config["seed"])
            return
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["rng_cpu"])
        if self.amp and ckpt["rng_cuda"]:
            torch.cuda.set_rng_state_all(ckpt["rng_cuda"])
        self.state = {key: ckpt[key] for key in self.state}
        self.best_model = ckpt["best_model"]
        log.info(
            "resuming %s from epoch %d (best %s %.4f at epoch %d)",
            self.out_dir,
            self.state["epoch"] + 1,
            self.metric,
            self.state["best_score"],
            self.state["best_epoch"],
        )

    def train_epoch(self, train_ds: Dataset, epoch: int, num_workers: int) -> tuple[float, float]:
        """One pass over ``train_ds`` in an order seeded by ``(seed, epoch)``, then one step of the schedule.
        Returns the mean training loss over the labelled targets and the learning rate the epoch used."""
        self.model.train()
        batch_size = self.config["batch_size"]
        generator = torch.Generator().manual_seed(self.config["seed"] * _SHUFFLE_STRIDE + epoch)
        loader = DataLoader(
            train_ds,
            batch_size=batch_size,
            shuffle=True,
            generator=generator,
            num_workers=num_workers,
            pin_memory=self.amp,
            collate_fn=getattr(train_ds, "collate", None),
            drop_last=len(train_ds) % batch_size == 1,
        )  # no 1-sample batch (batch norm)
        loss_sum, n = 0.0, 0
        for x, y in loader:
            x, y = model_inputs(x, self.device), y.to(self.device, non_blocking=True).long()
            labelled = int((y != IGNORE_INDEX).sum())
            if not labelled:
                continue
            with autocast(self.device):
                logits = self.model(*x)
            loss = _loss(logits, y, self.weight)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            loss_sum += float(loss.detach()) * labelled
            n += labelled
        lr_now = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        return loss_sum / max(n, 1), lr_now

    def record(self, row: dict, val_metrics: dict) -> None:
        """Book the epoch of history row ``row``: keep its weights when its validation score is the best so
        far, else count it towards early stopping; then save ``last.pt`` and ``history.tsv``."""
        state = self.state
        state["history"].append(row)
        state["epoch"] = row["epoch"]
        value = _rank(val_metrics[self.metric])
        if value > state["best_score"]:
            state.update(best_score=value, best_epoch=row["epoch"], bad_epochs=0, best_val=val_metrics)
            self.best_model = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        else:
            state["bad_epochs"] += 1
            state["stopped_early"] = state["bad_epochs"] >= self.config["patience"]
        save_checkpoint(self.snapshot(), self.out_dir / "last.pt")
        _write_history(state["history"], self.out_dir / "history.tsv")
        log.info(
            "epoch %d: train_loss %.4f val_loss %.4f val_%s %.4f (%.1f s)",
            row["epoch"],
            row["train_loss"],
            row["val_loss"],
            self.metric,
            val_metrics[self.metric],
            row["seconds"],
        )

    def snapshot(self) -> dict:
        """The content of ``last.pt``: weights, optimiser, schedule, scaler and RNG states, bookkeeping and
        the run's configuration."""
        return {
            "model": self.model.state_dict(),
            "best_model": self.best_model,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if self.amp else [],
            **self.state,
            "config": self.config,
            "config_hash": self.config_hash,
            "class_names": self.class_names,
            "model_name": self.name,
            "task": self.task,
            "model_spec": self.config["model_spec"],
        }

    def finish(self) -> TrainResult:
        """Load the best weights into the model, write ``history.tsv`` and publish ``metrics.json`` and
        ``checkpoint.pt`` (:func:`abc_pipeline.learn.checkpoint.publish_run`)."""
        state, metric = self.state, self.metric
        if state["best_epoch"] < 0:
            raise InputError(f"no epoch reached a defined validation {metric}; check the validation labels")
        self.model.load_state_dict(self.best_model)
        _write_history(state["history"], self.out_dir / "history.tsv")
        result = TrainResult(
            out_dir=self.out_dir,
            best_epoch=state["best_epoch"],
            best_score=state["best_score"],
            metric=metric,
            epochs_run=state["epoch"] + 1,
            stopped_early=state["stopped_early"],
            config_hash=self.config_hash,
            val_metrics=state["best_val"],
            history=state["history"],
        )
        metrics = {
            "model": self.name,
            "task": self.task,
            "metric": metric,
            "best_epoch": result.best_epoch,
            f"best_val_{metric}": result.best_score,
            "val": result.val_metrics,
            "epochs_run": result.epochs_run,
            "stopped_early": result.stopped_early,
            "config_hash": self.config_hash,
            "device": str(self.device),
            "n_params": sum(p.numel() for p in self.model.parameters()),
        }
        publish_run(metrics, _best_checkpoint(self.snapshot()), self.out_dir)
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


__all__ = ["IGNORE_INDEX", "METRICS", "TrainResult", "balanced_weights", "class_counts", "train"]
