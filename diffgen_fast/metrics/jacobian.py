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
            return out.reshape(-1).double().detach()

        return jv, jv, True

    def f(z: torch.Tensor) -> torch.Tensor:
        kw = {} if class_labels is None else {"class_labels": class_labels}
        if alpha != 1.0:
            kw["alpha"] = alpha
        sig = torch.full((shape[0],), float(sigma), dtype=z.dtype, device=z.device)
        return torch.as_tensor(denoiser(z, sig, **kw))

    def jv(v: torch.Tensor) -> torch.Tensor:
        _, t = torch.func.jvp(f, (x.detach(),), (v.reshape(shape).to(x.dtype),))
        return t.reshape(-1).double().detach()

    def vj(v: torch.Tensor) -> torch.Tensor:
        xr = x.detach().clone().requires_grad_()
        (g,) = torch.autograd.grad(f(xr), xr, v.reshape(shape).to(x.dtype))
        return g.reshape(-1).double().detach()

    return jv, vj, False


def _dense(denoiser: Any, x: torch.Tensor, sigma: float, alpha: float, class_labels, exact: bool) -> np.ndarray:
    """The whole Jacobian [d, d] at one point: one streamed pass with d rows for D*, reverse mode for the rest."""
    d = x[0].numel()
    if exact:
        from diffgen_fast.ops.softmax_denoise.autograd import softmax_denoise_jvp

        xs = x.detach().reshape(1, d).expand(d, d)
        eye = torch.eye(d, dtype=x.dtype)
        return softmax_denoise_jvp(xs, denoiser.train_set, sigma, eye, alpha).double().T.numpy()

    def f(z: torch.Tensor) -> torch.Tensor:
        kw = {} if class_labels is None else {"class_labels": class_labels}
        if alpha != 1.0:
            kw["alpha"] = alpha
        sig = torch.full((1,), float(sigma), dtype=z.dtype)
        return torch.as_tensor(denoiser(z.reshape(x.shape), sig, **kw)).reshape(-1)

    J = torch.autograd.functional.jacobian(f, x.detach().reshape(-1), vectorize=False)
    return J.detach().double().numpy()


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
    dense_max: int = 1024,
) -> dict:
    """Top-k eigenpairs of the Jacobian of `denoiser` at the point x.

    Args:
        denoiser: an EDM-style callable D(x, sigma) (EmpiricalDenoiser: closed form; anything else: autograd).
        x: one point, [*shape] or [1, *shape] (torch or numpy, floating).
        sigma: noise level > 0; alpha: signal scale (passed to the denoiser when != 1).
        k: eigenpairs wanted, 1 <= k < d.
        tol: Lanczos tolerance; seed: its start vector and the trace probes.
        trace_probes: Hutchinson probes for the trace when it is not closed form (Lanczos path).
        dense_max: up to this d the whole Jacobian is built from d products and diagonalised (exact eigenpairs
            and trace); above it, Lanczos on the products.
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

    if d <= dense_max:
        # d products give the whole (symmetrised) matrix: exact eigenpairs and trace, no iteration to fail
        Jm = _dense(denoiser, xt, float(sigma), float(alpha), class_labels, exact)
        Jm = 0.5 * (Jm + Jm.T)
        allv, allvec = np.linalg.eigh(Jm)
        vals, vecs = allv[::-1][:k].copy(), allvec[:, ::-1][:, :k].copy()
        trace, trace_se = float(np.trace(Jm)), 0.0
        method = "dense"
    else:
        v0 = rng.standard_normal(d)
        if not np.any(sym(v0)):  # the zero operator (e.g. D* at tiny sigma): ARPACK cannot start
            vals, vecs = np.zeros(k), np.eye(d, k)
        else:
            op = LinearOperator((d, d), matvec=sym, dtype=np.float64)
            vals, vecs = eigsh(op, k=k, which="LA", tol=tol, v0=v0)
            order = np.argsort(vals)[::-1]
            vals, vecs = vals[order], vecs[:, order]
        method = "lanczos"
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
        "effective_rank": trace / top if top == top else 0.0,  # J = 0 (a copying D*): rank 0
        "participation_ratio": float(pos.sum() ** 2 / (pos**2).sum()) if pos.sum() > 0 else float("nan"),
        "asymmetry": asymmetry,
        "exact": exact,
        "method": method,
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


__all__ = ["analyze_jacobian", "jacobian_spectrum"]


def analyze_jacobian(
    denoisers: dict,
    train,
    *,
    sigmas,
    k: int = 16,
    n_points: int = 4,
    seed: int = 0,
    out_dir=None,
    progress: bool = False,
) -> dict:
    """Jacobian spectra against sigma: for each denoiser and sigma, the top-k eigenvalues and the effective rank
    (tr J / largest eigenvalue) at n_points probes x = y + sigma n (y drawn from the training set; the same probes
    for every denoiser), with a JSON and a figure when out_dir is given.

    Returns {"metric": "jacobian", "sigma": [S], "denoisers": {name: {"effective_rank": [S], "effective_rank_stderr":
    [S], "trace": [S], "eigenvalues": [S][k] (mean over probes), "asymmetry": [S], "exact": bool}}, "settings"}.
    progress: a tqdm bar over the (denoiser, sigma, probe) spectra.
    """
    from diffgen_fast.data import TrainingSet

    ts = TrainingSet.coerce(train, name="train")
    sig = [float(s) for s in sigmas]
    if not sig or any(not (math.isfinite(s) and s > 0) for s in sig):
        raise InputError(f"sigmas: expected finite values > 0, got {sigmas!r}")
    if isinstance(n_points, bool) or not isinstance(n_points, int) or n_points < 1:
        raise InputError(f"n_points: expected an int >= 1, got {n_points!r}")
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, len(ts), (n_points,), generator=gen)
    base = ts[rows].reshape(n_points, *ts.shape).double().cpu()
    noise = torch.randn(base.shape, generator=gen, dtype=torch.float64)
    out: dict = {
        "metric": "jacobian",
        "sigma": sig,
        "denoisers": {},
        "settings": {
            "k": k, "n_points": n_points, "seed": seed, "n_train": len(ts), "d": ts.d, "data": ts.source,
            "probes": "x = y + sigma n, y drawn from the training set (the same for every denoiser)",
            "effective_rank": "tr J / lambda_max (exact trace for D*, Hutchinson with 32 probes otherwise)",
            "eigenpairs": "top k of the symmetric part (J + J^T)/2 by Lanczos (scipy eigsh)",
        },
    }  # fmt: skip
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(denoisers) * len(sig) * n_points, desc="Jacobian spectra", unit="spectrum", leave=False)
    for name, D in denoisers.items():
        er, er_se, tr, ev, asym = [], [], [], [], []
        exact = False
        for s in sig:
            per = []
            for p in range(n_points):
                x = base[p] + s * noise[p]
                if not isinstance(D, torch.nn.Module) or next(D.parameters(), None) is None:
                    xx = x
                else:
                    xx = x.to(next(D.parameters()).dtype)
                per.append(jacobian_spectrum(D, xx, s, k, seed=seed + p))
                if bar is not None:
                    bar.update(1)
            ranks = np.array([r["effective_rank"] for r in per], dtype=np.float64)
            er.append(float(np.nanmean(ranks)))
            er_se.append(float(np.nanstd(ranks, ddof=1) / math.sqrt(len(ranks))) if len(ranks) > 1 else 0.0)
            tr.append(float(np.mean([r["trace"] for r in per])))
            ev.append(np.mean([r["eigenvalues"] for r in per], axis=0).tolist())
            asym.append(float(np.max([r["asymmetry"] for r in per])))
            exact = bool(per[0]["exact"])
        out["denoisers"][name] = {
            "effective_rank": er, "effective_rank_stderr": er_se, "trace": tr, "eigenvalues": ev,
            "asymmetry": asym, "exact": exact,
        }  # fmt: skip
    if bar is not None:
        bar.close()
    if out_dir is not None:
        from pathlib import Path

        from diffgen_fast._atomic import write_json_atomic

        d = Path(out_dir)
        d.mkdir(parents=True, exist_ok=True)
        json_path = write_json_atomic(out, d / "jacobian.json")
        png_path = _plot_jacobian(out, d / "jacobian.png")
        out["files"] = {"json": str(json_path), "png": str(png_path)}
    return out


def _plot_jacobian(result: dict, path) -> Any:
    from diffgen_fast.figures import _new_figure, _save_figure

    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
    fig = _new_figure(12.0, 4.4)
    ax1 = fig.add_subplot(1, 2, 1)
    ax2 = fig.add_subplot(1, 2, 2)
    x = np.asarray(result["sigma"], dtype=np.float64)
    mid = len(x) // 2
    for i, (name, r) in enumerate(result["denoisers"].items()):
        c = colors[i % len(colors)]
        m = np.asarray(r["effective_rank"])
        e = 1.96 * np.asarray(r["effective_rank_stderr"])
        ax1.plot(x, m, marker="o", ms=3, color=c, label=name)
        ax1.fill_between(x, m - e, m + e, color=c, alpha=0.2, lw=0)
        for j, ls in ((0, ":"), (mid, "--"), (len(x) - 1, "-")):
            ev = np.asarray(r["eigenvalues"][j], dtype=np.float64)
            label = f"{name}, sigma={x[j]:.3g}"
            if not np.any(ev > 0):  # J = 0 (D* copying one point): nothing to draw on a log axis
                ax2.plot([], [], ls=ls, color=c, label=label + " (J = 0)")
                continue
            ax2.plot(np.arange(1, len(ev) + 1), np.where(ev > 0, ev, np.nan), ls=ls, color=c, label=label)
    ax1.set_xscale("log")
    ax1.set_ylim(bottom=0)
    ax1.set_xlabel("sigma")
    ax1.set_ylabel("effective rank  tr J / lambda_max")
    ax1.set_title("Effective rank of the Jacobian (95% bands over probes)", fontsize=10)
    ax1.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=8)
    ax2.set_yscale("log")
    ax2.set_xlabel("eigenvalue index")
    ax2.set_ylabel("eigenvalue of J")
    ax2.set_title("Top eigenvalues (mean over probes)", fontsize=10)
    ax2.grid(True, which="both", alpha=0.3)
    ax2.legend(fontsize=6, ncol=2)
    st = result["settings"]
    fig.suptitle(f"Denoiser Jacobian spectra on {st.get('data', 'the training set')} (N={st['n_train']}, d={st['d']}), "
                 f"{st['n_points']} probes per sigma", fontsize=11)  # fmt: skip
    return _save_figure(fig, path)
