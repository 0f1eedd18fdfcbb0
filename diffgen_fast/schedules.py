"""Noise schedules and conversions (docs/science.md section 1).

VE / EDM: x = y + sigma n.  VP / DDPM: x_t = alpha_t y + sigma_t n, alpha_t^2 + sigma_t^2 = 1.
The two meet through sigma_VE = sigma_t / alpha_t and x_VE = x_t / alpha_t.
"""

from __future__ import annotations

from typing import Optional

import torch


def edm_sigmas(
    steps: int = 18,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    *,
    append_zero: bool = True,
    dtype: torch.dtype = torch.float64,
    device=None,
) -> torch.Tensor:
    """Karras et al. (2022) grid: sigma_i = (smax^(1/rho) + i/(K-1) (smin^(1/rho) - smax^(1/rho)))^rho, then 0."""
    if steps < 1:
        raise ValueError(f"steps: expected >= 1, got {steps}")
    if not (0 < sigma_min <= sigma_max):
        raise ValueError(f"sigma_min, sigma_max: expected 0 < sigma_min <= sigma_max, got {sigma_min}, {sigma_max}")
    i = torch.arange(steps, dtype=torch.float64, device=device)
    denom = max(steps - 1, 1)
    t = (sigma_max ** (1 / rho) + i / denom * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    if append_zero:
        t = torch.cat([t, torch.zeros(1, dtype=torch.float64, device=device)])
    return t.to(dtype)


def vp_alphas_cumprod(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02, *, device=None) -> torch.Tensor:
    """abar_t for t = 0..T-1 from betas linear in [beta_start, beta_end] (DDPM), float64 [T]."""
    betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64, device=device)
    return torch.cumprod(1.0 - betas, dim=0)


def vp_alpha_sigma(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, sigma_t) = (sqrt(abar_t), sqrt(1 - abar_t)) at integer timesteps t."""
    abar = alphas_cumprod[t.long()]
    return abar.sqrt(), (1.0 - abar).sqrt()


def vp_to_ve(x_t: torch.Tensor, alpha_t, sigma_t) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_VE, sigma_VE) = (x_t / alpha_t, sigma_t / alpha_t)."""
    alpha_t = torch.as_tensor(alpha_t, dtype=torch.float64)
    sigma_t = torch.as_tensor(sigma_t, dtype=torch.float64)
    return x_t / _bcast(alpha_t, x_t), sigma_t / alpha_t


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if not isinstance(v, torch.Tensor):
        v = torch.tensor(v, dtype=like.dtype if like.is_floating_point() else torch.float64)
    v = v.to(like.device)
    if v.ndim == 0:
        return v.to(like.dtype)
    return v.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def eps_from_x0(x: torch.Tensor, x0: torch.Tensor, sigma, alpha=1.0) -> torch.Tensor:
    """eps = (x - alpha D) / sigma."""
    return (x - _bcast(alpha, x) * x0) / _bcast(sigma, x)


def score_from_x0(x: torch.Tensor, x0: torch.Tensor, sigma, alpha=1.0) -> torch.Tensor:
    """score = grad log p(x) = (alpha D - x) / sigma^2."""
    s = _bcast(sigma, x)
    return (_bcast(alpha, x) * x0 - x) / (s * s)


def v_from_x0(x: torch.Tensor, x0: torch.Tensor, sigma, alpha=1.0) -> torch.Tensor:
    """v = alpha eps - sigma D."""
    eps = eps_from_x0(x, x0, sigma, alpha)
    return _bcast(alpha, x) * eps - _bcast(sigma, x) * x0


def x0_from_eps(x: torch.Tensor, eps: torch.Tensor, sigma, alpha=1.0) -> torch.Tensor:
    """D = (x - sigma eps) / alpha."""
    return (x - _bcast(sigma, x) * eps) / _bcast(alpha, x)


def ddim_timesteps(steps: int, T: int = 1000, *, device: Optional[torch.device] = None) -> torch.Tensor:
    """Evenly spaced integer timesteps from T-1 down to 0 (the 'leading'-free, linspace spacing), int64 [steps]."""
    if not (1 <= steps <= T):
        raise ValueError(f"steps: expected 1 <= steps <= T = {T}, got {steps}")
    return torch.linspace(T - 1, 0, steps, dtype=torch.float64, device=device).round().long()
