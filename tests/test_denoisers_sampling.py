"""Denoisers (EDM convention), the samplers, and the phenomenon: D* memorizes, D_G does not."""

from __future__ import annotations

import math

import pytest
import torch

from diffgen_fast import EmpiricalDenoiser, GaussianDenoiser, TrainingSet, memorization, sample, softmax_denoise
from diffgen_fast.schedules import edm_sigmas, eps_from_x0, score_from_x0, v_from_x0, x0_from_eps


@pytest.fixture(scope="module")
def digits():
    return TrainingSet.builtin("digits")


def test_edm_grid():
    t = edm_sigmas(18)
    assert t.shape == (19,) and t[-1] == 0
    assert math.isclose(float(t[0]), 80.0) and math.isclose(float(t[-2]), 0.002, rel_tol=1e-12)
    assert bool((t[1:] < t[:-1]).all())


def test_empirical_denoiser_matches_functional(digits):
    D = EmpiricalDenoiser(digits)
    assert D.shape == (1, 8, 8) and D.img_channels == 1 and D.img_resolution == 8 and D.label_dim == 10
    x = digits.tensor()[:5] + 0.3 * torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.full((5, 1, 1, 1), 0.3)
    torch.testing.assert_close(D(x, sigma), softmax_denoise(x, digits, 0.3))
    assert D.round_sigma(0.5) == torch.tensor(0.5)


def test_class_conditional_restricts_to_class(digits):
    D = EmpiricalDenoiser(digits)
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2, 0, 9, 9])
    out = D(x, 1e-4, labels)
    onehot = torch.nn.functional.one_hot(labels, 10)
    torch.testing.assert_close(D(x, 1e-4, onehot), out)
    y = digits.flat()
    for r, c in enumerate(labels.tolist()):
        cls = y[digits.labels == c]
        nn = ((x[r].reshape(1, -1) - cls) ** 2).sum(1).argmin()
        assert torch.equal(out[r].reshape(-1), cls[nn])


def test_vp_conversions_roundtrip():
    g = torch.Generator().manual_seed(0)
    x, x0 = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    sig, al = torch.tensor([0.5, 1.0, 2.0]), torch.tensor([0.9, 0.7, 0.4])
    eps = eps_from_x0(x, x0, sig, al)
    torch.testing.assert_close(x0_from_eps(x, eps, sig, al), x0)
    torch.testing.assert_close(score_from_x0(x, x0, sig, al), -eps / sig[:, None])
    v = v_from_x0(x, x0, sig, al)
    torch.testing.assert_close(v, al[:, None] * eps - sig[:, None] * x0)


def test_vp_call_equals_ve_call(digits):
    """The VP posterior mean at (x_t, alpha, sigma) equals the VE one at (x_t / alpha, sigma / alpha)."""
    D = EmpiricalDenoiser(digits)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    a, s = 0.8, 0.6
    torch.testing.assert_close(D(x, s, alpha=a), D(x / a, s / a), rtol=1e-6, atol=1e-6)


def test_gaussian_denoiser_formula_and_limits():
    y = TrainingSet.gaussian(500, 6, mean=0.5, std=2.0, seed=0)
    G = GaussianDenoiser(y)
    Y = y.flat().double()
    mu, C = Y.mean(0), torch.cov(Y.T, correction=0)
    x = torch.randn(7, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    s, a = 0.7, 0.9
    ref = mu + (a * C @ torch.linalg.inv(a * a * C + s * s * torch.eye(6)) @ (x - a * mu).T).T
    torch.testing.assert_close(G(x, s, alpha=a), ref, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(G(x, 1e6), mu.expand_as(x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(G(x, 1e-9), x, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("sampler", ["heun", "euler", "ddim"])
def test_empirical_optimum_memorizes_and_gaussian_does_not(digits, sampler):
    n = 24
    emp = sample(EmpiricalDenoiser(digits), n, steps=12, sampler=sampler, seed=0)
    gau = sample(GaussianDenoiser(digits), n, steps=12, sampler=sampler, seed=0)
    assert emp.shape == (n, 1, 8, 8) and emp.dtype == torch.float32 and torch.isfinite(emp).all()
    assert memorization(emp, digits).fraction >= 0.95
    assert memorization(gau, digits).fraction <= 0.1


def test_deterministic_heun_lands_on_training_points(digits):
    emp = sample(EmpiricalDenoiser(digits), 8, steps=18, seed=1)
    d2, _ = torch.cdist(emp.reshape(8, -1).double(), digits.flat().double()).min(1)
    assert float(d2.max()) < 1e-3


def test_sampler_reproducible_and_churn_changes_path(digits):
    D = GaussianDenoiser(digits)
    a = sample(D, 4, steps=6, seed=5)
    b = sample(D, 4, steps=6, seed=5)
    c = sample(D, 4, steps=6, seed=5, churn=10.0)
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_heun_matches_hand_written_edm_step():
    """One Heun step from a given latent, written out from Karras et al. Algorithm 2."""
    y = TrainingSet.gaussian(50, 3, seed=2)
    G = GaussianDenoiser(y)
    lat = torch.randn(2, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = sample(G, 2, steps=2, latents=lat, dtype=torch.float64, sigma_min=0.5, sigma_max=5.0)
    t0, t1 = 5.0, 0.5
    x0 = lat * t0
    d0 = (x0 - G(x0, t0)) / t0
    x1 = x0 + (t1 - t0) * d0
    d1 = (x1 - G(x1, t1)) / t1
    x1 = x0 + (t1 - t0) * (0.5 * d0 + 0.5 * d1)
    x2 = x1 + (0 - t1) * (x1 - G(x1, t1)) / t1
    torch.testing.assert_close(got, x2)


def test_sample_any_callable_with_shape():
    calls = []

    def D(x, sigma):
        calls.append(sigma)
        return torch.zeros_like(x)

    out = sample(D, 3, steps=4, shape=(5,))
    assert out.shape == (3, 5) and len(calls) == 7 and calls[0].shape == (3,)
    torch.testing.assert_close(out, torch.zeros(3, 5))


def test_ddim_matches_hand_written_steps():
    """Deterministic DDIM (eta = 0) on the DDPM schedule, written out from Song et al. with the VE call."""
    from diffgen_fast.schedules import ddim_timesteps, vp_alphas_cumprod

    y = TrainingSet.gaussian(40, 3, seed=1)
    G = GaussianDenoiser(y)
    lat = torch.randn(2, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = sample(G, 2, steps=4, sampler="ddim", latents=lat, dtype=torch.float64)
    abar = vp_alphas_cumprod()
    ts = ddim_timesteps(4).tolist()
    x = lat
    for j, t in enumerate(ts):
        a_t, s_t = abar[t].sqrt(), (1 - abar[t]).sqrt()
        x0 = G(x / a_t, s_t / a_t)
        eps = (x - a_t * x0) / s_t
        ab_prev = abar[ts[j + 1]] if j + 1 < len(ts) else torch.tensor(1.0, dtype=torch.float64)
        x = ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * eps
    torch.testing.assert_close(got, x)


def test_sampler_uses_the_denoiser_device(digits):
    D = EmpiricalDenoiser(digits)
    assert D.device == torch.device("cpu") and GaussianDenoiser(digits).device == torch.device("cpu")


def test_modules_keep_nn_module_behaviour(digits):
    """train() / eval() are nn.Module methods (EDM scripts call net.eval()); the data lives in .train_set."""
    for D in (EmpiricalDenoiser(digits), GaussianDenoiser(digits)):
        assert D.eval() is D and not D.training and D.train() is D and D.training
    assert EmpiricalDenoiser(digits).train_set is digits


def test_edm_sigma_range_is_finite_for_karras_schedules():
    """k-diffusion's get_sigmas_karras(model.sigma_min, model.sigma_max) needs finite, positive ends."""
    import math

    from diffgen_fast import EmpiricalDenoiser, GaussianDenoiser, TrainingSet
    from diffgen_fast.schedules import edm_sigmas

    ts = TrainingSet.gaussian(50, 4, 0.0, 1.0, 0)
    for D in (EmpiricalDenoiser(ts), GaussianDenoiser(ts)):
        assert (D.sigma_min, D.sigma_max) == (0.002, 80.0)
        s = edm_sigmas(10, D.sigma_min, D.sigma_max, 7.0)
        assert all(math.isfinite(float(v)) for v in s)


def test_sample_on_cuda_without_cuda_is_a_clear_error():
    import pytest

    from diffgen_fast import EmpiricalDenoiser, TrainingSet, sample
    from diffgen_fast.errors import BackendUnavailableError, InputError

    D = EmpiricalDenoiser(TrainingSet.gaussian(20, 4, 0.0, 1.0, 0))
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailableError, match="device: 'cuda'"):
            sample(D, 2, steps=2, device="cuda")
    with pytest.raises(InputError, match="device"):
        sample(D, 2, steps=2, device="gpu0")


def test_denoisers_numpy_in_numpy_out():
    import numpy as np

    from diffgen_fast import EmpiricalDenoiser, GaussianDenoiser, KNNDenoiser, TrainingSet

    ts = TrainingSet.gaussian(60, 4, 0.0, 1.0, 0)
    x = np.random.default_rng(0).normal(size=(3, 4)).astype("f4")
    for D in (EmpiricalDenoiser(ts), GaussianDenoiser(ts), KNNDenoiser(ts, k=8, n_samples=0)):
        out = D(x, 0.5)
        assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == x.shape
        np.testing.assert_allclose(out, D(torch.from_numpy(x), 0.5).numpy(), rtol=1e-6, atol=1e-7)
        for f in (D.eps, D.score, D.v):
            assert isinstance(f(x, np.full(3, 0.5)), np.ndarray)
