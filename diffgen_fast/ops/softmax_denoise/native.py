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
from diffgen_fast.ops._profile import pass_range
from diffgen_fast.ops.merge import SoftmaxState, empty_softmax_state, finalize_softmax_state
from diffgen_fast.ops.softmax_denoise.reference import (
    DenoiseResult,
    _merge_rows,
    diff64_state,
    exact_sqdist_pairs,
    overflow_rows,
    softmax_denoise_torch,
)

DIRECT_MAX_D = 64  # largest d of the direct kernel (benchmarks/bench_cpu.py: the GEMM path wins above)
TAIL_NATS = 30.0  # a point outside the exact window carries < e^-30 of the top weight
N_REFINE = 256  # most candidates per row recomputed as float64 differences
REFINE_TOL = 1e-7  # certified logit error below which the fp32 scores are kept as they are
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
    """Softmax-weighted denoiser on CPU tensors with the native kernels.

    x: [M, d]; train: TrainingSet with train.d == d; sigma, alpha: float64 [M]. Returns DenoiseResult with the
    denoised in float64 for float64 data, else float32 (like the torch reference).
    """
    why = probe(x.device)
    if why is not None:
        raise BackendUnavailableError(f"backend='cpu': {why}")
    M, d = x.shape
    dtype = torch.float64 if torch.float64 in (x.dtype, train.dtype) else torch.float32
    if d > DIRECT_MAX_D and dtype == torch.float64:
        return softmax_denoise_torch(x, train, sigma, alpha, precision=precision, need_out=need_out)
    xk = x.to(dtype).contiguous()
    sigma = sigma.to(torch.float64).contiguous()
    alpha = alpha.to(torch.float64).contiguous()
    c = 0.5 / (sigma * sigma)
    state = empty_softmax_state(M, d if need_out else None, dtype=torch.float64)
    if M == 0 or len(train) == 0:
        return _finish_result(state, need_out, dtype)
    if d <= DIRECT_MAX_D:
        exact = precision != "fast"
        chunk = chunk_size or max(1024, (1 << 22) // d)
        xnorm = torch.linalg.vector_norm(xk, dim=1, dtype=torch.float64)
        for _, Y in train.iter_chunks(chunk, device="cpu", dtype=dtype):
            # fp32 differences ("fast") can overflow; float64 ones only where float64 does (reported by the caller)
            ymax = float(torch.linalg.vector_norm(Y, dim=1, dtype=torch.float64).max())
            kdt = dtype if exact else torch.float32
            risky = overflow_rows(xnorm, alpha, ymax, c, kdt, cancel=False) if not exact else None
            with pass_range("cpu.direct"):
                _on_rows(state, risky, x, Y, alpha, c, lambda st, r, Y=Y: _native.denoise_direct(
                    xk[r].contiguous(), Y.T.contiguous(), c[r].contiguous(), alpha[r].contiguous(), exact, st))
    else:
        _gemm_path(xk, train, sigma, alpha, c, precision != "fast", state, chunk_size)
    return _finish_result(state, need_out, dtype)


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


def _finish_result(state: SoftmaxState, need_out: bool, dtype: torch.dtype) -> DenoiseResult:
    out, lse, top_w, n_eff = finalize_softmax_state(state)
    return DenoiseResult(out.to(dtype) if need_out else None, lse, top_w, n_eff)


def _gemm_path(x, train, sigma, alpha, c, exact, state: SoftmaxState, chunk_size) -> None:
    M, d = x.shape
    x64 = x.to(torch.float64)
    xx = (x64 * x64).sum(dim=1)
    xnorm = xx.sqrt()
    xs = (x64 * (2.0 / alpha)[:, None]).to(torch.float32)
    a2c = alpha * alpha * c
    chunk = chunk_size or max(256, min(_BUF_ELEMS // max(M, 1), (1 << 28) // (4 * d)))
    for _, Y in train.iter_chunks(chunk, device="cpu", dtype=torch.float32):
        yy64 = torch.linalg.vector_norm(Y, dim=1, dtype=torch.float64).square()
        risky = overflow_rows(xnorm, alpha, float(yy64.max().sqrt()), c, torch.float32)
        _on_rows(state, risky, x, Y, alpha, c, lambda st, r, Y=Y, yy64=yy64: _gemm_chunk(
            Y, yy64, x64[r], xx[r], xnorm[r], xs[r], alpha[r], sigma[r], c[r], a2c[r], exact, st, d))  # fmt: skip


def _gemm_chunk(Y, yy64, x64, xx, xnorm, xs, alpha, sigma, c, a2c, exact, state: SoftmaxState, d) -> None:
    M = x64.shape[0]
    with pass_range("cpu.pass1_scores"):
        T = torch.addmm(yy64.to(torch.float32).neg()[None, :], xs, Y.T)  # (2/a) x.y - ||y||^2
    shift = torch.zeros(M, dtype=torch.float64)
    if exact:
        with pass_range("cpu.exact_rerank"):
            T, shift = _exact_scores(T, x64, Y, alpha, xx, xnorm, sigma, yy64, d)
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


def _exact_scores(T, x64, Y, alpha, xx, xnorm, sigma, yy64, d):
    """Make the fp32 scores T exact where they carry the softmax mass: the candidates within the certified window of
    each row's max are recomputed as float64 differences and T is re-based on the exact best score (returned as
    the float64 per-row shift). If some row has more than N_REFINE candidates, the scores are recomputed in
    float64 by the norm expansion (large sigma: there the expansion's float64 error is negligible)."""
    M = T.shape[0]
    ymax = float(yy64.max().sqrt()) if yy64.numel() else 0.0
    a = alpha
    # certified |error| of T: fp32 dot ((d + 2) u |x| |y| scaled by 2 / a) plus the fp32 roundings of ||y||^2 and T
    err_t = (d + 2) * _U32 * 2.0 * xnorm * ymax / a + 4 * _U32 * (2.0 * xnorm * ymax / a + ymax * ymax)
    zero = torch.zeros(M, dtype=torch.float64)
    if bool((err_t * a * a * c_of(sigma) <= REFINE_TOL).all()):
        return T, zero
    tmax = T.max(dim=1).values
    window = (2.0 * sigma * sigma * TAIL_NATS / (a * a) + 2.0 * err_t).to(torch.float32)
    inside = T >= (tmax - window)[:, None]
    cmax = int(inside.sum(dim=1).max())
    if cmax > N_REFINE:
        xs64 = x64 * (2.0 / a)[:, None]
        T64 = torch.addmm(yy64.neg()[None, :], xs64, Y.to(torch.float64).T)
        shift = T64.max(dim=1).values
        return (T64 - shift[:, None]).to(torch.float32), shift
    vals, idx = torch.topk(T, cmax, dim=1)
    keep = vals >= (tmax - window)[:, None]
    d2 = exact_sqdist_pairs(x64, Y, idx, a)
    t_exact = (xx[:, None] - d2) / (a * a)[:, None]
    t_exact = torch.where(keep, t_exact, torch.full_like(t_exact, float("-inf")))
    shift = t_exact.max(dim=1).values
    T.sub_(shift.to(torch.float32)[:, None])
    T.scatter_(1, idx, torch.where(keep, (t_exact - shift[:, None]).to(torch.float32), vals - shift.float()[:, None]))
    return T, shift


def c_of(sigma: torch.Tensor) -> torch.Tensor:
    return 0.5 / (sigma * sigma)


def _denoise_tensor(x: torch.Tensor, y: torch.Tensor, sigma: torch.Tensor, alpha: torch.Tensor, precision: str):
    from diffgen_fast.data import TrainingSet

    res = softmax_denoise_cpu(x, TrainingSet.from_tensor(y), sigma, alpha, precision=precision)
    return res.denoised, res.lse


@torch.library.custom_op("diffgen_fast::softmax_denoise_cpu", mutates_args=())
def softmax_denoise_cpu_op(
    x: torch.Tensor, y: torch.Tensor, sigma: torch.Tensor, alpha: torch.Tensor, precision: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(denoised [M, d], lse [M] float64) of x [M, d] against y [N, d] with the native CPU kernels; registered as a
    torch custom op so torch.compile traces through it."""
    return _denoise_tensor(x, y, sigma, alpha, precision)


@softmax_denoise_cpu_op.register_fake
def _(x, y, sigma, alpha, precision):
    dtype = torch.float64 if torch.float64 in (x.dtype, y.dtype) else torch.float32
    return x.new_empty(x.shape, dtype=dtype), x.new_empty(x.shape[:1], dtype=torch.float64)


__all__ = ["softmax_denoise_cpu", "softmax_denoise_cpu_op", "probe", "DIRECT_MAX_D"]
