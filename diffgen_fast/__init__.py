"""diffgen-fast: exact, fast empirical optimal denoisers, KDE and kNN for diffusion-model memorization studies."""

from __future__ import annotations

__version__ = "0.1.0"

from diffgen_fast.data import TrainingSet
from diffgen_fast.denoisers import EmpiricalDenoiser, GaussianDenoiser, KNNDenoiser
from diffgen_fast.errors import (
    BackendUnavailableError,
    DataFormatError,
    DiffgenError,
    InputError,
    InputTypeError,
    StaleIndexError,
)
from diffgen_fast.metrics.memorization import MemorizationResult, memorization
from diffgen_fast.ops import kde_log_density, knn, softmax_denoise, softmax_denoise_jvp
from diffgen_fast.sampling import sample


def __getattr__(name):  # FaissIndex imports faiss lazily
    if name == "FaissIndex":
        from diffgen_fast.ops.knn.faiss import FaissIndex

        return FaissIndex
    raise AttributeError(f"module 'diffgen_fast' has no attribute {name!r}")


__all__ = [
    "__version__",
    "TrainingSet",
    "EmpiricalDenoiser",
    "GaussianDenoiser",
    "KNNDenoiser",
    "MemorizationResult",
    "memorization",
    "softmax_denoise",
    "softmax_denoise_jvp",
    "kde_log_density",
    "knn",
    "sample",
    "BackendUnavailableError",
    "DataFormatError",
    "DiffgenError",
    "InputError",
    "InputTypeError",
    "StaleIndexError",
    "FaissIndex",
]
