"""The reference backend ("torch"): chunked over the training set, exact (m, l, q, o) merges, any device.

Never materialises [M, N, d], and [M, N] only one (query block x training chunk) tile at a time. The logits are
z_i = -||x - a y_i||^2 / (2 s^2) = (S_i - ||x||^2) / (2 s^2) with S_i = 2 a x.y_i - a^2 ||y_i||^2; the row constant
||x||^2 is kept out of the tile (float64, per row), so the tile only carries what differs between training points.

precision:
  "fast"  S from one GEMM in the inputs' promoted dtype (TF32 on CUDA if torch allows it); error bound below.
  "exact" S from a float64 GEMM, then the candidates that carry the softmax mass (S within 2 s^2 T + 2 B of the
          row max, T = 50 nats, the heaviest 32 per chunk) get their distances recomputed in float64 as differences
          ||x - a y_i||^2, so the result is fp32-accurate (in fact ~fp64) at every sigma, including 0.002.
  "auto"  per chunk: "fast" when the certified logit error of the fast GEMM,
          max_rows 2 a gamma ||x|| max||y|| / (2 s^2), is below 2^-22, else "exact".
          gamma is the worst-case dot-product error (diffgen_fast.ops._checks).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from diffgen_fast.ops._checks import acc_dtype, gemm_error_bound
from diffgen_fast.ops.merge import SoftmaxState, empty_softmax_state, finalize_softmax_state, merge_softmax_states

TAIL_NATS = 50.0  # points more than this many nats below the top logit carry < e^-50 of its weight
N_REFINE = 32  # candidates per row and chunk whose distances are recomputed as differences
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


def exact_sqdist_pairs(
    x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, alpha: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """||x_r - a_r y_{idx[r, j]}||^2 in float64, computed as differences: x [m, d], y [n, d], idx [m, c] -> [m, c]."""
    m, c = idx.shape
    d = x.shape[1]
    out = torch.empty(m, c, dtype=torch.float64, device=x.device)
    rows = max(1, (1 << 24) // max(1, c * d))
    for r0 in range(0, m, rows):
        r1 = min(m, r0 + rows)
        yb = y[idx[r0:r1]].to(torch.float64)  # [rb, c, d]
        if alpha is not None:
            yb = yb * alpha[r0:r1, None, None]
        diff = x[r0:r1, None, :].to(torch.float64) - yb
        out[r0:r1] = (diff * diff).sum(-1)
    return out


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
        _merge_rows(state, diff64_state(x64, Y, alpha, inv2s2, need_out, torch.float64), slice(0, M))
    return DenoiseResult(*finalize_softmax_state(state))


def _tile_state(
    T: torch.Tensor,
    a: torch.Tensor,
    xx: torch.Tensor,
    inv2s2: torch.Tensor,
    Y_out: Optional[torch.Tensor],
    o_dtype: torch.dtype,
) -> SoftmaxState:
    """Softmax state of one tile, consuming T [m, n] (float32/64) in place; a, xx, inv2s2: [m] float64.

    T_i = 2 x.y_i / a - ||y_i||^2, so the logit is z_i = (a^2 T_i - ||x||^2) / (2 s^2).
    """
    tmax = T.max(dim=1).values
    empty = torch.isneginf(tmax)  # rows whose every entry was masked out (-inf) contribute the empty state
    tmax = torch.where(empty, torch.zeros_like(tmax), tmax)
    c = a * a * inv2s2
    # clamped, so that at vanishing sigma the row max gets 0 * max = 0 (not 0 * inf = nan) and the others -inf
    scale = c.to(T.dtype).clamp(max=torch.finfo(T.dtype).max)
    P = T.sub_(tmax[:, None]).mul_(scale[:, None]).exp_()
    m = (a * a * tmax.to(torch.float64) - xx) * inv2s2
    m = torch.where(empty, torch.full_like(m, float("-inf")), m)
    l = P.sum(dim=1).to(torch.float64)
    q = torch.linalg.vector_norm(P, dim=1).to(torch.float64).square()
    o = None if Y_out is None else P.to(o_dtype) @ Y_out
    return SoftmaxState(m, l, q, o)


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
    """Softmax-weighted denoiser over a TrainingSet.

    x: [M, d] floating; train: TrainingSet with train.d == d; sigma, alpha: [M] float64 on x.device.
    Returns DenoiseResult with denoised in the accumulation dtype (float64 if x or train is float64, else float32).
    """
    M, d = x.shape
    dev = x.device
    acc = acc_dtype(x.dtype, train.dtype)  # also the "fast" GEMM dtype: fp16/bf16 inputs are upcast exactly
    o_dtype = acc if precision == "fast" else torch.float64
    inv2s2 = 0.5 / (sigma * sigma)
    x64 = x.to(torch.float64)
    xx = (x64 * x64).sum(dim=1)
    xnorm = xx.sqrt()
    x_scaled = x64 * (2.0 / alpha)[:, None]  # x' = 2 x / a, so that T = x' Y^T - ||y||^2 is one addmm
    x_fast = x_scaled.to(acc)
    state = empty_softmax_state(M, d if need_out else None, dtype=o_dtype, device=dev)
    chunk = chunk_size or default_chunk_size(d)
    # certified |S error| per row is 2 a gamma ||x|| max||y|| (S = a^2 T); x' is rounded to acc (inputs_rounded)
    gamma_fast = gemm_error_bound(d, acc, dev, inputs_rounded=acc != torch.float64)
    gamma64 = gemm_error_bound(d, torch.float64, dev, inputs_rounded=True)

    for _, Y in train.iter_chunks(chunk, device=dev):
        n = Y.shape[0]
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
            err_fast = 2.0 * a * gamma_fast * xnorm[rows] * ymax + 4.0 * torch.finfo(acc).eps * (a * a * ymax * ymax)
            use_fast = precision == "fast" or (
                precision == "auto" and bool(((err_fast * inv2s2[rows]) <= AUTO_TOL).all())
            )
            if use_fast:
                if Y_fast is None:
                    Y_fast, neg_yy_fast = Y.to(acc), (-yy).to(acc)
                T = torch.addmm(neg_yy_fast[None, :], x_fast[rows], Y_fast.T)
                Y_out = Y_fast if o_dtype == acc else None
            else:
                if acc != torch.float64:
                    if Y_fast is None:
                        Y_fast, neg_yy_fast = Y.to(acc), (-yy).to(acc)
                    tile = _sparse_exact_tile(
                        x_fast[rows],
                        x64[rows],
                        Y,
                        Y_fast,
                        neg_yy_fast,
                        a,
                        xx[rows],
                        sigma[rows],
                        inv2s2[rows],
                        err_fast,
                        need_out,
                        o_dtype,
                    )
                    if tile is not None:
                        _merge_rows(state, tile, rows)
                        continue
                if Y64 is None:
                    Y64 = Y.to(torch.float64)
                T = torch.addmm(-yy[None, :], x_scaled[rows], Y64.T)
                err = 2.0 * a * gamma64 * xnorm[rows] * ymax + 2.0**-50 * (
                    2 * a * xnorm[rows] * ymax + a * a * ymax * ymax
                )
                if bool(((err * inv2s2[rows]) > 2.0**-40).any()):
                    _refine(T, x64[rows], Y, a, xx[rows], sigma[rows], err)
                Y_out = Y64
            if need_out and Y_out is None:
                Y_out = Y.to(o_dtype)
            tile = _tile_state(T, a, xx[rows], inv2s2[rows], Y_out if need_out else None, o_dtype)
            _merge_rows(state, tile, rows)

    out, lse, top_w, n_eff = finalize_softmax_state(state)
    if out is not None:
        out = out.to(acc)
    return DenoiseResult(out, lse, top_w, n_eff)


def _merge_rows(state: SoftmaxState, tile: SoftmaxState, rows) -> None:
    """Merge a tile's state into the given rows (a slice or an index tensor) of the running state, in place."""
    part = SoftmaxState(state.m[rows], state.l[rows], state.q[rows], None if state.o is None else state.o[rows])
    merged = merge_softmax_states(part, tile)
    state.m[rows], state.l[rows], state.q[rows] = merged.m, merged.l, merged.q
    if state.o is not None:
        state.o[rows] = merged.o.to(state.o.dtype)


def _sparse_exact_tile(
    x_fast: torch.Tensor,
    x64: torch.Tensor,
    Y: torch.Tensor,
    Y_fast: torch.Tensor,
    neg_yy_fast: torch.Tensor,
    a: torch.Tensor,
    xx: torch.Tensor,
    sigma: torch.Tensor,
    inv2s2: torch.Tensor,
    err_fast: torch.Tensor,
    need_out: bool,
    o_dtype: torch.dtype,
) -> Optional[SoftmaxState]:
    """ "exact" at the cost of "fast" when few points carry the mass (small sigma), else None.

    One fp32 GEMM gives T with a certified error; every point within 2 s^2 TAIL_NATS + 2 err of the row max is a
    candidate. If no row has more than N_REFINE candidates, the candidates' state is computed exactly in float64 from
    their difference-based distances, the rest (each < e^-TAIL_NATS of the top weight) from the fp32 tile, and the
    two states are merged. Otherwise the caller falls back to a float64 GEMM.
    """
    T = torch.addmm(neg_yy_fast[None, :], x_fast, Y_fast.T)
    a2 = a * a
    window = ((2.0 * sigma * sigma * TAIL_NATS + 2.0 * err_fast) / a2).to(T.dtype)
    tmax = T.max(dim=1).values
    inside = T >= (tmax - window)[:, None]
    c = int(inside.sum(dim=1).max())
    if c > N_REFINE:
        return None
    vals, idx = torch.topk(T, c, dim=1)
    keep = vals >= (tmax - window)[:, None]
    d2 = exact_sqdist_pairs(x64, Y, idx, a)
    z = torch.where(keep, -d2 * inv2s2[:, None], torch.full_like(d2, float("-inf")))
    m = z.max(dim=1).values
    p = torch.exp(z - m[:, None])
    o = None
    if need_out:
        o = torch.zeros(x64.shape[0], Y.shape[1], dtype=o_dtype, device=x64.device)
        for j in range(c):
            o += p[:, j : j + 1].to(o_dtype) * Y[idx[:, j]].to(o_dtype)
    cand = SoftmaxState(m, p.sum(dim=1), (p * p).sum(dim=1), o)
    T.scatter_(1, idx, torch.where(keep, torch.full_like(vals, float("-inf")), vals))
    rest = _tile_state(T, a, xx, inv2s2, Y_fast if need_out else None, Y_fast.dtype)
    return merge_softmax_states(cand, rest)


def _refine(
    T: torch.Tensor,
    x64: torch.Tensor,
    Y: torch.Tensor,
    a: torch.Tensor,
    xx: torch.Tensor,
    sigma: torch.Tensor,
    err: torch.Tensor,
) -> None:
    """Recompute in place, as differences, T for the heaviest candidates of each row (those that carry the mass).

    err: certified |S error| per row (S = a^2 T); candidates are within 2 s^2 TAIL_NATS + 2 err of the max in S.
    """
    n = T.shape[1]
    c = min(n, N_REFINE)
    top = torch.topk(T, c, dim=1).indices
    a2 = a * a
    window = (2.0 * sigma * sigma * TAIL_NATS + 2.0 * err) / a2
    tmax = T.max(dim=1).values
    vals = torch.gather(T, 1, top)
    keep = vals >= (tmax - window)[:, None]
    d2 = exact_sqdist_pairs(x64, Y, top, a)
    exact = (xx[:, None] - d2) / a2[:, None]
    T.scatter_(1, top, torch.where(keep, exact, vals))


def lse_constant(d: int, n: int, bandwidth: torch.Tensor) -> torch.Tensor:
    """log N + (d / 2) log(2 pi h^2): what the KDE log-density subtracts from the log-sum-exp."""
    return math.log(n) + 0.5 * d * torch.log(2.0 * math.pi * bandwidth * bandwidth)
