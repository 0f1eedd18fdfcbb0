"""Archive members (``.npz`` arrays, zip entries, tar entries): safe member names and the size / expansion limits.

A member is refused when its declared uncompressed size exceeds a limit, so that a small file that expands hugely (a
"zip bomb") is never read whole: :data:`MAX_MEMBER_BYTES` (4 GiB), overridden by the environment variable
``DIFFGEN_FAST_MAX_MEMBER_BYTES`` and by the ``max_member_bytes=`` keyword of the archive loaders; and a member of
more than 64 MiB that expands more than :data:`MAX_EXPANSION` (100) times its compressed size is refused whatever the
limit (``DIFFGEN_FAST_MAX_EXPANSION`` raises it), so a 3 GB member packed in 3 MB is refused by default.
"""

from __future__ import annotations

import os
import re
import zipfile
import zlib
from typing import Any

from diffgen_fast.data._checks import _is_int
from diffgen_fast.errors import DataFormatError, InputError

#: Largest declared (uncompressed) size in bytes of one archive member (.npz array, zip or tar entry) that is read;
#: larger members are refused. Overridden by the environment variable :data:`MAX_MEMBER_BYTES_ENV` and by the
#: ``max_member_bytes=`` keyword of the loaders.
MAX_MEMBER_BYTES = 4 << 30
#: Environment variable that overrides :data:`MAX_MEMBER_BYTES` (a positive integer number of bytes).
MAX_MEMBER_BYTES_ENV = "DIFFGEN_FAST_MAX_MEMBER_BYTES"
#: Largest expansion (uncompressed size / compressed size) accepted for an archive member of more than
#: :data:`EXPANSION_FREE_BYTES`: a 3 GB member packed in 3 MB (a "zip bomb") is refused under the default size limit
#: too. Overridden by the environment variable :data:`MAX_EXPANSION_ENV`.
MAX_EXPANSION = 100
MAX_EXPANSION_ENV = "DIFFGEN_FAST_MAX_EXPANSION"
#: Members up to this size are never refused for their expansion alone.
EXPANSION_FREE_BYTES = 64 << 20

_DRIVE = re.compile(r"^[A-Za-z]:")


def _check_member_name(member: str, where: str, name: str) -> None:
    parts = re.split(r"[\\/]", member)
    if member.startswith(("/", "\\")) or _DRIVE.match(member) or ".." in parts or "\x00" in member:
        raise DataFormatError(
            f"{name}: unsafe entry {member!r} in {where}; expected relative member names without '..' components"
        )


def _member_limit(max_member_bytes: Any = None) -> int:
    """The member size limit: the keyword if given, else the environment variable, else :data:`MAX_MEMBER_BYTES`."""
    if max_member_bytes is not None:
        if not _is_int(max_member_bytes) or max_member_bytes < 1:
            raise InputError(
                f"max_member_bytes: expected a positive int number of bytes or None, got {max_member_bytes!r}"
            )
        return int(max_member_bytes)
    env = os.environ.get(MAX_MEMBER_BYTES_ENV, "").strip()
    if env:
        try:
            value = int(env)
        except ValueError:
            value = 0
        if value < 1:
            raise InputError(f"{MAX_MEMBER_BYTES_ENV}: expected a positive integer number of bytes, got {env!r}")
        return value
    return int(MAX_MEMBER_BYTES)


def _max_expansion() -> float:
    env = os.environ.get(MAX_EXPANSION_ENV, "").strip()
    if not env:
        return float(MAX_EXPANSION)
    try:
        value = float(env)
    except ValueError:
        value = 0.0
    if not value >= 1:
        raise InputError(f"{MAX_EXPANSION_ENV}: expected a number >= 1, got {env!r}")
    return value


def _check_member_size(
    size: int, member: str, where: str, name: str, limit: int, compressed: int | None = None
) -> None:
    if compressed is not None and size > EXPANSION_FREE_BYTES and size > _max_expansion() * max(compressed, 1):
        raise DataFormatError(
            f"{name}: entry '{member}' of {where} expands from {compressed} to {size} bytes (more than "
            f"{_max_expansion():g} times; refused as a likely archive bomb); raise {MAX_EXPANSION_ENV} if the file "
            f"is trusted"
        )
    if size > limit:
        raise DataFormatError(
            f"{name}: entry '{member}' of {where} expands to {size} bytes, more than the limit of {limit} bytes "
            f"(refused: a member that expands hugely is not read whole); raise the limit with max_member_bytes= or "
            f"the environment variable {MAX_MEMBER_BYTES_ENV} if the file is trusted"
        )


def _zip_read(zf: zipfile.ZipFile, member: str, where: str, name: str, limit: int | None = None) -> bytes:
    """The bytes of one zip member, refused (DataFormatError) when it expands beyond the member size limit."""
    limit = _member_limit() if limit is None else limit
    try:
        info = zf.getinfo(member)
        _check_member_size(info.file_size, member, where, name, limit, info.compress_size)
        with zf.open(member) as f:
            raw = f.read(limit + 1)  # never more than the limit, even if the declared size lies
        _check_member_size(len(raw), member, where, name, limit)
        return raw
    except DataFormatError:
        raise
    except MemoryError as e:
        raise DataFormatError(f"{name}: out of memory reading entry '{member}' of {where}") from e
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, RuntimeError, NotImplementedError, ValueError,
            KeyError) as e:  # fmt: skip
        raise DataFormatError(f"{name}: cannot read entry '{member}' of {where} ({type(e).__name__}: {e})") from e
