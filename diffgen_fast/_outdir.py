"""Output folders of long jobs: one run at a time, and a run's files published as one set.

``OutputFolder(path)`` takes an exclusive lock on ``path/.lock`` (``fcntl.flock``: released by the kernel when the
process dies, so a killed run never leaves a stale lock); a second run on the same folder is refused at once with
``OutputLockedError``. The run writes its files into ``stage()``, a fresh ``.staging-<run id>`` folder inside
``path``, and ``publish(files)`` then swaps them in as one set:

1. ``.publish.json`` (the journal: run id, staging folder, the new files, the old set's files to remove) is written
   atomically;
2. each file is moved into ``path`` with ``os.replace`` (atomic per file), files of the old set that the new set
   lacks are removed;
3. ``manifest.json`` (run id, time, every file with its size and SHA-256) is written atomically;
4. the journal and the staging folder are removed.

A run killed before step 1 leaves the old set as it was (its staging folder is removed by the next run on the
folder); a run killed after step 1 leaves a journal that the next run (or ``OutputFolder.recover``) rolls forward
before anything else, so the folder always ends as one run's set. ``manifest.json`` names the run whose files are in
the folder, and ``verify_manifest`` checks that each file is the one that run wrote.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Optional, Union

from diffgen_fast._atomic import _fsync_dir, write_text_atomic
from diffgen_fast.errors import DiffgenError, InputError

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

PathLike = Union[str, os.PathLike]

LOCK_NAME = ".lock"
JOURNAL_NAME = ".publish.json"
MANIFEST_NAME = "manifest.json"
STAGING_PREFIX = ".staging-"


class OutputLockedError(DiffgenError, RuntimeError):
    """Another run holds the output folder."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_name(name: str) -> str:
    p = Path(name)
    if p.is_absolute() or len(p.parts) != 1 or name in (".", "..") or name.startswith("."):
        raise InputError(f"files: expected plain file names inside the output folder, got {name!r}")
    return name


class OutputFolder:
    """Exclusive use of an output folder and atomic publication of one run's files (see the module docstring).

    Use as a context manager::

        with OutputFolder(out, name="out") as folder:
            stage = folder.stage()
            ... write report.md, summary.json, ... into stage ...
            folder.publish(["report.md", "summary.json"], info={"command": "score"})
    """

    def __init__(self, path: PathLike, *, name: str = "out"):
        if path is None or str(path).strip() == "":
            raise InputError(f"{name}: expected a folder path, got an empty string")
        self.path = Path(path)
        self.name = name
        self.run_id = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:8]
        self._fd: Optional[int] = None
        self._stage: Optional[Path] = None

    # -- lock ----------------------------------------------------------------------------------------------------

    def __enter__(self) -> OutputFolder:
        if self.path.exists() and not self.path.is_dir():
            raise InputError(f"{self.name}: '{self.path}' exists and is not a folder")
        self.path.mkdir(parents=True, exist_ok=True)
        lock = self.path / LOCK_NAME
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = ""
                with contextlib.suppress(OSError, ValueError):
                    holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip()
                os.close(fd)
                raise OutputLockedError(
                    f"{self.name}: '{self.path}' is in use by another run"
                    + (f" ({holder})" if holder else "")
                    + "; wait for it to finish or choose another output folder"
                ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, run {self.run_id}\n".encode(), 0)
        self._fd = fd
        try:
            self.recover()
            self._remove_stale_staging()
        except BaseException:
            self._release()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            # A publication that started (its journal is written) is finished; an unpublished stage is dropped.
            if not self.recover() and self._stage is not None and self._stage.exists():
                shutil.rmtree(self._stage, ignore_errors=True)
        finally:
            self._release()

    def _release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def _require_lock(self) -> None:
        if self._fd is None:
            raise RuntimeError("OutputFolder: use it as a context manager (the folder is not locked)")

    # -- staging and publishing ----------------------------------------------------------------------------------

    def _remove_stale_staging(self) -> None:
        for p in self.path.glob(STAGING_PREFIX + "*"):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        for p in self.path.glob(".*.tmp"):  # temporary files of atomic writes cut short
            with contextlib.suppress(OSError):
                p.unlink()

    def stage(self) -> Path:
        """A fresh, empty folder inside the output folder for this run's files."""
        self._require_lock()
        if self._stage is None:
            self._stage = self.path / f"{STAGING_PREFIX}{self.run_id}"
            self._stage.mkdir()
        return self._stage

    def publish(self, files: list[str], *, info: Optional[dict] = None) -> Path:
        """Move `files` (names inside stage()) into the output folder as one set; returns manifest.json's path."""
        self._require_lock()
        stage = self.stage()
        names = [_check_name(f) for f in files]
        missing = [f for f in names if not (stage / f).is_file()]
        if missing:
            raise InputError(f"files: not written to the staging folder: {missing}")
        entries = {f: {"bytes": (stage / f).stat().st_size, "sha256": _sha256(stage / f)} for f in names}
        old = read_manifest(self.path)
        old_files = [] if old is None else [f for f in old.get("files", {}) if f not in entries]
        manifest = {
            "run": self.run_id,
            "finished_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            **(info or {}),
            "files": entries,
        }
        journal = {"run": self.run_id, "stage": stage.name, "files": names, "remove": old_files, "manifest": manifest}
        write_text_atomic(json.dumps(journal, indent=2), self.path / JOURNAL_NAME)
        self._roll_forward(journal)
        self._stage = None
        return self.path / MANIFEST_NAME

    def recover(self) -> bool:
        """Finish a publication cut short by a crash (the journal is present); True if there was one."""
        jp = self.path / JOURNAL_NAME
        if not jp.is_file():
            return False
        try:
            journal = json.loads(jp.read_text(encoding="utf-8"))
            _check_name(journal["stage"][len(STAGING_PREFIX):] or "x")
            if not journal["stage"].startswith(STAGING_PREFIX):
                raise ValueError("bad staging folder name")
            for f in [*journal["files"], *journal["remove"]]:
                _check_name(f)
        except (OSError, ValueError, KeyError, TypeError, InputError):
            # A journal that cannot be read was never completed (it is written atomically): drop it.
            jp.unlink(missing_ok=True)
            return False
        self._roll_forward(journal)
        return True

    def _roll_forward(self, journal: dict) -> None:
        stage = self.path / journal["stage"]
        for f in journal["files"]:
            src = stage / f
            if src.is_file():
                os.replace(src, self.path / f)
        for f in journal["remove"]:
            with contextlib.suppress(FileNotFoundError):
                (self.path / f).unlink()
        write_text_atomic(json.dumps(journal["manifest"], indent=2) + "\n", self.path / MANIFEST_NAME)
        _fsync_dir(self.path)
        (self.path / JOURNAL_NAME).unlink(missing_ok=True)
        shutil.rmtree(stage, ignore_errors=True)
        _fsync_dir(self.path)


def read_manifest(path: PathLike) -> Optional[dict]:
    """The manifest.json of an output folder, or None when there is none (or it is unreadable)."""
    p = Path(path) / MANIFEST_NAME
    try:
        m = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) and isinstance(m.get("files"), dict) else None


def verify_manifest(path: PathLike) -> list[str]:
    """Problems with an output folder's set (a file missing or not the one its run wrote); [] when it is whole."""
    m = read_manifest(path)
    if m is None:
        return [f"no readable {MANIFEST_NAME} in '{path}'"]
    problems = []
    for f, e in m["files"].items():
        p = Path(path) / f
        if not p.is_file():
            problems.append(f"{f}: missing")
        elif p.stat().st_size != e.get("bytes") or _sha256(p) != e.get("sha256"):
            problems.append(f"{f}: not the file run {m.get('run')} wrote")
    return problems


__all__ = ["OutputFolder", "OutputLockedError", "read_manifest", "verify_manifest"]
