"""The Snakemake workflow, run for real on a tiny synthetic atlas: outputs, re-runs, kills, config errors."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from plot_checks import check_spatial_scatter

ROOT = Path(__file__).resolve().parents[1]
DATASET = "MERFISH-C57BL6J-638850"
TINY_CONFIG = {
    "dataset": DATASET,
    "release": "20250531",
    "source": {"kind": "synthetic", "synthetic": {"cells": 4000, "seed": 1, "sections": 6}},
    "assemble": {"chunk_cells": 1500},
    "rasters": [
        {"name": "section_2d", "space": "section", "voxel_size": [0.2], "labels": ["class", "parcellation_division"]},
        {
            "name": "reconstructed_3d",
            "space": "reconstructed",
            "voxel_size": [0.2, 0.2, 0.2],
            "labels": ["class", "parcellation_division"],
        },
    ],
}

# The full chain with learning: both tasks, two networks (one short epoch each) and a scikit-learn baseline.
FULL_CONFIG = {
    **TINY_CONFIG,
    "rasters": [{**spec, "pca": 8} for spec in TINY_CONFIG["rasters"]],
    "tasks": {
        "celltype": {"raster": "section_2d", "level": "class", "patch_size": [3]},
        "region": {"raster": "reconstructed_3d", "level": "parcellation_division", "tile_size": [4, 16, 16]},
    },
    "models": ["cnn", "moment-trivial-irrep", "logreg-neighborhood"],
    "training": {"target_params": 2000, "epochs": 1, "batch_size": 64, "max_samples_per_epoch": 300},
    "baselines": {"neighbors": 8},
    "evaluation": {"any_angles": [0, 45, 90], "any_angle_sections": 1},
    "bench": {"models": ["cnn", "moment-trivial", "logreg-expression"], "train_fractions": [1.0, 0.5]},
}

pytestmark = pytest.mark.slow


def _workdir(tmp: Path, config: dict) -> Path:
    """A private copy of the workflow (Snakefile, rules, schema, profiles) with ``config`` as its config.yaml."""
    shutil.copy(ROOT / "Snakefile", tmp / "Snakefile")
    shutil.copytree(ROOT / "workflow", tmp / "workflow")
    (tmp / "profiles").symlink_to("workflow/profiles")
    (tmp / "config").mkdir()
    (tmp / "config" / "config.yaml").write_text(yaml.safe_dump(config))
    return tmp


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "--cores", "2", *args],
        cwd=workdir,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workdir on which the whole tiny workflow has run once."""
    workdir = _workdir(tmp_path_factory.mktemp("workflow"), FULL_CONFIG)
    snakemake(workdir)
    return workdir


def _jobs_planned(proc: subprocess.CompletedProcess) -> dict[str, int]:
    """Rule -> job count from a dry run's 'Job stats' table."""
    text = proc.stdout + proc.stderr
    if "Nothing to be done" in text:
        return {}
    table = text.split("Job stats:")[1].split("total")[0]
    rows = [line.split() for line in table.splitlines()[3:] if line.strip()]
    return {rule: int(count) for rule, count in rows}


def test_outputs_open_in_scanpy_and_ome_zarr(finished: Path) -> None:
    import scanpy as sc
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    results = finished / "results" / DATASET
    adata = sc.read_h5ad(results / "cells_annotated.h5ad")
    assert adata.n_obs > 3000
    for task in ("celltype", "region"):
        col = adata.obs[f"pred_{task}"]
        assert isinstance(col.dtype, pd.CategoricalDtype)
        assert len(adata.uns[f"pred_{task}_colors"]) == len(col.cat.categories)
        proba = adata.obsm[f"pred_{task}_proba"]
        assert list(proba.columns) == list(col.cat.categories) and proba.index.equals(adata.obs_names)
        has = proba.notna().all(axis=1)
        np.testing.assert_allclose(proba[has].sum(axis=1), 1.0, atol=1e-4)
        assert f"pred_{task}__cnn" in adata.obs  # the second model's predictions are kept beside the primary's
        assert f"pred_{task}__logreg-neighborhood" in adata.obs  # so are the baseline's
    assert set(adata.obs["split"].unique()) <= {"train", "val", "test", "none"}
    check_spatial_scatter(adata, "pred_region", library_key="brain_section_label")
    for grid in ("section_2d", "reconstructed_3d"):
        image = list(Reader(parse_url(str(results / "raster" / f"{grid}.ome.zarr")))())[0]
        assert [a["name"] for a in image.metadata["axes"]] == ["c", "z", "y", "x"] and len(image.data) >= 2
    for model in ("cnn", "moment-trivial-irrep"):
        history = pd.read_csv(results / "models" / "region" / model / "history.tsv", sep="\t")
        assert len(history) == 1
    for bench in (finished / "logs" / "benchmarks").glob("*.tsv"):
        assert "max_rss" in bench.read_text().splitlines()[0]


def test_report_builds(finished: Path) -> None:
    table = pd.read_csv(finished / "results" / DATASET / "report" / "metrics.tsv", sep="\t")
    assert sorted(zip(table["task"], table["model"])) == [
        (task, model)
        for task in ("celltype", "region")
        for model in ("cnn", "logreg-neighborhood", "moment-trivial-irrep")
    ]
    # every model, baseline or network, has the per-cell test scores and the any-angle scores
    for column in (
        "cells_accuracy",
        "cells_balanced_accuracy",
        "cells_macro_f1",
        "any_angle_mean_accuracy",
        "any_angle_worst_accuracy",
    ):
        assert table[column].between(0, 1).all(), column
    snakemake(finished, "--report", "report.html")
    html = (finished / "report.html").read_text(errors="replace")
    assert "metrics.tsv" in html and "predictions_overview.png" in html and "equivariance_curve.png" in html
    assert "any_angle.png" in html


def test_bench_compares_models_on_every_task_and_fraction(finished: Path) -> None:
    planned = _jobs_planned(snakemake(finished, "bench", "-n"))
    assert planned == {"bench_models": 4, "bench": 1}  # 2 tasks x 2 training fractions; nothing else is rerun
    snakemake(finished, "bench")
    for task in ("celltype", "region"):
        for percent in (100, 50):
            out = finished / "results" / DATASET / "bench" / task / f"train_{percent}pct"
            table = pd.read_csv(out / "bench_models.tsv", sep="\t")
            assert list(table["model"]) == ["cnn", "moment-trivial", "logreg-expression"]
            errors = dict(zip(table["model"], table["equivariance_error"]))
            assert errors["moment-trivial"] < 1e-4 < errors["cnn"]
            assert (out / "orientation.png").stat().st_size > 1000
            named = "50% of training sections" in (out / "bench_models.md").read_text()
            assert named == (percent == 50)
    assert _jobs_planned(snakemake(finished, "bench", "-n")) == {}


def test_rerun_of_a_finished_workflow_does_nothing(finished: Path) -> None:
    assert _jobs_planned(snakemake(finished, "-n")) == {}


def test_deleting_an_intermediate_reruns_only_its_dependents(finished: Path) -> None:
    shutil.rmtree(finished / "results" / DATASET / "raster" / "section_2d.ome.zarr")
    planned = _jobs_planned(snakemake(finished, "-n"))
    assert planned == {"rasterize": 1, "train": 3, "predict": 3, "evaluate": 3, "annotate": 1, "report": 1, "all": 1}
    snakemake(finished)
    assert _jobs_planned(snakemake(finished, "-n")) == {}


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"assemble": {"chunk_cells": "many"}}, "'many' is not of type 'integer'"),
        (
            {"evaluation": {"any_angles": [0, "ninety"]}},
            "config key evaluation.any_angles must list angles in degrees as numbers",
        ),
    ],
    ids=["chunk_cells", "any_angles"],
)
def test_invalid_config_fails_before_any_job(tmp_path: Path, bad: dict, message: str) -> None:
    workdir = _workdir(tmp_path, {**TINY_CONFIG, **bad})
    proc = snakemake(workdir, check=False)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert next(iter(next(iter(bad.values())))) in out and message in out
    assert not (workdir / "resources").exists() and not (workdir / "results").exists()


def _start_and_kill_during_assemble(workdir: Path, sig: int) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "snakemake", "--cores", "2"],
        cwd=workdir,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 300
    assemble_log = workdir / "logs" / f"assemble_{DATASET}.log"
    while time.time() < deadline and not assemble_log.exists():
        time.sleep(0.05)
    assert assemble_log.exists(), "assemble never started"
    time.sleep(0.5)
    os.killpg(proc.pid, sig)
    proc.wait(timeout=120)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "power-loss"])
def test_killed_run_restarts_and_completes(tmp_path: Path, sig: int) -> None:
    import anndata

    workdir = _workdir(tmp_path, TINY_CONFIG)
    _start_and_kill_during_assemble(workdir, sig)
    cells = workdir / "results" / DATASET / "cells.zarr"
    if cells.exists():  # the kill came after assemble finished: the store must then be complete
        assert anndata.read_zarr(cells).n_obs > 3000
    if sig == signal.SIGKILL:  # a hard kill leaves Snakemake's lock behind; the documented fix is --unlock
        snakemake(workdir, "--unlock")
    snakemake(workdir)
    assert anndata.read_zarr(cells).n_obs > 3000
    assert _jobs_planned(snakemake(workdir, "-n")) == {}
    leftovers = [p.name for p in cells.parent.iterdir() if p.name.startswith(".")]
    assert not leftovers, f"temporary files left behind: {leftovers}"


def test_task_overrides_win_over_training_and_bench_settings(tmp_path: Path) -> None:
    config = {**FULL_CONFIG, "bench": {**FULL_CONFIG["bench"], "target_params": 2500, "epochs": 3}}
    config["tasks"] = {
        **FULL_CONFIG["tasks"],
        "region": {**FULL_CONFIG["tasks"]["region"], "target_params": 3000, "batch_size": 4, "epochs": 2},
    }
    workdir = _workdir(tmp_path, config)
    proc = snakemake(workdir, "-n", "-p", "all", "bench")
    commands = re.findall(r"abc-pipeline (?:train|bench-models) .*", proc.stdout + proc.stderr)

    def options(command: str) -> tuple[str, str, str]:
        words = command.split()
        return tuple(words[words.index(flag) + 1] for flag in ("--target-params", "--epochs", "--batch-size"))

    by_kind = {(c.split()[1], c.split()[c.split().index("--task") + 1]): options(c) for c in commands}
    assert by_kind == {
        ("train", "celltype"): ("2000", "1", "64"),
        ("train", "region"): ("3000", "2", "4"),
        ("bench-models", "celltype"): ("2500", "3", "64"),
        ("bench-models", "region"): ("3000", "2", "4"),
    }


def test_task_architecture_reaches_train_but_not_bench(tmp_path: Path) -> None:
    """tasks.region.architecture cell-context: train gets it with the patch window; bench keeps its U-Net tiles."""
    config = {**FULL_CONFIG}
    config["tasks"] = {
        **FULL_CONFIG["tasks"],
        "region": {**FULL_CONFIG["tasks"]["region"], "architecture": "cell-context", "patch_size": [3]},
    }
    workdir = _workdir(tmp_path, config)
    proc = snakemake(workdir, "-n", "-p", "all", "bench")
    commands = re.findall(r"abc-pipeline (?:train|bench-models) .*--task region .*", proc.stdout + proc.stderr)
    train = [c for c in commands if c.startswith("abc-pipeline train")]
    bench = [c for c in commands if c.startswith("abc-pipeline bench-models")]
    assert train and bench
    assert all("--architecture cell-context --patch-size 3 " in c and "--tile-size" not in c for c in train)
    assert all("--architecture" not in c and "--tile-size 4 16 16 " in c for c in bench)


@pytest.mark.parametrize("name", ["abc_merfish_638850.yaml", "zhuang_abca_1.yaml", "scale.yaml"])
def test_shipped_atlas_configs_dry_run_offline(tmp_path: Path, name: str) -> None:
    """Each atlas config of config/ plans the whole workflow on top of the shipped demo config.yaml, as a user's
    `snakemake --configfile config/<name>` does (its tasks must name its own grids)."""
    workdir = _workdir(tmp_path, yaml.safe_load((ROOT / "config" / "config.yaml").read_text()))
    shutil.copy(ROOT / "config" / name, workdir / "config" / name)
    planned = _jobs_planned(snakemake(workdir, "-n", "--configfile", f"config/{name}"))
    assert planned["assemble"] == 1 and planned["report"] == 1 and planned["train"] >= 2
    assert ("synth" in planned) == (name == "scale.yaml")


def test_lint_is_clean_except_the_justified_environment_lint() -> None:
    """`snakemake --lint` reports nothing but the per-rule conda/container lint justified in config/README.md."""
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "--lint"], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300
    )
    out = proc.stdout + proc.stderr
    lints = {line.strip() for line in out.splitlines() if line.strip().startswith("* ")}
    assert lints <= {"* Specify a conda environment or container for each rule.:"}, out
    assert "Lints for snakefile" not in out, out
    assert "conda environment or container" in (ROOT / "config" / "README.md").read_text()
