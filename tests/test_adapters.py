"""diffgen_fast.adapters: k-diffusion wrapper and the diffusers UNet2DModel stand-in.

The real-library tests skip cleanly without k-diffusion / diffusers. k-diffusion's package __init__ imports its
training stack (torchvision, clip, kornia, ...); when that fails, its sampling.py is loaded on its own (it needs only
scipy, torchdiffeq, torchsde, tqdm and utils.append_dims).
"""

from __future__ import annotations

import math
import types

import pytest
import torch

from diffgen_fast import EmpiricalDenoiser, GaussianDenoiser, InputError, TrainingSet, sample
from diffgen_fast.adapters import KDiffusionDenoiser, StandInOutput, UNet2DModelStandIn, to_k_diffusion
from diffgen_fast.schedules import edm_sigmas, vp_alphas_cumprod

N_TRAIN, D, M = 200, 16, 8


@pytest.fixture(scope="module")
def train():
    return TrainingSet.gaussian(N_TRAIN, D, seed=3)


@pytest.fixture(scope="module")
def emp(train):
    return EmpiricalDenoiser(train)


@pytest.fixture(scope="module")
def gauss(train):
    return GaussianDenoiser(train)


def _noise(seed=0, shape=(D,)):
    return torch.randn((M, *shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _nn_dist(x, train):
    y = train.tensor().reshape(len(train), -1).double()
    return torch.cdist(x.reshape(len(x), -1).double(), y).min(dim=1).values


# ---------------------------------------------------------------------------------------------------------------------
# k-diffusion: the contract, with a local re-implementation of its Euler / Heun (always runs)
# ---------------------------------------------------------------------------------------------------------------------


def _local_to_d(x, sigma, denoised):
    return (x - denoised) / sigma.reshape(-1, *([1] * (x.ndim - 1)))


def _local_sample(model, x, sigmas, heun=False):
    """k-diffusion's documented sample_euler / sample_heun (churn 0): model(x, sigma * s_in) -> denoised."""
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        d = _local_to_d(x, sigmas[i] * s_in, model(x, sigmas[i] * s_in))
        dt = sigmas[i + 1] - sigmas[i]
        if not heun or sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x2 = x + d * dt
            d2 = _local_to_d(x2, sigmas[i + 1] * s_in, model(x2, sigmas[i + 1] * s_in))
            x = x + (d + d2) / 2 * dt
    return x


def test_k_wrapper_contract(emp):
    model = to_k_diffusion(emp)
    assert isinstance(model, KDiffusionDenoiser) and isinstance(model, torch.nn.Module)
    assert to_k_diffusion(model) is model
    assert (model.sigma_min, model.sigma_max) == (0.002, 80.0)
    assert to_k_diffusion(emp, sigma_min=0.01, sigma_max=10.0).sigma_max == 10.0
    x = _noise().float()
    s = torch.full((M,), 0.5)
    torch.testing.assert_close(model(x, s), emp(x, s))
    assert model(x.double(), s.double()).dtype == torch.float64
    with pytest.raises(InputError, match="extra_args"):
        model(x, s, cond=None)
    with pytest.raises(InputError, match="sigma_min"):
        to_k_diffusion(emp, sigma_min=-1.0)
    sig = model.get_sigmas(5, dtype=torch.float64)
    torch.testing.assert_close(sig, edm_sigmas(5, 0.002, 80.0, 7.0))


@pytest.mark.parametrize("heun", [False, True])
def test_k_contract_matches_our_sampler(gauss, heun):
    model = to_k_diffusion(gauss)
    steps, noise = 10, _noise(1)
    sigmas = model.get_sigmas(steps, dtype=torch.float64)
    ours = sample(gauss, M, steps=steps, sampler="heun" if heun else "euler", latents=noise, dtype=torch.float64)
    theirs = _local_sample(model, noise * sigmas[0], sigmas, heun=heun)
    torch.testing.assert_close(theirs, ours, rtol=1e-10, atol=1e-10)


def test_k_class_labels_pass_through():
    digits = TrainingSet.builtin("digits")
    den = EmpiricalDenoiser(digits.subset(torch.arange(300)))
    model = to_k_diffusion(den)
    labels = torch.arange(M) % 10
    x = torch.randn(M, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    s = torch.full((M,), 0.3)
    torch.testing.assert_close(model(x, s, class_labels=labels), den(x, s, labels))


# ---------------------------------------------------------------------------------------------------------------------
# k-diffusion: the real library
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ks():
    from diffgen_fast.adapters import load_k_diffusion_sampling
    from diffgen_fast.errors import BackendUnavailableError

    try:
        return load_k_diffusion_sampling()
    except BackendUnavailableError as e:
        pytest.skip(str(e))


def test_k_sigma_grid_matches_edm(ks):
    for n in (2, 10, 18):
        k = ks.get_sigmas_karras(n, 0.002, 80.0, rho=7.0).double()
        assert k.shape == (n + 1,) and float(k[-1]) == 0.0
        torch.testing.assert_close(k, edm_sigmas(n, 0.002, 80.0, 7.0), rtol=1e-5, atol=0)


@pytest.mark.parametrize("name", ["euler", "heun"])
@pytest.mark.parametrize("which", ["gauss", "emp"])
def test_k_euler_heun_match_our_sampler(ks, name, which, request):
    den = request.getfixturevalue(which)
    model = to_k_diffusion(den)
    steps, noise = 12, _noise(2)
    sigmas = ks.get_sigmas_karras(steps, model.sigma_min, model.sigma_max, rho=7.0).double()
    x = getattr(ks, f"sample_{name}")(model, noise * sigmas[0], sigmas, disable=True)
    ours = sample(den, M, steps=steps, sampler=name, latents=noise, dtype=torch.float64)
    torch.testing.assert_close(x, ours, rtol=1e-4, atol=1e-4)


def test_k_dpmpp_2m_memorizes(ks, emp, train):
    model = to_k_diffusion(emp)
    sigmas = ks.get_sigmas_karras(15, model.sigma_min, model.sigma_max, rho=7.0)
    x = ks.sample_dpmpp_2m(model, _noise(3).float() * sigmas[0], sigmas, disable=True)
    assert torch.isfinite(x).all()
    assert float(_nn_dist(x, train).max()) < 1e-3


# ---------------------------------------------------------------------------------------------------------------------
# diffusers stand-in without diffusers
# ---------------------------------------------------------------------------------------------------------------------


def test_standin_predictions_and_surface(gauss):
    abar = vp_alphas_cumprod()
    x = _noise(4)
    t = 500
    a, s = math.sqrt(float(abar[t])), math.sqrt(1 - float(abar[t]))
    x0 = gauss(x / a, s / a)
    outs = {}
    for p in ("epsilon", "v_prediction", "sample"):
        unet = UNet2DModelStandIn(gauss, p, alphas_cumprod=abar)
        outs[p] = unet(x, torch.tensor(t)).sample
        if p == "epsilon":  # torch.tensor([t] * M), a python int and a [M] tensor agree
            torch.testing.assert_close(unet(x, torch.full((M,), t)).sample, outs[p])
            (tup,) = unet(x, t, return_dict=False)
            torch.testing.assert_close(tup, outs[p])
    torch.testing.assert_close(outs["sample"], x0)
    torch.testing.assert_close(outs["epsilon"], (x - a * x0) / s)
    torch.testing.assert_close(outs["v_prediction"], a * outs["epsilon"] - s * x0)
    unet = UNet2DModelStandIn(gauss, alphas_cumprod=abar)
    assert unet.prediction_type == "epsilon"
    assert unet.config.in_channels == 1 and unet.config["sample_size"] == D
    assert unet.dtype == torch.float32 and unet.device == torch.device("cpu")
    out = unet(x.float(), 10)
    assert isinstance(out, StandInOutput) or type(out).__name__ == "UNet2DOutput"
    assert out.sample.dtype == torch.float32 and out.sample.shape == (M, D)


def test_standin_image_config():
    den = EmpiricalDenoiser(TrainingSet.builtin("digits").subset(torch.arange(100)))
    unet = UNet2DModelStandIn(den, alphas_cumprod=vp_alphas_cumprod())
    assert (unet.config.in_channels, unet.config.sample_size) == (1, 8)
    out = unet(torch.randn(3, 1, 8, 8), 999, class_labels=torch.tensor([0, 1, 2])).sample
    assert out.shape == (3, 1, 8, 8) and torch.isfinite(out).all()


def test_standin_float_timesteps_interpolate(gauss):
    abar = vp_alphas_cumprod()
    sig = ((1 - abar) / abar).sqrt()
    x = _noise(5)
    lin = UNet2DModelStandIn(gauss, "sample", alphas_cumprod=abar)
    loglin = UNet2DModelStandIn(gauss, "sample", alphas_cumprod=abar, interpolation="log_linear")
    a, s = lin.alpha_sigma(torch.tensor(10.25), 1)
    torch.testing.assert_close(s / a, (0.75 * sig[10] + 0.25 * sig[11]).reshape(1))
    a, s = loglin.alpha_sigma(10.25, 1)
    torch.testing.assert_close((s / a).log(), (0.75 * sig[10].log() + 0.25 * sig[11].log()).reshape(1))
    a, s = lin.alpha_sigma(torch.tensor([3.0, 7.0]), 2)
    torch.testing.assert_close(a * a, abar[[3, 7]], rtol=0, atol=0)
    assert torch.isfinite(lin(x, 10.25).sample).all()


def test_standin_errors(gauss):
    abar = vp_alphas_cumprod()
    with pytest.raises(InputError, match="prediction_type"):
        UNet2DModelStandIn(gauss, "x0", alphas_cumprod=abar)
    with pytest.raises(InputError, match="alphas_cumprod"):
        UNet2DModelStandIn(gauss, "epsilon")
    with pytest.raises(InputError, match="alphas_cumprod"):
        UNet2DModelStandIn(gauss, alphas_cumprod=torch.tensor([0.5, 1.5]))
    with pytest.raises(InputError, match="interpolation"):
        UNet2DModelStandIn(gauss, alphas_cumprod=abar, interpolation="cubic")
    sched = types.SimpleNamespace(config={"prediction_type": "v_prediction"}, alphas_cumprod=abar)
    with pytest.raises(InputError, match="prediction_type"):
        UNet2DModelStandIn(gauss, "epsilon", scheduler=sched)
    assert UNet2DModelStandIn(gauss, scheduler=sched).prediction_type == "v_prediction"
    unet = UNet2DModelStandIn(gauss, alphas_cumprod=abar)
    x = _noise(0).float()
    with pytest.raises(InputError, match="timestep"):
        unet(x, 1000)
    with pytest.raises(InputError, match="timestep"):
        unet(x, torch.zeros(3))
    with pytest.raises(InputError, match="shape"):
        UNet2DModelStandIn(lambda x, s: x, alphas_cumprod=abar)


# ---------------------------------------------------------------------------------------------------------------------
# diffusers: the real schedulers
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def diffusers():
    return pytest.importorskip("diffusers", exc_type=ImportError)


def _run(scheduler, unet, x):
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(x, t)
        out = unet(model_in, t).sample
        x = scheduler.step(out, t, x).prev_sample
    return x


def test_diffusers_output_type(diffusers, gauss):
    from diffusers.models.unets.unet_2d import UNet2DOutput

    unet = UNet2DModelStandIn(gauss, alphas_cumprod=vp_alphas_cumprod())
    assert isinstance(unet(_noise().float(), 5), UNet2DOutput)


def test_ddim_matches_our_ddim(diffusers, emp, train):
    # 1000 'leading' steps of diffusers' DDIM are t = 999..0 stepping to t - 1, as our ddim_timesteps(1000)
    sched = diffusers.DDIMScheduler(clip_sample=False, prediction_type="epsilon", timestep_spacing="leading")
    sched.set_timesteps(1000)
    unet = UNet2DModelStandIn(emp, scheduler=sched)
    noise = _noise(6)
    x = _run(sched, unet, noise.float() * sched.init_noise_sigma)
    ours = sample(emp, M, steps=1000, sampler="ddim", latents=noise)
    torch.testing.assert_close(x, ours, rtol=1e-4, atol=1e-4)
    assert float(_nn_dist(x, train).max()) < 1e-3


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
def test_ddim_prediction_types_agree(diffusers, emp, gauss, train, spacing):
    noise = _noise(7).float()
    for den in (emp, gauss):
        res = {}
        for p in ("epsilon", "v_prediction", "sample"):
            sched = diffusers.DDIMScheduler(clip_sample=False, prediction_type=p, timestep_spacing=spacing)
            sched.set_timesteps(25)
            res[p] = _run(sched, UNet2DModelStandIn(den, scheduler=sched), noise.clone())
        torch.testing.assert_close(res["v_prediction"], res["epsilon"], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(res["sample"], res["epsilon"], rtol=1e-4, atol=1e-4)
        if den is emp:
            assert float(_nn_dist(res["epsilon"], train).max()) < 1e-3


@pytest.mark.parametrize("p", ["epsilon", "v_prediction", "sample"])
def test_euler_karras_matches_our_euler(diffusers, emp, train, p):
    steps = 15
    sched = diffusers.EulerDiscreteScheduler(prediction_type=p, use_karras_sigmas=True)
    sched.set_timesteps(steps)
    sig = sched.sigmas.double()
    smin, smax = float(sig[-2]), float(sig[0])
    torch.testing.assert_close(sig, edm_sigmas(steps, smin, smax, 7.0), rtol=1e-5, atol=0)
    assert not torch.equal(sched.timesteps, sched.timesteps.round())  # float timesteps from _sigma_to_t
    noise = _noise(8)
    x = _run(sched, UNet2DModelStandIn(emp, scheduler=sched), noise.float() * sched.init_noise_sigma)
    ours = sample(emp, M, steps=steps, sampler="euler", sigma_min=smin, sigma_max=smax, latents=noise)
    torch.testing.assert_close(x, ours, rtol=1e-4, atol=1e-4)
    assert float(_nn_dist(x, train).max()) < 1e-3
    # without the scheduler, the stand-in inverts _sigma_to_t by log-linear interpolation of alphas_cumprod
    sched.set_timesteps(steps)
    bare = UNet2DModelStandIn(emp, p, alphas_cumprod=sched.alphas_cumprod, interpolation="log_linear")
    x2 = _run(sched, bare, noise.float() * sched.init_noise_sigma)
    torch.testing.assert_close(x2, x, rtol=1e-4, atol=1e-4)


def test_euler_timestep_to_sigma(diffusers, gauss):
    """Per call: with the scheduler the stand-in uses its sigma exactly; without, log-linear interpolation inverts
    _sigma_to_t (Karras grid) and linear interpolation matches the default 'linear' grid."""
    sched = diffusers.EulerDiscreteScheduler(use_karras_sigmas=True)
    sched.set_timesteps(15)
    ts, sig = sched.timesteps, sched.sigmas[:-1].double()
    a, s = UNet2DModelStandIn(gauss, scheduler=sched).alpha_sigma(ts, len(ts))
    torch.testing.assert_close(s / a, sig, rtol=1e-12, atol=0)
    for interp, ok in (("log_linear", True), ("linear", False)):
        bare = UNet2DModelStandIn(gauss, alphas_cumprod=sched.alphas_cumprod, interpolation=interp)
        a, s = bare.alpha_sigma(ts, len(ts))
        err = float(((s / a) / sig - 1).abs().max())
        assert (err < 1e-5) if ok else (err > 1e-4), (interp, err)
    sched = diffusers.EulerDiscreteScheduler(timestep_spacing="linspace")
    sched.set_timesteps(15)
    a, s = UNet2DModelStandIn(gauss, alphas_cumprod=sched.alphas_cumprod).alpha_sigma(sched.timesteps, 15)
    torch.testing.assert_close(s / a, sched.sigmas[:-1].double(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("p", ["epsilon", "v_prediction"])
def test_euler_linear_matches_edm_euler_on_its_grid(diffusers, gauss, p):
    steps = 20
    sched = diffusers.EulerDiscreteScheduler(prediction_type=p, timestep_spacing="linspace")
    sched.set_timesteps(steps)
    sig = sched.sigmas.double()
    noise = _noise(9)
    x = _run(sched, UNet2DModelStandIn(gauss, scheduler=sched), noise.float() * sched.init_noise_sigma)
    ref = noise * sig[0]  # EDM Euler (our sampler's update) on the scheduler's own sigma grid
    for i in range(steps):
        d = (ref - gauss(ref, float(sig[i]))) / sig[i]
        ref = ref + (sig[i + 1] - sig[i]) * d
    torch.testing.assert_close(x.double(), ref, rtol=1e-3, atol=1e-3)
    sched.set_timesteps(steps)
    bare = UNet2DModelStandIn(gauss, p, alphas_cumprod=sched.alphas_cumprod)  # linear interpolation of sigma
    x2 = _run(sched, bare, noise.float() * sched.init_noise_sigma)
    torch.testing.assert_close(x2, x, rtol=1e-3, atol=1e-3)


def test_ddim_pipeline_runs(diffusers):
    den = EmpiricalDenoiser(TrainingSet.builtin("digits").subset(torch.arange(200)))
    sched = diffusers.DDIMScheduler(clip_sample=False)
    pipe = diffusers.DDIMPipeline(unet=UNet2DModelStandIn(den, scheduler=sched), scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        batch_size=4, num_inference_steps=10, eta=0.0, generator=torch.Generator().manual_seed(0), output_type="np"
    )
    assert out.images.shape == (4, 8, 8, 1)
