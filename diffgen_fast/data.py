"""Training sets: N points of one per-item shape, served as a flattened ``[N, d]`` float view.

:class:`TrainingSet` is what every kernel, denoiser and memorization metric reads. It holds the points either in
memory (a torch tensor on any device) or out of core (a read-only memory map of an ``.npy`` file, whose pages load
lazily), and serves them whole (:meth:`TrainingSet.flat`) or in bounded chunks (:meth:`TrainingSet.iter_chunks`).
Chunks of a file-backed set are read with explicit reads into fresh buffers (never handed out as views of the map),
and the file is checked unchanged (size, modification time, inode) before every chunk: a file truncated or rewritten
while in use raises :class:`~diffgen_fast.errors.DataFormatError` naming it instead of killing the process (SIGBUS).
Per-set statistics that several consumers need (squared norms, mean, covariance, finiteness, a content fingerprint)
are streamed over chunks with float64 accumulation and cached.

Loaders cover arrays (torch / numpy), ``.npy`` (memory-mapped by default), ``.npz``, folders of images, EDM
``dataset_tool`` zips, the python version of CIFAR-10 (directory or ``.tar.gz``, read without extracting and without
running arbitrary pickle code) and small built-ins. Every failure raises an error from :mod:`diffgen_fast.errors`
that names the argument or file at fault and what was expected.

Archive members (``.npz`` arrays, zip entries, tar entries) are refused when their declared uncompressed size exceeds
a limit, so that a small file that expands hugely (a "zip bomb") is never read whole: :data:`MAX_MEMBER_BYTES`
(4 GiB), overridden by the environment variable ``DIFFGEN_FAST_MAX_MEMBER_BYTES`` and by the ``max_member_bytes=``
keyword of the archive loaders; and a member of more than 64 MiB that expands more than :data:`MAX_EXPANSION` (100)
times its compressed size is refused whatever the limit (``DIFFGEN_FAST_MAX_EXPANSION`` raises it), so a 3 GB member
packed in 3 MB is refused by default.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import math
import os
import pickle
import re
import tarfile
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any, Union

import numpy as np
import torch

from diffgen_fast.errors import DataFormatError, InputError, InputTypeError

__all__ = [
    "BUILTINS",
    "DEFAULT_CHUNK_BYTES",
    "FLOAT_DTYPES",
    "IMAGE_EXTENSIONS",
    "IMAGE_SCALES",
    "MAX_CLASS_LABEL",
    "MAX_MEMBER_BYTES",
    "MAX_MEMBER_BYTES_ENV",
    "MAX_EXPANSION",
    "MAX_EXPANSION_ENV",
    "TrainingSet",
]

#: Target size in bytes of one chunk yielded by :meth:`TrainingSet.iter_chunks` when no chunk_size is given.
DEFAULT_CHUNK_BYTES = 64 << 20
#: The float dtypes a training set may be served in.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: Pixel scalings accepted by the image loaders: uint8 ``x`` becomes ``x / 127.5 - 1``, ``x / 255`` or ``x``.
IMAGE_SCALES = ("[-1,1]", "[0,1]", "[0,255]")
#: File suffixes (lower case) read as images by the folder and zip loaders.
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".pbm", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")
#: Names accepted by :meth:`TrainingSet.builtin`.
BUILTINS = ("digits",)
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
#: Largest class label accepted from an EDM ``dataset.json`` (labels must be ints in ``[0, MAX_CLASS_LABEL]``).
MAX_CLASS_LABEL = (1 << 24) - 1

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
_SCALE_RULE = {"[-1,1]": "x / 127.5 - 1", "[0,1]": "x / 255", "[0,255]": "x (as float)"}
_UNCHECKED = object()
_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST = ("test_batch",)
_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_TAR = "cifar-10-python.tar.gz"
_TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".tar.bz2", ".tar.xz")
_DRIVE = re.compile(r"^[A-Za-z]:")
_IMAGE_CHANNELS = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}
_IMAGE_CONVERT = {"1": "L", "La": "LA", "PA": "RGBA", "RGBa": "RGBA", "RGBX": "RGB", "CMYK": "RGB", "YCbCr": "RGB"}


# ----------------------------------------------------------------------------------------------------------------------
# small validators


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


# ----------------------------------------------------------------------------------------------------------------------
# file-format helpers


def _read_npy_header(p: Path, name: str) -> tuple[tuple[int, ...], np.dtype, int] | None:
    """Shape, dtype and data offset of an .npy file without reading its data; None for header versions >= 3."""
    fmt = np.lib.format
    try:
        with open(p, "rb") as f:
            version = fmt.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = fmt.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, _, dtype = fmt.read_array_header_2_0(f)
            else:
                return None
            offset = f.tell()
    except Exception as e:
        raise DataFormatError(f"{name}: '{p}' is not a valid .npy file ({type(e).__name__}: {e})") from e
    return tuple(shape), dtype, offset


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


def _npz_member_check(z: Any, key: str, where: str, name: str, limit: int) -> None:
    """Refuse an .npz array whose member, or whose .npy header, declares more bytes than the limit (or than the
    member holds), before numpy allocates it."""
    zf = z.zip
    member = key if key in zf.namelist() else f"{key}.npy"
    info = zf.getinfo(member)
    _check_member_size(info.file_size, member, where, name, limit, info.compress_size)
    fmt = np.lib.format
    with zf.open(member) as f:
        version = fmt.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = fmt.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _, dtype = fmt.read_array_header_2_0(f)
        else:
            return
        header = f.tell()
    need = math.prod(shape) * dtype.itemsize
    _check_member_size(need, member, where, name, limit)
    if header + need > info.file_size:
        raise DataFormatError(
            f"{name}: entry '{member}' of {where} is truncated: its header promises {list(shape)} {dtype} "
            f"({need} bytes of data), the entry has {info.file_size - header}"
        )


def _parse_edm_labels(raw: bytes, where: str, name: str) -> dict[str, int] | None:
    """Parse an EDM dataset.json: ``{"labels": [["00000/img00000000.png", 6], ...]}`` or ``{"labels": null}``."""
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise DataFormatError(f"{name}: {where} is not valid JSON ({e})") from e
    if not isinstance(meta, dict) or "labels" not in meta:
        raise DataFormatError(f"{name}: {where} must be a JSON object with a 'labels' key (EDM dataset.json format)")
    entries = meta["labels"]
    if entries is None:
        return None
    if not isinstance(entries, list):
        raise DataFormatError(f"{name}: {where}: 'labels' must be null or a list of [filename, label] pairs")
    table: dict[str, int] = {}
    for entry in entries:
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[0], str)):
            raise DataFormatError(f"{name}: {where}: expected [filename, label] pairs in 'labels', got {entry!r:.200}")
        label = entry[1]
        if isinstance(label, bool) or not isinstance(label, int):
            raise DataFormatError(
                f"{name}: {where}: only integer class labels are supported, got {label!r:.100} for '{entry[0]}'"
            )
        if not 0 <= label <= MAX_CLASS_LABEL:
            raise DataFormatError(
                f"{name}: {where}: class label {label!r:.100} for '{entry[0]}' is out of range; expected an int in "
                f"[0, {MAX_CLASS_LABEL}]"
            )
        key = entry[0].replace("\\", "/")
        if key in table:
            raise DataFormatError(
                f"{name}: {where}: '{entry[0]}' is labeled more than once; expected one [filename, label] per image"
            )
        table[key] = label
    return table


def _labels_for(files: list[str], table: dict[str, int] | None, where: str, name: str) -> torch.Tensor | None:
    if table is None:
        return None
    missing = [f for f in files if f not in table]
    if missing:
        raise DataFormatError(
            f"{name}: {where} has no label for '{missing[0]}' ({len(missing)} image(s) unlabeled); "
            "expected a label for every image"
        )
    return torch.tensor([table[f] for f in files], dtype=torch.int64)


def _decode_image(src: bytes | Path, what: str, name: str) -> tuple[np.ndarray, str]:
    """Decode one image to uint8 ``[C, H, W]`` and its (normalised) PIL mode."""
    from PIL import Image

    try:
        with Image.open(src if isinstance(src, Path) else io.BytesIO(src)) as img:
            img.load()
            mode = img.mode
            if mode == "P":
                target = "RGBA" if "transparency" in img.info else "RGB"
            else:
                target = _IMAGE_CONVERT.get(mode, mode)
            if target not in _IMAGE_CHANNELS:
                raise DataFormatError(
                    f"{name}: image {what} has unsupported mode {mode!r}; expected 8-bit L, LA, RGB or RGBA (or P)"
                )
            arr = np.asarray(img.convert(target) if target != mode else img)
    except DataFormatError:
        raise
    except Exception as e:
        raise DataFormatError(f"{name}: cannot decode image {what} ({type(e).__name__}: {e})") from e
    if arr.dtype != np.uint8:
        raise DataFormatError(f"{name}: image {what} decodes to {arr.dtype}; expected 8-bit pixels")
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return arr, target


def _iter_images(
    entries: list[tuple[str, Callable[[], bytes | Path]]], where: str, name: str
) -> Iterator[tuple[int, np.ndarray]]:
    """Decode the entries one by one, yielding (i, uint8 [C, H, W]); all must agree in shape and mode."""
    ref_shape: tuple[int, ...] | None = None
    ref_mode, ref_name = "", ""
    for i, (rel, read) in enumerate(entries):
        arr, mode = _decode_image(read(), f"'{rel}' in {where}", name)
        if ref_shape is None:
            ref_shape, ref_mode, ref_name = arr.shape, mode, rel
        elif arr.shape != ref_shape or mode != ref_mode:
            h, w = arr.shape[1:]
            h0, w0 = ref_shape[1:]
            raise DataFormatError(
                f"{name}: image '{rel}' in {where} is {w}x{h} {mode}, expected {w0}x{h0} {ref_mode} like "
                f"'{ref_name}'; all images must share one size and mode"
            )
        yield i, arr


IMAGE_CACHE_CHUNK = 1024  # images decoded and written per step when streaming into a cache


def _images_to_npy(
    entries: list[tuple[str, Callable[[], bytes | Path]]], where: str, name: str, scale: str, dst: Path, stamp: dict
) -> None:
    """Decode the images in order and write them, scaled to float32, into the .npy file dst (through a temporary
    file renamed at the end, so an interrupted conversion leaves nothing half-written), with stamp beside it in
    dst.json. Memory: one image plus the page cache."""
    from numpy.lib.format import open_memmap

    from diffgen_fast._atomic import _atomic_target, write_text_atomic

    first, _ = _decode_image(entries[0][1](), f"'{entries[0][0]}' in {where}", name)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with _atomic_target(dst) as tmp:
        mm = open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(entries), *first.shape))
        buf: list[np.ndarray] = []
        start = 0
        for i, arr in _iter_images(entries, where, name):
            buf.append(arr)
            if len(buf) == IMAGE_CACHE_CHUNK or i == len(entries) - 1:
                mm[start : start + len(buf)] = _scale_images(np.stack(buf), scale).numpy()
                start += len(buf)
                buf = []
        mm.flush()
        del mm
    write_text_atomic(json.dumps(stamp, sort_keys=True) + "\n", dst.with_name(dst.name + ".json"))


def _cache_is_current(dst: Path, stamp: dict) -> bool:
    meta = dst.with_name(dst.name + ".json")
    if not (dst.is_file() and meta.is_file()):
        return False
    try:
        return json.loads(meta.read_text()) == json.loads(json.dumps(stamp, sort_keys=True))
    except (OSError, ValueError):
        return False


def _stack_images(entries: list[tuple[str, Callable[[], bytes | Path]]], where: str, name: str) -> np.ndarray:
    """Decode every entry (relative name, reader) into one uint8 ``[N, C, H, W]`` array; all must agree in shape."""
    out: np.ndarray | None = None
    ref_mode, ref_name = "", ""
    for i, (rel, read) in enumerate(entries):
        arr, mode = _decode_image(read(), f"'{rel}' in {where}", name)
        if out is None:
            out = np.empty((len(entries), *arr.shape), dtype=np.uint8)
            ref_mode, ref_name = mode, rel
        elif arr.shape != out.shape[1:] or mode != ref_mode:
            h, w = arr.shape[1:]
            h0, w0 = out.shape[2:]
            raise DataFormatError(
                f"{name}: image '{rel}' in {where} is {w}x{h} {mode}, expected {w0}x{h0} {ref_mode} like "
                f"'{ref_name}'; all images must share one size and mode"
            )
        out[i] = arr
    assert out is not None
    return out


def _scale_images(u8: np.ndarray, scale: str) -> torch.Tensor:
    x = torch.from_numpy(u8).to(torch.float32)
    if scale == "[-1,1]":
        x.div_(127.5).sub_(1.0)
    elif scale == "[0,1]":
        x.div_(255.0)
    return x


def _scale_uint8(u8: np.ndarray, scale: str) -> torch.Tensor:
    """uint8 ``[N, ...]`` (array or memmap) scaled to float32 like images, a bounded block of rows at a time."""
    out = torch.empty(u8.shape, dtype=torch.float32)
    step = max(1, DEFAULT_CHUNK_BYTES // (4 * max(1, math.prod(u8.shape[1:]))))
    for s in range(0, u8.shape[0], step):
        out[s : s + step] = _scale_images(np.array(u8[s : s + step]), scale)
    return out


def _scale_note(scale: str, what: str = "uint8") -> str:
    return f"dtype: {what} scaled {_SCALE_RULE[scale]} to {scale}"


class _ItemNames:
    """Source names of the rows of a set: file names (image folders, zips) or ``"prefix[row]"`` of the original
    rows (arrays). ``rows`` maps the set's rows to the source's rows after a subset (None: the identity)."""

    def __init__(self, prefix: str, files: list[str] | None = None, rows: np.ndarray | None = None) -> None:
        self.prefix, self.files, self.rows = prefix, files, rows

    def get(self, index: np.ndarray) -> list[str]:
        src = index if self.rows is None else self.rows[index]
        if self.files is not None:
            return [self.files[int(j)] for j in src]
        return [f"{self.prefix}[{int(j)}]" for j in src]

    def select(self, index: np.ndarray) -> _ItemNames:
        rows = index if self.rows is None else self.rows[index]
        return _ItemNames(self.prefix, self.files, np.asarray(rows, dtype=np.int64))


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


# ----------------------------------------------------------------------------------------------------------------------
# file-backed rows


def _stamp(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev


def _torch_of_readonly(x: np.ndarray) -> torch.Tensor:
    """A tensor sharing the memory of a read-only array (no copy). The caller must never write into it: the
    TrainingSet only reads it, and hands out copies of it from :meth:`TrainingSet.iter_chunks`."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(x)


class _MappedFile:
    """Where the rows of an out-of-core set lie in a file, and the file's state when it was opened.

    ``offset`` is the byte position of row 0 (None when unknown: rows are then copied out of the map), ``stride`` the
    bytes from one row to the next. ``exact``: the file must keep its size, modification time and inode (read-only
    sources); otherwise (a writable map the caller may write through) only its inode and a size >= the original.
    ``pread``: rows may be read from the file with explicit reads (a read-only map, whose pages equal the file's).
    """

    __slots__ = ("path", "offset", "stride", "stamp", "exact", "pread")

    def __init__(self, path: Path, offset: int | None, stride: int, stamp: tuple, *, exact: bool, pread: bool) -> None:
        self.path, self.offset, self.stride, self.stamp = path, offset, stride, stamp
        self.exact, self.pread = exact, pread

    def rows(self, start: int, step: int) -> _MappedFile:
        """The origin of the view ``[start::step]``."""
        offset = None if self.offset is None else self.offset + start * self.stride
        return _MappedFile(self.path, offset, self.stride * step, self.stamp, exact=self.exact, pread=self.pread)

    def check(self, name: str, st: os.stat_result | None = None) -> None:
        """Raise DataFormatError naming the file when it changed since it was opened (or cannot be found)."""
        try:
            now = _stamp(os.stat(self.path) if st is None else st)
        except OSError as e:
            raise DataFormatError(
                f"{name}: '{self.path}' cannot be checked any more ({e}); expected the file a memory-mapped training "
                "set was opened from to stay in place while it is used"
            ) from e
        size0, mtime0, ino0, dev0 = self.stamp
        size1, mtime1, ino1, dev1 = now
        if self.exact:
            changed = now != self.stamp
        else:
            changed = (ino1, dev1) != (ino0, dev0) or size1 < size0
        if changed:
            what = []
            if size1 != size0:
                what.append(f"size {size0} -> {size1} bytes")
            if mtime1 != mtime0:
                what.append("modification time changed")
            if (ino1, dev1) != (ino0, dev0):
                what.append("replaced by another file")
            raise DataFormatError(
                f"{name}: '{self.path}' changed while the training set was open ({', '.join(what)}); expected the file "
                "to stay unchanged while it is read: open it again to use its new contents"
            )


def _memmap_origin(x: np.ndarray) -> _MappedFile | None:
    """Origin of a C-contiguous numpy memmap's rows in its file, or None when it cannot be told."""
    if not isinstance(x, np.memmap) or not getattr(x, "filename", None):
        return None
    mode = getattr(x, "mode", None)
    path = Path(x.filename)
    try:
        stamp = _stamp(os.stat(path))
    except OSError:
        return None
    readonly = mode == "r"
    offset: int | None = None
    try:
        import mmap

        buf = np.frombuffer(x._mmap, dtype=np.uint8)  # the whole mapping, which starts at a granularity boundary
        start = int(x.offset) - int(x.offset) % mmap.ALLOCATIONGRANULARITY
        offset = start + (x.ctypes.data - buf.ctypes.data)
        del buf
        if offset < 0:
            offset = None
    except Exception:
        offset = None
    stride = int(x.strides[0]) if x.ndim else 0
    return _MappedFile(path, offset, stride, stamp, exact=readonly, pread=readonly)


def _read_exact(f: Any, buf: np.ndarray, pos: int, path: Path, name: str) -> None:
    """Fill buf from the file f at byte pos with explicit reads (no memory map: a file cut short cannot SIGBUS)."""
    view = memoryview(buf.reshape(-1).view(np.uint8))
    got = 0
    f.seek(pos)
    while got < len(view):
        k = f.readinto(view[got:])
        if not k:
            raise DataFormatError(
                f"{name}: '{path}' ended after {pos + got} bytes while rows were read from it (it was truncated while "
                "in use); expected the file to stay unchanged: open it again"
            )
        got += k


# ----------------------------------------------------------------------------------------------------------------------
# TrainingSet


class TrainingSet:
    """N training points of per-item shape ``shape``, served as a flattened float ``[N, d]`` view.

    Build one with a ``from_*`` constructor, :meth:`open`, :meth:`builtin`, :meth:`gaussian`, or :meth:`coerce`.
    ``TrainingSet(x, labels)`` is the same as :meth:`from_tensor`.

    A set is either in memory (a torch tensor on :attr:`device`) or out of core (``is_in_memory`` False: a
    read-only memory map of an ``.npy`` file whose pages load lazily as rows are read; :meth:`iter_chunks` reads its
    rows with explicit reads, a chunk at a time, after checking that the file did not change). An in-memory set is
    always checked finite when it is built; an out-of-core set is checked on the first :meth:`check_finite` call.
    An out-of-core set can be served in another dtype or on another device (:meth:`to`): the conversion then happens
    chunk by chunk in :meth:`iter_chunks` and the statistics, and :meth:`flat` materialises a converted copy.

    Tensors returned by :meth:`flat`, :meth:`tensor`, :meth:`iter_chunks` and the cached statistics share memory
    with the set: treat them as read-only. (A read-only array or memmap is wrapped without a copy; :meth:`flat` of
    such a set is a view of it that must not be written to, while :meth:`iter_chunks` yields copies.)

    Args:
        x: ``[N, d]`` or ``[N, *shape]`` float tensor or numpy array (float16, bfloat16, float32, float64).
        labels: optional integer class labels ``[N]``.
        value_range: optional ``(lo, hi)`` range of the values, used when points are shown as images.
        source: short description of where the data came from.
        name: argument name used in error messages.
    """

    def __init__(
        self,
        x: torch.Tensor | np.ndarray,
        labels: Any = None,
        *,
        value_range: tuple[float, float] | None = None,
        source: str | None = None,
        name: str = "train",
    ) -> None:
        in_memory, readonly, origin = True, False, None
        if isinstance(x, torch.Tensor):
            t = x.detach()
            if t.dtype not in FLOAT_DTYPES:
                hint = _INT_HINT + "'[-1,1]'" if not (t.dtype.is_floating_point or t.dtype.is_complex) else ""
                raise InputTypeError(
                    f"{name}: expected a float dtype (float16, bfloat16, float32 or float64), got {t.dtype}{hint}"
                )
            default_source = "tensor"
        elif isinstance(x, np.ndarray):
            dtype = _torch_float_of_numpy(x.dtype, name, "the array")
            in_memory = not isinstance(x, np.memmap)
            if not x.dtype.isnative:
                x, in_memory = x.astype(x.dtype.newbyteorder("=")), True
            if not in_memory and x.flags.c_contiguous:
                origin = _memmap_origin(x)
            readonly = not x.flags.writeable
            t = _torch_of_readonly(x) if readonly else torch.from_numpy(x)
            assert t.dtype == dtype
            default_source = "ndarray" if in_memory else "memmap"
        else:
            raise InputTypeError(
                f"{name}: expected a torch.Tensor or numpy.ndarray of shape [N, d] or [N, *shape], "
                f"got {type(x).__name__}"
            )
        if t.ndim < 2:
            raise InputError(f"{name}: expected [N, d] or [N, *shape], got a {t.ndim}-D input of shape {list(t.shape)}")
        n, shape = int(t.shape[0]), tuple(int(s) for s in t.shape[1:])
        if n == 0:
            raise InputError(f"{name}: empty training set (N = 0, shape {list(t.shape)}); expected at least one point")
        if math.prod(shape) == 0:
            raise InputError(f"{name}: expected points with at least one value each, got per-item shape {shape}")
        store = t.reshape(n, -1)
        if not store.is_contiguous():
            store, in_memory, readonly, origin = store.contiguous(), True, False, None
        self._setup(
            store,
            shape,
            labels=labels,
            value_range=value_range,
            source=source or default_source,
            name=name,
            in_memory=in_memory,
            dtype=store.dtype,
            device=store.device,
            check=True,
            readonly=readonly,
            file=origin if not in_memory else None,
        )

    # -- internal construction -----------------------------------------------------------------------------------------

    def _setup(
        self,
        store: torch.Tensor,
        shape: tuple[int, ...],
        *,
        labels: Any,
        value_range: Any,
        source: str,
        name: str,
        in_memory: bool,
        dtype: torch.dtype,
        device: torch.device,
        check: bool,
        readonly: bool = False,
        file: _MappedFile | None = None,
    ) -> None:
        self._store = store
        self._readonly = readonly  # the store is memory that must not be written (chunks are copied out of it)
        self._file = file  # where an out-of-core store's rows lie in its file
        self._shape = tuple(shape)
        self._n = int(store.shape[0])
        self._d = int(store.shape[1])
        self._dtype = dtype
        self._device = device
        self._name = name
        self._source = source
        self._in_memory = in_memory
        self._value_range = _check_value_range(value_range)
        self._labels = _check_labels(labels, self._n, device)
        self._bad_row: Any = _UNCHECKED
        self._sqnorms: torch.Tensor | None = None
        self._fingerprint: str | None = None
        self._mean: torch.Tensor | None = None
        self._names: _ItemNames | None = None
        self._conversions: list[str] = []
        if in_memory and check:
            self.check_finite()

    def _derive(
        self,
        store: torch.Tensor,
        *,
        in_memory: bool,
        labels: Any,
        check: bool,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
        readonly: bool = False,
        file: _MappedFile | None = None,
    ) -> TrainingSet:
        new = type(self).__new__(type(self))
        new._setup(
            store,
            self._shape,
            labels=labels,
            value_range=self._value_range,
            source=self._source,
            name=self._name,
            in_memory=in_memory,
            dtype=self._dtype if dtype is None else dtype,
            device=self._device if device is None else device,
            check=check,
            readonly=readonly,
            file=file,
        )
        new._names, new._conversions = self._names, list(self._conversions)
        return new

    def _chunk_rows(self, chunk_size: Any, dtype: torch.dtype) -> int:
        if chunk_size is None:
            return max(1, DEFAULT_CHUNK_BYTES // (self._d * (torch.finfo(dtype).bits // 8)))
        if not _is_int(chunk_size) or chunk_size < 1:
            raise InputError(f"chunk_size: expected a positive int or None, got {chunk_size!r}")
        return int(chunk_size)

    # -- properties --------------------------------------------------------------------------------------------------

    @property
    def shape(self) -> tuple[int, ...]:
        """Per-item shape, e.g. ``(3, 32, 32)`` or ``(d,)``."""
        return self._shape

    @property
    def n(self) -> int:
        """Number of points N."""
        return self._n

    def __len__(self) -> int:
        return self._n

    @property
    def d(self) -> int:
        """Values per point, ``prod(shape)``."""
        return self._d

    @property
    def dtype(self) -> torch.dtype:
        """Float dtype the points are served in."""
        return self._dtype

    @property
    def device(self) -> torch.device:
        """Device the points are served on."""
        return self._device

    @property
    def labels(self) -> torch.Tensor | None:
        """Integer class labels ``[N]`` (int64, on :attr:`device`), or None."""
        return self._labels

    @property
    def num_classes(self) -> int | None:
        """``max(labels) + 1``, or None without labels."""
        return None if self._labels is None else int(self._labels.max()) + 1

    @property
    def value_range(self) -> tuple[float, float] | None:
        """``(lo, hi)`` range of the values (images: the scale they were loaded with), or None if unknown."""
        return self._value_range

    @property
    def source(self) -> str:
        """Short human-readable origin, e.g. ``"npy:/data/x.npy (memmap)"`` or ``"builtin:digits"``."""
        return self._source

    @property
    def is_in_memory(self) -> bool:
        """False while the points are a memory map of a file (pages loaded lazily)."""
        return self._in_memory

    @property
    def conversions(self) -> list[str]:
        """What was done to the stored data when it was loaded or aligned, e.g. ``"dtype: uint8 scaled x / 127.5 - 1
        to [-1,1]"`` or a layout permutation (empty when served as stored)."""
        return list(self._conversions)

    def _item_names(self) -> _ItemNames:
        return self._names if self._names is not None else _ItemNames(self._name)

    def names(self, index: Any = None) -> list[str]:
        """Source names of rows: the file name within an image folder or EDM zip (``"00000/img00000017.png"``),
        else ``"source[row]"`` of arrays (``"train.npy[1234]"``, ``"samples.npz:arr_0[17]"``, ``"train[5]"`` for a
        tensor named train). Rows of a subset keep the names of the rows they were taken from.

        Args:
            index: None (all rows), an int, a slice, or integer row indices (tensor, array or list).

        Returns:
            list of str, one per selected row.
        """
        if index is None:
            rows = np.arange(self._n)
        elif isinstance(index, slice):
            rows = np.arange(self._n)[index]
        else:
            rows = _index_tensor(index, self._n).numpy()
        return self._item_names().get(rows)

    def __repr__(self) -> str:
        labels = "None" if self._labels is None else f"[{self._n}] ({self.num_classes} classes)"
        return (
            f"TrainingSet(n={self._n}, shape={self._shape}, dtype={_dtype_name(self._dtype)}, device={self._device}, "
            f"in_memory={self._in_memory}, labels={labels}, source={self._source!r})"
        )

    # -- views -------------------------------------------------------------------------------------------------------

    def flat(self) -> torch.Tensor:
        """All points as one ``[N, d]`` tensor.

        A view of the storage (for an ``.npy`` memmap, of the read-only file mapping: nothing is read until rows are
        touched, and it must not be written to). If an out-of-core set is served in another dtype or device (see
        :meth:`to`), this materialises a converted copy on every call; use :meth:`load` to keep one.

        Raises:
            DataFormatError: the file of an out-of-core set changed since it was opened.

        Returns:
            ``[N, d]`` tensor of :attr:`dtype` on :attr:`device`.
        """
        self._check_file()
        if self._store.dtype == self._dtype and self._store.device == self._device:
            return self._store
        return self._store.to(device=self._device, dtype=self._dtype)

    def tensor(self) -> torch.Tensor:
        """All points with their item shape, ``[N, *shape]`` (a view of :meth:`flat`)."""
        return self.flat().view(self._n, *self._shape)

    def __getitem__(self, idx: Any) -> torch.Tensor:
        """Rows with item shape: ``ts[i]`` is ``[*shape]``, ``ts[a:b]`` or ``ts[index]`` is ``[k, *shape]``."""
        self._check_file()
        rows = self._store.view(self._n, *self._shape)[idx]
        out = rows.to(device=self._device, dtype=self._dtype)
        return out.clone() if self._readonly and out.data_ptr() == rows.data_ptr() else out

    def _check_file(self) -> None:
        if self._file is not None:
            self._file.check(self._name)

    # -- conversions -------------------------------------------------------------------------------------------------

    def load(self) -> TrainingSet:
        """This set fully in memory (self if it already is), copied chunk by chunk and checked finite.

        Returns:
            in-memory TrainingSet with the same points ``[N, d]``, labels, dtype and device.
        """
        if self._in_memory:
            return self
        out = torch.empty((self._n, self._d), dtype=self._dtype, device=self._device)
        for start, chunk in self.iter_chunks():
            out[start : start + chunk.shape[0]].copy_(chunk)
        new = self._derive(out, in_memory=True, labels=self._labels, check=False)
        self._share_caches(new)
        new.check_finite()
        return new

    def _share_caches(self, new: TrainingSet, device: torch.device | None = None) -> None:
        """Copy the caches to a set holding the same values in the same dtype."""
        new._bad_row = self._bad_row
        new._fingerprint = self._fingerprint
        if self._sqnorms is not None:
            new._sqnorms = self._sqnorms.to(device or self._device)
        if self._mean is not None:
            new._mean = self._mean.to(device or self._device)

    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> TrainingSet:
        """The same points served on ``device`` and/or in ``dtype``.

        In-memory sets are converted at once (and checked finite again when the dtype changes: a narrowing cast can
        overflow). Out-of-core sets stay memory-mapped and convert chunk by chunk when read.

        Args:
            device: torch device (or string) to serve on; None keeps the current one.
            dtype: float dtype to serve; None keeps the current one.

        Returns:
            TrainingSet (self when nothing changes); labels move to the new device.
        """
        dev = self._device if device is None else _as_device(device)
        dt = self._dtype if dtype is None else _check_float_dtype(dtype, "dtype")
        if dev == self._device and dt == self._dtype:
            return self
        labels = None if self._labels is None else self._labels.to(dev)
        if self._in_memory:
            new = self._derive(
                self._store.to(device=dev, dtype=dt), in_memory=True, labels=labels, check=False, dtype=dt, device=dev
            )
        else:
            new = self._derive(
                self._store,
                in_memory=False,
                labels=labels,
                check=False,
                dtype=dt,
                device=dev,
                readonly=self._readonly,
                file=self._file,
            )
        if dt == self._dtype:
            self._share_caches(new, dev)
        elif self._in_memory:
            new.check_finite()
        return new

    def subset(self, index: Any) -> TrainingSet:
        """The rows selected by ``index``, with their labels.

        A slice with a positive step gives a view (out-of-core sets stay out of core); any other index gathers the
        selected rows into memory.

        Args:
            index: slice, int, or integer tensor / array / list of row indices (negative allowed), or a boolean
                mask ``[N]``.

        Returns:
            TrainingSet of the selected ``k`` rows ``[k, d]``.
        """
        if isinstance(index, slice):
            start, stop, step = index.indices(self._n)
            if step > 0:
                store = self._store[start:stop:step]
                if store.shape[0] == 0:
                    raise InputError(f"index: {index!r} selects no rows of {self._n}; expected a non-empty subset")
                labels = None if self._labels is None else self._labels[start:stop:step]
                file = None if self._file is None else self._file.rows(start, step)
                new = self._derive(
                    store, in_memory=self._in_memory, labels=labels, check=False, readonly=self._readonly, file=file
                )
                new._names = self._item_names().select(np.arange(start, stop, step)[: store.shape[0]])
                if self._bad_row is None:
                    new._bad_row = None
                return new
            index = torch.arange(start, stop, step)
        idx = _index_tensor(index, self._n)
        self._check_file()
        store = self._store.index_select(0, idx.to(self._store.device)).to(device=self._device, dtype=self._dtype)
        labels = None if self._labels is None else self._labels[idx.to(self._labels.device)]
        known_finite = self._bad_row is None
        new = self._derive(store, in_memory=True, labels=labels, check=not known_finite)
        new._names = self._item_names().select(idx.numpy())
        if known_finite:
            new._bad_row = None
        return new

    # -- streaming -----------------------------------------------------------------------------------------------------

    def iter_chunks(
        self, chunk_size: int | None = None, *, device: Any = None, dtype: torch.dtype | None = None
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Iterate over the points in consecutive row blocks with bounded memory.

        Args:
            chunk_size: rows per chunk; None picks about ``DEFAULT_CHUNK_BYTES`` (64 MiB) per chunk in ``dtype``.
            device: device of the yielded chunks; None means :attr:`device`.
            dtype: float dtype of the yielded chunks; None means :attr:`dtype`.

        Yields:
            ``(start, chunk)``: the first row index and a contiguous ``[n_c, d]`` tensor of rows
            ``start .. start + n_c - 1``. Every row is yielded exactly once, in order.
        """
        dev = self._device if device is None else _as_device(device)
        dt = self._dtype if dtype is None else _check_float_dtype(dtype, "dtype")
        rows = self._chunk_rows(chunk_size, dt)
        return self._chunks(rows, dev, dt)

    def _chunks(self, rows: int, dev: torch.device, dt: torch.dtype) -> Iterator[tuple[int, torch.Tensor]]:
        # Narrow to the served dtype first, so that every consumer sees the values the kernels see.
        if self._file is not None:
            yield from self._file_chunks(rows, dev, dt)
            return
        for start in range(0, self._n, rows):
            src = self._store[start : start + rows]
            chunk = src.to(device=dev, dtype=self._dtype).to(dtype=dt).contiguous()
            if (self._readonly or not self._in_memory) and chunk.data_ptr() == src.data_ptr():
                chunk = chunk.clone()  # never hand out a view of read-only memory or of a file mapping
            yield start, chunk

    def _file_chunks(self, rows: int, dev: torch.device, dt: torch.dtype) -> Iterator[tuple[int, torch.Tensor]]:
        """Chunks of a file-backed store, each a fresh copy read after checking the file did not change: with
        explicit reads from the file when the rows are contiguous in it, else copied out of the (read-only) map."""
        origin = self._file
        assert origin is not None
        row_bytes = self._d * self._store.element_size()
        np_dtype = torch.empty(0, dtype=self._store.dtype).numpy().dtype
        use_read = origin.pread and origin.offset is not None and origin.stride == row_bytes
        f = None
        try:
            if use_read:
                try:
                    f = open(origin.path, "rb", buffering=0)  # noqa: SIM115 (closed in finally)
                except OSError as e:
                    raise DataFormatError(f"{self._name}: cannot read '{origin.path}' any more ({e})") from e
            for start in range(0, self._n, rows):
                m = min(rows, self._n - start)
                origin.check(self._name)  # the path still names the file opened (not replaced, same size and time)
                if f is not None:
                    origin.check(self._name, os.fstat(f.fileno()))  # and the file read from is that file
                    buf = np.empty((m, self._d), dtype=np_dtype)
                    _read_exact(f, buf, origin.offset + start * row_bytes, origin.path, self._name)
                    chunk = torch.from_numpy(buf)
                else:
                    chunk = torch.empty((m, self._d), dtype=self._store.dtype)
                    chunk.copy_(self._store[start : start + m])
                yield start, chunk.to(device=dev, dtype=self._dtype).to(dtype=dt).contiguous()
        finally:
            if f is not None:
                f.close()

    def iter_chunks_with_labels(
        self, chunk_size: int | None = None, *, device: Any = None, dtype: torch.dtype | None = None
    ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor | None]]:
        """Like :meth:`iter_chunks`, also yielding the labels of each chunk.

        Yields:
            ``(start, chunk [n_c, d], labels [n_c] int64 or None)``, labels on the chunk's device.
        """
        for start, chunk in self.iter_chunks(chunk_size, device=device, dtype=dtype):
            labels = None
            if self._labels is not None:
                labels = self._labels[start : start + chunk.shape[0]].to(chunk.device)
            yield start, chunk, labels

    # -- statistics --------------------------------------------------------------------------------------------------

    def check_finite(self) -> None:
        """Raise :class:`InputError` if any value is NaN or Inf; the outcome is cached, so repeats are free.

        Raises:
            InputError: ``"train: contains NaN or Inf (first at row R)"``.
        """
        if self._bad_row is _UNCHECKED:
            from diffgen_fast.ops._checks import first_nonfinite_row

            bad_row, norms = None, []
            for start, chunk in self.iter_chunks():
                bad, nn = first_nonfinite_row(chunk)
                if bad is not None:
                    bad_row = start + bad
                    break
                norms.append(nn)
            self._bad_row = bad_row
            # the native scan's float64 squared norms are the sqnorms() cache, for free
            if bad_row is None and self._sqnorms is None and norms and all(t is not None for t in norms):
                self._sqnorms = torch.cat(norms).to(self._device)
        if self._bad_row is not None:
            raise InputError(f"{self._name}: contains NaN or Inf (first at row {self._bad_row})")

    def sqnorms(self) -> torch.Tensor:
        """Squared Euclidean norms of the points, computed in float64 by chunks and cached.

        Returns:
            ``[N]`` float64 tensor on :attr:`device`.
        """
        if self._sqnorms is None:
            out = torch.empty(self._n, dtype=torch.float64, device=self._device)
            for start, chunk in self.iter_chunks(self._chunk_rows(None, torch.float64)):
                x = chunk.to(torch.float64)
                out[start : start + x.shape[0]] = (x * x).sum(dim=1)
            self._sqnorms = out
        return self._sqnorms

    def fingerprint(self) -> str:
        """SHA-256 hex digest of the shape, dtype, N and the data bytes (native byte order), streamed and cached."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            h.update(
                f"diffgen-fast.TrainingSet;shape={list(self._shape)};dtype={_dtype_name(self._dtype)};n={self._n};".encode()
            )
            for _, chunk in self.iter_chunks(device="cpu"):
                h.update(chunk.view(torch.uint8).numpy())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def _moments(self, second: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Mean and (optionally) the scatter matrix sum (x - mean)(x - mean)^T, merged chunk by chunk (Chan et al.)."""
        count, mean, scatter = 0, None, None
        for _, chunk in self.iter_chunks(self._chunk_rows(None, torch.float64)):
            x = chunk.to(torch.float64)
            n_b = x.shape[0]
            mean_b = x.mean(dim=0)
            scatter_b = None
            if second:
                xc = x - mean_b
                scatter_b = xc.T @ xc
            if mean is None:
                count, mean, scatter = n_b, mean_b, scatter_b
                continue
            total = count + n_b
            delta = mean_b - mean
            mean = mean + delta * (n_b / total)
            if second:
                scatter = scatter + scatter_b + torch.outer(delta, delta) * (count * n_b / total)
            count = total
        assert mean is not None
        return mean, scatter

    def mean(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Mean point, accumulated in float64 over chunks (cached).

        Args:
            dtype: float dtype of the result.

        Returns:
            ``[d]`` tensor on :attr:`device`.
        """
        dtype = _check_float_dtype(dtype, "dtype")
        if self._mean is None:
            self._mean, _ = self._moments(second=False)
        return self._mean.to(dtype)

    def covariance(self, dtype: torch.dtype = torch.float64, *, ddof: int = 0) -> torch.Tensor:
        """Covariance of the points, accumulated in float64 with a chunk-wise Chan merge (not cached).

        The default ``ddof=0`` is the covariance of the empirical distribution (``np.cov(x.T, bias=True)``); pass
        ``ddof=1`` for the unbiased estimate.

        Args:
            dtype: float dtype of the result.
            ddof: delta degrees of freedom; the scatter matrix is divided by ``N - ddof``.

        Returns:
            ``[d, d]`` tensor on :attr:`device`.
        """
        dtype = _check_float_dtype(dtype, "dtype")
        if not _is_int(ddof) or ddof < 0 or self._n - ddof <= 0:
            raise InputError(f"ddof: expected an int in [0, N) with N = {self._n}, got {ddof!r}")
        mean, scatter = self._moments(second=True)
        assert scatter is not None
        if self._mean is None:
            self._mean = mean
        return (scatter / (self._n - ddof)).to(dtype)

    # -- constructors --------------------------------------------------------------------------------------------------

    @classmethod
    def from_tensor(
        cls,
        x: torch.Tensor | np.ndarray,
        labels: Any = None,
        *,
        value_range: tuple[float, float] | None = None,
        source: str | None = None,
        name: str = "train",
    ) -> TrainingSet:
        """Wrap an array of points; shares memory with ``x`` when it is contiguous.

        Args:
            x: ``[N, d]`` (item shape ``(d,)``) or ``[N, *shape]`` float tensor or numpy array (float16, bfloat16,
                float32 or float64, kept as given; integer and bool data are refused).
            labels: optional integer class labels ``[N]`` (tensor, array or list).
            value_range: optional ``(lo, hi)`` of the values; None when unknown.
            source: short origin description; defaults to ``"tensor"`` / ``"ndarray"``.
            name: argument name used in error messages.

        Returns:
            TrainingSet, in memory (out of core for a numpy memmap), on ``x``'s device.
        """
        return cls(x, labels, value_range=value_range, source=source, name=name)

    @staticmethod
    def coerce(obj: Any, name: str = "train") -> TrainingSet:
        """Turn what a caller passed as a training set into a :class:`TrainingSet`.

        Args:
            obj: a TrainingSet (returned as is), a ``[N, d]`` / ``[N, *shape]`` float tensor or numpy array, or a
                path (str / os.PathLike, opened with :meth:`open`).
            name: argument name used in error messages.

        Returns:
            TrainingSet.
        """
        if isinstance(obj, TrainingSet):
            return obj
        if isinstance(obj, (torch.Tensor, np.ndarray)):
            return TrainingSet.from_tensor(obj, name=name)
        if isinstance(obj, (str, os.PathLike)):
            return TrainingSet.open(obj, name=name)
        raise InputTypeError(
            f"{name}: expected a TrainingSet, a torch.Tensor or numpy.ndarray of shape [N, d] or [N, *shape], or a "
            f"path, got {type(obj).__name__}"
        )

    @classmethod
    def from_npy(
        cls, path: PathLike, mmap: bool = True, *, scale: str | None = None, name: str = "train"
    ) -> TrainingSet:
        """Load an ``.npy`` file of shape ``[N, d]`` or ``[N, *shape]`` (float16, float32 or float64, or uint8 pixels).

        Args:
            path: the file.
            mmap: memory-map it read-only (nothing is read until rows are used, nothing is ever written; the file
                may be larger than memory: :meth:`iter_chunks` reads it a chunk at a time); False reads it into
                memory. Fortran-ordered or big-endian files are always read into memory.
            scale: how uint8 pixels (e.g. guided-diffusion's ``[N, H, W, C]`` sample arrays) become floats, as the
                image loaders: ``"[-1,1]"`` (default), ``"[0,1]"`` or ``"[0,255]"``; read into memory as float32,
                recorded in :attr:`conversions`. Float data is served as stored (scale is not applied).
            name: argument name used in error messages.

        Returns:
            TrainingSet, out of core when memory-mapped.
        """
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
            return cls._from_uint8(arr, scale, None, name, f"npy:{p}", p.name)
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

    @classmethod
    def _from_uint8(cls, u8: np.ndarray, scale: str | None, labels: Any, name: str, source: str, prefix: str):
        scale = "[-1,1]" if scale is None else scale
        x = _scale_uint8(u8, scale)
        out = cls(x, labels, value_range=_SCALE_RANGE[scale], source=f"{source} (uint8 scaled to {scale})", name=name)
        out._names = _ItemNames(prefix)
        out._conversions = [_scale_note(scale)]
        return out

    @classmethod
    def from_npz(
        cls,
        path: PathLike,
        key: str | None = None,
        *,
        scale: str | None = None,
        max_member_bytes: int | None = None,
        name: str = "train",
    ) -> TrainingSet:
        """Load the points (and labels) from an ``.npz`` archive.

        Args:
            path: the file.
            key: array holding the points ``[N, d]`` / ``[N, *shape]``; None takes the only non-label array, else the
                first of ``"x"``, ``"data"``, ``"arr_0"``, ``"images"``. Labels come from ``"labels"`` or ``"y"``.
            scale: how uint8 pixels (guided-diffusion / ADM sample archives: ``arr_0`` uint8 ``[N, H, W, C]``)
                become floats, as the image loaders: ``"[-1,1]"`` (default), ``"[0,1]"`` or ``"[0,255]"``; recorded
                in :attr:`conversions`. Float data is served as stored (scale is not applied).
            max_member_bytes: largest uncompressed size of an array that is read (an array declaring more is
                refused with DataFormatError); None means ``$DIFFGEN_FAST_MAX_MEMBER_BYTES`` or
                :data:`MAX_MEMBER_BYTES`.
            name: argument name used in error messages.

        Returns:
            in-memory TrainingSet.
        """
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
            return cls._from_uint8(x, scale, labels, name, f"npz:{p}[{key}]", f"{p.name}:{key}")
        out = cls(x, labels, name=name, source=f"npz:{p}[{key}]")
        out._names = _ItemNames(f"{p.name}:{key}")
        return out

    @classmethod
    def from_image_folder(
        cls, path: PathLike, scale: str = "[-1,1]", *, cache: PathLike | None = None, name: str = "train"
    ) -> TrainingSet:
        """Load every image under a folder (recursively), sorted by relative path.

        All images must share one size and (normalised) mode: L -> 1 channel, LA -> 2, RGB -> 3, RGBA -> 4
        (palette images become RGB/RGBA, 1-bit L). Labels come from a ``dataset.json`` at the root in EDM's format
        (``{"labels": [["00000/img00000000.png", 6], ...]}``), if present.

        Args:
            path: the folder.
            scale: ``"[-1,1]"`` (x / 127.5 - 1), ``"[0,1]"`` (x / 255) or ``"[0,255]"`` (raw values).
            cache: None (decode into memory) or a folder / ``.npy`` path: the images are decoded one chunk at a
                time into a float32 ``.npy`` there (bounded memory, for sets larger than memory), reused while the
                files are unchanged, and the set is served memory-mapped from it.
            name: argument name used in error messages.

        Returns:
            in-memory float32 TrainingSet of shape ``(C, H, W)`` with ``value_range`` set by ``scale``.
        """
        _check_scale(scale)
        root = _existing_dir(path, name)
        files = sorted(
            (q.relative_to(root).as_posix(), q)
            for q in root.rglob("*")
            if q.suffix.lower() in IMAGE_EXTENSIONS and q.is_file()
        )
        if not files:
            raise InputError(
                f"{name}: empty training set: no image files ({', '.join(IMAGE_EXTENSIONS)}) under '{root}'"
            )
        table = None
        meta = root / "dataset.json"
        if meta.is_file():
            table = _parse_edm_labels(meta.read_bytes(), f"'{meta}'", name)
        labels = _labels_for([rel for rel, _ in files], table, f"'{meta}'", name)
        entries = [(rel, lambda q=q: q) for rel, q in files]
        if cache is not None:
            stats = [(rel, q.stat().st_size, q.stat().st_mtime_ns) for rel, q in files]
            digest = hashlib.sha256(repr(stats).encode()).hexdigest()
            stamp = {"source": str(root.resolve()), "scale": scale, "files": digest}
            return cls._from_image_cache(entries, f"'{root}'", name, scale, cache, stamp, labels, f"images:{root}")
        u8 = _stack_images(entries, f"'{root}'", name)
        out = cls(_scale_images(u8, scale), labels, value_range=_SCALE_RANGE[scale], source=f"images:{root}", name=name)
        return out._image_names([rel for rel, _ in entries], scale)

    def _image_names(self, files: list[str], scale: str) -> TrainingSet:
        self._names = _ItemNames("", files=files)
        self._conversions = [_scale_note(scale, "8-bit images")]
        return self

    @classmethod
    def _from_image_cache(cls, entries, where, name, scale, cache, stamp, labels, source) -> TrainingSet:
        dst = _as_path(cache, "cache")
        if dst.suffix != ".npy":
            dst = dst / f"{name}-{stamp['files'][:16]}.npy"
        if not _cache_is_current(dst, stamp):
            _images_to_npy(entries, where, name, scale, dst, stamp)
        out = cls.from_npy(dst, name=name)
        out._labels = _check_labels(labels, out._n, out._device)
        out._value_range = _SCALE_RANGE[scale]
        out._source = f"{source} (cached as {dst}, memmap)"
        return out._image_names([rel for rel, _ in entries], scale)

    @classmethod
    def from_edm_zip(
        cls,
        path: PathLike,
        scale: str = "[-1,1]",
        *,
        cache: PathLike | None = None,
        max_member_bytes: int | None = None,
        name: str = "train",
    ) -> TrainingSet:
        """Load an EDM ``dataset_tool.py`` zip: image members plus an optional ``dataset.json`` with labels.

        Members are read straight from the archive (nothing is extracted), sorted by name. Member names that are
        absolute or contain ``..`` are refused, as are corrupt archives and entries.

        Args:
            path: the zip file.
            scale: ``"[-1,1]"``, ``"[0,1]"`` or ``"[0,255]"`` (see :meth:`from_image_folder`).
            cache: as in :meth:`from_image_folder`: stream the decoded images into a memory-mapped ``.npy``.
            max_member_bytes: largest uncompressed size of one entry that is read (larger ones are refused with
                DataFormatError); None means ``$DIFFGEN_FAST_MAX_MEMBER_BYTES`` or :data:`MAX_MEMBER_BYTES`.
            name: argument name used in error messages.

        Returns:
            in-memory float32 TrainingSet of shape ``(C, H, W)``; labels from ``dataset.json`` (None if null/absent).
            Labels must be ints in ``[0, MAX_CLASS_LABEL]``, one per image.
        """
        _check_scale(scale)
        limit = _member_limit(max_member_bytes)
        p = _existing_file(path, name)
        where = f"'{p}'"
        try:
            zf = zipfile.ZipFile(p)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
            raise DataFormatError(
                f"{name}: {where} is not a readable zip archive ({e}); expected an EDM dataset zip"
            ) from e
        with zf:
            infos = zf.infolist()
            for info in infos:
                _check_member_name(info.filename, where, name)
            members = sorted(
                i.filename
                for i in infos
                if not i.is_dir() and PurePosixPath(i.filename).suffix.lower() in IMAGE_EXTENSIONS
            )
            if len(set(members)) != len(members):
                raise DataFormatError(f"{name}: {where} has duplicate image entries; expected unique member names")
            if not members:
                raise InputError(f"{name}: empty training set: no image entries in {where}")
            table = None
            if "dataset.json" in zf.namelist():
                raw = _zip_read(zf, "dataset.json", where, name, limit)
                table = _parse_edm_labels(raw, f"dataset.json in {where}", name)
            labels = _labels_for(members, table, f"dataset.json in {where}", name)
            for info in infos:
                if info.filename in members:
                    _check_member_size(info.file_size, info.filename, where, name, limit, info.compress_size)
            entries = [(m, lambda m=m: _zip_read(zf, m, where, name, limit)) for m in members]
            if cache is not None:
                st = p.stat()
                stamp = {"source": str(p.resolve()), "scale": scale, "files": hashlib.sha256(
                    repr((members, st.st_size, st.st_mtime_ns)).encode()).hexdigest()}  # fmt: skip
                return cls._from_image_cache(entries, where, name, scale, cache, stamp, labels, f"edm-zip:{p}")
            u8 = _stack_images(entries, where, name)
        out = cls(_scale_images(u8, scale), labels, value_range=_SCALE_RANGE[scale], source=f"edm-zip:{p}", name=name)
        return out._image_names(members, scale)

    @classmethod
    def from_cifar10(
        cls,
        path: PathLike,
        split: str = "train",
        scale: str = "[-1,1]",
        *,
        max_member_bytes: int | None = None,
        name: str = "train",
    ) -> TrainingSet:
        """Load CIFAR-10 (python version) from its batches directory or its ``.tar.gz``, without extracting.

        The batches are pickles; they are read with an unpickler that can only rebuild dicts, lists, bytes and
        numpy arrays and refuses any other global (no code from the file runs).

        Args:
            path: the ``cifar-10-batches-py`` directory, a folder containing it or ``cifar-10-python.tar.gz``, or
                the tar archive itself.
            split: ``"train"`` (data_batch_1..5, 50000 images) or ``"test"`` (test_batch, 10000 images).
            scale: ``"[-1,1]"``, ``"[0,1]"`` or ``"[0,255]"`` (see :meth:`from_image_folder`).
            max_member_bytes: largest declared size of a batch read from a tar archive (larger ones are refused
                with DataFormatError); None means ``$DIFFGEN_FAST_MAX_MEMBER_BYTES`` or :data:`MAX_MEMBER_BYTES`.
            name: argument name used in error messages.

        Returns:
            in-memory float32 TrainingSet of shape ``(3, 32, 32)`` with int64 labels 0..9.
        """
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

    @classmethod
    def builtin(cls, name: str) -> TrainingSet:
        """A small data set that ships with a dependency.

        Args:
            name: ``"digits"``: scikit-learn's 1797 8x8 handwritten digits, values 0..16 mapped to [-1, 1] by
                x / 8 - 1, shape ``(1, 8, 8)``, float32, labels 0..9.

        Returns:
            in-memory TrainingSet.
        """
        key = name.lower() if isinstance(name, str) else name
        if key == "digits":
            from sklearn.datasets import load_digits

            bunch = load_digits()
            x = (np.asarray(bunch.data, dtype=np.float64) / 8.0 - 1.0).astype(np.float32).reshape(-1, 1, 8, 8)
            return cls(x, np.asarray(bunch.target), value_range=(-1.0, 1.0), source="builtin:digits")
        raise InputError(f"name: unknown built-in data set {name!r}; expected one of {', '.join(BUILTINS)}")

    @classmethod
    def gaussian(
        cls,
        n: int,
        d: int,
        mean: float = 0.0,
        std: float = 1.0,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> TrainingSet:
        """``n`` samples of the isotropic Gaussian N(mean * 1, std^2 I) in ``d`` dimensions, reproducible by seed.

        Args:
            n: number of points.
            d: dimension; the item shape is ``(d,)``.
            mean: value of every coordinate of the mean.
            std: standard deviation per coordinate (>= 0).
            seed: seed of the torch.Generator that draws the points.
            dtype: float dtype (drawn in float32, or float64 for float64, then cast).

        Returns:
            in-memory TrainingSet ``[n, d]``.
        """
        if not _is_int(n) or n < 1:
            raise InputError(f"n: expected a positive int number of points (no empty training set), got {n!r}")
        if not _is_int(d) or d < 1:
            raise InputError(f"d: expected a positive int dimension, got {d!r}")
        if not _is_int(seed):
            raise InputTypeError(f"seed: expected an int, got {type(seed).__name__}")
        try:
            mean_f, std_f = float(mean), float(std)
        except (TypeError, ValueError) as e:
            raise InputTypeError(f"mean, std: expected real numbers, got {mean!r}, {std!r}") from e
        if not math.isfinite(mean_f):
            raise InputError(f"mean: expected a finite number, got {mean!r}")
        if not (math.isfinite(std_f) and std_f >= 0):
            raise InputError(f"std: expected a finite number >= 0, got {std!r}")
        dtype = _check_float_dtype(dtype, "dtype")
        gen = torch.Generator().manual_seed(int(seed))
        draw = torch.float64 if dtype == torch.float64 else torch.float32
        x = torch.randn(int(n), int(d), generator=gen, dtype=draw).mul_(std_f).add_(mean_f).to(dtype)
        source = f"gaussian(n={n}, d={d}, mean={mean_f:g}, std={std_f:g}, seed={seed})"
        return cls(x, source=source)

    @classmethod
    def open(cls, path: PathLike, **kw: Any) -> TrainingSet:
        """Open a training set from disk, picking the loader by suffix and contents.

        ``.npy`` -> :meth:`from_npy`, ``.npz`` -> :meth:`from_npz`, ``.zip`` -> :meth:`from_edm_zip`, ``.tar.gz`` /
        ``.tgz`` / ``.tar`` or a directory holding CIFAR-10 batches -> :meth:`from_cifar10`, any other directory ->
        :meth:`from_image_folder`. A file without a known suffix is recognised by its magic bytes.

        Args:
            path: file or directory.
            **kw: options of the chosen loader (``mmap``, ``key``, ``scale``, ``split``, ``cache``,
                ``max_member_bytes``) and ``name``.

        Returns:
            TrainingSet.
        """
        name = kw.get("name", "train")
        p = _as_path(path, name)
        _require_exists(p, name)
        kind = _sniff(p, name)
        loader, options = {
            "npy": (cls.from_npy, {"mmap", "scale"}),
            "npz": (cls.from_npz, {"key", "scale", "max_member_bytes"}),
            "zip": (cls.from_edm_zip, {"scale", "cache", "max_member_bytes"}),
            "cifar": (cls.from_cifar10, {"split", "scale", "max_member_bytes"}),
            "images": (cls.from_image_folder, {"scale", "cache"}),
        }[kind]
        options = options | {"name"}
        bad = sorted(set(kw) - options)
        if bad:
            raise InputError(f"{bad[0]}: not an option for {kind} input '{p}'; expected one of {sorted(options)}")
        return loader(p, **kw)
