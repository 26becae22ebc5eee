"""Training checkpoints: atomic save, safe load, compatibility checks, config hashes, model rebuild.

A checkpoint is a ``dict`` saved with ``torch.save`` holding only tensors and plain Python values (so it loads
with ``weights_only=True``): ``model`` / ``optimizer`` / ``scheduler`` / ``scaler`` state dicts, ``epoch``
(0-based, last finished), ``rng_cpu`` / ``rng_cuda`` (torch RNG states), early-stopping state
(``best_score``, ``best_epoch``, ``bad_epochs``, ``stopped_early``), ``history`` (one dict per epoch),
``config`` and ``config_hash``, ``class_names``, ``model_name``, ``task`` (the training objective:
``classify`` or ``segment``) and ``model_spec`` (:meth:`abc_pipeline.nn.ModelSpec.to_dict`: every argument
that rebuilds the network; ``None`` for a network built outside the zoo and for the scikit-learn baselines).
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from abc_pipeline.errors import InputError
from abc_pipeline.fileio import staged_output


def config_hash(config: Mapping[str, Any]) -> str:
    """First 16 hex digits of the SHA-256 of ``config`` as canonical JSON (sorted keys)."""
    text = json.dumps(config, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _atomic(path: Path, write) -> Path:
    with staged_output(path) as tmp:
        write(tmp)
    return path


def save_checkpoint(state: Mapping[str, Any], path: str | Path) -> Path:
    """``torch.save`` to a temporary file next to ``path``, then rename (never a half-written checkpoint).

    Serialised in memory first, then written with Python's own file I/O: a full disk raises ``OSError``
    (``ENOSPC``) naming the file, where ``torch.save``'s writer would raise a bare ``RuntimeError``."""
    buffer = io.BytesIO()
    torch.save(dict(state), buffer)
    return _atomic(Path(path), lambda tmp: tmp.write_bytes(buffer.getbuffer()))


def write_json(obj: Any, path: str | Path) -> Path:
    """Write ``obj`` as indented JSON atomically (NaN written as ``NaN``)."""
    return _atomic(Path(path), lambda tmp: tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n"))


def publish_run(metrics: Mapping[str, Any], checkpoint: Mapping[str, Any], out_dir: Path) -> None:
    """Write ``metrics.json``, then ``checkpoint.pt`` (each atomically): ``checkpoint.pt`` marks a complete run.

    When the second write fails (e.g. the disk is full), ``metrics.json`` is removed again, so the folder never
    holds one of the two without the other (a network run's ``last.pt`` stays, for resuming)."""
    for previous in ("checkpoint.pt", "metrics.json"):  # a previous run's pair, about to be replaced
        (out_dir / previous).unlink(missing_ok=True)
    write_json(metrics, out_dir / "metrics.json")
    try:
        save_checkpoint(checkpoint, out_dir / "checkpoint.pt")
    except BaseException:
        (out_dir / "metrics.json").unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint onto the CPU; :class:`InputError` when it is missing or not a checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: checkpoint not found; train first or give the path of checkpoint.pt/last.pt")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"{path}: not a readable abc-pipeline checkpoint ({exc}); delete it and retrain") from exc
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_name" not in ckpt:
        raise InputError(f"{path}: not an abc-pipeline checkpoint (no 'model'/'model_name' entries)")
    return ckpt


def checkpoint_mismatches(ckpt: Mapping[str, Any], model_name: str, task: str, class_names: Sequence[str]) -> list[str]:
    """Every difference between ``ckpt`` and the model/task/classes at hand, one phrase each (empty: compatible)."""
    diffs = []
    if ckpt["model_name"] != model_name:
        diffs.append(f"model {ckpt['model_name']!r} != {model_name!r}")
    if ckpt["task"] != task:
        diffs.append(f"task {ckpt['task']!r} != {task!r}")
    if list(ckpt["class_names"]) != list(class_names):
        old, new = list(ckpt["class_names"]), list(class_names)
        detail = (
            f"{len(old)} vs {len(new)} classes"
            if len(old) != len(new)
            else f"first difference at index {next(i for i, (a, b) in enumerate(zip(old, new)) if a != b)}"
        )
        diffs.append(f"class list differs ({detail}: {old[:5]}... vs {new[:5]}...)")
    return diffs


def config_differences(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested configs."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += config_differences(a, b, f"{prefix}{key}.")
        elif json.dumps(a, default=str) != json.dumps(b, default=str):
            out.append(f"{prefix}{key}")
    return out


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the network of a checkpoint from its ``model_spec`` alone
    (:meth:`abc_pipeline.nn.ModelSpec.build`) and load its weights.

    Returns ``(model in eval mode on device, checkpoint dict)``.
    """
    from abc_pipeline.nn import ModelSpec

    ckpt = load_checkpoint(path)
    if "model_spec" not in ckpt:
        raise InputError(
            f"{path}: written by an older abc-pipeline (no 'model_spec': not every argument that builds the "
            "network was recorded); retrain the model with this version"
        )
    if ckpt["model_spec"] is None:
        raise InputError(
            f"{path}: the network was built outside the zoo (no model spec); rebuild it yourself and load ckpt['model']"
        )
    model = ModelSpec.from_dict(ckpt["model_spec"], where=f"{path}: model_spec").build()
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt
