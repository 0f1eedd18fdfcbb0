"""The linearity score as Li, Dai, Qu's released code computes it: raw values, probes x = y + sigma n (or pure noise),
the mixing weight a over linspace(0.99, 0.5, 5), reported per a and averaged; centring about the training mean is an
option. Checked against a direct computation from the same probe draws."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from diffgen_fast import GaussianDenoiser, InputError, TrainingSet
from diffgen_fast.cli import main
from diffgen_fast.metrics.gaussian import analyze_gaussian, linearity_score

SIGMAS = [0.01, 0.5, 3.0, 40.0]
D = 6


@pytest.fixture(scope="module")
def ts():
    return TrainingSet.gaussian(200, D, mean=0.5, std=1.3, seed=2, dtype=torch.float64)


def _maps():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(D, D, generator=g, dtype=torch.float64)
    b = 3.0 * torch.randn(D, generator=g, dtype=torch.float64)  # an offset as large as A x, 6x the data mean
    return A, b


def test_default_weights_are_the_authors():
    A, _ = _maps()
    r = linearity_score(
        lambda x, s: x @ A.T, TrainingSet.gaussian(50, D, seed=0, dtype=torch.float64), [1.0], n_pairs=4
    )
    assert r["a"] == np.linspace(0.99, 0.5, 5).tolist()
    assert r["center"] is False and r["probes"] == "data" and "raw values" in r["definition"]


@pytest.mark.parametrize("probes", ["data", "noise"])
def test_linear_map_scores_one_at_every_a(ts, probes):
    A, _ = _maps()
    r = linearity_score(lambda x, s: x @ A.T, ts, SIGMAS, n_pairs=32, probes=probes)
    assert len(r["linearity_per_a"]) == 5 and all(len(v) == len(SIGMAS) for v in r["linearity_per_a"])
    np.testing.assert_allclose(r["linearity_per_a"], 1.0, atol=1e-9)
    np.testing.assert_allclose(r["linearity"], 1.0, atol=1e-9)


def test_affine_map_with_offset_is_not_linear_by_default_but_is_when_centred(ts):
    A, b = _maps()
    affine = lambda x, s: x @ A.T + b  # noqa: E731
    # raw values: u = A xm + b against v = A xm + (sqrt(a) + sqrt(1-a)) b, so the cosine falls below 1 (most when
    # |b| ~ |A x|; an offset that dwarfs A x brings it back towards 1, as the cosine ignores scale)
    sig = SIGMAS[:3]
    raw = linearity_score(affine, ts, sig, n_pairs=32)
    assert max(raw["linearity"]) < 0.995
    assert np.max(raw["linearity_per_a"]) < 0.9995  # even at a = 0.99 the offset shows
    # the smaller a, the larger the offset's mismatch (1.414 b against b at a = 0.5)
    assert all(lo < hi for lo, hi in zip(raw["linearity_per_a"][-1], raw["linearity_per_a"][0]))
    cen = linearity_score(affine, ts, sig, n_pairs=32, center=True)
    np.testing.assert_allclose(cen["linearity_per_a"], 1.0, atol=1e-9)
    assert cen["center"] is True and "training mean" in cen["definition"]
    # D_G is affine: 1 when centred, below 1 on raw values for data with a non-zero mean
    G = GaussianDenoiser(ts)
    np.testing.assert_allclose(linearity_score(G, ts, SIGMAS, n_pairs=16, center=True)["linearity"], 1.0, atol=1e-9)
    assert min(linearity_score(G, ts, SIGMAS, n_pairs=16)["linearity"]) < 1 - 1e-6


def _direct(Dfn, ts, sigma, a_list, n_pairs, seed, probes):
    """The score computed directly from the same draws (torch.Generator(seed): per pair batch, (rows, noise) for x1,
    then for x2), one pair at a time."""
    gen = torch.Generator().manual_seed(seed)
    x = ts.flat()
    draws = []
    for _ in range(2):
        idx = torch.randint(0, len(ts), (n_pairs,), generator=gen)
        noise = torch.randn(n_pairs, ts.d, generator=gen, dtype=torch.float64)
        draws.append(x[idx] + sigma * noise if probes == "data" else sigma * noise)
    x1, x2 = draws
    per_a = []
    for a in a_list:
        cs = []
        for i in range(n_pairs):
            u = Dfn(math.sqrt(a) * x1[i] + math.sqrt(1 - a) * x2[i])
            v = math.sqrt(a) * Dfn(x1[i]) + math.sqrt(1 - a) * Dfn(x2[i])
            cs.append(float(u @ v / (u.norm() * v.norm())))
        per_a.append(cs)
    per_a = np.array(per_a)
    return per_a.mean(axis=1), per_a.mean(axis=0).mean(), per_a.mean(axis=0).std(ddof=1) / math.sqrt(n_pairs)


@pytest.mark.parametrize("probes", ["data", "noise"])
def test_matches_direct_computation(ts, probes):
    f = lambda v: torch.tanh(v) + 0.3  # noqa: E731
    r = linearity_score(lambda x, s: f(x), ts, [0.7], n_pairs=40, seed=3, probes=probes, batch=40)
    per_a, mean, se = _direct(f, ts, 0.7, r["a"], 40, 3, probes)
    np.testing.assert_allclose([v[0] for v in r["linearity_per_a"]], per_a, rtol=0, atol=1e-12)
    assert r["linearity"][0] == pytest.approx(mean, abs=1e-12) and r["stderr"][0] == pytest.approx(se, abs=1e-12)
    # a single weight
    one = linearity_score(lambda x, s: f(x), ts, [0.7], n_pairs=40, seed=3, probes=probes, batch=40, a=0.5)
    assert one["a"] == [0.5] and one["linearity"][0] == pytest.approx(per_a[-1], abs=1e-12)


def test_bad_arguments(ts):
    with pytest.raises(InputError, match="probes"):
        linearity_score(lambda x, s: x, ts, [1.0], probes="pure")
    with pytest.raises(InputError, match="a:"):
        linearity_score(lambda x, s: x, ts, [1.0], a=[0.5, 1.0])
    with pytest.raises(InputError, match="a:"):
        linearity_score(lambda x, s: x, ts, [1.0], a=[])


def test_analyze_gaussian_reports_per_a_and_the_convention(ts, tmp_path):
    dens = {"D_G": GaussianDenoiser(ts), "tanh": lambda x, s: torch.tanh(x)}
    res = analyze_gaussian(dens, ts, sigmas=[0.5, 5.0], n_pairs=8, out_dir=tmp_path)
    data = json.loads((tmp_path / "gaussian.json").read_text())
    g = data["denoisers"]["D_G"]
    assert data["settings"]["a"] == np.linspace(0.99, 0.5, 5).tolist() and data["settings"]["center"] is False
    assert data["settings"]["probes"] == "data" and "raw values" in data["settings"]["linearity"]
    assert len(g["linearity_per_a"]) == 5 and len(g["linearity_stderr_per_a"]) == 5 and len(g["linearity_stderr"]) == 2
    assert res["denoisers"]["D_G"]["linearity"] == g["linearity"]
    cen = analyze_gaussian({"D_G": GaussianDenoiser(ts)}, ts, sigmas=[0.5, 5.0], n_pairs=8, center=True)
    np.testing.assert_allclose(cen["denoisers"]["D_G"]["linearity"], 1.0, atol=1e-9)


@pytest.mark.parametrize(
    "flags, center, probes", [([], False, "data"), (["--center", "--probes", "noise"], True, "noise")]
)
def test_cli_center_and_probes(tmp_path, flags, center, probes):
    args = ["analyze", "gaussian", "--sigmas", "2", "--pairs", "4", "--models", "empirical,gaussian", *flags]
    r = CliRunner().invoke(main, [*args, "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "gaussian.json").read_text())["settings"]
    assert s["center"] is center and s["probes"] == probes
    assert "linearity: mean cos" in r.output
