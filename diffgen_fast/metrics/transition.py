"""The memorization -> generalization transition of a trained denoiser as N grows (docs/science.md 4, 5, 7).

For each N in Ns (nested subsets: the first N points of one fixed random permutation of the training set) an
EDMPrecondMLP is trained on the subset with EDM's loss, n_samples are drawn with EDM's deterministic Heun sampler,
and three things are measured:

- memorized fraction: the nearest-neighbour ratio test ||x - NN1|| / ||x - NN2|| < 1/3 of the samples against the
  SUBSET the network saw (docs/science.md 5.1);
- gap to D*: E ||D_model(x) - D*(x)||^2 / d over forward samples x = y + sigma n, y uniform from the subset, D* the
  empirical optimal denoiser of the subset, per sigma (docs/science.md 7a);
- distance to D_G: mean ||D_model(x) - D_G(x)|| / ||D_G(x)|| over the same forward samples, D_G the Gaussian
  denoiser of the subset's mean and covariance (docs/science.md 4.3); the same distance of D* itself is reported beside
  it as the reference a memorizing network would sit at.

Defaults (tuned on the built-in digits, d = 64, 2 CPU cores): width 512, depth 3, 3000 Adam steps of batch 256 at
lr 2e-3 (cosine-decayed), 64 samples with 18 Heun steps. A width-256 net with 2000 steps barely memorizes even
16 digits (ratio median ~0.5); width 512 / 3000 steps memorizes ~95% of samples at N = 16 and ~0% at N = 1797.
quick=True: Ns = (8, 128), width 512, 1000 steps at lr 3e-3 (~20-30 s): ~85% memorized at N = 8, ~0% at 128.
Memorization sets in abruptly with training length: at width 512 / lr 3e-3, 600 steps memorize ~5% of the samples
at N = 8 and 800-1000 steps ~80-90%; width 256 with 1200 steps stays below 10%.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import torch

from diffgen_fast.errors import InputError

__all__ = ["transition", "transition_figure", "DEFAULT_NS", "QUICK_NS", "DEFAULT_SIGMAS"]

DEFAULT_NS = (16, 64, 256, 1024, 1797)
QUICK_NS = (8, 128)
DEFAULT_SIGMAS = (0.05, 0.2, 0.5, 1.0, 2.0, 5.0)

_DEFAULTS = {"steps": 3000, "hidden": 512, "depth": 3, "lr": 2e-3, "n_samples": 64, "sample_steps": 18}
_QUICK = {"steps": 1000, "hidden": 512, "depth": 3, "lr": 3e-3, "n_samples": 64, "sample_steps": 18}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_ns(Ns, n_total: int) -> list:
    try:
        ns = list(Ns)
    except TypeError as e:
        raise InputError(f"Ns: expected a sequence of training-set sizes, got {Ns!r}") from e
    if not ns:
        raise InputError("Ns: expected at least one training-set size, got an empty sequence")
    for n in ns:
        if not _is_int(n):
            raise InputError(f"Ns: expected ints, got {n!r}")
        if n < 2:
            raise InputError(f"Ns: every N must be >= 2 (the ratio test needs two neighbours), got {n}")
        if n > n_total:
            raise InputError(f"Ns: N = {n} exceeds the training set's {n_total} points")
    return sorted(set(int(n) for n in ns))


def _probes(sub_flat: torch.Tensor, sigma: float, n_probe: int, gen: torch.Generator) -> torch.Tensor:
    idx = torch.randint(0, sub_flat.shape[0], (n_probe,), generator=gen)
    noise = torch.randn((n_probe, sub_flat.shape[1]), generator=gen, dtype=sub_flat.dtype).to(sub_flat.device)
    return sub_flat[idx.to(sub_flat.device)] + sigma * noise


@torch.no_grad()
def _denoiser_metrics(model, dstar, dgauss, sub, sigmas, n_probe: int, seed: int) -> dict:
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    flat = sub.flat().to(torch.float32)
    d = flat.shape[1]
    gap, dist, ref = [], [], []
    for s in sigmas:
        x = _probes(flat, float(s), n_probe, gen).reshape(n_probe, *sub.shape)
        dm = model(x, float(s)).reshape(n_probe, d).double()
        ds = dstar(x, float(s)).reshape(n_probe, d).double()
        dg = dgauss(x, float(s)).reshape(n_probe, d).double()
        gap.append(float(((dm - ds) ** 2).sum(1).mean() / d))
        den = dg.norm(dim=1).clamp(min=1e-12)
        dist.append(float(((dm - dg).norm(dim=1) / den).mean()))
        ref.append(float(((ds - dg).norm(dim=1) / den).mean()))
    return {"gap_to_dstar": gap, "dist_to_dg": dist, "dstar_dist_to_dg": ref}


def transition(
    train,
    Ns: Optional[Sequence[int]] = None,
    *,
    steps: Optional[int] = None,
    hidden: Optional[int] = None,
    depth: Optional[int] = None,
    lr: Optional[float] = None,
    batch: int = 256,
    n_samples: Optional[int] = None,
    sample_steps: Optional[int] = None,
    seed: int = 0,
    sigmas_gap: Optional[Sequence[float]] = None,
    n_probe: int = 256,
    out_dir=None,
    quick: bool = False,
    progress: bool = False,
) -> dict:
    """Train a small EDM network per training-set size N and measure memorization, the gap to D* and to D_G.

    Args:
        train: TrainingSet (or anything TrainingSet.coerce accepts), e.g. TrainingSet.builtin("digits").
        Ns: training-set sizes (ints, 2 <= N <= len(train)); run in increasing order on nested subsets, the first N
            points of a random permutation drawn from seed. Default DEFAULT_NS (clipped to len(train)), or
            QUICK_NS with quick=True.
        steps, hidden, depth, lr, batch: training of EDMPrecondMLP(hidden, depth) by train_denoiser.
        n_samples, sample_steps: samples per N and EDM Heun steps.
        seed: seeds the permutation, the weights, the training, the sampler and the probes.
        sigmas_gap: noise levels of the gap / D_G measurements (default DEFAULT_SIGMAS).
        n_probe: forward samples per sigma.
        out_dir: when given, transition.json and transition.png are written there atomically.
        quick: tiny settings for tests (QUICK_NS, 1000 steps, width 512, lr 3e-3); any argument given explicitly
            wins.
        progress: tqdm bars.
    Returns:
        dict with "Ns", "settings", "sigmas", per-N lists ("memorized_fraction", "ratio_median",
        "gap_to_dstar" [N][sigma], "gap_to_dstar_mean", "dist_to_dg" [N][sigma], "dist_to_dg_mean",
        "dstar_dist_to_dg" [N][sigma], "final_loss", "seconds"), "wall_seconds" and "files".
    """
    from diffgen_fast.data import TrainingSet
    from diffgen_fast.denoisers import EmpiricalDenoiser, GaussianDenoiser
    from diffgen_fast.metrics.memorization import memorization
    from diffgen_fast.models import EDMPrecondMLP, train_denoiser
    from diffgen_fast.sampling import sample

    t0 = time.perf_counter()
    ts = TrainingSet.coerce(train, name="train")
    if len(ts) < 2:
        raise InputError(f"train: expected at least 2 points, got {len(ts)}")
    base = dict(_QUICK if quick else _DEFAULTS)
    given = {"steps": steps, "hidden": hidden, "depth": depth, "lr": lr, "n_samples": n_samples}
    given["sample_steps"] = sample_steps
    cfg = {k: (v if v is not None else base[k]) for k, v in given.items()}
    for k in ("steps", "hidden", "depth", "n_samples", "sample_steps"):
        if not _is_int(cfg[k]) or cfg[k] < 1:
            raise InputError(f"{k}: expected an int >= 1, got {cfg[k]!r}")
    if not _is_int(n_probe) or n_probe < 1:
        raise InputError(f"n_probe: expected an int >= 1, got {n_probe!r}")
    if not _is_int(seed):
        raise InputError(f"seed: expected an int, got {seed!r}")
    if Ns is None:
        Ns = QUICK_NS if quick else DEFAULT_NS
        Ns = sorted(set(min(n, len(ts)) for n in Ns))
    ns = _check_ns(Ns, len(ts))
    sigmas = list(DEFAULT_SIGMAS if sigmas_gap is None else sigmas_gap)
    if not sigmas or not all(isinstance(s, (int, float)) and math.isfinite(s) and s > 0 for s in sigmas):
        raise InputError(f"sigmas_gap: expected a non-empty sequence of finite numbers > 0, got {sigmas_gap!r}")
    sigmas = [float(s) for s in sigmas]
    out_path = None
    if out_dir is not None:
        out_path = Path(out_dir)
        out_path.mkdir(parents=True, exist_ok=True)

    perm = torch.randperm(len(ts), generator=torch.Generator(device="cpu").manual_seed(int(seed)))
    rows = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(ns), desc="transition", unit="N")
    for N in ns:
        t1 = time.perf_counter()
        sub = ts.subset(perm[:N])
        model = EDMPrecondMLP(ts.shape, hidden=cfg["hidden"], depth=cfg["depth"], seed=seed).to(ts.device)
        losses = train_denoiser(model, sub, steps=cfg["steps"], batch=batch, lr=cfg["lr"], seed=seed, progress=progress)
        with torch.no_grad():
            x = sample(model, cfg["n_samples"], steps=cfg["sample_steps"], sampler="heun", seed=seed + 1)
        mem = memorization(x, sub)
        summ = mem.summary()
        dm = _denoiser_metrics(model, EmpiricalDenoiser(sub), GaussianDenoiser(sub), sub, sigmas, n_probe, seed + 2)
        tail = losses[-min(len(losses), 100) :]
        rows.append(
            {
                "N": N,
                "memorized_fraction": mem.fraction,
                "ratio_median": summ["ratio_median"],
                "nn_dist_median": summ["nn_dist_median"],
                **dm,
                "final_loss": sum(tail) / len(tail),
                "seconds": time.perf_counter() - t1,
            }
        )
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()

    result = {
        "description": "memorization -> generalization of EDMPrecondMLP trained on nested subsets of size N",
        "source": getattr(ts, "source", None),
        "n_train_total": len(ts),
        "d": ts.d,
        "shape": list(ts.shape),
        "Ns": ns,
        "sigmas": sigmas,
        "settings": {
            **cfg,
            "batch": batch,
            "seed": seed,
            "n_probe": n_probe,
            "quick": bool(quick),
            "sampler": "heun (EDM, deterministic)",
            "memorization_threshold": 1 / 3,
            "memorized_against": "the subset of size N",
            "P_mean": -1.2,
            "P_std": 1.2,
            "sigma_data": 0.5,
            "torch_threads": torch.get_num_threads(),
        },
        "metrics": {
            "memorized_fraction": "fraction of samples with ||x - NN1|| / ||x - NN2|| < 1/3 against the subset",
            "gap_to_dstar": "E ||D_model(x) - D*(x)||^2 / d, x = y + sigma n, y uniform from the subset",
            "dist_to_dg": "mean ||D_model(x) - D_G(x)|| / ||D_G(x)||, same forward samples",
            "dstar_dist_to_dg": "mean ||D*(x) - D_G(x)|| / ||D_G(x)|| (reference: a perfectly memorizing model)",
        },
        "per_N": rows,
    }
    for key in (
        "memorized_fraction",
        "ratio_median",
        "gap_to_dstar",
        "dist_to_dg",
        "dstar_dist_to_dg",
        "final_loss",
        "seconds",
    ):
        result[key] = [r[key] for r in rows]
    result["gap_to_dstar_mean"] = [sum(r["gap_to_dstar"]) / len(sigmas) for r in rows]
    result["dist_to_dg_mean"] = [sum(r["dist_to_dg"]) / len(sigmas) for r in rows]
    result["wall_seconds"] = time.perf_counter() - t0
    result["files"] = []
    if out_path is not None:
        from diffgen_fast.report import write_json_atomic

        png = transition_figure(result, out_path / "transition.png")
        result["files"] = [str(out_path / "transition.json"), str(png)]
        write_json_atomic(result, out_path / "transition.json")
    return result


def transition_figure(result: dict, path) -> Path:
    """Three panels vs N (log x): memorized fraction, gap to D* per sigma, distance to D_G per sigma."""
    from diffgen_fast.report import _new_figure, _save_figure

    ns = result["Ns"]
    sigmas = result["sigmas"]
    fig = _new_figure(14.0, 4.0)
    ax = fig.add_subplot(1, 3, 1)
    ax.plot(ns, result["memorized_fraction"], "o-", color="#c0392b")
    ax.set_xscale("log")
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("training-set size N")
    ax.set_ylabel("memorized fraction (ratio < 1/3)")
    ax.set_title("Memorized samples", fontsize=10)
    ax.grid(alpha=0.3)
    colors = ["#1b4f72", "#2471a3", "#27ae60", "#d68910", "#8e44ad", "#566573", "#c0392b", "#17202a"]
    ax = fig.add_subplot(1, 3, 2)
    for j, s in enumerate(sigmas):
        ys = [max(r[j], 1e-12) for r in result["gap_to_dstar"]]
        ax.plot(ns, ys, "o-", color=colors[j % len(colors)], label=f"sigma={s:g}", ms=4)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training-set size N")
    ax.set_ylabel("E ||D - D*||^2 / d")
    ax.set_title("Gap to the empirical optimum D*", fontsize=10)
    ax.legend(fontsize=7, frameon=False)
    ax.grid(alpha=0.3)
    ax = fig.add_subplot(1, 3, 3)
    for j, s in enumerate(sigmas):
        c = colors[j % len(colors)]
        ax.plot(ns, [r[j] for r in result["dist_to_dg"]], "o-", color=c, label=f"sigma={s:g}", ms=4)
        ax.plot(ns, [r[j] for r in result["dstar_dist_to_dg"]], ":", color=c, lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("training-set size N")
    ax.set_ylabel("||D - D_G|| / ||D_G||")
    ax.set_title("Distance to the Gaussian denoiser (dotted: D*)", fontsize=10)
    ax.legend(fontsize=7, frameon=False, ncol=2, loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save_figure(fig, path)
