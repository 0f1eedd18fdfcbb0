"""Linearity score, distance to D_G, linear distillation (docs/science.md 4) and the gap to D* (docs/science.md 7)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffgen_fast import EmpiricalDenoiser, GaussianDenoiser, InputError, InputTypeError, TrainingSet
from diffgen_fast.metrics.gap import analyze_gap, denoiser_gap
from diffgen_fast.metrics.gaussian import (
    LinearDenoiser,
    analyze_gaussian,
    gaussian_difference,
    linear_distill,
    linearity_score,
)

SIGMAS = [0.002, 0.05, 0.3, 1.0, 3.0, 10.0, 80.0]


@pytest.fixture(scope="module")
def digits():
    return TrainingSet.builtin("digits").subset(slice(0, 300))


@pytest.fixture(scope="module")
def gauss():
    return TrainingSet.gaussian(300, 8, mean=0.5, std=1.3, seed=1, dtype=torch.float64)


def _dg_maps(G: GaussianDenoiser, sigma: float):
    U, lam, mu = G.eigvecs, G.eigvals, G.mean
    W = U @ torch.diag(lam / (lam + sigma * sigma)) @ U.T
    return W, mu - W @ mu


# -- linearity -----------------------------------------------------------------------------------------------------


def test_linearity_of_gaussian_denoiser_is_one(digits, gauss):
    for ts in (digits, gauss):
        r = linearity_score(GaussianDenoiser(ts), ts, SIGMAS, n_pairs=64, center=True)
        assert r["sigma"] == SIGMAS
        assert len(r["linearity"]) == len(r["stderr"]) == len(SIGMAS)
        assert all(isinstance(v, float) for v in r["linearity"] + r["stderr"])
        np.testing.assert_allclose(r["linearity"], 1.0, atol=1e-9)


def test_linearity_raw_formula_on_zero_mean_data():
    x = TrainingSet.gaussian(200, 6, seed=3, dtype=torch.float64).flat()
    ts = TrainingSet(x - x.mean(dim=0))  # exactly zero mean: D_G is linear, not just affine
    r = linearity_score(GaussianDenoiser(ts), ts, SIGMAS, n_pairs=32, center=False)
    np.testing.assert_allclose(r["linearity"], 1.0, atol=1e-9)
    assert r["center"] is False


def test_empirical_denoiser_linear_at_large_nonlinear_at_small_sigma(digits):
    E = EmpiricalDenoiser(digits, precision="exact")
    r = linearity_score(E, digits, [0.05, 0.1, 80.0], n_pairs=128, seed=1, center=True, a=0.5)
    lin = r["linearity"]
    assert lin[2] > 0.99
    assert lin[0] < 0.9 and lin[1] < 0.9  # measured 0.84 +- 0.01 (about D(mu))
    assert max(r["stderr"][:2]) < 0.03
    # the authors' score (raw values, mean over a in linspace(0.99, 0.5, 5)): measured 0.947 +- 0.001
    raw = linearity_score(E, digits, [0.05, 0.1, 80.0], n_pairs=128, seed=1)["linearity"]
    assert raw[0] < 0.96 and raw[1] < 0.96 and raw[2] > 0.999


def test_linearity_is_reproducible_and_accepts_plain_callables(gauss):
    G = GaussianDenoiser(gauss)
    r1 = linearity_score(G, gauss, [0.5, 2.0], n_pairs=16, seed=7, batch=5)
    r2 = linearity_score(lambda x, s: G(x, s).numpy(), gauss, [0.5, 2.0], n_pairs=16, seed=7, batch=16)
    np.testing.assert_allclose(r1["linearity"], r2["linearity"], rtol=0, atol=1e-12)
    # a non-linear map has a score below 1
    r3 = linearity_score(lambda x, s: torch.tanh(3 * x), gauss, [0.5], n_pairs=64)
    assert r3["linearity"][0] < 0.99


# -- distance to D_G -------------------------------------------------------------------------------------------------


def test_gaussian_difference(digits):
    G = GaussianDenoiser(digits)
    r = gaussian_difference(G, digits, SIGMAS, n=32)
    assert r["difference"] == [0.0] * len(SIGMAS)
    assert r["stderr"] == [0.0] * len(SIGMAS)
    E = EmpiricalDenoiser(digits, precision="exact")
    d = gaussian_difference(E, digits, SIGMAS, n=32, gaussian=G)["difference"]
    assert all(v > 0 for v in d)
    assert d[3] > d[0] and d[3] > d[-1]  # far from Gaussian in between


# -- linear distillation ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma", [0.1, 1.0, 10.0])
def test_linear_distill_recovers_gaussian_denoiser(gauss, sigma):
    G = GaussianDenoiser(gauss)
    W0, b0 = _dg_maps(G, sigma)
    W, b = linear_distill(G, gauss, sigma, n=4096)
    assert W.shape == (8, 8) and b.shape == (8,) and W.dtype == torch.float64
    assert (W - W0).abs().max() < 5e-6 and (b - b0).abs().max() < 5e-6
    W, b = linear_distill(G, gauss, sigma, n=4096, ridge=0.0, batch=1000)
    assert (W - W0).abs().max() < 1e-10 and (b - b0).abs().max() < 1e-10


def test_linear_denoiser_evaluates_distilled_maps(gauss):
    G = GaussianDenoiser(gauss)
    L = LinearDenoiser.distill(G, gauss, [0.1, 1.0], n=2048, ridge=0.0)
    x = gauss.flat()[:10] + 0.7 * torch.randn(10, 8, dtype=torch.float64)
    torch.testing.assert_close(L(x, 1.0), G(x, 1.0), rtol=0, atol=1e-10)
    torch.testing.assert_close(L(x, torch.full((10, 1), 0.1)), G(x, 0.1), rtol=0, atol=1e-10)
    L2 = LinearDenoiser(lambda s: _dg_maps(G, s))
    torch.testing.assert_close(L2(x, 2.5), G(x, 2.5), rtol=0, atol=1e-12)
    with pytest.raises(InputError, match="sigma"):
        L(x, torch.tensor([0.1, 1.0] * 5))
    with pytest.raises(InputError, match="alpha"):
        L(x, 1.0, alpha=0.5)


# -- denoiser gap ----------------------------------------------------------------------------------------------------


def test_gap_of_optimum_to_itself_is_zero(digits):
    E = EmpiricalDenoiser(digits, precision="exact")
    r = denoiser_gap(E, digits, SIGMAS, n=32)
    assert r["gap"] == [0.0] * len(SIGMAS)
    assert r["ci_low"] == r["ci_high"] == [0.0] * len(SIGMAS)
    assert r["n"] == 32


def test_gap_of_gaussian_denoiser_peaks_in_between(digits):
    G = GaussianDenoiser(digits)
    r = denoiser_gap(G, digits, SIGMAS, n=64, seed=2)
    gap, lo, hi = r["gap"], r["ci_low"], r["ci_high"]
    assert all(g > 0 for g in gap)
    np.testing.assert_allclose(r["gap_per_dim"], np.asarray(gap) / digits.d)
    assert all(a <= g <= b for a, g, b in zip(lo, gap, hi))
    peak = max(range(len(SIGMAS)), key=lambda i: gap[i])
    assert 0 < peak < len(SIGMAS) - 1
    # robustly: the lower end of the interval at sigma = 1 is far above the upper ends at the extremes
    assert lo[3] > 100 * hi[0] and lo[3] > 100 * hi[-1]


# -- analyses with files ---------------------------------------------------------------------------------------------


def test_analyze_gaussian_writes_files(digits, tmp_path):
    G = GaussianDenoiser(digits)
    E = EmpiricalDenoiser(digits, precision="exact")
    res = analyze_gaussian(
        {"D*": E, "D_G": G}, digits, sigmas=[0.05, 1.0, 80.0], n_pairs=16, center=True, out_dir=tmp_path
    )
    data = json.loads((tmp_path / "gaussian.json").read_text())
    assert data["sigma"] == [0.05, 1.0, 80.0]
    assert set(data["denoisers"]) == {"D*", "D_G"}
    np.testing.assert_allclose(data["denoisers"]["D_G"]["linearity"], 1.0, atol=1e-9)
    assert data["denoisers"]["D_G"]["difference"] == [0.0, 0.0, 0.0]
    assert res["denoisers"]["D*"]["linearity"] == data["denoisers"]["D*"]["linearity"]
    png = tmp_path / "gaussian.png"
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert res["files"]["png"] == str(png)


def test_analyze_gaussian_default_sigmas(gauss):
    res = analyze_gaussian({"G": GaussianDenoiser(gauss)}, gauss, n_pairs=4)
    assert len(res["sigma"]) == 12 and res["sigma"][0] == pytest.approx(80.0) and min(res["sigma"]) > 0
    assert "files" not in res


def test_analyze_gap_writes_files(digits, tmp_path):
    G = GaussianDenoiser(digits)
    E = EmpiricalDenoiser(digits, precision="exact")
    res = analyze_gap({"D_G": G, "D*": E}, digits, sigmas=[0.002, 1.0, 80.0], n=16, out_dir=tmp_path / "out")
    data = json.loads((tmp_path / "out" / "gap.json").read_text())
    assert data["sigma"] == [0.002, 1.0, 80.0]
    assert data["models"]["D*"]["gap"] == [0.0, 0.0, 0.0]
    g = data["models"]["D_G"]
    assert g["gap"][1] > g["gap"][0] and g["gap"][1] > g["gap"][2]
    for key in ("gap_per_dim", "ci_low", "ci_high", "stderr"):
        assert len(g[key]) == 3
    png = tmp_path / "out" / "gap.png"
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert res["models"]["D_G"]["gap"] == g["gap"]


# -- bad arguments ---------------------------------------------------------------------------------------------------


def test_bad_arguments(gauss):
    G = GaussianDenoiser(gauss)
    with pytest.raises(InputError, match="sigmas"):
        linearity_score(G, gauss, [1.0, 0.0])
    with pytest.raises(InputError, match="sigmas"):
        denoiser_gap(G, gauss, [])
    with pytest.raises(InputError, match="sigmas"):
        gaussian_difference(G, gauss, [float("nan")])
    with pytest.raises(InputError, match="n_pairs"):
        linearity_score(G, gauss, 1.0, n_pairs=1)
    with pytest.raises(InputError, match="a:"):
        linearity_score(G, gauss, 1.0, a=1.0)
    with pytest.raises(InputError, match="n:"):
        denoiser_gap(G, gauss, 1.0, n=0)
    with pytest.raises(InputError, match="batch"):
        gaussian_difference(G, gauss, 1.0, batch=0)
    with pytest.raises(InputError, match="ridge"):
        linear_distill(G, gauss, 1.0, ridge=-1.0)
    with pytest.raises(InputError, match="sigma"):
        linear_distill(G, gauss, -1.0)
    with pytest.raises(InputError, match="model"):
        denoiser_gap(lambda x, s: x[:, :3], gauss, 1.0, n=4)
    with pytest.raises(InputTypeError, match="model"):
        denoiser_gap("not callable", gauss, 1.0)
    with pytest.raises(InputTypeError, match="n_pairs"):
        linearity_score(G, gauss, 1.0, n_pairs=2.5)
    with pytest.raises(InputTypeError, match="models"):
        analyze_gap({}, gauss)
    with pytest.raises(InputTypeError, match="denoisers"):
        analyze_gaussian([G], gauss)
    with pytest.raises(InputError, match="maps"):
        LinearDenoiser({})
