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
    l2_distance,
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
