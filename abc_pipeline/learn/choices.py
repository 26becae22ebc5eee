"""Model names and checked option values that the workflow (``workflow/rules/common.smk``), the CLI and the
library share; importable without torch, so that parsing the workflow stays fast."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from abc_pipeline.atlas.user_options import KINDS as USER_DATA_KINDS
from abc_pipeline.errors import InputError

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
#: in-plane rotations of the test sections in the any-angle score (:mod:`abc_pipeline.learn.any_angle`)
DEFAULT_ANY_ANGLES = tuple(float(a) for a in range(0, 360, 15))


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
