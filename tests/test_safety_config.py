"""Configurations that would change meaning silently fail in the schema step, before any job, naming the fix."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from test_workflow import FULL_CONFIG, _workdir, snakemake

from abc_pipeline.config_checks import check_workflow_config, config_problems
from abc_pipeline.errors import InputError


def _with(**changes) -> dict:
    config = copy.deepcopy(FULL_CONFIG)
    config.update(changes)
    return config


CASES = {
    "primary_model not in models": (
        _with(primary_model="gcnn-regular"),
        "primary_model 'gcnn-regular' is not one of models (cnn, moment-trivial-irrep",
    ),
    "two rasters with one name": (
        _with(rasters=[FULL_CONFIG["rasters"][0], {**FULL_CONFIG["rasters"][1], "name": "section_2d"}]),
        "the name(s) section_2d are given to more than one grid",
    ),
    "models: []": (_with(models=[]), "models is empty but tasks celltype, region are configured"),
    "task on an unknown raster": (
        _with(tasks={"region": {"raster": "nope"}}),
        "tasks.region.raster is 'nope', which is not the name of a grid",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_config_case_is_refused_with_its_fix(case: str) -> None:
    config, message = CASES[case]
    config.setdefault("primary_model", "moment-trivial-irrep")
    with pytest.raises(InputError) as err:
        check_workflow_config(config)
    assert message in str(err.value)


def test_valid_configs_pass() -> None:
    assert config_problems({**FULL_CONFIG, "primary_model": "cnn"}) == []
    assert config_problems({**FULL_CONFIG, "tasks": {}, "models": [], "primary_model": "x"}) == []  # no learning


def test_snakemake_stops_in_the_schema_step_before_any_job(tmp_path: Path) -> None:
    workdir = _workdir(tmp_path, {**FULL_CONFIG, "primary_model": "gcnn-regular"})
    before = sorted(p.name for p in workdir.iterdir())
    proc = snakemake(workdir, "-n", check=False)
    assert proc.returncode != 0
    assert "primary_model 'gcnn-regular' is not one of models" in proc.stdout + proc.stderr
    assert sorted(p.name for p in workdir.iterdir() if p.name != ".snakemake") == before  # nothing written
