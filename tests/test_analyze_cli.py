"""Training-set-size sweeps and the `diffgen-fast analyze` commands (each writes its figure and JSON)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from diffgen_fast import InputError, TrainingSet
from diffgen_fast.cli import main
from diffgen_fast.metrics.sweep import nested_subsets, size_sweep


def test_nested_subsets_are_nested():
    ts = TrainingSet.gaussian(50, 3, 0.0, 1.0, 0)
    a, b = nested_subsets(ts, [10, 30], seed=1)
    fa = {tuple(r.tolist()) for r in a.flat()}
    fb = {tuple(r.tolist()) for r in b.flat()}
    assert len(fa) == 10 and fa <= fb
    with pytest.raises(InputError, match="Ns"):
        nested_subsets(ts, [0, 10])
    with pytest.raises(InputError, match="Ns"):
        nested_subsets(ts, [51])


def test_size_sweep_distance_to_gaussian_falls_and_optimum_memorizes(tmp_path):
    # at sigma >= 2 the empirical optimum of more digits is closer to the Gaussian denoiser (measured 0.28 -> 0.18)
    ts = TrainingSet.builtin("digits")
    res = size_sweep(ts, [16, 1797], sigmas=[2.0, 5.0], n_samples=8, steps=10, n_probe=64, out_dir=tmp_path,
                     metrics=("memorization", "gaussian_difference", "gap"))  # fmt: skip
    assert res["metrics"]["memorization"] == [1.0, 1.0]
    diff = torch.tensor(res["metrics"]["gaussian_difference"])
    assert bool((diff[1] < diff[0]).all())
    assert res["metrics"]["gap"] == [[0.0, 0.0], [0.0, 0.0]]  # D* against itself
    assert json.loads((tmp_path / "sweep.json").read_text())["Ns"] == [16, 1797]
    assert (tmp_path / "sweep.png").stat().st_size > 1000
    with pytest.raises(InputError, match="metrics"):
        size_sweep(ts, [16], metrics=("nope",))


@pytest.mark.parametrize(
    "args, files",
    [
        (["gaussian", "--sigmas", "3", "--pairs", "16"], ["gaussian.json", "gaussian.png"]),
        (["gap", "--sigmas", "3", "--n", "16", "--models", "gaussian,knn:4"], ["gap.json", "gap.png"]),
        (["kde", "--d", "4", "--ns", "2,16", "--redraws", "3"], ["kde_relative_distance.json", "kde_relative_distance.png"]),  # noqa: E501
        (["sweep", "--ns", "16,64", "--samples", "4", "--metrics", "memorization,gaussian_difference"],
         ["sweep.json", "sweep.png"]),
    ],
)  # fmt: skip
def test_analyze_commands_write_figure_and_json(tmp_path, args, files):
    r = CliRunner().invoke(main, ["analyze", *args, "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    for f in files:
        assert (tmp_path / f).stat().st_size > 0 and f in r.output
    json.loads((tmp_path / files[0]).read_text())


def test_analyze_bad_arguments(tmp_path):
    r = CliRunner().invoke(main, ["analyze", "gap", "--models", "bogus", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "--models" in r.output
    r = CliRunner().invoke(main, ["analyze", "kde", "--ns", "a,b", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "--ns" in r.output
    r = CliRunner().invoke(main, ["analyze", "gaussian", "--data", "gaussian:x", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "--data" in r.output


def test_analyze_kde_linear_several_d(tmp_path):
    r = CliRunner().invoke(main, ["analyze", "kde", "--generator", "linear", "--d", "4,8", "--ns", "2,32",
                                  "--redraws", "3", "--out", str(tmp_path)])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "generator linear" in r.output and "KL = inf at N = 2" in r.output
    for f in ("d4/kde_relative_distance.json", "d8/kde_relative_distance.png", "kde_scales.json", "kde_scales.png"):
        assert (tmp_path / f).stat().st_size > 0 and f in r.output
    js = json.loads((tmp_path / "kde_scales.json").read_text())
    assert js["ds"] == [4, 8] and js["runs"][0]["Ns"] == [2, 32] and js["runs"][1]["kl_mean"][0] is None
    assert set(js["runs"][0]) >= {"Ns", "p_positive", "kl_mean", "kl_finite_fraction", "kl_reason"}
