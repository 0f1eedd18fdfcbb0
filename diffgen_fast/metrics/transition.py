"""The memorization -> generalization transition of a trained denoiser as N grows (docs/science.md 4, 5, 7).

For each N in Ns (nested subsets: the first N points of one fixed random permutation of the training set) an
EDM-preconditioned network (``arch="mlp"``: EDMPrecondMLP; ``arch="unet"``: the small convolutional EDMPrecondUNet)
is trained on the subset with EDM's loss, n_samples are drawn with EDM's deterministic Heun sampler, and these are
measured:

- memorized fraction: the nearest-neighbour ratio test ||x - NN1|| / ||x - NN2|| < 1/3 of the samples against the
  SUBSET the network saw (docs/science.md 5.1);
- gap to D*: E ||D_model(x) - D*(x)||^2 / d over forward samples x = y + sigma n, y uniform from the subset, D* the
  empirical optimal denoiser of the subset, per sigma (docs/science.md 7a);
- distance to D_G: mean ||D_model(x) - D_G(x)|| / ||D_G(x)|| over the same forward samples, D_G the Gaussian
  denoiser of the subset's mean and covariance (docs/science.md 4.3); the same distance of D* itself is reported
  beside it as the reference a memorizing network would sit at;
- linearity score of the network per sigma (Li, Dai, Qu 2024; docs/science.md 4.2), by metrics.gaussian.linearity_score
  with explicit arguments: ``linearity`` on raw values averaged over the authors' mixing weights
  a in linspace(0.99, 0.5, 5), and ``linearity_centered`` (about the subset's mean, where an affine map scores 1),
  averaged over the same a;
- strong generalization (Kadkhodaie et al. 2024; Li et al.'s central claim that networks converge to one function):
  a second network, with its own initialisation and batches, is trained on a DISJOINT subset of the same size N
  (points N' = n/2 .. n/2 + N - 1 of the permutation; the first network's subset lies in the first half), for every
  N <= n/2. Both are sampled from the same initial noise with the same sampler. Reported per N: the mean cosine
  similarity (about the full data set's mean) and the mean L2 distance between paired samples, and the same two
  between each sample and its nearest training image in its own network's subset (mean over both networks). At
  large N the pairs agree with each other more than with their training data.

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
# EDMPrecondUNet(channels 32, 1 block per stage): ~0.1 s per step of batch 128 on 2 busy CPU cores
_UNET_DEFAULTS = {"steps": 2000, "channels": 32, "blocks": 1, "lr": 2e-3, "n_samples": 64, "sample_steps": 18}
_UNET_QUICK = {"steps": 400, "channels": 16, "blocks": 1, "lr": 3e-3, "n_samples": 32, "sample_steps": 18}
ARCHS = ("mlp", "unet")
LINEARITY_A = (0.99, 0.8675, 0.745, 0.6225, 0.5)  # linspace(0.99, 0.5, 5), the authors' mixing weights


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


def _linearity(model, sub, sigmas, n_pairs: int, seed: int) -> dict:
    """Linearity score per sigma, raw (the authors' protocol) and centred, each averaged over LINEARITY_A."""
    from diffgen_fast.metrics.gaussian import linearity_score

    out = {}
    for key, center in (("linearity", False), ("linearity_centered", True)):
        per_a = [
            linearity_score(model, sub, sigmas, n_pairs=n_pairs, a=a, seed=seed, batch=n_pairs, center=center,
                            dtype=torch.float32, device=None)["linearity"]  # fmt: skip
            for a in LINEARITY_A
        ]
        out[key] = [float(sum(v[j] for v in per_a) / len(per_a)) for j in range(len(sigmas))]
    return out


def _cos_l2(a: torch.Tensor, b: torch.Tensor, center: torch.Tensor) -> tuple:
    a, b = a.double() - center, b.double() - center
    cos = torch.nn.functional.cosine_similarity(a, b, dim=1)
    return float(cos.mean()), float((a - b).norm(dim=1).mean())


def _strong_metrics(xa, xb, sub_a, sub_b, center) -> dict:
    """Paired samples of two networks (same initial noise) against each other and against their own training data."""
    M = xa.shape[0]
    fa, fb = xa.reshape(M, -1).double(), xb.reshape(M, -1).double()
    pair_cos, pair_l2 = _cos_l2(fa, fb, center)
    nn_cos, nn_l2 = [], []
    for f, sub in ((fa, sub_a), (fb, sub_b)):
        tr = sub.flat().double().to(f.device)
        nn = tr[torch.cdist(f, tr).argmin(dim=1)]
        c, l2 = _cos_l2(f, nn, center)
        nn_cos.append(c)
        nn_l2.append(l2)
    return {
        "pair_cos": pair_cos,
        "pair_l2": pair_l2,
        "nn_cos": sum(nn_cos) / 2,
        "nn_l2": sum(nn_l2) / 2,
    }


def _make_model(arch: str, shape, cfg: dict, seed: int):
    from diffgen_fast.models import EDMPrecondMLP, EDMPrecondUNet

    if arch == "unet":
        return EDMPrecondUNet(shape, channels=cfg["channels"], blocks=cfg["blocks"], seed=seed)
    return EDMPrecondMLP(shape, hidden=cfg["hidden"], depth=cfg["depth"], seed=seed)


def transition(
    train,
    Ns: Optional[Sequence[int]] = None,
    *,
    steps: Optional[int] = None,
    hidden: Optional[int] = None,
    depth: Optional[int] = None,
    lr: Optional[float] = None,
    batch: Optional[int] = None,
    arch: str = "mlp",
    channels: Optional[int] = None,
    blocks: Optional[int] = None,
    strong: bool = True,
    n_pairs: Optional[int] = None,
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
        steps, hidden, depth, lr, batch: training by train_denoiser (batch default 256 for the MLP, 128 for the
            UNet); hidden, depth: EDMPrecondMLP's width and depth.
        arch: "mlp" (EDMPrecondMLP) or "unet" (EDMPrecondUNet(channels, blocks); items must be (C, H, W) with even
            H, W; defaults 2000 steps, 32 channels, 1 block; quick: 400 steps, 16 channels, 32 samples).
        strong: also train the second network per N <= n/2 on the disjoint subset (strong generalization).
        n_pairs: probe pairs per sigma and mixing weight of the linearity score (default 128; quick 64).
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
        "dstar_dist_to_dg" [N][sigma], "linearity" [N][sigma], "linearity_centered" [N][sigma], "final_loss",
        "seconds"), "strong" ({"Ns", "pair_cos", "pair_l2", "nn_cos", "nn_l2", "memorized_fraction_b"}, lists over
        the N <= n/2; empty lists when strong=False), "wall_seconds" and "files".
    """
    from diffgen_fast.data import TrainingSet
    from diffgen_fast.denoisers import EmpiricalDenoiser, GaussianDenoiser
    from diffgen_fast.metrics.memorization import memorization
    from diffgen_fast.models import train_denoiser
    from diffgen_fast.sampling import sample

    t0 = time.perf_counter()
    ts = TrainingSet.coerce(train, name="train")
    if len(ts) < 2:
        raise InputError(f"train: expected at least 2 points, got {len(ts)}")
    if arch not in ARCHS:
        raise InputError(f"arch: expected one of {ARCHS}, got {arch!r}")
    if arch == "unet":
        shp = tuple(ts.shape)
        if len(shp) != 3 or shp[1] % 2 or shp[2] % 2:
            raise InputError(f"arch 'unet' needs image items (C, H, W) with even H and W, got item shape {shp}")
        base = dict(_UNET_QUICK if quick else _UNET_DEFAULTS)
        given = {"steps": steps, "channels": channels, "blocks": blocks, "lr": lr, "n_samples": n_samples}
        int_keys = ("steps", "channels", "blocks", "n_samples", "sample_steps")
    else:
        base = dict(_QUICK if quick else _DEFAULTS)
        given = {"steps": steps, "hidden": hidden, "depth": depth, "lr": lr, "n_samples": n_samples}
        int_keys = ("steps", "hidden", "depth", "n_samples", "sample_steps")
    given["sample_steps"] = sample_steps
    cfg = {k: (v if v is not None else base[k]) for k, v in given.items()}
    batch = (128 if arch == "unet" else 256) if batch is None else batch
    n_pairs = (64 if quick else 128) if n_pairs is None else n_pairs
    if not _is_int(batch) or batch < 1:
        raise InputError(f"batch: expected an int >= 1, got {batch!r}")
    if not _is_int(n_pairs) or n_pairs < 2:
        raise InputError(f"n_pairs: expected an int >= 2, got {n_pairs!r}")
    for k in int_keys:
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
    half = len(ts) // 2
    center = ts.mean(dtype=torch.float64).reshape(1, -1)
    strong_rows = []
    rows = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(ns), desc="transition", unit="N")
    for N in ns:
        t1 = time.perf_counter()
        sub = ts.subset(perm[:N])
        model = _make_model(arch, ts.shape, cfg, seed).to(ts.device)
        losses = train_denoiser(model, sub, steps=cfg["steps"], batch=batch, lr=cfg["lr"], seed=seed, progress=progress)
        with torch.no_grad():
            x = sample(model, cfg["n_samples"], steps=cfg["sample_steps"], sampler="heun", seed=seed + 1)
        mem = memorization(x, sub)
        summ = mem.summary()
        dm = _denoiser_metrics(model, EmpiricalDenoiser(sub), GaussianDenoiser(sub), sub, sigmas, n_probe, seed + 2)
        dm.update(_linearity(model, sub, sigmas, n_pairs, seed + 3))
        if strong and N <= half:
            # the twin: disjoint data (the second half of the permutation), its own init and batches, same sampler
            # and the same initial noise (sampling seed) as the first network
            sub_b = ts.subset(perm[half : half + N])
            model_b = _make_model(arch, ts.shape, cfg, seed + 1000).to(ts.device)
            train_denoiser(model_b, sub_b, steps=cfg["steps"], batch=batch, lr=cfg["lr"], seed=seed + 1000,
                           progress=progress)  # fmt: skip
            with torch.no_grad():
                xb = sample(model_b, cfg["n_samples"], steps=cfg["sample_steps"], sampler="heun", seed=seed + 1)
            sm = _strong_metrics(x, xb, sub, sub_b, center.to(x.device))
            sm["memorized_fraction_b"] = memorization(xb, sub_b).fraction
            strong_rows.append({"N": N, **sm})
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
        "description": (
            f"memorization -> generalization of {'EDMPrecondUNet' if arch == 'unet' else 'EDMPrecondMLP'} "
            "trained on nested subsets of size N"
        ),
        "source": getattr(ts, "source", None),
        "n_train_total": len(ts),
        "d": ts.d,
        "shape": list(ts.shape),
        "Ns": ns,
        "sigmas": sigmas,
        "settings": {
            **cfg,
            "arch": arch,
            "batch": batch,
            "n_pairs": n_pairs,
            "linearity_a": list(LINEARITY_A),
            "strong": bool(strong),
            "strong_twin_subset": "points n/2 .. n/2 + N - 1 of the permutation (disjoint from the first network's)",
            "strong_twin_seed": seed + 1000,
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
            "linearity": "metrics.gaussian.linearity_score(center=False) (raw values, Li et al.'s code), mean over "
            "a in linspace(0.99, 0.5, 5), n_pairs probe pairs x = y + sigma n",
            "linearity_centered": "the same with center=True (about the subset's mean)",
            "strong.pair_cos": "mean cosine (about the full data mean) between the two networks' samples from the "
            "same initial noise",
            "strong.pair_l2": "mean L2 distance between the paired samples",
            "strong.nn_cos": "mean cosine between a sample and its nearest training image in its own network's "
            "subset (mean over both networks)",
            "strong.nn_l2": "mean L2 distance between a sample and that nearest training image",
            "strong.memorized_fraction_b": "memorized fraction of the twin network's samples against its subset",
        },
        "per_N": rows,
    }
    for key in (
        "memorized_fraction",
        "ratio_median",
        "gap_to_dstar",
        "dist_to_dg",
        "dstar_dist_to_dg",
        "linearity",
        "linearity_centered",
        "final_loss",
        "seconds",
    ):
        result[key] = [r[key] for r in rows]
    result["strong"] = {"Ns": [r["N"] for r in strong_rows]}
    for key in ("pair_cos", "pair_l2", "nn_cos", "nn_l2", "memorized_fraction_b"):
        result["strong"][key] = [r[key] for r in strong_rows]
    result["gap_to_dstar_mean"] = [sum(r["gap_to_dstar"]) / len(sigmas) for r in rows]
    result["dist_to_dg_mean"] = [sum(r["dist_to_dg"]) / len(sigmas) for r in rows]
    result["wall_seconds"] = time.perf_counter() - t0
    result["files"] = []
    if out_path is not None:
        from diffgen_fast._atomic import write_json_atomic

        png = transition_figure(result, out_path / "transition.png")
        result["files"] = [str(out_path / "transition.json"), str(png)]
        write_json_atomic(result, out_path / "transition.json")
    return result


def transition_figure(result: dict, path) -> Path:
    """Panels vs N (log x): memorized fraction, gap to D* per sigma, distance to D_G per sigma; second row (when the
    result has them): the network's linearity score against sigma per N, and strong generalization (paired samples of
    the two networks on disjoint data vs each sample's nearest own training image: cosine and L2)."""
    from diffgen_fast.figures import _new_figure, _save_figure

    ns = result["Ns"]
    sigmas = result["sigmas"]
    second = "linearity" in result
    rows = 2 if second else 1
    fig = _new_figure(14.0, 4.0 * rows)
    ax = fig.add_subplot(rows, 3, 1)
    ax.plot(ns, result["memorized_fraction"], "o-", color="#c0392b")
    ax.set_xscale("log")
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("training-set size N")
    ax.set_ylabel("memorized fraction (ratio < 1/3)")
    ax.set_title("Memorized samples", fontsize=10)
    ax.grid(alpha=0.3)
    colors = ["#1b4f72", "#2471a3", "#27ae60", "#d68910", "#8e44ad", "#566573", "#c0392b", "#17202a"]
    ax = fig.add_subplot(rows, 3, 2)
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
    ax = fig.add_subplot(rows, 3, 3)
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
    if second:
        ax = fig.add_subplot(rows, 3, 4)
        for i, N in enumerate(ns):
            c = colors[i % len(colors)]
            ax.plot(sigmas, result["linearity"][i], "o-", color=c, ms=4, label=f"N={N}")
            ax.plot(sigmas, result["linearity_centered"][i], ":", color=c, lw=1)
        ax.set_xscale("log")
        ax.set_xlabel("sigma")
        ax.set_ylabel("linearity score")
        ax.set_title("Network linearity (solid: raw, dotted: centred)", fontsize=10)
        ax.legend(fontsize=7, frameon=False)
        ax.grid(alpha=0.3)
        st = result.get("strong") or {}
        if st.get("Ns"):
            for k, (key_p, key_n, label) in enumerate(
                (("pair_cos", "nn_cos", "cosine similarity"), ("pair_l2", "nn_l2", "L2 distance"))
            ):
                ax = fig.add_subplot(rows, 3, 5 + k)
                ax.plot(st["Ns"], st[key_p], "o-", color="#1b4f72", label="twin networks' paired samples")
                ax.plot(st["Ns"], st[key_n], "s--", color="#c0392b", label="sample vs nearest own training image")
                ax.set_xscale("log")
                ax.set_xticks(st["Ns"], [str(int(n)) for n in st["Ns"]])
                ax.xaxis.set_minor_formatter(__import__("matplotlib").ticker.NullFormatter())
                ax.set_xlabel("training-set size N (each network)")
                ax.set_ylabel(label)
                ax.set_title(f"Strong generalization: {label}", fontsize=10)
                ax.legend(fontsize=7, frameon=False)
                ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save_figure(fig, path, data=f"{result.get('source')} (N up to {result.get('n_train_total')})")
