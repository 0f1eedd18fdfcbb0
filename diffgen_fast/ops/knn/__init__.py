"""knn: exact (or, with a faiss index, approximate) k nearest training points of each query."""

from __future__ import annotations

from typing import Any, Optional

import torch

from diffgen_fast.errors import InputError, InputTypeError
from diffgen_fast.ops import dispatch
from diffgen_fast.ops._prepare import back, prepare
from diffgen_fast.ops.merge import merge_topk, select_topk
from diffgen_fast.ops.softmax_denoise.reference import sqdist_diff64


def knn(
    queries,
    train,
    k: int,
    *,
    backend: str = "auto",
    index: Any = None,
    nprobe: Optional[int] = None,
    ef_search: Optional[int] = None,
    recall_sample: int = 256,
    return_info: bool = False,
):
    """k nearest neighbours in squared L2 distance; exact unless an approximate faiss index is asked for.

    Args:
        queries: [M, *shape] or [M, d] (torch or numpy, floating, finite).
        train: [N, *shape], [N, d], a TrainingSet or a path TrainingSet.open reads.
        k: 1 <= k <= N.
        backend: "auto", "torch", "triton", "cpu", "cuda", "faiss".
        index: faiss only (implies backend "faiss" under "auto"): None or "flat" (exact IndexFlatL2, streamed over
            the training set), "ivf" (IVF-Flat), "ivfpq" (IVF-PQ), "hnsw", a faiss factory string such as
            "IVF1024,Flat", a FaissIndex (diffgen_fast.FaissIndex.build / load) or the path of a saved .faiss index.
        nprobe, ef_search: search parameters of IVF and HNSW indexes.
        recall_sample: queries of an approximate search whose recall@k is measured against exact search.
        return_info: also return a dict (backend, index, exact, recall_at_k, ...).
    Returns:
        (sqdist [M, k], index [M, k] int64), each row ascending by distance; equal distances are ordered by index.
        Distances are exact (float64 differences) for every point returned; an approximate index may miss true
        neighbours, which its measured recall_at_k tells. sqdist is float64 when queries or train is float64,
        else float32. Numpy in, numpy out. With return_info, (sqdist, index, info).
    Raises:
        InputError naming `queries` and the rows: when the squared distances of a row overflow even float64
        (values around 1e154 and beyond), or when float32 inputs have squared distances float32 cannot hold
        (above ~3.4e38, or nonzero below its smallest subnormal): pass float64 inputs then (docs/precision.md).
    """
    d2, idx, info, was_np, dtype, x2 = _knn64(
        queries, train, k, backend=backend, index=index, nprobe=nprobe, ef_search=ef_search,
        recall_sample=recall_sample,
    )  # fmt: skip
    if dtype == torch.float32:
        d32 = d2.to(torch.float32)
        over = (torch.isinf(d32) & torch.isfinite(d2)).any(dim=1)
        under = ((d32 == 0) & (d2 > 0)).any(dim=1)
        for rows, how in ((over, "above float32's largest value"), (under, "below float32's smallest subnormal")):
            if bool(rows.any()):
                raise InputError(
                    f"queries: the squared distances of rows {_rows_text(rows.nonzero().squeeze(1))} are {how}, so "
                    f"the float32 result (float32 inputs) cannot hold them; pass float64 inputs (float32 values "
                    f"convert exactly)"
                )
    out_d = back(d2.to(device=x2.device, dtype=dtype), was_np)
    out_i = back(idx.to(x2.device), was_np)
    return (out_d, out_i, info) if return_info else (out_d, out_i)


def _rows_text(rows: torch.Tensor) -> str:
    r = rows.tolist()
    return ", ".join(map(str, r[:8])) + (f", ... ({len(r)} rows)" if len(r) > 8 else "")


def knn_sqdist64(queries, train, k: int, *, backend: str = "auto", **kw):
    """knn with the squared distances as float64 torch tensors whatever the input dtype (the ratio test of
    memorization and scoring needs them where float32 cannot hold them). Returns (sqdist, index, info)."""
    d2, idx, info, _, _, _ = _knn64(queries, train, k, backend=backend, **kw)
    return d2.cpu(), idx.cpu(), info


def knn_exact_rows(x: torch.Tensor, ts, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of the rows x [m, d] by float64 differences, streamed over the training set: (sqdist, index)."""
    best_d = torch.empty(x.shape[0], 0, dtype=torch.float64, device=x.device)
    best_i = torch.empty(x.shape[0], 0, dtype=torch.int64, device=x.device)
    x64 = x.to(torch.float64)
    for start, Y in ts.iter_chunks(max(1, (1 << 22) // max(1, ts.d)), device=x.device):
        d2 = sqdist_diff64(x64, Y)
        i = torch.arange(start, start + Y.shape[0], device=x.device).expand(x.shape[0], -1)
        dk, ik = select_topk(d2, i, min(k, Y.shape[0]))
        best_d, best_i = merge_topk(best_d, best_i, dk, ik, k)
    return best_d, best_i


def _bad_rows(d2: torch.Tensor, idx: torch.Tensor, lo: int, hi: int, *, exact: bool = True) -> torch.Tensor:
    """[M] bool: the rows of a top-k state (sqdist, index) over training rows [lo, hi) that knn's safety guard
    recomputes: a non-finite distance or an index outside [lo, hi); for an approximate index (exact False), a
    non-finite distance of a point found, no point found at all, or an index past the end."""
    if exact:
        return (~torch.isfinite(d2) | (idx >= hi) | (idx < lo)).any(dim=1)
    return (~torch.isfinite(d2) & (idx >= 0)).any(dim=1) | (idx < 0).all(dim=1) | (idx >= hi).any(dim=1)


def float64_overflow_error(rows: torch.Tensor) -> InputError:
    """The error of query rows whose k-th squared distance overflows even float64 after the exact recompute."""
    return InputError(
        f"queries: the squared distances of rows {_rows_text(rows)} overflow even float64 (values too large to "
        f"compare); rescale the data"
    )


def partial_topk_checked(
    name: str, x: torch.Tensor, Y: torch.Tensor, k: int, index_offset: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """One training chunk's top-k state on the driver backend `name` (driver.partial_topk: x [M, d] against the rows
    Y [n, d], k <= n, indices offset by index_offset), under the same safety guard as knn: rows with a non-finite
    distance or an index outside [index_offset, index_offset + n) are recomputed exactly by float64 differences over
    the chunk. Returns (sqdist [M, k] float64, index [M, k] int64) on x's device, ascending by (distance, index).

    Squared distances that overflow even float64 stay +inf (with their indices): whether that matters depends on the
    other chunks, so a caller merging chunks checks its final state (float64_overflow_error), as knn does."""
    from diffgen_fast.ops import driver
    from diffgen_fast.ops._prepare import TensorChunks

    d2, idx = driver.partial_topk(name, x, Y, k, index_offset)
    d2 = d2.to(device=x.device, dtype=torch.float64)
    idx = idx.to(x.device)
    bad = _bad_rows(d2, idx, index_offset, index_offset + Y.shape[0])
    if bool(bad.any()):
        rows = bad.nonzero().squeeze(1)
        fd, fi = knn_exact_rows(x[rows], TensorChunks(Y, "train"), k)
        d2, idx = d2.clone(), idx.clone()
        d2[rows], idx[rows] = fd, fi + index_offset
    return d2, idx


def _knn64(queries, train, k, *, backend="auto", index=None, nprobe=None, ef_search=None, recall_sample=256):
    if isinstance(k, bool) or not isinstance(k, int):
        raise InputTypeError(f"k: expected an int, got {type(k).__name__}")
    xt, x2, ts, was_np = prepare(queries, train, x_name="queries")
    if k < 1 or k > len(ts):
        raise InputError(f"k: expected 1 <= k <= N = {len(ts)} (training points), got {k}")
    faiss_args = dict(index=index, nprobe=nprobe, ef_search=ef_search)
    uses_faiss_args = any(v is not None for v in faiss_args.values())
    if uses_faiss_args and backend == "auto":
        backend = "faiss"
    name, impl = dispatch.resolve("knn", backend, x2.device)
    if name == "faiss":
        d2, idx, info = impl(x2, ts, k, recall_sample=recall_sample, **faiss_args)
    else:
        if uses_faiss_args:
            bad = next(n for n, v in faiss_args.items() if v is not None)
            raise InputError(f"{bad}: only the faiss backend takes it, but backend={backend!r}")
        d2, idx = impl(x2, ts, k)
        info = {"exact": True, "recall_at_k": 1.0}
    info = {"backend": name, **info}
    d2 = d2.to(device=x2.device, dtype=torch.float64)
    idx = idx.to(x2.device)
    # One guard for every backend: rows with a non-finite distance or an index outside [0, N) (float32 overflow in
    # a backend: faiss gives -1 / inf, others inf) are recomputed exactly by float64 differences. An approximate
    # index may legitimately miss points (-1): only its rows that found nothing, or whose distances overflowed,
    # are recomputed.
    N = len(ts)
    bad = _bad_rows(d2, idx, 0, N, exact=info.get("exact", True))
    if bool(bad.any()):
        rows = bad.nonzero().squeeze(1)
        fd, fi = knn_exact_rows(x2[rows], ts, k)
        d2, idx = d2.clone(), idx.clone()
        d2[rows], idx[rows] = fd, fi
        if "missing" in info:
            info["missing"] = int((idx < 0).sum())
        over = ~torch.isfinite(fd[:, -1])
        if bool(over.any()):
            raise float64_overflow_error(rows[over])
    dtype = torch.float64 if torch.float64 in (x2.dtype, ts.dtype) else torch.float32
    return d2, idx, info, was_np, dtype, x2
