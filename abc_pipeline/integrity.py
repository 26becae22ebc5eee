"""Checks that a store is what its writer made before anything trusts it: chunk counts, shapes, sizes, values.

- Zarr hides damage: a chunk file that is missing reads as the fill value (zeros). Every directory artifact
  records the number of chunk files of each of its arrays in its marker (:func:`chunk_counts`, written by
  :func:`abc_pipeline.fileio.staged_output`); :func:`verify_store` compares them on open.
- Shapes stated by a file (an h5ad's ``X`` shape, a raster's grid) are checked against the arrays that carry
  the data (:func:`check_shape`) before they size any loop or allocation.
- Sizes a user can ask for by mistake are capped (:func:`check_voxel_cap`), with an explicit override.
- Non-finite values (NaN, inf) are found per chunk of rows (:func:`nonfinite_rows`).
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from abc_pipeline.errors import InputError
from abc_pipeline.fileio import MARKER_NAME, read_marker

#: Default largest grid (voxels) rasterize accepts without ``--max-voxels``: 2**31, above the 10 um CCF grid
#: (1.2e9 voxels) and far below what would exhaust disk and time by mistake.
MAX_VOXELS = 1 << 31
_METADATA = {".zarray", ".zattrs", ".zgroup", ".zmetadata", "zarr.json", MARKER_NAME}


def _is_array(folder: Path, files: list[str]) -> bool:
    if ".zarray" in files:
        return True
    if "zarr.json" in files:
        try:
            return json.loads((folder / "zarr.json").read_text()).get("node_type") == "array"
        except (OSError, ValueError):
            return False
    return False


def chunk_counts(store: Path) -> dict[str, int]:
    """Number of chunk files of every Zarr array (v2 or v3) under the folder ``store``, by array path."""
    store = Path(store)
    counts: dict[str, int] = {}
    for folder, dirs, files in os.walk(store):
        here = Path(folder)
        if _is_array(here, files):
            counts[here.relative_to(store).as_posix()] = sum(
                1 for _, _, names in os.walk(here) for name in names if name not in _METADATA
            )
            dirs[:] = []
    return counts


def _missing_chunks(array: Path, limit: int = 3) -> list[str]:
    """Up to ``limit`` chunk keys of a Zarr v2 array whose files are absent (only sensible for arrays whose
    every chunk was written)."""
    try:
        meta = json.loads((array / ".zarray").read_text())
    except (OSError, ValueError):
        return []
    grid = [range(math.ceil(n / c)) for n, c in zip(meta["shape"], meta["chunks"])]
    sep = meta.get("dimension_separator") or "."
    missing = []
    for coords in itertools.islice(itertools.product(*grid), 1_000_000):
        key = sep.join(str(i) for i in coords) or "0"
        if not (array / key).exists():
            missing.append(key)
            if len(missing) == limit:
                break
    return missing


def verify_store(path: Path, fix: str) -> bool:
    """Check that every array of the store ``path`` has the chunk files its writer recorded.

    Returns False (nothing checked) for stores without a marker (made by other tools or older versions);
    raises :class:`InputError` naming the store, the array, missing chunks and ``fix`` on a mismatch.
    """
    path = Path(path)
    marker = read_marker(path)
    if marker is None or not isinstance(marker.get("chunks"), dict):
        return False
    actual = chunk_counts(path)
    for key, expected in sorted(marker["chunks"].items()):
        found = actual.get(key, 0)
        if found == expected:
            continue
        missing = _missing_chunks(path / key) if found < expected else []
        detail = f" (missing: {', '.join(f'{key}/{m}' for m in missing)})" if missing else ""
        raise InputError(
            f"{path} is damaged: array '{key}' has {found} chunk files but {marker.get('created_by', 'its writer')} "
            f"wrote {expected}{detail}; a missing chunk would read as zeros. {fix}"
        )
    return True


def check_shape(path: Path | str, field: str, shape: Sequence[int], expected: Sequence[int], fix: str) -> None:
    """:class:`InputError` when ``field`` of ``path`` has ``shape`` instead of ``expected``."""
    shape, expected = tuple(int(n) for n in shape), tuple(int(n) for n in expected)
    if shape != expected:
        raise InputError(
            f"{path}: {field} has shape {shape} but {expected} is expected; the file is damaged or forged. {fix}"
        )


def check_voxel_cap(n_voxels: int, shape: Sequence[int], max_voxels: int | None, option: str = "--max-voxels") -> None:
    """:class:`InputError` when a grid of ``shape`` has more than ``max_voxels`` voxels (None: no cap)."""
    if max_voxels is not None and n_voxels > max_voxels:
        raise InputError(
            f"the grid (z, y, x) {tuple(shape)} has {n_voxels:,} voxels, more than the cap "
            f"{max_voxels:,}; check the voxel size and bounds, or raise the cap with {option} N"
        )


def nonfinite_rows(x: np.ndarray) -> np.ndarray:
    """``(rows,)`` bool: rows of the 2D array ``x`` holding NaN or +-inf (or values whose float32 sum
    overflows). One summing pass over ``x``, no copy."""
    with np.errstate(over="ignore", invalid="ignore"):
        return ~np.isfinite(np.add.reduce(x, axis=1))
