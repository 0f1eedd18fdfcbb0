"""The reference kNN backend ("torch"): exact k nearest neighbours, chunked over the training set.

Per tile: squared distances by the norm expansion from one GEMM (float32, or float64 for float64 inputs); the
candidates are every point within 2 B of the k-th smallest approximate distance, where B is the certified bound on
the expansion's error (worst-case dot-product error, diffgen_fast.ops._checks.gemm_error_bound); the candidates'
distances are recomputed in float64 as differences and the top-k is selected by (distance, index), so ties go to the
smaller index and the result is exact and deterministic. Chunks merge with diffgen_fast.ops.merge.merge_topk.
"""

from __future__ import annotations

from typing import Optional

import torch

from diffgen_fast.ops._checks import gemm_error_bound
from diffgen_fast.ops.merge import select_topk
from diffgen_fast.ops.refine import exact_sqdist_pairs
from diffgen_fast.ops.softmax_denoise.reference import (
    _TILE_ELEMS,
    default_chunk_size,
    sqdist_diff64,
)

EXTRA = 16  # candidates beyond k taken in the first try; doubled while near-ties remain outside


def partial_topk_torch(
    x: torch.Tensor, Y: torch.Tensor, k: int, index_offset: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact top-k (k <= len(Y)) of x [M, d] among the chunk Y [n, d]: (sqdist [M, k] float64, index + offset
    [M, k] int64), ascending by (distance, index)."""
    M, d = x.shape
    dev = x.device
    gemm = torch.float64 if torch.float64 in (x.dtype, Y.dtype) else torch.float32
    gamma = gemm_error_bound(d, gemm, dev, inputs_rounded=False)
    x64 = x.to(torch.float64)
    xx = (x64 * x64).sum(dim=1)
    xnorm = xx.sqrt()
    xg = x.to(gemm)
    n = Y.shape[0]
    Yg = Y.to(gemm)
    yy = torch.linalg.vector_norm(Y, dim=1, dtype=torch.float64).square()
    ymax = float(yy.max().sqrt())
    kk = min(k, n)
    mb = max(1, min(M, _TILE_ELEMS // n))
    chunk_d, chunk_i = [], []
    for r0 in range(0, M, mb):
        r1 = min(M, r0 + mb)
        D = xx[r0:r1, None] - 2.0 * (xg[r0:r1] @ Yg.T).to(torch.float64) + yy[None, :]
        nonfinite = ~torch.isfinite(D).all(dim=1)  # the GEMM overflowed: these rows by float64 differences
        if bool(nonfinite.any()):
            D[nonfinite] = sqdist_diff64(x64[r0:r1][nonfinite], Y)
        B = 2.0 * gamma * xnorm[r0:r1] * ymax + 2.0**-50 * (xx[r0:r1] + ymax * ymax)
        kc = min(n, kk + EXTRA)
        while True:
            vals, idx = torch.topk(D, kc, dim=1, largest=False, sorted=True)
            if kc == n or bool((vals[:, kc - 1] > vals[:, kk - 1] + 2.0 * B).all()):
                break
            kc = min(n, 2 * kc)
        exact = exact_sqdist_pairs(x64[r0:r1], Y, idx)
        dk, ik = select_topk(exact, idx + index_offset, kk)
        chunk_d.append(dk)
        chunk_i.append(ik)
    return torch.cat(chunk_d), torch.cat(chunk_i)


def knn_torch(x: torch.Tensor, train, k: int, *, chunk_size: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [M, d] floating; train: TrainingSet. Returns (sqdist [M, k] float64, index [M, k] int64), ascending: the
    driver over partial_topk_torch."""
    from diffgen_fast.ops import driver

    return driver.topk_state("torch", x, train, k, chunk_size=chunk_size)


def _register():
    from diffgen_fast.ops import driver

    return driver.register_topk(
        driver.TopkBackend(
            name="torch",
            partial_topk=partial_topk_torch,
            chunk_size=lambda M, d, k: default_chunk_size(d),
        )
    )


knn_partial_torch_op = _register().op  # torch.ops.diffgen_fast.knn_partial_torch
