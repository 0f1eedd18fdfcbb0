"""softmax_denoise and kde_log_density: the public functions, dispatching to a backend."""

from __future__ import annotations

import math
from typing import Any, Union

import torch

from diffgen_fast.errors import InputError
from diffgen_fast.ops import dispatch
from diffgen_fast.ops._checks import check_precision, compiling, graph_assert, per_query
from diffgen_fast.ops._prepare import TensorChunks, back, prepare
from diffgen_fast.ops.softmax_denoise.autograd import differentiable_call, needs_grad
from diffgen_fast.ops.softmax_denoise.reference import DenoiseResult, softmax_denoise_diff64

SigmaLike = Union[float, torch.Tensor, Any]


def _check_train_grad(train) -> None:
    if isinstance(train, torch.Tensor) and train.requires_grad and torch.is_grad_enabled():
        raise InputError(
            "train: requires grad, but no gradient flows to the training set (the ops differentiate in x, sigma "
            "and alpha); pass train.detach()"
        )


def _rows_text(rows: torch.Tensor) -> str:
    r = rows.tolist()
    return ", ".join(map(str, r[:8])) + (f", ... ({len(r)} rows)" if len(r) > 8 else "")


def _guard(res: DenoiseResult, x2: torch.Tensor, ts, s: torch.Tensor, a: torch.Tensor, need_out: bool):
    """Rows a backend could not compute (a broken softmax state: no finite logit, NaN) are recomputed with every
    logit from float64 differences; rows whose float64 distances overflow too raise InputError."""

    def broken(r: DenoiseResult) -> torch.Tensor:
        ok = (r.top_weight > 0) & (r.top_weight <= 1) & ~torch.isnan(r.lse)
        if need_out and r.denoised is not None:
            ok &= torch.isfinite(r.denoised).all(dim=1)
        return ~ok

    bad = broken(res).nonzero().squeeze(1)
    if bad.numel() == 0:
        return res
    fix = softmax_denoise_diff64(x2[bad], ts, s[bad], a[bad], need_out=need_out)
    still = broken(fix)
    if bool(still.any()):
        raise InputError(
            f"x: the squared distances of rows {_rows_text(bad[still])} to every training point overflow float64 "
            f"(values too large); rescale the data"
        )
    out = None
    if need_out:
        out = res.denoised.clone()
        out[bad] = fix.denoised.to(out.dtype)
    parts = [t.clone() for t in (res.lse, res.top_weight, res.n_eff)]
    for t, f in zip(parts, (fix.lse, fix.top_weight, fix.n_eff)):
        t[bad] = f.to(t.dtype)
    return DenoiseResult(out, *parts)


def _check_f32(v: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """A float32 result never silently becomes +-inf: finite float64 values beyond float32's range raise."""
    if dtype != torch.float32:
        return
    over = torch.isfinite(v) & (v.abs() > torch.finfo(torch.float32).max)
    if compiling():
        graph_assert(~over.any(), f"x: the {what} of some rows exceeds float32's range; pass float64 inputs")
        return
    if bool(over.any()):
        raise InputError(
            f"x: the {what} of rows {_rows_text(over.nonzero().squeeze(1))} exceeds float32's range (float32 "
            f"inputs give float32 results); pass float64 inputs (float32 values convert exactly)"
        )


def _train_tensor(ts) -> torch.Tensor:
    """The training set as one [N, d] tensor (a view: nothing is read until the guard touches rows)."""
    if isinstance(ts, TensorChunks):
        return ts.tensor.reshape(len(ts), ts.d)
    return ts.flat()


def _guard_op_impl(x, y, s, a, den, lse, top_w, n_eff, need_out: bool):
    res = DenoiseResult(den if need_out else None, lse, top_w, n_eff)
    fixed = _guard(res, x, TensorChunks(y), s, a, need_out)
    out = fixed.denoised if need_out else den
    return tuple(t.clone() for t in (out, fixed.lse, fixed.top_weight, fixed.n_eff))


if hasattr(torch.library, "custom_op"):
    # _guard as one graph node: what torch.compile traces in place of the Python-level row selection
    _guard_op = torch.library.custom_op(
        "diffgen_fast::softmax_guard",
        _guard_op_impl,
        mutates_args=(),
        schema="(Tensor x, Tensor y, Tensor sigma, Tensor alpha, Tensor den, Tensor lse, Tensor top_weight, "
        "Tensor n_eff, bool need_out) -> (Tensor, Tensor, Tensor, Tensor)",
    )

    @_guard_op.register_fake
    def _(x, y, s, a, den, lse, top_w, n_eff, need_out):
        return torch.empty_like(den), torch.empty_like(lse), torch.empty_like(top_w), torch.empty_like(n_eff)

else:  # pragma: no cover - torch < 2.4
    _guard_op = _guard_op_impl


def _guarded(impl):
    """impl with _guard applied to its result (the same signature); under torch.compile, through the guard op."""

    def run(x, ts, s, a, *, precision, need_out=True):
        res = impl(x, ts, s, a, precision=precision, need_out=need_out)
        if not compiling():
            return _guard(res, x, ts, s, a, need_out)
        den = res.denoised if need_out else x.new_zeros(x.shape[0], 0)
        out, lse, top_w, n_eff = _guard_op(x, _train_tensor(ts), s, a, den, res.lse, res.top_weight, res.n_eff,
                                           need_out)  # fmt: skip
        return DenoiseResult(out if need_out else None, lse, top_w, n_eff)

    return run


def softmax_denoise(
    x,
    train,
    sigma: SigmaLike,
    alpha: SigmaLike = 1.0,
    *,
    return_lse: bool = False,
    return_stats: bool = False,
    backend: str = "auto",
    precision: str = "auto",
):
    """The empirical optimal denoiser D*(x) = sum_i w_i y_i, w = softmax_i(-||x - alpha y_i||^2 / (2 sigma^2)).

    Args:
        x: [M, *shape] or [M, d] noisy queries (torch tensor or numpy array, floating dtype, finite).
        train: [N, *shape] or [N, d] training points, or a TrainingSet (any loader: .npy memmap, images, ...).
        sigma: noise level, a float or one per query ([M], or [M, 1, 1, 1] as EDM passes it); > 0.
        alpha: signal scale (VP: x = alpha y + sigma n), a float or [M]; > 0. Default 1 (VE / EDM).
        return_lse: also return lse [M] = log sum_i exp(-||x - alpha y_i||^2 / (2 sigma^2)), unnormalised.
        return_stats: return a DenoiseResult(denoised, lse, top_weight, n_eff) instead; top_weight = max_i w_i,
            n_eff = 1 / sum_i w_i^2 (effective number of neighbours).
        backend: "auto", "torch", "triton", "cpu", "cuda" (see diffgen_fast.ops.dispatch).
        precision: "auto", "fast" or "exact" (docs/precision.md for the error of each per backend).

    Differentiable in x, sigma and alpha on every backend (autograd: the backend's forward and the closed-form
    backward, J = (alpha / sigma^2) Cov_w(y), by two exact float64 passes over the training set); no gradient flows
    to the training set.

    Returns:
        denoised [M, *shape] in x's dtype (accumulated in float32, or float64 when x or train is float64), the same
        kind (torch / numpy) as x; with return_lse, (denoised, lse) with lse float64 if accumulated in float64 else
        float32.
    """
    precision = check_precision(precision)
    _check_train_grad(train)
    xt, x2, ts, was_np = prepare(x, train)
    M = x2.shape[0]
    s = per_query(sigma, M, "sigma", device=x2.device, keep_grad=True)
    a = per_query(alpha, M, "alpha", device=x2.device, keep_grad=True)
    _, impl = dispatch.resolve(
        "softmax_denoise", backend, x2.device, torch.promote_types(x2.dtype, ts.dtype), d=x2.shape[1]
    )
    impl = _guarded(impl)
    if needs_grad(x2, s, a):  # every backend: its forward, and the closed-form backward
        res: DenoiseResult = differentiable_call(impl, x2, ts, s, a, precision=precision)
    else:
        res = impl(x2.detach(), ts, s.detach(), a.detach(), precision=precision)
    out = res.denoised.to(xt.dtype).reshape(xt.shape)
    lse_dtype = torch.float64 if res.denoised.dtype == torch.float64 else torch.float32
    if return_stats or return_lse:
        _check_f32(res.lse, lse_dtype, "log-sum-exp")
    if return_stats:
        return DenoiseResult(
            back(out, was_np),
            back(res.lse.to(lse_dtype), was_np),
            back(res.top_weight, was_np),
            back(res.n_eff, was_np),
        )
    if return_lse:
        return back(out, was_np), back(res.lse.to(lse_dtype), was_np)
    return back(out, was_np)


def kde_log_density(x, train, bandwidth: SigmaLike, *, backend: str = "auto"):
    """Gaussian-KDE log-density of the training set: log (1/N) sum_i N(x; y_i, h^2 I).

    log p_h(x) = LSE_i(-||x - y_i||^2 / (2 h^2)) - log N - (d / 2) log(2 pi h^2)   (docs/science.md section 3)

    Args:
        x: [M, *shape] or [M, d] query points; train: [N, *shape], [N, d] or a TrainingSet.
        bandwidth: h > 0, a float or one per query [M].
    Returns:
        [M] log-densities, float64 if x or train is float64 else float32; numpy if x was numpy.
    """
    _check_train_grad(train)
    xt, x2, ts, was_np = prepare(x, train)
    M, d = x2.shape
    h = per_query(bandwidth, M, "bandwidth", device=x2.device, keep_grad=True)
    one = torch.ones(M, dtype=torch.float64, device=x2.device)
    _, impl = dispatch.resolve(
        "softmax_denoise", backend, x2.device, torch.promote_types(x2.dtype, ts.dtype), d=x2.shape[1]
    )
    impl = _guarded(impl)
    if needs_grad(x2, h):  # the gradient in x is the score (D - x) / h^2
        res: DenoiseResult = differentiable_call(impl, x2, ts, h, one, precision="exact", need_out=False)
    else:
        res = impl(x2.detach(), ts, h.detach(), one, precision="exact", need_out=False)
    logp = res.lse - math.log(len(ts)) - 0.5 * d * torch.log(2.0 * math.pi * h * h)
    dtype = torch.float64 if torch.float64 in (x2.dtype, ts.dtype) else torch.float32
    _check_f32(logp, dtype, "log-density")
    return back(logp.to(dtype), was_np)
