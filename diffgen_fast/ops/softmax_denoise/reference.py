"""The reference backend ("torch"): chunked over the training set, exact (m, l, q, o) merges, any device.

Never materialises [M, N, d], and [M, N] only one (query block x training chunk) tile at a time. The logits are
z_i = -||x - a y_i||^2 / (2 s^2) = (S_i - ||x||^2) / (2 s^2) with S_i = 2 a x.y_i - a^2 ||y_i||^2; the row constant
||x||^2 is kept out of the tile (float64, per row), so the tile only carries what differs between training points.

precision:
  "fast"  S from one GEMM in the inputs' promoted dtype (TF32 on CUDA if torch allows it); error bound below.
  "exact" the fp32 tile and its certified bound, then the certified refinement of diffgen_fast.ops.refine (the
          candidates within the window of the row max recomputed as float64 differences; TAIL_NATS, N_REFINE there):
          their state in float64 merged with the fp32 state of the rest, or, when a row has more than N_REFINE
          candidates, a float64 GEMM re-based on the candidates' exact scores. fp32-accurate (in fact ~fp64) at every
          sigma, including 0.002.
  "auto"  per chunk: "fast" when the certified logit error of the fast GEMM,
          max_rows 2 a gamma ||x|| max||y|| / (2 s^2), is below 2^-22, else "exact".
          gamma is the worst-case dot-product error (diffgen_fast.ops._checks).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from diffgen_fast.ops import refine
from diffgen_fast.ops._checks import acc_dtype, gemm_error_bound
from diffgen_fast.ops.merge import SoftmaxState, empty_softmax_state, finalize_softmax_state, merge_softmax_states
from diffgen_fast.ops.refine import N_REFINE, TAIL_NATS, exact_sqdist_pairs

AUTO_TOL = 2.0**-22  # largest certified logit error "auto" accepts from the fast GEMM
_TILE_ELEMS = 1 << 22  # elements of one [query block, chunk] tile
_CHUNK_BYTES = 128 << 20  # bytes of one training chunk in the GEMM dtype


class DenoiseResult(NamedTuple):
    """denoised [M, d] (None when only the lse was wanted), lse / top_weight / n_eff [M] float64."""

    denoised: Optional[torch.Tensor]
    lse: torch.Tensor
    top_weight: torch.Tensor
    n_eff: torch.Tensor


def default_chunk_size(d: int) -> int:
    return max(1, _CHUNK_BYTES // (8 * max(d, 1)))


def sqdist_diff64(x64: torch.Tensor, y: torch.Tensor, alpha: Optional[torch.Tensor] = None) -> torch.Tensor:
    """||x_r - a_r y_j||^2 [m, n] in float64 for every pair, computed as differences (no norm expansion, so no
    overflow below float64's range and no cancellation), in blocks of at most 2^22 elements."""
    m, d = x64.shape
    n = y.shape[0]
    out = torch.empty(m, n, dtype=torch.float64, device=x64.device)
    cols = max(1, min(n, (1 << 22) // max(1, d)))
    rows = max(1, (1 << 22) // max(1, cols * d))
    for c0 in range(0, n, cols):
        yb = y[c0 : c0 + cols].to(torch.float64)
        for r0 in range(0, m, rows):
            xb = x64[r0 : r0 + rows, None, :]
            yr = yb[None] if alpha is None else yb[None] * alpha[r0 : r0 + rows, None, None]
            diff = xb - yr
            out[r0 : r0 + rows, c0 : c0 + cols] = (diff * diff).sum(-1)
    return out


def diff64_state(
    x64: torch.Tensor,
    y: torch.Tensor,
    a: torch.Tensor,
    inv2s2: torch.Tensor,
    need_out: bool,
    o_dtype: torch.dtype,
) -> SoftmaxState:
    """Softmax state of rows x64 [m, d] against the chunk y [n, d] with every logit -||x - a y||^2 / (2 s^2) from
    float64 differences: for rows whose GEMM-dtype scores would overflow or cancel (docs/precision.md, "Overflow").
    Rows whose float64 distances all overflow get the empty state (the caller reports them)."""
    d2 = sqdist_diff64(x64, y, a)
    d2min = d2.min(dim=1).values
    empty = ~torch.isfinite(d2min)
    c = inv2s2.clamp(max=torch.finfo(torch.float64).max)
    # shifted by the smallest distance, so that the nearest point keeps weight 1 even when sigma is tiny
    base = torch.where(empty, torch.zeros_like(d2min), d2min)
    p = torch.exp(-(d2 - base[:, None]) * c[:, None])
    p = torch.where(empty[:, None], torch.zeros_like(p), p)
    m = torch.where(empty, torch.full_like(d2min, float("-inf")), -base * c)
    o = (p.to(o_dtype) @ y.to(o_dtype)) if need_out else None
    return SoftmaxState(m, p.sum(dim=1), (p * p).sum(dim=1), o)


def overflow_rows(
    xnorm: torch.Tensor, a: torch.Tensor, ymax: float, inv2s2: torch.Tensor, gemm: torch.dtype, cancel: bool = True
) -> torch.Tensor:
    """[m] bool: rows whose scores in the GEMM dtype may overflow ((||x|| + a max||y||)^2 above 1/16 of its largest
    value), or whose float64 norm-expansion scores lose more than 2^-12 nats to cancellation (points far from the
    origin compared to their spread at small sigma). These rows take the float64-differences path."""
    big = (xnorm + a * ymax).square()
    limit = 0.0625 * torch.finfo(gemm).max
    bad = ~(big < limit)
    return bad | ~(2.0**-52 * big * inv2s2 <= 2.0**-12) if cancel else bad


def softmax_denoise_diff64(
    x: torch.Tensor, train, sigma: torch.Tensor, alpha: torch.Tensor, *, need_out: bool = True
) -> DenoiseResult:
    """Every logit from float64 differences, streamed over the training set: the fallback for rows a backend
    could not compute (overflow). Rows whose float64 distances all overflow come back with top_weight inf."""
    M, d = x.shape
    x64 = x.to(torch.float64)
    inv2s2 = 0.5 / (sigma * sigma)
    state = empty_softmax_state(M, d if need_out else None, dtype=torch.float64, device=x.device)
    for _, Y in train.iter_chunks(max(1, (1 << 22) // max(1, d * max(M, 1))), device=x.device):
        state = merge_softmax_states(state, diff64_state(x64, Y, alpha, inv2s2, need_out, torch.float64))
    return DenoiseResult(*finalize_softmax_state(state))


def _tile_state(
    T: torch.Tensor,
    a: torch.Tensor,
    xx: torch.Tensor,
    inv2s2: torch.Tensor,
    Y_out: Optional[torch.Tensor],
    o_dtype: torch.dtype,
    shift: Optional[torch.Tensor] = None,
) -> SoftmaxState:
    """Softmax state of one tile, consuming T [m, n] (float32/64) in place; a, xx, inv2s2: [m] float64.

    T_i + shift = 2 x.y_i / a - ||y_i||^2 (shift: float64 [m] from refine.rebase, or None = 0), so the logit is
    z_i = (a^2 (T_i + shift) - ||x||^2) / (2 s^2).
    """
    tmax = T.max(dim=1).values
    empty = torch.isneginf(tmax)  # rows whose every entry was masked out (-inf) contribute the empty state
    tmax = torch.where(empty, torch.zeros_like(tmax), tmax)
    c = a * a * inv2s2
    # clamped, so that at vanishing sigma the row max gets 0 * max = 0 (not 0 * inf = nan) and the others -inf
    scale = c.to(T.dtype).clamp(max=torch.finfo(T.dtype).max)
    P = T.sub_(tmax[:, None]).mul_(scale[:, None]).exp_()
    t_best = tmax.to(torch.float64) if shift is None else tmax.to(torch.float64) + shift
    m = (a * a * t_best - xx) * inv2s2
    m = torch.where(empty, torch.full_like(m, float("-inf")), m)
    l = P.sum(dim=1).to(torch.float64)
    q = torch.linalg.vector_norm(P, dim=1).to(torch.float64).square()
    o = None if Y_out is None else P.to(o_dtype) @ Y_out
    return SoftmaxState(m, l, q, o)


def _fast_error(d, xnorm, a, ymax, inv2s2, acc, device) -> torch.Tensor:
    """Certified |S error| per row of the fast GEMM in `acc` (S = a^2 T = 2 a x.y - a^2 ||y||^2; x' rounded to acc):
    2 a gamma ||x|| max||y|| plus the roundings of ||y||^2 and the bias. The logit error is this times 1 / (2 s^2)."""
    gamma = gemm_error_bound(d, acc, device, inputs_rounded=acc != torch.float64)
    return 2.0 * a * gamma * xnorm * ymax + 4.0 * torch.finfo(acc).eps * (a * a * ymax * ymax)


def preferred_chunk(M: int, d: int) -> int:
    return default_chunk_size(d)


def partial_torch(
    x: torch.Tensor,
    Y: torch.Tensor,
    sigma: torch.Tensor,
    alpha: torch.Tensor,
    precision: str = "auto",
    need_out: bool = True,
) -> SoftmaxState:
    """The softmax state of the queries x [M, d] over the training chunk Y [n, d] (sigma, alpha: [M] float64).

    o is float64 unless precision is "fast" (then the accumulation dtype). "auto" is decided per query block by the
    fast GEMM's certified logit error (_fast_error) against AUTO_TOL."""
    M, d = x.shape
    dev = x.device
    acc = acc_dtype(x.dtype, Y.dtype)  # also the "fast" GEMM dtype: fp16/bf16 inputs are upcast exactly
    o_dtype = acc if precision == "fast" else torch.float64
    inv2s2 = 0.5 / (sigma * sigma)
    x64 = x.to(torch.float64)
    xx = (x64 * x64).sum(dim=1)
    xnorm = xx.sqrt()
    x_scaled = x64 * (2.0 / alpha)[:, None]  # x' = 2 x / a, so that T = x' Y^T - ||y||^2 is one addmm
    x_fast = x_scaled.to(acc)
    state = empty_softmax_state(M, d if need_out else None, dtype=o_dtype, device=dev)
    gamma64 = gemm_error_bound(d, torch.float64, dev, inputs_rounded=True)
    n = Y.shape[0]
    if M == 0 or n == 0:
        return state
    yy = torch.linalg.vector_norm(Y, dim=1, dtype=torch.float64).square()
    ymax = float(yy.max().sqrt())
    mb = max(1, min(M, _TILE_ELEMS // n))
    Y_fast = Y64 = neg_yy_fast = None
    for r0 in range(0, M, mb):
        r1 = min(M, r0 + mb)
        rows: slice | torch.Tensor = slice(r0, r1)
        risky = overflow_rows(xnorm[rows], alpha[rows], ymax, inv2s2[rows], acc)
        if bool(risky.any()):
            rr = torch.arange(r0, r1, device=dev)
            bad = rr[risky]
            _merge_rows(state, diff64_state(x64[bad], Y, alpha[bad], inv2s2[bad], need_out, o_dtype), bad)
            if bool(risky.all()):
                continue
            rows = rr[~risky]
        a = alpha[rows]
        err_fast = _fast_error(d, xnorm[rows], a, ymax, inv2s2[rows], acc, dev)
        use_fast = precision == "fast" or (precision == "auto" and bool(((err_fast * inv2s2[rows]) <= AUTO_TOL).all()))
        shift = None
        if use_fast:
            if Y_fast is None:
                Y_fast, neg_yy_fast = Y.to(acc), (-yy).to(acc)
            T = torch.addmm(neg_yy_fast[None, :], x_fast[rows], Y_fast.T)
            Y_out = Y_fast if o_dtype == acc else None
        else:
            if acc != torch.float64:
                if Y_fast is None:
                    Y_fast, neg_yy_fast = Y.to(acc), (-yy).to(acc)
                # "exact" at the cost of "fast" when few points carry the mass (small sigma): the candidates' state
                # in float64 from differences, the rest from the fp32 tile; else the float64 GEMM below
                T = torch.addmm(neg_yy_fast[None, :], x_fast[rows], Y_fast.T)
                cand = refine.candidate_state(
                    T, x64[rows], Y, a, sigma[rows], inv2s2[rows], err_fast / (a * a), need_out, o_dtype
                )
                if cand is not None:
                    rest = _tile_state(T, a, xx[rows], inv2s2[rows], Y_fast if need_out else None, Y_fast.dtype)
                    _merge_rows(state, merge_softmax_states(cand, rest), rows)
                    continue
            if Y64 is None:
                Y64 = Y.to(torch.float64)
            T = torch.addmm(-yy[None, :], x_scaled[rows], Y64.T)
            err = 2.0 * a * gamma64 * xnorm[rows] * ymax + 2.0**-50 * (2 * a * xnorm[rows] * ymax + a * a * ymax * ymax)
            err_t = err / (a * a)
            if refine.needs_refine(err_t, a, sigma[rows], tol=refine.REFINE_TOL_F64):
                shift = refine.rebase(T, x64[rows], Y, a, xx[rows], sigma[rows], err_t, partial=True)
            Y_out = Y64
        if need_out and Y_out is None:
            Y_out = Y.to(o_dtype)
        tile = _tile_state(T, a, xx[rows], inv2s2[rows], Y_out if need_out else None, o_dtype, shift)
        _merge_rows(state, tile, rows)
    return state


def softmax_denoise_torch(
    x: torch.Tensor,
    train,
    sigma: torch.Tensor,
    alpha: torch.Tensor,
    *,
    precision: str = "auto",
    need_out: bool = True,
    chunk_size: Optional[int] = None,
) -> DenoiseResult:
    """Softmax-weighted denoiser over a TrainingSet: the driver over partial_torch.

    x: [M, d] floating; train: TrainingSet with train.d == d; sigma, alpha: [M] float64 on x.device.
    Returns DenoiseResult with denoised in the accumulation dtype (float64 if x or train is float64, else float32).
    """
    from diffgen_fast.ops import driver

    return driver.denoise("torch", x, train, sigma, alpha, precision=precision, need_out=need_out,
                          chunk_size=chunk_size)  # fmt: skip


def _merge_rows(state: SoftmaxState, tile: SoftmaxState, rows) -> None:
    """Merge a tile's state into the given rows (a slice or an index tensor) of the running state, in place."""
    part = SoftmaxState(state.m[rows], state.l[rows], state.q[rows], None if state.o is None else state.o[rows])
    merged = merge_softmax_states(part, tile)
    state.m[rows], state.l[rows], state.q[rows] = merged.m, merged.l, merged.q
    if state.o is not None:
        state.o[rows] = merged.o.to(state.o.dtype)


def lse_constant(d: int, n: int, bandwidth: torch.Tensor) -> torch.Tensor:
    """log N + (d / 2) log(2 pi h^2): what the KDE log-density subtracts from the log-sum-exp."""
    return math.log(n) + 0.5 * d * torch.log(2.0 * math.pi * bandwidth * bandwidth)


__all__ = [
    "DenoiseResult",
    "partial_torch",
    "softmax_denoise_torch",
    "softmax_denoise_diff64",
    "exact_sqdist_pairs",
    "sqdist_diff64",
    "diff64_state",
    "overflow_rows",
    "lse_constant",
    "TAIL_NATS",
    "N_REFINE",
    "AUTO_TOL",
]


def _o_dtype(x_dtype: torch.dtype, y_dtype: torch.dtype, precision: str) -> torch.dtype:
    return acc_dtype(x_dtype, y_dtype) if precision == "fast" else torch.float64


def _register() -> None:
    from diffgen_fast.ops import driver

    driver.register_softmax(
        driver.SoftmaxBackend(
            name="torch",
            partial=partial_torch,
            o_dtype=_o_dtype,
            out_dtype=lambda xd, td: acc_dtype(xd, td),
            chunk_size=lambda M, d, precision, need_out: default_chunk_size(d),
        )
    )


_register()
