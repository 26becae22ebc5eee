"""ABC Atlas release manifests and dataset profiles.

A release manifest (``releases/<YYYYMMDD>/manifest.json`` in the bucket) lists every file of the release with its
``relative_path``, ``url``, ``size`` (bytes) and MD5 (``file_hash``). Files are addressed as in the Allen
``abc_atlas_access`` client: ``(directory, file_name)`` where ``file_name`` is a tag such as ``cell_metadata`` or, for
expression matrices that exist as raw and log2 variants, ``C57BL6J-638850/log2``.

A *dataset profile* names the files one supported dataset needs; the downloader fetches exactly those and the
assembler reads them by role (``expression``, ``cell_metadata``, ...).
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from abc_pipeline.errors import InputError

DEFAULT_BASE_URL = "https://allen-brain-cell-atlas.s3.us-west-2.amazonaws.com/"
MANIFEST_URL_PREFIX = DEFAULT_BASE_URL
# The Allen client accepts manifests whose version lies in [min, max) (string comparison).
MANIFEST_COMPATIBILITY = ("20230101", "20300101")


@dataclass(frozen=True)
class FileEntry:
    """One file of a release.

    Attributes:
        directory: manifest directory, e.g. ``MERFISH-C57BL6J-638850``.
        file_name: tag as passed to the Allen client, e.g. ``C57BL6J-638850/log2`` or ``cell_metadata``.
        relative_path: POSIX path inside the bucket and inside the local cache.
        url: the manifest's absolute URL (public bucket).
        size: bytes.
        md5: hex MD5 digest of the whole file.
    """

    directory: str
    file_name: str
    relative_path: str
    url: str
    size: int
    md5: str

    def url_for(self, base_url: str) -> str:
        """URL of this file under another bucket root (a mirror, a loopback server, a ``file://`` tree)."""
        return base_url.rstrip("/") + "/" + self.relative_path

    def local_path(self, cache_dir: Path) -> Path:
        """Where the file lives in a local cache; refuses paths that would leave ``cache_dir``."""
        return cache_dir / safe_relative_path(self.relative_path)


def safe_relative_path(relative_path: str) -> str:
    """Return ``relative_path`` normalised, or raise if it is absolute or escapes its root with ``..``."""
    if (
        not relative_path
        or relative_path.startswith(("/", "\\"))
        or (len(relative_path) > 1 and relative_path[1] == ":")
    ):
        raise InputError(
            f"manifest entry relative_path {relative_path!r} is absolute; a release manifest must only hold paths "
            "relative to the bucket root. The manifest is corrupt or not an ABC Atlas manifest."
        )
    normalised = posixpath.normpath(relative_path.replace("\\", "/"))
    if normalised == ".." or normalised.startswith("../") or "/../" in f"/{normalised}/":
        raise InputError(
            f"manifest entry relative_path {relative_path!r} leaves the cache directory ('..'); refusing to write "
            "outside the cache. The manifest is corrupt or hostile."
        )
    return normalised


class Manifest:
    """A parsed release manifest.

    Args:
        data: the decoded ``manifest.json``.
        source: where it was read from (used in error messages).
    """

    def __init__(self, data: Mapping[str, Any], source: str = "<manifest>") -> None:
        if not isinstance(data, Mapping) or not isinstance(data.get("file_listing", {}), Mapping):
            raise InputError(
                f"{source}: not an ABC Atlas release manifest (the top level and 'file_listing' must be "
                "JSON objects); delete it and download it again"
            )
        for key in ("version", "file_listing"):
            if key not in data:
                raise InputError(f"{source}: manifest has no {key!r} key; expected an ABC Atlas release manifest.json")
        self.source = source
        self.version: str = str(data["version"])
        self.resource_uri: str = str(data.get("resource_uri", ""))
        self._file_listing: Mapping[str, Any] = data["file_listing"]
        self.data = data

    @classmethod
    def from_path(cls, path: Path) -> Manifest:
        try:
            text = Path(path).read_text()
        except FileNotFoundError:
            raise InputError(f"manifest {path} does not exist; run `abc-pipeline download` to fetch it") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"manifest {path} is not valid JSON ({exc}); delete it and download it again") from None
        return cls(data, source=str(path))

    @property
    def directories(self) -> list[str]:
        return sorted(self._file_listing)

    def file_names(self, directory: str) -> list[str]:
        """All tags of a directory, as ``tag`` or ``tag/kind`` for raw/log2 files."""
        names: list[str] = []
        for tags in self._directory(directory).values():
            for tag, entry in tags.items():
                if "files" in entry:
                    names.append(tag)
                else:
                    names.extend(f"{tag}/{kind}" for kind in entry)
        return sorted(names)

    def _directory(self, directory: str) -> Mapping[str, Any]:
        try:
            return self._file_listing[directory]
        except KeyError:
            raise InputError(
                f"{self.source}: release {self.version} has no directory {directory!r}; "
                f"available: {', '.join(self.directories)}"
            ) from None

    def resolve(self, directory: str, file_name: str) -> FileEntry:
        """Resolve ``(directory, file_name)`` like ``abc_atlas_access``'s ``Manifest.get_file_attributes``.

        ``file_name`` is ``tag`` or ``tag/kind``; every data kind (metadata, expression_matrices, ...) of the
        directory is searched; for a single-format entry the first extension is taken.
        """
        try:
            return self._resolve(directory, file_name)
        except (TypeError, ValueError, AttributeError) as exc:  # a field of the wrong JSON type
            raise InputError(
                f"{self.source}: entry {directory}/{file_name} has a field of the wrong type ({exc}); the "
                "manifest is damaged or not an ABC Atlas manifest: delete it and download it again"
            ) from None

    def _resolve(self, directory: str, file_name: str) -> FileEntry:
        tag, _, kind = file_name.partition("/")
        for data_kind in self._directory(directory).values():
            entry = data_kind.get(tag)
            if entry is None:
                continue
            if "files" in entry:
                files = entry["files"]
            elif kind:
                if kind not in entry:
                    raise InputError(
                        f"{self.source}: {directory}/{tag} has no {kind!r} variant; available: {', '.join(entry)}"
                    )
                files = entry[kind]["files"]
            else:
                raise InputError(
                    f"{self.source}: {directory}/{tag} exists as {', '.join(entry)}; name one, e.g. "
                    f"'{tag}/{next(iter(entry))}'"
                )
            attrs = next(iter(files.values()))
            try:
                return FileEntry(
                    directory=directory,
                    file_name=file_name,
                    relative_path=safe_relative_path(attrs["relative_path"]),
                    url=attrs["url"],
                    size=int(attrs["size"]),
                    md5=str(attrs["file_hash"]),
                )
            except KeyError as exc:
                raise InputError(
                    f"{self.source}: entry {directory}/{file_name} lacks field {exc.args[0]!r} "
                    "(needs relative_path, url, size, file_hash)"
                ) from None
        raise InputError(
            f"{self.source}: release {self.version} has no file {file_name!r} in {directory}; "
            f"available: {', '.join(self.file_names(directory))}"
        )


# ----------------------------------------------------------------------------------------------- profiles
@dataclass(frozen=True)
class DatasetProfile:
    """The files a dataset needs, by role. ``files`` maps role -> (directory, file_name)."""

    name: str
    files: Mapping[str, tuple[str, str]]
    has_reconstructed: bool

    def entries(self, manifest: Manifest) -> dict[str, FileEntry]:
        """Resolve every role against a manifest."""
        return {role: manifest.resolve(directory, name) for role, (directory, name) in self.files.items()}


_TAXONOMY = {
    "taxonomy": ("WMB-taxonomy", "cluster_to_cluster_annotation_membership_pivoted"),
    "taxonomy_colors": ("WMB-taxonomy", "cluster_to_cluster_annotation_membership_color"),
}
_PARCELLATION = {
    "parcellation": ("Allen-CCF-2020", "parcellation_to_parcellation_term_membership_acronym"),
    "parcellation_colors": ("Allen-CCF-2020", "parcellation_to_parcellation_term_membership_color"),
}


def _merfish_profile() -> DatasetProfile:
    d = "MERFISH-C57BL6J-638850"
    return DatasetProfile(
        name=d,
        files={
            "expression": (d, "C57BL6J-638850/log2"),
            "cell_metadata": (d, "cell_metadata"),
            "gene": (d, "gene"),
            "reconstructed_coordinates": (f"{d}-CCF", "reconstructed_coordinates"),
            "ccf_coordinates": (f"{d}-CCF", "ccf_coordinates"),
            **_TAXONOMY,
            **_PARCELLATION,
        },
        has_reconstructed=True,
    )


def _zhuang_profile(n: int) -> DatasetProfile:
    d = f"Zhuang-ABCA-{n}"
    return DatasetProfile(
        name=d,
        files={
            "expression": (d, f"{d}/log2"),
            "cell_metadata": (d, "cell_metadata"),
            "gene": (d, "gene"),
            "ccf_coordinates": (f"{d}-CCF", "ccf_coordinates"),
            **_TAXONOMY,
            **_PARCELLATION,
        },
        has_reconstructed=False,
    )


PROFILES: dict[str, DatasetProfile] = {
    p.name: p for p in [_merfish_profile(), *(_zhuang_profile(n) for n in range(1, 5))]
}


def get_profile(dataset: str) -> DatasetProfile:
    try:
        return PROFILES[dataset]
    except KeyError:
        raise InputError(f"unknown dataset {dataset!r}; supported: {', '.join(PROFILES)}") from None


def manifest_relative_path(release: str) -> str:
    """Bucket key of a release's manifest."""
    return f"releases/{release}/manifest.json"


def check_release_name(release: str) -> str:
    """Validate a release name (``YYYYMMDD``) and its compatibility window; returns it."""
    if not (len(release) == 8 and release.isdigit()):
        raise InputError(f"release {release!r} is not a YYYYMMDD date such as 20250531 (or use 'latest')")
    lo, hi = MANIFEST_COMPATIBILITY
    if not lo <= release < hi:
        raise InputError(f"release {release} is outside the supported manifest versions [{lo}, {hi})")
    return release


def cached_releases(cache_dir: Path) -> list[str]:
    """Releases whose manifest is in a local cache, oldest first."""
    return sorted(p.parent.name for p in Path(cache_dir).glob("releases/*/manifest.json"))
