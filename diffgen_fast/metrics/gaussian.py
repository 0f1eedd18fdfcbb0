"""How Gaussian (linear) is a denoiser? Linearity score, distance to D_G, linear distillation (docs/science.md 4).

- `linearity_score`: LS(sigma) = mean cos(D(sqrt(a) x1 + sqrt(1-a) x2), sqrt(a) D(x1) + sqrt(1-a) D(x2)) over pairs
  of probes x = y + sigma n (or pure noise sigma n), as Li, Dai, Qu's released code computes it: on raw values, for
  a in linspace(0.99, 0.5, 5), reported per a and averaged. ``center=True`` takes the map about the training mean mu
  (x -> D(mu + x) - D(mu)), so that any affine map (D_G included) scores exactly 1 (a variant, named as such).
- `gaussian_difference`: mean ||D(x) - D_G(x)|| / ||D_G(x)|| per sigma, D_G = GaussianDenoiser(train).
- `linear_distill`: the closed-form ridge regression D(x) ~ W x + b at one sigma from streamed float64 sufficient
  statistics (the paper trains the same linear model by SGD); `LinearDenoiser` evaluates the fitted maps.
- `analyze_gaussian`: all of the above for several denoisers, with ``gaussian.json`` and ``gaussian.png``.

Every denoiser is any callable ``D(x, sigma)`` with x ``[b, *shape]`` (the training items' shape) returning the
x0-prediction of the same size (torch tensor or numpy array). sigma is passed as a 0-d float64 tensor, which EDM
networks, this package's denoisers and plain arithmetic all accept. Probes are drawn with a fixed seed and are the
same for every sigma and every denoiser (common random numbers), so curves of different denoisers compare sharply.
All accumulation is in float64; probes are built in float64 and cast to ``dtype`` (default float64) for the call.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch

from diffgen_fast.data import TrainingSet
from diffgen_fast.errors import InputError, InputTypeError

__all__ = [
    "linearity_score",
    "gaussian_difference",
    "linear_distill",
    "LinearDenoiser",
    "analyze_gaussian",
]

Denoiser = Callable[..., Any]


# -- argument checks shared with gap.py ------------------------------------------------------------------------------


def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InputTypeError(f"{name}: expected an int >= {minimum}, got {value!r}")
    if int(value) < minimum:
        raise InputError(f"{name}: expected an int >= {minimum}, got {value}")
    return int(value)


def _check_float(value: Any, name: str, *, lo: float = -math.inf, hi: float = math.inf, open_lo=True, open_hi=True):
    if isinstance(value, bool):
        raise InputTypeError(f"{name}: expected a real number, got bool")
    try:
        v = float(value)
    except (TypeError, ValueError) as e:
        raise InputTypeError(f"{name}: expected a real number, got {value!r}") from e
    ok = math.isfinite(v) and (v > lo if open_lo else v >= lo) and (v < hi if open_hi else v <= hi)
    if not ok:
        lo_s, hi_s = ("(" if open_lo else "["), (")" if open_hi else "]")
        raise InputError(f"{name}: expected a finite value in {lo_s}{lo:g}, {hi:g}{hi_s}, got {value!r}")
    return v


def _check_sigmas(sigmas: Any, name: str = "sigmas") -> list[float]:
    """A float, a sequence or a 1-D tensor / array of noise levels -> list of finite floats > 0 (at least one)."""
    if isinstance(sigmas, bool):
        raise InputTypeError(f"{name}: expected a float or a 1-D sequence of floats > 0, got bool")
    if isinstance(sigmas, (int, float, np.floating, np.integer)):
        vals = [sigmas]
    elif isinstance(sigmas, torch.Tensor):
        vals = sigmas.detach().double().cpu().reshape(-1).tolist()
    elif isinstance(sigmas, np.ndarray):
        vals = np.asarray(sigmas, dtype=np.float64).reshape(-1).tolist()
    elif isinstance(sigmas, (list, tuple)):
        vals = list(sigmas)
    else:
        raise InputTypeError(f"{name}: expected a float or a 1-D sequence of floats > 0, got {type(sigmas).__name__}")
    if len(vals) == 0:
        raise InputError(f"{name}: expected at least one noise level, got an empty sequence")
    out = []
    for v in vals:
        if isinstance(v, bool):
            raise InputTypeError(f"{name}: expected floats > 0, got bool")
        try:
            f = float(v)
        except (TypeError, ValueError) as e:
            raise InputTypeError(f"{name}: expected floats > 0, got {v!r}") from e
        if not (math.isfinite(f) and f > 0):
            raise InputError(f"{name}: expected finite noise levels > 0, got {v!r}")
        out.append(f)
    return out


def _check_denoiser(denoiser: Any, name: str = "denoiser") -> Denoiser:
    if not callable(denoiser):
        raise InputTypeError(
            f"{name}: expected a callable D(x [b, *shape], sigma) -> x0-prediction, got {type(denoiser).__name__}"
        )
    return denoiser


def _check_denoisers(denoisers: Any, name: str) -> dict[str, Denoiser]:
    if not isinstance(denoisers, Mapping) or len(denoisers) == 0:
        raise InputTypeError(f"{name}: expected a non-empty dict {{name: callable D(x, sigma)}}, got {denoisers!r}")
    out = {}
    for k, v in denoisers.items():
        if not isinstance(k, str) or not k:
            raise InputError(f"{name}: keys must be non-empty strings, got {k!r}")
        out[k] = _check_denoiser(v, f"{name}[{k!r}]")
    return out


def _check_dtype(dtype: Any) -> torch.dtype:
    if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise InputTypeError(
            f"dtype: expected a torch float dtype (float16, bfloat16, float32, float64), got {dtype!r}"
        )
    return dtype


def _coerce_train(train: Any) -> TrainingSet:
    ts = TrainingSet.coerce(train, name="train")
    ts.check_finite()
    return ts


def _probe_device(train: TrainingSet, device: Any) -> torch.device:
    return torch.device(train.device) if device is None else torch.device(device)


# -- probes and calls --------------------------------------------------------------------------------------------------


def _forward_batches(
    train: TrainingSet, n: int, batch: int, seed: int, device: torch.device, k: int = 1
) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Batches of k independent (y [b, d], noise [b, d]) float64 draws: y uniform training rows, noise N(0, I).

    Drawn on the CPU from torch.Generator(seed) (the same probes on every device and for every batch size: all n
    rows and noises of the first draw, then of the second, ...), then moved to ``device``.
    """
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    N, d = len(train), train.d
    draws = []
    for _ in range(k):
        idx = torch.randint(0, N, (n,), generator=gen)
        draws.append((idx, torch.randn(n, d, generator=gen, dtype=torch.float64)))
    for start in range(0, n, batch):
        b = min(batch, n - start)
        out = []
        for idx, noise in draws:
            y = train[idx[start : start + b]].reshape(b, d).to(device=device, dtype=torch.float64)
            out.append((y, noise[start : start + b].to(device)))
        yield out


def _call(denoiser: Denoiser, x: torch.Tensor, sigma: float, shape: tuple, dtype: torch.dtype, name: str):
    """D(x [b, d] float64 reshaped to [b, *shape] in ``dtype``, sigma 0-d tensor) -> [b, d] float64 on x's device."""
    b = x.shape[0]
    xin = x.to(dtype).reshape(b, *shape)
    s = torch.tensor(sigma, dtype=torch.float64, device=x.device)
    with torch.no_grad():
        out = denoiser(xin, s)
    if isinstance(out, np.ndarray):
        out = torch.from_numpy(np.ascontiguousarray(out))
    if not isinstance(out, torch.Tensor):
        raise InputTypeError(f"{name}: expected the call to return a tensor or array, got {type(out).__name__}")
    if out.numel() != x.numel() or out.shape[0] != b:
        raise InputError(
            f"{name}: returned shape {tuple(out.shape)} for an input of shape {tuple(xin.shape)}; "
            "expected the x0-prediction with the input's shape"
        )
    return out.detach().reshape(b, -1).to(device=x.device, dtype=torch.float64)


def _mean_stderr(values: torch.Tensor) -> tuple[float, float]:
    """Mean and standard error (ddof 1) of a [n] float64 tensor, n >= 2."""
    n = values.numel()
    mean = float(values.mean())
    se = float(values.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
    return mean, se


def _cosine(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine of [b, d] float64 tensors; 0 where a row is exactly zero."""
    den = (u.norm(dim=1) * v.norm(dim=1)).clamp(min=1e-300)
    return (u * v).sum(dim=1) / den


# -- linearity -------------------------------------------------------------------------------------------------------


LINEARITY_A = np.linspace(0.99, 0.5, 5).tolist()  # the mixing weights of the authors' code
PROBES = ("data", "noise")


def linearity_definition(center: bool, probes: str) -> str:
    """One line naming the linearity score computed."""
    x = "x = y + sigma n" if probes == "data" else "x = sigma n (pure noise)"
    how = (
        "about the training mean mu (D(x) -> D(mu + x) - D(mu), x -> x - mu; a variant: affine maps score 1)"
        if center
        else "on raw values, as Li, Dai, Qu's code (an affine map with an offset scores below 1)"
    )
    return f"mean cos(D(sqrt(a) x1 + sqrt(1-a) x2), sqrt(a) D(x1) + sqrt(1-a) D(x2)), {x}, {how}; averaged over a"


def _check_a(a: Any) -> list[float]:
    if a is None:
        return list(LINEARITY_A)
    vals = [a] if isinstance(a, (int, float)) and not isinstance(a, bool) else a
    if isinstance(vals, torch.Tensor):
        vals = vals.tolist()
    try:
        vals = list(vals)
    except TypeError as e:
        raise InputTypeError(f"a: expected a number in (0, 1) or a sequence of them, got {a!r}") from e
    if not vals:
        raise InputError("a: expected at least one mixing weight")
    return [_check_float(v, "a", lo=0.0, hi=1.0) for v in vals]


def linearity_score(
    denoiser: Denoiser,
    train,
    sigmas,
    *,
    n_pairs: int = 256,
    a=None,
    seed: int = 0,
    batch: int = 256,
    center: bool = False,
    probes: str = "data",
    dtype: torch.dtype = torch.float64,
    device=None,
) -> dict:
    """Linearity score of a denoiser per noise level (docs/science.md 4.2; Li, Dai, Qu 2024), as their code computes it.

    For each sigma, pairs of probes x1 = y_i + sigma n1, x2 = y_j + sigma n2 (i, j uniform training rows,
    n ~ N(0, I), the same draws for every sigma; ``probes="noise"``: x = sigma n) give, for each mixing weight a,

        LS_a(sigma) = mean_pairs cos( D~(sqrt(a) x1~ + sqrt(1-a) x2~),  sqrt(a) D~(x1~) + sqrt(1-a) D~(x2~) )

    with the cosine over flattened vectors, and LS(sigma) = the mean of LS_a over the weights (the same probe pairs
    for every a; the standard error is over pairs of the per-pair average). With ``center=False`` (default) D~ = D
    and x~ = x: raw values, as the authors' code, where an affine map D(x) = A x + b scores below 1 unless b = 0.
    With ``center=True``, D~(v) = D(mu + v) - D(mu) and x~ = x - mu (mu the training mean): linearity about the data
    mean, for which any affine map (D_G included) scores exactly 1 -- a variant. (D_G(mu) = mu, so for D_G this is
    the same as subtracting mu.)

    Args:
        denoiser: callable D(x [b, *shape], sigma) -> [b, *shape] x0-prediction (see the module docstring).
        train: TrainingSet, or anything TrainingSet.coerce accepts ([N, *shape] tensor / array, a path).
        sigmas: a noise level or a 1-D sequence / tensor of them, each finite > 0.
        n_pairs: number of probe pairs per sigma (>= 2, for the standard error).
        a: mixing weight(s) in (0, 1): a number or a sequence. Default: linspace(0.99, 0.5, 5), as the authors.
        seed: seed of the probes.
        batch: pairs per denoiser call (2 + len(a) calls of ``batch`` items per batch of pairs).
        center: measure linearity about the training mean (True) or on raw values (False, default).
        probes: "data" (x = y + sigma n, default) or "noise" (x = sigma n).
        dtype: dtype the probes are passed in (float64 default; float32 for networks that need it).
        device: device of the probes (default: the training set's).

    Returns:
        {"sigma": [S] floats, "linearity": [S] means over a, "stderr": [S], "a": [A] weights, "linearity_per_a":
        [A][S], "stderr_per_a": [A][S], "n_pairs": n, "center": center, "probes": probes, "definition": str}.
    """
    denoiser = _check_denoiser(denoiser)
    ts = _coerce_train(train)
    sig = _check_sigmas(sigmas)
    n_pairs = _check_int(n_pairs, "n_pairs", 2)
    batch = _check_int(batch, "batch", 1)
    seed = _check_int(seed, "seed", 0)
    weights = _check_a(a)
    if probes not in PROBES:
        raise InputError(f"probes: expected one of {', '.join(PROBES)}, got {probes!r}")
    dtype = _check_dtype(dtype)
    dev = _probe_device(ts, device)
    shape = tuple(ts.shape)
    mu = ts.mean(dtype=torch.float64).reshape(1, -1).to(dev) if center else None
    lin, err = [], []
    per_a = [[] for _ in weights]
    per_a_err = [[] for _ in weights]
    for s in sig:
        cos = [[] for _ in weights]
        dmu = _call(denoiser, mu, s, shape, dtype, "denoiser") if mu is not None else None
        for (y1, n1), (y2, n2) in _forward_batches(ts, n_pairs, batch, seed, dev, k=2):
            x1, x2 = (y1 + s * n1, y2 + s * n2) if probes == "data" else (s * n1, s * n2)
            d1 = _call(denoiser, x1, s, shape, dtype, "denoiser")
            d2 = _call(denoiser, x2, s, shape, dtype, "denoiser")
            for j, w in enumerate(weights):
                ca, cb = math.sqrt(w), math.sqrt(1.0 - w)
                if mu is None:
                    dm = _call(denoiser, ca * x1 + cb * x2, s, shape, dtype, "denoiser")
                    u, v = dm, ca * d1 + cb * d2
                else:
                    dm = _call(denoiser, mu + ca * (x1 - mu) + cb * (x2 - mu), s, shape, dtype, "denoiser")
                    u, v = dm - dmu, ca * (d1 - dmu) + cb * (d2 - dmu)
                cos[j].append(_cosine(u, v))
        per_pair = torch.stack([torch.cat(c) for c in cos])  # [A, n_pairs]
        for j in range(len(weights)):
            m, se = _mean_stderr(per_pair[j])
            per_a[j].append(m)
            per_a_err[j].append(se)
        m, se = _mean_stderr(per_pair.mean(dim=0))
        lin.append(m)
        err.append(se)
    return {
        "sigma": sig,
        "linearity": lin,
        "stderr": err,
        "a": weights,
        "linearity_per_a": per_a,
        "stderr_per_a": per_a_err,
        "n_pairs": n_pairs,
        "center": bool(center),
        "probes": probes,
        "definition": linearity_definition(bool(center), probes),
    }


# -- distance to the Gaussian denoiser ---------------------------------------------------------------------------------


def gaussian_difference(
    denoiser: Denoiser,
    train,
    sigmas,
    *,
    n: int = 256,
    seed: int = 0,
    gaussian: Optional[Denoiser] = None,
    batch: int = 256,
    dtype: torch.dtype = torch.float64,
    device=None,
) -> dict:
    """Normalised difference to D_G, mean ||D(x) - D_G(x)|| / ||D_G(x)|| per sigma (docs/science.md 4.3).

    x = y + sigma n over ``n`` forward samples (y uniform training rows, the same draws for every sigma); norms over
    the flattened vectors (L2, not squared).

    Args:
        denoiser: callable D(x [b, *shape], sigma) -> [b, *shape].
        train: TrainingSet or anything TrainingSet.coerce accepts.
        sigmas: a noise level or a 1-D sequence / tensor of them, each finite > 0.
        n: forward samples per sigma (>= 2).
        seed: seed of the samples.
        gaussian: the reference D_G (any callable); default GaussianDenoiser(train).
        batch: samples per denoiser call.
        dtype, device: dtype the samples are passed in (default float64) and their device (default the set's).

    Returns:
        {"sigma": [S], "difference": [S] means, "stderr": [S] standard errors, "n": n}.
    """
    from diffgen_fast.denoisers import GaussianDenoiser

    denoiser = _check_denoiser(denoiser)
    ts = _coerce_train(train)
    sig = _check_sigmas(sigmas)
    n = _check_int(n, "n", 2)
    batch = _check_int(batch, "batch", 1)
    seed = _check_int(seed, "seed", 0)
    dtype = _check_dtype(dtype)
    dev = _probe_device(ts, device)
    ref = GaussianDenoiser(ts) if gaussian is None else _check_denoiser(gaussian, "gaussian")
    shape = tuple(ts.shape)
    diff, err = [], []
    for s in sig:
        vals = []
        for ((y, z),) in _forward_batches(ts, n, batch, seed, dev):
            x = y + s * z
            dx = _call(denoiser, x, s, shape, dtype, "denoiser")
            dg = _call(ref, x, s, shape, dtype, "gaussian")
            vals.append((dx - dg).norm(dim=1) / dg.norm(dim=1).clamp(min=1e-300))
        m, se = _mean_stderr(torch.cat(vals))
        diff.append(m)
        err.append(se)
    return {"sigma": sig, "difference": diff, "stderr": err, "n": n}


# -- linear distillation -----------------------------------------------------------------------------------------------


def linear_distill(
    denoiser: Denoiser,
    train,
    sigma: float,
    *,
    n: int = 4096,
    ridge: float = 1e-6,
    seed: int = 0,
    batch: int = 512,
    dtype: torch.dtype = torch.float64,
    device=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form ridge regression D(x) ~ W x + b at one noise level (the linear distillation of docs/science.md 4.4).

    Over ``n`` forward samples x = y + sigma n (y uniform training rows) the float64 sufficient statistics
    sum x, sum D, sum x x^T, sum D x^T are accumulated batch by batch (about the training mean, against
    cancellation), then

        C_xx = cov(x),  C_Dx = cov(D(x), x),  W = C_Dx (C_xx + ridge * tr(C_xx) / d * I)^(-1),  b = E D - W E x.

    For an exactly affine D (e.g. GaussianDenoiser) the fit is exact up to the ridge term (relative error about
    ridge * tr(C_xx) / (d * lambda_min(C_xx))). Memory: a few [d, d] float64 matrices.

    Args:
        denoiser: callable D(x [b, *shape], sigma) -> [b, *shape].
        train: TrainingSet or anything TrainingSet.coerce accepts.
        sigma: the noise level, finite > 0.
        n: number of forward samples (>= 2; n >> d for a well-determined fit).
        ridge: relative ridge strength >= 0 (0: plain least squares, pseudo-inverse if C_xx is singular).
        seed: seed of the samples.
        batch: samples per denoiser call.
        dtype, device: dtype the samples are passed in (default float64) and their device (default the set's).

    Returns:
        (W [d, d] float64, b [d] float64) on the probes' device, for flattened items: D(x).flatten() ~ W x + b.
    """
    denoiser = _check_denoiser(denoiser)
    ts = _coerce_train(train)
    s = _check_float(sigma, "sigma", lo=0.0)
    n = _check_int(n, "n", 2)
    batch = _check_int(batch, "batch", 1)
    seed = _check_int(seed, "seed", 0)
    ridge = _check_float(ridge, "ridge", lo=0.0, open_lo=False)
    dtype = _check_dtype(dtype)
    dev = _probe_device(ts, device)
    shape, d = tuple(ts.shape), ts.d
    mu = ts.mean(dtype=torch.float64).reshape(1, -1).to(dev)
    f64 = dict(dtype=torch.float64, device=dev)
    sx, sd = torch.zeros(d, **f64), torch.zeros(d, **f64)
    sxx, sdx = torch.zeros(d, d, **f64), torch.zeros(d, d, **f64)
    for ((y, z),) in _forward_batches(ts, n, batch, seed, dev):
        x = y + s * z
        dx = _call(denoiser, x, s, shape, dtype, "denoiser") - mu
        xc = x - mu
        sx += xc.sum(dim=0)
        sd += dx.sum(dim=0)
        sxx += xc.T @ xc
        sdx += dx.T @ xc
    mx, md = sx / n, sd / n
    cxx = sxx / n - torch.outer(mx, mx)
    cdx = sdx / n - torch.outer(md, mx)
    cxx = 0.5 * (cxx + cxx.T)
    A = cxx + (ridge * float(torch.trace(cxx)) / d) * torch.eye(d, **f64)
    try:
        if ridge == 0.0:
            raise RuntimeError("plain least squares: use the pseudo-inverse")
        W = torch.linalg.solve(A, cdx.T).T  # A symmetric: W A = C_Dx
    except RuntimeError:
        W = cdx @ torch.linalg.pinv(A, hermitian=True)
    # back from the centred coordinates: D - mu ~ W (x - mu) + (md - W mx)
    b = mu.reshape(-1) + md - W @ mx - W @ mu.reshape(-1)
    return W, b


class LinearDenoiser(torch.nn.Module):
    """Evaluates linear denoisers D(x; sigma) = W(sigma) x + b(sigma) (e.g. fitted by `linear_distill`).

    Args:
        maps: {sigma: (W [d, d], b [d])}, evaluated at the key nearest in log sigma, or a callable
            sigma (float) -> (W, b).
        shape: item shape of x (default (d,)); any x of d values per item is accepted.
    forward(x [M, *shape], sigma, class_labels=None, *, alpha=1.0) -> [M, *shape] in x's dtype; sigma a float or a
    tensor whose values are all equal (one map per call). VE only (alpha must be 1).
    """

    def __init__(self, maps: Union[Mapping, Callable], shape: Optional[tuple] = None):
        super().__init__()
        if isinstance(maps, Mapping):
            if len(maps) == 0:
                raise InputError("maps: expected a non-empty {sigma: (W, b)} dict")
            self._table = {}
            for k, wb in maps.items():
                key = _check_float(k, "maps key (sigma)", lo=0.0)
                self._table[key] = self._check_wb(wb, f"maps[{k!r}]")
            self._fn = None
            d = next(iter(self._table.values()))[0].shape[0]
        elif callable(maps):
            self._table, self._fn, d = None, maps, None
        else:
            raise InputTypeError(f"maps: expected a {{sigma: (W, b)}} dict or a callable, got {type(maps).__name__}")
        self.shape = tuple(shape) if shape is not None else ((d,) if d is not None else None)

    @staticmethod
    def _check_wb(wb: Any, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(wb, (tuple, list)) or len(wb) != 2:
            raise InputError(f"{name}: expected a pair (W [d, d], b [d])")
        W = torch.as_tensor(wb[0]).to(torch.float64)
        b = torch.as_tensor(wb[1]).to(torch.float64).reshape(-1)
        if W.ndim != 2 or W.shape[0] != W.shape[1] or b.numel() != W.shape[0]:
            raise InputError(f"{name}: expected W [d, d] and b [d], got {tuple(W.shape)} and {tuple(b.shape)}")
        return W, b

    @classmethod
    def distill(cls, denoiser: Denoiser, train, sigmas, **kwargs) -> LinearDenoiser:
        """A LinearDenoiser of `linear_distill(denoiser, train, sigma, **kwargs)` at each of ``sigmas``."""
        ts = _coerce_train(train)
        maps = {s: linear_distill(denoiser, ts, s, **kwargs) for s in _check_sigmas(sigmas)}
        return cls(maps, shape=tuple(ts.shape))

    def maps_at(self, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(W, b) used at ``sigma``."""
        if self._fn is not None:
            return self._check_wb(self._fn(sigma), "maps(sigma)")
        keys = list(self._table)
        k = min(keys, key=lambda t: abs(math.log(t) - math.log(sigma)))
        return self._table[k]

    def forward(self, x, sigma, class_labels=None, *, alpha=1.0):
        xt = torch.as_tensor(x)
        if xt.ndim < 2 or not xt.is_floating_point():
            raise InputError(f"x: expected a float batch [M, d] or [M, *shape], got {tuple(xt.shape)} {xt.dtype}")
        st = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1)
        if st.numel() == 0 or not bool((st == st[0]).all()):
            raise InputError("sigma: LinearDenoiser evaluates one noise level per call; got differing values")
        s = _check_float(st[0], "sigma", lo=0.0)
        if float(torch.as_tensor(alpha, dtype=torch.float64).reshape(-1)[0]) != 1.0:
            raise InputError("alpha: LinearDenoiser is fitted in VE coordinates; expected alpha = 1")
        W, b = self.maps_at(s)
        M = xt.shape[0]
        x64 = xt.reshape(M, -1).to(torch.float64)
        if x64.shape[1] != W.shape[0]:
            raise InputError(f"x: items of {x64.shape[1]} values do not match W of shape {tuple(W.shape)}")
        W, b = W.to(x64.device), b.to(x64.device)
        out = x64 @ W.T + b[None, :]
        return out.to(xt.dtype).reshape(xt.shape)


# -- analysis with files -----------------------------------------------------------------------------------------------


def _default_sigmas() -> list[float]:
    from diffgen_fast.schedules import edm_sigmas

    return edm_sigmas(12, append_zero=False).tolist()


def analyze_gaussian(
    denoisers: Mapping[str, Denoiser],
    train,
    *,
    sigmas=None,
    n_pairs: int = 256,
    n: Optional[int] = None,
    seed: int = 0,
    gaussian: Optional[Denoiser] = None,
    center: bool = False,
    probes: str = "data",
    a=None,
    batch: int = 256,
    out_dir=None,
) -> dict:
    """Linearity score and normalised difference to D_G for several denoisers, with a JSON and a figure.

    Args:
        denoisers: {name: callable D(x, sigma)}.
        train: TrainingSet or anything TrainingSet.coerce accepts.
        sigmas: noise levels (default: the 12-step EDM grid from 80 to 0.002, without the final 0).
        n_pairs: probe pairs per sigma for the linearity score.
        n: forward samples per sigma for the difference (default n_pairs).
        seed: seed of the probes (shared by all denoisers).
        gaussian: reference D_G (default GaussianDenoiser(train)).
        center, probes, a: passed to linearity_score (defaults: raw values, data probes, a over
            linspace(0.99, 0.5, 5), as the authors' code).
        batch: items per denoiser call.
        out_dir: if given, ``gaussian.json`` and ``gaussian.png`` (linearity and difference vs sigma, log x-axis)
            are written there atomically.

    Returns:
        {"metric": "gaussian", "sigma": [S], "denoisers": {name: {"linearity" (mean over a), "linearity_stderr",
        "linearity_per_a" [A][S], "linearity_stderr_per_a", "difference", "difference_stderr"}}, "settings": {...,
        "a": [A], "center", "probes", "linearity": the definition}, "files": {"json", "png"} (only with out_dir)}.
    """
    from diffgen_fast.denoisers import GaussianDenoiser

    dens = _check_denoisers(denoisers, "denoisers")
    ts = _coerce_train(train)
    sig = _default_sigmas() if sigmas is None else _check_sigmas(sigmas)
    n_pairs = _check_int(n_pairs, "n_pairs", 2)
    n = n_pairs if n is None else _check_int(n, "n", 2)
    ref = GaussianDenoiser(ts) if gaussian is None else _check_denoiser(gaussian, "gaussian")
    weights = _check_a(a)
    if probes not in PROBES:
        raise InputError(f"probes: expected one of {', '.join(PROBES)}, got {probes!r}")
    out: dict = {
        "metric": "gaussian",
        "sigma": sig,
        "denoisers": {},
        "settings": {
            "n_pairs": n_pairs,
            "n": n,
            "a": weights,
            "seed": seed,
            "center": bool(center),
            "probes": probes,
            "n_train": len(ts),
            "data": ts.source,
            "d": ts.d,
            "linearity": linearity_definition(bool(center), probes),
            "difference": "mean ||D(x) - D_G(x)|| / ||D_G(x)||, x = y + sigma n",
        },
    }
    for name, D in dens.items():
        lin = linearity_score(
            D, ts, sig, n_pairs=n_pairs, seed=seed, batch=batch, center=center, probes=probes, a=weights
        )
        dif = gaussian_difference(D, ts, sig, n=n, seed=seed, gaussian=ref, batch=batch)
        out["denoisers"][name] = {
            "linearity": lin["linearity"],
            "linearity_stderr": lin["stderr"],
            "linearity_per_a": lin["linearity_per_a"],
            "linearity_stderr_per_a": lin["stderr_per_a"],
            "difference": dif["difference"],
            "difference_stderr": dif["stderr"],
        }
    if out_dir is not None:
        from diffgen_fast._atomic import write_json_atomic

        d = Path(out_dir)
        d.mkdir(parents=True, exist_ok=True)
        json_path = write_json_atomic(out, d / "gaussian.json")
        png_path = _plot_gaussian(out, d / "gaussian.png")
        out["files"] = {"json": str(json_path), "png": str(png_path)}
    return out


def _band(ax, x, mean, se, label, color, *, positive: bool = False):
    m = np.asarray(mean, dtype=np.float64)
    e = np.nan_to_num(np.asarray(se, dtype=np.float64), nan=0.0)
    lo, hi = m - 1.96 * e, m + 1.96 * e
    if positive:
        m = np.where(m > 0, m, np.nan)
        lo = np.where(lo > 0, lo, np.where(np.isfinite(m), m, np.nan))
        hi = np.where(hi > 0, hi, np.nan)
    ax.plot(x, m, marker="o", ms=3, lw=1.4, color=color, label=label)
    ax.fill_between(x, lo, hi, color=color, alpha=0.2, lw=0)
    return bool(np.isfinite(m).any())


_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]


def _plot_gaussian(result: dict, path: Path) -> Path:
    from diffgen_fast.figures import _new_figure, _save_figure

    fig = _new_figure(11.0, 4.2)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    x = np.asarray(result["sigma"], dtype=np.float64)
    any_pos = False
    for k, (name, r) in enumerate(result["denoisers"].items()):
        c = _COLORS[k % len(_COLORS)]
        _band(ax1, x, r["linearity"], r["linearity_stderr"], name, c)
        any_pos |= _band(ax2, x, r["difference"], r["difference_stderr"], name, c, positive=True)
    for ax in (ax1, ax2):
        ax.set_xscale("log")
        ax.set_xlabel("sigma")
        ax.grid(True, which="both", alpha=0.3)
    if any_pos:
        ax2.set_yscale("log")
    ax1.set_ylabel("linearity score (cosine)")
    st = result.get("settings", {})
    how = "about the training mean" if st.get("center") else "raw values"
    ax1.set_title(f"Linearity score (1 = linear; mean over a, {how})", fontsize=10)
    ax2.set_ylabel("||D - D_G|| / ||D_G||")
    ax2.set_title("Normalised difference to the Gaussian denoiser", fontsize=10)
    ax1.legend(fontsize=8)
    fig.tight_layout()
    st = result.get("settings", {})
    return _save_figure(fig, path, data=f"{st.get('data')} (N={st.get('n_train')}, d={st.get('d')})")
