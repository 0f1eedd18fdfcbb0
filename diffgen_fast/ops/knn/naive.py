"""Float64 brute-force k-nearest neighbours (distances as differences): the ground truth for tests."""

from __future__ import annotations

import torch


def knn_naive(queries: torch.Tensor, train: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """queries [M, *shape], train [N, *shape] -> (sqdist [M, k] float64, index [M, k] int64), ties by index."""
    x = torch.as_tensor(queries).to(torch.float64).reshape(queries.shape[0], -1)
    y = torch.as_tensor(train).to(torch.float64).reshape(train.shape[0], -1)
    d2 = torch.stack([((x[r][None, :] - y) ** 2).sum(dim=1) for r in range(x.shape[0])]) if len(x) else None
    if d2 is None:
        return torch.empty(0, k, dtype=torch.float64), torch.empty(0, k, dtype=torch.int64)
    order = torch.argsort(d2, dim=1, stable=True)[:, :k]  # stable: equal distances keep index order
    return torch.gather(d2, 1, order), order
