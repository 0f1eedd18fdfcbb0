"""The native CUDA kNN backend ("cuda"): exact k nearest neighbours, chunked over the training set.

Per (query block, training chunk) tile, csrc/cuda/knn.cu computes the squared distances as DIRECT DIFFERENCES in the
kernel dtype (fp32, or fp64 when the queries or the training set are float64), stored as fp32, and selects per row
the k' = k + margin smallest by (distance, index) (radix select + bitonic sort, one block per row). Then:

  re-rank   the k' candidates' distances are recomputed in float64 from differences (one warp per pair), and the top k
            is selected by (float64 distance, index), the order of the torch reference;
  certify   direct differences have a small RELATIVE error: |D~ - D| <= rel D + abs with rel = gamma_{d+4} in the
            kernel dtype (+ 2^-24 for storing fp64 distances as fp32) and abs = (d + 3) 2^-149 (underflow). Every
            point outside the candidates has D~ >= t, the k'-th candidate's fp32 distance, hence a float64 distance
            >= (t - abs) / ((1 + rel)(1 + gamma_{d+4}(2^-53))). A row is certified when its k-th re-ranked distance is
            strictly below that bound (or when the candidates are the whole chunk), so no outside point can enter its
            top k, ties included;
  retry     rows that are not certified (near-ties at the boundary, e.g. duplicated training points) are redone with
            4x the candidates, up to SELECT_MAX_K, and the rows still not certified run the torch reference
            (knn_torch) against that chunk.

Chunks merge with merge_topk, so ties go to the smaller training index and the result equals the torch reference's.
k > MAX_K runs the torch reference on the same device.
"""

from __future__ import annotations

from typing import Optional

import torch

from diffgen_fast import _native_cuda
from diffgen_fast.errors import BackendUnavailableError
from diffgen_fast.ops.merge import select_topk

MAX_K = 1024  # largest k the kernels serve; larger k runs the torch reference
SELECT_MAX_K = _native_cuda.SELECT_MAX_K
MARGIN = 16  # candidates beyond k in the first try (at least; k / 8 for large k)
_TILE_ELEMS = 1 << 26  # fp32 distances of one [query block, chunk] tile (256 MiB)
_CHUNK_BYTES = 256 << 20  # bytes of one training chunk in the kernel dtype


def probe(device) -> Optional[str]:
    return _native_cuda.probe(device)


def _gamma(n: int, u: float) -> float:
    return n * u / (1.0 - n * u)


def certified_bound_factors(d: int, kernel_dtype: torch.dtype) -> tuple[float, float]:
    """(divisor, abs): an outside point's float64 distance is >= (t - abs) / divisor, t = the k'-th fp32 distance."""
    u = 2.0**-53 if kernel_dtype == torch.float64 else 2.0**-24
    rel = _gamma(d + 4, u) + (2.0**-24 if kernel_dtype == torch.float64 else 0.0)
    divisor = (1.0 + rel) * (1.0 + _gamma(d + 4, 2.0**-53)) * (1.0 + 2.0**-50)
    return divisor, (d + 3) * 2.0**-149


def _kprime(k: int, n: int) -> int:
    return min(n, SELECT_MAX_K, max(k + MARGIN, k + k // 8))


def _tile_topk(xb: torch.Tensor, Y: torch.Tensor, kk: int, divisor: float, abs_err: float):
    """Exact top-kk of the rows of xb against the chunk Y: (float64 distances, chunk-local indices)."""
    mb = xb.shape[0]
    n = Y.shape[0]
    out_d = torch.empty(mb, kk, dtype=torch.float64, device=xb.device)
    out_i = torch.empty(mb, kk, dtype=torch.int64, device=xb.device)
    rows = torch.arange(mb, device=xb.device)
    xr = xb
    kc = _kprime(kk, n)
    while True:
        vals, idx = _native_cuda.sqdist_topk(xr, Y, kc)
        exact = _native_cuda.sqdist_pairs(xr, Y, idx)
        dk, ik = select_topk(exact, idx, kk)
        if kc == n:
            ok = torch.ones(xr.shape[0], dtype=torch.bool, device=xr.device)
        else:
            t = vals[:, -1].to(torch.float64)
            ok = torch.isfinite(t) & (dk[:, -1] < (t - abs_err) / divisor)
        out_d[rows[ok]] = dk[ok]
        out_i[rows[ok]] = ik[ok]
        bad = ~ok
        if not bool(bad.any()):
            return out_d, out_i
        rows, xr = rows[bad], xr[bad]
        if kc >= min(n, SELECT_MAX_K):
            from diffgen_fast.data import TrainingSet
            from diffgen_fast.ops.knn.reference import knn_torch

            fd, fi = knn_torch(xr, TrainingSet.from_tensor(Y), kk)
            out_d[rows] = fd
            out_i[rows] = fi
            return out_d, out_i
        kc = min(n, SELECT_MAX_K, 4 * kc)


def _kdt(x_dtype: torch.dtype, y_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in (x_dtype, y_dtype) else torch.float32


def _check(x, train, k) -> None:
    why = probe(x.device)
    if why is not None:
        raise BackendUnavailableError(f"backend='cuda': {why}")


def _chunk_size(M: int, d: int, k: int) -> int:
    return max(1, min(1 << 24, _CHUNK_BYTES // (8 * max(d, 1))))


def partial_topk_cuda(x: torch.Tensor, Y: torch.Tensor, k: int, index_offset: int = 0):
    """The exact top-k of the CUDA queries x [M, d] among the chunk Y [n, d] (tiles of the direct-difference kernel,
    float64 re-rank, certified; k > MAX_K: the torch reference's partial): (sqdist float64, index + offset int64)."""
    if k > MAX_K:
        from diffgen_fast.ops.knn.reference import partial_topk_torch

        return partial_topk_torch(x, Y, k, index_offset)
    M, d = x.shape
    kdt = _kdt(x.dtype, Y.dtype)
    xk = x.to(kdt).contiguous()
    Y = Y.to(kdt).contiguous()
    divisor, abs_err = certified_bound_factors(d, kdt)
    n = Y.shape[0]
    kk = min(k, n)
    mb = max(1, min(M, _TILE_ELEMS // n))
    parts_d, parts_i = [], []
    for r0 in range(0, M, mb):
        dk, ik = _tile_topk(xk[r0 : r0 + mb], Y, kk, divisor, abs_err)
        parts_d.append(dk)
        parts_i.append(ik + index_offset)
    return torch.cat(parts_d), torch.cat(parts_i)


def knn_cuda(x: torch.Tensor, train, k: int, *, chunk_size: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [M, d] floating CUDA tensor; train: TrainingSet. Returns (sqdist [M, k] float64, index [M, k] int64): the
    driver over partial_topk_cuda."""
    from diffgen_fast.ops import driver

    return driver.topk_state("cuda", x, train, k, chunk_size=chunk_size)


def _register():
    from diffgen_fast.ops import driver

    return driver.register_topk(
        driver.TopkBackend(
            name="cuda",
            partial_topk=partial_topk_cuda,
            chunk_size=_chunk_size,
            chunk_dtype=_kdt,
            check=_check,
        )
    )


knn_partial_cuda_op = _register().op  # torch.ops.diffgen_fast.knn_partial_cuda
