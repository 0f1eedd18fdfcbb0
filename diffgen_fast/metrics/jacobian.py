"""The spectrum of a denoiser's Jacobian at a point (Kadkhodaie et al. 2023: what a denoiser has learned).

For the empirical optimum D* the Jacobian is closed form, J = (alpha / sigma^2) Cov_w(y) (symmetric, PSD), and J v
is one exact float64 pass over the training set (diffgen_fast.softmax_denoise_jvp). For any other denoiser callable
(a network, the Gaussian denoiser) J v comes from forward-mode autograd (torch.func.jvp) and J^T v from reverse
mode; the eigenpairs are those of the symmetric part (J + J^T) / 2 (equal to J for a symmetric Jacobian), and the
measured asymmetry ||J v - J^T v|| / ||J v|| on a random probe is reported. The top-k eigenpairs come from
Lanczos (scipy.sparse.linalg.eigsh) on those products.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch

from diffgen_fast.errors import InputError


def _matvecs(denoiser: Any, x: torch.Tensor, sigma: float, alpha: float, class_labels):
    """(J v, J^T v, exact) as functions of a flat float64 vector, for one point x [1, *shape]."""
    from diffgen_fast.denoisers import EmpiricalDenoiser
    from diffgen_fast.ops.softmax_denoise.autograd import softmax_denoise_jvp

    shape = x.shape
    if isinstance(denoiser, EmpiricalDenoiser) and class_labels is None:
        ts = denoiser.train_set
        xd = x.detach()

        def jv(v: torch.Tensor) -> torch.Tensor:
            out = softmax_denoise_jvp(xd, ts, sigma, v.reshape(shape).to(xd.dtype), alpha)
            return out.reshape(-1).double()

        return jv, jv, True

    def f(z: torch.Tensor) -> torch.Tensor:
        kw = {} if class_labels is None else {"class_labels": class_labels}
        if alpha != 1.0:
            kw["alpha"] = alpha
        sig = torch.full((shape[0],), float(sigma), dtype=z.dtype, device=z.device)
        return torch.as_tensor(denoiser(z, sig, **kw))

    def jv(v: torch.Tensor) -> torch.Tensor:
        _, t = torch.func.jvp(f, (x.detach(),), (v.reshape(shape).to(x.dtype),))
        return t.reshape(-1).double()

    def vj(v: torch.Tensor) -> torch.Tensor:
        xr = x.detach().clone().requires_grad_()
        (g,) = torch.autograd.grad(f(xr), xr, v.reshape(shape).to(x.dtype))
        return g.reshape(-1).double()

    return jv, vj, False


def jacobian_spectrum(
    denoiser: Callable,
    x,
    sigma: float,
    k: int = 8,
    *,
    alpha: float = 1.0,
    class_labels=None,
    tol: float = 1e-10,
    seed: int = 0,
    trace_probes: int = 32,
) -> dict:
    """Top-k eigenpairs of the Jacobian of `denoiser` at the point x.

    Args:
        denoiser: an EDM-style callable D(x, sigma) (EmpiricalDenoiser: closed form; anything else: autograd).
        x: one point, [*shape] or [1, *shape] (torch or numpy, floating).
        sigma: noise level > 0; alpha: signal scale (passed to the denoiser when != 1).
        k: eigenpairs wanted, 1 <= k < d.
        tol: Lanczos tolerance; seed: its start vector and the trace probes.
        trace_probes: Hutchinson probes for the trace when it is not closed form.
    Returns:
        dict with eigenvalues [k] (descending, numpy float64), eigenvectors [k, *shape] (numpy), trace (exact for
        D*: (alpha / sigma^2) sum_j Var_w(y_j); else a Hutchinson estimate with its standard error), effective_rank
        (trace / largest eigenvalue: the number of unit eigenvalues a projection of that trace would have),
        participation_ratio of the top k ((sum l)^2 / sum l^2), asymmetry (0 for D*), exact (closed form or not).
    """
    from scipy.sparse.linalg import LinearOperator, eigsh

    xt = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if not xt.is_floating_point():
        raise InputError(f"x: expected a floating tensor, got {xt.dtype}")
    if xt.ndim == 0:
        raise InputError("x: expected one point [*shape] or [1, *shape], got a scalar")
    if xt.ndim == 1 or xt.shape[0] != 1:
        xt = xt[None]
    if not bool(torch.isfinite(xt).all()):
        raise InputError("x: contains NaN or Inf; expected finite values")
    d = math.prod(xt.shape[1:])
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < d:
        raise InputError(f"k: expected an int with 1 <= k < d = {d}, got {k!r}")
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
        raise InputError(f"sigma: expected a finite number > 0, got {sigma!r}")
    jv, vj, exact = _matvecs(denoiser, xt, float(sigma), float(alpha), class_labels)
    rng = np.random.default_rng(seed)
    probe = torch.from_numpy(rng.standard_normal(d))
    a, b = jv(probe), vj(probe)
    asymmetry = 0.0 if exact else float((a - b).norm() / a.norm().clamp(min=1e-300))

    def sym(v: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64).reshape(-1))
        out = jv(t) if exact else 0.5 * (jv(t) + vj(t))
        return out.cpu().numpy()

    op = LinearOperator((d, d), matvec=sym, dtype=np.float64)
    vals, vecs = eigsh(op, k=k, which="LA", tol=tol, v0=rng.standard_normal(d))
    order = np.argsort(vals)[::-1]
    vals, vecs = vals[order], vecs[:, order]
    if exact:
        trace, trace_se = _trace_empirical(denoiser, xt, float(sigma), float(alpha)), 0.0
    else:
        est = []
        for _ in range(trace_probes):
            z = rng.choice([-1.0, 1.0], size=d)
            est.append(float(z @ sym(z)))
        trace, trace_se = float(np.mean(est)), float(np.std(est, ddof=1) / math.sqrt(len(est)))
    top = float(vals[0]) if vals[0] > 0 else float("nan")
    pos = np.clip(vals, 0, None)
    return {
        "eigenvalues": vals,
        "eigenvectors": vecs.T.reshape(k, *xt.shape[1:]),
        "trace": trace,
        "trace_stderr": trace_se,
        "effective_rank": trace / top if top == top else float("nan"),
        "participation_ratio": float(pos.sum() ** 2 / (pos**2).sum()) if pos.sum() > 0 else float("nan"),
        "asymmetry": asymmetry,
        "exact": exact,
        "sigma": float(sigma),
        "alpha": float(alpha),
    }


def _trace_empirical(denoiser: Any, x: torch.Tensor, sigma: float, alpha: float) -> float:
    """tr J of D* = (alpha / sigma^2) sum_j Var_w(y_j), from the weights (one float64 pass about the mean D)."""
    from diffgen_fast.ops.softmax_denoise import softmax_denoise

    ts = denoiser.train_set
    x2 = x.reshape(1, -1).double()
    D, lse = softmax_denoise(x2, ts, sigma, alpha, return_lse=True)
    D, lse = D.double(), lse.double()
    total = 0.0
    for _, Y in ts.iter_chunks(device="cpu", dtype=torch.float64):
        diff = x2 - alpha * Y
        w = torch.exp(-(diff * diff).sum(dim=1) / (2 * sigma * sigma) - lse)
        total += float((w * ((Y - D) ** 2).sum(dim=1)).sum())
    return alpha / sigma**2 * total


__all__ = ["jacobian_spectrum"]
