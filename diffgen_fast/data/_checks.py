"""Small argument checks shared by :class:`~diffgen_fast.data.TrainingSet` and its loaders: dtypes, devices,
scales, value ranges, labels, paths and row indices. Every error names the argument at fault and what was expected.
"""

from __future__ import annotations

import errno
import math
import os
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

from diffgen_fast.errors import DataFormatError, InputError, InputTypeError

#: The float dtypes a training set may be served in.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: Pixel scalings accepted by the image loaders: uint8 ``x`` becomes ``x / 127.5 - 1``, ``x / 255`` or ``x``.
IMAGE_SCALES = ("[-1,1]", "[0,1]", "[0,255]")

PathLike = Union[str, "os.PathLike[str]"]

_NP_FLOAT_TO_TORCH = {
    np.dtype(np.float16): torch.float16,
    np.dtype(np.float32): torch.float32,
    np.dtype(np.float64): torch.float64,
}
_SCALE_RANGE = {"[-1,1]": (-1.0, 1.0), "[0,1]": (0.0, 1.0), "[0,255]": (0.0, 255.0)}
_INT_HINT = (
    "; integer data is not converted silently: scale it to floats first (e.g. x / 127.5 - 1 for uint8 images in "
    "[-1, 1]), or load uint8 pixels from a file (.npy, .npz, images) with scale="
)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _check_float_dtype(dtype: Any, name: str) -> torch.dtype:
    if not isinstance(dtype, torch.dtype) or dtype not in FLOAT_DTYPES:
        raise InputTypeError(
            f"{name}: expected a torch float dtype (float16, bfloat16, float32 or float64), got {dtype!r}"
        )
    return dtype


def _as_device(device: Any, name: str = "device") -> torch.device:
    try:
        return torch.empty(0, device=device).device
    except (RuntimeError, TypeError, ValueError, AssertionError) as e:
        raise InputError(f"{name}: expected a usable torch device, cannot place data on {device!r} ({e})") from e


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _check_scale(scale: Any) -> str:
    if scale not in _SCALE_RANGE:
        raise InputError(f"scale: expected one of {', '.join(repr(s) for s in IMAGE_SCALES)}, got {scale!r}")
    return scale


def _check_value_range(value_range: Any) -> tuple[float, float] | None:
    if value_range is None:
        return None
    try:
        lo, hi = (float(v) for v in value_range)
    except (TypeError, ValueError) as e:
        raise InputError(f"value_range: expected None or a pair (lo, hi) of numbers, got {value_range!r}") from e
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise InputError(f"value_range: expected finite (lo, hi) with lo < hi, got {value_range!r}")
    return lo, hi


def _check_labels(labels: Any, n: int, device: torch.device) -> torch.Tensor | None:
    if labels is None:
        return None
    if isinstance(labels, torch.Tensor):
        t = labels.detach()
    elif isinstance(labels, np.ndarray):
        if labels.dtype.kind not in "iu":
            raise InputTypeError(f"labels: expected integer class labels, got a numpy {labels.dtype} array")
        t = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))
    elif isinstance(labels, (list, tuple, range)):
        try:
            t = torch.as_tensor(list(labels))
        except (TypeError, ValueError, RuntimeError) as e:
            raise InputTypeError(f"labels: expected a sequence of integer class labels ({e})") from e
        if len(t) == 0:
            t = t.to(torch.int64)
    else:
        raise InputTypeError(
            f"labels: expected None, a torch tensor, numpy array or list of ints, got {type(labels).__name__}"
        )
    if t.dtype == torch.bool or t.dtype.is_floating_point or t.dtype.is_complex:
        raise InputTypeError(f"labels: expected integer class labels, got dtype {t.dtype}")
    if tuple(t.shape) != (n,):
        raise InputError(f"labels: expected shape [{n}] (one label per point), got {list(t.shape)}")
    return t.to(device=device, dtype=torch.int64)


def _as_path(path: Any, name: str) -> Path:
    if isinstance(path, (str, os.PathLike)):
        return Path(path)
    raise InputTypeError(f"{name}: expected a path (str or os.PathLike), got {type(path).__name__}")


def _require_exists(p: Path, name: str) -> None:
    if not p.exists():
        raise FileNotFoundError(
            errno.ENOENT, f"{name}: no such file or directory (expected a training-set file)", str(p)
        )


def _existing_file(path: Any, name: str) -> Path:
    p = _as_path(path, name)
    _require_exists(p, name)
    if not p.is_file():
        raise DataFormatError(f"{name}: '{p}' is not a regular file; expected a file here")
    return p


def _existing_dir(path: Any, name: str) -> Path:
    p = _as_path(path, name)
    _require_exists(p, name)
    if not p.is_dir():
        raise DataFormatError(f"{name}: '{p}' is not a directory; expected a folder here")
    return p


def _torch_float_of_numpy(dtype: np.dtype, name: str, what: str) -> torch.dtype:
    key = dtype.newbyteorder("=") if dtype.byteorder not in "=|" else dtype
    if key not in _NP_FLOAT_TO_TORCH:
        hint = _INT_HINT + "'[-1,1]'" if dtype.kind in "biu" else ""
        raise InputTypeError(
            f"{name}: expected a float dtype (float16, float32 or float64) in {what}, got {dtype}{hint}"
        )
    return _NP_FLOAT_TO_TORCH[key]


def _index_tensor(index: Any, n: int) -> torch.Tensor:
    if _is_int(index):
        idx = torch.tensor([int(index)], dtype=torch.int64)
    elif isinstance(index, torch.Tensor):
        idx = index.detach().cpu()
    elif isinstance(index, np.ndarray):
        idx = torch.from_numpy(np.ascontiguousarray(index))
    elif isinstance(index, (list, tuple, range)):
        if len(index) == 0:
            raise InputError(f"index: selects no rows of {n}; expected a non-empty subset")
        try:
            idx = torch.as_tensor(list(index))
        except (TypeError, ValueError, RuntimeError) as e:
            raise InputTypeError(f"index: expected integer row indices or a boolean mask ({e})") from e
    else:
        raise InputTypeError(
            f"index: expected a slice, int, or integer/boolean tensor, array or list, got {type(index).__name__}"
        )
    if idx.dtype == torch.bool:
        if tuple(idx.shape) != (n,):
            raise InputError(f"index: a boolean mask must have shape [{n}], got {list(idx.shape)}")
        idx = idx.nonzero().flatten()
    elif idx.dtype.is_floating_point or idx.dtype.is_complex:
        raise InputTypeError(f"index: expected integer row indices or a boolean mask, got dtype {idx.dtype}")
    idx = idx.to(torch.int64).reshape(-1)
    if idx.numel() == 0:
        raise InputError(f"index: selects no rows of {n}; expected a non-empty subset")
    lo, hi = int(idx.min()), int(idx.max())
    if lo < -n or hi >= n:
        raise InputError(f"index: row indices must lie in [-{n}, {n}), got values from {lo} to {hi}")
    return torch.where(idx < 0, idx + n, idx)
