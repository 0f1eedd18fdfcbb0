"""The native CPU kNN backend ("cpu"): csrc/cpu/knn.cpp through diffgen_fast._native.knn_topk.

Per training chunk the kernel finds the exact top-k (approximate distances in the input precision, register-blocked
over queries and a transposed panel of training points; the candidates re-ranked in float64 as differences and
certified against the approximate pass's error bound), and chunks merge with diffgen_fast.ops.merge.merge_topk, so
ties go to the smaller index as in the torch reference. x and the training set are promoted to one dtype: float64
when either is float64, else float32 (both promotions are exact).
"""

from __future__ import annotations

from typing import Optional

import torch

from diffgen_fast import _native
from diffgen_fast.ops._profile import pass_range
from diffgen_fast.ops.merge import merge_topk


def _knn_chunk(x: torch.Tensor, y: torch.Tensor, k: int, index_offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _native.knn_topk(x, y, k, index_offset=index_offset)


if hasattr(torch.library, "custom_op"):  # torch >= 2.4: torch.compile traces through the kernel

    @torch.library.custom_op("diffgen_fast::knn_topk_cpu", mutates_args=())
    def knn_topk_cpu(x: torch.Tensor, y: torch.Tensor, k: int, index_offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(sqdist [M, k] float64, index [M, k] int64) of x [M, d] among the rows of y [n, d] (same float dtype),
        indices offset by index_offset; exact, ascending, ties by index."""
        return _knn_chunk(x, y, k, index_offset)

    @knn_topk_cpu.register_fake
    def _(x, y, k, index_offset):
        return x.new_empty(x.shape[0], k, dtype=torch.float64), x.new_empty(x.shape[0], k, dtype=torch.int64)

else:  # pragma: no cover - older torch
    knn_topk_cpu = _knn_chunk


def probe(device: Optional[torch.device]) -> Optional[str]:
    """None when the native kNN can run on `device`, else why not."""
    if not _native.available():
        return f"the native extension is unavailable: {_native.unavailable_reason()}"
    dev = torch.device("cpu") if device is None else torch.device(device)
    if dev.type != "cpu":
        return f"runs on CPU tensors only, got device {dev}"
    return None


def knn_cpu(x: torch.Tensor, train, k: int, *, chunk_size: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [M, d] floating CPU tensor; train: TrainingSet. Returns (sqdist [M, k] float64, index [M, k] int64),
    ascending by (distance, index). chunk_size: training rows per kernel call (None: the TrainingSet default)."""
    M = x.shape[0]
    dtype = torch.float64 if torch.float64 in (x.dtype, train.dtype) else torch.float32
    xc = x.detach().to(device="cpu", dtype=dtype).contiguous()
    best_d: Optional[torch.Tensor] = None
    best_i: Optional[torch.Tensor] = None
    for start, Y in train.iter_chunks(chunk_size, device="cpu", dtype=dtype):
        with pass_range("cpu.knn_chunk"):
            dk, ik = knn_topk_cpu(xc, Y, min(k, Y.shape[0]), start)
        if best_d is None or best_i is None:
            best_d, best_i = dk, ik
        else:
            best_d, best_i = merge_topk(best_d, best_i, dk, ik, k)
    if best_d is None or best_i is None:  # an empty training set never reaches here (knn checks), kept for safety
        return torch.zeros(M, 0, dtype=torch.float64), torch.zeros(M, 0, dtype=torch.int64)
    return best_d, best_i


__all__ = ["knn_cpu", "knn_topk_cpu", "probe"]
