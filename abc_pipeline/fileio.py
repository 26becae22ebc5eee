"""Small file helpers shared by every step: checksums and atomic writes.

Every output is written under a temporary name in its destination folder and renamed when complete, so a
killed step never leaves a half-written file or store behind and never corrupts a finished one.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Iterator


def file_md5(path: Path, chunk_size: int = 1 << 20) -> str:
    """MD5 hex digest of a file, read in ``chunk_size``-byte pieces (the ABC manifests' ``file_hash``)."""
    md5 = hashlib.md5()
    with open(path, "rb") as handle:
        while piece := handle.read(chunk_size):
            md5.update(piece)
    return md5.hexdigest()


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def replace_tree(finished: Path, out: Path) -> None:
    """Move the complete file or directory ``finished`` to ``out``; an existing ``out`` is swapped away first,
    then deleted. Both paths must be on one file system (create ``finished`` next to ``out``)."""
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out, old)
        os.rename(finished, out)
        _remove(old)
    else:
        os.rename(finished, out)


@contextlib.contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """Write an output under a temporary name next to it; it replaces ``out`` only if the block succeeds.

    Yields a fresh path ``.<name>.tmp-<random>`` in ``out``'s folder (not created: make a file or a directory
    there; scratch space may use the same prefix). Leftovers of earlier runs that were killed (``.<name>.tmp-*``,
    ``.<name>.old-*``) are removed first; on error the temporary path is removed and ``out`` is untouched.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in [*out.parent.glob(f".{out.name}.tmp-*"), *out.parent.glob(f".{out.name}.old-*")]:
        _remove(stale)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
        replace_tree(tmp, out)
    finally:
        if tmp.exists():
            _remove(tmp)
