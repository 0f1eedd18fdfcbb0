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


def _tile_state(
    S: torch.Tensor, xx: torch.Tensor, inv2s2: torch.Tensor, Y_out: Optional[torch.Tensor], o_dtype: torch.dtype
) -> SoftmaxState:
    """Softmax state of one tile: S [m, n] (float32/64), xx, inv2s2 [m] float64, Y_out [n, d] or None."""
    smax = S.max(dim=1).values
    scale = inv2s2.to(S.dtype).clamp(max=torch.finfo(S.dtype).max)
    z = (S - smax[:, None]) * scale[:, None]
    z = torch.where(S == smax[:, None], torch.zeros_like(z), z)  # 0 * inf at vanishing sigma
    P = torch.exp(z)
    m = (smax.to(torch.float64) - xx) * inv2s2
    l = P.sum(dim=1, dtype=torch.float64)
    q = (P * P).sum(dim=1, dtype=torch.float64)
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
    acc = acc_dtype(x.dtype, train.dtype)
    fast_gemm = torch.promote_types(x.dtype, train.dtype)
    o_dtype = acc if precision == "fast" else torch.float64
    inv2s2 = 0.5 / (sigma * sigma)
    x64 = x.to(torch.float64)
    xx = (x64 * x64).sum(dim=1)
    xnorm = xx.sqrt()
    state = empty_softmax_state(M, d if need_out else None, dtype=o_dtype, device=dev)
    chunk = chunk_size or default_chunk_size(d)
    x_fast = x.to(fast_gemm)
    gamma_fast = gemm_error_bound(d, fast_gemm, dev, inputs_rounded=x.dtype != train.dtype)
    gamma64 = gemm_error_bound(d, torch.float64, dev, inputs_rounded=False)

    for _, Y in train.iter_chunks(chunk, device=dev):
        n = Y.shape[0]
        Y64 = Y.to(torch.float64)
        yy = (Y64 * Y64).sum(dim=1)
        ymax = float(yy.max().sqrt())
        mb = max(1, min(M, _TILE_ELEMS // n))
        Y_fast = None
        Y_out = Y64 if o_dtype == torch.float64 else Y.to(o_dtype)
        for r0 in range(0, M, mb):
            r1 = min(M, r0 + mb)
            a = alpha[r0:r1]
            # certified bound on |S error| per row from the fast GEMM
            err_fast = 2.0 * a * gamma_fast * xnorm[r0:r1] * ymax
            use_fast = precision == "fast" or (
                precision == "auto" and bool(((err_fast * inv2s2[r0:r1]) <= AUTO_TOL).all())
            )
            if use_fast:
                if Y_fast is None:
                    Y_fast = Y.to(fast_gemm)
                G = (x_fast[r0:r1] @ Y_fast.T).to(acc)
                S = 2.0 * a.to(acc)[:, None] * G - (a * a).to(acc)[:, None] * yy.to(acc)[None, :]
            else:
                G = x64[r0:r1] @ Y64.T
                S = 2.0 * a[:, None] * G - (a * a)[:, None] * yy[None, :]
                err = 2.0 * a * gamma64 * xnorm[r0:r1] * ymax + 2.0**-51 * (
                    2 * a * xnorm[r0:r1] * ymax + a * a * ymax * ymax
                )
                if bool(((err * inv2s2[r0:r1]) > 2.0**-40).any()):
                    _refine(S, x64[r0:r1], Y64, a, xx[r0:r1], sigma[r0:r1], err)
            tile = _tile_state(S, xx[r0:r1], inv2s2[r0:r1], Y_out if need_out else None, o_dtype)
            part = SoftmaxState(
                state.m[r0:r1], state.l[r0:r1], state.q[r0:r1], None if state.o is None else state.o[r0:r1]
            )
            merged = merge_softmax_states(part, tile)
            state.m[r0:r1], state.l[r0:r1], state.q[r0:r1] = merged.m, merged.l, merged.q
            if state.o is not None:
                state.o[r0:r1] = merged.o

    out, lse, top_w, n_eff = finalize_softmax_state(state)
    if out is not None:
        out = out.to(acc)
    return DenoiseResult(out, lse, top_w, n_eff)


def _refine(
    S: torch.Tensor,
    x64: torch.Tensor,
    Y64: torch.Tensor,
    a: torch.Tensor,
    xx: torch.Tensor,
    sigma: torch.Tensor,
    err: torch.Tensor,
) -> None:
    """Recompute in place, as differences, S for the heaviest candidates of each row (those that carry the mass)."""
    n = S.shape[1]
    c = min(n, N_REFINE)
    top = torch.topk(S, c, dim=1).indices
    window = 2.0 * sigma * sigma * TAIL_NATS + 2.0 * err
    smax = S.max(dim=1).values
    vals = torch.gather(S, 1, top)
    keep = vals >= (smax - window)[:, None]
    d2 = exact_sqdist_pairs(x64, Y64, top, a)
    exact = xx[:, None] - d2
    S.scatter_(1, top, torch.where(keep, exact, vals))


def lse_constant(d: int, n: int, bandwidth: torch.Tensor) -> torch.Tensor:
    """log N + (d / 2) log(2 pi h^2): what the KDE log-density subtracts from the log-sum-exp."""
    return math.log(n) + 0.5 * d * torch.log(2.0 * math.pi * bandwidth * bandwidth)
