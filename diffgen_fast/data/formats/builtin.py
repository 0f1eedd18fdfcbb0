"""Sets that need no file: the built-in data sets that ship with a dependency (:meth:`TrainingSet.builtin`) and
seeded isotropic Gaussian samples (:meth:`TrainingSet.gaussian`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch

from diffgen_fast.data._checks import _check_float_dtype, _is_int
from diffgen_fast.errors import InputError, InputTypeError

if TYPE_CHECKING:
    from diffgen_fast.data.training_set import TrainingSet

#: Names accepted by :meth:`TrainingSet.builtin`.
BUILTINS = ("digits",)


def builtin(cls, name: str) -> TrainingSet:
    """See :meth:`TrainingSet.builtin`."""
    key = name.lower() if isinstance(name, str) else name
    if key == "digits":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        x = (np.asarray(bunch.data, dtype=np.float64) / 8.0 - 1.0).astype(np.float32).reshape(-1, 1, 8, 8)
        return cls(x, np.asarray(bunch.target), value_range=(-1.0, 1.0), source="builtin:digits")
    raise InputError(f"name: unknown built-in data set {name!r}; expected one of {', '.join(BUILTINS)}")


def gaussian(
    cls,
    n: int,
    d: int,
    mean: float = 0.0,
    std: float = 1.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> TrainingSet:
    """See :meth:`TrainingSet.gaussian`."""
    if not _is_int(n) or n < 1:
        raise InputError(f"n: expected a positive int number of points (no empty training set), got {n!r}")
    if not _is_int(d) or d < 1:
        raise InputError(f"d: expected a positive int dimension, got {d!r}")
    if not _is_int(seed):
        raise InputTypeError(f"seed: expected an int, got {type(seed).__name__}")
    try:
        mean_f, std_f = float(mean), float(std)
    except (TypeError, ValueError) as e:
        raise InputTypeError(f"mean, std: expected real numbers, got {mean!r}, {std!r}") from e
    if not math.isfinite(mean_f):
        raise InputError(f"mean: expected a finite number, got {mean!r}")
    if not (math.isfinite(std_f) and std_f >= 0):
        raise InputError(f"std: expected a finite number >= 0, got {std!r}")
    dtype = _check_float_dtype(dtype, "dtype")
    gen = torch.Generator().manual_seed(int(seed))
    draw = torch.float64 if dtype == torch.float64 else torch.float32
    x = torch.randn(int(n), int(d), generator=gen, dtype=draw).mul_(std_f).add_(mean_f).to(dtype)
    source = f"gaussian(n={n}, d={d}, mean={mean_f:g}, std={std_f:g}, seed={seed})"
    return cls(x, source=source)
