"""One reader per input format, each a module of functions that build a :class:`~diffgen_fast.data.TrainingSet`
(the ``from_*`` constructors of the class call them):

- :mod:`.npy`: ``.npy`` (memory-mapped) and ``.npz`` (incl. guided-diffusion / ADM uint8 sample archives).
- :mod:`.images`: folders of images and EDM ``dataset_tool`` zips (labels from ``dataset.json``), optional
  ``.npy`` cache.
- :mod:`.cifar`: CIFAR-10 python batches (directory or tar archive), with an array-only unpickler.
- :mod:`.builtin`: sets that need no file (``digits``, seeded Gaussian samples).
- :mod:`._archive`: the archive member checks (safe names, size and expansion limits) of npz, zip and tar readers.
- :mod:`._pixels`: uint8 pixels to floats.

:func:`_sniff` tells which reader :meth:`TrainingSet.open` uses for a path.
"""

from __future__ import annotations

import tarfile
import zipfile
from pathlib import Path

from diffgen_fast.data.formats.cifar import _CIFAR_DIR, _CIFAR_TAR, _CIFAR_TEST, _CIFAR_TRAIN
from diffgen_fast.errors import DataFormatError

_TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".tar.bz2", ".tar.xz")


def _sniff(p: Path, name: str) -> str:
    if p.is_dir():
        if any((p / b).is_file() for b in _CIFAR_TRAIN + _CIFAR_TEST):
            return "cifar"
        if (p / _CIFAR_DIR).is_dir() or (p / _CIFAR_TAR).is_file():
            return "cifar"
        return "images"
    lower = p.name.lower()
    for suffix, kind in ((".npy", "npy"), (".npz", "npz"), (".zip", "zip")):
        if lower.endswith(suffix):
            return kind
    if lower.endswith(_TAR_SUFFIXES):
        return "cifar"
    try:
        with open(p, "rb") as f:
            magic = f.read(8)
    except OSError as e:
        raise DataFormatError(f"{name}: cannot read '{p}' ({e})") from e
    if magic.startswith(b"\x93NUMPY"):
        return "npy"
    if magic.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        try:
            with zipfile.ZipFile(p) as zf:
                names = [n for n in zf.namelist() if not n.endswith("/")]
        except (zipfile.BadZipFile, OSError) as e:
            raise DataFormatError(f"{name}: '{p}' looks like a zip archive but cannot be read ({e})") from e
        return "npz" if names and all(n.endswith(".npy") for n in names) else "zip"
    if tarfile.is_tarfile(p):
        return "cifar"
    raise DataFormatError(
        f"{name}: cannot tell the format of '{p}'; expected .npy, .npz, an EDM dataset .zip, a CIFAR-10 python "
        "batches directory or .tar.gz, or a folder of images"
    )
