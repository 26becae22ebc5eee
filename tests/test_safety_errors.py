"""Failures a user can fix end in one line naming the path and the fix, and leave nothing half-written.

Disk full and read-only file systems are real: small tmpfs mounts (the tests skip where mounting is not
allowed, i.e. without root). Permission denied (EACCES) cannot be provoked as root and shares the code path
of EROFS.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_download import DATASET, RELEASE, build_release
from test_safety_outputs import _cells, _error_line, tree

from abc_pipeline.cli import main
from abc_pipeline.errors import InputError
from abc_pipeline.learn.train import pick_device

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def tmpfs(path: Path, options: str = "size=1m"):
    """A tmpfs of ``options`` mounted at ``path`` (skips the test where mounting is not allowed)."""
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}); run as root to test a full disk")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def test_disk_full_during_assemble(tmp_path: Path, synthetic_release: Path, capsys) -> None:
    with tmpfs(tmp_path / "small") as small:
        out = small / "cells.zarr"
        assert main(["assemble", "--cache", str(synthetic_release), "--out", str(out), "--no-progress"]) == 2
        line = _error_line(capsys)
        assert str(small) in line and "No space left on device; the disk is full" in line
        assert "nothing half-written was kept" in line
        assert list(small.iterdir()) == []  # neither the store nor its temporary or scratch folders


def test_disk_full_during_annotate(tmp_path: Path, atlas: dict) -> None:
    """In a process of its own: after failed writes HDF5's library state is not to be trusted for more work."""
    from abc_pipeline.learn.predict import predict_raster

    store = predict_raster(
        atlas["out"] / "models" / "ct" / "checkpoint.pt", atlas["section"], tmp_path / "p.zarr", progress=False
    )
    with tmpfs(tmp_path / "small") as small:
        out = small / "cells_annotated.h5ad"
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "abc_pipeline.cli",
                "annotate",
                "--cells",
                str(atlas["cells"]),
                "--predictions",
                str(store),
                "--out",
                str(out),
            ],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            timeout=300,
            check=False,
        )
        # HDF5 itself prints the failed writes of its buffers; ours is the one error line
        errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
        assert len(errors) == 1 and f"{out}: No space left on device; the disk is full" in errors[0]
        assert list(small.iterdir()) == []
    if proc.returncode == -11:  # known: HDF5 crashes when the interpreter exits after its writes failed
        pytest.xfail("annotate on a full disk: right message and no leftovers, but HDF5 segfaults at exit (rc -11)")
    assert proc.returncode == 2


def test_read_only_cache_and_cache_that_is_a_file(tmp_path: Path, capsys) -> None:
    root = tmp_path / "bucket"
    build_release(root)
    argv = ["download", "--dataset", DATASET, "--release", RELEASE, "--base-url", root.as_uri(), "--no-progress"]
    with tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        assert main([*argv, "--cache", str(ro)]) == 2
        line = _error_line(capsys)
        assert str(ro) in line and "the file system is read-only: choose a writable path" in line
    cache = tmp_path / "cache"
    cache.write_text("a file, not a folder")
    assert main([*argv, "--cache", str(cache)]) == 2
    line = _error_line(capsys)
    assert str(cache) in line and "a part of that path is a file, not a folder" in line
    assert cache.read_text() == "a file, not a folder"


def test_corrupt_chunk_names_the_store(tmp_path: Path, capsys) -> None:
    cells = _cells(tmp_path / "cells.zarr")
    chunk = cells / "X" / "0.0"
    chunk.write_bytes(b"\x00garbage" * (chunk.stat().st_size // 8 + 1))  # same store layout, undecodable bytes
    before = tree(tmp_path)
    assert (
        main(["rasterize", "--cells", str(cells), "--out", str(tmp_path / "r.ome.zarr"), "--labels", "--no-progress"])
        == 2
    )
    line = _error_line(capsys)
    assert f"{cells}: X rows 0..199 cannot be decoded" in line and "a chunk file of X is corrupt" in line
    assert tree(tmp_path) == before


def test_bad_options_are_one_line(tmp_path: Path, capsys) -> None:
    cells = _cells(tmp_path / "cells.zarr")
    genes = tmp_path / "genes.txt"
    genes.write_text("# no genes here\n\n")
    assert (
        main(["rasterize", "--cells", str(cells), "--out", str(tmp_path / "r.ome.zarr"), "--genes-file", str(genes)])
        == 2
    )
    assert f"--genes-file {genes} names no gene" in _error_line(capsys)
    for argv, message in (
        (["assemble", "--cache", "c", "--out", "o", "--chunk-cells", "0"], "must be at least 1"),
        (
            ["evaluate", "--checkpoint", "c", "--raster", "r", "--predictions", "p", "--out", "o", "--angles", "nan"],
            "must be a finite number",
        ),
    ):
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert stop.value.code == 2 and message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cells.zarr", "genes.txt"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch build without a usable GPU")
def test_cuda_on_a_cpu_build(tmp_path: Path, capsys) -> None:
    with pytest.raises(InputError, match="sees no CUDA GPU; use --device cpu or auto"):
        pick_device("cuda")
    with pytest.raises(InputError, match="is not a device"):
        pick_device("gpu0")
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(tmp_path / "c.pt"),
                "--raster",
                str(tmp_path / "r"),
                "--out",
                str(tmp_path / "p.zarr"),
                "--device",
                "cuda",
            ]
        )
        == 2
    )
    assert "--device cuda: this torch build" in _error_line(capsys)


def test_manifest_fields_of_the_wrong_type(tmp_path: Path, capsys) -> None:
    root = tmp_path / "bucket"
    build_release(root)
    cache = tmp_path / "cache"
    manifest = cache / "releases" / RELEASE / "manifest.json"
    manifest.parent.mkdir(parents=True)
    data = json.loads((root / "releases" / RELEASE / "manifest.json").read_text())
    for directory in data["file_listing"].values():
        for kind in directory.values():
            for entry in kind.values():
                for files in (entry["files"],) if "files" in entry else (v["files"] for v in entry.values()):
                    for attrs in files.values():
                        attrs["size"] = [1, 2]
    manifest.write_text(json.dumps(data))
    assert (
        main(
            [
                "download",
                "--dataset",
                DATASET,
                "--release",
                RELEASE,
                "--base-url",
                root.as_uri(),
                "--cache",
                str(cache),
                "--no-progress",
            ]
        )
        == 2
    )
    line = _error_line(capsys)
    assert f"{manifest}: entry" in line and "has a field of the wrong type" in line
    assert sorted(p.name for p in cache.iterdir()) == ["releases"]


def test_bad_h5ad_given_to_report(tmp_path: Path, atlas: dict, capsys) -> None:
    fake = tmp_path / "cells_annotated.h5ad"
    fake.write_text("not an h5ad")
    run = tmp_path / "run"
    shutil.copytree(atlas["out"] / "models" / "ct", run)
    assert main(["report", "--annotated", str(fake), "--runs", str(run), "--out", str(tmp_path / "report")]) == 2
    line = _error_line(capsys)
    assert str(fake) in line
