"""The native CPU backend ("cpu") of softmax_denoise / kde_log_density (csrc/cpu/denoise.cpp).

Two paths, chosen by d:

  d <= DIRECT_MAX_D  one fused kernel per training chunk: distances as direct differences ||x - a y||^2 (no norm
                     expansion, so no cancellation at small sigma), the online softmax state (m, l, q, o) kept per
                     query, OpenMP over query blocks (and over training ranges when there are few queries),
                     AVX-512 / AVX2 clones picked at load time, a vectorised exp. precision "fast": fp32
                     differences and sums; "exact" and "auto": float64 differences and sums (fp32 weights).
  d >  DIRECT_MAX_D  the GEMM-shaped part goes to the BLAS torch already ships (T = (2/a) X Y^T - ||y||^2 in one
                     addmm), then one fused native pass per row (max, exp, l, q, rescale of o, nonzero columns),
                     and O += W Y restricted to the columns that carry weight (at small and moderate sigma a few
                     points per query do: the second GEMM mostly disappears). "exact": the candidates within the
                     certified window of every row are recomputed as float64 differences (as the Triton backend
                     does); when too many rows have too many candidates the chunk's scores are redone in float64.
                     "auto" is "exact" (docs/precision.md). float64 data at this d runs the torch reference.

Every chunk of the training set streams through the same float64 state; the result is finalized as everywhere else.
"""

from __future__ import annotations

from typing import Optional

import torch

from diffgen_fast import _native
from diffgen_fast.errors import BackendUnavailableError
from diffgen_fast.ops import refine
from diffgen_fast.ops._profile import pass_range
from diffgen_fast.ops.merge import SoftmaxState, empty_softmax_state
from diffgen_fast.ops.refine import N_REFINE, REFINE_TOL, TAIL_NATS
from diffgen_fast.ops.softmax_denoise.reference import (
    DenoiseResult,
    _merge_rows,
    diff64_state,
    overflow_rows,
    partial_torch,
)

DIRECT_MAX_D = 64  # largest d of the direct kernel (benchmarks/bench_cpu.py: the GEMM path wins above)
SPARSE_FRACTION = 0.5  # O += W Y over the nonzero columns only when fewer than this fraction carry weight
_U32 = 2.0**-24
_BUF_ELEMS = 1 << 24  # elements of one [M, n] score block of the GEMM path (64 MiB in fp32)


def probe(device: Optional[torch.device]) -> Optional[str]:
    """None if the native CPU backend can run on `device`, else why not."""
    if not _native.available():
        return _native.unavailable_reason()
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type != "cpu":
        return f"needs CPU tensors (got {dev.type})"
    return None


def _dtype(x_dtype: torch.dtype, y_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in (x_dtype, y_dtype) else torch.float32


def _check(x: torch.Tensor, train) -> None:
    why = probe(x.device)
    if why is not None:
        raise BackendUnavailableError(f"backend='cpu': {why}")


def _chunk_size(M: int, d: int, precision: str, need_out: bool) -> int:
    if d <= DIRECT_MAX_D:
        return max(1024, (1 << 22) // d)
    return max(256, min(_BUF_ELEMS // max(M, 1), (1 << 28) // (4 * d)))


def partial_cpu(
    x: torch.Tensor,
    Y: torch.Tensor,
    sigma: torch.Tensor,
    alpha: torch.Tensor,
    precision: str = "auto",
    need_out: bool = True,
) -> SoftmaxState:
    """The softmax state (float64) of the CPU queries x [M, d] over the training chunk Y [n, d] with the native
    kernels. "auto" is "exact" (docs/precision.md). float64 data with d > DIRECT_MAX_D runs the torch reference's
    partial."""
    _check(x, None)
    M, d = x.shape
    dtype = _dtype(x.dtype, Y.dtype)
    if d > DIRECT_MAX_D and dtype == torch.float64:
        return partial_torch(x, Y, sigma, alpha, precision, need_out)
    xk = x.to(dtype).contiguous()
    Y = Y.to(dtype).contiguous()
    sigma = sigma.to(torch.float64).contiguous()
    alpha = alpha.to(torch.float64).contiguous()
    c = 0.5 / (sigma * sigma)
    state = empty_softmax_state(M, d if need_out else None, dtype=torch.float64)
    if M == 0 or Y.shape[0] == 0:
        return state
    exact = precision != "fast"
    if d <= DIRECT_MAX_D:
        xnorm = torch.linalg.vector_norm(xk, dim=1, dtype=torch.float64)
        # fp32 differences ("fast") can overflow; float64 ones only where float64 does (reported by the caller)
        ymax = float(torch.linalg.vector_norm(Y, dim=1, dtype=torch.float64).max())
        kdt = dtype if exact else torch.float32
        risky = overflow_rows(xnorm, alpha, ymax, c, kdt, cancel=False) if not exact else None
        Yt = Y.T.contiguous()
        with pass_range("cpu.direct"):
            _on_rows(state, risky, xk, Y, alpha, c, lambda st, r: _native.denoise_direct(
                xk[r].contiguous(), Yt, c[r].contiguous(), alpha[r].contiguous(), exact, st))  # fmt: skip
    else:
        _gemm_chunk_rows(xk, Y, sigma, alpha, c, exact, state)
    return state


def _on_rows(state: SoftmaxState, risky: Optional[torch.Tensor], x, Y, alpha, c, run) -> None:
    """run(state, rows) on the rows that are not risky (all of them when risky is None or none is), the risky
    ones by float64 differences (diff64_state); run updates the state it is given in place."""
    if risky is None or not bool(risky.any()):
        run(state, slice(None))
        return
    bad = risky.nonzero().squeeze(1)
    _merge_rows(state, diff64_state(x[bad].to(torch.float64), Y, alpha[bad], c[bad], state.o is not None,
                                    torch.float64), bad)  # fmt: skip
    good = (~risky).nonzero().squeeze(1)
    if good.numel() == 0:
        return
    sub = SoftmaxState(*(None if t is None else t[good].contiguous() for t in state))
    run(sub, good)
    state.m[good], state.l[good], state.q[good] = sub.m, sub.l, sub.q
    if state.o is not None:
        state.o[good] = sub.o


def _gemm_chunk_rows(x, Y, sigma, alpha, c, exact, state: SoftmaxState) -> None:
    M, d = x.shape
    x64 = x.to(torch.float64)
    xx = (x64 * x64).sum(dim=1)
    xnorm = xx.sqrt()
    xs = (x64 * (2.0 / alpha)[:, None]).to(torch.float32)
    a2c = alpha * alpha * c
    Y = Y.to(torch.float32)
    yy64 = torch.linalg.vector_norm(Y, dim=1, dtype=torch.float64).square()
    risky = overflow_rows(xnorm, alpha, float(yy64.max().sqrt()), c, torch.float32)
    _on_rows(state, risky, x, Y, alpha, c, lambda st, r: _gemm_chunk(
        Y, yy64, x64[r], xx[r], xnorm[r], xs[r], alpha[r], sigma[r], c[r], a2c[r], exact, st, d))  # fmt: skip


def _gemm_chunk(Y, yy64, x64, xx, xnorm, xs, alpha, sigma, c, a2c, exact, state: SoftmaxState, d) -> None:
    M = x64.shape[0]
    with pass_range("cpu.pass1_scores"):
        T = torch.addmm(yy64.to(torch.float32).neg()[None, :], xs, Y.T)  # (2/a) x.y - ||y||^2
    shift = torch.zeros(M, dtype=torch.float64)
    if exact:
        with pass_range("cpu.exact_rerank"):
            T, sh = refine.exact_scores(T, x64, Y, alpha, xx, sigma, t_error(d, xnorm, alpha, yy64), yy64)
            if sh is not None:
                shift = sh
    off = (alpha * alpha * shift - xx) * c
    with pass_range("cpu.epilogue"):
        mask = _native.denoise_epilogue(T, a2c, off, state, flags=state.o is not None)
    if state.o is None:
        return
    cols = mask.nonzero().squeeze(1)
    if cols.numel() == 0:
        return
    with pass_range("cpu.pass2_output"):
        if cols.numel() < SPARSE_FRACTION * Y.shape[0]:
            state.o.add_((T[:, cols] @ Y[cols]).to(torch.float64))
        else:
            state.o.add_((T @ Y).to(torch.float64))


def t_error(d: int, xnorm: torch.Tensor, a: torch.Tensor, yy64: torch.Tensor) -> torch.Tensor:
    """The verifier of the GEMM path: certified |error| of the fp32 scores T = (2/a) x.y - ||y||^2 per row, the fp32
    dot ((d + 2) u |x| |y| scaled by 2 / a) plus the fp32 roundings of ||y||^2 and T."""
    ymax = float(yy64.max().sqrt()) if yy64.numel() else 0.0
    return (d + 2) * _U32 * 2.0 * xnorm * ymax / a + 4 * _U32 * (2.0 * xnorm * ymax / a + ymax * ymax)


def c_of(sigma: torch.Tensor) -> torch.Tensor:
    return 0.5 / (sigma * sigma)


def softmax_denoise_cpu(
    x: torch.Tensor,
    train,
    sigma: torch.Tensor,
    alpha: torch.Tensor,
    *,
    precision: str = "auto",
    need_out: bool = True,
    chunk_size: Optional[int] = None,
) -> DenoiseResult:
    """Softmax-weighted denoiser on CPU tensors with the native kernels: the driver over partial_cpu.

    x: [M, d]; train: TrainingSet with train.d == d; sigma, alpha: float64 [M]. Returns DenoiseResult with the
    denoised in float64 for float64 data, else float32 (like the torch reference).
    """
    from diffgen_fast.ops import driver

    return driver.denoise("cpu", x, train, sigma, alpha, precision=precision, need_out=need_out,
                          chunk_size=chunk_size)  # fmt: skip


def _register():
    from diffgen_fast.ops import driver

    return driver.register_softmax(
        driver.SoftmaxBackend(
            name="cpu",
            partial=partial_cpu,
            o_dtype=lambda xd, yd, precision: torch.float64,
            out_dtype=_dtype,
            chunk_size=_chunk_size,
            chunk_dtype=_dtype,
            check=_check,
        )
    )


softmax_partial_cpu_op = _register().op  # torch.ops.diffgen_fast.softmax_partial_cpu


__all__ = [
    "softmax_denoise_cpu",
    "partial_cpu",
    "softmax_partial_cpu_op",
    "probe",
    "DIRECT_MAX_D",
    "t_error",
    "TAIL_NATS",
    "N_REFINE",
    "REFINE_TOL",
]
