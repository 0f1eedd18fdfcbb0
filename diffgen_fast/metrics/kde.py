"""Generalization as distance to the KDE (Halder 2024, "From memorization to generalization"; docs/science.md 6).

Setting: data y ~ rho_O = N(m 1, s^2 I_d); a training set T = {y_1..y_N} drawn from rho_O; rho_T the Gaussian KDE of
T with bandwidth h, (1/N) sum_i N(y_i, h^2 I). A generated distribution rho_gen is compared with both:

    E_TG = D(rho_gen, rho_T),   E_OG = D(rho_gen, rho_O),   Delta = E_TG - E_OG,

with D(p, q) = int (p - q)^2 = <p, p> - 2 <p, q> + <q, q> the squared L2 distance between densities. The model is in
the generalization regime (closer to the truth than to its training set) when P(Delta > 0) -> 1 over redraws of T.

Two generators:

- ``"kde"``: rho_gen = KDE of T with bandwidth h_gen (default h_gen = h, the score-matching optimum on T: then
  rho_gen = rho_T, E_TG = 0 and Delta = -D(rho_T, rho_O) < 0 -- pure memorization).
- ``"gaussian"``: rho_gen = N(mu_hat, C_hat + h^2 I), the Gaussian fitted to T (mu_hat the sample mean, C_hat the
  unbiased sample covariance, ddof = 1) -- the generalizing linear model.

Every density here is a Gaussian mixture, so every inner product has the closed form
<N(a, A), N(b, B)> = N(a; b, A + B). All computations are float64 and in log space (log-sum-exp over component
pairs): in high d these inner products are tiny (they scale like (4 pi s^2)^(-d/2)), so the results also carry
log-scale values and Delta_rel = Delta / <rho_O, rho_O>, which is scale free. Delta is formed without the
<rho_gen, rho_gen> term, which cancels exactly:

    Delta = (<T, T> - <O, O>) + 2 (<g, O> - <g, T>),

each bracket a difference of two exponentials computed with expm1.

Default bandwidth (Silverman's rule of thumb for a d-dimensional Gaussian with known scale s):

    h(N, d) = s * (4 / (d + 2))^(1 / (d + 4)) * N^(-1 / (d + 4)).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from diffgen_fast.errors import InputError

GENERATORS = ("gaussian", "kde", "linear")
_CHUNK_ELEMS = 1 << 22  # ~32 MiB of float64 per pairwise-difference block
_LOG_2PI = math.log(2.0 * math.pi)

__all__ = [
    "GENERATORS",
    "GaussianMixture",
    "LinearDenoiserFit",
    "analyze_kde",
    "analyze_kde_scales",
    "delta_sweep",
    "gaussian_kl",
    "gaussian_kl_mc",
    "gaussian_mixture",
    "gaussian_mixture_inner",
    "gaussian_mixture_log_inner",
    "halder_bandwidth",
    "l2_distance",
    "linear_denoiser_fit",
    "linear_kl",
    "log_l2_distance",
    "relative_distance",
    "scales_figure",
    "silverman_bandwidth",
]


# ----------------------------------------------------------------------------------------------------------------------
# Validation helpers


def _positive(value: Any, name: str, where: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{where}: {name} must be a number > 0, got {value!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise InputError(f"{where}: {name} must be a finite number > 0, got {value!r}")
    return v


def _finite(value: Any, name: str, where: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{where}: {name} must be a finite number, got {value!r}") from None
    if not math.isfinite(v):
        raise InputError(f"{where}: {name} must be a finite number, got {value!r}")
    return v


def _int_at_least(value: Any, lo: int, name: str, where: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        if isinstance(value, (float, np.floating)) and float(value).is_integer():
            value = int(value)
        else:
            raise InputError(f"{where}: {name} must be an integer >= {lo}, got {value!r}")
    if int(value) < lo:
        raise InputError(f"{where}: {name} must be an integer >= {lo}, got {value!r}")
    return int(value)


def _generator(generator: Any, where: str) -> str:
    if generator not in GENERATORS:
        raise InputError(f"{where}: generator must be one of {GENERATORS}, got {generator!r}")
    return generator


def _as_array(a: Any, name: str, where: str) -> np.ndarray:
    if hasattr(a, "detach") and hasattr(a, "cpu"):  # torch tensor
        a = a.detach().cpu().double().numpy()
    try:
        arr = np.asarray(a, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"{where}: {name} must be a numeric array, got {type(a).__name__}") from None
    if not np.all(np.isfinite(arr)):
        raise InputError(f"{where}: {name} contains NaN or Inf")
    return arr


def _train_array(train: Any, where: str) -> np.ndarray:
    y = _as_array(train, "train", where)
    if y.ndim != 2:
        raise InputError(f"{where}: train must be a 2-D array [N, d], got shape {tuple(y.shape)}")
    if y.shape[0] < 2:
        raise InputError(f"{where}: train needs N >= 2 points, got N = {y.shape[0]}")
    if y.shape[1] < 1:
        raise InputError(f"{where}: train needs d >= 1, got shape {tuple(y.shape)}")
    return y


def halder_bandwidth(N: int, d: int, s: float = 1.0) -> float:
    """The KDE bandwidth of Halder's reference code, h = s * N^(-1/d)."""
    N = _int_at_least(N, 2, "N", "halder_bandwidth")
    d = _int_at_least(d, 1, "d", "halder_bandwidth")
    s = _positive(s, "s", "halder_bandwidth")
    return s * N ** (-1.0 / d)


def silverman_bandwidth(N: int, d: int, s: float = 1.0) -> float:
    """Silverman-like default bandwidth h = s * (4 / (d + 2))^(1 / (d + 4)) * N^(-1 / (d + 4))."""
    N = _int_at_least(N, 2, "N", "silverman_bandwidth")
    d = _int_at_least(d, 1, "d", "silverman_bandwidth")
    s = _positive(s, "s", "silverman_bandwidth")
    return s * (4.0 / (d + 2)) ** (1.0 / (d + 4)) * N ** (-1.0 / (d + 4))


# ----------------------------------------------------------------------------------------------------------------------
# Gaussian mixtures and their closed-form inner products


@dataclass(frozen=True)
class GaussianMixture:
    """sum_k weights[k] N(means[k], Sigma_k) in R^d, float64.

    ``cov`` is one of: shape () -- one isotropic variance shared by all components (Sigma_k = cov I);
    shape [K] -- an isotropic variance per component (Sigma_k = cov[k] I); shape [d, d] -- one full covariance shared
    by all components. ``kind`` is "iso" for the first two (``cov`` is then stored as [K]) and "full" for the last.
    """

    means: np.ndarray  # [K, d]
    cov: np.ndarray  # [K] (kind "iso") or [d, d] (kind "full")
    weights: np.ndarray  # [K], sums to 1
    kind: str

    @property
    def d(self) -> int:
        return int(self.means.shape[1])

    @property
    def K(self) -> int:
        return int(self.means.shape[0])

    def log_pdf(self, x: Any) -> np.ndarray:
        """log density at points x [M, d] (float64 [M])."""
        x = _as_array(x, "x", "GaussianMixture.log_pdf")
        if x.ndim == 1:
            x = x[:, None] if self.d == 1 else x[None, :]
        if x.ndim != 2 or x.shape[1] != self.d:
            raise InputError(f"GaussianMixture.log_pdf: x must be [M, {self.d}], got shape {tuple(x.shape)}")
        point = GaussianMixture(x, np.zeros(len(x)), np.full(len(x), 1.0 / len(x)), "iso")
        # N(x; mu_k, Sigma_k) = <delta_x, N(mu_k, Sigma_k)>: reuse the pair kernel with a zero-variance "mixture"
        logk = _pair_log_kernel(point, self)  # [M, K]
        return _logsumexp(logk + np.log(self.weights)[None, :], axis=1)


def gaussian_mixture(means: Any, cov: Any, weights: Any = None) -> GaussianMixture:
    """Build a validated :class:`GaussianMixture` (see its docstring for the forms ``cov`` may take).

    means: [K, d] (or [d] for a single component); weights: [K] >= 0, normalised here (default uniform).
    """
    where = "gaussian_mixture"
    mu = _as_array(means, "means", where)
    if mu.ndim == 1:
        mu = mu[None, :]
    if mu.ndim != 2 or mu.shape[0] < 1 or mu.shape[1] < 1:
        raise InputError(f"{where}: means must be [K, d] with K, d >= 1, got shape {tuple(mu.shape)}")
    K, d = mu.shape
    c = _as_array(cov, "cov", where)
    if c.ndim == 0 or (c.ndim == 1 and c.shape[0] == K):
        c = np.broadcast_to(c, (K,)).copy()
        if np.any(c <= 0):
            raise InputError(f"{where}: cov (isotropic variances) must be > 0")
        kind = "iso"
    elif c.ndim == 2 and c.shape == (d, d):
        if not np.allclose(c, c.T, rtol=1e-10, atol=1e-12 * max(1.0, float(np.abs(c).max()))):
            raise InputError(f"{where}: cov must be symmetric")
        c = 0.5 * (c + c.T)
        if np.linalg.eigvalsh(c).min() <= 0:
            raise InputError(f"{where}: cov must be positive definite")
        kind = "full"
    else:
        raise InputError(f"{where}: cov must be a scalar, [K={K}] or [d={d}, d={d}], got shape {tuple(c.shape)}")
    if weights is None:
        w = np.full(K, 1.0 / K)
    else:
        w = _as_array(weights, "weights", where).reshape(-1)
        if w.shape[0] != K or np.any(w < 0) or w.sum() <= 0:
            raise InputError(f"{where}: weights must be [K={K}] non-negative with a positive sum")
        w = w / w.sum()
    return GaussianMixture(mu, c, w, kind)


def _logsumexp(a: np.ndarray, axis=None) -> np.ndarray:
    amax = np.max(a, axis=axis, keepdims=True)
    amax = np.where(np.isfinite(amax), amax, 0.0)
    with np.errstate(divide="ignore"):
        out = np.log(np.sum(np.exp(a - amax), axis=axis, keepdims=True)) + amax
    return np.squeeze(out, axis=axis) if axis is not None else out.reshape(())


def _row_chunks(n_rows: int, per_row: int):
    step = max(1, _CHUNK_ELEMS // max(1, per_row))
    for start in range(0, n_rows, step):
        yield slice(start, min(n_rows, start + step))


def _pair_log_kernel(p: GaussianMixture, q: GaussianMixture) -> np.ndarray:
    """[Kp, Kq] log N(a_i; b_j, Sigma^p_i + Sigma^q_j), without the weights. Differences are formed directly."""
    if p.d != q.d:
        raise InputError(f"gaussian_mixture_inner: dimensions differ ({p.d} vs {q.d})")
    d = p.d
    a, b = p.means, q.means
    out = np.empty((p.K, q.K), dtype=np.float64)
    if p.kind == "iso" and q.kind == "iso":
        v = p.cov[:, None] + q.cov[None, :]  # [Kp, Kq] pair variances
        if np.any(v <= 0):
            raise InputError("gaussian_mixture_inner: a pair of components has zero total variance")
        for sl in _row_chunks(p.K, q.K * d):
            diff = a[sl, None, :] - b[None, :, :]
            sq = np.einsum("ijk,ijk->ij", diff, diff)
            out[sl] = -0.5 * sq / v[sl] - 0.5 * d * (_LOG_2PI + np.log(v[sl]))
        return out
    if p.kind == "full" and q.kind == "full":
        lam, U = np.linalg.eigh(p.cov + q.cov)
        extra_p = np.zeros(p.K)
        extra_q = np.zeros(q.K)
    elif p.kind == "full":
        lam, U = np.linalg.eigh(p.cov)
        extra_p, extra_q = np.zeros(p.K), q.cov
    else:
        lam, U = np.linalg.eigh(q.cov)
        extra_p, extra_q = p.cov, np.zeros(q.K)
    # pair covariance U diag(lam + extra_p[i] + extra_q[j]) U^T: one eigendecomposition for all pairs
    for sl in _row_chunks(p.K, q.K * d):
        diff = (a[sl, None, :] - b[None, :, :]) @ U  # [k, Kq, d] coordinates in the eigenbasis
        ev = lam[None, None, :] + extra_p[sl, None, None] + extra_q[None, :, None]  # [k, Kq, d]
        if np.any(ev <= 0):
            raise InputError("gaussian_mixture_inner: a pair covariance is not positive definite")
        quad = np.sum(diff * diff / ev, axis=2)
        logdet = np.sum(np.log(ev), axis=2)
        out[sl] = -0.5 * quad - 0.5 * logdet - 0.5 * d * _LOG_2PI
    return out


def gaussian_mixture_log_inner(p: GaussianMixture, q: GaussianMixture) -> float:
    """log <p, q> = log int p q = log sum_ij w_i w_j N(a_i; b_j, A_i + B_j) (float64, log-sum-exp over pairs)."""
    logk = _pair_log_kernel(p, q)
    with np.errstate(divide="ignore"):
        logk = logk + np.log(p.weights)[:, None] + np.log(q.weights)[None, :]
    return float(_logsumexp(logk.reshape(-1), axis=0))


def gaussian_mixture_inner(p: GaussianMixture, q: GaussianMixture) -> float:
    """<p, q> = int p q (may underflow to 0 in high d; use :func:`gaussian_mixture_log_inner` there)."""
    return math.exp(gaussian_mixture_log_inner(p, q))


def _signed_sum(logs: Sequence[float], coefs: Sequence[float]) -> tuple[float, float]:
    """(log |S|, sign S) for S = sum_k coefs[k] exp(logs[k]), scaled by the largest term.

    S is reported as 0 (log -inf) when it is below the rounding noise of the sum, 8 eps sum_k |coefs[k] exp(logs[k])|.
    """
    logs = np.asarray(logs, dtype=np.float64)
    coefs = np.asarray(coefs, dtype=np.float64)
    finite = np.isfinite(logs) & (coefs != 0)
    if not np.any(finite):
        return -math.inf, 0.0
    r = float(np.max(logs[finite]))
    terms = coefs[finite] * np.exp(logs[finite] - r)
    total = float(np.sum(terms))
    if abs(total) <= 8.0 * np.finfo(np.float64).eps * float(np.sum(np.abs(terms))):
        return -math.inf, 0.0
    return math.log(abs(total)) + r, math.copysign(1.0, total)


def _log_diff(l1: float, l2: float) -> tuple[float, float]:
    """(log |e^l1 - e^l2|, sign) with expm1 so that nearly equal terms keep their relative precision."""
    if l1 == l2:
        return -math.inf, 0.0
    hi, lo, sign = (l1, l2, 1.0) if l1 > l2 else (l2, l1, -1.0)
    if not math.isfinite(hi):
        return hi, sign
    return hi + math.log(-math.expm1(lo - hi)), sign


def _log_distance_from_inners(lpp: float, lpq: float, lqq: float) -> float:
    """log D(p, q) from the log inner products; -inf when D is within rounding of 0 (p == q)."""
    log_abs, sign = _signed_sum([lpp, lpq, lqq], [1.0, -2.0, 1.0])
    return log_abs if sign > 0 else -math.inf


def log_l2_distance(p: GaussianMixture, q: GaussianMixture) -> float:
    """log D(p, q), D the squared L2 distance int (p - q)^2; -inf when p == q (up to rounding)."""
    return _log_distance_from_inners(
        gaussian_mixture_log_inner(p, p), gaussian_mixture_log_inner(p, q), gaussian_mixture_log_inner(q, q)
    )


def l2_distance(p: GaussianMixture, q: GaussianMixture) -> float:
    """D(p, q) = int (p - q)^2 = <p, p> - 2 <p, q> + <q, q> in closed form (float64, >= 0)."""
    return math.exp(log_l2_distance(p, q))


# ----------------------------------------------------------------------------------------------------------------------
# Halder's relative distance


class _LowRankGaussian:
    """N(mu, V diag(lam) V^T + e I) with V [d, r] orthonormal and lam [r] > 0: the covariance has rank r <= d.

    Quadratic forms and log-determinants with an isotropic ``extra`` variance e cost O(r d); with e = 0 and r < d the
    Gaussian is degenerate (no density): its log-determinant is -inf and its KL to any Gaussian with a density is +inf.
    """

    def __init__(self, mu: np.ndarray, V: np.ndarray, lam: np.ndarray):
        self.mu = mu
        self.d = int(mu.shape[0])
        self.V = V  # [d, r]
        self.lam = lam  # [r]

    @property
    def rank(self) -> int:
        return int(len(self.lam))

    @property
    def singular(self) -> bool:
        return self.rank < self.d

    def logdet(self, extra: float) -> float:
        r = len(self.lam)
        if extra == 0.0:
            return -math.inf if r < self.d else float(np.sum(np.log(self.lam)))
        return float(np.sum(np.log(self.lam + extra))) + (self.d - r) * math.log(extra)

    def log_pdf(self, x: np.ndarray, extra: float) -> np.ndarray:
        """log N(x; mu, C + extra I) for x [M, d] (extra > 0)."""
        diff = x - self.mu
        z = diff @ self.V  # [M, r]
        rest = diff - z @ self.V.T  # component outside the span of C
        quad = np.sum(z * z / (self.lam + extra), axis=1) + np.sum(rest * rest, axis=1) / extra
        return -0.5 * quad - 0.5 * self.logdet(extra) - 0.5 * self.d * _LOG_2PI

    def kl_to_truth(self, h2: float, m: float, s: float) -> float:
        """KL(N(mu, C + h2 I) || N(m 1, s^2 I)) from the spectrum (docs/science.md 6.1); +inf when h2 = 0 and C is
        singular (the generated distribution has no density with respect to the truth's)."""
        d, s2 = self.d, s * s
        logdet = self.logdet(h2)
        if logdet == -math.inf:
            return math.inf
        diff = self.mu - m
        tr = float(np.sum(self.lam)) + d * h2
        return 0.5 * (tr / s2 + float(diff @ diff) / s2 - d + d * math.log(s2) - logdet)


class _FittedGaussian(_LowRankGaussian):
    """N(mu_hat, C_hat + e I) for the sample mean / unbiased covariance of y, from one thin SVD of the centred data.

    C_hat = V diag(lam) V^T with V [d, r], r = min(N, d): the other d - r eigenvalues are 0, so every quadratic form
    and log-determinant with an isotropic ``extra`` variance e > 0 costs O(r d) and no d x d matrix is formed.
    """

    def __init__(self, y: np.ndarray):
        N, _ = y.shape
        mu = y.mean(axis=0)
        _, sv, vt = np.linalg.svd(y - mu, full_matrices=False)
        super().__init__(mu, vt.T, sv * sv / (N - 1))


# ----------------------------------------------------------------------------------------------------------------------
# Halder's analytically tractable model: a linear, one-step denoiser fitted by least squares


@dataclass(frozen=True)
class LinearDenoiserFit:
    """Halder's linear one-step denoiser y ~ beta0 + beta1 x_T and the Gaussian N(mu, C) it generates.

    Forward (Ornstein-Uhlenbeck to time T): x_T = e^{-T} y + sqrt(l (1 - e^{-2T})) z, one z ~ N(0, I) per training
    point. beta0 [d], beta1 [d, d] by ordinary least squares with an intercept (the minimum-norm solution when the
    problem is rank deficient, N <= d: what scikit-learn's LinearRegression returns). Generated distribution: inputs
    x_T ~ N(e^{-T} ybar, v I), v = e^{-2T} var(y) + l (1 - e^{-2T}) (var(y) the unbiased per-coordinate variance of the
    training set averaged over coordinates, as the reference code computes it), so

        mu = beta0 + beta1 e^{-T} ybar,   C = v beta1 beta1^T = V diag(lam) V^T (the rank-r nonzero spectrum).

    C has rank <= N - 1 (the intercept costs one), so it is singular, N(mu, C) has no density and its KL to the truth
    is +inf, whenever N <= d.
    """

    beta0: np.ndarray  # [d]
    beta1: np.ndarray  # [d, d]
    mu: np.ndarray  # [d]
    V: np.ndarray  # [d, r]
    lam: np.ndarray  # [r]
    T: float
    l: float  # noqa: E741
    input_var: float  # v
    x_T: np.ndarray  # [N, d] the forward samples the fit used

    @property
    def d(self) -> int:
        return int(self.mu.shape[0])

    @property
    def rank(self) -> int:
        return int(len(self.lam))

    @property
    def singular(self) -> bool:
        return self.rank < self.d

    @property
    def C(self) -> np.ndarray:
        """The generated covariance [d, d] (PSD; singular when rank < d)."""
        return (self.V * self.lam) @ self.V.T

    def gaussian(self) -> _LowRankGaussian:
        return _LowRankGaussian(self.mu, self.V, self.lam)


def linear_denoiser_fit(
    train: Any,
    *,
    T: float = 2.0,
    l: Optional[float] = None,  # noqa: E741
    seed: int = 0,
    noise: Any = None,
) -> LinearDenoiserFit:
    """Fit Halder's linear one-step denoiser on ``train`` [N, d] (:class:`LinearDenoiserFit` for the definitions).

    Args:
        train: [N, d] training points, N >= 2.
        T: the forward time (Halder's code: 2).
        l: the generalization parameter; default e^{-2T} (Halder's code).
        seed: seeds the forward noise z (ignored when ``noise`` is given).
        noise: the forward noise z [N, d] itself (for tests).
    """
    where = "linear_denoiser_fit"
    y = _train_array(train, where)
    N, d = y.shape
    T = _positive(T, "T", where)
    l = math.exp(-2.0 * T) if l is None else _positive(l, "l", where)  # noqa: E741
    if noise is None:
        z = np.random.default_rng(_int_at_least(seed, 0, "seed", where)).standard_normal((N, d))
    else:
        z = _as_array(noise, "noise", where)
        if z.shape != (N, d):
            raise InputError(f"{where}: noise must be [N, d] = [{N}, {d}], got shape {tuple(z.shape)}")
    a = math.exp(-T)
    x = a * y + math.sqrt(l * (1.0 - a * a)) * z
    xbar, ybar = x.mean(axis=0), y.mean(axis=0)
    # OLS with intercept = least squares on centred data (minimum-norm solution where rank deficient)
    B, *_ = np.linalg.lstsq(x - xbar, y - ybar, rcond=None)  # (x - xbar) B ~ (y - ybar), B [d, d]
    beta1 = B.T
    beta0 = ybar - beta1 @ xbar
    var_y = float(np.mean(np.var(y, axis=0, ddof=1)))
    v = a * a * var_y + l * (1.0 - a * a)
    mu = beta0 + beta1 @ (a * ybar)
    U, S, _ = np.linalg.svd(beta1)
    tol = (S[0] if len(S) else 0.0) * max(N, d) * np.finfo(np.float64).eps
    keep = S > tol
    return LinearDenoiserFit(
        beta0=beta0, beta1=beta1, mu=mu, V=U[:, keep], lam=v * S[keep] ** 2, T=T, l=l, input_var=v, x_T=x
    )


def linear_kl(fit: LinearDenoiserFit, m: float = 0.0, s: float = 1.0) -> dict:
    """KL(N(mu, C) || N(m 1, s^2 I)) of Halder's linear generator, with the reason when it is not finite.

    Returns {"kl": float (math.inf when C is singular), "finite": bool, "rank": r, "d": d, "reason": str or None}.
    """
    where = "linear_kl"
    m = _finite(m, "m", where)
    s = _positive(s, "s", where)
    kl = fit.gaussian().kl_to_truth(0.0, m, s)
    reason = None
    if not math.isfinite(kl):
        reason = (
            f"C is singular (rank {fit.rank} < d = {fit.d}; least squares from N points has rank <= N - 1): "
            "N(mu, C) has no density, KL = +inf"
        )
    return {"kl": kl, "finite": math.isfinite(kl), "rank": fit.rank, "d": fit.d, "reason": reason}


def relative_distance(
    train: Any,
    *,
    m: float = 0.0,
    s: float = 1.0,
    generator: str = "gaussian",
    h: Optional[float] = None,
    h_gen: Optional[float] = None,
    T: float = 2.0,
    l: Optional[float] = None,  # noqa: E741
    seed: int = 0,
    _fit: Optional[LinearDenoiserFit] = None,
) -> dict:
    """E_TG, E_OG and Delta = E_TG - E_OG for one training set (module docstring for the definitions).

    Args:
        train: [N, d] training points (N >= 2).
        m, s: the true distribution rho_O = N(m 1, s^2 I), s > 0.
        generator: "gaussian" (rho_gen = N(mu_hat, C_hat + h^2 I)), "kde" (rho_gen = KDE of train with h_gen) or
            "linear" (rho_gen = N(mu, C) of Halder's least-squares linear one-step denoiser,
            :func:`linear_denoiser_fit`).
        h: KDE bandwidth of rho_T; default :func:`silverman_bandwidth` (N, d, s) for "gaussian" and "kde",
            :func:`halder_bandwidth` (N, d, s) = s N^(-1/d) for "linear" (the reference code's epsilon).
        h_gen: bandwidth of the "kde" generator; default h (then rho_gen = rho_T). Ignored otherwise.
        T, l, seed: the "linear" generator's forward time, generalization parameter (default e^{-2T}) and the seed
            of its forward noise. Ignored otherwise.
    Returns:
        dict with float64 ``E_TG``, ``E_OG``, ``Delta`` (linear; may underflow to 0 for large d), their log-scale
        versions ``log_E_TG``, ``log_E_OG``, ``log_abs_Delta`` and ``sign_Delta``, the scale-free
        ``Delta_rel`` = Delta / <rho_O, rho_O> (also ``E_TG_rel``, ``E_OG_rel``), the log inner products
        ``log_inner`` {TT, OO, GT, GO, GG, TO}, and the settings (N, d, m, s, h, h_gen, generator). For "linear"
        also ``rank`` (of C), ``kl`` (+inf when C is singular) and ``kl_reason``; when C is singular N(mu, C) is not
        square integrable: ``E_TG`` and ``E_OG`` are +inf (``GG`` = +inf) while Delta, in which <g, g> cancels, is
        finite.
    """
    where = "relative_distance"
    y = _train_array(train, where)
    N, d = y.shape
    m = _finite(m, "m", where)
    s = _positive(s, "s", where)
    generator = _generator(generator, where)
    if h is None:
        h = halder_bandwidth(N, d, s) if generator == "linear" else silverman_bandwidth(N, d, s)
    else:
        h = _positive(h, "h", where)
    if generator == "kde":
        h_gen = h if h_gen is None else _positive(h_gen, "h_gen", where)
    else:
        h_gen = None

    rho_T = GaussianMixture(y, np.full(N, h * h), np.full(N, 1.0 / N), "iso")
    rho_O = GaussianMixture(np.full((1, d), m), np.array([s * s]), np.ones(1), "iso")
    if generator == "kde":
        rho_G = GaussianMixture(y, np.full(N, h_gen * h_gen), np.full(N, 1.0 / N), "iso")
    lTT = gaussian_mixture_log_inner(rho_T, rho_T)
    lOO = -0.5 * d * math.log(4.0 * math.pi * s * s)  # N(0; 0, 2 s^2 I)
    lTO = gaussian_mixture_log_inner(rho_T, rho_O)
    if generator == "kde":
        lGT = gaussian_mixture_log_inner(rho_G, rho_T)
        lGO = gaussian_mixture_log_inner(rho_G, rho_O)
        lGG = gaussian_mixture_log_inner(rho_G, rho_G)
    elif generator == "linear":
        # g = N(mu, C), C = V diag(lam) V^T of rank r: <g, T> = mean_i N(y_i; mu, C + h^2 I),
        # <g, O> = N(m 1; mu, C + s^2 I), <g, g> = N(0; 0, 2 C) (+inf when C is singular)
        fit = _fit if _fit is not None else linear_denoiser_fit(y, T=T, l=l, seed=seed)
        g = fit.gaussian()
        lGT = float(_logsumexp(g.log_pdf(y, h * h), axis=0)) - math.log(N)
        lGO = float(g.log_pdf(np.full((1, d), m), s * s)[0])
        lGG = math.inf if g.singular else -0.5 * d * _LOG_2PI - 0.5 * (d * math.log(2.0) + g.logdet(0.0))
    else:
        # g = N(mu_hat, C), C = C_hat + h^2 I, from one thin SVD of the centred data:
        # <g, T> = mean_i N(y_i; mu_hat, C_hat + 2 h^2 I), <g, O> = N(m 1; mu_hat, C_hat + (h^2 + s^2) I),
        # <g, g> = N(0; 0, 2 C) = (2 pi)^(-d/2) det(2 C_hat + 2 h^2 I)^(-1/2)
        fit = _FittedGaussian(y)
        lGT = float(_logsumexp(fit.log_pdf(y, 2.0 * h * h), axis=0)) - math.log(N)
        lGO = float(fit.log_pdf(np.full((1, d), m), h * h + s * s)[0])
        lGG = -0.5 * d * _LOG_2PI - 0.5 * (d * math.log(2.0) + fit.logdet(h * h))

    same = generator == "kde" and h_gen == h  # rho_gen == rho_T exactly
    if lGG == math.inf:  # a degenerate generated Gaussian: int g^2 = +inf
        log_E_TG = log_E_OG = math.inf
    else:
        log_E_TG = -math.inf if same else _log_distance_from_inners(lGG, lGT, lTT)
        log_E_OG = _log_distance_from_inners(lGG, lGO, lOO)
    # Delta = (<T,T> - <O,O>) + 2 (<g,O> - <g,T>): <g,g> cancels exactly
    la, sa = _log_diff(lTT, lOO)
    lb, sb = _log_diff(lGO, lGT)
    log_abs_delta, sign_delta = _signed_sum([la, lb], [sa, 2.0 * sb])
    if same:  # Delta = -E_OG exactly
        log_abs_delta, sign_delta = log_E_OG, (-1.0 if math.isfinite(log_E_OG) else 0.0)

    def _lin(logv: float, sign: float = 1.0) -> float:
        if logv == math.inf:
            return sign * math.inf
        return sign * math.exp(logv) if math.isfinite(logv) else 0.0

    out = {
        "generator": generator,
        "N": int(N),
        "d": int(d),
        "m": m,
        "s": s,
        "h": float(h),
        "h_gen": None if h_gen is None else float(h_gen),
        "E_TG": _lin(log_E_TG),
        "E_OG": _lin(log_E_OG),
        "Delta": _lin(log_abs_delta, sign_delta),
        "log_E_TG": log_E_TG,
        "log_E_OG": log_E_OG,
        "log_abs_Delta": log_abs_delta,
        "sign_Delta": sign_delta,
        "E_TG_rel": _lin(log_E_TG - lOO),
        "E_OG_rel": _lin(log_E_OG - lOO),
        "Delta_rel": _lin(log_abs_delta - lOO, sign_delta),
        "log_inner": {"TT": lTT, "OO": lOO, "TO": lTO, "GT": lGT, "GO": lGO, "GG": lGG},
    }
    if generator == "linear":
        klr = linear_kl(fit, m, s)
        out.update({"T": fit.T, "l": fit.l, "rank": fit.rank, "kl": klr["kl"], "kl_reason": klr["reason"]})
    return out


# ----------------------------------------------------------------------------------------------------------------------
# KL between the fitted Gaussian and the truth


def _mu_cov(mu: Any, C: Any, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mu = _as_array(mu, "mu", where).reshape(-1)
    C = _as_array(C, "C", where)
    d = mu.shape[0]
    if d < 1:
        raise InputError(f"{where}: mu must be a non-empty vector [d]")
    if C.shape != (d, d):
        raise InputError(f"{where}: C must be [d, d] = [{d}, {d}], got shape {tuple(C.shape)}")
    if not np.allclose(C, C.T, rtol=1e-10, atol=1e-12 * max(1.0, float(np.abs(C).max()))):
        raise InputError(f"{where}: C must be symmetric")
    C = 0.5 * (C + C.T)
    try:
        L = np.linalg.cholesky(C)
    except np.linalg.LinAlgError:
        raise InputError(f"{where}: C must be positive definite") from None
    return mu, C, L


def gaussian_kl(mu: Any, C: Any, m: float, s: float) -> float:
    """KL(N(mu, C) || N(m 1, s^2 I)) = 1/2 [tr(C)/s^2 + ||mu - m 1||^2/s^2 - d + d ln s^2 - ln det C] (float64)."""
    where = "gaussian_kl"
    mu, C, L = _mu_cov(mu, C, where)
    m = _finite(m, "m", where)
    s = _positive(s, "s", where)
    d = mu.shape[0]
    s2 = s * s
    logdet = 2.0 * float(np.sum(np.log(np.diag(L))))
    diff = mu - m
    kl = 0.5 * (float(np.trace(C)) / s2 + float(diff @ diff) / s2 - d + d * math.log(s2) - logdet)
    return max(kl, 0.0) if kl > -1e-12 * d else kl


def gaussian_kl_mc(mu: Any, C: Any, m: float, s: float, *, n: int = 100_000, seed: int = 0) -> dict:
    """Monte Carlo estimate of KL(N(mu, C) || N(m 1, s^2 I)) = E_{x ~ N(mu, C)} [log p(x) - log q(x)].

    Returns {"kl": the sample mean, "stderr": its standard error (sample std / sqrt(n)), "n": n}.
    """
    where = "gaussian_kl_mc"
    mu, C, L = _mu_cov(mu, C, where)
    m = _finite(m, "m", where)
    s = _positive(s, "s", where)
    n = _int_at_least(n, 2, "n", where)
    d = mu.shape[0]
    rng = np.random.default_rng(seed)
    logdet = 2.0 * float(np.sum(np.log(np.diag(L))))
    vals = np.empty(n)
    for sl in _row_chunks(n, 2 * d):
        z = rng.standard_normal((sl.stop - sl.start, d))
        x = mu + z @ L.T
        logp = -0.5 * np.sum(z * z, axis=1) - 0.5 * logdet - 0.5 * d * _LOG_2PI
        logq = -0.5 * np.sum((x - m) ** 2, axis=1) / (s * s) - 0.5 * d * (_LOG_2PI + math.log(s * s))
        vals[sl] = logp - logq
    return {"kl": float(vals.mean()), "stderr": float(vals.std(ddof=1) / math.sqrt(n)), "n": n}


# ----------------------------------------------------------------------------------------------------------------------
# Sweeps over N


def _sweep_args(d: Any, Ns: Any, redraws: Any, where: str) -> tuple[int, list[int], int]:
    d = _int_at_least(d, 1, "d", where)
    if isinstance(Ns, (int, np.integer)):
        Ns = [Ns]
    try:
        Ns = list(Ns)
    except TypeError:
        raise InputError(f"{where}: Ns must be a sequence of integers >= 2, got {Ns!r}") from None
    if not Ns:
        raise InputError(f"{where}: Ns must be a non-empty sequence of integers >= 2")
    Ns = [_int_at_least(N, 2, "Ns (each N)", where) for N in Ns]
    redraws = _int_at_least(redraws, 1, "redraws", where)
    return d, Ns, redraws


def delta_sweep(
    d: int,
    Ns: Sequence[int],
    *,
    m: float = 0.0,
    s: float = 1.0,
    redraws: int = 20,
    generator: str = "gaussian",
    h: Optional[float] = None,
    h_gen: Optional[float] = None,
    seed: int = 0,
    T: float = 2.0,
    l: Optional[float] = None,  # noqa: E741
) -> dict:
    """Delta = E_TG - E_OG over ``redraws`` training sets of each size N drawn from N(m 1, s^2 I_d).

    The bandwidth is h for every N when given, else :func:`silverman_bandwidth` (N, d, s) per N for the "gaussian"
    and "kde" generators and :func:`halder_bandwidth` (N, d, s) = s N^(-1/d) for "linear". The training sets for size
    N (and the "linear" generator's forward noise, drawn after each set) come from ``np.random.default_rng([seed, N])``
    (reproducible, independent across N).

    Returns a dict with the settings and, per N (lists aligned with ``Ns``): ``h``, ``delta`` (the per-redraw
    Delta values), ``delta_rel`` (per redraw, Delta / <rho_O, rho_O>), ``delta_mean``, ``delta_std``,
    ``delta_rel_mean``, ``delta_rel_std``, ``delta_rel_q10`` / ``_median`` / ``_q90``, ``p_positive``
    (fraction of redraws with Delta > 0) and its binomial ``p_positive_stderr``, ``E_TG_rel_mean``,
    ``E_OG_rel_mean``, and ``kl_mean`` / ``kl_std``: KL(N(mu_hat, C_hat + h^2 I) || N(m 1, s^2 I)) over redraws
    (the fitted Gaussian generator, for the "gaussian" and "kde" generators) or, for "linear", the KL of the linear
    denoiser's N(mu, C): +inf (null in JSON) when C is singular in any redraw, with ``kl_finite_fraction``,
    ``kl_reason`` (why it is infinite, else None) and ``rank_mean`` (mean rank of C) per N.
    """
    where = "delta_sweep"
    d, Ns, redraws = _sweep_args(d, Ns, redraws, where)
    m = _finite(m, "m", where)
    s = _positive(s, "s", where)
    generator = _generator(generator, where)
    if h is not None:
        h = _positive(h, "h", where)
    if h_gen is not None:
        h_gen = _positive(h_gen, "h_gen", where)
    seed = _int_at_least(seed, 0, "seed", where)
    T = _positive(T, "T", where)
    if l is not None:
        l = _positive(l, "l", where)  # noqa: E741
    linear = generator == "linear"

    keys = (
        "h delta delta_rel delta_mean delta_std delta_rel_mean delta_rel_std delta_rel_q10 delta_rel_median "
        "delta_rel_q90 p_positive p_positive_stderr E_TG_rel_mean E_OG_rel_mean kl_mean kl_std"
    ).split()
    if linear:
        keys += ["kl_finite_fraction", "kl_reason", "rank_mean"]
    out: dict[str, Any] = {k: [] for k in keys}
    for N in Ns:
        if h is not None:
            hN = h
        else:
            hN = halder_bandwidth(N, d, s) if linear else silverman_bandwidth(N, d, s)
        rng = np.random.default_rng([seed, N])
        deltas, rels, signs, etg, eog, kls, ranks, reasons = [], [], [], [], [], [], [], []
        for _ in range(redraws):
            y = m + s * rng.standard_normal((N, d))
            fit = linear_denoiser_fit(y, T=T, l=l, noise=rng.standard_normal((N, d))) if linear else None
            r = relative_distance(y, m=m, s=s, generator=generator, h=hN, h_gen=h_gen, _fit=fit)
            deltas.append(r["Delta"])
            rels.append(r["Delta_rel"])
            signs.append(r["sign_Delta"])
            etg.append(r["E_TG_rel"])
            eog.append(r["E_OG_rel"])
            if linear:
                kls.append(r["kl"])
                ranks.append(r["rank"])
                reasons.append(r["kl_reason"])
            else:
                kls.append(_FittedGaussian(y).kl_to_truth(hN * hN, m, s))
        deltas_a, rels_a, kls_a = np.array(deltas), np.array(rels), np.array(kls)
        p = float(np.mean(np.array(signs) > 0))
        out["h"].append(float(hN))
        out["delta"].append(deltas_a.tolist())
        out["delta_rel"].append(rels_a.tolist())
        out["delta_mean"].append(float(deltas_a.mean()))
        out["delta_std"].append(float(deltas_a.std(ddof=1)) if redraws > 1 else 0.0)
        out["delta_rel_mean"].append(float(rels_a.mean()))
        out["delta_rel_std"].append(float(rels_a.std(ddof=1)) if redraws > 1 else 0.0)
        q10, q50, q90 = np.quantile(rels_a, [0.1, 0.5, 0.9])
        out["delta_rel_q10"].append(float(q10))
        out["delta_rel_median"].append(float(q50))
        out["delta_rel_q90"].append(float(q90))
        out["p_positive"].append(p)
        out["p_positive_stderr"].append(math.sqrt(p * (1.0 - p) / redraws))
        out["E_TG_rel_mean"].append(float(np.mean(etg)))
        out["E_OG_rel_mean"].append(float(np.mean(eog)))
        out["kl_mean"].append(float(kls_a.mean()))
        finite_kl = bool(np.all(np.isfinite(kls_a)))
        out["kl_std"].append((float(kls_a.std(ddof=1)) if redraws > 1 else 0.0) if finite_kl else math.nan)
        if linear:
            out["kl_finite_fraction"].append(float(np.mean(np.isfinite(kls_a))))
            out["kl_reason"].append(next((x for x in reasons if x), None))
            out["rank_mean"].append(float(np.mean(ranks)))

    transition = next((N for N, p in zip(Ns, out["p_positive"]) if p >= 0.5), None)
    settings = {
        "d": d,
        "Ns": Ns,
        "m": m,
        "s": s,
        "redraws": redraws,
        "generator": generator,
        "h": h,
        "h_rule": (
            "given"
            if h is not None
            else (
                "halder: s * N^(-1/d)" if linear else "silverman: s * (4/(d+2))^(1/(d+4)) * N^(-1/(d+4))"
            )
        ),
        "h_gen": h_gen if generator == "kde" else None,
        "h_gen_rule": (None if generator != "kde" else ("given" if h_gen is not None else "h_gen = h")),
        "seed": seed,
        "gaussian_generator": "N(mu_hat, C_hat + h^2 I), C_hat unbiased (ddof = 1)",
        "delta_rel": "Delta / <rho_O, rho_O> = Delta * (4 pi s^2)^(d/2)",
        "kl": (
            "KL(N(mu, C) || N(m 1, s^2 I)) of the linear denoiser's Gaussian, mean over redraws; "
            "+inf (JSON null) where C is singular"
            if linear
            else "KL(N(mu_hat, C_hat + h^2 I) || N(m 1, s^2 I)), mean over redraws"
        ),
    }
    if linear:
        settings.update(
            {
                "T": T,
                "l": math.exp(-2.0 * T) if l is None else l,
                "linear_generator": (
                    "x_T = e^{-T} y + sqrt(l (1 - e^{-2T})) z; y ~ beta0 + beta1 x_T by least squares with intercept "
                    "(minimum norm where rank deficient); N(mu, C), mu = beta0 + beta1 e^{-T} ybar, "
                    "C = (e^{-2T} var(y) + l (1 - e^{-2T})) beta1 beta1^T"
                ),
            }
        )
    return {"settings": settings, "Ns": Ns, **out, "transition_N": transition}


PathLike = Union[str, os.PathLike]


def _plot(result: dict, path: PathLike) -> Path:
    from diffgen_fast.figures import _new_figure, _save_figure

    Ns = np.asarray(result["Ns"], dtype=np.float64)
    st = result["settings"]
    fig = _new_figure(15.0, 4.2)
    ax1, ax2, ax3 = fig.subplots(1, 3)

    mean = np.asarray(result["delta_rel_mean"])
    std = np.asarray(result["delta_rel_std"])
    ax1.fill_between(Ns, result["delta_rel_q10"], result["delta_rel_q90"], alpha=0.25, color="C0", label="10-90%")
    ax1.errorbar(Ns, mean, yerr=std, fmt="o-", color="C0", ms=4, capsize=2, label="mean +- std")
    ax1.plot(Ns, result["delta_rel_median"], "--", color="C1", lw=1, label="median")
    ax1.axhline(0.0, color="k", lw=0.8)
    ax1.set_xscale("log")
    ax1.set_yscale("symlog", linthresh=max(1e-6, float(np.nanmin(np.abs(mean[mean != 0])) if np.any(mean) else 1.0)))
    ax1.set_xlabel("N (training set size)")
    ax1.set_ylabel("Delta / ||rho_O||^2")
    ax1.set_title("relative distance Delta = E_TG - E_OG")
    ax1.legend(fontsize=8)

    p = np.asarray(result["p_positive"])
    pe = np.asarray(result["p_positive_stderr"])
    ax2.errorbar(Ns, p, yerr=pe, fmt="o-", color="C2", ms=4, capsize=2)
    ax2.axvline(st["d"], color="gray", ls=":", lw=1, label=f"N = d = {st['d']}")
    ax2.set_xscale("log")
    ax2.set_ylim(-0.05, 1.05)
    ax2.set_xlabel("N")
    ax2.set_ylabel("P(Delta > 0)")
    ax2.set_title(f"generalization probability ({st['redraws']} redraws)")
    ax2.legend(fontsize=8)

    _plot_kl(ax3, Ns, np.asarray(result["kl_mean"], dtype=np.float64), "C3", yerr=result["kl_std"])
    ax3.axvline(st["d"], color="gray", ls=":", lw=1)
    ax3.set_xscale("log")
    ax3.set_xlabel("N")
    if st["generator"] == "linear":
        ax3.set_ylabel("KL(N(mu, C) || truth)")
        ax3.set_title("KL of the linear denoiser's Gaussian")
    else:
        ax3.set_ylabel("KL(fitted Gaussian || truth)")
        ax3.set_title("KL of N(mu_hat, C_hat + h^2 I)")

    fig.suptitle(f"Halder 2024: d = {st['d']}, generator = {st['generator']}, m = {st['m']}, s = {st['s']}")
    fig.tight_layout()
    return _save_figure(fig, path)


def _plot_kl(ax, x: np.ndarray, kl: np.ndarray, color: str, *, yerr=None, label=None) -> None:
    """KL against x on a log y axis; +inf values (singular C) are drawn as open triangles on the top edge."""
    fin = np.isfinite(kl)
    if np.any(fin):
        err = None if yerr is None else np.nan_to_num(np.asarray(yerr, dtype=np.float64)[fin])
        ax.errorbar(x[fin], kl[fin], yerr=err, fmt="o-", color=color, ms=4, capsize=2, label=label)
    ax.set_yscale("log")
    if np.any(~fin):
        top = float(np.max(kl[fin])) * 3.0 if np.any(fin) else 10.0
        ax.plot(x[~fin], np.full(int(np.sum(~fin)), top), "^", mfc="none", color=color, ms=6,
                label=None if label is None else f"{label}: KL = inf (C singular)")  # fmt: skip
        if label is None:
            ax.text(x[~fin][0], top * 1.25, "inf (C singular)", fontsize=7, va="bottom", color=color)


def analyze_kde(
    d: int,
    Ns: Sequence[int],
    *,
    redraws: int = 20,
    out_dir: Optional[PathLike] = None,
    m: float = 0.0,
    s: float = 1.0,
    generator: str = "gaussian",
    h: Optional[float] = None,
    h_gen: Optional[float] = None,
    seed: int = 0,
    T: float = 2.0,
    l: Optional[float] = None,  # noqa: E741
) -> dict:
    """Run :func:`delta_sweep` and, when ``out_dir`` is given, write ``kde_relative_distance.json`` (the sweep) and
    ``kde_relative_distance.png`` (mean Delta_rel with spread vs N, P(Delta > 0) vs N, KL vs N) atomically.

    Returns the sweep dict plus ``files`` (the paths written, empty without out_dir).
    """
    result = delta_sweep(
        d, Ns, m=m, s=s, redraws=redraws, generator=generator, h=h, h_gen=h_gen, seed=seed, T=T, l=l
    )
    files: list[str] = []
    if out_dir is not None:
        from diffgen_fast._atomic import write_json_atomic

        folder = Path(out_dir)
        folder.mkdir(parents=True, exist_ok=True)
        png = _plot(result, folder / "kde_relative_distance.png")
        js = write_json_atomic(result, folder / "kde_relative_distance.json")
        files = [str(js), str(png)]
    result["files"] = files
    return result


def scales_figure(results: Sequence[dict], path: PathLike) -> Path:
    """Halder's "alignment of scales" for several d: P(Delta > 0) and the KL to the truth against N / d (two panels).

    ``results``: :func:`delta_sweep` outputs (one per d, any generator). Infinite KL (singular C) is drawn as open
    triangles on the top edge.
    """
    from diffgen_fast.figures import _new_figure, _save_figure

    fig = _new_figure(11.0, 4.2)
    ax1, ax2 = fig.subplots(1, 2)
    for k, res in enumerate(results):
        st = res["settings"]
        x = np.asarray(res["Ns"], dtype=np.float64) / st["d"]
        c = f"C{k}"
        ax1.errorbar(x, res["p_positive"], yerr=res["p_positive_stderr"], fmt="o-", color=c, ms=4, capsize=2,
                     label=f"d = {st['d']}")  # fmt: skip
        _plot_kl(ax2, x, np.asarray(res["kl_mean"], dtype=np.float64), c, label=f"d = {st['d']}")
    for ax in (ax1, ax2):
        ax.axvline(1.0, color="gray", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel("N / d")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax1.set_ylim(-0.05, 1.05)
    ax1.set_ylabel("P(Delta > 0)")
    ax1.set_title(f"generalization probability ({results[0]['settings']['redraws']} redraws)")
    ax2.set_ylabel("KL(generated || truth)")
    ax2.set_title("KL to the truth (open triangles: inf)")
    gen = results[0]["settings"]["generator"]
    fig.suptitle(f"Halder 2024, generator = {gen}: P(Delta > 0) and KL against N / d")
    fig.tight_layout()
    return _save_figure(fig, path)


def analyze_kde_scales(
    ds: Sequence[int],
    Ns: Sequence[int],
    *,
    redraws: int = 20,
    out_dir: Optional[PathLike] = None,
    generator: str = "linear",
    seed: int = 0,
    **kw: Any,
) -> dict:
    """:func:`delta_sweep` for each d in ``ds`` (same Ns); with ``out_dir``, writes ``kde_scales.json``
    ({"ds", "runs": [sweep per d], "files"}) and ``kde_scales.png`` (:func:`scales_figure`) atomically."""
    ds = [_int_at_least(d, 1, "d", "analyze_kde_scales") for d in ds]
    if not ds:
        raise InputError("analyze_kde_scales: ds must name at least one dimension")
    runs = [delta_sweep(d, Ns, redraws=redraws, generator=generator, seed=seed, **kw) for d in ds]
    result: dict[str, Any] = {"ds": ds, "runs": runs, "files": []}
    if out_dir is not None:
        from diffgen_fast._atomic import write_json_atomic

        folder = Path(out_dir)
        folder.mkdir(parents=True, exist_ok=True)
        png = scales_figure(runs, folder / "kde_scales.png")
        js = write_json_atomic({"ds": ds, "runs": runs}, folder / "kde_scales.json")
        result["files"] = [str(js), str(png)]
    return result
