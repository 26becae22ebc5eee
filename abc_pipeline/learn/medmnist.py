"""Classification datasets from MedMNIST-format ``.npz`` files (2D or 3D), plus a synthetic writer.

File format (as written by the ``medmnist`` package): keys ``{train,val,test}_images`` and
``{train,val,test}_labels``; images ``(N, H, W)`` (grey 2D), ``(N, H, W, C)`` (colour 2D, channels last) or
``(N, D, H, W)`` (grey 3D), usually ``uint8`` in 0..255; labels ``(N, 1)`` integer class indices.
Multi-label files (labels ``(N, L)`` with ``L > 1``, e.g. ChestMNIST) are not single-label classification
and are rejected.

A file is given by path. A MedMNIST dataset *name* (``"dermamnist"``, ``"organmnist3d"``, ...) is
downloaded with the optional ``medmnist`` package (``pip install 'abc-pipeline[medmnist]'``) when the
network is reachable; offline, pass the local ``.npz`` path instead.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from abc_pipeline.errors import InputError
from abc_pipeline.fileio import staged_output

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
REQUIRED_KEYS = tuple(f"{s}_{k}" for s in SPLITS for k in ("images", "labels"))


class NpzClassification(Dataset):
    """One split of a MedMNIST-format file as ``(image, label)`` pairs.

    ``images``: float32 tensor ``(N, C, *spatial)`` scaled to [0, 1] when the file holds ``uint8``;
    ``targets``: int64 tensor ``(N,)`` of class indices (used for class-balanced loss weights).
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, class_names: Sequence[str]) -> None:
        self.images = images
        self.targets = targets
        self.class_names = list(class_names)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.targets[i]

    @property
    def dim(self) -> int:
        """Number of spatial axes (2 or 3)."""
        return self.images.ndim - 2

    @property
    def in_channels(self) -> int:
        return self.images.shape[1]


@dataclass
class NpzDatasets:
    """The three splits of one file, with what a model needs to know about them."""

    train: NpzClassification
    val: NpzClassification
    test: NpzClassification
    class_names: list[str]
    dim: int
    in_channels: int
    path: Path


def _images_to_tensor(images: np.ndarray, dim: int, path: Path, key: str) -> torch.Tensor:
    """``(N, H, W)``, ``(N, H, W, C)`` (2D) or ``(N, D, H, W)`` (3D) -> float32 ``(N, C, *spatial)``."""
    if dim == 2 and images.ndim == 3:
        images = images[:, None]
    elif dim == 2 and images.ndim == 4:
        images = np.moveaxis(images, -1, 1)
    elif dim == 3 and images.ndim == 4:
        images = images[:, None]
    elif dim == 3 and images.ndim == 5:
        images = np.moveaxis(images, -1, 1)
    else:
        raise InputError(
            f"{path}: '{key}' has shape {images.shape}; expected (N,H,W) or (N,H,W,C) for 2D, (N,D,H,W) for 3D"
        )
    x = torch.from_numpy(np.ascontiguousarray(images)).float()
    return x / 255.0 if images.dtype == np.uint8 else x


def _infer_dim(images: np.ndarray) -> int:
    """2 for ``(N,H,W)`` and channels-last ``(N,H,W,C)`` with ``C <= 4``; 3 for ``(N,D,H,W)``."""
    if images.ndim == 3:
        return 2
    if images.ndim == 4 and images.shape[-1] <= 4 < images.shape[-2]:
        return 2
    return 3


def load_npz(path: str | Path, dim: int | None = None, class_names: Sequence[str] | None = None) -> NpzDatasets:
    """Read a MedMNIST-format file into three :class:`NpzClassification` splits (all in memory).

    ``dim`` (2 or 3) resolves the ``(N,H,W,C)`` / ``(N,D,H,W)`` ambiguity; default: a last axis of at most 4
    that is shorter than the one before it is channels (2D colour), otherwise 3D. ``class_names`` default to
    ``"0" .. "K-1"`` with ``K = 1 + the largest label`` over all splits.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(
            f"{path}: no such MedMNIST-format .npz file; pass an existing path or a MedMNIST "
            f"dataset name such as 'dermamnist' (needs the medmnist package and network)"
        )
    with np.load(path) as z:
        missing = [k for k in REQUIRED_KEYS if k not in z.files]
        if missing:
            raise InputError(
                f"{path}: missing keys {missing}; a MedMNIST-format .npz needs "
                f"{list(REQUIRED_KEYS)} (found {sorted(z.files)})"
            )
        arrays = {k: z[k] for k in REQUIRED_KEYS}
    if dim is None:
        dim = _infer_dim(arrays["train_images"])
    if dim not in (2, 3):
        raise InputError(f"dim must be 2 or 3, got {dim}")
    labels = {}
    for s in SPLITS:
        y = arrays[f"{s}_labels"]
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise InputError(
                f"{path}: '{s}_labels' has shape {y.shape} and dtype {y.dtype}; expected integer "
                f"class indices of shape (N, 1) (multi-label files are not supported)"
            )
        if len(y) != len(arrays[f"{s}_images"]):
            raise InputError(
                f"{path}: '{s}_labels' has {len(y)} rows but '{s}_images' has "
                f"{len(arrays[f'{s}_images'])}; they must match"
            )
        if len(y) and y.min() < 0:
            raise InputError(f"{path}: '{s}_labels' holds negative labels; expected 0..K-1")
        labels[s] = torch.from_numpy(y.astype(np.int64))
    n_classes = 1 + max(int(y.max()) for y in labels.values() if len(y))
    if class_names is None:
        class_names = [str(k) for k in range(n_classes)]
    elif len(class_names) < n_classes:
        raise InputError(
            f"{path}: labels go up to {n_classes - 1} but only {len(class_names)} class names "
            f"were given; give one name per class"
        )
    splits = {
        s: NpzClassification(_images_to_tensor(arrays[f"{s}_images"], dim, path, f"{s}_images"), labels[s], class_names)
        for s in SPLITS
    }
    shapes = {s: tuple(d.images.shape[1:]) for s, d in splits.items()}
    if len(set(shapes.values())) != 1:
        raise InputError(f"{path}: the splits have different image shapes {shapes}; they must agree")
    log.info(
        "%s: %s images of shape %s, %d classes",
        path,
        "/".join(str(len(d)) for d in splits.values()),
        shapes["train"],
        len(class_names),
    )
    return NpzDatasets(
        **splits, class_names=list(class_names), dim=dim, in_channels=splits["train"].in_channels, path=path
    )


def fetch_medmnist(name: str, root: str | Path, size: int | None = None) -> tuple[Path, list[str]]:
    """Download MedMNIST dataset ``name`` (e.g. ``"dermamnist"``) into ``root`` with the ``medmnist`` package.

    Returns the ``.npz`` path and the class names. Raises :class:`InputError` when the package is missing,
    the name is unknown, or the download fails (offline): then pass a local ``.npz`` path instead.
    """
    try:
        import medmnist
    except ImportError as exc:
        raise InputError(
            f"MedMNIST dataset name {name!r} given but the 'medmnist' package is not installed; "
            f"install it (pip install 'abc-pipeline[medmnist]') or pass a local .npz path"
        ) from exc
    key = name.lower()
    if key not in medmnist.INFO:
        raise InputError(
            f"unknown MedMNIST dataset {name!r}; choose one of {sorted(medmnist.INFO)} or pass a local .npz path"
        )
    info = medmnist.INFO[key]
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    try:
        getattr(medmnist, info["python_class"])(split="train", download=True, root=str(root), size=size)
    except Exception as exc:  # the package raises bare RuntimeError/URLError/OSError when offline
        raise InputError(
            f"could not download MedMNIST dataset {name!r} into {root} ({exc}); the network may be "
            f"unreachable: download the .npz elsewhere and pass its local path"
        ) from exc
    path = root / f"{key}{'' if size in (None, 28) else f'_{size}'}.npz"
    names = [info["label"][k] for k in sorted(info["label"], key=int)]
    return path, names


def open_npz(
    source: str | Path, root: str | Path = "data/medmnist", dim: int | None = None, size: int | None = None
) -> NpzDatasets:
    """:func:`load_npz` on a path, or on the file :func:`fetch_medmnist` downloads when ``source`` is a
    MedMNIST name (no ``.npz`` suffix and no such file)."""
    source_path = Path(source)
    if source_path.suffix == ".npz" or source_path.exists():
        return load_npz(source_path, dim=dim)
    path, names = fetch_medmnist(str(source), root, size=size)
    return load_npz(path, dim=dim, class_names=names)


def write_synthetic_npz(
    path: str | Path,
    dim: int = 2,
    size: int = 16,
    n_classes: int = 3,
    n_per_split: Sequence[int] = (96, 48, 48),
    channels: int = 1,
    seed: int = 0,
    noise: float = 0.15,
) -> Path:
    """Write a small MedMNIST-format file whose classes are rotation-invariant; returns ``path``.

    Class ``k`` is a ring of radius ``(0.2 + 0.5 * (k + 0.5) / n_classes) * size / 2`` voxels around a
    jittered centre, plus an elongated bar at a random orientation through the centre (a nuisance that
    carries no label information) and Gaussian noise of std ``noise``. Images are ``uint8``:
    ``(N, size, size)`` (2D, one channel), ``(N, size, size, C)`` (2D, ``channels > 1``) or
    ``(N, size, size, size)`` (3D). Labels ``(N, 1)`` uint8, classes balanced. Deterministic in ``seed``.
    """
    if dim not in (2, 3) or (dim == 3 and channels != 1):
        raise InputError(
            f"synthetic MedMNIST files are 2D (any channels) or 3D (one channel); got dim={dim}, channels={channels}"
        )
    rng = np.random.default_rng(seed)
    axis = np.arange(size) - (size - 1) / 2
    grid = np.stack(np.meshgrid(*([axis] * dim), indexing="ij"))  # (dim, *spatial), voxels from the centre
    arrays = {}
    for split, n in zip(SPLITS, n_per_split):
        y = np.arange(n) % n_classes
        rng.shuffle(y)
        centre = rng.uniform(-1.0, 1.0, size=(n, dim) + (1,) * dim)
        pos = grid[None] - centre  # (n, dim, *spatial)
        r = np.sqrt((pos**2).sum(1))
        radius = (0.2 + 0.5 * (y + 0.5) / n_classes) * size / 2
        ring = np.exp(-((r - radius.reshape((n,) + (1,) * dim)) ** 2) / 1.5)
        direction = rng.normal(size=(n, dim))
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        along = (pos * direction.reshape((n, dim) + (1,) * dim)).sum(1)
        across = np.sqrt(np.maximum(r**2 - along**2, 0.0))
        bar = 0.6 * np.exp(-(across**2) / 0.8) * (np.abs(along) < size / 3)
        img = ring + bar
        img = np.repeat(img[..., None], channels, axis=-1) if channels > 1 else img
        img = img + rng.normal(scale=noise, size=img.shape)
        arrays[f"{split}_images"] = (np.clip(img, 0.0, 1.0) * 255).round().astype(np.uint8)
        arrays[f"{split}_labels"] = y[:, None].astype(np.uint8)
    path = Path(path)
    with staged_output(path) as tmp, open(tmp, "wb") as handle:
        np.savez_compressed(handle, **arrays)
    return path
