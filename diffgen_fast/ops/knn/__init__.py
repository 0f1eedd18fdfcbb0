"""knn: exact k nearest training points of each query, dispatching to a backend."""

from __future__ import annotations

import torch

from diffgen_fast.errors import InputError, InputTypeError
from diffgen_fast.ops import dispatch
from diffgen_fast.ops._prepare import back, prepare


def knn(queries, train, k: int, *, backend: str = "auto"):
    """Exact k nearest neighbours in squared L2 distance.

    Args:
        queries: [M, *shape] or [M, d] (torch or numpy, floating, finite).
        train: [N, *shape], [N, d] or a TrainingSet.
        k: 1 <= k <= N.
        backend: "auto", "torch", "triton", "cpu", "cuda", "faiss".
    Returns:
        (sqdist [M, k], index [M, k] int64), each row ascending by distance; equal distances are ordered by index.
        sqdist is float64 when queries or train is float64, else float32. Numpy in, numpy out.
    """
    if isinstance(k, bool) or not isinstance(k, int):
        raise InputTypeError(f"k: expected an int, got {type(k).__name__}")
    xt, x2, ts, was_np = prepare(queries, train, x_name="queries")
    if k < 1 or k > len(ts):
        raise InputError(f"k: expected 1 <= k <= N = {len(ts)} (training points), got {k}")
    _, impl = dispatch.resolve("knn", backend, x2.device)
    d2, idx = impl(x2, ts, k)
    dtype = torch.float64 if torch.float64 in (x2.dtype, ts.dtype) else torch.float32
    return back(d2.to(dtype), was_np), back(idx, was_np)
