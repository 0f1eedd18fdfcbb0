"""EDMPrecondMLP, train_denoiser and the memorization -> generalization transition run (quick settings)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from diffgen_fast.data import TrainingSet
from diffgen_fast.errors import InputError, InputTypeError
from diffgen_fast.metrics.transition import transition
from diffgen_fast.models import EDMPrecondMLP, EDMPrecondUNet, train_denoiser


@pytest.fixture(scope="module")
def digits():
    return TrainingSet.builtin("digits")


def test_call_convention_and_shapes():
    m = EDMPrecondMLP((1, 8, 8), hidden=32, depth=2, seed=0)
    assert m.shape == (1, 8, 8) and m.d == 64
    assert m.sigma_min == 0.002 and m.sigma_max == 80
    x = torch.randn(5, 1, 8, 8)
    for sigma in (0.5, torch.tensor(0.5), torch.full((5,), 0.5), torch.full((5, 1, 1, 1), 0.5)):
        out = m(x, sigma)
        assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(m(x, 0.5), m(x, torch.full((5, 1, 1, 1), 0.5)))
    assert m(x.reshape(5, 64), 0.5).shape == (5, 64)
    assert m(x.double(), 0.5).dtype == torch.float64
    assert float(m.round_sigma(0.3)) == pytest.approx(0.3)
    with pytest.raises(InputError):
        m(torch.randn(5, 10), 0.5)
    with pytest.raises(InputError):
        m(x, 0.5, class_labels=torch.zeros(5, dtype=torch.long))


def test_preconditioning():
    torch.manual_seed(0)
    m = EDMPrecondMLP(16, hidden=32, depth=2, sigma_data=0.5, seed=1)
    torch.nn.init.normal_(m.out.weight, std=0.5)  # a non-trivial F
    x = torch.randn(7, 16)
    # sigma -> 0: c_skip -> 1, c_out -> 0, D(x) -> x
    torch.testing.assert_close(m(x, 1e-6), x, atol=1e-5, rtol=0)
    # the formula D = c_skip x + c_out F(c_in x, c_noise) at a finite sigma
    s, sd = 0.8, 0.5
    c_skip, c_out = sd**2 / (s**2 + sd**2), s * sd / math.sqrt(s**2 + sd**2)
    c_in, c_noise = 1 / math.sqrt(s**2 + sd**2), math.log(s) / 4
    ref = c_skip * x + c_out * m.F(c_in * x, torch.full((7,), c_noise))
    torch.testing.assert_close(m(x, s), ref, atol=1e-5, rtol=1e-5)
    # seeded init is reproducible and leaves the global RNG alone
    state = torch.get_rng_state()
    a, b = EDMPrecondMLP(16, hidden=32, seed=3), EDMPrecondMLP(16, hidden=32, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.slow  # two trainings, 3-30 s (with the machine's load)
def test_train_reduces_loss_and_is_deterministic():
    # N(1, 0.2^2): far from N(0, sigma_data^2), where F = 0 would already be optimal
    ts = TrainingSet.gaussian(64, 8, mean=1.0, std=0.2, seed=0)
    runs = []
    for _ in range(2):
        m = EDMPrecondMLP(8, hidden=64, depth=2, seed=0)
        runs.append(train_denoiser(m, ts, steps=300, batch=64, lr=3e-3, seed=0))
    losses = runs[0]
    assert len(losses) == 300 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-30:]) / 30 < 0.5 * sum(losses[:30]) / 30
    assert runs[0] == runs[1]
    with pytest.raises(InputError):
        train_denoiser(EDMPrecondMLP(4), ts, steps=1)
    with pytest.raises(InputError):
        train_denoiser(EDMPrecondMLP(8), ts, steps=0)


@pytest.fixture(scope="module")
def quick_run(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("transition")
    # the twin networks of the strong-generalization study are covered by the tiny runs below; without them the
    # quick fixture trains two networks, not four. Smaller than quick=True's own MLP (width 512, depth 3, batch 256,
    # 1000 steps: ~33 s on 2 idle cores, 12 minutes on a busy machine): width 512, depth 2, batch 128, 600 steps at
    # lr 5e-3, ~9 s, still memorizes 81% of the samples at N = 8 and none at N = 128 (the same with 1, 2 or 4 threads)
    r = transition(digits, quick=True, seed=0, out_dir=out, strong=False, hidden=512, depth=2, batch=128, steps=600,
                   lr=5e-3)  # fmt: skip
    return r, out


@pytest.mark.slow  # the quick_run fixture trains two MLPs, 9-26 s
def test_quick_transition_memorization_falls(quick_run):
    r, _ = quick_run
    assert r["Ns"] == [8, 128] and r["settings"]["quick"] is True
    assert r["settings"]["steps"] == 600 and r["settings"]["depth"] == 2  # explicit arguments win over quick=True
    mem = r["memorized_fraction"]
    assert mem[0] > mem[-1]
    assert mem[0] >= 0.5 and mem[-1] <= 0.2
    assert len(r["gap_to_dstar"]) == 2 and len(r["gap_to_dstar"][0]) == len(r["sigmas"])
    assert all(math.isfinite(v) and v >= 0 for row in r["gap_to_dstar"] for v in row)
    assert all(math.isfinite(v) and v >= 0 for row in r["dist_to_dg"] for v in row)
    assert len(r["linearity"]) == 2 and len(r["linearity"][0]) == len(r["sigmas"])
    assert r["strong"]["Ns"] == [] and r["strong"]["pair_cos"] == []  # strong=False


@pytest.mark.slow  # the quick_run fixture
def test_quick_transition_files(quick_run):
    r, out = quick_run
    js = json.loads((out / "transition.json").read_text())
    assert js["Ns"] == r["Ns"] and js["memorized_fraction"] == pytest.approx(r["memorized_fraction"])
    assert js["per_N"][0]["N"] == 8 and "gap_to_dstar" in js["per_N"][0]
    assert {"linearity", "linearity_centered", "dist_to_dg", "dstar_dist_to_dg"} <= set(js["per_N"][0])
    assert set(js["strong"]) >= {"Ns", "pair_cos", "pair_l2", "nn_cos", "nn_l2"}
    png = (out / "transition.png").read_bytes()
    assert len(png) > 1000 and png[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.iterdir() if p.name not in ("transition.json", "transition.png")]


def test_bad_arguments(digits):
    small = digits.subset(torch.arange(20))
    with pytest.raises(InputError):
        transition(small, [])
    with pytest.raises(InputError):
        transition(small, [8, 21])
    with pytest.raises(InputError):
        transition(small, [1])
    with pytest.raises(InputError):
        transition(small, [8], sigmas_gap=[])
    with pytest.raises(InputError):
        transition(small, [8], steps=0)


# ----------------------------------------------------------------------------------------------------------------------
# EDMPrecondUNet, linearity / D_G keys and strong generalization


def test_unet_call_convention_and_shapes():
    m = EDMPrecondUNet((1, 8, 8), channels=8, seed=0)
    assert m.shape == (1, 8, 8) and m.d == 64 and m.sigma_min == 0.002 and m.sigma_max == 80
    x = torch.randn(5, 1, 8, 8)
    for sigma in (0.5, torch.tensor(0.5), torch.full((5,), 0.5), torch.full((5, 1, 1, 1), 0.5)):
        out = m(x, sigma)
        assert out.shape == x.shape and out.dtype == x.dtype
    assert m(x.reshape(5, 64), 0.5).shape == (5, 64)
    assert m(x.double(), 0.5).dtype == torch.float64
    # F = 0 at init: D = c_skip x + c_out * 0
    sd, s = 0.5, 0.8
    torch.testing.assert_close(m(x, s), sd**2 / (s**2 + sd**2) * x, atol=1e-6, rtol=1e-6)
    torch.nn.init.normal_(m.out.weight, std=0.3)  # a non-trivial F: the preconditioning formula
    c_skip, c_out = sd**2 / (s**2 + sd**2), s * sd / math.sqrt(s**2 + sd**2)
    c_in, c_noise = 1 / math.sqrt(s**2 + sd**2), math.log(s) / 4
    ref = c_skip * x.reshape(5, 64) + c_out * m.F(c_in * x.reshape(5, 64), torch.full((5,), c_noise))
    torch.testing.assert_close(m(x, s).reshape(5, 64), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m(x, 1e-6), x, atol=1e-5, rtol=0)
    # seeded init is reproducible and leaves the global RNG alone
    state = torch.get_rng_state()
    a, b = EDMPrecondUNet((1, 8, 8), channels=8, seed=3), EDMPrecondUNet((1, 8, 8), channels=8, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    with pytest.raises(InputError):
        m(torch.randn(5, 10), 0.5)
    with pytest.raises(InputError):
        m(x, 0.5, class_labels=torch.zeros(5, dtype=torch.long))
    with pytest.raises(InputError):
        EDMPrecondUNet((1, 7, 8))
    with pytest.raises(InputTypeError):
        EDMPrecondUNet(64)


def test_unet_training_reduces_loss():
    gen = torch.Generator().manual_seed(0)
    ts = TrainingSet.coerce(1.0 + 0.2 * torch.randn(64, 1, 4, 4, generator=gen), name="train")
    m = EDMPrecondUNet((1, 4, 4), channels=8, seed=0)
    losses = train_denoiser(m, ts, steps=150, batch=32, lr=3e-3, seed=0)
    assert len(losses) == 150 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-20:]) / 20 < 0.5 * sum(losses[:20]) / 20


@pytest.mark.parametrize(
    "arch, kw",
    [("mlp", {"hidden": 32, "depth": 2}), pytest.param("unet", {"channels": 8}, marks=pytest.mark.slow)],  # UNet: ~5 s
)
def test_tiny_transition_linearity_and_strong_generalization(digits, tmp_path, arch, kw):
    small = digits.subset(torch.arange(40))
    r = transition(small, [4, 16, 30], steps=20, batch=16, n_samples=6, sample_steps=4, n_probe=8, n_pairs=4,
                   sigmas_gap=[0.5, 2.0], arch=arch, out_dir=tmp_path, **kw)  # fmt: skip
    assert r["settings"]["arch"] == arch and r["settings"]["linearity_a"][0] == 0.99
    for key in ("linearity", "linearity_centered", "dist_to_dg", "dstar_dist_to_dg"):
        assert len(r[key]) == 3 and all(len(row) == 2 for row in r[key])
        assert all(math.isfinite(v) for row in r[key] for v in row)
    assert all(-1.0 <= v <= 1.0 for row in r["linearity"] + r["linearity_centered"] for v in row)
    st = r["strong"]
    assert st["Ns"] == [4, 16]  # 30 > 40 / 2: no disjoint twin subset of that size
    for key in ("pair_cos", "nn_cos"):
        assert len(st[key]) == 2 and all(-1.0 <= v <= 1.0 for v in st[key])
    for key in ("pair_l2", "nn_l2"):
        assert all(math.isfinite(v) and v >= 0 for v in st[key])
    assert all(0.0 <= v <= 1.0 for v in st["memorized_fraction_b"])
    js = json.loads((tmp_path / "transition.json").read_text())
    assert js["strong"]["Ns"] == [4, 16] and len(js["linearity"]) == 3 and "linearity" in js["per_N"][0]
    assert (tmp_path / "transition.png").stat().st_size > 1000
    r2 = transition(small, [4], steps=5, batch=8, n_samples=3, sample_steps=2, n_probe=4, n_pairs=2,
                    sigmas_gap=[1.0], arch=arch, strong=False, **kw)  # fmt: skip
    assert r2["strong"]["Ns"] == []
    with pytest.raises(InputError):
        transition(small, [4], arch="transformer")


def test_unet_needs_image_items():
    flat = TrainingSet.gaussian(16, 8, seed=0)
    with pytest.raises(InputError, match="unet"):
        transition(flat, [4], arch="unet", steps=1)
