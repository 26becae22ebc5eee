"""Downloader tests against a real HTTP server on 127.0.0.1 that serves a small release tree and injects faults.

The release tree has the real layout (``releases/<ver>/manifest.json`` + ``<relative_path>`` files with true sizes
and MD5s) for the MERFISH profile, with a few hundred KB of random bytes per file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

from abc_pipeline.atlas.download import VERIFIED_FILENAME, check_base_url, download_dataset, list_releases
from abc_pipeline.atlas.manifest import get_profile
from abc_pipeline.cli import main
from abc_pipeline.errors import DownloadError, InputError

DATASET = "MERFISH-C57BL6J-638850"
RELEASE = "20250531"
EXPRESSION = f"expression_matrices/{DATASET}/20230830/C57BL6J-638850-log2.h5ad"
GENE = f"metadata/{DATASET}/20241115/gene.csv"
FAST = dict(jobs=4, retries=3, progress=False, backoff=0.001, timeout=10.0, chunk_size=64 * 1024)


# ------------------------------------------------------------------------------------------------ release tree
def _relative_path(directory: str, file_name: str) -> str:
    tag, _, kind = file_name.partition("/")
    if kind:
        return f"expression_matrices/{directory}/20230830/{tag}-{kind}.h5ad"
    return f"metadata/{directory}/20241115/{tag}.csv"


def build_release(
    root: Path, release: str = RELEASE, seed: int = 0, override: dict[str, str] | None = None
) -> dict[str, bytes]:
    """Write a release tree for the MERFISH profile under ``root``; returns relative_path -> content.

    ``override`` maps a real relative path to the relative_path written into the manifest (hostile entries).
    """
    rng = random.Random(seed)
    listing: dict = {}
    contents: dict[str, bytes] = {}
    for role, (directory, file_name) in get_profile(DATASET).files.items():
        rel = _relative_path(directory, file_name)
        data = rng.randbytes(400_000 if role == "expression" else 150_000 if role == "cell_metadata" else 20_000)
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
        contents[rel] = data
        listed = (override or {}).get(rel, rel)
        attrs = {
            "version": "20241115",
            "relative_path": listed,
            "url": f"https://example.invalid/{listed}",
            "size": len(data),
            "file_hash": hashlib.md5(data).hexdigest(),
        }
        tag, _, kind = file_name.partition("/")
        if kind:
            kinds = listing.setdefault(directory, {}).setdefault("expression_matrices", {}).setdefault(tag, {})
            kinds[kind] = {"files": {"h5ad": attrs}}
        else:
            listing.setdefault(directory, {}).setdefault("metadata", {})[tag] = {"files": {"csv": attrs}}
    manifest = {
        "version": release,
        "resource_uri": "s3://allen-brain-cell-atlas/",
        "directory_listing": {},
        "file_listing": listing,
    }
    path = root / "releases" / release / "manifest.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest))
    return contents


# ------------------------------------------------------------------------------------------------ server
class _Handler(BaseHTTPRequestHandler):
    """GET with Range support, S3-style release listing and per-path fault injection."""

    protocol_version = "HTTP/1.1"
    server: ReleaseServer

    def log_message(self, *args: object) -> None:
        pass

    def _empty(self, status: int) -> None:
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        srv = self.server
        url = urlsplit(self.path)
        rel = unquote(url.path.lstrip("/"))
        query = parse_qs(url.query)
        if query.get("list-type") == ["2"]:
            return self._list(query)
        with srv.lock:
            srv.requests.append((rel, self.headers.get("Range")))
            fault = srv.faults[rel].pop(0) if srv.faults.get(rel) else None
        if fault == "503":
            return self._empty(503)
        path = srv.root / rel
        if not path.is_file():
            return self._empty(404)
        data = path.read_bytes()
        start, status = 0, 200
        if self.headers.get("Range") and fault != "ignore_range":
            start, status = int(self.headers["Range"].split("=")[1].split("-")[0]), 206
        body = data[start:]
        if fault == "corrupt":
            middle = len(body) // 2
            body = body[:middle] + bytes([body[middle] ^ 0xFF]) + body[middle + 1 :]
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if fault == "cut":  # promise the whole body, send half, drop the connection
            body = body[: len(body) // 2]
            self.close_connection = True
        self.wfile.write(body)
        with srv.lock:
            srv.sent[rel] += len(body)

    def _list(self, query: dict[str, list[str]]) -> None:
        """S3 ListObjectsV2 with delimiter '/', one common prefix per page (exercises continuation tokens)."""
        names = sorted(p.parent.name for p in (self.server.root / "releases").glob("*/manifest.json"))
        index = int(query.get("continuation-token", ["0"])[0])
        truncated = index + 1 < len(names)
        token = f"<NextContinuationToken>{index + 1}</NextContinuationToken>" if truncated else ""
        prefixes = "".join(
            f"<CommonPrefixes><Prefix>releases/{n}/</Prefix></CommonPrefixes>" for n in names[index : index + 1]
        )
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>'
            '<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Name>allen-brain-cell-atlas'
            f"</Name><Prefix>releases/</Prefix><Delimiter>/</Delimiter><IsTruncated>{str(truncated).lower()}"
            f"</IsTruncated>{token}{prefixes}</ListBucketResult>"
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class ReleaseServer(ThreadingHTTPServer):
    """Loopback server over a release tree; records requests (path, Range header) and bytes sent per path."""

    daemon_threads = True

    def __init__(self, root: Path) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root = root
        self.lock = threading.Lock()
        self.faults: dict[str, list[str]] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.sent: Counter[str] = Counter()
        self.url = f"http://127.0.0.1:{self.server_address[1]}/"
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()

    def data_requests(self) -> list[tuple[str, str | None]]:
        return [r for r in self.requests if not r[0].startswith("releases/")]

    def reset(self) -> None:
        with self.lock:
            self.requests.clear()
            self.sent.clear()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


@pytest.fixture
def release(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    root = tmp_path / "bucket"
    return root, build_release(root)


@pytest.fixture
def server(release: tuple[Path, dict[str, bytes]]):
    srv = ReleaseServer(release[0])
    yield srv
    srv.stop()


def _assert_mirrored(cache: Path, contents: dict[str, bytes]) -> None:
    for rel, data in contents.items():
        assert (cache / rel).read_bytes() == data, rel
        assert not (cache / f"{rel}.part").exists()


# ------------------------------------------------------------------------------------------------ tests
def test_download_then_rerun_transfers_nothing(tmp_path, release, server):
    _, contents = release
    cache = tmp_path / "cache"
    summary = download_dataset(DATASET, release=RELEASE, base_url=server.url, cache_dir=cache, **FAST)
    _assert_mirrored(cache, contents)
    assert sorted(summary.fetched) == sorted(contents) and summary.skipped == []
    assert summary.transferred_bytes == sum(map(len, contents.values()))
    assert set(summary.files) == set(get_profile(DATASET).files)
    assert (cache / "releases" / RELEASE / "manifest.json").is_file()
    assert set(json.loads((cache / VERIFIED_FILENAME).read_text())) == set(contents)

    server.reset()
    again = download_dataset(DATASET, release=RELEASE, base_url=server.url, cache_dir=cache, **FAST)
    assert server.requests == []  # cached manifest, verified files: not one request
    assert again.transferred_bytes == 0 and again.fetched == [] and sorted(again.skipped) == sorted(contents)


def test_cut_mid_file_resumes_with_range(tmp_path, release, server):
    _, contents = release
    size = len(contents[EXPRESSION])
    server.faults[EXPRESSION] = ["cut"]
    cache = tmp_path / "cache"
    summary = download_dataset(DATASET, release=RELEASE, base_url=server.url, cache_dir=cache, **FAST)
    _assert_mirrored(cache, contents)
    asked = [rng for rel, rng in server.requests if rel == EXPRESSION]
    assert len(asked) == 2 and asked[0] is None
    resumed_at = int(asked[1].removeprefix("bytes=").removesuffix("-"))
    assert 0 < resumed_at < size
    assert server.sent[EXPRESSION] < 2 * size
    assert summary.transferred_bytes < sum(map(len, contents.values())) + size


def test_server_ignoring_range_restarts_from_zero(tmp_path, release, server):
    _, contents = release
    server.faults[EXPRESSION] = ["cut", "ignore_range"]
    cache = tmp_path / "cache"
    download_dataset(DATASET, release=RELEASE, base_url=server.url, cache_dir=cache, **FAST)
    _assert_mirrored(cache, contents)
    assert [rng is not None for rel, rng in server.requests if rel == EXPRESSION] == [False, True]


def test_corrupt_bytes_are_retried_then_fail_clearly(tmp_path, release, server):
    _, contents = release
    server.faults[GENE] = ["corrupt"] * 10
    data = bytearray(contents[GENE])
    data[len(data) // 2] ^= 0xFF
    cache = tmp_path / "cache"
    with pytest.raises(DownloadError) as info:
        download_dataset(DATASET, release=RELEASE, base_url=server.url, cache_dir=cache, **FAST)
    message = str(info.value)
    assert GENE in message
    assert hashlib.md5(contents[GENE]).hexdigest() in message and hashlib.md5(data).hexdigest() in message
    assert "3 attempts" in message
    assert [rel for rel, _ in server.requests].count(GENE) == 3
    assert not (cache / GENE).exists() and not (cache / f"{GENE}.part").exists()
    assert GENE not in json.loads((cache / VERIFIED_FILENAME).read_text())
    # the other files completed and a later run with a healthy server fetches only the missing one
    server.faults.clear()
    server.reset()
    summary = download_dataset(DATASET, release=RELEASE, base_url=server.url, cache_dir=cache, **FAST)
    assert summary.fetched == [GENE] and [rel for rel, _ in server.data_requests()] == [GENE]
    _assert_mirrored(cache, contents)


def test_503_then_success(tmp_path, release, server):
    _, contents = release
    server.faults[EXPRESSION] = ["503"]
    server.faults[f"releases/{RELEASE}/manifest.json"] = ["503", "503"]
    cache = tmp_path / "cache"
    download_dataset(DATASET, release=RELEASE, base_url=server.url, cache_dir=cache, **FAST)
    _assert_mirrored(cache, contents)
    assert [rel for rel, _ in server.requests].count(EXPRESSION) == 2


def test_404_fails_fast(tmp_path, release, server):
    root, _ = release
    (root / GENE).unlink()
    with pytest.raises(DownloadError, match=r"(?s)gene\.csv.*HTTP 404"):
        download_dataset(DATASET, release=RELEASE, base_url=server.url, cache_dir=tmp_path / "cache", **FAST)
    assert [rel for rel, _ in server.requests].count(GENE) == 1


@pytest.mark.parametrize("hostile", ["../../evil.csv", "/tmp/evil.csv", "metadata/../../evil.csv"])
def test_relative_path_leaving_the_cache_is_refused(tmp_path, hostile):
    root = tmp_path / "bucket"
    build_release(root, override={GENE: hostile})
    cache = tmp_path / "sub" / "cache"
    with pytest.raises(InputError, match="relative_path"):
        download_dataset(DATASET, release=RELEASE, base_url=root.as_uri(), cache_dir=cache, **FAST)
    assert not (tmp_path / "evil.csv").exists()
    assert not any(p.is_file() and "releases" not in p.parts for p in cache.rglob("*"))


def test_explicit_release_works_offline_from_cached_manifest(tmp_path, release, server, caplog):
    _, contents = release
    cache = tmp_path / "cache"
    download_dataset(DATASET, release=RELEASE, base_url=server.url, cache_dir=cache, **FAST)
    server.stop()
    summary = download_dataset(DATASET, release=RELEASE, base_url=server.url, cache_dir=cache, **FAST)
    assert summary.release == RELEASE and summary.transferred_bytes == 0
    with caplog.at_level(logging.WARNING, logger="abc_pipeline"):
        latest = download_dataset(DATASET, release="latest", base_url=server.url, cache_dir=cache, **FAST)
    assert latest.release == RELEASE and "newest cached release" in caplog.text
    with pytest.raises(DownloadError, match="no cached manifest"):
        download_dataset(DATASET, release="latest", base_url=server.url, cache_dir=tmp_path / "empty", **FAST)
    with pytest.raises(DownloadError, match="manifest"):
        download_dataset(DATASET, release=RELEASE, base_url=server.url, cache_dir=tmp_path / "empty", **FAST)


def test_latest_lists_releases(tmp_path, release, server):
    root, _ = release
    for old in ("20240330", "20250131"):
        manifest = json.loads((root / "releases" / RELEASE / "manifest.json").read_text())
        manifest["version"] = old
        (root / "releases" / old).mkdir()
        (root / "releases" / old / "manifest.json").write_text(json.dumps(manifest))
    assert list_releases(server.url) == ["20240330", "20250131", RELEASE]
    assert list_releases(root.as_uri()) == ["20240330", "20250131", RELEASE]
    summary = download_dataset(DATASET, release="latest", base_url=server.url, cache_dir=tmp_path / "c", **FAST)
    assert summary.release == RELEASE
    assert summary.manifest_path == tmp_path / "c" / "releases" / RELEASE / "manifest.json"


def test_file_url_copies_and_verifies(tmp_path, release):
    root, contents = release
    cache = tmp_path / "cache"
    summary = download_dataset(DATASET, release=RELEASE, base_url=root.as_uri(), cache_dir=cache, **FAST)
    _assert_mirrored(cache, contents)
    assert summary.transferred_bytes == sum(map(len, contents.values()))
    (root / EXPRESSION).write_bytes(b"x" * len(contents[EXPRESSION]))  # a tampered mirror fails verification
    with pytest.raises(DownloadError, match="checksum mismatch"):
        download_dataset(DATASET, release=RELEASE, base_url=root.as_uri(), cache_dir=tmp_path / "c2", **FAST)


def test_changed_file_is_reverified_and_fetched_again(tmp_path, release, server):
    _, contents = release
    cache = tmp_path / "cache"
    download_dataset(DATASET, release=RELEASE, base_url=server.url, cache_dir=cache, **FAST)
    (cache / GENE).write_bytes(bytes(len(contents[GENE])))  # same size, wrong bytes, new mtime
    os.utime(cache / GENE, ns=(1_000_000_000, 1_000_000_000))
    server.reset()
    summary = download_dataset(DATASET, release=RELEASE, base_url=server.url, cache_dir=cache, **FAST)
    assert summary.fetched == [GENE] and [rel for rel, _ in server.data_requests()] == [GENE]
    _assert_mirrored(cache, contents)


def test_unrecorded_or_complete_part_files_are_verified_without_transfer(tmp_path, release, server):
    _, contents = release
    cache = tmp_path / "cache"
    download_dataset(DATASET, release=RELEASE, base_url=server.url, cache_dir=cache, **FAST)
    (cache / VERIFIED_FILENAME).unlink()
    (cache / EXPRESSION).rename(cache / f"{EXPRESSION}.part")  # finished transfer, crashed before the rename
    server.reset()
    download_dataset(DATASET, release=RELEASE, base_url=server.url, cache_dir=cache, **FAST)
    assert server.requests == []
    _assert_mirrored(cache, contents)
    assert set(json.loads((cache / VERIFIED_FILENAME).read_text())) == set(contents)


def test_concurrent_runs_on_one_cache_fetch_each_file_once(tmp_path, release, server):
    _, contents = release
    cache = tmp_path / "cache"
    errors: list[BaseException] = []

    def run() -> None:
        try:
            download_dataset(DATASET, release=RELEASE, base_url=server.url, cache_dir=cache, **FAST)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert Counter(rel for rel, _ in server.data_requests()) == Counter(list(contents))
    _assert_mirrored(cache, contents)


@pytest.mark.parametrize(
    "url",
    ["ftp://example.org/abc/", "s3://allen-brain-cell-atlas/", "file://relative/dir", "/data/abc", "http:///no-host"],
)
def test_bad_base_url_refused(tmp_path, url):
    with pytest.raises(InputError, match="base-url"):
        download_dataset(DATASET, release=RELEASE, base_url=url, cache_dir=tmp_path / "cache", **FAST)
    assert check_base_url("https://allen-brain-cell-atlas.s3.us-west-2.amazonaws.com") == (
        "https://allen-brain-cell-atlas.s3.us-west-2.amazonaws.com/"
    )


def test_bad_release_and_dataset_refused(tmp_path, server):
    with pytest.raises(InputError, match="YYYYMMDD"):
        download_dataset(DATASET, release="2025-05-31", base_url=server.url, cache_dir=tmp_path, **FAST)
    with pytest.raises(InputError, match="unknown dataset"):
        download_dataset("Zhuang-ABCA-9", release=RELEASE, base_url=server.url, cache_dir=tmp_path, **FAST)


def test_cli_download_end_to_end(tmp_path, release, server, capsys):
    _, contents = release
    cache = tmp_path / "cache"
    argv = [
        "download",
        "--dataset",
        DATASET,
        "--release",
        "latest",
        "--base-url",
        server.url,
        "--cache",
        str(cache),
        "--jobs",
        "2",
        "--no-progress",
    ]
    assert main(argv) == 0
    _assert_mirrored(cache, contents)
    assert main(["download", "--release", RELEASE, "--base-url", "ftp://x/", "--cache", str(cache)]) == 2
    assert "scheme" in capsys.readouterr().err
