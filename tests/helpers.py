"""Shared test helpers: problem generators and the tie-aware kNN comparison."""

from __future__ import annotations

import torch


def make_problem(M, N, d, *, dtype=torch.float32, seed=0, near=0.5, scale=1.0, sigma=None):
    """Training set uniform in [-scale, scale]^d; a fraction `near` of the queries sit close to training points
    (x = alpha y_j + sigma n, the cancellation-prone case), the rest are random."""
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(N, d, generator=g, dtype=torch.float64) * 2 - 1) * scale
    x = (torch.rand(M, d, generator=g, dtype=torch.float64) * 2 - 1) * scale
    n_near = int(M * near)
    if n_near:
        j = torch.randint(0, N, (n_near,), generator=g)
        s = 0.01 if sigma is None else sigma
        x[:n_near] = y[j] + s * torch.randn(n_near, d, generator=g, dtype=torch.float64)
    return x.to(dtype), y.to(dtype)


def assert_knn_matches(d2, idx, x, y, k, *, rtol=1e-9, atol=1e-12):
    """Tie-aware check of (d2, idx) [M, k] against float64 brute force: the distances match, every returned index
    really has the returned distance, and the returned index set equals the true one up to ties at the boundary."""
    x = torch.as_tensor(x).double().reshape(len(x), -1)
    y = torch.as_tensor(y).double().reshape(len(y), -1)
    d2 = torch.as_tensor(d2).double()
    idx = torch.as_tensor(idx)
    assert d2.shape == (len(x), k) and idx.shape == (len(x), k)
    assert idx.dtype == torch.int64
    for r in range(len(x)):
        full = ((x[r][None] - y) ** 2).sum(1)
        ref = torch.sort(full).values[:k]
        torch.testing.assert_close(d2[r], ref, rtol=rtol, atol=atol)
        assert bool((d2[r][1:] >= d2[r][:-1]).all()), "not ascending"
        torch.testing.assert_close(full[idx[r]], d2[r], rtol=rtol, atol=atol)
        assert len(set(idx[r].tolist())) == k, "duplicate indices"
        kth = ref[-1]
        tol = atol + rtol * abs(float(kth))
        must = set((full < kth - tol).nonzero().reshape(-1).tolist())
        allowed = set((full <= kth + tol).nonzero().reshape(-1).tolist())
        got = set(idx[r].tolist())
        assert must <= got <= allowed, f"row {r}: wrong neighbour set"
