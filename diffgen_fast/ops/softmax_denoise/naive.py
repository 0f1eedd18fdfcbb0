"""Float64 brute force: the ground truth every backend is tested against. Slow; for tests and self-checks.

Distances are computed as differences (no norm expansion), one query block at a time.
"""

from __future__ import annotations

from typing import Union

import torch


def _as64(t) -> torch.Tensor:
    if isinstance(t, torch.Tensor):
        return t.to(torch.float64)
    return torch.as_tensor(t, dtype=torch.float64)  # a Python float must not pass through float32


def softmax_denoise_naive(
    x: torch.Tensor,
    train: torch.Tensor,
    sigma: Union[float, torch.Tensor],
    alpha: Union[float, torch.Tensor] = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [M, *shape], train: [N, *shape], sigma / alpha: float or [M]. Returns (denoised [M, d], lse [M]), float64."""
    x = _as64(x).reshape(x.shape[0], -1)
    y = _as64(train).reshape(train.shape[0], -1)
    M = x.shape[0]
    sigma = _as64(sigma).reshape(-1).expand(M) if _as64(sigma).numel() == 1 else _as64(sigma).reshape(M)
    alpha = _as64(alpha).reshape(-1).expand(M) if _as64(alpha).numel() == 1 else _as64(alpha).reshape(M)
    out = torch.empty(M, y.shape[1], dtype=torch.float64)
    lse = torch.empty(M, dtype=torch.float64)
    for r in range(M):
        diff = x[r][None, :] - alpha[r] * y
        logits = -(diff * diff).sum(dim=1) / (2.0 * sigma[r] ** 2)
        lse[r] = torch.logsumexp(logits, dim=0)
        w = torch.softmax(logits, dim=0)
        out[r] = w @ y
    return out, lse


def kde_log_density_naive(x: torch.Tensor, train: torch.Tensor, bandwidth) -> torch.Tensor:
    """log (1/N) sum_i N(x; y_i, h^2 I), float64 [M]."""
    import math

    N = train.shape[0]
    d = train[0].numel()
    _, lse = softmax_denoise_naive(x, train, bandwidth, 1.0)
    h = _as64(bandwidth).reshape(-1)
    return lse - math.log(N) - 0.5 * d * torch.log(2 * math.pi * h * h)
