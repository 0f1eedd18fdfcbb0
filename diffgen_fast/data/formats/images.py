"""Images: folders of image files and EDM ``dataset_tool`` zips (members read straight from the archive, labels from
an EDM ``dataset.json``), decoded with Pillow, optionally streamed a chunk at a time into a memory-mapped float32
``.npy`` cache; read by :meth:`TrainingSet.from_image_folder` and :meth:`TrainingSet.from_edm_zip`.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import numpy as np
import torch

from diffgen_fast.data._checks import (
    _SCALE_RANGE,
    PathLike,
    _as_path,
    _check_labels,
    _check_scale,
    _existing_dir,
    _existing_file,
)
from diffgen_fast.data.formats._archive import _check_member_name, _check_member_size, _member_limit, _zip_read
from diffgen_fast.data.formats._pixels import _scale_images, _scale_note
from diffgen_fast.data.training_set import _ItemNames
from diffgen_fast.errors import DataFormatError, InputError

if TYPE_CHECKING:
    from diffgen_fast.data.training_set import TrainingSet

#: File suffixes (lower case) read as images by the folder and zip loaders.
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".pbm", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")
#: Largest class label accepted from an EDM ``dataset.json`` (labels must be ints in ``[0, MAX_CLASS_LABEL]``).
MAX_CLASS_LABEL = (1 << 24) - 1
_IMAGE_CHANNELS = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}
_IMAGE_CONVERT = {"1": "L", "La": "LA", "PA": "RGBA", "RGBa": "RGBA", "RGBX": "RGB", "CMYK": "RGB", "YCbCr": "RGB"}


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


def _image_names(ts: TrainingSet, files: list[str], scale: str) -> TrainingSet:
    ts._names = _ItemNames("", files=files)
    ts._conversions = [_scale_note(scale, "8-bit images")]
    return ts


def _from_image_cache(cls, entries, where, name, scale, cache, stamp, labels, source) -> TrainingSet:
    """A set of images decoded into the float32 ``.npy`` cache (built when missing or stale), memory-mapped."""
    dst = _as_path(cache, "cache")
    if dst.suffix != ".npy":
        dst = dst / f"{name}-{stamp['files'][:16]}.npy"
    if not _cache_is_current(dst, stamp):
        _images_to_npy(entries, where, name, scale, dst, stamp)
    out = cls.from_npy(dst, name=name)
    out._labels = _check_labels(labels, out._n, out._device)
    out._value_range = _SCALE_RANGE[scale]
    out._source = f"{source} (cached as {dst}, memmap)"
    return _image_names(out, [rel for rel, _ in entries], scale)


def from_image_folder(
    cls, path: PathLike, scale: str = "[-1,1]", *, cache: PathLike | None = None, name: str = "train"
) -> TrainingSet:
    """See :meth:`TrainingSet.from_image_folder`."""
    _check_scale(scale)
    root = _existing_dir(path, name)
    files = sorted(
        (q.relative_to(root).as_posix(), q)
        for q in root.rglob("*")
        if q.suffix.lower() in IMAGE_EXTENSIONS and q.is_file()
    )
    if not files:
        raise InputError(f"{name}: empty training set: no image files ({', '.join(IMAGE_EXTENSIONS)}) under '{root}'")
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
        return _from_image_cache(cls, entries, f"'{root}'", name, scale, cache, stamp, labels, f"images:{root}")
    u8 = _stack_images(entries, f"'{root}'", name)
    out = cls(_scale_images(u8, scale), labels, value_range=_SCALE_RANGE[scale], source=f"images:{root}", name=name)
    return _image_names(out, [rel for rel, _ in entries], scale)


def from_edm_zip(
    cls,
    path: PathLike,
    scale: str = "[-1,1]",
    *,
    cache: PathLike | None = None,
    max_member_bytes: int | None = None,
    name: str = "train",
) -> TrainingSet:
    """See :meth:`TrainingSet.from_edm_zip`."""
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
            i.filename for i in infos if not i.is_dir() and PurePosixPath(i.filename).suffix.lower() in IMAGE_EXTENSIONS
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
            return _from_image_cache(cls, entries, where, name, scale, cache, stamp, labels, f"edm-zip:{p}")
        u8 = _stack_images(entries, where, name)
    out = cls(_scale_images(u8, scale), labels, value_range=_SCALE_RANGE[scale], source=f"edm-zip:{p}", name=name)
    return _image_names(out, members, scale)
