"""The denoiser gap to D* in x0 space and in epsilon space (||eps - eps*||^2 = ||D - D*||^2 / sigma^2), each with
its 95% interval, and the JSON saying which is which."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from diffgen_fast import EmpiricalDenoiser, GaussianDenoiser, TrainingSet
from diffgen_fast.cli import main
from diffgen_fast.metrics.gap import analyze_gap, denoiser_gap

SIGMAS = [0.01, 0.3, 2.0, 40.0]


@pytest.fixture(scope="module")
def ts():
    return TrainingSet.gaussian(120, 5, mean=0.3, std=1.0, seed=4, dtype=torch.float64)


def test_eps_space_is_x0_gap_over_sigma_squared_per_sample(ts):
    G, E = GaussianDenoiser(ts), EmpiricalDenoiser(ts, precision="exact")
    r = denoiser_gap(G, ts, SIGMAS, n=64, seed=2, reference=E)
    assert r["space"] == "both"
    for k in ("gap", "stderr", "ci_low", "ci_high", "gap_per_dim"):
        assert r[k] == r["x0"][k]
        np.testing.assert_allclose(r["eps"][k], np.array(r["x0"][k]) / np.square(SIGMAS), rtol=1e-12, atol=0)
    # directly: the eps predictions (x - D) / sigma of both denoisers from the same draws
    gen = torch.Generator().manual_seed(2)
    idx = torch.randint(0, len(ts), (64,), generator=gen)
    noise = torch.randn(64, ts.d, generator=gen, dtype=torch.float64)
    s = SIGMAS[1]
    x = ts.flat()[idx] + s * noise
    sig = torch.tensor(s, dtype=torch.float64)
    e = ((x - G(x, sig)) / s - (x - E(x, sig)) / s).square().sum(dim=1)
    assert r["eps"]["gap"][1] == pytest.approx(float(e.mean()), rel=1e-9)
    se = float(e.std(unbiased=True)) / math.sqrt(64)
    assert r["eps"]["ci_high"][1] == pytest.approx(float(e.mean()) + 1.959963984540054 * se, rel=1e-9)


def test_analyze_gap_json_names_both_spaces(ts, tmp_path):
    res = analyze_gap({"D_G": GaussianDenoiser(ts)}, ts, sigmas=[0.1, 1.0, 10.0], n=16, out_dir=tmp_path)
    data = json.loads((tmp_path / "gap.json").read_text())
    assert data["space"] == "both" and set(data["settings"]["spaces"]) == {"x0", "eps"}
    m = data["models"]["D_G"]
    assert set(m["x0"]) == set(m["eps"]) >= {"gap", "ci_low", "ci_high", "gap_per_dim"}
    assert res["models"]["D_G"]["eps"]["gap"] == m["eps"]["gap"]


def test_cli_gap_prints_eps_space(tmp_path):
    r = CliRunner().invoke(
        main, ["analyze", "gap", "--sigmas", "3", "--n", "8", "--models", "gaussian", "--out", str(tmp_path)]
    )
    assert r.exit_code == 0, r.output
    assert "eps space" in r.output and "max eps gap / d" in r.output
