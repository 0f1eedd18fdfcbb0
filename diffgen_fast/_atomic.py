"""Atomic file writes: a temporary file in the same folder, fsync, os.replace (a reader sees the old file or the
new one, never half of one)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Union

PathLike = Union[str, os.PathLike]


@contextlib.contextmanager
def _atomic_target(path: PathLike) -> Iterator[str]:
    """Yield a temporary path next to ``path``; on success fsync it and move it over ``path``, else remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, _file_mode(path))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _file_mode(path: Path) -> int:
    # mkstemp creates 0600; keep the mode of the file being replaced, else the usual 0644.
    try:
        return os.stat(path).st_mode & 0o777
    except OSError:
        return 0o644


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable on POSIX; not possible (nor needed) everywhere.
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_text_atomic(text: str, path: PathLike) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically: temp file in the same folder, fsync, ``os.replace``."""
    with _atomic_target(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    return Path(path)


def write_bytes_atomic(data: bytes, path: PathLike) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with _atomic_target(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
    return Path(path)
