"""The one place Python touches the native extension ``diffgen_fast._C``.

``_C`` takes raw pointers (``tensor.data_ptr()``), shapes and dtype names, and knows nothing of torch. This module
turns CPU tensors into those arguments after checking them, so everything above it speaks tensors. The import of
``_C`` is lazy and never raises: ``available()`` says whether the extension can be used, ``unavailable_reason()``
why not. Setting ``DIFFGEN_FAST_DISABLE_EXT=1`` makes it unavailable (read on every call), so tests and users can
force the pure-torch fallback. Functions that need the extension raise ``BackendUnavailableError`` without it.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any

import torch

from diffgen_fast.errors import BackendUnavailableError, InputError, InputTypeError
from diffgen_fast.ops.merge import SoftmaxState

DISABLE_ENV = "DIFFGEN_FAST_DISABLE_EXT"

_module: ModuleType | None = None
_import_error: str | None = None
_import_tried = False

_O_DTYPES = {torch.float32: "float32", torch.float64: "float64"}


def _disabled_value() -> str | None:
    value = os.environ.get(DISABLE_ENV, "").strip()
    return value if value.lower() in {"1", "true", "yes", "on"} else None


def _load() -> ModuleType | None:
    global _module, _import_error, _import_tried
    if _disabled_value() is not None:
        return None
    if not _import_tried:
        try:
            from diffgen_fast import _C
        except (ImportError, OSError) as exc:
            _import_error = (
                f"cannot import diffgen_fast._C: {exc} (not built, or built for another Python/platform; "
                "reinstall with DIFFGEN_FAST_BUILD_EXT=1 pip install -v . to see the build error)"
            )
        else:
            _module = _C
        _import_tried = True
    return _module


def available() -> bool:
    """True when the native extension is built, importable, and not disabled by DIFFGEN_FAST_DISABLE_EXT."""
    return _load() is not None


def unavailable_reason() -> str | None:
    """Why the native extension cannot be used (the ImportError text, or the env override); None when it can."""
    value = _disabled_value()
    if value is not None:
        return f"disabled by {DISABLE_ENV}={value}"
    return None if _load() is not None else _import_error


def ensure_available() -> None:
    """Raise BackendUnavailableError, with the reason, when the native extension cannot be used."""
    _require()


def _require() -> ModuleType:
    module = _load()
    if module is None:
        raise BackendUnavailableError(
            f"the native CPU backend (diffgen_fast._C) is unavailable: {unavailable_reason()}"
        )
    return module


def build_info() -> dict[str, Any] | None:
    """How the extension was built (compiler, C++ standard, OpenMP, SIMD flags, CUDA, version); None without it."""
    module = _load()
    return None if module is None else dict(module.build_info())


def get_num_threads() -> int:
    """The number of threads the native kernels use (their own setting; torch's is separate)."""
    return int(_require().get_num_threads())


def set_num_threads(n: int) -> None:
    """Set the number of threads the native kernels use; torch.set_num_threads is not affected."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise InputTypeError(f"n must be an int, got {type(n).__name__}")
    if n < 1:
        raise InputError(f"n must be >= 1, got {n}")
    _require().set_num_threads(n)


def _check_tensor(t: Any, name: str, dtypes: tuple[torch.dtype, ...], ndim: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise InputTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise InputError(f"{name} must be on the CPU for the native backend, got device {t.device}")
    if t.layout != torch.strided:
        raise InputError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
    if t.dtype not in dtypes:
        expected = " or ".join(str(dt) for dt in dtypes)
        raise InputTypeError(f"{name} must have dtype {expected}, got {t.dtype}")
    if t.dim() != ndim:
        raise InputError(f"{name} must have {ndim} dimension(s), got shape {tuple(t.shape)}")
    if t.requires_grad:
        raise InputError(f"{name} requires grad; the native merge has no autograd (use the torch backend)")
    return t


def _as_state(s: Any, name: str) -> SoftmaxState:
    if isinstance(s, SoftmaxState):
        return s
    if isinstance(s, tuple) and len(s) == 4:
        return SoftmaxState(*s)
    raise InputTypeError(f"{name} must be a SoftmaxState (m, l, q, o), got {type(s).__name__}")


def _owned(t: torch.Tensor) -> torch.Tensor:
    """A fresh contiguous copy that the kernel may write into."""
    out = torch.empty(tuple(t.shape), dtype=t.dtype, device="cpu")
    out.copy_(t)
    return out


def _readable(t: torch.Tensor) -> torch.Tensor:
    """t itself when its memory already holds its values contiguously, else a contiguous copy."""
    return t.resolve_conj().resolve_neg().contiguous()


def merge_softmax_states(a: SoftmaxState, b: SoftmaxState) -> SoftmaxState:
    """Native twin of diffgen_fast.ops.merge.merge_softmax_states for CPU tensors.

    Returns a new state: a copy of ``a`` with ``b`` merged into it; ``a`` and ``b`` are left untouched. m, l, q
    must be float64 [M]; o is [M, d] float32 or float64 (the same in both), or None in either, which gives
    o = None as in the reference. Non-contiguous inputs are copied. No autograd.
    """
    module = _require()
    a, b = _as_state(a, "a"), _as_state(b, "b")
    f64 = (torch.float64,)
    am, al, aq = (_check_tensor(getattr(a, k), f"a.{k}", f64, 1) for k in "mlq")
    bm, bl, bq = (_check_tensor(getattr(b, k), f"b.{k}", f64, 1) for k in "mlq")
    M = am.shape[0]
    for name, t in (("a.l", al), ("a.q", aq), ("b.m", bm), ("b.l", bl), ("b.q", bq)):
        if t.shape[0] != M:
            raise InputError(f"{name} has {t.shape[0]} rows but a.m has {M}")

    ao = bo = None
    d, o_dtype = 0, "float64"
    if a.o is not None and b.o is not None:
        ao = _check_tensor(a.o, "a.o", tuple(_O_DTYPES), 2)
        bo = _check_tensor(b.o, "b.o", tuple(_O_DTYPES), 2)
        if ao.shape[0] != M:
            raise InputError(f"a.o has {ao.shape[0]} rows but a.m has {M}")
        if bo.shape != ao.shape:
            raise InputError(f"b.o has shape {tuple(bo.shape)} but a.o has {tuple(ao.shape)}")
        if bo.dtype != ao.dtype:
            raise InputTypeError(f"b.o has dtype {bo.dtype} but a.o has {ao.dtype}; they must match")
        d, o_dtype = ao.shape[1], _O_DTYPES[ao.dtype]

    m, l, q = _owned(am), _owned(al), _owned(aq)
    m2, l2, q2 = _readable(bm), _readable(bl), _readable(bq)
    o = o2 = None
    if ao is not None and bo is not None:
        o, o2 = _owned(ao), _readable(bo)
    module.merge_softmax_states(
        m.data_ptr(),
        l.data_ptr(),
        q.data_ptr(),
        0 if o is None else o.data_ptr(),
        m2.data_ptr(),
        l2.data_ptr(),
        q2.data_ptr(),
        0 if o2 is None else o2.data_ptr(),
        M,
        d,
        o_dtype,
    )
    return SoftmaxState(m, l, q, o)


# Softmax-weighted denoiser (csrc/cpu/denoise.h). The state (m, l, q, o) is float64 and updated in place.
_DENOISE_DTYPES = {torch.float32: "float32", torch.float64: "float64"}


def _state_args(state: SoftmaxState, M: int, d: int) -> tuple[int, int, int, int]:
    for name in "mlq":
        t = getattr(state, name)
        _check_tensor(t, f"state.{name}", (torch.float64,), 1)
        if t.shape[0] != M or not t.is_contiguous():
            raise InputError(f"state.{name} must be a contiguous float64 [{M}] tensor, got shape {tuple(t.shape)}")
    o = state.o
    if o is not None:
        _check_tensor(o, "state.o", (torch.float64,), 2)
        if tuple(o.shape) != (M, d) or not o.is_contiguous():
            raise InputError(f"state.o must be a contiguous float64 [{M}, {d}] tensor, got shape {tuple(o.shape)}")
    return state.m.data_ptr(), state.l.data_ptr(), state.q.data_ptr(), 0 if o is None else o.data_ptr()


def _row_major(t: torch.Tensor, name: str, dtypes: tuple[torch.dtype, ...]) -> torch.Tensor:
    """A 2-D tensor the kernel reads and writes in place through a row stride: its rows must be contiguous."""
    _check_tensor(t, name, dtypes, 2)
    if t.stride(1) != 1:
        raise InputError(f"{name} must have contiguous rows (stride 1 along dim 1)")
    return t


def _row_params(t: torch.Tensor, name: str, M: int) -> torch.Tensor:
    _check_tensor(t, name, (torch.float64,), 1)
    if t.shape[0] != M:
        raise InputError(f"{name} must have {M} entries, got {t.shape[0]}")
    return t.contiguous()


def denoise_direct(
    x: torch.Tensor,
    yT: torch.Tensor | None,
    c: torch.Tensor,
    alpha: torch.Tensor,
    exact: bool,
    state: SoftmaxState,
    y: torch.Tensor | None = None,
) -> None:
    """Stream one training chunk (given transposed, yT [d, n], and/or as rows, y [n, d]) through the state of x
    [M, d], in place.

    c = 1 / (2 sigma^2) and alpha: float64 [M]. x and yT: float32 or float64 (the same); non-contiguous ones are
    copied. exact: float64 differences for float32 data (float64 data always computes in float64). y: the same
    chunk in its row layout [n, d]: with it, float32 data runs the AVX-512 kernel where the CPU has it (then yT may be
    None; direct_reads_rows()), else the generic kernel on yT.
    """
    module = _require()
    dts = tuple(_DENOISE_DTYPES)
    x = _readable(_check_tensor(x, "x", dts, 2))
    M, d = x.shape
    if yT is None and y is None:
        raise InputError("denoise_direct needs the chunk: yT [d, n] or y [n, d]")
    if yT is not None:
        yT = _readable(_check_tensor(yT, "yT", dts, 2))
        if yT.dtype != x.dtype:
            raise InputTypeError(f"yT has dtype {yT.dtype} but x has {x.dtype}; they must match")
        if yT.shape[0] != d:
            raise InputError(f"yT must be [d, n] with d = {d} (x's columns), got shape {tuple(yT.shape)}")
    n = yT.shape[1] if yT is not None else y.shape[0]
    c, alpha = _row_params(c, "c", M), _row_params(alpha, "alpha", M)
    py_ = 0
    if y is not None:
        y = _readable(_check_tensor(y, "y", dts, 2))
        if y.dtype != x.dtype or tuple(y.shape) != (n, d):
            raise InputError(f"y must be the chunk [n, d] = [{n}, {d}] of dtype {x.dtype}, got "
                             f"{tuple(y.shape)} {y.dtype}")  # fmt: skip
        py_ = y.data_ptr()
    if yT is None and not (x.dtype == torch.float32 and direct_reads_rows()):
        raise InputError("yT is required here (float64 data, or a CPU without the AVX-512 kernel)")
    pm, pl, pq, po = _state_args(state, M, d)
    module.denoise_direct(
        x.data_ptr(), 0 if yT is None else yT.data_ptr(), M, n, d, c.data_ptr(), alpha.data_ptr(), bool(exact),
        pm, pl, pq, po, _DENOISE_DTYPES[x.dtype], py_,
    )  # fmt: skip


def direct_reads_rows() -> bool:
    """True when the direct kernel reads float32 chunks in their row layout (the AVX-512 kernel; yT not needed)."""
    return bool(_require().cpu_direct_reads_rows())


def row_sqnorms(y: torch.Tensor) -> torch.Tensor:
    """float64 [n] squared norms of the rows of y [n, d] (float32 or float64, CPU) in one native pass; NaN and Inf
    propagate (a non-finite norm of float32 data means a non-finite value)."""
    module = _require()
    y = _readable(_check_tensor(y, "y", tuple(_DENOISE_DTYPES), 2))
    out = torch.empty(y.shape[0], dtype=torch.float64)
    if y.shape[0]:
        module.row_sqnorms(y.data_ptr(), y.shape[0], y.shape[1], out.data_ptr(), _DENOISE_DTYPES[y.dtype])
    return out


def knn_kernel() -> str:
    """The first pass of knn_topk for float32 data with d > 32 here: "bf16 screen (avx512bf16)" (bf16 dot products
    under a certified bound, then the float64 re-rank) or "fp32 panels"."""
    return _require().cpu_knn_kernel()


def direct_kernel() -> str:
    """The direct kernel float32 data runs with here: "avx512 intrinsics" or the multiversioned clone's ISA."""
    return _require().cpu_direct_kernel()


def denoise_epilogue(
    S: torch.Tensor, a2c: torch.Tensor, off: torch.Tensor, state: SoftmaxState, *, flags: bool = False
) -> torch.Tensor | None:
    """The GEMM path's fused epilogue: S [M, n] (row-contiguous, float32/float64) holds the scores T; the logits are
    a2c T + off. S is overwritten with the weights e^(z - m), the state updated (o rescaled, not accumulated).
    Returns the bool [n] mask of columns with a nonzero weight when flags is True."""
    module = _require()
    _row_major(S, "S", tuple(_DENOISE_DTYPES))
    M, n = S.shape
    a2c, off = _row_params(a2c, "a2c", M), _row_params(off, "off", M)
    d = state.o.shape[1] if state.o is not None else 0
    pm, pl, pq, po = _state_args(state, M, d)
    mask = torch.empty(n, dtype=torch.uint8) if flags else None
    module.denoise_epilogue(
        S.data_ptr(), M, n, max(S.stride(0), n), a2c.data_ptr(), off.data_ptr(), pm, pl, pq, po, d,
        0 if mask is None else mask.data_ptr(), _DENOISE_DTYPES[S.dtype],
    )  # fmt: skip
    return mask.bool() if mask is not None else None


def refine_candidates(
    T: torch.Tensor,
    x: torch.Tensor,
    Y: torch.Tensor,
    alpha: torch.Tensor,
    xx: torch.Tensor,
    lo: torch.Tensor,
    budget: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The GEMM path's certified refinement, in place on the float32 scores T [M, n] (T_ij = (2 / a_i) x_i.y_j -
    ||y_j||^2): in every row with at most `budget` candidates (entries >= lo[i]) the candidates get their float64
    difference scores (||x_i||^2 - ||x_i - a_i y_j||^2) / a_i^2 and the row is re-based on their max. x [M, d] and
    Y [n, d] float32; alpha, xx (= ||x||^2) float64 [M]; lo float32 [M]. Returns (shift float64 [M], 0 where a row
    was not refined; count int64 [M], every row's candidate count: rows above budget are left untouched)."""
    module = _require()
    _row_major(T, "T", (torch.float32,))
    M, n = T.shape
    x = _readable(_check_tensor(x, "x", (torch.float32,), 2))
    Y = _readable(_check_tensor(Y, "Y", (torch.float32,), 2))
    if x.shape[0] != M or Y.shape[0] != n or x.shape[1] != Y.shape[1]:
        raise InputError(f"x [M, d] and Y [n, d] must match T {tuple(T.shape)}, got {tuple(x.shape)}, {tuple(Y.shape)}")
    alpha, xx = _row_params(alpha, "alpha", M), _row_params(xx, "xx", M)
    _check_tensor(lo, "lo", (torch.float32,), 1)
    lo = lo.contiguous()
    if lo.shape[0] != M:
        raise InputError(f"lo must have {M} entries, got {lo.shape[0]}")
    if int(budget) < 1:
        raise InputError(f"budget must be >= 1, got {budget}")
    shift = torch.zeros(M, dtype=torch.float64)
    count = torch.zeros(M, dtype=torch.int64)
    module.refine_candidates(T.data_ptr(), M, n, max(T.stride(0), n), x.data_ptr(), Y.data_ptr(), x.shape[1],
                             alpha.data_ptr(), xx.data_ptr(), lo.data_ptr(), int(budget), shift.data_ptr(),
                             count.data_ptr())  # fmt: skip
    return shift, count


def sparse_pv(W: torch.Tensor, Y: torch.Tensor, o: torch.Tensor, tail_w: float, max_nnz: int) -> int:
    """o [M, d] (float64, in place) += W Y over the entries of each row of the float32 weights W [M, n] that are >=
    tail_w x the row's largest (the rest weigh < n tail_w of it together). Returns the number of entries used, or -1
    (o untouched) when that would exceed max_nnz: the caller then runs the dense product."""
    module = _require()
    _row_major(W, "W", (torch.float32,))
    M, n = W.shape
    Y = _readable(_check_tensor(Y, "Y", (torch.float32,), 2))
    _check_tensor(o, "o", (torch.float64,), 2)
    if Y.shape[0] != n or tuple(o.shape) != (M, Y.shape[1]) or not o.is_contiguous():
        raise InputError(f"Y [n, d] and o (contiguous [M, d]) must match W {tuple(W.shape)}, got {tuple(Y.shape)}, "
                         f"{tuple(o.shape)}")  # fmt: skip
    return int(module.sparse_pv(W.data_ptr(), M, n, max(W.stride(0), n), Y.data_ptr(), Y.shape[1], o.data_ptr(),
                                float(tail_w), max(int(max_nnz), 0)))  # fmt: skip


def simd_level() -> str:
    """The instruction set the multiversioned CPU kernels use here: avx512f, avx2+fma or baseline."""
    return _require().cpu_simd_level()


# kNN (csrc/cpu/knn.h): exact k nearest neighbours of one training chunk.
_KNN_DTYPES = {torch.float32: "float32", torch.float64: "float64"}


def knn_topk(x: torch.Tensor, y: torch.Tensor, k: int, *, index_offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest rows of y [n, d] for each row of x [M, d], in squared L2 (CPU tensors, no autograd).

    x and y: float32 or float64 (the same dtype), finite; non-contiguous ones are copied. 1 <= k <= n.
    Returns (sqdist [M, k] float64 ascending, index [M, k] int64 = row of y + index_offset); equal distances are
    ordered by index. The float64 distances are differences summed in coordinate order, so the result is exact.
    """
    module = _require()
    dts = tuple(_KNN_DTYPES)
    x = _readable(_check_tensor(x, "x", dts, 2))
    y = _readable(_check_tensor(y, "y", dts, 2))
    if y.dtype != x.dtype:
        raise InputTypeError(f"y has dtype {y.dtype} but x has {x.dtype}; they must match")
    M, d = x.shape
    n = y.shape[0]
    if y.shape[1] != d:
        raise InputError(f"y has {y.shape[1]} columns but x has {d}; they must match")
    if d < 1:
        raise InputError("x must have at least one column (d >= 1)")
    if isinstance(k, bool) or not isinstance(k, int):
        raise InputTypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= n:
        raise InputError(f"k must satisfy 1 <= k <= n = {n} (rows of y), got {k}")
    if isinstance(index_offset, bool) or not isinstance(index_offset, int):
        raise InputTypeError(f"index_offset must be an int, got {type(index_offset).__name__}")
    if index_offset < 0:
        raise InputError(f"index_offset must be >= 0, got {index_offset}")
    out_dist = torch.empty(M, k, dtype=torch.float64)
    out_index = torch.empty(M, k, dtype=torch.int64)
    if M > 0:
        module.knn_topk(
            x.data_ptr(),
            y.data_ptr(),
            M,
            n,
            d,
            k,
            _KNN_DTYPES[x.dtype],
            out_dist.data_ptr(),
            out_index.data_ptr(),
            index_offset,
        )
    return out_dist, out_index
