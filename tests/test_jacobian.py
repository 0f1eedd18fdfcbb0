"""softmax_denoise_jvp and jacobian_spectrum against dense float64 Jacobians and closed forms."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import diffgen_fast as dg
from diffgen_fast.errors import InputError
from diffgen_fast.metrics.jacobian import jacobian_spectrum
from diffgen_fast.ops import softmax_denoise_jvp
from tests.helpers import make_problem


def dense_jacobian(x, y, s, a):
    diff = x[None] - a * y
    w = torch.softmax(-(diff * diff).sum(1) / (2 * s * s), 0)
    D = w @ y
    return a / s**2 * ((w[:, None] * y).T @ y - torch.outer(D, D))


@pytest.mark.parametrize("sigma", [0.002, 0.05, 1.0, 80.0, 1e4])
def test_jvp_equals_closed_form(sigma):
    x, y = make_problem(6, 200, 5, dtype=torch.float64, seed=1, sigma=min(sigma, 0.01))
    g = torch.Generator().manual_seed(2)
    v = torch.randn(6, 5, generator=g, dtype=torch.float64)
    s = sigma * (0.5 + torch.rand(6, generator=g, dtype=torch.float64))
    a = 0.6 + 0.4 * torch.rand(6, generator=g, dtype=torch.float64)
    out = torch.full_like(v, float("nan"))
    out[:] = softmax_denoise_jvp(x, y, s, v, a)
    ref = torch.stack([dense_jacobian(x[r], y, float(s[r]), float(a[r])) @ v[r] for r in range(6)])
    scale = ref.abs().max() + 1e-300
    assert float((out - ref).abs().max() / scale) < 1e-9


def test_jvp_shapes_numpy_and_errors():
    x, y = make_problem(3, 50, 8, seed=3)
    xi, yi = x.reshape(3, 2, 2, 2), y.reshape(50, 2, 2, 2)
    out = softmax_denoise_jvp(xi.numpy(), yi.numpy(), 0.5, np.ones((3, 2, 2, 2), "f4"))
    assert isinstance(out, np.ndarray) and out.shape == (3, 2, 2, 2) and out.dtype == np.float32
    with pytest.raises(InputError, match="v: expected the shape of x"):
        softmax_denoise_jvp(x, y, 0.5, torch.ones(3, 7))


def test_spectrum_of_the_empirical_optimum():
    _, y = make_problem(1, 60, 6, dtype=torch.float64, seed=4)
    x = y[0] + 0.3 * torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    res = jacobian_spectrum(dg.EmpiricalDenoiser(y), x, 0.4, k=3)
    J = dense_jacobian(x, y, 0.4, 1.0)
    ev, evec = torch.linalg.eigh(J)
    np.testing.assert_allclose(res["eigenvalues"], ev.flip(0)[:3].numpy(), rtol=1e-7, atol=1e-10)
    for i in range(3):  # eigenvectors up to sign
        assert abs(float(torch.from_numpy(res["eigenvectors"][i]) @ evec[:, -1 - i])) == pytest.approx(1, abs=1e-6)
    assert res["exact"] and res["asymmetry"] == 0.0
    assert res["trace"] == pytest.approx(float(torch.trace(J)), rel=1e-9)


def test_spectrum_of_the_gaussian_denoiser_by_autograd():
    """D_G's Jacobian is U diag(lam / (lam + s^2)) U^T: eigenvalues lam / (lam + s^2), symmetric."""
    g = torch.Generator().manual_seed(6)
    scales = torch.tensor([3.0, 2.0, 1.0, 0.5, 0.1], dtype=torch.float64)
    y = torch.randn(400, 5, generator=g, dtype=torch.float64) * scales
    G = dg.GaussianDenoiser(y)
    res = jacobian_spectrum(G, torch.zeros(5, dtype=torch.float64), 1.0, k=4, trace_probes=64, dense_max=0)
    lam = G.eigvals
    np.testing.assert_allclose(res["eigenvalues"], (lam / (lam + 1.0))[:4].numpy(), rtol=1e-8)
    assert not res["exact"] and res["asymmetry"] < 1e-10
    assert abs(res["trace"] - float((lam / (lam + 1)).sum())) < 5 * res["trace_stderr"] + 1e-9


def test_spectrum_bad_input():
    y = torch.randn(20, 4, dtype=torch.float64)
    D = dg.EmpiricalDenoiser(y)
    with pytest.raises(InputError, match="k: expected"):
        jacobian_spectrum(D, y[0], 0.5, k=4)
    with pytest.raises(InputError, match="sigma"):
        jacobian_spectrum(D, y[0], 0.0, k=2)


@pytest.mark.parametrize("dense_max", [0, 1024])
def test_dense_and_lanczos_paths_agree_and_survive_a_zero_jacobian(dense_max):
    _, y = make_problem(1, 80, 6, dtype=torch.float64, seed=8)
    D = dg.EmpiricalDenoiser(y)
    x = y[3] + 0.2 * torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    res = jacobian_spectrum(D, x, 0.3, k=3, dense_max=dense_max)
    ev = torch.linalg.eigvalsh(dense_jacobian(x, y, 0.3, 1.0)).flip(0)[:3]
    np.testing.assert_allclose(res["eigenvalues"], ev.numpy(), rtol=1e-7, atol=1e-10)
    zero = jacobian_spectrum(D, y[3], 1e-4, k=2, dense_max=dense_max)  # all weight on one point: J = 0
    assert np.all(zero["eigenvalues"] == 0) and zero["trace"] == 0


@pytest.mark.slow  # CLI end to end, ~28 s
def test_analyze_jacobian_cli(tmp_path):
    import json

    from click.testing import CliRunner

    from diffgen_fast.cli import main

    r = CliRunner().invoke(main, ["analyze", "jacobian", "--steps", "20", "--sigmas", "3", "--points", "2", "--k", "4",
                                  "--no-progress", "--out", str(tmp_path)])  # fmt: skip
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "jacobian.json").read_text())
    dstar = res["denoisers"]["D* (empirical)"]
    assert dstar["exact"] and dstar["effective_rank"][-1] == 0  # sigma = 0.002: D* copies one point, J = 0
    dg_ = res["denoisers"]["D_G (Gaussian)"]
    assert dg_["effective_rank"][-1] > 30  # D_G at tiny sigma is near the identity on the data's span
    assert (tmp_path / "jacobian.png").stat().st_size > 0 and "closed form" in r.output
