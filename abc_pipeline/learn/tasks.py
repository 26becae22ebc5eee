"""The atlas tasks: what a model learns from a raster, one :class:`AtlasTask` object per task.

An atlas task (``abc-pipeline train --task``, the workflow's ``tasks`` section) is what a model predicts:

- ``celltype``: each cell's label at a taxonomy level (default ``class``), scored per test cell against its
  label in cells.zarr;
- ``region``: the brain region at a parcellation level (default ``parcellation_division``), scored per test
  voxel: the label volume ``labels/pred_region`` of ``predictions.zarr`` against the raster's ``labels/<level>``
  (Dice, IoU).

Every difference between the tasks lives in their object here (level, architectures, how the test split is
scored, the keys of their predictions); the steps (train, predict, evaluate, bench-models, the baselines, the
report) ask the task object instead of comparing task names. A new task is one more entry in :data:`TASKS`
plus its entry in the workflow schema's ``tasks``. Torch-free, so that the CLI and the workflow import it cheaply.

The word *architecture* is what :func:`abc_pipeline.nn.build_model` builds the network into (its head:
``patch``, ``cell-context``, ``segment``); the model's *objective* (``spec.objective``: ``classify`` or
``segment``) is what training optimises; *task* always means the atlas task.
"""

from __future__ import annotations

from dataclasses import dataclass

from abc_pipeline import keys
from abc_pipeline.errors import InputError

#: architectures that classify cells one by one (datasets of cells, per-cell targets from cells.zarr, dense
#: prediction over the model's exact receptive field)
PER_CELL_ARCHITECTURES = ("cell-context", "patch")


@dataclass(frozen=True)
class AtlasTask:
    """One atlas task and everything that differs between tasks.

    ``name``: the task's name (CLI ``--task``, workflow wildcard, ``predictions.zarr`` attribute ``task``);
    ``default_level``: the label level trained when none is given (an obs column of cells.zarr, a label volume
    of the raster); ``architectures``: the :func:`abc_pipeline.nn.build_model` architectures it trains, the
    default first; ``raster_architecture``: the one among them that reads the raster alone (one input tensor
    per sample): what ``bench-models`` compares, and what checkpoints that predate recording their
    architecture were; ``test_unit``: what its test split is scored over, ``"cells"`` (per-cell labels of
    cells.zarr; the cells.zarr is required to evaluate) or ``"voxels"`` (the predicted label volume against
    the raster's label volume); ``symmetry_metrics``: the scalar metrics ``abc-pipeline evaluate`` scores
    under every grid symmetry, the headline (orientation figure) first.
    """

    name: str
    default_level: str
    architectures: tuple[str, ...]
    raster_architecture: str
    test_unit: str
    symmetry_metrics: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.raster_architecture not in self.architectures or self.test_unit not in ("cells", "voxels"):
            raise ValueError(f"inconsistent atlas task {self}")

    @property
    def default_architecture(self) -> str:
        return self.architectures[0]

    @property
    def per_voxel(self) -> bool:
        """Whether the test split is scored per voxel (label volumes) rather than per cell."""
        return self.test_unit == "voxels"

    @property
    def prediction_key(self) -> str:
        """The ``obs`` column and label-volume name of the task's predicted classes: ``pred_<task>``."""
        return keys.prediction(self.name)

    def architecture(self, architecture: str | None = None) -> str:
        """``architecture`` (default: :attr:`default_architecture`), checked to be one this task trains."""
        architecture = architecture or self.default_architecture
        if architecture not in self.architectures:
            raise InputError(
                f"the {self.name} task trains the architectures {', '.join(self.architectures)}; "
                f"got --architecture {architecture!r}"
            )
        return architecture

    def recorded_architecture(self, atlas: dict) -> str:
        """The architecture a checkpoint's ``config["atlas"]`` records (older checkpoints: the raster one)."""
        return atlas.get("architecture", self.raster_architecture)


#: The atlas tasks by name (the CLI's ``--task`` choices and the workflow schema's ``tasks``, tested equal).
TASKS: dict[str, AtlasTask] = {
    task.name: task
    for task in (
        AtlasTask(
            name="celltype",
            default_level="class",
            architectures=("cell-context", "patch"),
            raster_architecture="patch",
            test_unit="cells",
            symmetry_metrics=("accuracy", "balanced_accuracy", "macro_f1", "auc"),
        ),
        AtlasTask(
            name="region",
            default_level="parcellation_division",
            architectures=("segment", "cell-context"),
            raster_architecture="segment",
            test_unit="voxels",
            symmetry_metrics=("mean_dice", "mean_iou", "accuracy", "ari", "nmi"),
        ),
    )
}


def by_name(name: str) -> AtlasTask:
    """The atlas task ``name``; :class:`InputError` naming the choices otherwise."""
    try:
        return TASKS[name]
    except (KeyError, TypeError):
        raise InputError(f"task must be one of {', '.join(TASKS)}, got {name!r}") from None


__all__ = ["PER_CELL_ARCHITECTURES", "TASKS", "AtlasTask", "by_name"]
