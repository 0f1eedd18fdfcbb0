"""Which backend runs an op.

`backend=` accepts "auto", "torch" (the chunked reference, everywhere), "triton", "cpu" (native C++), "cuda" (native
CUDA) and, for knn, "faiss". A backend named explicitly that cannot run raises BackendUnavailableError saying why;
"auto" never raises for a missing optional backend and logs its pick at debug level. DIFFGEN_FAST_BACKEND overrides
"auto" for the whole process (ignored by ops that have no backend of that name).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from diffgen_fast.errors import BackendUnavailableError, InputError
from diffgen_fast.ops._checks import compiling

log = logging.getLogger("diffgen_fast.dispatch")

BACKENDS = ("auto", "torch", "triton", "cpu", "cuda", "faiss")
OPS = ("softmax_denoise", "knn")
ENV_VAR = "DIFFGEN_FAST_BACKEND"
CUDA_SOFTMAX_MAX_D = 64  # the native CUDA softmax kernel's limit (diffgen_fast._native_cuda.SOFTMAX_MAX_D)


@dataclass
class Backend:
    op: str
    name: str
    # probe(device) -> None if it can run on that device, else the reason it cannot
    probe: Callable[[Optional[torch.device]], Optional[str]]
    load: Callable[[], Callable]
    description: str


_REGISTRY: dict[str, dict[str, Backend]] = {op: {} for op in OPS}

# Backends the blueprint names but this version does not implement yet, and where they are planned.
_PLANNED = {
    ("softmax_denoise", "faiss"): "faiss serves knn only",
    ("knn", "triton"): "not implemented yet (planned: fused Triton kNN)",
}

# Preference order of "auto" per op; the first whose probe passes runs.
_AUTO_ORDER = {
    "softmax_denoise": ("triton", "cuda", "cpu", "torch"),
    "knn": ("cuda", "triton", "cpu", "faiss", "torch"),
}


def register(op: str, name: str, *, probe, load, description: str) -> None:
    _REGISTRY[op][name] = Backend(op, name, probe, load, description)


def _check_name(backend: str, what: str = "backend") -> None:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise InputError(f"{what}: expected one of {', '.join(BACKENDS)}, got {backend!r}")


def _reason(op: str, name: str, device: Optional[torch.device]) -> Optional[str]:
    b = _REGISTRY[op].get(name)
    if b is None:
        return _PLANNED.get((op, name), f"no backend {name!r} for {op}")
    return b.probe(device)


def _auto_candidate(
    op: str, name: str, device: Optional[torch.device], dtype: Optional[torch.dtype], d: Optional[int] = None
) -> bool:
    """Rules of "auto" beyond "can it run": GPU kernels only for CUDA tensors (the Triton interpreter is for tests),
    float64 stays on the torch reference (the kernels compute in fp32), and the native CUDA softmax kernel only for
    a known d <= 64 (its small-d kernel is all it has)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if name in ("triton", "cuda") and (dev.type != "cuda" or dtype == torch.float64):
        return False
    if op == "softmax_denoise" and name == "cuda" and (d is None or d > CUDA_SOFTMAX_MAX_D):
        return False
    return True


def resolve(
    op: str,
    backend: str,
    device: Optional[torch.device] = None,
    dtype: Optional[torch.dtype] = None,
    *,
    d: Optional[int] = None,
) -> tuple[str, Callable]:
    """(name, implementation) of the backend that runs `op` for inputs on `device` with dtype `dtype` and `d` values
    per point (None: unknown; "auto" then skips backends limited in d)."""
    _check_name(backend)
    if backend == "auto":
        env = os.environ.get(ENV_VAR, "").strip()
        if env and env != "auto":
            _check_name(env, ENV_VAR)
            if not (op == "softmax_denoise" and env == "faiss"):  # faiss is a knn-only backend
                return resolve(op, env, device, dtype, d=d)
        for name in _AUTO_ORDER[op]:
            if (
                name in _REGISTRY[op]
                and _auto_candidate(op, name, device, dtype, d)
                and _reason(op, name, device) is None
            ):
                if not compiling():  # a logging call is a graph break under torch.compile
                    log.debug("%s: auto picked backend %r on %s", op, name, device)
                return name, _REGISTRY[op][name].load()
        raise BackendUnavailableError(f"{op}: no backend can run on device {device}")  # torch always can
    why = _reason(op, backend, device)
    if why is not None:
        raise BackendUnavailableError(f"backend={backend!r} cannot run {op} on {device}: {why}")
    return backend, _REGISTRY[op][backend].load()


def backend_table(device: Optional[torch.device] = None) -> list[dict]:
    """One row per (op, backend): available on `device` (default: CPU, and CUDA when present) and why not."""
    devices = [torch.device("cpu")] if device is None else [torch.device(device)]
    if device is None and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    rows = []
    for op in OPS:
        for name in BACKENDS[1:]:
            if op == "softmax_denoise" and name == "faiss":
                continue
            b = _REGISTRY[op].get(name)
            for dev in devices:
                why = _reason(op, name, dev)
                rows.append(
                    dict(
                        op=op,
                        backend=name,
                        device=dev.type,
                        available=why is None,
                        reason=(b.description if (why is None and b is not None) else why),
                    )
                )
    return rows


def _always(device):
    return None


def _load_softmax_torch():
    from diffgen_fast.ops.softmax_denoise.reference import softmax_denoise_torch

    return softmax_denoise_torch


def _probe_softmax_triton(device):
    from diffgen_fast.ops.softmax_denoise import triton as tri

    return tri.probe(device)


def _load_softmax_triton():
    from diffgen_fast.ops.softmax_denoise.triton import softmax_denoise_triton

    return softmax_denoise_triton


def _load_knn_torch():
    from diffgen_fast.ops.knn.reference import knn_torch

    return knn_torch


register(
    "softmax_denoise",
    "torch",
    probe=_always,
    load=_load_softmax_torch,
    description="reference: chunked torch with the exact (m, l, o) merge; exact/fast/auto precision; any device",
)
register(
    "knn",
    "torch",
    probe=_always,
    load=_load_knn_torch,
    description="reference: chunked torch, fp32 candidates + exact float64 re-rank; any device",
)
register(
    "softmax_denoise",
    "triton",
    probe=_probe_softmax_triton,
    load=_load_softmax_triton,
    description="Triton: two GEMM passes (scores + bias + row partials; P Y split over d and N), fused kernel for "
    "d <= 256; fp32/fp16/bf16; exact = 3xTF32 + float64 re-rank of the mass-carrying candidates",
)


# native CPU softmax denoiser
def _probe_softmax_cpu(device):
    from diffgen_fast.ops.softmax_denoise import native

    return native.probe(device)


def _load_softmax_cpu():
    from diffgen_fast.ops.softmax_denoise.native import softmax_denoise_cpu

    return softmax_denoise_cpu


register(
    "softmax_denoise",
    "cpu",
    probe=_probe_softmax_cpu,
    load=_load_softmax_cpu,
    description="native C++: fused kernel for d <= 64 (AVX-512 intrinsics with packed panels and a certified float64 "
    "norm expansion, else AVX-512/AVX2 clones; OpenMP, vectorised exp); BLAS scores + fused native epilogue + sparse "
    "P Y above; fp32/fp64; exact/fast/auto",
)


# native CUDA
def _probe_cuda(device):
    from diffgen_fast import _native_cuda

    return _native_cuda.probe(device)


def _load_softmax_cuda():
    from diffgen_fast.ops.softmax_denoise.native_cuda import softmax_denoise_cuda

    return softmax_denoise_cuda


def _load_knn_cuda():
    from diffgen_fast.ops.knn.native_cuda import knn_cuda

    return knn_cuda


register(
    "softmax_denoise",
    "cuda",
    probe=_probe_cuda,
    load=_load_softmax_cuda,
    description="native CUDA: fused small-d kernel, d <= 64 only (one query per thread, training tiles in shared "
    "memory, online softmax in registers, direct differences, N split over blocks); exact = float64 distances",
)
register(
    "knn",
    "cuda",
    probe=_probe_cuda,
    load=_load_knn_cuda,
    description="native CUDA: direct-difference distance tiles + per-row radix select / bitonic sort of k + margin "
    "candidates, float64 re-rank with a certified bound (torch reference for rows it cannot certify); k <= 1024",
)


# native CPU kNN
def _probe_knn_cpu(device):
    from diffgen_fast.ops.knn import native

    return native.probe(device)


def _load_knn_cpu():
    from diffgen_fast.ops.knn.native import knn_cpu

    return knn_cpu


register(
    "knn",
    "cpu",
    probe=_probe_knn_cpu,
    load=_load_knn_cpu,
    description="native C++: register-blocked distance panels (direct differences for d <= 32, norm expansion "
    "above; OpenMP, AVX-512/AVX2 clones) + bounded heaps of k + slack, float64 re-rank with a certified bound",
)


# faiss kNN (exact IndexFlatL2 streamed and certified; IVF / PQ / HNSW approximate with measured recall)
def _probe_knn_faiss(device):
    from diffgen_fast.ops.knn import faiss as fa

    return fa.probe(device)


def _load_knn_faiss():
    from diffgen_fast.ops.knn.faiss import knn_faiss

    return knn_faiss


register(
    "knn",
    "faiss",
    probe=_probe_knn_faiss,
    load=_load_knn_faiss,
    description="faiss: exact IndexFlatL2 per chunk with a float64 re-rank and a certified bound; IVF-Flat, IVF-PQ, "
    "HNSW or any factory string (index=), re-ranked exactly, recall measured on a sample; persistent FaissIndex",
)
