"""CIFAR-10, python version: its batches directory or ``.tar.gz``, read without extracting and without running
arbitrary pickle code (an unpickler that can only rebuild dicts, lists, bytes and numpy arrays); read by
:meth:`TrainingSet.from_cifar10`.
"""

from __future__ import annotations

import io
import pickle
import tarfile
import zlib
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from diffgen_fast.data._checks import _SCALE_RANGE, PathLike, _as_path, _check_scale, _require_exists
from diffgen_fast.data.formats._archive import _check_member_size, _member_limit
from diffgen_fast.data.formats._pixels import _scale_images
from diffgen_fast.errors import DataFormatError, InputError

if TYPE_CHECKING:
    from diffgen_fast.data.training_set import TrainingSet

_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST = ("test_batch",)
_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_TAR = "cifar-10-python.tar.gz"


def _latin1_encode(obj: Any, encoding: str = "latin1") -> bytes:
    # The only use of _codecs.encode in a protocol-2 numpy pickle: py3 bytes stored as latin-1 text.
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode is allowed only for latin-1 text, got encoding {encoding!r}")
    return obj.encode("latin1")


def _pickle_allowed() -> dict[tuple[str, str], Any]:
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 1.26 has no numpy._core
        from numpy.core.multiarray import _reconstruct
    return {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild dicts, lists, bytes and numpy arrays, and refuses every other global."""

    def __init__(self, file: io.BytesIO, where: str, name: str) -> None:
        super().__init__(file, encoding="bytes")
        self._where = where
        self._name = name
        self._allowed = _pickle_allowed()

    def find_class(self, module: str, qualname: str) -> Any:
        target = self._allowed.get((module, qualname))
        if target is None:
            raise DataFormatError(
                f"{self._name}: {self._where} is not a plain CIFAR-10 batch: its pickle references "
                f"'{module}.{qualname}', but only numpy array reconstruction may be loaded (refused, nothing executed)"
            )
        return target


def _load_cifar_batch(raw: bytes, where: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 ``[n, 3, 32, 32]`` and labels int64 ``[n]`` of one CIFAR-10 python batch."""
    try:
        obj = _ArrayOnlyUnpickler(io.BytesIO(raw), where, name).load()
    except DataFormatError:
        raise
    except Exception as e:
        raise DataFormatError(f"{name}: {where} is not a readable CIFAR-10 batch ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise DataFormatError(f"{name}: {where} holds a {type(obj).__name__}; expected a dict with b'data', b'labels'")
    data = obj.get(b"data", obj.get("data"))
    labels = obj.get(b"labels", obj.get("labels"))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        got = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataFormatError(f"{name}: {where}: expected b'data' to be a uint8 array of shape [n, 3072], got {got}")
    try:
        lab = np.asarray(labels)
    except Exception as e:
        raise DataFormatError(f"{name}: {where}: b'labels' is not a list of ints ({e})") from e
    if lab.dtype.kind not in "iu" or lab.shape != (data.shape[0],):
        raise DataFormatError(
            f"{name}: {where}: expected b'labels' to be {data.shape[0]} integers (CIFAR-10 format), "
            f"got {lab.dtype} with shape {lab.shape}"
        )
    return data.reshape(-1, 3, 32, 32), lab.astype(np.int64)


def _read_cifar_tar(
    p: Path, wanted: tuple[str, ...], name: str, limit: int | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Parse the wanted batches of a CIFAR-10 tar archive in one streaming pass, without extracting anything; a
    batch whose declared size exceeds the member size limit is refused before it is read."""
    limit = _member_limit() if limit is None else limit
    found: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    in_dir: set[str] = set()
    try:
        with tarfile.open(p, "r:*") as tf:
            for member in tf:
                path = PurePosixPath(member.name)
                if not member.isreg() or path.name not in wanted:
                    continue
                canonical = path.parent.name == _CIFAR_DIR
                if path.name in in_dir and not canonical:
                    continue
                _check_member_size(member.size, member.name, f"'{p}'", name, limit, p.stat().st_size)
                f = tf.extractfile(member)
                assert f is not None
                found[path.name] = _load_cifar_batch(f.read(limit + 1), f"entry '{member.name}' of '{p}'", name)
                if canonical:
                    in_dir.add(path.name)
    except DataFormatError:
        raise
    except MemoryError as e:
        raise DataFormatError(f"{name}: out of memory reading the tar archive '{p}'") from e
    except (tarfile.TarError, OSError, EOFError, zlib.error, ValueError) as e:
        raise DataFormatError(f"{name}: '{p}' is not a readable tar archive ({type(e).__name__}: {e})") from e
    for batch in wanted:
        if batch not in found:
            raise DataFormatError(
                f"{name}: CIFAR-10 batch '{batch}' not found in '{p}'; expected the python version "
                f"({_CIFAR_DIR}/data_batch_1..5 and test_batch)"
            )
    return [found[b] for b in wanted]


def from_cifar10(
    cls,
    path: PathLike,
    split: str = "train",
    scale: str = "[-1,1]",
    *,
    max_member_bytes: int | None = None,
    name: str = "train",
) -> TrainingSet:
    """See :meth:`TrainingSet.from_cifar10`."""
    limit = _member_limit(max_member_bytes)
    if split not in ("train", "test"):
        raise InputError(f"split: expected 'train' or 'test', got {split!r}")
    _check_scale(scale)
    p = _as_path(path, name)
    _require_exists(p, name)
    wanted = _CIFAR_TRAIN if split == "train" else _CIFAR_TEST
    if p.is_dir():
        if not any((p / b).is_file() for b in _CIFAR_TRAIN + _CIFAR_TEST):
            if (p / _CIFAR_DIR).is_dir():
                p = p / _CIFAR_DIR
            elif (p / _CIFAR_TAR).is_file():
                p = p / _CIFAR_TAR
            else:
                raise DataFormatError(
                    f"{name}: no CIFAR-10 batches in '{p}'; expected the python version's {_CIFAR_DIR} directory "
                    f"(data_batch_1..5, test_batch) or {_CIFAR_TAR}"
                )
    if p.is_dir():
        parts = []
        for batch in wanted:
            f = p / batch
            if not f.is_file():
                raise DataFormatError(
                    f"{name}: CIFAR-10 batch '{batch}' not found in '{p}'; expected data_batch_1..5 and test_batch"
                )
            parts.append(_load_cifar_batch(f.read_bytes(), f"'{f}'", name))
    else:
        parts = _read_cifar_tar(p, wanted, name, limit)
    u8 = np.concatenate([images for images, _ in parts])
    labels = torch.from_numpy(np.concatenate([lab for _, lab in parts]))
    return cls(
        _scale_images(u8, scale), labels, value_range=_SCALE_RANGE[scale], source=f"cifar10:{p}[{split}]", name=name
    )
