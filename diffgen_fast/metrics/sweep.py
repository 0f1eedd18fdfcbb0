"""Training-set-size sweeps: any of the analyses, and memorization, over nested subsets of one training set.

For each N, the subset is the first N points of one fixed random permutation (so the subsets are nested: every
point of the N-subset is in the 2N-subset). A denoiser is made for each subset (default: the empirical optimum of
that subset) and measured on it:

  memorization         samples from the denoiser (EDM Heun) scored with the NN ratio test against the subset
  linearity            linearity score per sigma (metrics.gaussian.linearity_score)
  gaussian_difference  ||D - D_G|| / ||D_G|| per sigma, D_G of the subset
  gap                  E||D - D*||^2 / d per sigma, D* of the subset (0 for the default denoiser)

Expected for the empirical optimum (docs/science.md 4): memorized at every N, far from linear at small sigma, and the
distance to D_G falls as N grows. For a trained network the memorized fraction falls with N (metrics.transition).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from diffgen_fast.data import TrainingSet
from diffgen_fast.errors import InputError

METRICS = ("memorization", "linearity", "gaussian_difference", "gap")


def nested_subsets(train: TrainingSet, Ns, seed: int = 0) -> list[TrainingSet]:
    """The nested subsets of sizes Ns (first N points of one random permutation with `seed`)."""
    Ns = [int(n) for n in Ns]
    if not Ns or min(Ns) < 1 or max(Ns) > len(train):
        raise InputError(f"Ns: expected sizes between 1 and N = {len(train)}, got {Ns}")
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    return [train.subset(perm[:n].sort().values) for n in Ns]


def size_sweep(
    train,
    Ns,
    *,
    make_denoiser: Optional[Callable[[TrainingSet], Any]] = None,
    metrics=METRICS,
    sigmas=None,
    n_samples: int = 64,
    steps: int = 18,
    n_probe: int = 128,
    seed: int = 0,
    out_dir=None,
    progress: bool = False,
) -> dict:
    """Run the chosen metrics over nested subsets of `train` (sizes Ns); progress: a tqdm bar over the subsets.

    Args:
        train: TrainingSet (or anything TrainingSet.coerce accepts).
        Ns: subset sizes, each 1..N.
        make_denoiser: subset -> denoiser D(x, sigma); default EmpiricalDenoiser(subset).
        metrics: any of "memorization", "linearity", "gaussian_difference", "gap".
        sigmas: noise levels of the per-sigma metrics (default: 8 points of the EDM grid).
        n_samples, steps: samples and Heun steps of the memorization metric.
        n_probe: probe pairs / forward samples per sigma of the other metrics.
        out_dir: write sweep.json and sweep.png there.
    Returns:
        {"Ns", "sigma", "metrics": {name: per-N values (lists; per-sigma metrics give [len(Ns)][len(sigma)])}}.
    """
    from diffgen_fast.denoisers import EmpiricalDenoiser, GaussianDenoiser
    from diffgen_fast.metrics.gap import denoiser_gap
    from diffgen_fast.metrics.gaussian import gaussian_difference, linearity_score
    from diffgen_fast.metrics.memorization import memorization
    from diffgen_fast.sampling import sample
    from diffgen_fast.schedules import edm_sigmas

    ts = TrainingSet.coerce(train, name="train")
    bad = [m for m in metrics if m not in METRICS]
    if bad or not metrics:
        raise InputError(f"metrics: expected some of {', '.join(METRICS)}, got {list(metrics)}")
    sig = [float(s) for s in (edm_sigmas(8, append_zero=False) if sigmas is None else sigmas)]
    subsets = nested_subsets(ts, Ns, seed)
    make = make_denoiser or (lambda sub: EmpiricalDenoiser(sub))
    out: dict = {"Ns": [len(s) for s in subsets], "sigma": sig, "metrics": {m: [] for m in metrics}, "n_train": len(ts),
                 "settings": {"data": ts.source, "seed": seed}}  # fmt: skip
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(subsets), desc="nested subsets", unit="subset", leave=False)
    for sub in subsets:
        if bar is not None:
            bar.set_postfix_str(f"N={len(sub)}")
        D = make(sub)
        if "memorization" in metrics:
            x = sample(D, n_samples, steps=steps, seed=seed, shape=tuple(sub.shape)) if len(sub) >= 2 else None
            out["metrics"]["memorization"].append(float(memorization(x, sub).fraction) if x is not None else 1.0)
        if "linearity" in metrics:
            out["metrics"]["linearity"].append(linearity_score(D, sub, sig, n_pairs=n_probe, seed=seed)["linearity"])
        if "gaussian_difference" in metrics and len(sub) >= 2:
            r = gaussian_difference(D, sub, sig, n=n_probe, seed=seed, gaussian=GaussianDenoiser(sub))
            out["metrics"]["gaussian_difference"].append(r["difference"])
        if "gap" in metrics:
            out["metrics"]["gap"].append(denoiser_gap(D, sub, sig, n=n_probe, seed=seed)["gap_per_dim"])
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if out_dir is not None:
        from diffgen_fast._atomic import write_json_atomic

        d = Path(out_dir)
        d.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out, d / "sweep.json")
        _plot(out, d / "sweep.png")
        out["files"] = {"json": str(d / "sweep.json"), "png": str(d / "sweep.png")}
    return out


def _plot(res: dict, path: Path) -> Path:
    from diffgen_fast.figures import _new_figure, _save_figure

    names = [m for m in METRICS if res["metrics"].get(m)]
    fig = _new_figure(4.2 * len(names), 3.6)
    Ns = np.asarray(res["Ns"], dtype=float)
    sig = res["sigma"]
    import matplotlib
    from matplotlib.colors import LogNorm

    cmap = matplotlib.colormaps["viridis"]
    pos = [float(v) for v in sig if float(v) > 0] or [1.0]
    norm = LogNorm(vmin=min(pos), vmax=max(pos) if max(pos) > min(pos) else min(pos) * 10)
    colored = []
    for k, m in enumerate(names):
        ax = fig.add_subplot(1, len(names), k + 1)
        vals = res["metrics"][m]
        if m == "memorization":
            ax.plot(Ns[: len(vals)], vals, "o-", color="#c0392b")
            ax.set_ylim(-0.05, 1.05)
            ax.set_ylabel("fraction memorized (ratio < 1/3)")
        else:
            arr = np.asarray(vals, dtype=float)
            # one colour per sigma on a log scale, read from one colour bar (no per-panel legend over the curves)
            for s_val, j in zip(sig, range(len(sig))):
                ax.plot(Ns[: len(arr)], arr[:, j], "o-", ms=3, color=cmap(norm(s_val)))
            ax.set_ylabel({"linearity": "linearity score", "gaussian_difference": "||D - D_G|| / ||D_G||",
                           "gap": "E||D - D*||^2 / d"}[m])  # fmt: skip
            if m != "linearity":
                ax.set_yscale("symlog", linthresh=1e-6)
            colored.append(ax)
        ax.set_xscale("log")
        ax.set_xticks(Ns, [str(int(n)) for n in Ns])
        ax.xaxis.set_minor_formatter(__import__("matplotlib").ticker.NullFormatter())
        ax.set_xlabel("training-set size N")
        ax.set_title(m.replace("_", " "), fontsize=10)
        ax.grid(alpha=0.3)
    st = res.get("settings", {})
    data = st.get("data") or st.get("source") or "the training set"
    fig.suptitle(f"Training-set size sweep on {data} (nested subsets, N = {', '.join(str(int(n)) for n in Ns)})",
                 fontsize=10)  # fmt: skip
    fig.tight_layout(rect=(0, 0, 0.92 if colored else 1, 0.93))
    if colored:
        from matplotlib.cm import ScalarMappable

        cax = fig.add_axes((0.93, 0.15, 0.012, 0.7))
        fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), cax=cax, label="sigma")
    return _save_figure(fig, path)


__all__ = ["size_sweep", "nested_subsets", "METRICS"]
