"""Option vocabularies of user-data import (``abc-pipeline import`` / ``transfer``, ``source.kind``): plain
constants, importable without AnnData, so that building the command-line parser stays fast."""

from __future__ import annotations

#: What ``--input`` of ``abc-pipeline import`` is: an AnnData (.h5ad / .zarr) or a MERSCOPE output folder.
KINDS = ("anndata", "merscope")
#: Coordinate units and their size in mm (the cells.zarr unit).
UNITS = {"um": 1e-3, "mm": 1.0}
#: What X holds: log2 expression, or counts (stored as log2(x + 1)).
EXPRESSION = ("log2", "counts")
#: Default obsm key of the x, y[, z] coordinates (AnnData) and their unit.
DEFAULT_COORDINATES = "spatial"
DEFAULT_UNIT = "um"
#: Cells read and written per chunk (sets peak memory).
DEFAULT_CHUNK_CELLS = 100_000
