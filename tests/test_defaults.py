"""Names and defaults come from one source: the workflow schema's defaults and enums equal the library's, the CLI
leaves unset options to the library's defaults and takes its choices from the zoo and the library's name lists."""

from __future__ import annotations

import argparse
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from abc_pipeline.atlas.assemble import assemble_dataset
from abc_pipeline.atlas.download import download_dataset
from abc_pipeline.atlas.import_user import import_user_data
from abc_pipeline.atlas.manifest import PROFILES
from abc_pipeline.atlas.synthetic import write_synthetic_release
from abc_pipeline.atlas.user_options import EXPRESSION, KINDS, UNITS
from abc_pipeline.cli import build_parser, main
from abc_pipeline.learn import choices
from abc_pipeline.learn import evaluate_run as evaluate_module
from abc_pipeline.learn import predict as predict_module
from abc_pipeline.learn.atlas import train_atlas_task
from abc_pipeline.learn.baselines import train_baseline
from abc_pipeline.learn.choices import BASELINES, TRANSFER_KINDS
from abc_pipeline.learn.compare import bench_models
from abc_pipeline.learn.evaluate_run import evaluate_run
from abc_pipeline.learn.run_npz import train_npz
from abc_pipeline.learn.tasks import TASKS
from abc_pipeline.learn.train import train
from abc_pipeline.learn.transfer import transfer
from abc_pipeline.nn import cell_context
from abc_pipeline.nn.zoo import HEADS, MODELS
from abc_pipeline.raster import open_raster
from abc_pipeline.raster.grid import SPACES
from abc_pipeline.raster.rasterize import SCHEDULERS, rasterize

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = yaml.safe_load((ROOT / "workflow" / "schemas" / "config.schema.yaml").read_text())

#: config key (``[]``: an item of a list) -> (library function, keyword) that workflow/rules/common.smk (and the
#: rules) turn it into, through the CLI option of the same name.
SCHEMA_TO_LIBRARY = {
    "source.coordinates": (import_user_data, "coordinates"),
    "source.unit": (import_user_data, "unit"),
    "source.section": (import_user_data, "section"),
    "source.section_name": (import_user_data, "section_name"),
    "source.labels": (import_user_data, "labels"),
    "source.gene_symbols": (import_user_data, "gene_symbols"),
    "source.expression": (import_user_data, "expression"),
    "source.base_url": (download_dataset, "base_url"),
    "source.synthetic.seed": (write_synthetic_release, "seed"),
    "download.jobs": (download_dataset, "jobs"),
    "download.retries": (download_dataset, "retries"),
    "assemble.chunk_cells": (assemble_dataset, "chunk_cells"),
    "rasters[].levels": (rasterize, "levels"),
    "dask.scheduler": (rasterize, "scheduler"),
    "dask.address": (rasterize, "address"),
    "training.target_params": (train_atlas_task, "target_params"),
    "training.epochs": (train_atlas_task, "epochs"),
    "training.batch_size": (train_atlas_task, "batch_size"),
    "training.lr": (train_atlas_task, "lr"),
    "training.patience": (train_atlas_task, "patience"),
    "training.class_weights": (train_atlas_task, "class_weights"),
    "training.seed": (train_atlas_task, "seed"),
    "training.max_samples_per_epoch": (train_atlas_task, "max_samples_per_epoch"),
    "training.device": (train_atlas_task, "device"),
    "training.split_fractions": (train_atlas_task, "split_fractions"),
    "training.split_blocks": (train_atlas_task, "split_blocks"),
    "training.split_block_size": (train_atlas_task, "split_block_size"),
    "bench.models": (bench_models, "models"),
    "baselines.neighbors": (train_baseline, "neighbors"),
    "baselines.max_train_cells": (train_baseline, "max_train_cells"),
    "baselines.c": (train_baseline, "c"),
    "evaluation.any_angles": (evaluate_run, "any_angles"),
    "evaluation.any_angle_sections": (evaluate_run, "any_angle_sections"),
    "transfer[].kind": (transfer, "kind"),
    "transfer[].fill_missing_genes": (transfer, "fill_missing_genes"),
    "transfer[].coordinates": (import_user_data, "coordinates"),
    "transfer[].unit": (import_user_data, "unit"),
    "transfer[].section": (import_user_data, "section"),
    "transfer[].gene_symbols": (import_user_data, "gene_symbols"),
    "transfer[].expression": (import_user_data, "expression"),
}


def _schema_node(key: str) -> dict:
    node = SCHEMA
    for part in key.split("."):
        node = node["properties"][part.removesuffix("[]")]
        if part.endswith("[]"):
            node = node["items"]
    return node


def _plain(value: object) -> object:
    """Sequences as lists (YAML has no tuples or ranges)."""
    return [_plain(v) for v in value] if isinstance(value, (list, tuple, range)) else value


def _default(function, keyword: str) -> object:
    return inspect.signature(function).parameters[keyword].default


@pytest.mark.parametrize("key", SCHEMA_TO_LIBRARY)
def test_schema_default_equals_the_library_default(key: str) -> None:
    function, keyword = SCHEMA_TO_LIBRARY[key]
    assert _plain(_schema_node(key)["default"]) == _plain(_default(function, keyword)), (function.__name__, keyword)


def test_schema_tasks_are_the_library_tasks() -> None:
    """The schema's tasks are the atlas task objects, with their default level and architectures (default first)."""
    tasks = _schema_node("tasks")["properties"]
    assert list(tasks) == list(TASKS)
    for name, task in TASKS.items():
        spec = tasks[name]["properties"]
        assert spec["level"]["default"] == task.default_level
        assert tuple(spec["architecture"]["enum"]) == task.architectures
        assert spec["architecture"]["default"] == task.default_architecture


def test_the_training_functions_share_their_defaults() -> None:
    """train (the loop), train_atlas_task and train_npz declare the same training defaults; bench_models keeps its
    own (shorter) epochs and a target parameter count."""
    for keyword in ("epochs", "batch_size", "lr", "weight_decay", "patience", "seed", "device", "num_workers"):
        assert _default(train_atlas_task, keyword) == _default(train, keyword) == _default(train_npz, keyword), keyword
    for keyword in ("batch_size", "lr", "weight_decay", "patience", "seed", "device", "num_workers"):
        assert _default(bench_models, keyword) == _default(train, keyword), keyword


def test_torch_free_copies_equal_the_library() -> None:
    """abc_pipeline.learn.choices keeps torch-free copies for the CLI of names and defaults declared elsewhere."""
    assert choices.ZOO_MODELS == MODELS and choices.ZOO_HEADS == HEADS
    assert choices.DEFAULT_NEIGHBORHOOD_RADII == cell_context.DEFAULT_NEIGHBORHOOD_RADII
    assert choices.TASKS == tuple(TASKS)
    for keyword, name in [
        ("epochs", "DEFAULT_EPOCHS"),
        ("batch_size", "DEFAULT_BATCH_SIZE"),
        ("lr", "DEFAULT_LR"),
        ("weight_decay", "DEFAULT_WEIGHT_DECAY"),
        ("patience", "DEFAULT_PATIENCE"),
        ("seed", "DEFAULT_SEED"),
        ("device", "DEFAULT_DEVICE"),
        ("num_workers", "DEFAULT_WORKERS"),
    ]:
        assert _default(train, keyword) == getattr(choices, name), keyword
    for keyword, name in [
        ("windows", "EVALUATE_WINDOWS"),
        ("window_depth", "EVALUATE_WINDOW_DEPTH"),
        ("map_sections", "EVALUATE_MAP_SECTIONS"),
        ("max_test_cells", "EVALUATE_MAX_TEST_CELLS"),
        ("batch_size", "EVALUATE_BATCH_SIZE"),
        ("angles", "EVALUATE_CURVE_ANGLES"),
        ("halo", "PREDICT_HALO"),
        ("device", "DEFAULT_DEVICE"),
    ]:
        assert _plain(_default(evaluate_run, keyword)) == _plain(getattr(choices, name)), keyword
    assert choices.EVALUATE_WINDOW == evaluate_module.DEFAULT_WINDOW
    assert choices.PREDICT_TILE == predict_module.DEFAULT_TILE and choices.PREDICT_HALO == predict_module.DEFAULT_HALO
    assert _default(predict_module.predict_raster, "device") == choices.DEFAULT_DEVICE


def test_schema_names_are_the_library_names() -> None:
    for key in ("models", "bench.models"):
        names = _schema_node(key)["items"]["enum"]
        assert set(BASELINES) <= set(names) <= set(MODELS) | set(BASELINES), key
    assert _schema_node("source.kind")["enum"] == ["synthetic", "bucket", *KINDS]
    assert _schema_node("source.unit")["enum"] == _schema_node("transfer[].unit")["enum"] == list(UNITS)
    assert _schema_node("source.expression")["enum"] == [*EXPRESSION, None]
    assert _schema_node("transfer[].kind")["enum"] == list(TRANSFER_KINDS)
    assert _schema_node("rasters[].space")["enum"] == list(SPACES)
    assert _schema_node("dask.scheduler")["enum"] == list(SCHEDULERS)
    assert SCHEMA["else"]["properties"]["dataset"]["enum"] == list(PROFILES)


def _subparsers() -> dict:
    """Subcommand name -> its parser."""
    return next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_every_cli_library_default_is_a_library_keyword() -> None:
    """Every option declared with a library default names a keyword (or constant) that exists and has a value to
    show, and parses to None when not given, so that the library's default applies."""
    checked = 0
    for command, sub in _subparsers().items():
        for action in sub._actions:
            if hasattr(action, "library_default"):
                value = action.library_default.value()  # raises when the keyword or the module does not exist
                assert value is not None, (command, action.dest)  # "None" is no default to show: say it in the help
                assert action.default is None, (command, action.dest)
                checked += 1
    assert checked > 60


def _help(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    return re.sub(r"\s+", "", capsys.readouterr().out)  # argparse wraps lines, also at hyphens


def test_train_help_lists_every_zoo_model_and_baseline(capsys: pytest.CaptureFixture) -> None:
    assert ",".join([*MODELS, *BASELINES]) in _help(["train"], capsys)
    assert "cfnet" in MODELS and ",".join(MODELS) in _help(["train-npz"], capsys)


def test_help_shows_the_library_defaults(capsys: pytest.CaptureFixture) -> None:
    text = _help(["train"], capsys)
    assert f"(default:{_default(train_atlas_task, 'epochs')})" in text
    assert f"(default:{_default(train_atlas_task, 'lr'):g})" in text
    assert f"(default:{_default(rasterize, 'levels')})" in _help(["rasterize"], capsys)


def test_unknown_model_is_refused_with_the_zoo_names(capsys: pytest.CaptureFixture) -> None:
    argv = ["train", "--raster", "r", "--task", "region", "--out", "o", "--model", "resnet"]
    with pytest.raises(SystemExit):
        main(argv)
    assert "invalid choice: 'resnet'" in capsys.readouterr().err


LIGHT_HELP = ["train", "train-npz", "bench-models", "predict", "evaluate", "transfer", "import", "download"]


@pytest.mark.parametrize("command", ["rasterize --cells c --out o", *(f"{c} --help" for c in LIGHT_HELP)])
def test_parsing_and_the_help_import_no_torch(command: str) -> None:
    """Building the parser, parsing, and the help of the steps whose defaults are torch-free constants
    (abc_pipeline.learn.choices, abc_pipeline.atlas.user_options) import neither torch nor AnnData."""
    code = (
        "import sys; from abc_pipeline.cli import build_parser\n"
        f"try:\n    build_parser().parse_args({command.split()!r})\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules and 'anndata' not in sys.modules, 'heavy import'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True)


def test_rasterize_without_levels_writes_the_library_default(assembled: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.ome.zarr"
    argv = ["rasterize", "--cells", str(assembled), "--out", str(out), "--space", "section", "--voxel-size", "0.4"]
    assert main([*argv, "--labels", "--no-progress"]) == 0
    assert len(open_raster(out).levels) == _default(rasterize, "levels") == _schema_node("rasters[].levels")["default"]
