"""Model names, defaults and checked option values that the workflow (``workflow/rules/common.smk``), the CLI and
the library share; importable without torch, so that parsing the workflow and printing the CLI help stay fast. The
library's signatures use these defaults; tests/test_defaults.py checks the copies it cannot use (the zoo's names,
the training loop's defaults) and the workflow schema's defaults against them."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from abc_pipeline.atlas.user_options import KINDS as USER_DATA_KINDS
from abc_pipeline.errors import InputError
from abc_pipeline.learn.tasks import TASKS as _ATLAS_TASKS

#: scikit-learn baseline model name -> its features (:mod:`abc_pipeline.learn.baselines`)
BASELINES = {"logreg-expression": "expression", "logreg-neighborhood": "neighborhood"}
#: logreg-neighborhood: nearest cells of the same section averaged into the features
DEFAULT_NEIGHBORS = 16
#: baselines: training cells used at most (seeded class-stratified subsample)
DEFAULT_MAX_TRAIN_CELLS = 200_000
#: baselines: inverse regularisation strength of the logistic regression
DEFAULT_C = 1.0
#: what ``abc-pipeline transfer --input`` is: the user-data kinds of import, or an imported cells.zarr
TRANSFER_KINDS = (*USER_DATA_KINDS, "cells")
DEFAULT_TRANSFER_KIND = "anndata"
#: in-plane rotations of the test sections in the any-angle score (:mod:`abc_pipeline.learn.any_angle`)
DEFAULT_ANY_ANGLES = tuple(float(a) for a in range(0, 360, 15))
#: test sections (3D: test z-blocks) rotated in the any-angle score
DEFAULT_ANY_ANGLE_SECTIONS = 2

#: The atlas tasks' names (:data:`abc_pipeline.learn.tasks.TASKS`): what a model predicts per cell (celltype) or
#: per voxel (region).
TASKS = tuple(_ATLAS_TASKS)
#: The zoo's networks and what a network outputs, as :data:`abc_pipeline.nn.zoo.MODELS` and ``HEADS`` (torch-free
#: copies for the CLI; tested equal).
ZOO_MODELS = ("cnn", "moment-trivial", "moment-trivial-irrep", "gcnn-regular", "cfnet", "se2n-interp")
ZOO_HEADS = ("classify", "segment", "patch", "cell-context")

# Training defaults of :func:`abc_pipeline.learn.atlas.train_atlas_task`, :func:`abc_pipeline.learn.run_npz.train_npz`
# (the workflow's `training` section) and, but for the epochs, of bench-models.
DEFAULT_EPOCHS = 30
DEFAULT_BATCH_SIZE = 64
#: AdamW learning rate (cosine-annealed) and weight decay
DEFAULT_LR = 1e-3
DEFAULT_WEIGHT_DECAY = 1e-4
#: epochs without validation improvement before stopping
DEFAULT_PATIENCE = 10
#: loss weights of the atlas tasks: ``none`` (plain cross-entropy: per-cell accuracy, as the scikit-learn
#: baselines), ``balanced`` (inverse class frequency: favours balanced accuracy and mean Dice) or ``auto``
#: (``none`` for the per-cell architectures, ``balanced`` for the U-Net)
CLASS_WEIGHTS = ("auto", "none", "balanced")
DEFAULT_CLASS_WEIGHTS = "auto"
#: cell-context models: disc radii (voxels) of the neighbourhood means per raster dimensionality, as
#: :data:`abc_pipeline.nn.cell_context.DEFAULT_NEIGHBORHOOD_RADII` (a torch-free copy for the CLI; tested equal)
DEFAULT_NEIGHBORHOOD_RADII = {2: (1.5, 3.0, 6.0, 12.0, 24.0), 3: (1.5, 3.0, 6.0)}
DEFAULT_SEED = 0
DEFAULT_DEVICE = "auto"
#: data-loader worker processes
DEFAULT_WORKERS = 0
#: validation metric for early stopping of train-npz
DEFAULT_METRIC = "balanced_accuracy"
#: where MedMNIST names download
DEFAULT_DOWNLOAD_ROOT = "data/medmnist"

# Atlas data (:func:`abc_pipeline.learn.atlas.atlas_data`).
#: celltype: window P (voxels per axis); region: training tile (voxels per axis)
DEFAULT_PATCH_SIZE = 5
DEFAULT_TILE_SIZE = 64
#: fractions of the sections in the train, val and test splits
DEFAULT_FRACTIONS = (0.7, 0.15, 0.15)
#: contiguous blocks of sections per split, interleaved along z
DEFAULT_SPLIT_BLOCKS = 3

# bench-models (:func:`abc_pipeline.learn.compare.bench_models`).
BENCH_MODELS = ("cnn", "gcnn-regular", "moment-trivial", "moment-trivial-irrep")
BENCH_EPOCHS = 10
#: parameters per model (each width solved for it)
BENCH_TARGET_PARAMS = 50_000
#: equivariance-curve rotations (degrees; must include 45) and the test samples it runs on
BENCH_CURVE_ANGLES = tuple(float(a) for a in range(0, 91, 15))
BENCH_CURVE_SAMPLES = 256
#: fraction of the training data kept
BENCH_TRAIN_FRACTION = 1.0

# Torch-free copies, for the CLI help, of defaults declared in abc_pipeline/learn/evaluate_run.py and predict.py
# (tested equal; to become the one source when those modules use them).
#: evaluate: test windows, z indices per 3D window, in-plane window side by raster dimensions, sections in maps.png,
#: test cells scored, windows per forward pass, equivariance-curve rotations (degrees)
EVALUATE_WINDOWS = 2
EVALUATE_WINDOW_DEPTH = 8
EVALUATE_WINDOW = {2: 128, 3: 64}
EVALUATE_MAP_SECTIONS = 3
EVALUATE_MAX_TEST_CELLS = 500_000
EVALUATE_BATCH_SIZE = 8
EVALUATE_CURVE_ANGLES = tuple(range(0, 91, 15))
#: predict: tile core by raster dimensions; region U-Net context per side (voxels)
PREDICT_TILE = {2: (192, 192), 3: (16, 64, 64)}
PREDICT_HALO = 16


def is_baseline(name: str) -> bool:
    """Whether ``name`` is a scikit-learn baseline (not a zoo network)."""
    return name in BASELINES


def check_neighbors(neighbors: object, key: str = "--neighbors") -> int:
    """``neighbors`` as a positive int; :class:`InputError` naming ``key`` otherwise."""
    if isinstance(neighbors, bool) or not isinstance(neighbors, (int, np.integer)) or int(neighbors) < 1:
        raise InputError(f"{key} must be a positive whole number of nearest cells (e.g. 16), got {neighbors!r}")
    return int(neighbors)


def check_angles(values: object, key: str = "--any-angles") -> tuple[float, ...]:
    """``values`` as a tuple of finite angles in degrees; :class:`InputError` naming ``key`` otherwise."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not len(values):
        raise InputError(f"{key} must be a non-empty list of angles in degrees, e.g. [0, 15, 30, 45]; got {values!r}")
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not math.isfinite(v):
            raise InputError(f"{key} must list angles in degrees as numbers, e.g. [0, 15, 30, 45]; item {i} is {v!r}")
        out.append(float(v))
    return tuple(out)


__all__ = ["BASELINES", "DEFAULT_ANY_ANGLES", "check_angles", "check_neighbors", "is_baseline"]
