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


def probe(device: Optional[torch.device]) -> Optional[str]:
    """None when the native kNN can run on `device`, else why not."""
    if not _native.available():
        return f"the native extension is unavailable: {_native.unavailable_reason()}"
    dev = torch.device("cpu") if device is None else torch.device(device)
    if dev.type != "cpu":
        return f"runs on CPU tensors only, got device {dev}"
    return None


def _dtype(x_dtype: torch.dtype, y_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in (x_dtype, y_dtype) else torch.float32


def _check(x, train, k) -> None:
    why = probe(x.device)
    if why is not None:
        from diffgen_fast.errors import BackendUnavailableError

        raise BackendUnavailableError(f"backend='cpu': {why}")


def partial_topk_cpu(x: torch.Tensor, Y: torch.Tensor, k: int, index_offset: int = 0):
    """The exact top-k of x [M, d] among the CPU chunk Y [n, d] (both promoted to one dtype) with the native kernel:
    (sqdist [M, k] float64, index + index_offset [M, k] int64), ascending by (distance, index)."""
    dtype = _dtype(x.dtype, Y.dtype)
    xc = x.detach().to(device="cpu", dtype=dtype).contiguous()
    with pass_range("cpu.knn_chunk"):
        return _native.knn_topk(xc, Y.to(dtype).contiguous(), k, index_offset=index_offset)


def knn_cpu(x: torch.Tensor, train, k: int, *, chunk_size: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [M, d] floating CPU tensor; train: TrainingSet. Returns (sqdist [M, k] float64, index [M, k] int64),
    ascending by (distance, index): the driver over partial_topk_cpu. chunk_size: training rows per kernel call
    (None: the TrainingSet default)."""
    from diffgen_fast.ops import driver

    return driver.topk_state("cpu", x, train, k, chunk_size=chunk_size)


def _register():
    from diffgen_fast.ops import driver

    return driver.register_topk(
        driver.TopkBackend(
            name="cpu",
            partial_topk=partial_topk_cpu,
            chunk_size=lambda M, d, k: None,
            chunk_dtype=_dtype,
            check=_check,
        )
    )


knn_topk_cpu = knn_partial_cpu_op = _register().op  # torch.ops.diffgen_fast.knn_partial_cpu


__all__ = ["knn_cpu", "partial_topk_cpu", "knn_topk_cpu", "knn_partial_cpu_op", "probe"]
