"""Manifest parsing, resolution, path safety and dataset profiles (real 20250531 manifest where available)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from abc_pipeline.atlas.manifest import (
    DEFAULT_BASE_URL,
    PROFILES,
    Manifest,
    cached_releases,
    check_release_name,
    get_profile,
    manifest_relative_path,
    safe_relative_path,
)
from abc_pipeline.errors import InputError

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REAL_MANIFEST = SHARED / "data" / "abc_real_excerpts" / "manifest_20250531.json"

# (directory, file_name) -> (relative_path, size, md5), copied from the real release manifest 20250531
EXPECTED = {
    ("MERFISH-C57BL6J-638850", "C57BL6J-638850/log2"): (
        "expression_matrices/MERFISH-C57BL6J-638850/20230830/C57BL6J-638850-log2.h5ad",
        7_627_589_574,
        "0630f7a36d36ebd336cd8d0564b07b14",
    ),
    ("MERFISH-C57BL6J-638850", "C57BL6J-638850/raw"): (
        "expression_matrices/MERFISH-C57BL6J-638850/20230830/C57BL6J-638850-raw.h5ad",
        7_627_589_574,
        "9484a3992a4b6d3a7c0281c72e1be522",
    ),
    ("MERFISH-C57BL6J-638850", "cell_metadata"): (
        "metadata/MERFISH-C57BL6J-638850/20241115/cell_metadata.csv",
        709_894_064,
        "4df6b53fdcc505e2c8562da1e4b553c9",
    ),
    ("MERFISH-C57BL6J-638850", "gene"): (
        "metadata/MERFISH-C57BL6J-638850/20241115/gene.csv",
        48_416,
        "d9cee1242bc13374b5e2beeea827de3e",
    ),
    ("MERFISH-C57BL6J-638850-CCF", "reconstructed_coordinates"): (
        "metadata/MERFISH-C57BL6J-638850-CCF/20231215/reconstructed_coordinates.csv",
        256_489_776,
        "125ecd204740b1fbccb3fb361bb63a07",
    ),
    ("MERFISH-C57BL6J-638850-CCF", "ccf_coordinates"): (
        "metadata/MERFISH-C57BL6J-638850-CCF/20231215/ccf_coordinates.csv",
        295_901_193,
        "23628a884aa65616fa2f9d898c30e9ba",
    ),
    ("WMB-taxonomy", "cluster_to_cluster_annotation_membership_pivoted"): (
        "metadata/WMB-taxonomy/20231215/views/cluster_to_cluster_annotation_membership_pivoted.csv",
        530_641,
        "06a0f8cd2b2181fed0fc6e3597af5c20",
    ),
    ("Allen-CCF-2020", "parcellation_to_parcellation_term_membership_color"): (
        "metadata/Allen-CCF-2020/20230630/views/parcellation_to_parcellation_term_membership_color.csv",
        30_465,
        "2b143fe11b8ac05c2503fd24a4928a01",
    ),
    ("Zhuang-ABCA-1", "Zhuang-ABCA-1/log2"): (
        "expression_matrices/Zhuang-ABCA-1/20230830/Zhuang-ABCA-1-log2.h5ad",
        2_128_478_610,
        "1fa58179fadc9bb8b7fb2e3449da9df1",
    ),
    ("Zhuang-ABCA-1", "cell_metadata"): (
        "metadata/Zhuang-ABCA-1/20241115/cell_metadata.csv",
        661_035_596,
        "5f05c97b15c58bcc05421aff1e4b5bd4",
    ),
    ("Zhuang-ABCA-1", "gene"): ("metadata/Zhuang-ABCA-1/20241115/gene.csv", 84_677, "44b16a70c9cd2188d30900c29c2d8ba1"),
    ("Zhuang-ABCA-1-CCF", "ccf_coordinates"): (
        "metadata/Zhuang-ABCA-1-CCF/20230830/ccf_coordinates.csv",
        220_766_326,
        "ac72abb78ecd1a03edd2118ec011ea83",
    ),
    ("Zhuang-ABCA-4", "Zhuang-ABCA-4/log2"): (
        "expression_matrices/Zhuang-ABCA-4/20230830/Zhuang-ABCA-4-log2.h5ad",
        106_739_752,
        "d4e27da0482c2a1b46750fcc1c07ab31",
    ),
    ("Zhuang-ABCA-4-CCF", "ccf_coordinates"): (
        "metadata/Zhuang-ABCA-4-CCF/20230830/ccf_coordinates.csv",
        13_750_526,
        "bc5e785cd5f49ba8b6d233dd8842f368",
    ),
}


@pytest.fixture(scope="module")
def real() -> Manifest:
    if not REAL_MANIFEST.is_file():
        pytest.skip(f"{REAL_MANIFEST} not available (../shared absent)")
    return Manifest.from_path(REAL_MANIFEST)


# ------------------------------------------------------------------------------------------------ real manifest
def test_real_manifest_loads(real):
    assert real.version == "20250531"
    assert real.resource_uri == "s3://allen-brain-cell-atlas/"
    assert {"MERFISH-C57BL6J-638850", "WMB-taxonomy", "Allen-CCF-2020", "Zhuang-ABCA-1"} <= set(real.directories)
    assert {"C57BL6J-638850/log2", "C57BL6J-638850/raw", "cell_metadata", "gene"} <= set(
        real.file_names("MERFISH-C57BL6J-638850")
    )


@pytest.mark.parametrize(("key", "expected"), list(EXPECTED.items()), ids=[f"{d}:{n}" for d, n in EXPECTED])
def test_real_manifest_resolves_sizes_and_md5s(real, key, expected):
    entry = real.resolve(*key)
    relative_path, size, md5 = expected
    assert (entry.relative_path, entry.size, entry.md5) == (relative_path, size, md5)
    assert entry.url == DEFAULT_BASE_URL + relative_path
    assert entry.url_for("http://127.0.0.1:8000/mirror/") == "http://127.0.0.1:8000/mirror/" + relative_path
    assert entry.local_path(Path("/cache")) == Path("/cache") / relative_path


@pytest.mark.parametrize("dataset", sorted(PROFILES))
def test_every_profile_resolves_against_the_real_manifest(real, dataset):
    profile = get_profile(dataset)
    entries = profile.entries(real)
    assert set(entries) == set(profile.files)
    for role, entry in entries.items():
        assert entry.size > 0 and len(entry.md5) == 32, role
        assert entry.relative_path.startswith(("metadata/", "expression_matrices/")), role
    assert entries["expression"].relative_path.endswith("-log2.h5ad")
    assert ("reconstructed_coordinates" in entries) == profile.has_reconstructed
    expected = {(d, n): v for (d, n), v in EXPECTED.items() if (d, n) in profile.files.values()}
    for (directory, name), (relative_path, size, md5) in expected.items():
        role = next(r for r, dn in profile.files.items() if dn == (directory, name))
        assert (entries[role].relative_path, entries[role].size, entries[role].md5) == (relative_path, size, md5)


def test_real_manifest_errors_name_the_fix(real):
    with pytest.raises(InputError, match="no directory 'Nope'.*available: .*MERFISH-C57BL6J-638850"):
        real.resolve("Nope", "gene")
    with pytest.raises(InputError, match="no file 'genes' in MERFISH-C57BL6J-638850; available: .*gene"):
        real.resolve("MERFISH-C57BL6J-638850", "genes")
    with pytest.raises(InputError, match="name one, e.g. 'C57BL6J-638850/"):
        real.resolve("MERFISH-C57BL6J-638850", "C57BL6J-638850")
    with pytest.raises(InputError, match="no 'log10' variant; available: "):
        real.resolve("MERFISH-C57BL6J-638850", "C57BL6J-638850/log10")


# ------------------------------------------------------------------------------------------------ synthetic manifests
def _manifest(relative_path: str = "metadata/D/20240101/gene.csv", **drop: bool) -> dict:
    attrs = {
        "version": "20240101",
        "relative_path": relative_path,
        "url": DEFAULT_BASE_URL + relative_path,
        "size": 12,
        "file_hash": "0" * 32,
    }
    for key in drop:
        attrs.pop(key)
    return {"version": "20240101", "file_listing": {"D": {"metadata": {"gene": {"files": {"csv": attrs}}}}}}


@pytest.mark.parametrize(
    "bad",
    [
        "../evil.csv",
        "metadata/../../evil.csv",
        "a/b/../../../evil.csv",
        "..",
        "/etc/passwd",
        "\\\\server\\share",
        "C:/Windows/x.csv",
        "",
    ],
)
def test_paths_leaving_the_cache_are_refused(bad):
    with pytest.raises(InputError, match="relative_path"):
        safe_relative_path(bad)
    with pytest.raises(InputError, match="relative_path"):
        Manifest(_manifest(bad), source="m.json").resolve("D", "gene")


def test_safe_relative_path_normalises():
    assert safe_relative_path("metadata/./D/x/../gene.csv") == "metadata/D/gene.csv"
    assert safe_relative_path("metadata\\D\\gene.csv") == "metadata/D/gene.csv"


def test_manifest_missing_keys_and_fields():
    with pytest.raises(InputError, match="m.json: manifest has no 'file_listing'"):
        Manifest({"version": "20240101"}, source="m.json")
    with pytest.raises(InputError, match="lacks field 'file_hash'"):
        Manifest(_manifest(file_hash=True), source="m.json").resolve("D", "gene")


def test_manifest_file_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist; run `abc-pipeline download`"):
        Manifest.from_path(tmp_path / "releases" / "20240101" / "manifest.json")
    broken = tmp_path / "manifest.json"
    broken.write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON.*download it again"):
        Manifest.from_path(broken)
    good = tmp_path / "releases" / "20240101" / "manifest.json"
    good.parent.mkdir(parents=True)
    good.write_text(json.dumps(_manifest()))
    assert Manifest.from_path(good).resolve("D", "gene").size == 12
    assert cached_releases(tmp_path) == ["20240101"]
    assert cached_releases(tmp_path / "missing") == []


def test_release_names_and_profiles():
    assert check_release_name("20250531") == "20250531"
    assert manifest_relative_path("20250531") == "releases/20250531/manifest.json"
    for bad in ("2025-05-31", "latest", "2025053", "20221231", "20300101"):
        with pytest.raises(InputError):
            check_release_name(bad)
    assert set(PROFILES) == {"MERFISH-C57BL6J-638850", *(f"Zhuang-ABCA-{n}" for n in range(1, 5))}
    with pytest.raises(InputError, match="unknown dataset 'Zhuang-ABCA-5'; supported: "):
        get_profile("Zhuang-ABCA-5")
