"""Atomic file writes: a temporary file in the same folder, fsync, os.replace (a reader sees the old file or the
new one, never half of one). Text, bytes, strict JSON (numpy / torch values converted, non-finite floats as null) and
npz archives of plain arrays."""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Union

import numpy as np

from diffgen_fast.errors import InputError

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


def _jsonable(obj: Any) -> Any:
    """A copy of ``obj`` that ``json.dumps(allow_nan=False)`` accepts: numpy/torch values become Python values,
    paths become strings and non-finite floats become ``None``."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "detach") and hasattr(obj, "cpu"):  # a torch tensor, without importing torch
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, (datetime.datetime, datetime.date)):
        return obj.isoformat()
    raise InputError(f"write_json_atomic: cannot serialise a value of type {type(obj).__name__}")


def write_json_atomic(obj: Any, path: PathLike, *, indent: int = 2) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically.

    numpy scalars and arrays, torch tensors and paths are converted; NaN and infinities are written as ``null`` so
    the file is strict JSON that any reader accepts.
    """
    text = json.dumps(_jsonable(obj), indent=indent, allow_nan=False) + "\n"
    return write_text_atomic(text, path)


def write_npz_atomic(arrays: Mapping[str, Any], path: PathLike) -> Path:
    """np.savez of plain arrays (no object arrays, so np.load(allow_pickle=False) reads it), atomically."""
    with _atomic_target(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})
    return Path(path)
