"""File helpers shared by every step: checksums, atomic writes and the one guard every output goes through.

Every output is written under a temporary name in its destination folder and renamed when complete, so a
killed step never leaves a half-written file or store behind and never corrupts a finished one.

The guard (:func:`check_output`, applied by :func:`staged_output` and :func:`claim_directory`) decides whether a
command may write a path at all:

* an output may not be, contain or lie inside any input of the command;
* an existing path is replaced only when it carries this project's marker for the same kind of artifact
  (directories: the file ``.abc-pipeline.json``; files: an ``abc_pipeline_artifact`` HDF5 attribute or JSON
  key); one of another kind needs ``overwrite`` (``--overwrite``); anything else (a user's folder or file, a
  symbolic link) is never replaced. Empty folders count as free.

Temporary names carry the host and process id of their writer (``.<name>.tmp-<host>-<pid>-<random>``); the
leftovers of killed runs are removed only when that process is gone, so concurrent runs never delete each
other's work. Files are created with the permissions the umask allows (shared caches stay shared).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from abc_pipeline.errors import InputError

log = logging.getLogger(__name__)

#: Marker file of every directory artifact (kind, writer, Zarr chunk counts).
MARKER_NAME = ".abc-pipeline.json"
#: HDF5 attribute / JSON key naming the kind of a file artifact.
MARKER_KEY = "abc_pipeline_artifact"
_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]
_TEMP_OWNER = re.compile(r"(?P<host>[0-9a-f]{6})-(?P<pid>\d+)-[0-9a-f]{8}")
#: Directories written by earlier versions (no marker): kind -> (names that must all be present, names allowed).
_LEGACY_FOLDERS = {
    "train-run": (
        {"last.pt"},
        {"last.pt", "checkpoint.pt", "history.tsv", "metrics.json", "predictions.zarr", "evaluation"},
    ),
    "synthetic-release": ({"releases"}, {"releases", "metadata", "expression_matrices", "image_volumes"}),
}


def file_md5(path: Path, chunk_size: int = 1 << 20) -> str:
    """MD5 hex digest of a file, read in ``chunk_size``-byte pieces (the ABC manifests' ``file_hash``)."""
    md5 = hashlib.md5()
    with open(path, "rb") as handle:
        while piece := handle.read(chunk_size):
            md5.update(piece)
    return md5.hexdigest()


def temporary_path(out: Path, tag: str = "tmp") -> Path:
    """A fresh name ``.<name>.<tag>-<host>-<pid>-<random>`` next to ``out`` (not created)."""
    out = Path(out)
    return out.parent / f".{out.name}.{tag}-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _owner_alive(suffix: str) -> bool:
    """Whether the writer encoded in a temporary name's ``suffix`` may still run (unknown owners: yes)."""
    match = _TEMP_OWNER.match(suffix)
    if match is None or match["host"] != _HOST:
        return True  # another machine's (shared file system) or an unknown naming: never ours to clean
    try:
        os.kill(int(match["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a live process of another user
        return True
    return True


def remove_stale_temporaries(out: Path) -> None:
    """Remove ``.<name>.tmp-*`` / ``.<name>.old-*`` next to ``out`` whose writing process has ended."""
    out = Path(out)
    for tag in ("tmp", "old"):
        prefix = f".{out.name}.{tag}-"
        for stale in out.parent.glob(glob_escape(prefix) + "*"):
            if not _owner_alive(stale.name[len(prefix) :]):
                log.info("removing %s, left by a killed run", stale)
                _remove(stale)


def glob_escape(text: str) -> str:
    """``text`` with glob metacharacters escaped."""
    return re.sub(r"([*?\[])", r"[\1]", text)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same folder and a rename (umask permissions;
    a link at the temporary name is never followed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def replace_tree(finished: Path, out: Path) -> None:
    """Move the complete file or directory ``finished`` to ``out``; an existing ``out`` is swapped away first,
    then deleted. Both paths must be on one file system (create ``finished`` next to ``out``). Safe against a
    concurrent run replacing ``out`` at the same moment (the last one wins)."""
    for _ in range(10):
        old = None
        if os.path.lexists(out):
            old = temporary_path(out, "old")
            try:
                os.rename(out, old)
            except FileNotFoundError:  # another run moved it away just now
                old = None
        try:
            os.rename(finished, out)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.EISDIR, errno.ENOTDIR):
                raise
            continue  # another run put its output in place between our two renames: swap that one away too
        finally:
            if old is not None:
                _remove(old)
        return
    raise OSError(errno.EEXIST, "another run keeps replacing this output; run one at a time", str(out))


# ------------------------------------------------------------------------------------------------ markers
def write_marker(folder: Path, kind: str, **extra) -> None:
    """Mark ``folder`` as an artifact of ``kind`` (``extra``: more JSON fields, e.g. Zarr chunk counts)."""
    from abc_pipeline import __version__

    atomic_write_text(
        Path(folder) / MARKER_NAME,
        json.dumps({"kind": kind, "created_by": f"abc_pipeline {__version__}", **extra}, indent=1, sort_keys=True),
    )


def read_marker(folder: Path) -> dict | None:
    """The marker of an artifact folder, or None (no marker, or not readable as one)."""
    try:
        data = json.loads((Path(folder) / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("kind"), str) else None


def _legacy_kind(folder: Path) -> str | None:
    """Kind of an artifact folder written before markers existed (recognised by its exact layout)."""
    try:
        attrs = json.loads((folder / ".zattrs").read_text()).get("abc_pipeline", {})
    except (OSError, ValueError, AttributeError):
        attrs = {}
    for kind in ("raster", "predictions"):
        if isinstance(attrs, dict) and kind in attrs:
            return kind
    if (folder / "uns" / "abc_pipeline" / "assemble").is_dir() and (folder / "X").is_dir():
        return "cells"
    names = {p.name for p in folder.iterdir()}
    for kind, (required, allowed) in _LEGACY_FOLDERS.items():
        if required <= names <= allowed:
            return kind
    return None


def artifact_kind(path: Path) -> str | None:
    """The kind of artifact of this project at ``path`` (``"raster"``, ``"cells"``, ...), or None."""
    path = Path(path)
    if path.is_symlink() or not path.exists():
        return None
    if path.is_dir():
        marker = read_marker(path)
        return marker["kind"] if marker else _legacy_kind(path)
    with open(path, "rb") as handle:
        head = handle.read(8)
    if head == b"\x89HDF\r\n\x1a\n":
        import h5py

        try:
            with h5py.File(path, "r") as f:
                kind = f.attrs.get(MARKER_KEY)
        except OSError:
            return None
        return kind.decode() if isinstance(kind, bytes) else kind if isinstance(kind, str) else None
    if head.lstrip().startswith(b"{") and path.stat().st_size < (16 << 20):
        try:
            kind = json.loads(path.read_text()).get(MARKER_KEY)
        except (OSError, ValueError, AttributeError):
            return None
        return kind if isinstance(kind, str) else None
    return None


# ------------------------------------------------------------------------------------------------ the guard
def check_disjoint(out: Path, inputs: Iterable[Path | str | None]) -> None:
    """:class:`InputError` when ``out`` is, contains or lies inside one of ``inputs`` (None entries ignored)."""
    target = Path(out).resolve()
    for item in inputs:
        if item is None:
            continue
        source = Path(item).resolve()
        if target == source:
            relation = "is the input"
        elif source.is_relative_to(target):
            relation = "contains the input"
        elif target.is_relative_to(source):
            relation = "lies inside the input"
        else:
            continue
        raise InputError(
            f"output {out} {relation} {item}; writing it would destroy the input. Choose an --out outside every input"
        )


def check_output(out: Path, kind: str, *, inputs: Iterable[Path | str | None] = (), overwrite: bool = False) -> None:
    """The guard of every output of ``kind`` (module docstring); raises :class:`InputError` naming the fix."""
    out = Path(out)
    check_disjoint(out, inputs)
    if not os.path.lexists(out):
        return
    if out.is_symlink():
        raise InputError(
            f"output {out} is a symbolic link (to {os.readlink(out)}); refusing to replace it. Give the "
            "real path, or remove the link yourself"
        )
    if out.is_dir() and not any(out.iterdir()):
        return  # an empty folder holds nothing to lose
    found = artifact_kind(out)
    if found == kind:
        return
    if found is None:
        held = f" (it holds {', '.join(sorted(p.name for p in out.iterdir())[:3])}, ...)" if out.is_dir() else ""
        raise InputError(
            f"output {out} already exists and was not written by abc-pipeline{held}; refusing to "
            f"replace it (even with --overwrite). Choose another --out, or move {out} away yourself"
        )
    if not overwrite:
        raise InputError(
            f"output {out} already exists and holds an abc-pipeline {found} artifact, not a {kind}; "
            "pass --overwrite to replace it, or choose another --out"
        )


@contextlib.contextmanager
def staged_output(
    out: Path, kind: str | None = None, *, inputs: Iterable[Path | str | None] = (), overwrite: bool = False
) -> Iterator[Path]:
    """Write an output under a temporary name next to it; it replaces ``out`` only if the block succeeds.

    ``kind``: the artifact kind of a command's output (``"cells"``, ``"raster"``, ``"predictions"``,
    ``"annotated"``, ...): :func:`check_output` runs with ``inputs`` and ``overwrite`` before the block and
    again before the rename (a concurrent run may have written ``out`` meanwhile), and a directory output
    gets its marker with the chunk counts of its Zarr arrays (``integrity.chunk_counts``; readers verify
    them). ``kind=None`` is for parts of an output that the command has claimed already (the files of a
    training run folder). File artifacts carry their kind themselves (``MARKER_KEY``).

    Yields a fresh path ``.<name>.tmp-<host>-<pid>-<random>`` in ``out``'s folder (not created: make a file
    or a directory there; scratch space may use the same prefix). Leftovers of killed runs are removed first
    (only those whose process has ended); on error the temporary path is removed and ``out`` is untouched.
    A failed write surfaces as an ``OSError`` naming ``out`` when the error names no file, and failures of
    writers that hide the cause (torch, HDF5) on a full disk as ``OSError(ENOSPC)``.
    """
    out = Path(out)
    if kind is not None:
        check_output(out, kind, inputs=inputs, overwrite=overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    tmp = temporary_path(out)
    try:
        yield tmp
        if kind is not None:
            if tmp.is_dir():
                from abc_pipeline.integrity import chunk_counts

                write_marker(tmp, kind, chunks=chunk_counts(tmp))
            check_output(out, kind, overwrite=overwrite)
        replace_tree(tmp, out)
    except Exception as exc:
        plain = isinstance(exc, OSError) and exc.errno is not None and (exc.errno != errno.ENOSPC or exc.filename)
        if not plain and _disk_full(exc, out.parent):  # incl. HDF5's ENOSPC without a file name
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out)) from exc
        if isinstance(exc, OSError) and exc.filename is None:
            raise OSError(exc.errno, exc.strerror or str(exc), str(out)) from exc
        raise
    finally:
        if os.path.lexists(tmp):
            _remove(tmp)


def _disk_full(exc: BaseException, folder: Path) -> bool:
    """Whether ``exc`` (or its causes) reports a full disk: ENOSPC, HDF5's ``errno = 28``, or a writer's bare
    "write failed" while ``folder``'s file system has under 1% (or 16 MiB) left."""
    text = ""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return True
        text += f" {exc}"
        exc = exc.__cause__ or exc.__context__
    if "No space left on device" in text or "errno = 28" in text:
        return True
    if "write failed" in text:
        usage = shutil.disk_usage(folder)
        return usage.free < max(16 << 20, usage.total // 100)
    return False


def claim_directory(out: Path, kind: str, *, inputs: Iterable[Path | str | None] = ()) -> Path:
    """Guard and mark a folder that a command fills file by file (a training run, a report); returns it.

    Refuses what :func:`check_output` refuses and a folder holding another kind of artifact; files in the
    folder are then written with ``staged_output(path)`` one by one.
    """
    out = Path(out)
    found = artifact_kind(out) if out.is_dir() and not out.is_symlink() and any(out.iterdir()) else None
    if found is not None and found != kind:
        raise InputError(
            f"output folder {out} holds an abc-pipeline {found} artifact, not a {kind}; choose another --out"
        )
    check_output(out, kind, inputs=inputs)
    out.mkdir(parents=True, exist_ok=True)
    if read_marker(out) is None:
        write_marker(out, kind)
    return out
