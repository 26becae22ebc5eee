"""The atlas task objects (abc_pipeline/learn/tasks.py): lookup, architectures, keys, and a torch-free import."""

from __future__ import annotations

import subprocess
import sys

import pytest

from abc_pipeline import keys
from abc_pipeline.errors import InputError
from abc_pipeline.learn.tasks import PER_CELL_ARCHITECTURES, TASKS, by_name


def test_lookup_names_the_choices() -> None:
    assert by_name("region") is TASKS["region"]
    with pytest.raises(InputError, match="task must be one of celltype, region, got 'celltypes'"):
        by_name("celltypes")


@pytest.mark.parametrize("name", TASKS)
def test_each_task_is_consistent(name: str) -> None:
    task = TASKS[name]
    assert task.name == name
    assert task.architecture() == task.default_architecture == task.architectures[0]
    assert task.raster_architecture in task.architectures
    assert task.recorded_architecture({}) == task.raster_architecture  # checkpoints without the record
    assert task.recorded_architecture({"architecture": "cell-context"}) == "cell-context"
    assert task.prediction_key == keys.prediction(name) == f"pred_{name}"
    assert task.per_voxel == (task.test_unit == "voxels")
    # a per-voxel task's raster model outputs voxels (a U-Net); a per-cell task's classifies cells
    assert (task.raster_architecture in PER_CELL_ARCHITECTURES) != task.per_voxel


def test_the_tasks_differ_where_they_should() -> None:
    celltype, region = TASKS["celltype"], TASKS["region"]
    assert (celltype.default_level, region.default_level) == ("class", "parcellation_division")
    assert (celltype.test_unit, region.test_unit) == ("cells", "voxels")
    assert celltype.symmetry_metrics[0] == "accuracy" and region.symmetry_metrics[0] == "mean_dice"
    with pytest.raises(InputError, match="the celltype task trains the architectures cell-context, patch"):
        celltype.architecture("segment")


def test_tasks_and_choices_import_without_torch() -> None:
    code = "import sys, abc_pipeline.learn.tasks, abc_pipeline.learn.choices; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_train_help_shows_each_tasks_level_default(capsys: pytest.CaptureFixture) -> None:
    from abc_pipeline.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name, task in TASKS.items():
        assert f"{task.default_level} for {name}" in text
