"""Samplers for any denoiser D(x, sigma) -> x0-prediction: EDM Heun / Euler (deterministic or with churn), DDIM.

EDM (Karras et al. 2022, Algorithm 2): x_0 = sigma_max n; per step an optional churn to t_hat, an Euler step of
dx/dt = (x - D(x, t)) / t, and for Heun a second-order correction (2 * steps - 1 denoiser calls in all).
DDIM (Song et al. 2021) runs on the DDPM VP schedule (linear betas in [1e-4, 0.02], T = 1000) and calls the
denoiser in VE form D(x_t / alpha_t, sigma_t / alpha_t); eta = 0 is deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Callable, Optional, Union

import torch

from diffgen_fast.errors import BackendUnavailableError, InputError
from diffgen_fast.schedules import ddim_timesteps, edm_sigmas, vp_alphas_cumprod

SAMPLERS = ("heun", "euler", "ddim")


def _progress(progress, total: int, desc: str):
    if progress is True:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit="call", leave=False)
    if callable(progress):
        return progress(total=total, desc=desc)
    return None


def sample(
    denoiser: Callable,
    n: int,
    *,
    steps: int = 18,
    sampler: str = "heun",
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
    eta: float = 0.0,
    seed: int = 0,
    shape: Optional[Sequence[int]] = None,
    class_labels=None,
    latents: Optional[torch.Tensor] = None,
    device: Union[str, torch.device, None] = None,
    dtype: torch.dtype = torch.float32,
    progress: Union[bool, Callable] = False,
) -> torch.Tensor:
    """Draw n samples from a denoiser.

    Args:
        denoiser: any callable D(x [n, *shape], sigma [n]) -> x0-prediction [n, *shape] (EDM convention; our
            EmpiricalDenoiser / GaussianDenoiser, an EDM network, ...). class_labels are passed when given.
        n: number of samples.
        steps: sampling steps (EDM grid of `steps` noise levels plus a final 0; DDIM timesteps).
        sampler: "heun" (EDM 2nd order), "euler" (1st order) or "ddim" (VP schedule).
        sigma_min, sigma_max, rho: the EDM grid (ignored by "ddim").
        churn, s_tmin, s_tmax, s_noise: EDM's stochastic sampler (S_churn ...); churn = 0 is deterministic.
        eta: DDIM stochasticity (0 deterministic, 1 DDPM-like).
        seed: seeds a CPU generator, so samples are the same on every device.
        shape: item shape; default denoiser.shape.
        latents: [n, *shape] standard-normal starting noise instead of drawing it from seed.
        device: where to sample (default: denoiser.device, else its buffers' device, else CPU).
        dtype: dtype the denoiser sees; the sampler state is float64 (as in EDM).
        progress: True for a tqdm bar, or a tqdm-like factory.
    Returns:
        [n, *shape] tensor of `dtype`.
    """
    if sampler not in SAMPLERS:
        raise InputError(f"sampler: expected one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InputError(f"n: expected an int >= 1, got {n!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InputError(f"steps: expected an int >= 1, got {steps!r}")
    if churn < 0:
        raise InputError(f"churn: expected >= 0, got {churn}")
    shape = tuple(shape if shape is not None else getattr(denoiser, "shape", ()))
    if not shape:
        raise InputError("shape: the denoiser has no .shape attribute; pass shape=(C, H, W) or (d,)")
    if device is None:
        device = getattr(denoiser, "device", None)
    if device is None:
        bufs = list(denoiser.buffers()) if isinstance(denoiser, torch.nn.Module) else []
        device = bufs[0].device if bufs else torch.device("cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InputError(f"device: expected a torch device such as 'cpu' or 'cuda', got {device!r}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailableError(
            "device: 'cuda' was asked for, but CUDA is not available here (torch "
            f"{torch.__version__}, built {'with' if torch.version.cuda else 'without'} CUDA); sample on 'cpu'"
        )
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    if latents is None:
        latents = torch.randn((n, *shape), generator=gen, dtype=torch.float64)
    elif tuple(latents.shape) != (n, *shape):
        raise InputError(f"latents: expected shape {(n, *shape)}, got {tuple(latents.shape)}")
    latents = latents.to(device=device, dtype=torch.float64)

    def D(x: torch.Tensor, sigma: float) -> torch.Tensor:
        s = torch.full((n,), float(sigma), dtype=dtype, device=device)
        args = (x.to(dtype), s) if class_labels is None else (x.to(dtype), s, class_labels)
        return denoiser(*args).to(torch.float64)

    if sampler == "ddim":
        return _ddim(D, latents, steps, eta, gen, progress).to(dtype)

    rnd = getattr(denoiser, "round_sigma", None)
    t_steps = edm_sigmas(steps, sigma_min, sigma_max, rho, device=device)
    if rnd is not None:
        t_steps = torch.cat([torch.as_tensor(rnd(t_steps[:-1])).to(t_steps), t_steps[-1:]])
    x_next = latents * t_steps[0]
    calls = 2 * steps - 1 if sampler == "heun" else steps
    bar = _progress(progress, calls, f"sampling ({sampler})")
    gamma_max = math.sqrt(2.0) - 1.0
    for i in range(steps):
        t_cur, t_next = float(t_steps[i]), float(t_steps[i + 1])
        x_cur = x_next
        gamma = min(churn / steps, gamma_max) if s_tmin <= t_cur <= s_tmax else 0.0
        t_hat = t_cur + gamma * t_cur
        if gamma > 0:
            noise = torch.randn(x_cur.shape, generator=gen, dtype=torch.float64).to(device)
            x_hat = x_cur + math.sqrt(t_hat**2 - t_cur**2) * s_noise * noise
        else:
            x_hat = x_cur
        denoised = D(x_hat, t_hat)
        d_cur = (x_hat - denoised) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if bar is not None:
            bar.update(1)
        if sampler == "heun" and i < steps - 1:
            denoised = D(x_next, t_next)
            d_prime = (x_next - denoised) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return x_next.to(dtype)


def _ddim(D, latents: torch.Tensor, steps: int, eta: float, gen: torch.Generator, progress) -> torch.Tensor:
    abar_all = vp_alphas_cumprod(device=latents.device)
    ts = ddim_timesteps(steps, abar_all.numel(), device=latents.device)
    x = latents  # x_T ~ N(0, I) in the VP parametrisation
    bar = _progress(progress, steps, "sampling (ddim)")
    for j, t in enumerate(ts.tolist()):
        abar = float(abar_all[t])
        abar_prev = float(abar_all[ts[j + 1]]) if j + 1 < len(ts) else 1.0
        a_t, s_t = math.sqrt(abar), math.sqrt(1.0 - abar)
        x0 = D(x / a_t, s_t / a_t)
        eps = (x - a_t * x0) / s_t
        sig = eta * math.sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)) if abar_prev < 1 else 0.0
        x = math.sqrt(abar_prev) * x0 + math.sqrt(max(1.0 - abar_prev - sig * sig, 0.0)) * eps
        if sig > 0:
            x = x + sig * torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x.device)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return x
