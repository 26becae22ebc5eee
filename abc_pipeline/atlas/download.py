"""Download the files a dataset needs from an ABC Atlas release into a local cache.

The cache is a byte-identical mirror of the bucket: every file lands at ``<cache>/<relative_path>``, the release
manifest at ``<cache>/releases/<ver>/manifest.json`` and the record of verified files at ``<cache>/_verified.json``.
The bucket root (``base_url``) may be the public S3 bucket, any ``http(s)://`` mirror or a ``file://`` tree with the
same layout (e.g. a synthetic release).

Guarantees:

* A file is only ever visible under its final name once its size and MD5 match the manifest: bytes go to
  ``<path>.part`` and are renamed after verification.
* An interrupted transfer resumes from its ``.part`` with an HTTP ``Range`` request (a server that ignores ranges
  answers 200 and the file restarts from byte 0). The MD5 of the kept prefix is recomputed before appending.
* Connection errors, timeouts, HTTP 408/429/5xx and short transfers are retried with exponential backoff; a checksum
  or size mismatch deletes the partial file and retries; other HTTP 4xx answers (e.g. 404) fail at once.
* Re-runs are instant: a file whose size and mtime match its ``_verified.json`` record is not read again. A final file
  without a record is verified by hashing it (no transfer when it matches).
* Several runs may share one cache (threads or processes, e.g. two datasets needing the same taxonomy files): each
  file is fetched under an exclusive lock ``<cache>/.locks/<relative_path with / as __>.lock``.
* Nothing is written through a link: partial files and lock files are opened with ``O_NOFOLLOW``; one that is a
  symbolic link (or anything but a regular file) is removed first, with a warning. Files are created with the
  permissions the umask allows, so a group can share a cache.

Release choice: an explicit release uses the cached manifest when present (works offline), otherwise fetches it.
``"latest"`` lists ``releases/`` (S3 ListObjectsV2 for http(s), the folder for ``file://``) and takes the newest;
when the listing fails (offline) the newest cached manifest is used with a warning, and without one the download
fails with a message asking for network access or an explicit release.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import queue
import re
import shutil
import stat
import threading
import time
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import requests
import urllib3
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from abc_pipeline import __version__
from abc_pipeline.atlas.manifest import (
    DEFAULT_BASE_URL,
    FileEntry,
    Manifest,
    cached_releases,
    check_release_name,
    get_profile,
    manifest_relative_path,
)
from abc_pipeline.errors import DownloadError, InputError
from abc_pipeline.fileio import MARKER_KEY, atomic_write_text, check_output, file_md5

try:  # POSIX advisory lock so that concurrent processes merge their records of verified files
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

SCHEMES = ("https", "http", "file")
VERIFIED_FILENAME = "_verified.json"
_RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_T = TypeVar("_T")


# ------------------------------------------------------------------------------------------------ options / result
@dataclass(frozen=True)
class TransferOptions:
    """How transfers behave.

    Attributes:
        retries: attempts per file (and per manifest / listing request) before giving up.
        backoff: seconds before the 2nd attempt; doubles each attempt up to ``max_backoff``.
        max_backoff: cap of the delay between attempts, seconds.
        timeout: connect and read timeout of one request, seconds.
        chunk_size: bytes read and written per step (peak memory ~ ``16 * chunk_size`` per parallel file).
    """

    retries: int = 5
    backoff: float = 1.0
    max_backoff: float = 60.0
    timeout: float = 60.0
    chunk_size: int = 1 << 20

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        return min(self.backoff * 2 ** (attempt - 1), self.max_backoff)


@dataclass
class DownloadSummary:
    """What ``download_dataset`` did.

    Attributes:
        dataset: profile name.
        release: release version used.
        manifest_path: the cached manifest.
        files: profile role -> local path of every file of the dataset (all verified).
        fetched: relative paths transferred (fully or resumed) in this run.
        skipped: relative paths already present and verified (no transfer).
        transferred_bytes: bytes received over the network / copied in this run.
        seconds: wall time of the whole call.
    """

    dataset: str
    release: str
    manifest_path: Path
    files: dict[str, Path]
    fetched: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    transferred_bytes: int = 0
    seconds: float = 0.0

    @property
    def paths(self) -> list[Path]:
        """Local paths of the dataset's files, in profile order."""
        return list(self.files.values())

    def write_json(self, path: Path) -> None:
        """Record the run (files by role, what was fetched or skipped) as JSON, atomically."""
        record = {
            **dataclasses.asdict(self),
            "manifest_path": str(self.manifest_path),
            "files": {role: str(p) for role, p in self.files.items()},
            MARKER_KEY: "download-summary",
        }
        check_output(Path(path), "download-summary", inputs=[self.manifest_path, *self.files.values()])
        atomic_write_text(Path(path), json.dumps(record, indent=1))


# ------------------------------------------------------------------------------------------------ errors (internal)
class _Transient(Exception):
    """A failure worth retrying with the partial file kept (connection, timeout, 5xx, short transfer)."""


class _Corrupt(Exception):
    """The bytes are wrong (MD5 / size / range mismatch); the partial file has been deleted; retry from scratch."""


class _Fatal(Exception):
    """A failure that retrying cannot fix (HTTP 4xx, missing local file)."""


# ------------------------------------------------------------------------------------------------ URLs
def check_base_url(base_url: str) -> str:
    """Validate a bucket root URL; returns it with exactly one trailing slash.

    Only ``https://``, ``http://`` and ``file:///absolute/path`` are accepted.
    """
    parts = urllib.parse.urlsplit(base_url)
    if parts.scheme not in SCHEMES:
        raise InputError(
            f"--base-url {base_url!r}: URL scheme {parts.scheme or '(none)'!r} is not supported; use https://, "
            f"http:// or file:///absolute/path (default: {DEFAULT_BASE_URL})"
        )
    if parts.scheme == "file" and parts.netloc not in ("", "localhost"):
        raise InputError(
            f"--base-url {base_url!r}: a file URL needs an absolute path, e.g. file:///data/abc (three slashes)"
        )
    if parts.scheme != "file" and not parts.netloc:
        raise InputError(f"--base-url {base_url!r}: no host name; expected e.g. {DEFAULT_BASE_URL}")
    return base_url.rstrip("/") + "/"


def _file_url_path(url: str) -> Path:
    """Local path of a ``file://`` URL."""
    return Path(urllib.request.url2pathname(urllib.parse.urlsplit(url).path))


def _is_file_url(url: str) -> bool:
    return urllib.parse.urlsplit(url).scheme == "file"


def _new_session() -> requests.Session:
    session = requests.Session()
    session.headers["User-Agent"] = f"abc-pipeline/{__version__}"
    session.headers["Accept-Encoding"] = "identity"  # byte-identical mirror: never let the server re-encode
    return session


# ------------------------------------------------------------------------------------------------ streaming sources
@contextlib.contextmanager
def _open_stream(
    url: str, offset: int, opts: TransferOptions, session: requests.Session | None
) -> Iterator[tuple[int, Iterator[bytes]]]:
    """Open ``url`` for reading from byte ``offset``.

    Yields ``(start, chunks)``: ``start`` is where the returned bytes begin (``offset``, or 0 when an HTTP server
    ignored the Range request) and ``chunks`` iterates ``bytes`` of at most ``opts.chunk_size``. Network failures
    surface as ``_Transient``, hopeless ones as ``_Fatal``.
    """
    if _is_file_url(url):
        path = _file_url_path(url)
        try:
            handle = open(path, "rb")
        except FileNotFoundError:
            raise _Fatal(f"{path} does not exist in the file:// release tree") from None
        except OSError as exc:
            raise _Transient(f"cannot open {path}: {exc}") from exc
        with handle:
            handle.seek(offset)
            yield offset, iter(lambda: handle.read(opts.chunk_size), b"")
        return

    assert session is not None
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        response = session.get(url, headers=headers, stream=True, timeout=(opts.timeout, opts.timeout))
    except requests.RequestException as exc:
        raise _Transient(f"GET {url}: {exc}") from exc
    with response:
        status = response.status_code
        if status in _RETRY_STATUS:
            raise _Transient(f"GET {url}: HTTP {status} {response.reason}")
        if status == 416:
            raise _Corrupt(
                f"GET {url}: server refused range bytes={offset}- (HTTP 416): the partial file is "
                "longer than the server's file"
            )
        if status not in (200, 206):
            raise _Fatal(f"GET {url}: HTTP {status} {response.reason}")
        start = 0
        if status == 206:
            match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
            if not match or int(match.group(1)) != offset:
                raise _Corrupt(
                    f"GET {url}: asked for bytes={offset}- but got Content-Range "
                    f"{response.headers.get('Content-Range')!r}"
                )
            start = offset
        yield start, _read_chunks(response, url, opts.chunk_size)


def _read_chunks(response: requests.Response, url: str, chunk_size: int) -> Iterator[bytes]:
    """Raw body bytes of a streamed response (no content decoding); network errors become ``_Transient``."""
    while True:
        try:
            chunk = response.raw.read(chunk_size, decode_content=False)
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise _Transient(f"GET {url}: connection lost ({exc})") from exc
        if not chunk:
            return
        yield chunk


# ------------------------------------------------------------------------------------------------ hashing writer
class _HashingWriter:
    """Write a file while a background thread MD5s the same bytes.

    ``hashlib`` releases the GIL on large buffers, so hashing overlaps with receiving and writing. ``keep`` bytes
    of an existing file are kept (and hashed first); the file is truncated after them.
    """

    _DONE = None

    def __init__(self, path: Path, keep: int, chunk_size: int) -> None:
        self._md5 = hashlib.md5()
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=16)
        self._thread = threading.Thread(target=self._hash_loop, name=f"md5-{path.name}", daemon=True)
        self._thread.start()
        self.size = 0
        self._file = open_no_follow(path, truncate=not keep)
        try:
            while self.size < keep:
                chunk = self._file.read(min(chunk_size, keep - self.size))
                if not chunk:
                    break
                self._queue.put(chunk)
                self.size += len(chunk)
            self._file.seek(self.size)
            self._file.truncate()
        except BaseException:
            self.close()
            raise

    def _hash_loop(self) -> None:
        while (chunk := self._queue.get()) is not self._DONE:
            self._md5.update(chunk)

    def write(self, chunk: bytes) -> None:
        self._file.write(chunk)
        self._queue.put(chunk)
        self.size += len(chunk)

    def close(self) -> str:
        """Close the file, finish hashing; returns the hex MD5 of everything in the file."""
        try:
            self._file.close()
        finally:
            self._queue.put(self._DONE)
            self._thread.join()
        return self._md5.hexdigest()


# ------------------------------------------------------------------------------------------------ verified records
class VerifiedRegistry:
    """``<cache>/_verified.json``: relative path -> ``{"size", "md5", "mtime_ns"}`` of files whose MD5 was checked.

    A file counts as verified while its size and mtime equal the record and the record's MD5 equals the manifest's.
    Writes are atomic (temporary file + rename) and serialised between threads (lock) and processes (``flock``),
    merging records written by others in the meantime.
    """

    def __init__(self, cache_dir: Path) -> None:
        self.path = Path(cache_dir) / VERIFIED_FILENAME
        self._lock = threading.Lock()
        self._records = self._read()

    def _read(self) -> dict[str, dict[str, int | str]]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            log.warning("%s is not valid JSON; files will be re-verified by MD5", self.path)
            return {}
        return data if isinstance(data, dict) else {}

    def is_verified(self, entry: FileEntry, path: Path) -> bool:
        """True when ``path`` is recorded with ``entry``'s MD5 and still has the recorded size and mtime."""
        record = self._records.get(entry.relative_path)
        if record is None:
            return False
        try:
            stat = path.stat()
        except FileNotFoundError:
            return False
        return record == {"size": entry.size, "md5": entry.md5, "mtime_ns": stat.st_mtime_ns} and (
            stat.st_size == entry.size
        )

    def reload(self) -> None:
        """Re-read the records (another process may have verified files meanwhile)."""
        with self._lock:
            self._records = self._read()

    def _update(self, change: Callable[[dict[str, dict[str, int | str]]], None]) -> None:
        with self._lock, _process_lock(self.path.with_name(VERIFIED_FILENAME + ".lock")):
            records = self._read()
            change(records)
            atomic_write_text(self.path, json.dumps(records, indent=1, sort_keys=True))
            self._records = records

    def record(self, entry: FileEntry, path: Path) -> None:
        """Record ``path`` (already checked against ``entry``) as verified."""
        stat = path.stat()
        value = {"size": stat.st_size, "md5": entry.md5, "mtime_ns": stat.st_mtime_ns}
        self._update(lambda records: records.__setitem__(entry.relative_path, value))

    def forget(self, relative_path: str) -> None:
        """Drop a record (the file is about to be replaced)."""
        if relative_path in self._records:
            self._update(lambda records: records.pop(relative_path, None))


def discard_non_regular(path: Path) -> None:
    """Remove ``path`` when it is a symbolic link or anything else but a regular file (never followed)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISREG(mode):
        return
    if stat.S_ISDIR(mode):
        raise DownloadError(f"{path} is a folder where the download keeps a file; remove it and run again")
    log.warning("%s is not a regular file (a link or special file); removing it, never writing through it", path)
    os.unlink(path)


def open_no_follow(path: Path, truncate: bool = False):
    """``path`` opened for reading and writing (``r+b``), created if absent (umask permissions), never through a
    link: a link or other non-regular file there is removed first, and one put there meanwhile fails the open
    (``ELOOP``)."""
    discard_non_regular(path)
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0) | (os.O_TRUNC if truncate else 0)
    fd = os.open(path, flags, 0o666)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise DownloadError(f"{path} is not a regular file; remove it and run again")
    return os.fdopen(fd, "r+b")


@contextlib.contextmanager
def _process_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock on ``path`` (created if needed, never through a link) between processes; a no-op
    without ``fcntl``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    with open_no_follow(path) as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _part_path(dest: Path) -> Path:
    """Temporary name of a file while it is being transferred."""
    return dest.with_name(dest.name + ".part")


# ------------------------------------------------------------------------------------------------ retries
def _with_retries(action: Callable[[], _T], what: str, opts: TransferOptions, fix: str) -> _T:
    """Run ``action`` until it succeeds, retrying ``_Transient`` / ``_Corrupt`` with backoff.

    Raises ``DownloadError`` naming ``what``, the last failure and ``fix`` when attempts run out or on ``_Fatal``.
    """
    attempts = max(1, opts.retries)
    attempt = 1
    while True:
        try:
            return action()
        except _Fatal as exc:
            raise DownloadError(f"{what}: {exc}. {fix}") from None
        except (_Transient, _Corrupt) as exc:
            if attempt >= attempts:
                raise DownloadError(f"{what}: failed after {attempts} attempts; last error: {exc}. {fix}") from None
            delay = opts.delay(attempt)
            log.warning("%s: attempt %d/%d failed (%s); retrying in %.1f s", what, attempt, attempts, exc, delay)
            time.sleep(delay)
            attempt += 1


# ------------------------------------------------------------------------------------------------ progress
class _Progress:
    """One overall byte bar (rate, ETA) shared by worker threads, plus optional per-file bars.

    The total is the number of bytes still expected to arrive; it is adjusted when a file resumes, restarts or is
    found already complete.
    """

    def __init__(self, total: int, enabled: bool, file_bars: bool, slots: int) -> None:
        self._lock = threading.Lock()
        self._file_bars = enabled and file_bars
        self._slots: queue.Queue[int] = queue.Queue()
        for slot in range(1, slots + 1):
            self._slots.put(slot)
        self.bar = tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc="download",
            disable=not enabled,
            dynamic_ncols=True,
            position=0,
        )

    def advance(self, n: int) -> None:
        with self._lock:
            self.bar.update(n)

    def adjust_total(self, delta: int) -> None:
        if delta:
            with self._lock:
                self.bar.total += delta
                self.bar.refresh()

    @contextlib.contextmanager
    def file_bar(self, name: str, size: int) -> Iterator[tqdm]:
        """Yields one file's byte bar (disabled, i.e. a no-op, without per-file bars)."""
        slot = self._slots.get()
        bar = tqdm(
            total=size,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=name[-40:],
            position=slot,
            leave=False,
            dynamic_ncols=True,
            disable=not self._file_bars,
        )
        try:
            yield bar
        finally:
            bar.close()
            self._slots.put(slot)

    def close(self) -> None:
        self.bar.close()


# ------------------------------------------------------------------------------------------------ one file
class _FileTask:
    """Fetch and verify one manifest entry into the cache (resume, MD5, rename, record)."""

    def __init__(
        self,
        entry: FileEntry,
        base_url: str,
        cache_dir: Path,
        registry: VerifiedRegistry,
        opts: TransferOptions,
        progress: _Progress,
    ) -> None:
        self.entry = entry
        self.url = entry.url_for(base_url)
        self.dest = entry.local_path(cache_dir)
        self.part = _part_path(self.dest)
        # one lock per file, outside the mirror tree, so that two processes never write the same .part
        self.lock = cache_dir / ".locks" / (entry.relative_path.replace("/", "__") + ".lock")
        self.registry = registry
        self.opts = opts
        self.progress = progress
        self.transferred = 0
        self._reserved = entry.size  # bytes of this file currently counted in the progress total
        self._session: requests.Session | None = None
        self._bar: tqdm | None = None

    def run(self) -> bool:
        """Make ``dest`` a verified copy; returns True if bytes were transferred, False if it was already there."""
        try:
            with contextlib.ExitStack() as stack:
                stack.enter_context(_process_lock(self.lock))
                self.registry.reload()
                if self.registry.is_verified(self.entry, self.dest) or self._existing_final_ok():
                    return False
                self.dest.parent.mkdir(parents=True, exist_ok=True)
                self._bar = stack.enter_context(self.progress.file_bar(self.entry.relative_path, self.entry.size))
                if not _is_file_url(self.url):
                    self._session = stack.enter_context(_new_session())
                _with_retries(
                    self._attempt,
                    f"{self.entry.relative_path} from {self.url}",
                    self.opts,
                    fix="Run the same command again to resume; check the network, --base-url and the release",
                )
                self.registry.record(self.entry, self.dest)
            log.info("fetched %s (%s bytes transferred)", self.entry.relative_path, f"{self.transferred:,}")
            return True
        except OSError as exc:
            raise DownloadError(
                f"{self.entry.relative_path}: cannot write {exc.filename or self.part}: {exc.strerror or exc}; "
                "check free space and permissions of --cache"
            ) from None
        finally:
            self.progress.adjust_total(-self._reserved)
            self._reserved = 0

    def _existing_final_ok(self) -> bool:
        """True if the final file exists and matches the manifest (hashing it if it is not on record)."""
        if not self.dest.exists():
            return False
        stat = self.dest.stat()
        if stat.st_size == self.entry.size:
            log.info("verifying existing %s (%s bytes) by MD5", self.entry.relative_path, f"{stat.st_size:,}")
            if file_md5(self.dest, self.opts.chunk_size) == self.entry.md5:
                self.registry.record(self.entry, self.dest)
                return True
        log.warning(
            "%s exists but does not match the manifest (size or MD5); downloading it again", self.entry.relative_path
        )
        self.registry.forget(self.entry.relative_path)
        self.dest.unlink()
        return False

    def _reserve(self, remaining: int) -> None:
        self.progress.adjust_total(remaining - self._reserved)
        self._reserved = remaining

    def _attempt(self) -> None:
        """One transfer attempt into ``.part`` followed by verification and the rename."""
        size, expected = self.entry.size, self.entry.md5
        discard_non_regular(self.part)
        offset = self.part.stat().st_size if self.part.exists() else 0
        if offset > size:
            log.warning("%s is longer than the manifest size; starting again", self.part)
            self.part.unlink()
            offset = 0
        if offset == size:
            writer = _HashingWriter(self.part, keep=offset, chunk_size=self.opts.chunk_size)
        else:
            with _open_stream(self.url, offset, self.opts, self._session) as (start, chunks):
                if offset:
                    log.info(
                        "%s: resuming at byte %s%s",
                        self.entry.relative_path,
                        f"{offset:,}",
                        "" if start == offset else " refused by the server; restarting at 0",
                    )
                self._reserve(size - start)
                writer = _HashingWriter(self.part, keep=start, chunk_size=self.opts.chunk_size)
                assert self._bar is not None
                self._bar.reset()
                self._bar.update(start)
                try:
                    for chunk in chunks:
                        writer.write(chunk)
                        self.transferred += len(chunk)
                        self._reserved -= len(chunk)
                        self.progress.advance(len(chunk))
                        self._bar.update(len(chunk))
                        if writer.size > size:
                            break
                except BaseException:
                    writer.close()
                    raise
        md5 = writer.close()
        if writer.size < size:
            raise _Transient(f"transfer ended at byte {writer.size:,} of {size:,}")
        if writer.size != size or md5 != expected:
            self.part.unlink(missing_ok=True)
            raise _Corrupt(
                f"checksum mismatch: got {writer.size:,} bytes with MD5 {md5}, the manifest says {size:,} bytes "
                f"with MD5 {expected}; partial file deleted"
            )
        os.replace(self.part, self.dest)


# ------------------------------------------------------------------------------------------------ releases / manifest
def _get_bytes(url: str, opts: TransferOptions, session: requests.Session | None) -> bytes:
    with _open_stream(url, 0, opts, session) as (_, chunks):
        return b"".join(chunks)


def list_releases(base_url: str, opts: TransferOptions | None = None) -> list[str]:
    """Release versions under ``<base_url>releases/``, oldest first.

    ``http(s)``: S3 ListObjectsV2 (``?list-type=2&prefix=releases/&delimiter=/``, following continuation tokens);
    ``file://``: the folders of ``releases/`` that hold a ``manifest.json``. Raises ``DownloadError`` when the
    listing cannot be obtained.
    """
    opts = opts or TransferOptions()
    base_url = check_base_url(base_url)
    if _is_file_url(base_url):
        root = _file_url_path(base_url) / "releases"
        if not root.is_dir():
            raise DownloadError(f"{root} does not exist; is {base_url} the root of an ABC release tree?")
        names = [p.parent.name for p in root.glob("*/manifest.json")]
    else:
        names = _list_s3_releases(base_url, opts)
    return sorted(n for n in set(names) if re.fullmatch(r"\d{8}", n))


def _list_s3_releases(base_url: str, opts: TransferOptions) -> list[str]:
    names: list[str] = []
    token: str | None = None
    with _new_session() as session:
        while True:
            query = {"list-type": "2", "prefix": "releases/", "delimiter": "/"}
            if token:
                query["continuation-token"] = token
            url = f"{base_url}?{urllib.parse.urlencode(query)}"
            body = _with_retries(
                functools.partial(_get_bytes, url, opts, session),
                f"listing releases at {url}",
                opts,
                fix="Check the network and --base-url, or pass an explicit --release YYYYMMDD",
            )
            try:
                tree = ET.fromstring(body)
            except ET.ParseError as exc:
                raise DownloadError(
                    f"listing {url} did not return S3 ListObjectsV2 XML ({exc}); this mirror cannot "
                    "list releases: pass an explicit --release YYYYMMDD"
                ) from None
            for element in tree.iter():
                tag = element.tag.rsplit("}", 1)[-1]
                if tag in ("Prefix", "Key") and element.text and element.text.startswith("releases/"):
                    parts = element.text.split("/")
                    if len(parts) >= 2 and parts[1]:
                        names.append(parts[1])
            truncated = next((e.text for e in tree.iter() if e.tag.endswith("IsTruncated")), "false")
            token = next((e.text for e in tree.iter() if e.tag.endswith("NextContinuationToken")), None)
            if truncated != "true" or not token:
                return names


def resolve_release(release: str, base_url: str, cache_dir: Path, opts: TransferOptions | None = None) -> str:
    """Turn ``release`` (``YYYYMMDD`` or ``latest``) into a version.

    ``latest`` lists the releases online; if that fails, the newest manifest in ``cache_dir`` is used with a
    warning; without one a ``DownloadError`` asks for network access or an explicit release.
    """
    if release != "latest":
        return check_release_name(release)
    opts = opts or TransferOptions()
    try:
        versions = list_releases(base_url, dataclasses.replace(opts, retries=min(opts.retries, 2)))
    except DownloadError as exc:
        cached = cached_releases(cache_dir)
        if not cached:
            raise DownloadError(
                f"cannot find the latest release ({exc}) and {cache_dir} holds no cached manifest; "
                "connect to the network or pass an explicit --release YYYYMMDD"
            ) from None
        log.warning("cannot list releases online (%s); using the newest cached release %s", exc, cached[-1])
        return cached[-1]
    if not versions:
        raise DownloadError(f"no releases found under {check_base_url(base_url)}releases/; check --base-url")
    log.info("latest release at %s: %s", base_url, versions[-1])
    return check_release_name(versions[-1])


def load_manifest(
    release: str, base_url: str, cache_dir: Path, opts: TransferOptions | None = None
) -> tuple[Manifest, Path]:
    """The manifest of ``release`` (a version, not ``latest``) and its cached path.

    Uses ``<cache>/releases/<ver>/manifest.json`` when present (no network), else fetches
    ``<base_url>releases/<ver>/manifest.json`` and stores it atomically in the cache.
    """
    opts = opts or TransferOptions()
    relative = manifest_relative_path(check_release_name(release))
    path = Path(cache_dir) / relative
    if path.exists():
        log.info("using cached manifest %s", path)
        manifest = Manifest.from_path(path)
    else:
        url = check_base_url(base_url) + relative
        session = None if _is_file_url(url) else _new_session()
        try:
            body = _with_retries(
                lambda: _get_bytes(url, opts, session),
                f"release manifest {url}",
                opts,
                fix=f"Check that release {release} exists (try --release latest) and --base-url",
            )
        finally:
            if session is not None:
                session.close()
        try:
            manifest = Manifest(json.loads(body), source=url)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DownloadError(f"release manifest {url} is not valid JSON ({exc}); check --base-url") from None
        atomic_write_text(path, body.decode())
        log.info("fetched manifest %s -> %s", url, path)
    if manifest.version != release:
        raise InputError(
            f"{path}: manifest field 'version' is {manifest.version!r} but release {release} was asked "
            "for; delete the file to fetch it again"
        )
    return manifest, path


# ------------------------------------------------------------------------------------------------ entry point
def download_entries(
    entries: dict[str, FileEntry],
    *,
    base_url: str,
    cache_dir: Path,
    jobs: int = 4,
    opts: TransferOptions | None = None,
    progress: bool = True,
    file_bars: bool = False,
) -> tuple[list[str], list[str], int]:
    """Fetch manifest entries into ``cache_dir`` in parallel.

    Returns ``(fetched, skipped, transferred_bytes)`` with relative paths. Raises ``DownloadError`` listing every
    file that failed after the others have finished (their partial files stay for the next run to resume).
    """
    opts = opts or TransferOptions()
    base_url = check_base_url(base_url)
    cache_dir = Path(cache_dir)
    unique = {entry.relative_path: entry for entry in entries.values()}
    for entry in unique.values():
        entry.local_path(cache_dir)  # refuse '..' / absolute paths before any transfer
    registry = VerifiedRegistry(cache_dir)
    skipped = [rel for rel, entry in unique.items() if registry.is_verified(entry, entry.local_path(cache_dir))]
    for rel in skipped:
        log.debug("already verified: %s", rel)
    pending = [entry for entry in unique.values() if entry.relative_path not in skipped]
    _check_free_space(pending, cache_dir)
    log.info(
        "%d files: %d already verified, %d to fetch or check (%s bytes)",
        len(unique),
        len(skipped),
        len(pending),
        f"{sum(e.size for e in pending):,}",
    )
    fetched: list[str] = []
    failures: list[str] = []
    transferred = 0
    if not pending:
        return fetched, skipped, transferred
    bar = _Progress(sum(e.size for e in pending), progress, file_bars, slots=max(1, jobs))
    try:
        with (
            logging_redirect_tqdm() if progress else contextlib.nullcontext(),
            ThreadPoolExecutor(max_workers=max(1, jobs), thread_name_prefix="download") as pool,
        ):
            tasks = {
                pool.submit(task.run): task
                for task in (_FileTask(e, base_url, cache_dir, registry, opts, bar) for e in pending)
            }
            for future in as_completed(tasks):
                task = tasks[future]
                transferred += task.transferred
                try:
                    (fetched if future.result() else skipped).append(task.entry.relative_path)
                except DownloadError as exc:
                    log.error("%s", exc)
                    failures.append(str(exc))
    finally:
        bar.close()
    if failures:
        raise DownloadError(f"{len(failures)} of {len(unique)} files failed:\n  " + "\n  ".join(failures))
    return fetched, skipped, transferred


def _check_free_space(pending: list[FileEntry], cache_dir: Path) -> None:
    """Fail early when the cache filesystem cannot hold the remaining bytes."""
    needed = 0
    for entry in pending:
        part = _part_path(entry.local_path(cache_dir))
        needed += max(0, entry.size - (part.lstat().st_size if part.is_file() and not part.is_symlink() else 0))
    probe = cache_dir
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed > free:
        raise DownloadError(
            f"--cache {cache_dir} has {free / 1e9:.1f} GB free but the remaining files need "
            f"{needed / 1e9:.1f} GB; free space or choose a cache on a larger filesystem"
        )


def download_dataset(
    dataset: str,
    *,
    release: str = "latest",
    base_url: str = DEFAULT_BASE_URL,
    cache_dir: Path,
    jobs: int = 4,
    retries: int = 5,
    progress: bool = True,
    backoff: float = 1.0,
    timeout: float = 60.0,
    chunk_size: int = 1 << 20,
    file_bars: bool = False,
) -> DownloadSummary:
    """Download and verify every file of a dataset profile into ``<cache_dir>/<relative_path>``.

    Args:
        dataset: profile name, e.g. ``MERFISH-C57BL6J-638850`` or ``Zhuang-ABCA-1``.
        release: ``YYYYMMDD`` (offline from a cached manifest) or ``latest`` (lists releases online).
        base_url: bucket root, ``https://``, ``http://`` or ``file://``.
        cache_dir: local mirror root.
        jobs: files transferred in parallel.
        retries: attempts per file before giving up.
        progress: show the overall progress bar (bytes, rate, ETA).
        backoff: seconds before the second attempt, doubling afterwards (capped at 60 s).
        timeout: connect / read timeout of a request, seconds.
        chunk_size: bytes per read / write.
        file_bars: also show one bar per file in flight.

    Returns:
        A ``DownloadSummary`` (role -> local path, fetched / skipped files, bytes transferred, seconds).
    """
    started = time.perf_counter()
    base_url = check_base_url(base_url)
    if jobs < 1 or retries < 1:
        raise InputError(f"--jobs ({jobs}) and --retries ({retries}) must be at least 1")
    profile = get_profile(dataset)
    cache_dir = Path(cache_dir)
    opts = TransferOptions(retries=retries, backoff=backoff, timeout=timeout, chunk_size=chunk_size)
    version = resolve_release(release, base_url, cache_dir, opts)
    manifest, manifest_path = load_manifest(version, base_url, cache_dir, opts)
    entries = profile.entries(manifest)
    fetched, skipped, transferred = download_entries(
        entries, base_url=base_url, cache_dir=cache_dir, jobs=jobs, opts=opts, progress=progress, file_bars=file_bars
    )
    summary = DownloadSummary(
        dataset=dataset,
        release=version,
        manifest_path=manifest_path,
        files={role: entry.local_path(cache_dir) for role, entry in entries.items()},
        fetched=sorted(fetched),
        skipped=sorted(skipped),
        transferred_bytes=transferred,
        seconds=time.perf_counter() - started,
    )
    log.info(
        "%s release %s: %d files fetched, %d already verified, %s bytes in %.1f s",
        dataset,
        version,
        len(summary.fetched),
        len(summary.skipped),
        f"{transferred:,}",
        summary.seconds,
    )
    return summary
