"""Failures a user can fix end in one line naming the path and the fix, and leave nothing half-written.

Disk full and read-only file systems are real: small tmpfs mounts (the tests skip where mounting is not
allowed, i.e. without root). Permission denied (EACCES) cannot be provoked as root and shares the code path
of EROFS.
"""

from __future__ import annotations

import contextlib
import errno
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
from abc_pipeline.learn.inference import pick_device

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
    assert proc.returncode == 2  # not -11: HDF5's exit handlers, which crash after failed writes, are skipped


def test_disk_full_during_train_leaves_no_checkpoint(tmp_path: Path, atlas: dict, capsys) -> None:
    with tmpfs(tmp_path / "small", "size=64k") as small:
        run = small / "run"
        argv = ["train", "--raster", str(atlas["section"]), "--cells", str(atlas["cells"]), "--task", "celltype"]
        argv += ["--model", "cnn", "--out", str(run), "--epochs", "2", "--no-progress"]
        assert main(argv) == 2
        line = _error_line(capsys)
        assert "No space left on device; the disk is full" in line and str(small) in line
        assert not (run / "checkpoint.pt").exists() and not (run / "metrics.json").exists()


def test_a_run_is_published_whole_or_not_at_all(tmp_path: Path) -> None:
    """metrics.json fits, checkpoint.pt does not: neither stays, and no temporary either."""
    from abc_pipeline.learn.checkpoint import publish_run

    with tmpfs(tmp_path / "small", "size=256k") as small:
        (small / "checkpoint.pt").write_bytes(b"a previous run's")
        with pytest.raises(OSError) as failed:
            publish_run({"best_epoch": 3}, {"model": torch.zeros(200_000)}, small)
        assert failed.value.errno == errno.ENOSPC
        assert list(small.iterdir()) == []
        publish_run({"best_epoch": 3}, {"model": torch.zeros(1000)}, small)
        assert json.loads((small / "metrics.json").read_text()) == {"best_epoch": 3}
        assert torch.load(small / "checkpoint.pt", weights_only=True)["model"].shape == (1000,)


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


def test_corrupt_raster_chunk_names_the_stores(tmp_path: Path, atlas: dict, capsys) -> None:
    raster = tmp_path / "s.ome.zarr"
    shutil.copytree(atlas["section"], raster)
    chunk = max(
        (p for p in (raster / "0").rglob("*") if p.is_file() and not p.name.startswith(".")), key=os.path.getsize
    )
    chunk.write_bytes(b"\x00garbage" * (chunk.stat().st_size // 8 + 1))
    before = tree(tmp_path)
    out = tmp_path / "p.zarr"
    ckpt = atlas["out"] / "models" / "ct" / "checkpoint.pt"
    assert (
        main(["predict", "--checkpoint", str(ckpt), "--raster", str(raster), "--out", str(out), "--no-progress"]) == 2
    )
    line = _error_line(capsys)
    assert "cannot be decoded" in line and str(raster) in line and "re-run the step that wrote it" in line
    assert tree(tmp_path) == before and not out.exists()


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
