"""Checks of a workflow configuration that its JSON schema cannot express (run by ``workflow/rules/common.smk``
right after the schema, before any job): settings that would otherwise change meaning silently or fail only at
the end of a long run.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

from abc_pipeline.errors import InputError


def config_problems(config: Mapping) -> list[str]:
    """Every problem of a (schema-validated) workflow configuration, one sentence with its fix each."""
    problems = []
    names = [spec["name"] for spec in config.get("rasters") or []]
    repeated = sorted(name for name, n in Counter(names).items() if n > 1)
    if repeated:
        problems.append(
            f"rasters: the name(s) {', '.join(repeated)} are given to more than one grid; every grid "
            "needs its own name (it names results/<dataset>/raster/<name>.ome.zarr)"
        )
    tasks = config.get("tasks") or {}
    for task, spec in tasks.items():
        if spec["raster"] not in names:
            problems.append(
                f"tasks.{task}.raster is {spec['raster']!r}, which is not the name of a grid in `rasters` "
                f"(defined: {', '.join(names) or 'none'})"
            )
    models = list(config.get("models") or [])
    if tasks and not models:
        problems.append(
            f"models is empty but tasks {', '.join(tasks)} are configured; list at least one zoo model "
            "(e.g. models: [cnn, moment-trivial-irrep]) or remove the tasks"
        )
    primary = config.get("primary_model")
    if tasks and models and primary not in models:
        problems.append(
            f"primary_model {primary!r} is not one of models ({', '.join(models)}); its predictions "
            "become obs['pred_<task>']: set primary_model to one of them or add it to models"
        )
    return problems


def check_workflow_config(config: Mapping) -> None:
    """:class:`InputError` listing every problem of :func:`config_problems` (nothing when there is none)."""
    problems = config_problems(config)
    if problems:
        raise InputError("config: " + "\n  config: ".join(problems))
