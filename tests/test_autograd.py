"""Autograd through softmax_denoise and kde_log_density on every backend: the closed-form backward
(J = (alpha / sigma^2) Cov_w(y), dlse/dx = (alpha D - x) / sigma^2, and the sigma / alpha derivatives) against
torch.autograd.gradcheck in float64 and against autograd through a dense float64 implementation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import diffgen_fast as dg
from diffgen_fast.errors import InputError
from diffgen_fast.ops import dispatch
from tests.helpers import make_problem


def _backends():
    out = ["auto", "torch"]
    for name in ("cpu", "triton"):
        try:
            dispatch.resolve("softmax_denoise", name, torch.device("cpu"), torch.float64, d=5)
            out.append(name)
        except Exception:
            pass
    return out


BACKENDS = _backends()


def dense(x, y, s, a):
    """Float64 dense D*(x) and lse with plain autograd (differences, torch.softmax)."""
    diff = x[:, None, :] - a[:, None, None] * y[None]
    z = -(diff * diff).sum(-1) / (2 * s[:, None] ** 2)
    return torch.softmax(z, dim=1) @ y, torch.logsumexp(z, dim=1)


# gradcheck's finite differences need a float64-accurate forward; the Triton kernels accumulate in float32 (its
# backward is the same float64 pass, checked against the dense truth below)
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_gradcheck_float64(backend):
    x, y = make_problem(5, 40, 6, dtype=torch.float64, seed=1)
    x.requires_grad_()
    s = (torch.rand(5, dtype=torch.float64) + 0.3).requires_grad_()
    a = (torch.rand(5, dtype=torch.float64) * 0.5 + 0.6).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, s, a: dg.softmax_denoise(x, y, s, a, backend=backend, return_lse=True),
                                    (x, s, a))  # fmt: skip
    assert torch.autograd.gradcheck(lambda x, h: dg.kde_log_density(x, y, h, backend=backend), (x, s))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sigma", [0.002, 0.05, 1.0, 80.0, 1e4])
def test_float32_vjp_matches_float64_dense(backend, sigma):
    x, y = make_problem(12, 300, 7, seed=2, sigma=sigma if sigma < 1 else 0.01)
    M = x.shape[0]
    g = torch.Generator().manual_seed(3)
    s = sigma * (0.5 + torch.rand(M, generator=g, dtype=torch.float64))  # per-query sigma
    a = 0.7 + 0.3 * torch.rand(M, generator=g, dtype=torch.float64)
    gD = torch.randn(M, 7, generator=g, dtype=torch.float64)
    gL = torch.randn(M, generator=g, dtype=torch.float64)
    xr, sr, ar = (t.double().clone().requires_grad_() for t in (x, s, a))
    D, L = dense(xr, y.double(), sr, ar)
    ref = torch.autograd.grad((D * gD).sum() + (L * gL).sum(), (xr, sr, ar))
    xs, ss, as_ = x.clone().requires_grad_(), s.clone().requires_grad_(), a.clone().requires_grad_()
    D2, L2 = dg.softmax_denoise(xs, y, ss, as_, backend=backend, return_lse=True)
    got = torch.autograd.grad((D2.double() * gD).sum() + (L2.double() * gL).sum(), (xs, ss, as_))
    assert got[0].dtype == torch.float32
    for name, r, o in zip(("x", "sigma", "alpha"), ref, got):
        scale = float(r.abs().max()) + 1e-300
        err = float((o.double() - r).abs().max()) / scale
        # the backward is float64 on the float32-rounded inputs: float32-level agreement with the float64 truth
        assert err < 1e-4, f"{name}: relative error {err:.2e} at sigma {sigma}"


def test_jacobian_is_symmetric_covariance():
    x, y = make_problem(1, 30, 4, dtype=torch.float64, seed=4)
    s, a = 0.4, 0.8
    J = torch.autograd.functional.jacobian(lambda v: dg.softmax_denoise(v[None], y, s, a)[0], x[0])
    diff = x[0][None] - a * y
    w = torch.softmax(-(diff * diff).sum(1) / (2 * s * s), 0)
    D = w @ y
    cov = (w[:, None] * y).T @ y - torch.outer(D, D)
    torch.testing.assert_close(J, a / s**2 * cov, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(J, J.T, rtol=1e-9, atol=1e-12)


def test_auto_backend_takes_requires_grad():
    """Regression: x.requires_grad on backend "auto" raised (the native path refused it)."""
    x, y = make_problem(4, 50, 5, seed=5)
    x.requires_grad_()
    dg.softmax_denoise(x, y, 0.5).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    # the KDE's gradient in x is the score (D - x) / h^2
    xk = x.detach().double().requires_grad_()
    (gk,) = torch.autograd.grad(dg.kde_log_density(xk, y, 0.3).sum(), xk)
    torch.testing.assert_close(gk, (dg.softmax_denoise(xk.detach(), y.double(), 0.3) - xk.detach()) / 0.09)


def test_no_grad_and_numpy_paths_unchanged():
    x, y = make_problem(4, 50, 5, seed=6)
    with torch.no_grad():
        out = dg.softmax_denoise(x.clone().requires_grad_(), y, 0.5)
    assert not out.requires_grad
    assert isinstance(dg.softmax_denoise(x.numpy(), y.numpy(), 0.5), np.ndarray)


def test_training_set_requiring_grad_is_refused():
    x, y = make_problem(4, 50, 5, seed=7)
    with pytest.raises(InputError, match="train: requires grad"):
        dg.softmax_denoise(x, y.requires_grad_(), 0.5)
