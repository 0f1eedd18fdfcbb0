"""EDMPrecondMLP, train_denoiser and the memorization -> generalization transition run (quick settings)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from diffgen_fast.data import TrainingSet
from diffgen_fast.errors import InputError
from diffgen_fast.metrics.transition import transition
from diffgen_fast.models import EDMPrecondMLP, train_denoiser


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
    return transition(digits, quick=True, seed=0, out_dir=out), out


def test_quick_transition_memorization_falls(quick_run):
    r, _ = quick_run
    assert r["Ns"] == [8, 128]
    mem = r["memorized_fraction"]
    assert mem[0] > mem[-1]
    assert mem[0] >= 0.5 and mem[-1] <= 0.2
    assert len(r["gap_to_dstar"]) == 2 and len(r["gap_to_dstar"][0]) == len(r["sigmas"])
    assert all(math.isfinite(v) and v >= 0 for row in r["gap_to_dstar"] for v in row)
    assert all(math.isfinite(v) and v >= 0 for row in r["dist_to_dg"] for v in row)


def test_quick_transition_files(quick_run):
    r, out = quick_run
    js = json.loads((out / "transition.json").read_text())
    assert js["Ns"] == r["Ns"] and js["memorized_fraction"] == pytest.approx(r["memorized_fraction"])
    assert js["per_N"][0]["N"] == 8 and "gap_to_dstar" in js["per_N"][0]
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
