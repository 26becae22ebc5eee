"""Names of the AnnData keys and store attributes that abc-pipeline writes and reads, in one place (as
squidpy's ``Key``): the cells.zarr contract, the annotated h5ad and the provenance entries (docs/architecture.md).
"""

from __future__ import annotations

#: ``uns[UNS]``: this pipeline's provenance in AnnData (assemble, import, predict, transfer); also the key of its
#: attributes in Zarr stores.
UNS = "abc_pipeline"
#: ``obs[SECTION]``: the section (MERFISH slice) each cell lies in.
SECTION = "brain_section_label"
#: ``obsm[SPATIAL]``: (n, 2) section coordinates x, y in mm (squidpy's default spatial key).
SPATIAL = "spatial"
#: ``obsm[SPATIAL_3D]``: (n, 3) reconstructed coordinates x, y, z in mm.
SPATIAL_3D = "spatial_3d"
#: ``obsm[CCF]``: (n, 3) Allen CCF coordinates in mm.
CCF = "ccf"
#: ``obs[SPLIT]``: train / val / test / none, the split of each cell's section in the run that predicted it.
SPLIT = "split"


def prediction(task: str, model: str | None = None) -> str:
    """``obs`` column of a task's predicted class: ``pred_<task>``, or ``pred_<task>__<model>`` for a second
    model of the same task."""
    return f"pred_{task}" if model is None else f"pred_{task}__{model}"


def task_of(column: str) -> str:
    """The task of a :func:`prediction` column (``pred_region__cnn`` -> ``region``)."""
    return column.removeprefix("pred_").split("__")[0]


def colors(column: str) -> str:
    """``uns`` key of a categorical column's colours (scanpy's convention)."""
    return f"{column}_colors"


def probabilities(column: str) -> str:
    """``obsm`` key of a prediction column's class probabilities (one column per class)."""
    return f"{column}_proba"


def confidence(column: str) -> str:
    """``obs`` column of a prediction's largest class probability."""
    return f"{column}_confidence"
