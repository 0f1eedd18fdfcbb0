"""Autograd for softmax_denoise and kde_log_density, on every backend.

The forward runs the chosen backend on detached inputs; the backward is closed form (docs/science.md section 2.5,
"The denoiser's Jacobian") and computed by two exact float64 passes over the training set, streamed in chunks:

    z_i = -||x - a y_i||^2 / (2 s^2),  w = softmax(z),  D = sum_i w_i y_i,  L = log sum_i exp z_i
    dD/dx = (a / s^2) Cov_w(y)                      (symmetric: J^T g = J g)
    dL/dx = (a D - x) / s^2                         (the score of the Gaussian KDE)
    dD/ds = Cov_w(y, r),  dL/ds = E_w[r],  r_i = ||x - a y_i||^2 / s^3
    dD/da = Cov_w(y, u),  dL/da = E_w[u],  u_i = (x . y_i - a ||y_i||^2) / s^2

so for output gradients gD [M, d] and gL [M], with c_i = y_i . gD and E_w the w-weighted mean,

    grad_x = (a / s^2) (E_w[c y] - D (D . gD)) + gL (a D - x) / s^2
    grad_s = E_w[c r] - (D . gD) E_w[r] + gL E_w[r]
    grad_a = E_w[c u] - (D . gD) E_w[u] + gL E_w[u]

The pass keeps the weights as exp(z_i - m) with a running row maximum m (online softmax), so it is exact at every
sigma; the logits are computed as float64 differences where float64's norm expansion could cancel (small sigma).
No gradient flows to the training set (a tensor training set that requires grad is refused).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from diffgen_fast.ops.softmax_denoise.reference import DenoiseResult

_TILE = 1 << 21  # elements of one [query block, chunk] tile in the backward pass


def _by_differences(x: torch.Tensor, a: torch.Tensor, Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(||x_r - a_r y_i||^2, (x_r - a_r y_i) . y_i), [m, n] each, from float64 differences, in bounded blocks."""
    m, n = x.shape[0], Y.shape[0]
    sq = torch.empty(m, n, dtype=torch.float64, device=x.device)
    u = torch.empty_like(sq)
    rb = max(1, (1 << 24) // max(1, n * Y.shape[1]))
    for r0 in range(0, m, rb):
        r1 = min(m, r0 + rb)
        diff = x[r0:r1, None, :] - a[r0:r1, None, None] * Y[None]
        sq[r0:r1] = (diff * diff).sum(dim=-1)
        u[r0:r1] = (diff * Y[None]).sum(dim=-1)
    return sq, u


def _tiles(x: torch.Tensor, a: torch.Tensor, inv_s2: torch.Tensor, train):
    """Per training chunk: (Y [n, d], sq [M, n] = ||x - a y||^2, u [M, n] = (x - a y) . y / s^2), float64."""
    M, d = x.shape
    xx = (x * x).sum(dim=1)
    chunk = max(1, min(len(train), _TILE // max(M, 1), (1 << 24) // max(d, 1)))
    for _, Y in train.iter_chunks(chunk, device=x.device, dtype=torch.float64):
        yy = (Y * Y).sum(dim=1)
        xy = x @ Y.T
        sq = (xx[:, None] - 2.0 * a[:, None] * xy + (a * a)[:, None] * yy[None, :]).clamp_(min=0.0)
        u = (xy - a[:, None] * yy[None, :]) * inv_s2[:, None]
        # Rows where the expansion's rounding (a few ulps of ||x||^2 + a^2 max||y||^2, scaled by 1/2s^2) could move
        # a logit by more than 1e-10: their distances and u are recomputed as differences.
        bound = 8.0 * 2.0**-52 * (xx + a * a * yy.max()) * 0.5 * inv_s2
        rows = (bound > 1e-10).nonzero().flatten()
        if rows.numel():
            sq_r, u_r = _by_differences(x[rows], a[rows], Y)
            sq[rows] = sq_r
            u[rows] = u_r * inv_s2[rows, None]
        yield Y, sq, u


def _backward_pass(
    x: torch.Tensor, train, s: torch.Tensor, a: torch.Tensor, gD: Optional[torch.Tensor], gL: Optional[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x [M, d], grad_s [M], grad_a [M]) in float64 for the output gradients gD [M, d] / gL [M] (None: 0).

    Two passes: the first finds the row maximum logit, the normaliser, D, E_w[r] and E_w[u] (online softmax); the
    second accumulates the covariances about those means, so nothing cancels at small sigma."""
    M, d = x.shape
    dev = x.device
    x = x.to(torch.float64)
    gL = torch.zeros(M, dtype=torch.float64, device=dev) if gL is None else gL.to(torch.float64)
    inv_s2 = 1.0 / (s * s)
    m = torch.full((M,), float("-inf"), dtype=torch.float64, device=dev)
    S0 = torch.zeros(M, dtype=torch.float64, device=dev)
    Sy = torch.zeros(M, d, dtype=torch.float64, device=dev)
    Sr = torch.zeros_like(S0)
    Su = torch.zeros_like(S0)
    for Y, sq, u in _tiles(x, a, inv_s2, train):
        z = -0.5 * sq * inv_s2[:, None]
        m_new = torch.maximum(m, z.max(dim=1).values)
        corr = torch.exp(m - m_new)  # 0 on the first chunk (m = -inf)
        e = torch.exp(z - m_new[:, None])
        S0 = S0 * corr + e.sum(dim=1)
        Sy = Sy * corr[:, None] + e @ Y
        Sr = Sr * corr + (e * sq).sum(dim=1)
        Su = Su * corr + (e * u).sum(dim=1)
        m = m_new
    D = Sy / S0[:, None]
    Er = Sr / S0 * (inv_s2 / s)  # r = ||x - a y||^2 / s^3
    Eu = Su / S0
    grad_x = gL[:, None] * (a[:, None] * D - x) * inv_s2[:, None]
    grad_s = gL * Er
    grad_a = gL * Eu
    if gD is None:
        return grad_x, grad_s, grad_a
    gD = gD.to(torch.float64)
    Dg = (D * gD).sum(dim=1)
    Cyg = torch.zeros(M, d, dtype=torch.float64, device=dev)  # E_w[(y - D) (c - Dg)]
    Ccr = torch.zeros_like(S0)  # E_w[(c - Dg)(r - Er)]
    Ccu = torch.zeros_like(S0)
    logS0 = m + torch.log(S0)
    for Y, sq, u in _tiles(x, a, inv_s2, train):
        w = torch.exp(-0.5 * sq * inv_s2[:, None] - logS0[:, None])  # the exact weights
        wc = w * (gD @ Y.T - Dg[:, None])
        Cyg += wc @ Y - wc.sum(dim=1, keepdim=True) * D
        Ccr += (wc * (sq * (inv_s2 / s)[:, None] - Er[:, None])).sum(dim=1)
        Ccu += (wc * (u - Eu[:, None])).sum(dim=1)
    grad_x = grad_x + (a * inv_s2)[:, None] * Cyg
    return grad_x, grad_s + Ccr, grad_a + Ccu


class _SoftmaxDenoise(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, s, a, train, impl: Callable, precision: str, need_out: bool):  # type: ignore[override]
        res: DenoiseResult = impl(x.detach(), train, s.detach(), a.detach(), precision=precision, need_out=need_out)
        ctx.train = train
        ctx.save_for_backward(x, s, a)
        ctx.mark_non_differentiable(res.top_weight, res.n_eff)
        den = res.denoised if need_out else x.new_zeros(0)
        return den, res.lse, res.top_weight, res.n_eff

    @staticmethod
    def backward(ctx, gD, gL, _gt, _gn):  # type: ignore[override]
        x, s, a = ctx.saved_tensors
        need_x, need_s, need_a = ctx.needs_input_grad[:3]
        if not (need_x or need_s or need_a):
            return (None,) * 7
        gD = None if gD is None or gD.numel() == 0 else gD
        gx, gs, ga = _backward_pass(x.detach(), ctx.train, s.detach(), a.detach(), gD, gL)
        return (
            gx.to(x.dtype) if need_x else None,
            gs.to(s.dtype) if need_s else None,
            ga.to(a.dtype) if need_a else None,
            None,
            None,
            None,
            None,
        )


def needs_grad(*tensors: Any) -> bool:
    """True when autograd is recording and any of the tensors requires grad."""
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def differentiable_call(
    impl: Callable, x: torch.Tensor, train, s: torch.Tensor, a: torch.Tensor, *, precision: str, need_out: bool = True
) -> DenoiseResult:
    """impl's DenoiseResult, with denoised and lse differentiable in x, s and a (closed-form backward)."""
    den, lse, top, neff = _SoftmaxDenoise.apply(x, s, a, train, impl, precision, need_out)
    return DenoiseResult(den if need_out else None, lse, top, neff)


__all__ = ["differentiable_call", "needs_grad", "softmax_denoise_jvp"]


def softmax_denoise_jvp(x, train, sigma, v, alpha=1.0, *, backend: str = "auto"):
    """J v, the denoiser's Jacobian-vector product, streamed and exact (float64 pass): J = (alpha / sigma^2) Cov_w(y).

    J is symmetric, so this is also the vector-Jacobian product v^T J. Args as softmax_denoise; v: [M, *shape] or
    [M, d], the same shape as x. backend: accepted for symmetry with the other ops (the pass is the float64 torch
    one on x's device, whichever backend is named). Returns J v with x's shape, float64 when x or train is float64
    else float32; numpy in, numpy out.
    """
    from diffgen_fast.errors import InputError
    from diffgen_fast.ops import dispatch
    from diffgen_fast.ops._checks import check_queries, per_query
    from diffgen_fast.ops._prepare import back, prepare

    xt, x2, ts, was_np = prepare(x, train)
    vt, _ = check_queries(v, "v")
    if tuple(vt.shape) != tuple(xt.shape) and tuple(vt.reshape(vt.shape[0], -1).shape) != tuple(x2.shape):
        raise InputError(f"v: expected the shape of x {tuple(xt.shape)}, got {tuple(vt.shape)}")
    dispatch.resolve("softmax_denoise", backend, x2.device, torch.promote_types(x2.dtype, ts.dtype), d=x2.shape[1])
    M = x2.shape[0]
    s = per_query(sigma, M, "sigma", device=x2.device)
    a = per_query(alpha, M, "alpha", device=x2.device)
    v2 = vt.reshape(M, -1).to(device=x2.device)
    jv, _, _ = _backward_pass(x2.detach(), ts, s, a, v2.detach(), None)
    dtype = torch.float64 if torch.float64 in (x2.dtype, ts.dtype) else torch.float32
    return back(jv.to(dtype).reshape(xt.shape), was_np)
