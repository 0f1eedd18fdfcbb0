"""NumPy files: ``.npy`` (memory-mapped read-only by default) and ``.npz`` archives, float arrays or uint8 pixels
(guided-diffusion / ADM sample archives: ``arr_0`` uint8 ``[N, H, W, C]``), read by :meth:`TrainingSet.from_npy`
and :meth:`TrainingSet.from_npz`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from diffgen_fast.data import training_set as _training_set
from diffgen_fast.data._checks import (
    _SCALE_RANGE,
    PathLike,
    _check_scale,
    _existing_file,
    _torch_float_of_numpy,
)
from diffgen_fast.data.formats._archive import _check_member_size, _member_limit
from diffgen_fast.data.formats._pixels import _scale_images, _scale_note
from diffgen_fast.data.training_set import _ItemNames, _MappedFile, _stamp
from diffgen_fast.errors import DataFormatError, InputError, InputTypeError

if TYPE_CHECKING:
    from diffgen_fast.data.training_set import TrainingSet


def _header(f) -> tuple[tuple[int, ...], np.dtype, int] | None:
    """Shape, dtype and data offset of the .npy stream f (at its start); None for header versions >= 3."""
    fmt = np.lib.format
    version = fmt.read_magic(f)
    if version == (1, 0):
        shape, _, dtype = fmt.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, _, dtype = fmt.read_array_header_2_0(f)
    else:
        return None
    return tuple(shape), dtype, f.tell()


def _read_npy_header(p: Path, name: str) -> tuple[tuple[int, ...], np.dtype, int] | None:
    """Shape, dtype and data offset of an .npy file without reading its data; None for header versions >= 3."""
    try:
        with open(p, "rb") as f:
            return _header(f)
    except Exception as e:
        raise DataFormatError(f"{name}: '{p}' is not a valid .npy file ({type(e).__name__}: {e})") from e


def _npz_member_check(z: Any, key: str, where: str, name: str, limit: int) -> None:
    """Refuse an .npz array whose member, or whose .npy header, declares more bytes than the limit (or than the
    member holds), before numpy allocates it."""
    zf = z.zip
    member = key if key in zf.namelist() else f"{key}.npy"
    info = zf.getinfo(member)
    _check_member_size(info.file_size, member, where, name, limit, info.compress_size)
    with zf.open(member) as f:
        h = _header(f)
    if h is None:
        return
    shape, dtype, header = h
    need = math.prod(shape) * dtype.itemsize
    _check_member_size(need, member, where, name, limit)
    if header + need > info.file_size:
        raise DataFormatError(
            f"{name}: entry '{member}' of {where} is truncated: its header promises {list(shape)} {dtype} "
            f"({need} bytes of data), the entry has {info.file_size - header}"
        )


def _scale_uint8(u8: np.ndarray, scale: str) -> torch.Tensor:
    """uint8 ``[N, ...]`` (array or memmap) scaled to float32 like images, a bounded block of rows at a time."""
    out = torch.empty(u8.shape, dtype=torch.float32)
    step = max(1, _training_set.DEFAULT_CHUNK_BYTES // (4 * max(1, math.prod(u8.shape[1:]))))
    for s in range(0, u8.shape[0], step):
        out[s : s + step] = _scale_images(np.array(u8[s : s + step]), scale)
    return out


def _from_uint8(
    cls, u8: np.ndarray, scale: str | None, labels: Any, name: str, source: str, prefix: str
) -> TrainingSet:
    """A set of uint8 pixels scaled to float32 (``scale`` None: ``"[-1,1]"``), named ``prefix[row]``."""
    scale = "[-1,1]" if scale is None else scale
    x = _scale_uint8(u8, scale)
    out = cls(x, labels, value_range=_SCALE_RANGE[scale], source=f"{source} (uint8 scaled to {scale})", name=name)
    out._names = _ItemNames(prefix)
    out._conversions = [_scale_note(scale)]
    return out


def from_npy(cls, path: PathLike, mmap: bool = True, *, scale: str | None = None, name: str = "train") -> TrainingSet:
    """See :meth:`TrainingSet.from_npy`."""
    p = _existing_file(path, name)
    if not isinstance(mmap, bool):
        raise InputTypeError(f"mmap: expected a bool, got {type(mmap).__name__}")
    if scale is not None:
        _check_scale(scale)
    header = _read_npy_header(p, name)
    st = p.stat()
    if header is not None:
        shape, dtype, offset = header
        if dtype != np.uint8:
            _torch_float_of_numpy(dtype, name, f"'{p}'")
        if len(shape) < 2:
            raise InputError(f"{name}: expected [N, d] or [N, *shape] in '{p}', got shape {list(shape)}")
        if shape[0] == 0:
            raise InputError(f"{name}: empty training set (N = 0) in '{p}'; expected at least one point")
        need = offset + math.prod(shape) * dtype.itemsize
        have = st.st_size
        if have < need:
            raise DataFormatError(
                f"{name}: '{p}' is truncated: its header promises {list(shape)} {dtype} ({need} bytes), "
                f"the file has {have} bytes"
            )
    try:
        arr = np.load(p, mmap_mode="r" if mmap else None, allow_pickle=False)
    except MemoryError as e:
        raise DataFormatError(f"{name}: out of memory reading '{p}' (pass mmap=True to stream it)") from e
    except Exception as e:
        raise DataFormatError(f"{name}: cannot read '{p}' as .npy ({type(e).__name__}: {e})") from e
    if not isinstance(arr, np.ndarray):
        raise DataFormatError(f"{name}: '{p}' is not an .npy array file (got {type(arr).__name__})")
    if arr.dtype == np.uint8 and arr.ndim >= 2 and arr.shape[0] > 0:
        return _from_uint8(cls, arr, scale, None, name, f"npy:{p}", p.name)
    if isinstance(arr, np.memmap) and not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr)
    out = cls(arr, name=name, source=f"npy:{p}")
    out._names = _ItemNames(p.name)
    if not out._in_memory:
        out._source = f"npy:{p} (memmap)"
        if header is not None:
            row_bytes = out._d * dtype.itemsize
            out._file = _MappedFile(p, offset, row_bytes, _stamp(st), exact=True, pread=True)
    return out


def from_npz(
    cls,
    path: PathLike,
    key: str | None = None,
    *,
    scale: str | None = None,
    max_member_bytes: int | None = None,
    name: str = "train",
) -> TrainingSet:
    """See :meth:`TrainingSet.from_npz`."""
    p = _existing_file(path, name)
    if scale is not None:
        _check_scale(scale)
    limit = _member_limit(max_member_bytes)
    label_keys = ("labels", "y")
    try:
        with np.load(p, allow_pickle=False) as z:
            if not isinstance(z, np.lib.npyio.NpzFile):
                raise DataFormatError(f"{name}: '{p}' is a single array, not an .npz archive; use from_npy")
            keys = list(z.files)
            if key is None:
                data_keys = [k for k in keys if k not in label_keys]
                preferred = [k for k in ("x", "data", "arr_0", "images") if k in keys]
                if len(data_keys) == 1:
                    key = data_keys[0]
                elif preferred:
                    key = preferred[0]
                else:
                    raise DataFormatError(
                        f"{name}: cannot tell which array of '{p}' holds the points (arrays: {keys}); "
                        "pass key=, or name it 'x', 'data', 'arr_0' or 'images'"
                    )
            elif key not in keys:
                raise InputError(f"key: {key!r} is not an array of '{p}'; expected one of {keys}")
            _npz_member_check(z, key, f"'{p}'", name, limit)
            x = z[key]
            label_key = next((k for k in label_keys if k in keys and k != key), None)
            labels = None
            if label_key is not None:
                _npz_member_check(z, label_key, f"'{p}'", name, limit)
                labels = z[label_key]
    except (DataFormatError, InputError):
        raise
    except MemoryError as e:
        raise DataFormatError(f"{name}: out of memory reading '{p}' as .npz") from e
    except Exception as e:
        raise DataFormatError(f"{name}: cannot read '{p}' as .npz ({type(e).__name__}: {e})") from e
    if isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.ndim >= 2 and x.shape[0] > 0:
        return _from_uint8(cls, x, scale, labels, name, f"npz:{p}[{key}]", f"{p.name}:{key}")
    out = cls(x, labels, name=name, source=f"npz:{p}[{key}]")
    out._names = _ItemNames(f"{p.name}:{key}")
    return out
