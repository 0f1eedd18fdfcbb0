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
                     does), within the narrowest certified window per row (refine.tail_nats); rows with more
                     than N_REFINE candidates, or whose window spans every point (large sigma), get float64 GEMM
                     scores, those rows only.
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
from diffgen_fast.ops.refine import N_REFINE, N_REFINE_NATIVE, REFINE_TOL, TAIL_NATS
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
_GEMM_COLS = 2048  # training points per BLAS call of the fp32 scores
_Y64_ROWS = 2048  # chunk rows converted to float64 at a time for the float64 GEMM scores
_SAMPLE = 256  # chunk points sampled to predict rows with too many candidates to refine (chunks >= 16x that)
_SPARSE_PV_DIV = 32  # the sparse output product runs when at most 1 / _SPARSE_PV_DIV of the weights are kept


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
    yy: Optional[torch.Tensor] = None,
) -> SoftmaxState:
    """The softmax state (float64) of the CPU queries x [M, d] over the training chunk Y [n, d] with the native
    kernels. "auto" is "exact" (docs/precision.md). float64 data with d > DIRECT_MAX_D runs the torch reference's
    partial. yy: the chunk's float64 squared norms when the caller has them (the GEMM path's certificate uses
    them; computed here otherwise)."""
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
        # fp32 differences ("fast") can overflow; float64 ones only where float64 does (reported by the caller), so
        # the norms are only needed (and only computed) for "fast"
        risky = None
        if not exact:
            xnorm = _sqnorms64(xk).sqrt()
            ymax = float(_sqnorms64(Y).max().sqrt())
            risky = overflow_rows(xnorm, alpha, ymax, c, torch.float32, cancel=False)
        # the AVX-512 kernel reads the chunk's rows (and packs them itself); the generic kernel its transpose
        rows = dtype == torch.float32 and _native.direct_reads_rows()
        Yt = None if rows else Y.T.contiguous()
        Yr = Y if rows else None
        with pass_range("cpu.direct"):
            _on_rows(state, risky, xk, Y, alpha, c, lambda st, r: _native.denoise_direct(
                xk[r].contiguous(), Yt, c[r].contiguous(), alpha[r].contiguous(), exact, st, Yr))  # fmt: skip
    else:
        _gemm_chunk_rows(xk, Y, sigma, alpha, c, exact, state, yy)
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


def _sqnorms64(Y: torch.Tensor) -> torch.Tensor:
    """float64 ||y||^2 of the rows of Y: one native pass (torch's float64 vector_norm of float32 data converts the
    chunk first, ~20x slower)."""
    return _native.row_sqnorms(Y.detach().contiguous())


def _gemm_chunk_rows(x, Y, sigma, alpha, c, exact, state: SoftmaxState, yy=None) -> None:
    M, d = x.shape
    x64 = x.to(torch.float64)
    xx = (x64 * x64).sum(dim=1)
    xnorm = xx.sqrt()
    xs = (x64 * (2.0 / alpha)[:, None]).to(torch.float32)
    a2c = alpha * alpha * c
    Y = Y.to(torch.float32)
    yy64 = yy.to(torch.float64) if yy is not None and yy.shape[0] == Y.shape[0] else _sqnorms64(Y)
    risky = overflow_rows(xnorm, alpha, float(yy64.max().sqrt()), c, torch.float32)
    _on_rows(state, risky, x, Y, alpha, c, lambda st, r: _gemm_chunk(
        Y, yy64, x[r], x64[r], xx[r], xnorm[r], xs[r], alpha[r], sigma[r], c[r], a2c[r], exact, st, d))  # fmt: skip


def _scores32(yy32: torch.Tensor, xs: torch.Tensor, Y: torch.Tensor, out: Optional[torch.Tensor] = None):
    """fp32 scores T = xs Y^T - ||y||^2 [M, n], by one BLAS call per block of _GEMM_COLS training points (written
    into column slices of out): 15-25% faster than one call over the whole chunk (benchmarks/bench_cpu.py shapes),
    whose [M, n] output streams through memory while a block's stays in cache."""
    M, n = xs.shape[0], Y.shape[0]
    out = torch.empty(M, n, dtype=torch.float32) if out is None else out
    nyy = yy32.neg()
    for s in range(0, n, _GEMM_COLS):
        e = min(n, s + _GEMM_COLS)
        torch.addmm(nyy[None, s:e], xs, Y[s:e].T, out=out[:, s:e])
    return out


def _scores64(x64, a, yy64, Y: torch.Tensor):
    """(T64 - shift, shift): float64 scores T = (2/a) x.y - ||y||^2 re-based on each row's max. The chunk is
    converted to float64 a block of _Y64_ROWS rows at a time into one reused buffer (a whole float64 copy of a large
    chunk costs more in page faults than the conversion itself)."""
    n, d = Y.shape
    xs64 = x64 * (2.0 / a)[:, None]
    T64 = torch.empty(x64.shape[0], n, dtype=torch.float64)
    rows = min(n, _Y64_ROWS)
    buf = torch.empty(rows, d, dtype=torch.float64)
    nyy = yy64.neg()
    for s in range(0, n, rows):
        e = min(n, s + rows)
        b = buf[: e - s]
        b.copy_(Y[s:e])
        torch.addmm(nyy[None, s:e], xs64, b.T, out=T64[:, s:e])
    shift = T64.max(dim=1).values
    return T64.sub_(shift[:, None]), shift


def _predict_many(xs, Y, yy32, win, rows) -> torch.Tensor:
    """bool [len(rows)]: rows whose candidates, estimated on an evenly spaced sample of _SAMPLE points of the
    chunk, would exceed N_REFINE_NATIVE (those get float64 GEMM scores without the fp32 GEMM first). Only a cost
    estimate: a row predicted wrongly is still certified (it is counted exactly after the fp32 GEMM)."""
    n = Y.shape[0]
    step = n // _SAMPLE
    Ts = torch.addmm(yy32[None, ::step].neg(), xs[rows], Y[::step].T)
    lo = Ts.max(dim=1).values - win[rows].to(torch.float32)
    est = (Ts >= lo[:, None]).sum(dim=1).to(torch.float64) * (n / Ts.shape[1])
    return est > 4 * N_REFINE_NATIVE


def _exact_rows(x, x64, Y, yy64, xx, xnorm, xs, alpha, sigma, d):
    """The "exact" / "auto" scores of the GEMM path: (T fp32, shift float64 [M]) with fp32-accurate weights.

    Certified per row: err_t (t_error) is the fp32 score bound; where its logit error is below REFINE_TOL the fp32
    scores are kept. Otherwise the candidates within the window of refine.tail_nats (the narrowest tail whose
    excluded points change the row's sums by < REFINE_TOL of the top weight) are recomputed as float64 differences
    and the row re-based on them, natively (_native.refine_candidates, up to N_REFINE_NATIVE candidates per row);
    rows with more candidates get float64 GEMM scores, those rows only. Rows whose window covers every point of
    the chunk whatever the data, or whose candidates a sample of the chunk predicts to be too many, skip the fp32
    GEMM."""
    M, n = x64.shape[0], Y.shape[0]
    err_t = t_error(d, xnorm, alpha, yy64)
    shift = torch.zeros(M, dtype=torch.float64)
    delta = err_t * alpha * alpha * c_of(sigma)
    yy32 = yy64.to(torch.float32)
    if not bool((delta > REFINE_TOL).any()):
        return _scores32(yy32, xs, Y), shift
    ref = delta > REFINE_TOL
    tail = refine.tail_nats(n, alpha, sigma, err_t)
    win = refine.window(sigma, alpha, err_t, tail)
    ymax = float(yy64.max().sqrt())
    # every point is a candidate when the window is wider than any row's score range |T_i - T_j|
    wide = (win >= 4.0 * xnorm * ymax / alpha + ymax * ymax) & ref
    if n >= 16 * _SAMPLE:
        guess = (ref & ~wide).nonzero().squeeze(1)
        if guess.numel():
            wide[guess] = _predict_many(xs, Y, yy32, win, guess)
    T = torch.empty(M, n, dtype=torch.float32)
    narrow = (~wide).nonzero().squeeze(1)
    many = wide.nonzero().squeeze(1)
    if narrow.numel():
        all_narrow = narrow.numel() == M
        with pass_range("cpu.pass1_scores"):
            if all_narrow:
                Tn = _scores32(yy32, xs, Y, out=T)
            else:
                Tn = _scores32(yy32, xs[narrow], Y)
        rn = ref[narrow]
        if bool(rn.any()):
            lo = Tn.max(dim=1).values - win[narrow].to(torch.float32)
            lo = torch.where(rn, lo, torch.full_like(lo, float("inf")))  # rows within REFINE_TOL: no candidates
            with pass_range("cpu.refine"):
                sh, cnt = _native.refine_candidates(Tn, x[narrow], Y, alpha[narrow], xx[narrow], lo,
                                                    N_REFINE_NATIVE)  # fmt: skip
            shift[narrow] = sh
            over = cnt > N_REFINE_NATIVE
            if bool(over.any()):
                many = torch.cat([many, narrow[over]])
        if not all_narrow:
            T[narrow] = Tn
    if many.numel():
        with pass_range("cpu.scores64"):
            T64, sh = _scores64(x64[many], alpha[many], yy64, Y)
        if many.numel() == M:
            T.copy_(T64)
        else:
            T[many] = T64.to(torch.float32)
        shift[many] = sh
    return T, shift


def _gemm_chunk(Y, yy64, x, x64, xx, xnorm, xs, alpha, sigma, c, a2c, exact, state: SoftmaxState, d) -> None:
    if exact:
        with pass_range("cpu.exact_rerank"):
            T, shift = _exact_rows(x, x64, Y, yy64, xx, xnorm, xs, alpha, sigma, d)
    else:
        with pass_range("cpu.pass1_scores"):
            T = _scores32(yy64.to(torch.float32), xs, Y)  # (2/a) x.y - ||y||^2
        shift = torch.zeros(x64.shape[0], dtype=torch.float64)
    off = (alpha * alpha * shift - xx) * c
    with pass_range("cpu.epilogue"):
        mask = _native.denoise_epilogue(T, a2c, off, state, flags=state.o is not None)
    if state.o is None:
        return
    with pass_range("cpu.pass2_output"):
        # few entries carry weight (small and moderate sigma): o += W Y over those entries, point by point
        if _native.sparse_pv(T, Y, state.o, _TAIL_W, T.numel() // _SPARSE_PV_DIV) >= 0:
            return
        cols = mask.nonzero().squeeze(1)
        if cols.numel() == 0:
            return
        if cols.numel() >= SPARSE_FRACTION * Y.shape[0]:
            # weights below e^-TAIL_NATS of their row's largest leave o: together they are < n e^-TAIL_NATS of it
            # (relative 1e-17 for n = 1e5), while the product then often runs over a few columns only
            small = T < (T.amax(dim=1, keepdim=True) * _TAIL_W)
            T.masked_fill_(small, 0.0)
            cols = (T != 0).any(dim=0).nonzero().squeeze(1)
        if cols.numel() < SPARSE_FRACTION * Y.shape[0]:
            state.o.add_((T[:, cols] @ Y[cols]).to(torch.float64))
        else:
            state.o.add_((T @ Y).to(torch.float64))


_TAIL_W = float(torch.exp(torch.tensor(-TAIL_NATS, dtype=torch.float64)))

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
            takes_norms=True,
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
