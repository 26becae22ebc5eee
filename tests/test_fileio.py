"""Atomic outputs: a failed write leaves the finished output untouched; leftovers of killed runs are cleaned."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from abc_pipeline.fileio import atomic_write_text, file_md5, staged_output, temporary_path


def test_staged_output_replaces_only_on_success(tmp_path: Path) -> None:
    out = tmp_path / "store"
    with staged_output(out) as tmp:
        tmp.mkdir()
        (tmp / "a").write_text("v1")
    assert (out / "a").read_text() == "v1"
    with pytest.raises(RuntimeError), staged_output(out) as tmp:
        tmp.mkdir()
        (tmp / "a").write_text("half")
        raise RuntimeError("killed")
    assert (out / "a").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


def test_staged_output_removes_leftovers_of_killed_runs(tmp_path: Path) -> None:
    out = tmp_path / "cells.zarr"
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()  # a process that has ended
    stale = temporary_path(out).name.replace(f"-{os.getpid()}-", f"-{dead}-")
    (tmp_path / stale).mkdir()
    (tmp_path / f"{stale}-scratch").mkdir()
    (tmp_path / stale.replace(".tmp-", ".old-")).write_text("x")
    (tmp_path / ".other.zarr.tmp-alive").mkdir()  # another output's temporary store is left alone
    with staged_output(out) as tmp:
        tmp.write_text("file outputs work too")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.zarr.tmp-alive", "cells.zarr"]
    assert out.read_text() == "file outputs work too"


def test_atomic_text_and_md5(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "x.json"
    atomic_write_text(path, "hello")
    assert path.read_text() == "hello"
    assert file_md5(path) == "5d41402abc4b2a76b9719d911017c592"
    assert [p.name for p in path.parent.iterdir()] == ["x.json"]
