"""Release choice: the newest real manifest (20260711) resolves every dataset profile to the same files as
20250531, and ``latest`` picks the newest release of a tree that holds several (synthetic) ones."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from abc_pipeline.atlas.download import resolve_release
from abc_pipeline.atlas.manifest import PROFILES, Manifest
from abc_pipeline.atlas.synthetic import write_synthetic_release

CONFIGS = Path(__file__).resolve().parents[1] / "config"


@pytest.mark.parametrize("dataset", sorted(PROFILES))
def test_newest_real_manifest_resolves_every_profile_to_the_same_files(real_excerpts: Path, dataset: str) -> None:
    old = PROFILES[dataset].entries(Manifest.from_path(real_excerpts / "manifest_20250531.json"))
    new = PROFILES[dataset].entries(Manifest.from_path(real_excerpts / "manifest_20260711.json"))
    assert set(new) == set(old)
    for role, entry in new.items():
        assert (entry.relative_path, entry.size, entry.md5) == (old[role].relative_path, old[role].size, old[role].md5)


def test_real_atlas_configs_name_the_newest_release(real_excerpts: Path) -> None:
    newest = max(p.stem.split("_")[1] for p in real_excerpts.glob("manifest_*.json"))
    for name in ("abc_merfish_638850.yaml", "zhuang_abca_1.yaml"):
        config = yaml.safe_load((CONFIGS / name).read_text())
        assert config["release"] == newest == "20260711", name
        Manifest.from_path(real_excerpts / f"manifest_{newest}.json")  # and it resolves (test above)


def test_latest_picks_the_newest_release(tmp_path: Path) -> None:
    root = tmp_path / "bucket"
    write_synthetic_release(root, n_cells=200, n_sections=1, seed=0, release="20250531", progress=False)
    newer = tmp_path / "newer"
    write_synthetic_release(newer, n_cells=200, n_sections=1, seed=0, release="20260711", progress=False)
    (root / "releases" / "20260711").mkdir()
    (newer / "releases" / "20260711" / "manifest.json").rename(root / "releases" / "20260711" / "manifest.json")
    assert resolve_release("latest", root.as_uri() + "/", tmp_path / "cache") == "20260711"
    assert resolve_release("20250531", root.as_uri() + "/", tmp_path / "cache") == "20250531"
