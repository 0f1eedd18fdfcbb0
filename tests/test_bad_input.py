"""Every bad input raises a clear error naming the argument."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffgen_fast import (
    BackendUnavailableError,
    InputError,
    InputTypeError,
    kde_log_density,
    knn,
    memorization,
    sample,
    softmax_denoise,
)
from diffgen_fast.denoisers import EmpiricalDenoiser

X = torch.randn(4, 6)
Y = torch.randn(10, 6)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: softmax_denoise(torch.randn(4, 5), Y, 1.0), InputError, r"x: .*d=5.*train"),
        (lambda: softmax_denoise(X, torch.randn(10, 7), 1.0), InputError, r"x: .*d=7"),
        (lambda: softmax_denoise(torch.randn(6), Y, 1.0), InputError, r"x: expected a batch"),
        (lambda: softmax_denoise(X.long(), Y, 1.0), InputTypeError, r"x: expected a floating dtype"),
        (lambda: softmax_denoise(X, Y.int(), 1.0), InputTypeError, r"train"),
        (lambda: softmax_denoise([[1.0]], Y, 1.0), InputTypeError, r"x: expected a torch.Tensor or numpy"),
        (
            lambda: softmax_denoise(X.clone().index_fill_(0, torch.tensor([2]), float("nan")), Y, 1.0),
            InputError,
            r"x: contains NaN or Inf \(first at row 2\)",
        ),
        (
            lambda: softmax_denoise(X, Y.clone().index_fill_(0, torch.tensor([7]), float("inf")), 1.0),
            InputError,
            r"train: contains NaN or Inf",
        ),
        (lambda: softmax_denoise(X, Y[:0], 1.0), InputError, r"train: empty"),
        (lambda: softmax_denoise(X, Y, 0.0), InputError, r"sigma: expected a finite value > 0"),
        (lambda: softmax_denoise(X, Y, -1.0), InputError, r"sigma"),
        (lambda: softmax_denoise(X, Y, float("nan")), InputError, r"sigma"),
        (lambda: softmax_denoise(X, Y, torch.tensor([1.0, 2.0, -1.0, 1.0])), InputError, r"sigma: expected values > 0"),
        (lambda: softmax_denoise(X, Y, torch.ones(3)), InputError, r"sigma: expected a scalar or 4 values"),
        (lambda: softmax_denoise(X, Y, "1.0"), InputTypeError, r"sigma"),
        (lambda: softmax_denoise(X, Y, 1.0, alpha=0.0), InputError, r"alpha"),
        (lambda: softmax_denoise(X, Y, 1.0, backend="gpu"), InputError, r"backend: expected one of"),
        (lambda: softmax_denoise(X, Y, 1.0, precision="medium"), InputError, r"precision: expected one of"),
        (lambda: softmax_denoise(X, Y, 1.0, backend="faiss"), BackendUnavailableError, r"knn only"),
        (lambda: kde_log_density(X, Y, 0.0), InputError, r"bandwidth"),
        (lambda: kde_log_density(X, Y, -2.0), InputError, r"bandwidth"),
        (lambda: knn(X, Y, 11), InputError, r"k: expected 1 <= k <= N = 10"),
        (lambda: knn(X, Y, 0), InputError, r"k: expected"),
        (lambda: knn(X, Y, 2.0), InputTypeError, r"k: expected an int"),
        (lambda: knn(X, Y, 2, backend="nope"), InputError, r"backend"),
        (lambda: knn(torch.randn(4, 5), Y, 2), InputError, r"queries: .*d=5"),
        (lambda: memorization(X, Y[:1]), InputError, r"at least 2 training points"),
        (lambda: memorization(X, Y, threshold=0), InputError, r"threshold"),
        (lambda: sample(EmpiricalDenoiser(Y), 2, sampler="dpm"), InputError, r"sampler: expected one of"),
        (lambda: sample(EmpiricalDenoiser(Y), 0), InputError, r"n: expected"),
        (lambda: sample(lambda x, s: x, 2), InputError, r"shape"),
    ],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_errors_are_builtin_subclasses():
    with pytest.raises(ValueError):
        softmax_denoise(X, Y, -1.0)
    with pytest.raises(TypeError):
        softmax_denoise(X.long(), Y, 1.0)


def test_numpy_nan_and_env_backend(monkeypatch):
    x = X.numpy().copy()
    x[0, 0] = np.nan
    with pytest.raises(InputError, match="x: contains NaN"):
        softmax_denoise(x, Y.numpy(), 1.0)
    monkeypatch.setenv("DIFFGEN_FAST_BACKEND", "bogus")
    with pytest.raises(InputError, match="DIFFGEN_FAST_BACKEND"):
        softmax_denoise(X, Y, 1.0)
    monkeypatch.setenv("DIFFGEN_FAST_BACKEND", "torch")
    softmax_denoise(X, Y, 1.0)  # explicit override to an available backend works
