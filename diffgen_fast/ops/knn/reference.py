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
from diffgen_fast.ops.merge import merge_topk, select_topk
from diffgen_fast.ops.softmax_denoise.reference import (
    _TILE_ELEMS,
    default_chunk_size,
    exact_sqdist_pairs,
    sqdist_diff64,
)

EXTRA = 16  # candidates beyond k taken in the first try; doubled while near-ties remain outside


def knn_torch(x: torch.Tensor, train, k: int, *, chunk_size: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [M, d] floating; train: TrainingSet. Returns (sqdist [M, k] float64, index [M, k] int64), ascending."""
    M, d = x.shape
    dev = x.device
    gemm = torch.float64 if torch.float64 in (x.dtype, train.dtype) else torch.float32
    gamma = gemm_error_bound(d, gemm, dev, inputs_rounded=False)
    x64 = x.to(torch.float64)
    xx = (x64 * x64).sum(dim=1)
    xnorm = xx.sqrt()
    xg = x.to(gemm)
    best_d = torch.empty(M, 0, dtype=torch.float64, device=dev)
    best_i = torch.empty(M, 0, dtype=torch.int64, device=dev)
    for start, Y in train.iter_chunks(chunk_size or default_chunk_size(d), device=dev):
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
            dk, ik = select_topk(exact, idx + start, kk)
            chunk_d.append(dk)
            chunk_i.append(ik)
        best_d, best_i = merge_topk(best_d, best_i, torch.cat(chunk_d), torch.cat(chunk_i), k)
    return best_d, best_i
