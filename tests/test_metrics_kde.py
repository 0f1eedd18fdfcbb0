"""Halder 2024 relative distance: closed-form L2 distances of Gaussian mixtures, KL, the Delta sweep, outputs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.stats import multivariate_normal

from diffgen_fast.errors import InputError
from diffgen_fast.metrics.kde import (
    analyze_kde,
    delta_sweep,
    gaussian_kl,
    gaussian_kl_mc,
    gaussian_mixture,
    gaussian_mixture_inner,
    halder_bandwidth,
    l2_distance,
    linear_denoiser_fit,
    linear_kl,
    log_l2_distance,
    relative_distance,
    silverman_bandwidth,
)


def _grid(d: int, lo: float, hi: float, step: float):
    ax = np.arange(lo, hi + step / 2, step)
    pts = np.stack(np.meshgrid(*([ax] * d), indexing="ij"), axis=-1).reshape(-1, d)
    return pts, step**d


def _quad_l2(p, q, d, lo=-12.0, hi=12.0, step=None):
    # the trapezoid rule on a uniform grid is spectrally accurate for smooth integrands that vanish at the edges
    step = step or (0.01 if d == 1 else 0.04)
    pts, dv = _grid(d, lo, hi, step)
    fp, fq = np.exp(p.log_pdf(pts)), np.exp(q.log_pdf(pts))
    return float(np.sum((fp - fq) ** 2) * dv), float(np.sum(fp * fq) * dv)


def _random_spd(rng, d, scale=1.0):
    A = rng.standard_normal((d, d))
    return scale * (A @ A.T / d + 0.3 * np.eye(d))


def test_l2_matches_quadrature_1d():
    p = gaussian_mixture([[0.0], [1.5], [-2.0]], [0.5, 1.2, 0.3], weights=[0.5, 0.3, 0.2])
    q = gaussian_mixture([[0.4], [-1.0]], 0.8)
    single_a = gaussian_mixture([0.0], 1.0)
    single_b = gaussian_mixture([0.7], 2.0)
    for a, b in [(p, q), (single_a, single_b), (p, single_b)]:
        ref_d, ref_inner = _quad_l2(a, b, 1)
        assert l2_distance(a, b) == pytest.approx(ref_d, rel=1e-6)
        assert gaussian_mixture_inner(a, b) == pytest.approx(ref_inner, rel=1e-6)
        assert math.exp(log_l2_distance(a, b)) == pytest.approx(ref_d, rel=1e-6)
        assert l2_distance(a, b) == pytest.approx(l2_distance(b, a), rel=1e-12)


def test_l2_matches_quadrature_2d():
    rng = np.random.default_rng(3)
    iso_mix = gaussian_mixture(rng.standard_normal((4, 2)), rng.uniform(0.3, 1.0, 4), rng.uniform(0.5, 1.0, 4))
    iso_shared = gaussian_mixture(rng.standard_normal((3, 2)), 0.6)
    full_a = gaussian_mixture([0.3, -0.2], _random_spd(rng, 2))
    full_b = gaussian_mixture([[-0.5, 0.4], [1.0, 0.0]], _random_spd(rng, 2, 0.7))
    for a, b in [(iso_mix, iso_shared), (full_a, iso_mix), (iso_shared, full_b), (full_a, full_b)]:
        ref_d, ref_inner = _quad_l2(a, b, 2)
        assert l2_distance(a, b) == pytest.approx(ref_d, rel=1e-6)
        assert gaussian_mixture_inner(a, b) == pytest.approx(ref_inner, rel=1e-6)
        assert l2_distance(a, b) == pytest.approx(l2_distance(b, a), rel=1e-10)


def test_l2_of_a_density_with_itself_is_zero():
    rng = np.random.default_rng(0)
    for p in [
        gaussian_mixture(rng.standard_normal((20, 5)), 0.4),
        gaussian_mixture(rng.standard_normal((1, 5)), _random_spd(rng, 5)),
    ]:
        assert l2_distance(p, p) == 0.0
        assert log_l2_distance(p, p) == -math.inf
    # a full covariance equal to an isotropic one describes the same density
    a = gaussian_mixture([1.0, 2.0, 3.0], 0.7)
    b = gaussian_mixture([1.0, 2.0, 3.0], 0.7 * np.eye(3))
    assert l2_distance(a, b) <= 1e-14 * gaussian_mixture_inner(a, a)


def test_relative_distance_pieces_match_references():
    from diffgen_fast import kde_log_density

    rng = np.random.default_rng(1)
    d, N, m, s, h = 3, 30, 0.5, 1.3, 0.4
    y = m + s * rng.standard_normal((N, d))
    r = relative_distance(y, m=m, s=s, generator="gaussian", h=h)
    li = r["log_inner"]
    # <rho_T, rho_O> = KDE of T at m 1 with bandwidth sqrt(h^2 + s^2)
    ref_TO = kde_log_density(np.full((1, d), m), y, math.sqrt(h * h + s * s), backend="torch")
    assert li["TO"] == pytest.approx(float(ref_TO[0]), rel=1e-12)
    # <rho_T, rho_T> = mean_i KDE(y_i) with bandwidth sqrt(2) h
    ref_TT = kde_log_density(y, y, math.sqrt(2.0) * h, backend="torch")
    assert li["TT"] == pytest.approx(float(np.log(np.mean(np.exp(ref_TT)))), rel=1e-12)
    # <g, rho_T> with g = N(mu_hat, C_hat + h^2 I): mean_i N(y_i; mu_hat, C_hat + 2 h^2 I)
    mu, C = y.mean(0), np.cov(y, rowvar=False)
    ref_GT = np.log(np.mean(multivariate_normal(mu, C + 2 * h * h * np.eye(d)).pdf(y)))
    assert li["GT"] == pytest.approx(ref_GT, rel=1e-10)
    ref_GO = multivariate_normal(mu, C + (h * h + s * s) * np.eye(d)).logpdf(np.full(d, m))
    assert li["GO"] == pytest.approx(ref_GO, rel=1e-10)
    # the stable Delta (without <g,g>) equals the plain difference of the two distances here
    assert r["Delta"] == pytest.approx(r["E_TG"] - r["E_OG"], rel=1e-9)
    assert r["Delta_rel"] == pytest.approx(r["Delta"] * (4 * math.pi * s * s) ** (d / 2), rel=1e-12)
    assert r["E_TG"] > 0 and r["E_OG"] > 0
    # the thin-SVD path of the Gaussian generator equals the generic full-covariance mixture path
    g = gaussian_mixture(mu, C + h * h * np.eye(d))
    rho_T = gaussian_mixture(y, h * h)
    rho_O = gaussian_mixture(np.full(d, m), s * s)
    assert r["E_TG"] == pytest.approx(l2_distance(g, rho_T), rel=1e-9)
    assert r["E_OG"] == pytest.approx(l2_distance(g, rho_O), rel=1e-9)
    assert li["GG"] == pytest.approx(math.log(gaussian_mixture_inner(g, g)), rel=1e-12)


def test_gaussian_generator_with_fewer_points_than_dimensions():
    rng = np.random.default_rng(6)
    d, N, h = 12, 5, 0.5
    y = rng.standard_normal((N, d))
    r = relative_distance(y, h=h)
    mu, C = y.mean(0), np.cov(y, rowvar=False)  # rank N - 1 < d
    ref_GT = np.log(np.mean(multivariate_normal(mu, C + 2 * h * h * np.eye(d)).pdf(y)))
    assert r["log_inner"]["GT"] == pytest.approx(ref_GT, rel=1e-10)
    g = gaussian_mixture(mu, C + h * h * np.eye(d))
    assert r["E_OG"] == pytest.approx(l2_distance(g, gaussian_mixture(np.zeros(d), 1.0)), rel=1e-9)


def test_kde_generator_memorizes():
    rng = np.random.default_rng(2)
    y = rng.standard_normal((25, 4))
    r = relative_distance(y, generator="kde")
    assert r["E_TG"] == 0.0 and r["h_gen"] == r["h"] == pytest.approx(silverman_bandwidth(25, 4))
    assert r["Delta"] == pytest.approx(-r["E_OG"], rel=1e-12) and r["Delta"] < 0
    r2 = relative_distance(y, generator="kde", h_gen=0.8 * r["h"])
    assert r2["E_TG"] > 0
    assert r2["Delta"] == pytest.approx(r2["E_TG"] - r2["E_OG"], rel=1e-8)


def test_high_dimension_stays_finite_in_log_space():
    rng = np.random.default_rng(4)
    d = 3000
    r = relative_distance(rng.standard_normal((8, d)), generator="gaussian")
    # <rho_O, rho_O> = (4 pi)^(-1500) underflows float64; the log-scale and relative values do not
    assert r["log_inner"]["OO"] < -3000
    for k in ("log_E_TG", "log_E_OG", "log_abs_Delta", "Delta_rel", "E_TG_rel", "E_OG_rel"):
        assert math.isfinite(r[k]), k
    assert r["sign_Delta"] in (-1.0, 1.0)
    assert np.sign(r["Delta_rel"]) == r["sign_Delta"]


def test_gaussian_kl_matches_monte_carlo():
    rng = np.random.default_rng(5)
    d, m, s = 3, 0.3, 1.4
    mu = m + 0.5 * rng.standard_normal(d)
    C = _random_spd(rng, d, 1.5)
    kl = gaussian_kl(mu, C, m, s)
    mc = gaussian_kl_mc(mu, C, m, s, n=200_000, seed=7)
    assert kl > 0
    assert abs(mc["kl"] - kl) < 3 * mc["stderr"]
    assert mc["stderr"] < 0.02 * kl
    # the truth has KL 0, and a small perturbation is small and positive
    assert gaussian_kl(np.full(4, m), s * s * np.eye(4), m, s) == pytest.approx(0.0, abs=1e-12)
    assert 0 < gaussian_kl(np.full(4, m + 1e-3), s * s * np.eye(4), m, s) < 1e-5
    truth_mc = gaussian_kl_mc(np.full(4, m), s * s * np.eye(4), m, s, n=1000, seed=0)
    assert abs(truth_mc["kl"]) < 1e-10


@pytest.mark.parametrize("d", [6, 8])
def test_delta_sweep_rises_with_N_and_kl_falls(d):
    Ns = [2, 4, 8, 16, 32, 64, 128, 200]
    r = delta_sweep(d, Ns, redraws=40, seed=11)
    p = r["p_positive"]
    assert p[0] == 0.0  # N = 2: the fitted Gaussian is closer to its two points than to the truth
    # seeds 0, 1, 11, 12 give P(Delta > 0) at N = 200 of 0.65-0.83 (d = 6) and 0.85-0.95 (d = 8)
    assert max(p[-3:]) >= 0.6 and p[-1] > p[0] + 0.4
    assert r["delta_rel_mean"][-1] > r["delta_rel_mean"][0]
    assert r["transition_N"] is not None and 2 < r["transition_N"] <= 200
    kl = np.asarray(r["kl_mean"])
    assert np.all(np.diff(kl) < 0)
    assert len(r["delta"]) == len(Ns) and all(len(v) == 40 for v in r["delta"])
    assert r["h"] == pytest.approx([silverman_bandwidth(N, d) for N in Ns])
    # reproducible
    again = delta_sweep(d, Ns[:2], redraws=40, seed=11)
    assert again["delta"] == r["delta"][:2]


def test_analyze_kde_writes_json_and_png(tmp_path):
    out = tmp_path / "kde"
    res = analyze_kde(5, [2, 5, 20, 60], redraws=6, out_dir=out, seed=3)
    js, png = out / "kde_relative_distance.json", out / "kde_relative_distance.png"
    assert sorted(res["files"]) == sorted([str(js), str(png)])
    data = json.loads(js.read_text())
    assert data["Ns"] == [2, 5, 20, 60] and data["settings"]["d"] == 5
    for k in ("delta_mean", "delta_rel_mean", "p_positive", "kl_mean"):
        assert len(data[k]) == 4
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [f for f in out.iterdir() if f.name not in (js.name, png.name)]  # no temp files left
    assert analyze_kde(3, [2, 4], redraws=2)["files"] == []


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: relative_distance(np.zeros((1, 3))), "train"),
        (lambda: relative_distance(np.zeros(5)), "train"),
        (lambda: relative_distance(np.random.default_rng(0).standard_normal((4, 2)), s=0.0), "s"),
        (lambda: relative_distance(np.random.default_rng(0).standard_normal((4, 2)), s=-1.0), "s"),
        (lambda: relative_distance(np.random.default_rng(0).standard_normal((4, 2)), generator="vae"), "generator"),
        (lambda: relative_distance(np.random.default_rng(0).standard_normal((4, 2)), h=0.0), "h"),
        (lambda: relative_distance(np.full((4, 2), np.nan)), "train"),
        (lambda: delta_sweep(4, [1, 8]), "Ns"),
        (lambda: delta_sweep(4, []), "Ns"),
        (lambda: delta_sweep(4, [8], s=0.0), "s"),
        (lambda: delta_sweep(4, [8], generator="diffusion"), "generator"),
        (lambda: delta_sweep(0, [8]), "d"),
        (lambda: delta_sweep(4, [8], redraws=0), "redraws"),
        (lambda: analyze_kde(4, [1], redraws=2), "Ns"),
        (lambda: gaussian_kl(np.zeros(2), np.eye(2), 0.0, 0.0), "s"),
        (lambda: gaussian_kl(np.zeros(2), -np.eye(2), 0.0, 1.0), "C"),
        (lambda: gaussian_kl(np.zeros(2), np.eye(3), 0.0, 1.0), "C"),
        (lambda: gaussian_kl_mc(np.zeros(2), np.eye(2), 0.0, 1.0, n=1), "n"),
        (lambda: silverman_bandwidth(1, 3), "N"),
        (lambda: gaussian_mixture([[0.0, 0.0]], [[1.0, 2.0], [0.0, 1.0]]), "cov"),
    ],
)
def test_bad_arguments_raise_input_error(call, name):
    with pytest.raises(InputError, match=rf"\b{name}\b"):
        call()


# ----------------------------------------------------------------------------------------------------------------------
# Halder's linear one-step denoiser (generator "linear")


def _halder_xy(N, d, seed=0, T=2.0):
    rng = np.random.default_rng(seed)
    y = 0.5 + 1.3 * rng.standard_normal((N, d))
    z = rng.standard_normal((N, d))
    l = math.exp(-2 * T)  # noqa: E741
    x = math.exp(-T) * y + math.sqrt(l * (1 - math.exp(-2 * T))) * z
    return y, z, x


def test_linear_fit_matches_direct_least_squares():
    # N > d + 1: the least-squares problem with an intercept has one solution; solve it directly on [1, x]
    y, z, x = _halder_xy(40, 6, seed=1)
    fit = linear_denoiser_fit(y, noise=z)
    np.testing.assert_allclose(fit.x_T, x, rtol=1e-12, atol=1e-12)
    coef, *_ = np.linalg.lstsq(np.hstack([np.ones((40, 1)), x]), y, rcond=None)
    np.testing.assert_allclose(fit.beta0, coef[0], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(fit.beta1, coef[1:].T, rtol=1e-9, atol=1e-9)
    # the generated Gaussian: inputs N(e^-T ybar, v I), v from the pooled unbiased variance
    v = math.exp(-4) * np.var(y, axis=0, ddof=1).mean() + math.exp(-4) * (1 - math.exp(-4))
    assert fit.input_var == pytest.approx(v, rel=1e-12)
    np.testing.assert_allclose(fit.mu, coef[0] + coef[1:].T @ (math.exp(-2) * y.mean(0)), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(fit.C, v * coef[1:].T @ coef[1:], rtol=1e-9, atol=1e-9)
    assert fit.rank == 6 and not fit.singular
    # N <= d: rank deficient; the minimum-norm solution on centred data (scikit-learn's LinearRegression), rank N - 1
    y, z, x = _halder_xy(5, 8, seed=2)
    fit = linear_denoiser_fit(y, noise=z)
    xc, yc = x - x.mean(0), y - y.mean(0)
    B = np.linalg.pinv(xc) @ yc
    np.testing.assert_allclose(fit.beta1, B.T, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(fit.beta0, y.mean(0) - B.T @ x.mean(0), rtol=1e-8, atol=1e-10)
    assert fit.rank == 4 and fit.singular
    assert np.linalg.matrix_rank(fit.C) == 4


def test_linear_kl_closed_form_vs_monte_carlo():
    y, z, _ = _halder_xy(60, 5, seed=3)
    fit = linear_denoiser_fit(y, noise=z)
    k = linear_kl(fit, m=0.5, s=1.3)
    assert k["finite"] and k["reason"] is None and k["rank"] == 5
    assert k["kl"] == pytest.approx(gaussian_kl(fit.mu, fit.C, 0.5, 1.3), rel=1e-9)
    mc = gaussian_kl_mc(fit.mu, fit.C, 0.5, 1.3, n=200_000, seed=4)
    assert abs(mc["kl"] - k["kl"]) < 4 * mc["stderr"] + 1e-3


def test_linear_singular_is_inf_not_a_wrong_number(tmp_path):
    y, z, _ = _halder_xy(6, 10, seed=5)
    fit = linear_denoiser_fit(y, noise=z)
    k = linear_kl(fit)
    assert k["kl"] == math.inf and not k["finite"] and "singular" in k["reason"] and k["rank"] == 5
    r = relative_distance(y, m=0.5, s=1.3, generator="linear", _fit=fit)
    assert r["E_TG"] == math.inf and r["E_OG"] == math.inf and r["log_inner"]["GG"] == math.inf
    assert math.isfinite(r["Delta_rel"]) and r["kl"] == math.inf and r["rank"] == 5
    res = analyze_kde(4, [2, 16], redraws=3, generator="linear", out_dir=tmp_path)
    js = json.loads((tmp_path / "kde_relative_distance.json").read_text())
    assert res["kl_mean"][0] == math.inf and js["kl_mean"][0] is None  # strict JSON: inf is null ...
    assert js["kl_finite_fraction"] == [0.0, 1.0] and "singular" in js["kl_reason"][0]  # ... with the reason
    assert js["kl_reason"][1] is None and math.isfinite(js["kl_mean"][1])


def test_linear_delta_matches_generic_mixtures():
    # full-rank C: E_TG, E_OG from the generic full-covariance mixture code
    y, z, _ = _halder_xy(30, 4, seed=6)
    fit = linear_denoiser_fit(y, noise=z)
    h = 0.4
    r = relative_distance(y, m=0.5, s=1.3, generator="linear", h=h, _fit=fit)
    g = gaussian_mixture(fit.mu, fit.C)
    T = gaussian_mixture(y, h * h)
    O = gaussian_mixture(np.full(4, 0.5), 1.3**2)
    assert r["E_TG"] == pytest.approx(l2_distance(g, T), rel=1e-8)
    assert r["E_OG"] == pytest.approx(l2_distance(g, O), rel=1e-8)
    assert r["Delta"] == pytest.approx(l2_distance(g, T) - l2_distance(g, O), rel=1e-7, abs=1e-12)
    # singular C: Delta is the limit of Delta(C + delta I) as delta -> 0 (<g, g> cancels)
    y, z, _ = _halder_xy(3, 4, seed=7)
    fit = linear_denoiser_fit(y, noise=z)
    r = relative_distance(y, m=0.5, s=1.3, generator="linear", h=h, _fit=fit)
    T = gaussian_mixture(y, h * h)
    g = gaussian_mixture(fit.mu, fit.C + 1e-7 * np.eye(4))
    assert r["Delta"] == pytest.approx(l2_distance(g, T) - l2_distance(g, O), rel=1e-4)
    assert r["h"] == h and halder_bandwidth(3, 4, 1.3) == pytest.approx(1.3 * 3 ** (-1 / 4))


def test_linear_transition_quick():
    # P(Delta > 0) low while N <= d (KL inf), 1 for N >> d (KL finite and falling)
    res = delta_sweep(4, [2, 32, 128], redraws=20, generator="linear", seed=0)
    p, kl = res["p_positive"], res["kl_mean"]
    assert p[0] <= 0.3 and p[1] >= 0.9 and p[2] >= 0.9
    assert kl[0] == math.inf and math.isfinite(kl[1]) and kl[2] < kl[1]
    assert res["settings"]["h_rule"].startswith("halder") and res["settings"]["T"] == 2.0
    assert res["rank_mean"][0] == 1.0 and res["rank_mean"][1] == 4.0
    assert res["transition_N"] == 32
