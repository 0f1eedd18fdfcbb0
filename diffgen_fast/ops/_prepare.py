"""Shared front half of the public ops: check and flatten the queries, coerce the training set."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from diffgen_fast.errors import InputError
from diffgen_fast.layout import check_item_shapes
from diffgen_fast.ops._checks import check_queries


def prepare(x: Any, train: Any, *, x_name: str = "x", train_name: str = "train"):
    """Returns (x as given as a tensor [M, *shape], x flattened [M, d], TrainingSet, x_was_numpy)."""
    from diffgen_fast.data import TrainingSet

    xt, was_np = check_queries(x, x_name)
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
