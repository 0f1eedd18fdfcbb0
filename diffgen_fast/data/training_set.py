"""The :class:`TrainingSet`: N points of one per-item shape, served as a flattened ``[N, d]`` float view, whole or in
bounded chunks.

A set is held in memory (a torch tensor on any device) or out of core (a read-only memory map of an ``.npy`` file,
whose pages load lazily). Chunks of a file-backed set are read with explicit reads into fresh buffers (never handed
out as views of the map), and the file is checked unchanged (size, modification time, inode) before every chunk: a
file truncated or rewritten while in use raises :class:`~diffgen_fast.errors.DataFormatError` naming it instead of
killing the process (SIGBUS). Per-set statistics that several consumers need (squared norms, mean, covariance,
finiteness, a content fingerprint) are streamed over chunks with float64 accumulation and cached.

The ``from_*`` constructors, :meth:`TrainingSet.builtin` and :meth:`TrainingSet.gaussian` keep their signatures and
documentation here and call the reader of their format in :mod:`diffgen_fast.data.formats`.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffgen_fast.data._checks import (
    _INT_HINT,
    FLOAT_DTYPES,
    PathLike,
    _as_device,
    _as_path,
    _check_float_dtype,
    _check_labels,
    _check_value_range,
    _dtype_name,
    _index_tensor,
    _is_int,
    _require_exists,
    _torch_float_of_numpy,
)
from diffgen_fast.errors import DataFormatError, InputError, InputTypeError

#: Target size in bytes of one chunk yielded by :meth:`TrainingSet.iter_chunks` when no chunk_size is given.
DEFAULT_CHUNK_BYTES = 64 << 20
_UNCHECKED = object()


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
        from diffgen_fast.data.formats import npy

        return npy.from_npy(cls, path, mmap, scale=scale, name=name)

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
        from diffgen_fast.data.formats import npy

        return npy.from_npz(cls, path, key, scale=scale, max_member_bytes=max_member_bytes, name=name)

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
        from diffgen_fast.data.formats import images

        return images.from_image_folder(cls, path, scale, cache=cache, name=name)

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
        from diffgen_fast.data.formats import images

        return images.from_edm_zip(cls, path, scale, cache=cache, max_member_bytes=max_member_bytes, name=name)

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
        from diffgen_fast.data.formats import cifar

        return cifar.from_cifar10(cls, path, split, scale, max_member_bytes=max_member_bytes, name=name)

    @classmethod
    def builtin(cls, name: str) -> TrainingSet:
        """A small data set that ships with a dependency.

        Args:
            name: ``"digits"``: scikit-learn's 1797 8x8 handwritten digits, values 0..16 mapped to [-1, 1] by
                x / 8 - 1, shape ``(1, 8, 8)``, float32, labels 0..9.

        Returns:
            in-memory TrainingSet.
        """
        from diffgen_fast.data.formats import builtin

        return builtin.builtin(cls, name)

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
        from diffgen_fast.data.formats import builtin

        return builtin.gaussian(cls, n, d, mean, std, seed, dtype)

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
        from diffgen_fast.data import formats

        name = kw.get("name", "train")
        p = _as_path(path, name)
        _require_exists(p, name)
        kind = formats._sniff(p, name)
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
