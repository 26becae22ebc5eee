"""Downloads never write through links, and a shared cache stays usable by the group (umask permissions)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from test_download import DATASET, FAST, GENE, RELEASE, build_release

from abc_pipeline.atlas.download import download_dataset
from abc_pipeline.fileio import atomic_write_text


@pytest.fixture()
def release(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    root = tmp_path / "bucket"
    return root, build_release(root)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_part_file_that_is_a_link_is_never_written_through(tmp_path: Path, release, caplog) -> None:
    root, contents = release
    cache, outside = tmp_path / "cache", tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim.txt"
    victim.write_bytes(b"precious bytes of someone else\n")
    part = cache / f"{GENE}.part"
    part.parent.mkdir(parents=True)
    part.symlink_to(victim)
    before = _snapshot(outside)
    summary = download_dataset(DATASET, release=RELEASE, base_url=root.as_uri(), cache_dir=cache, **FAST)
    assert _snapshot(outside) == before  # nothing appended to the link's target
    assert (cache / GENE).read_bytes() == contents[GENE] and not (cache / GENE).is_symlink()
    assert GENE in summary.fetched
    assert "not a regular file" in caplog.text and str(part) in caplog.text


def test_lock_files_that_are_links_create_nothing_outside_the_cache(tmp_path: Path, release) -> None:
    root, contents = release
    cache, outside = tmp_path / "cache", tmp_path / "outside"
    outside.mkdir()
    (outside / "existing.lock").write_text("keep")
    locks = cache / ".locks"
    locks.mkdir(parents=True)
    (locks / (GENE.replace("/", "__") + ".lock")).symlink_to(outside / "created_by_the_download.lock")  # dangling
    (cache / "_verified.json.lock").symlink_to(outside / "existing.lock")
    before = _snapshot(outside)
    download_dataset(DATASET, release=RELEASE, base_url=root.as_uri(), cache_dir=cache, **FAST)
    assert _snapshot(outside) == before
    assert sorted(p.name for p in outside.iterdir()) == ["existing.lock"]
    assert all(p.read_bytes() == data for p, data in ((cache / rel, data) for rel, data in contents.items()))


def test_shared_cache_files_get_the_umask_permissions(tmp_path: Path, release) -> None:
    root, _ = release
    cache = tmp_path / "cache"
    old = os.umask(0o002)  # a group cache
    try:
        download_dataset(DATASET, release=RELEASE, base_url=root.as_uri(), cache_dir=cache, **FAST)
        atomic_write_text(tmp_path / "note.txt", "x")
    finally:
        os.umask(old)
    written = [
        cache / "releases" / RELEASE / "manifest.json",
        cache / "_verified.json",
        cache / GENE,
        tmp_path / "note.txt",
    ]
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) == 0o664, path  # not mkstemp's 0600
