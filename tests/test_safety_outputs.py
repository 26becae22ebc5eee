"""Outputs never destroy what they do not own: inputs, user folders, links; concurrent runs keep their work."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from raster_fixtures import write_cells

from abc_pipeline.cli import main
from abc_pipeline.errors import InputError
from abc_pipeline.fileio import (
    MARKER_NAME,
    artifact_kind,
    staged_output,
    temporary_path,
)
from abc_pipeline.raster import open_raster, rasterize


def tree(*folders: Path) -> dict[str, str]:
    """Every path under ``folders`` -> content hash ('dir' for folders, 'link:<target>' for links)."""
    out = {}
    for folder in folders:
        for p in [folder, *sorted(folder.rglob("*"))]:
            out[str(p)] = (
                f"link:{os.readlink(p)}"
                if p.is_symlink()
                else "dir"
                if p.is_dir()
                else hashlib.md5(p.read_bytes()).hexdigest()
            )
    return out


def _cells(path: Path, n: int = 200, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    xyz = np.column_stack([rng.uniform(0, 2, n), rng.uniform(0, 2, n), rng.uniform(0, 1, n)])
    labels = {"class": (list(rng.choice(["a", "b"], n)), ["a", "b"])}
    return write_cells(path, rng.normal(size=(n, 4)).astype(np.float32), spatial_3d=xyz, labels=labels, chunk=64)


def _error_line(capsys) -> str:
    """The one error line the CLI printed (no traceback)."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


# ------------------------------------------------------------------------------------------------ the cases
def test_assemble_never_replaces_a_users_folder(tmp_path: Path, synthetic_release: Path, capsys) -> None:
    user = tmp_path / "thesis"
    (user / "sub").mkdir(parents=True)
    (user / "sub" / "thesis.txt").write_text("three years of work")
    before = tree(tmp_path, synthetic_release)
    for extra in ([], ["--overwrite"]):
        argv = ["assemble", "--cache", str(synthetic_release), "--out", str(user), "--no-progress", *extra]
        assert main(argv) == 2
        line = _error_line(capsys)
        assert f"output {user} already exists and was not written by abc-pipeline (it holds sub" in line
        assert "even with --overwrite" in line
    assert tree(tmp_path, synthetic_release) == before


def test_annotate_never_writes_over_its_cells_store(tmp_path: Path, capsys) -> None:
    cells = _cells(tmp_path / "X.zarr")
    before = tree(tmp_path)
    assert (
        main(["annotate", "--cells", str(cells), "--predictions", str(tmp_path / "p.zarr"), "--out", str(cells)]) == 2
    )
    assert f"output {cells} is the input {cells}; writing it would destroy the input" in _error_line(capsys)
    assert tree(tmp_path) == before


def test_predict_never_writes_over_its_raster(tmp_path: Path, atlas: dict, capsys) -> None:
    raster = tmp_path / "s.ome.zarr"
    shutil.copytree(atlas["section"], raster)
    checkpoint = atlas["out"] / "models" / "ct" / "checkpoint.pt"
    before = tree(tmp_path, checkpoint.parent)
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(checkpoint),
                "--raster",
                str(raster),
                "--out",
                str(raster),
                "--no-progress",
                "--overwrite",
            ]
        )
        == 2
    )
    assert f"output {raster} is the input {raster}" in _error_line(capsys)
    assert tree(tmp_path, checkpoint.parent) == before


def test_evaluate_never_replaces_a_folder_with_other_files(tmp_path: Path, atlas: dict, capsys) -> None:
    run = atlas["out"] / "models" / "ct"
    folder = tmp_path / "evaluation"
    folder.mkdir()
    (folder / "notes.md").write_text("mine")
    before = tree(tmp_path, run)
    assert (
        main(
            [
                "evaluate",
                "--checkpoint",
                str(run / "checkpoint.pt"),
                "--raster",
                str(atlas["section"]),
                "--predictions",
                str(tmp_path / "none.zarr"),
                "--out",
                str(folder),
            ]
        )
        == 2
    )
    assert f"output {folder} already exists and was not written by abc-pipeline (it holds notes.md" in _error_line(
        capsys
    )
    # the run folder itself holds the checkpoint: an --out there would contain an input
    assert (
        main(
            [
                "evaluate",
                "--checkpoint",
                str(run / "checkpoint.pt"),
                "--raster",
                str(atlas["section"]),
                "--predictions",
                str(tmp_path / "none.zarr"),
                "--out",
                str(run),
            ]
        )
        == 2
    )
    assert f"output {run} contains the input {run / 'checkpoint.pt'}" in _error_line(capsys)
    assert tree(tmp_path, run) == before


def test_rasterize_never_writes_over_its_cells_even_with_overwrite(tmp_path: Path, capsys) -> None:
    cells = _cells(tmp_path / "X.zarr")
    before = tree(tmp_path)
    assert main(["rasterize", "--cells", str(cells), "--out", str(cells), "--overwrite", "--no-progress"]) == 2
    assert f"output {cells} is the input {cells}" in _error_line(capsys)
    inner = cells / "obs" / "r.ome.zarr"
    assert main(["rasterize", "--cells", str(cells), "--out", str(inner), "--overwrite", "--no-progress"]) == 2
    assert f"output {inner} lies inside the input {cells}" in _error_line(capsys)
    assert tree(tmp_path) == before


# ------------------------------------------------------------------------------------------------ markers and kinds
def test_same_kind_is_replaced_another_kind_needs_overwrite(tmp_path: Path, capsys) -> None:
    cells = _cells(tmp_path / "cells.zarr")
    out = tmp_path / "r.ome.zarr"
    argv = ["rasterize", "--cells", str(cells), "--voxel-size", "0.5", "--labels", "--no-progress"]
    assert main([*argv, "--out", str(out)]) == 0
    assert artifact_kind(out) == "raster" and (out / MARKER_NAME).is_file()
    assert main([*argv, "--out", str(out), "--overwrite"]) == 0  # a raster replaces a raster
    other = tmp_path / "other.ome.zarr"
    with staged_output(other, "predictions") as tmp:  # an abc-pipeline artifact of another kind
        tmp.mkdir()
        (tmp / "x").write_text("predictions")
    before = tree(tmp_path)
    with pytest.raises(InputError, match="holds an abc-pipeline predictions artifact, not a raster; pass --overwrite"):
        with staged_output(other, "raster"):
            pass
    assert tree(tmp_path) == before
    assert main([*argv, "--out", str(other), "--overwrite"]) == 0
    assert artifact_kind(other) == "raster" and open_raster(other).grid.shape == open_raster(out).grid.shape


def test_links_and_files_of_the_user_are_never_outputs(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "data.txt").write_text("mine")
    link = tmp_path / "out.zarr"
    link.symlink_to(target)
    note = tmp_path / "notes.h5ad"
    note.write_text("not an h5ad")
    before = tree(tmp_path)
    with pytest.raises(InputError, match=f"output {link} is a symbolic link"):
        with staged_output(link, "cells", overwrite=True):
            pass
    with pytest.raises(InputError, match="was not written by abc-pipeline; refusing"):
        with staged_output(note, "annotated", overwrite=True):
            pass
    empty = tmp_path / "empty"
    empty.mkdir()
    with staged_output(empty, "cells") as tmp:  # an empty folder holds nothing to lose
        tmp.mkdir()
    assert tree(tmp_path) == {
        **before,
        str(empty): "dir",
        str(empty / MARKER_NAME): tree(empty)[str(empty / MARKER_NAME)],
    }


# ------------------------------------------------------------------------------------------------ temporaries
def test_temporaries_of_live_processes_are_never_cleaned(tmp_path: Path) -> None:
    out = tmp_path / "r.ome.zarr"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        theirs = tmp_path / temporary_path(out).name.replace(f"-{os.getpid()}-", f"-{sleeper.pid}-")
        theirs.mkdir()
        (theirs / "chunk").write_text("in progress")
        with staged_output(out, "raster") as tmp:
            tmp.mkdir()
        assert (theirs / "chunk").read_text() == "in progress"  # the other run is alive: its work stays
    finally:
        sleeper.kill()
        sleeper.wait()
    with staged_output(out, "raster") as tmp:
        tmp.mkdir()
    assert not theirs.exists()  # its writer has ended: a leftover, removed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.ome.zarr"]


def test_concurrent_rasterize_runs_to_one_output_both_finish(tmp_path: Path) -> None:
    """The second run starts while the first is writing its temporary store: neither removes the other's work
    (here two threads of one process; other processes: the test above). The second run has twice as many
    tasks, so the first one's result is read back before the second replaces it."""
    rng = np.random.default_rng(1)
    n = 6_000
    xyz = np.column_stack([rng.uniform(0, 4, n), rng.uniform(0, 4, n), rng.uniform(0, 2, n)])
    cells = write_cells(tmp_path / "cells.zarr", rng.normal(size=(n, 4)).astype(np.float32), spatial_3d=xyz, chunk=25)
    out = tmp_path / "r.ome.zarr"
    kwargs = {"voxel_size": 0.2, "labels": [], "progress": False, "overwrite": True, "scheduler": "synchronous"}

    def run_and_read(chunk_cells: int) -> tuple[int, float]:
        rasterize(cells, out, chunk_cells=chunk_cells, **kwargs)
        r = open_raster(out)  # what this run put in place, complete
        return r.attrs["counts"]["rasterized"], float(r.n_cells.sum().compute())

    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(run_and_read, 50)
        deadline = time.time() + 120
        while time.time() < deadline and not list(tmp_path.glob(".r.ome.zarr.tmp-*")) and not first.done():
            time.sleep(0.002)
        assert not first.done(), "the first run ended before the second started"
        second = pool.submit(run_and_read, 25)
        assert first.result() == (n, n) and second.result() == (n, n)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cells.zarr", "r.ome.zarr"]  # no temporaries left
