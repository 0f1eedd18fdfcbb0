"""Shared front half of the public ops: check and flatten the queries, coerce the training set."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from diffgen_fast.errors import InputError
from diffgen_fast.layout import check_item_shapes
from diffgen_fast.ops._checks import check_finite, check_float, check_queries, compiling


class TensorChunks:
    """The part of the TrainingSet interface the driver uses, over a plain tensor [N, *shape]: what a tensor training
    set becomes while torch.compile traces (a TrainingSet's constructor does Python-level value checks that would
    put data-dependent guards in the graph)."""

    def __init__(self, t: torch.Tensor, name: str = "train") -> None:
        check_float(t, name)
        if t.ndim < 2:
            raise InputError(f"{name}: expected [N, d] or [N, *shape], got a tensor of shape {tuple(t.shape)}")
        self.tensor = t
        self.shape = tuple(t.shape[1:])
        self.d = math.prod(self.shape)
        self.dtype = t.dtype
        self.device = t.device
        self._name = name

    def __len__(self) -> int:
        return self.tensor.shape[0]

    def check_finite(self) -> None:
        check_finite(self.tensor, self._name)

    def iter_chunks(self, chunk_size: int | None = None, *, device: Any = None, dtype: torch.dtype | None = None):
        flat = self.tensor.reshape(len(self), self.d)
        n = len(self)
        rows = chunk_size or n
        for start in range(0, n, rows):
            yield start, flat[start : start + rows].to(device=device or self.device, dtype=dtype or self.dtype)


def prepare(x: Any, train: Any, *, x_name: str = "x", train_name: str = "train"):
    """Returns (x as given as a tensor [M, *shape], x flattened [M, d], TrainingSet, x_was_numpy).

    While torch.compile traces, a tensor training set becomes a TensorChunks (the same chunks, no Python-level value
    check)."""
    from diffgen_fast.data import TrainingSet

    xt, was_np = check_queries(x, x_name)
    if compiling() and isinstance(train, torch.Tensor):
        ts = TensorChunks(train, train_name)
    else:
        ts = TrainingSet.coerce(train, name=train_name)
    if len(ts) == 0:
        raise InputError(f"{train_name}: empty training set; expected at least one point")
    ts.check_finite()
    M = xt.shape[0]
    d = math.prod(xt.shape[1:])
    check_item_shapes(tuple(xt.shape[1:]), tuple(ts.shape), x_name=x_name, train_name=train_name)
    x2 = xt.reshape(M, d)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    return xt, x2, ts, was_np


def back(t: torch.Tensor, was_numpy: bool):
    """Return t as a numpy array if the caller gave numpy."""
    if t is None:
        return None
    if was_numpy:
        t = t.detach().cpu()
        if t.dtype == torch.bfloat16:
            t = t.float()
        return t.numpy()
    return t


__all__ = ["prepare", "back", "np"]
