"""The denoiser gap to the empirical optimum, E ||D_model(x) - D*(x)||^2 per sigma (docs/science.md section 7).

A trained network that generalizes differs from the empirical optimal denoiser D* (whose deterministic samples are
training points); the gap is small at small sigma (both return the nearest training point, or close to it) and at
large sigma (both return about the mean plus the same linear term), and peaks in between (near sigma ~ 3 for
CIFAR-10 networks, Niedoba et al. 2025). Forward samples x = y + sigma n, y uniform training rows, the same draws
for every sigma and every model; errors accumulated in float64.

Reported in two spaces: x0 (denoiser outputs, ||D_model - D*||^2) and epsilon (noise predictions,
||eps_model - eps*||^2 = ||D_model - D*||^2 / sigma^2, since eps = (x - D) / sigma in the VE parametrisation),
each with its own 95% interval.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from diffgen_fast.metrics.gaussian import (
    _COLORS,
    Denoiser,
    _call,
    _check_denoiser,
    _check_denoisers,
    _check_dtype,
    _check_int,
    _check_sigmas,
    _coerce_train,
    _default_sigmas,
    _forward_batches,
    _mean_stderr,
    _probe_device,
)

__all__ = ["denoiser_gap", "analyze_gap"]

Z95 = 1.959963984540054


def denoiser_gap(
    model: Denoiser,
    train,
    sigmas,
    *,
    n: int = 256,
    seed: int = 0,
    reference: Optional[Denoiser] = None,
    batch: int = 256,
    dtype: torch.dtype = torch.float64,
    device=None,
) -> dict:
    """E ||D_model(x) - D*(x)||^2 per sigma over forward samples x = y + sigma n, with a 95% confidence interval.

    The expectation is the mean over ``n`` samples (y uniform training rows, n ~ N(0, I), fixed seed, the same draws
    at every sigma); the interval is mean +- 1.96 standard errors (normal approximation, ddof 1), clipped at 0.

    Args:
        model: callable D(x [b, *shape], sigma) -> [b, *shape] x0-prediction (a network, a denoiser of this
            package, a lambda); sigma is passed as a 0-d float64 tensor.
        train: TrainingSet, or anything TrainingSet.coerce accepts ([N, *shape] tensor / array, a path).
        sigmas: a noise level or a 1-D sequence / tensor of them, each finite > 0.
        n: forward samples per sigma (>= 2).
        seed: seed of the samples.
        reference: the D* to compare with (any callable); default EmpiricalDenoiser(train, precision="exact").
        batch: samples per call.
        dtype: dtype the samples are passed in (default float64; float32 for networks that need it).
        device: device of the samples (default: the training set's).

    Returns:
        {"sigma": [S], "space": "both", "gap": [S] mean squared L2 distance in x0 space, "gap_per_dim": [S] gap / d
        (per-value MSE), "stderr": [S], "ci_low": [S], "ci_high": [S] (95% interval of gap), "ci_low_per_dim",
        "ci_high_per_dim": the same divided by d, "x0": {the same keys}, "eps": {the same keys for the
        eps-prediction error ||eps_model - eps*||^2 = ||D_model - D*||^2 / sigma^2}, "n": n, "d": d}. Lists of
        floats; the top-level gap keys are the x0 ones.
    """
    from diffgen_fast.denoisers import EmpiricalDenoiser

    model = _check_denoiser(model, "model")
    ts = _coerce_train(train)
    sig = _check_sigmas(sigmas)
    n = _check_int(n, "n", 2)
    batch = _check_int(batch, "batch", 1)
    seed = _check_int(seed, "seed", 0)
    dtype = _check_dtype(dtype)
    dev = _probe_device(ts, device)
    ref = EmpiricalDenoiser(ts, precision="exact") if reference is None else _check_denoiser(reference, "reference")
    shape, d = tuple(ts.shape), ts.d
    keys = ("gap", "gap_per_dim", "stderr", "ci_low", "ci_high", "ci_low_per_dim", "ci_high_per_dim")
    spaces: dict = {sp: {k: [] for k in keys} for sp in ("x0", "eps")}
    for s in sig:
        errs = []
        for ((y, z),) in _forward_batches(ts, n, batch, seed, dev):
            x = y + s * z
            dm = _call(model, x, s, shape, dtype, "model")
            dr = _call(ref, x, s, shape, dtype, "reference")
            e = dm - dr
            errs.append((e * e).sum(dim=1))
        sq = torch.cat(errs)
        for sp, vals in (("x0", sq), ("eps", sq / (s * s))):
            res = spaces[sp]
            m, se = _mean_stderr(vals)
            lo, hi = max(0.0, m - Z95 * se), m + Z95 * se
            for key, v in (("gap", m), ("stderr", se), ("ci_low", lo), ("ci_high", hi)):
                res[key].append(v)
            res["gap_per_dim"].append(m / d)
            res["ci_low_per_dim"].append(lo / d)
            res["ci_high_per_dim"].append(hi / d)
    return {"sigma": sig, "space": "both", **spaces["x0"], **spaces, "n": n, "d": d}


def analyze_gap(
    models: Mapping[str, Denoiser],
    train,
    *,
    sigmas=None,
    n: int = 256,
    seed: int = 0,
    reference: Optional[Denoiser] = None,
    batch: int = 256,
    out_dir=None,
) -> dict:
    """Denoiser gap to D* for several models, with ``gap.json`` and ``gap.png`` (log-log gap per dim vs sigma).

    Args:
        models: {name: callable D(x, sigma)}.
        train: TrainingSet or anything TrainingSet.coerce accepts.
        sigmas: noise levels (default: the 12-step EDM grid from 80 to 0.002, without the final 0).
        n: forward samples per sigma (shared by all models).
        seed: seed of the samples.
        reference: D* (default EmpiricalDenoiser(train, precision="exact"), built once for all models).
        batch: samples per call.
        out_dir: if given, ``gap.json`` and ``gap.png`` are written there atomically.

    Returns:
        {"metric": "denoiser_gap", "space": "both", "sigma": [S], "models": {name: denoiser_gap(...) without
        "sigma": x0-space keys at the top and under "x0", eps-space keys under "eps"}, "settings": {...},
        "files": {"json", "png"} (only with out_dir)}.
    """
    from diffgen_fast.denoisers import EmpiricalDenoiser

    mods = _check_denoisers(models, "models")
    ts = _coerce_train(train)
    sig = _default_sigmas() if sigmas is None else _check_sigmas(sigmas)
    n = _check_int(n, "n", 2)
    ref = EmpiricalDenoiser(ts, precision="exact") if reference is None else _check_denoiser(reference, "reference")
    out: dict = {
        "metric": "denoiser_gap",
        "space": "both",
        "sigma": sig,
        "models": {},
        "settings": {
            "n": n,
            "seed": seed,
            "n_train": len(ts),
            "d": ts.d,
            "data": ts.source,
            "gap": "mean ||D_model(x) - D*(x)||^2 over x = y + sigma n; gap_per_dim = gap / d",
            "spaces": {
                "x0": "||D_model(x) - D*(x)||^2 (the top-level keys of each model, and its 'x0' entry)",
                "eps": "||eps_model(x) - eps*(x)||^2 = ||D_model(x) - D*(x)||^2 / sigma^2 (each model's 'eps' entry)",
            },
            "ci": "mean +- 1.96 stderr (normal approximation), clipped at 0",
            "reference": "EmpiricalDenoiser(train, precision='exact')" if reference is None else "user-supplied",
        },
    }
    for name, M in mods.items():
        r = denoiser_gap(M, ts, sig, n=n, seed=seed, reference=ref, batch=batch)
        r.pop("sigma")
        out["models"][name] = r
    if out_dir is not None:
        from diffgen_fast._atomic import write_json_atomic

        d = Path(out_dir)
        d.mkdir(parents=True, exist_ok=True)
        json_path = write_json_atomic(out, d / "gap.json")
        png_path = _plot_gap(out, d / "gap.png")
        out["files"] = {"json": str(json_path), "png": str(png_path)}
    return out


def _plot_gap(result: dict, path: Path) -> Path:
    from diffgen_fast.figures import _new_figure, _save_figure

    fig = _new_figure(7.0, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    x = np.asarray(result["sigma"], dtype=np.float64)
    any_pos = False
    # The log axis stops 8 decades below the largest gap: a KNN denoiser's gap at small sigma can be 1e-160, which
    # would flatten every other curve; such points are drawn on the floor with a down-pointing marker.
    peak = max((float(np.nanmax(np.asarray(r["gap_per_dim"], np.float64))) for r in result["models"].values()
                if np.isfinite(np.asarray(r["gap_per_dim"], np.float64)).any()), default=0.0)  # fmt: skip
    floor = peak * 1e-8 if peak > 0 else None
    clipped_any = False
    for k, (name, r) in enumerate(result["models"].items()):
        c = _COLORS[k % len(_COLORS)]
        m = np.asarray(r["gap_per_dim"], dtype=np.float64)
        lo = np.asarray(r["ci_low_per_dim"], dtype=np.float64)
        hi = np.asarray(r["ci_high_per_dim"], dtype=np.float64)
        pos = np.isfinite(m) & (m > 0)
        any_pos |= bool(pos.any())
        clipped = pos & (m < floor) if floor else np.zeros_like(pos)
        clipped_any |= bool(clipped.any())
        m = np.where(pos, m, np.nan)  # zeros cannot be drawn on a log axis
        if floor:
            m = np.maximum(m, floor)
            lo = np.where(pos, np.maximum(np.where(lo > 0, lo, floor), floor), np.nan)
            hi = np.where(pos, np.maximum(hi, floor), np.nan)
        else:
            lo = np.where(pos & (lo > 0), lo, m)
            hi = np.where(pos, hi, np.nan)
        label = name if pos.any() else f"{name} (gap 0 at every sigma)"
        ax.plot(x, m, marker="o", ms=3, lw=1.4, color=c, label=label)
        if clipped.any():
            ax.plot(x[clipped], m[clipped], ls="none", marker="v", ms=6, color=c)
        ax.fill_between(x, lo, hi, color=c, alpha=0.2, lw=0, label=f"{name}: 95% interval" if pos.any() else None)
    if clipped_any:
        ax.plot([], [], ls="none", marker="v", color="0.4", label=f"below {floor:.1e} (drawn at the floor)")
    ax.set_xscale("log")
    if any_pos:
        ax.set_yscale("log")
        if floor:
            ax.set_ylim(bottom=floor / 2)
    ax.set_xlabel("sigma")
    ax.set_ylabel("E ||D(x) - D*(x)||^2 / d")
    ax.set_title("Denoiser gap to the empirical optimum D* in x0 space (95% CI; eps space in gap.json)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    st = result.get("settings", {})
    return _save_figure(fig, path, data=f"{st.get('data')} (N={st.get('n_train')}, d={st.get('d')})")
