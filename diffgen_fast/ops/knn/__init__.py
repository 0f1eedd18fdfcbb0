"""knn: exact (or, with a faiss index, approximate) k nearest training points of each query."""

from __future__ import annotations

from typing import Any, Optional

import torch

from diffgen_fast.errors import InputError, InputTypeError
from diffgen_fast.ops import dispatch
from diffgen_fast.ops._prepare import back, prepare


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
    """
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
    dtype = torch.float64 if torch.float64 in (x2.dtype, ts.dtype) else torch.float32
    out_d = back(d2.to(device=x2.device, dtype=dtype), was_np)
    out_i = back(idx.to(x2.device), was_np)
    return (out_d, out_i, info) if return_info else (out_d, out_i)
