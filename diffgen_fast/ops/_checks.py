"""Argument checking shared by the ops: every error names the argument and what was expected."""

from __future__ import annotations

import math
import os
from typing import Any, Union

import numpy as np
import torch

from diffgen_fast.errors import InputError, InputTypeError

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
PRECISIONS = ("auto", "fast", "exact")

Scalar = Union[float, int]


def as_tensor(obj: Any, name: str) -> tuple[torch.Tensor, bool]:
    """(tensor, was_numpy). Accepts torch tensors and numpy arrays only."""
    if isinstance(obj, torch.Tensor):
        return obj, False
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "fc" and obj.dtype.kind not in "iub":
            raise InputTypeError(f"{name}: expected a numeric array, got numpy dtype {obj.dtype}")
        return torch.from_numpy(np.ascontiguousarray(obj)), True
    raise InputTypeError(f"{name}: expected a torch.Tensor or numpy.ndarray, got {type(obj).__name__}")


def check_float(t: torch.Tensor, name: str) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise InputTypeError(
            f"{name}: expected a floating dtype (float16, bfloat16, float32 or float64), got {t.dtype}"
        )


def checks_enabled() -> bool:
    return os.environ.get("DIFFGEN_FAST_CHECK_FINITE", "1") != "0"


def compiling() -> bool:
    """True while torch.compile traces: value checks then become graph-safe asserts (no data-dependent guard)."""
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(is_compiling()) if is_compiling is not None else False


def graph_assert(ok: torch.Tensor, message: str) -> None:
    """The traced form of a value check: fails at run time with `message` (a RuntimeError, not an InputError)."""
    torch._assert_async(ok, message)


def first_nonfinite_row(t: torch.Tensor) -> tuple[int | None, torch.Tensor | None]:
    """(index of the first row of t [n, ...] holding NaN or Inf, or None; the rows' float64 squared norms when they
    came for free, else None).

    CPU float32 / float64 tensors take one native pass (diffgen_fast._native.row_sqnorms: the float64 sum of squares
    is NaN or Inf exactly when a value is, for float32 data; float64 rows whose squares overflow are re-checked
    value by value). Others use torch.isfinite."""
    from diffgen_fast import _native

    n = t.shape[0] if t.ndim else 1
    flat = t.reshape(n, -1)
    if (n and t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) and flat.is_contiguous()
            and _native.available()):  # fmt: skip
        try:
            norms = _native.row_sqnorms(flat.detach())
        except RuntimeError:  # a tensor without storage (torch.func / vmap wrappers): the torch scan below
            norms = None
    else:
        norms = None
    if norms is not None:
        ok = torch.isfinite(norms)
        if bool(ok.all()):
            return None, norms
        bad = (~ok).nonzero().squeeze(1)
        if t.dtype == torch.float64:  # a finite value above ~1e154 overflows its square: look at the values
            bad = bad[~torch.isfinite(flat[bad]).all(dim=1)]
        return (int(bad[0]) if bad.numel() else None), None
    ok = torch.isfinite(flat).all(dim=1) if n else torch.ones(0, dtype=torch.bool)
    if bool(ok.all()):
        return None, None
    return int((~ok).nonzero()[0, 0]), None


def check_finite(t: torch.Tensor, name: str) -> None:
    """Raise if t holds NaN or Inf (one fused reduction; skipped when DIFFGEN_FAST_CHECK_FINITE=0)."""
    if not checks_enabled() or t.numel() == 0:
        return
    if compiling():
        graph_assert(torch.isfinite(t).all(), f"{name}: contains NaN or Inf; expected finite values")
        return
    row, _ = first_nonfinite_row(t)
    if row is not None:
        raise InputError(f"{name}: contains NaN or Inf (first at row {row}); expected finite values")


def check_queries(x: Any, name: str = "x") -> tuple[torch.Tensor, bool]:
    """x: [M, *shape] floating, finite, at least 2-D. Returns (tensor, was_numpy)."""
    t, was_np = as_tensor(x, name)
    check_float(t, name)
    if t.ndim < 2:
        raise InputError(f"{name}: expected a batch [M, d] or [M, *shape], got a tensor of shape {tuple(t.shape)}")
    check_finite(t, name)
    return t, was_np


def per_query(
    value: Any, M: int, name: str, *, device: torch.device, positive: bool = True, keep_grad: bool = False
) -> torch.Tensor:
    """A float, 0-d tensor, or M-element tensor/array ([M] or [M, 1, 1, 1]) as a float64 [M] tensor.

    keep_grad: a tensor that requires grad stays attached to its graph (the conversion is differentiable)."""
    if isinstance(value, (bool, np.bool_)):
        raise InputTypeError(f"{name}: expected a float or a tensor of {M} floats, got bool")
    if isinstance(value, (int, float, np.floating, np.integer)):
        v = float(value)
        if not math.isfinite(v) or (positive and v <= 0):
            raise InputError(f"{name}: expected a finite value > 0, got {v}")
        return torch.full((M,), v, dtype=torch.float64, device=device)
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(np.ascontiguousarray(value))
    if not isinstance(value, torch.Tensor):
        raise InputTypeError(f"{name}: expected a float or a tensor of {M} floats, got {type(value).__name__}")
    if value.dtype == torch.bool or value.is_complex():
        raise InputTypeError(f"{name}: expected a real floating tensor, got {value.dtype}")
    t = value.detach().to(device=device, dtype=torch.float64)
    if t.numel() == 1:
        t = t.reshape(1).expand(M).contiguous()
    elif t.numel() == M and all(s == 1 for s in t.shape[1:]) and (t.ndim == 1 or t.shape[0] == M):
        t = t.reshape(M)
    else:
        raise InputError(f"{name}: expected a scalar or {M} values (one per query), got shape {tuple(value.shape)}")
    if compiling():
        graph_assert(torch.isfinite(t).all(), f"{name}: contains NaN or Inf; expected finite values")
        if positive and M:
            graph_assert((t > 0).all(), f"{name}: expected values > 0")
    elif not bool(torch.isfinite(t).all()):
        raise InputError(f"{name}: contains NaN or Inf; expected finite values")
    elif positive and M and not bool((t > 0).all()):
        raise InputError(f"{name}: expected values > 0, got min {float(t.min()):g}")
    if keep_grad and value.requires_grad and torch.is_grad_enabled():
        return value.to(device=device, dtype=torch.float64).reshape(-1).expand(M) if value.numel() == 1 else (
            value.to(device=device, dtype=torch.float64).reshape(M)
        )  # fmt: skip
    return t


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise InputError(f"precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def acc_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 if any input is float64, else float32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def gemm_error_bound(d: int, gemm_dtype: torch.dtype, device: torch.device, *, inputs_rounded: bool) -> float:
    """Worst-case relative error gamma of a d-term dot product x.y computed by torch.matmul in gemm_dtype:
    |fl(x.y) - x.y| <= gamma * sum_j |x_j y_j| <= gamma * ||x|| ||y||, for any summation order.

    inputs_rounded: the operands were rounded to gemm_dtype from a wider dtype (adds 2 u_in).
    float32 on CUDA with TF32 allowed rounds its inputs to 10-bit mantissas inside the GEMM.
    """
    u = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
    u_out = u[gemm_dtype]
    u_acc = 2.0**-53 if gemm_dtype == torch.float64 else 2.0**-24
    u_in = u_out if inputs_rounded else 0.0
    if gemm_dtype == torch.float32 and device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        u_in = 2.0**-11
    du = d * u_acc
    acc = du / (1.0 - du) if du < 0.5 else float("inf")
    return 2.0 * u_in + acc + u_out
