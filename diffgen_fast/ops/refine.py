"""The certified "exact" refinement, written once for every backend (docs/precision.md, "The exact refinement").

A backend's fast path gives a tile of scores T [m, n] (T_i = 2 x.y_i / a - ||y_i||^2, so the logit is
z_i = (a^2 T_i - ||x||^2) / (2 s^2)) together with its certified error bound err_t [m] (|T~ - T| <= err_t for every
entry of the row). Every point that can carry more than e^-TAIL_NATS of the top weight lies within

    window = 2 s^2 TAIL_NATS / a^2 + 2 err_t

of the row max of T~ (the candidates). Their distances are recomputed as float64 differences ||x - a y_i||^2, the rest
keeps the fast tile's value. A backend chooses how to use the candidates:

  rebase           the candidates' exact scores are written into T, and T is re-based on the exact best one (the
                   per-row float64 shift is returned): for backends whose softmax runs on T afterwards (cpu, triton,
                   the torch reference's float64 tile);
  candidate_state  the candidates' softmax state is computed entirely in float64 and their entries of T are masked
                   out, so the caller merges that state with the fast tile's state of the rest (the torch reference's
                   fp32 tile: float64-accurate weights for the points that carry the mass);
  exact_scores     rebase, or when some row has more than N_REFINE candidates (sigma large against the data's spread)
                   the chunk's scores redone by a float64 GEMM and re-based (the norm expansion's float64 error is
                   negligible there).

The constants below are the only ones: every backend imports them from here (tests/test_driver.py checks it).
"""

from __future__ import annotations

from typing import Optional

import torch

from diffgen_fast.ops.merge import SoftmaxState

TAIL_NATS = 50.0  # a point outside the candidate window carries < e^-50 of the top weight
N_REFINE = 256  # most candidates per row and chunk recomputed as float64 differences
N_REFINE_NATIVE = 1024  # the same for the native CPU kernel (csrc/cpu/gemm_path.cpp), which handles ragged rows
REFINE_TOL = 1e-7  # certified logit error of a fast tile below which its scores are kept (fp32 results)
REFINE_TOL_F64 = 2.0**-40  # the same for a float64 tile (float64 results)
_PAIR_ELEMS = 1 << 24  # elements of one [rows, candidates, d] block of the difference recompute


def exact_sqdist_pairs(
    x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, alpha: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """||x_r - a_r y_{idx[r, j]}||^2 in float64, computed as differences: x [m, d], y [n, d], idx [m, c] -> [m, c]."""
    m, c = idx.shape
    d = x.shape[1]
    out = torch.empty(m, c, dtype=torch.float64, device=x.device)
    rows = max(1, _PAIR_ELEMS // max(1, c * d))
    for r0 in range(0, m, rows):
        r1 = min(m, r0 + rows)
        yb = y[idx[r0:r1]].to(torch.float64)  # [rb, c, d], a fresh tensor: updated in place below
        if alpha is not None and not bool((alpha[r0:r1] == 1).all()):
            yb.mul_(alpha[r0:r1, None, None])
        diff = yb.neg_().add_(x[r0:r1, None, :].to(torch.float64))
        out[r0:r1] = diff.square_().sum(-1)
    return out


def window(sigma: torch.Tensor, a: torch.Tensor, err_t: torch.Tensor, tail=TAIL_NATS) -> torch.Tensor:
    """[m] float64: half-width in T of the certified candidate window below the row max (tail: nats, float or
    per row, default TAIL_NATS)."""
    return 2.0 * sigma * sigma * tail / (a * a) + 2.0 * err_t


def tail_nats(n: int, a: torch.Tensor, sigma: torch.Tensor, err_t: torch.Tensor, tol: float = REFINE_TOL):
    """[m] float64: the narrowest certified tail (<= TAIL_NATS) for a chunk of n points whose fast scores have
    certified error err_t. A point outside the window weighs <= e^-tail of the row's top weight and its logit is off
    by <= delta = a^2 err_t / (2 s^2), so the n of them together change l, q and o by <= n e^-tail (e^delta - 1)
    of the top weight: tail = log(n (e^delta - 1) / tol) keeps that below tol (relative, as REFINE_TOL)."""
    delta = err_t * a * a * 0.5 / (sigma * sigma)
    t = torch.log(torch.expm1(2.0 * delta).clamp_min(1e-300) * max(n, 1) / tol)
    return t.clamp(0.0, TAIL_NATS)


def needs_refine(err_t: torch.Tensor, a: torch.Tensor, sigma: torch.Tensor, tol: float = REFINE_TOL) -> bool:
    """True when the fast tile's certified logit error a^2 err_t / (2 s^2) exceeds tol in some row."""
    return bool((err_t * a * a * 0.5 / (sigma * sigma) > tol).any())


def candidates(
    T: torch.Tensor, sigma: torch.Tensor, a: torch.Tensor, err_t: torch.Tensor, *, partial: bool = False, tail=TAIL_NATS
):
    """(values, column index, keep mask) [m, c] of the candidates of every row (ordered by T, `keep` False for the
    padding of rows with fewer), or None when some row has more than N_REFINE and partial is False (partial: the
    N_REFINE highest are taken)."""
    tmax = T.max(dim=1).values
    lo = (tmax - window(sigma, a, err_t, tail).to(T.dtype))[:, None]
    c = int((T >= lo).sum(dim=1).max()) if T.numel() else 0
    if c > N_REFINE:
        if not partial:
            return None
        c = N_REFINE
    vals, idx = torch.topk(T, c, dim=1)
    return vals, idx, vals >= lo


def _exact_t(x64, Y, idx, a, xx) -> torch.Tensor:
    return (xx[:, None] - exact_sqdist_pairs(x64, Y, idx, a)) / (a * a)[:, None]


def rebase(
    T: torch.Tensor,
    x64: torch.Tensor,
    Y: torch.Tensor,
    a: torch.Tensor,
    xx: torch.Tensor,
    sigma: torch.Tensor,
    err_t: torch.Tensor,
    *,
    partial: bool = False,
    tail=TAIL_NATS,
) -> Optional[torch.Tensor]:
    """Write the candidates' exact scores into T (in place, any float dtype) and re-base T on the exact best one.

    Returns the float64 per-row shift (T now holds T - shift), or None (T untouched) when a row has more than
    N_REFINE candidates and partial is False."""
    cand = candidates(T, sigma, a, err_t, partial=partial, tail=tail)
    if cand is None or cand[1].shape[1] == 0:
        return None
    vals, idx, keep = cand
    t_exact = torch.where(keep, _exact_t(x64, Y, idx, a, xx), torch.full(keep.shape, float("-inf"), dtype=torch.float64,
                                                                          device=T.device))  # fmt: skip
    shift = t_exact.max(dim=1).values
    shift = torch.where(torch.isneginf(shift), torch.zeros_like(shift), shift)  # rows without a candidate (empty)
    T.sub_(shift.to(T.dtype)[:, None])
    rebased = torch.where(keep, (t_exact - shift[:, None]).to(T.dtype), vals - shift.to(T.dtype)[:, None])
    T.scatter_(1, idx, rebased)
    return shift


def exact_scores(
    T: torch.Tensor,
    x64: torch.Tensor,
    Y: torch.Tensor,
    a: torch.Tensor,
    xx: torch.Tensor,
    sigma: torch.Tensor,
    err_t: torch.Tensor,
    yy64: torch.Tensor,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(T, shift): T refined where it carries the softmax mass. Kept as is (shift None) when its certified logit
    error is below REFINE_TOL; re-based on the candidates' exact scores when every row has at most N_REFINE; else
    recomputed by a float64 GEMM, re-based on its row max and returned in T's dtype."""
    if not needs_refine(err_t, a, sigma):
        return T, None
    shift = rebase(T, x64, Y, a, xx, sigma, err_t)
    if shift is not None:
        return T, shift
    xs64 = x64 * (2.0 / a)[:, None]
    T64 = torch.addmm(yy64.neg()[None, :], xs64, Y.to(torch.float64).T)
    shift = T64.max(dim=1).values
    return (T64 - shift[:, None]).to(T.dtype), shift


def candidate_state(
    T: torch.Tensor,
    x64: torch.Tensor,
    Y: torch.Tensor,
    a: torch.Tensor,
    sigma: torch.Tensor,
    inv2s2: torch.Tensor,
    err_t: torch.Tensor,
    need_out: bool,
    o_dtype: torch.dtype,
) -> Optional[SoftmaxState]:
    """The candidates' softmax state in float64 from difference-based distances, their entries of T set to -inf
    (in place), so that the caller merges it with the fast tile's state of the rest; None (T untouched) when some
    row has more than N_REFINE candidates."""
    cand = candidates(T, sigma, a, err_t)
    if cand is None or cand[1].shape[1] == 0:
        return None
    vals, idx, keep = cand
    d2 = exact_sqdist_pairs(x64, Y, idx, a)
    z = torch.where(keep, -d2 * inv2s2[:, None], torch.full_like(d2, float("-inf")))
    m = z.max(dim=1).values
    p = torch.exp(z - torch.where(torch.isneginf(m), torch.zeros_like(m), m)[:, None])
    o = None
    if need_out:
        o = torch.empty(x64.shape[0], Y.shape[1], dtype=o_dtype, device=x64.device)
        c = idx.shape[1]
        rows = max(1, _PAIR_ELEMS // max(1, c * Y.shape[1]))
        for r0 in range(0, o.shape[0], rows):
            r1 = r0 + rows
            o[r0:r1] = torch.einsum("rc,rcd->rd", p[r0:r1].to(o_dtype), Y[idx[r0:r1]].to(o_dtype))
    T.scatter_(1, idx, torch.where(keep, torch.full_like(vals, float("-inf")), vals))
    return SoftmaxState(m, p.sum(dim=1), (p * p).sum(dim=1), o)


__all__ = [
    "TAIL_NATS",
    "N_REFINE",
    "N_REFINE_NATIVE",
    "REFINE_TOL",
    "REFINE_TOL_F64",
    "exact_sqdist_pairs",
    "window",
    "tail_nats",
    "needs_refine",
    "candidates",
    "rebase",
    "exact_scores",
    "candidate_state",
]
