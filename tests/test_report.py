"""Figures (figures.py), atomic writers (_atomic.py), the per-sample CSV (metrics/memorization.py) and the demo's
Markdown report (demo.py), on fake arrays; and the names report.py re-exports from them."""

from __future__ import annotations

import csv
import json
import math
import os
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from diffgen_fast import _atomic, demo, figures, report
from diffgen_fast.errors import InputError
from diffgen_fast.metrics import memorization

REPO = Path(__file__).resolve().parents[1]


def _png_ok(path: Path) -> tuple[int, int]:
    assert path.is_file() and path.stat().st_size > 1000
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def _no_temp_files(folder: Path) -> None:
    assert [p.name for p in folder.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.parametrize(
    "shape",
    [(11, 1, 8, 8), (5, 3, 6, 7), (9, 8, 8), (6, 23)],
    ids=["gray", "rgb", "gray-no-channel", "flat"],
)
def test_nn_grid_figure_shapes(tmp_path, shape):
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, shape).astype(np.float32)
    y = np.clip(x + 0.1 * rng.standard_normal(shape), -1, 1)
    r = rng.uniform(0, 1, shape[0])
    r[0] = np.nan  # sorts last, printed as n/a
    out = figures.nn_grid_figure(x, y, r, tmp_path / "grid.png", ncols=4, titles=[f"s{i}" for i in range(shape[0])])
    assert out == tmp_path / "grid.png"
    w, h = _png_ok(out)
    assert w > 100 and h > 100
    _no_temp_files(tmp_path)


def test_nn_grid_figure_torch_inputs_and_max_items(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(100, 1, 8, 8, generator=g) * 2 - 1
    y = torch.rand(100, 1, 8, 8, generator=g) * 2 - 1
    r = torch.rand(100, generator=g)
    few = figures.nn_grid_figure(x, y, r, tmp_path / "few.png", max_items=8, ncols=8)
    many = figures.nn_grid_figure(x, y, r, tmp_path / "many.png", max_items=64, ncols=8)
    assert _png_ok(few)[1] < _png_ok(many)[1]  # 1 row vs 8 rows


def test_nn_grid_figure_rejects_mismatch(tmp_path):
    x = np.zeros((4, 1, 8, 8))
    with pytest.raises(InputError, match="same shape"):
        figures.nn_grid_figure(x, np.zeros((4, 1, 8, 7)), np.zeros(4), tmp_path / "a.png")
    with pytest.raises(InputError, match="ratios"):
        figures.nn_grid_figure(x, x, np.zeros(3), tmp_path / "a.png")
    with pytest.raises(InputError, match="titles"):
        figures.nn_grid_figure(x, x, np.zeros(4), tmp_path / "a.png", titles=["a"])
    with pytest.raises(InputError, match="value_range"):
        figures.nn_grid_figure(x, x, np.zeros(4), tmp_path / "a.png", value_range=(1, 1))
    assert list(tmp_path.iterdir()) == []


def test_ratio_histogram(tmp_path):
    rng = np.random.default_rng(1)
    ratios = {
        "empirical": np.abs(rng.normal(0, 1e-3, 64)),
        "gaussian": torch.from_numpy(rng.uniform(0.5, 1.0, 64)),
        "with nan": np.array([0.1, np.nan, 0.9]),
    }
    out = figures.ratio_histogram(ratios, tmp_path / "hist.png", threshold=1 / 3)
    _png_ok(out)
    _no_temp_files(tmp_path)


def test_figures_leave_pyplot_alone():
    code = (
        "import sys, tempfile, numpy as np, os\n"
        "from diffgen_fast import demo, figures, report\n"
        "from diffgen_fast.metrics import score_report\n"
        "d = tempfile.mkdtemp()\n"
        "figures.ratio_histogram({'a': np.random.rand(10)}, os.path.join(d, 'h.png'))\n"
        "figures.nn_grid_figure(np.zeros((2, 1, 4, 4)), np.ones((2, 1, 4, 4)), [0.1, 0.5], os.path.join(d, 'g.png'))\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


def test_write_json_atomic_roundtrip(tmp_path):
    obj = {
        "a": np.float32(0.5),
        "b": np.arange(3),
        "c": torch.tensor([1.0, 2.0]),
        "nan": float("nan"),
        "inf": np.float64("inf"),
        "path": tmp_path,
        "flag": np.bool_(True),
        "nested": [{"x": (1, 2)}],
    }
    p = _atomic.write_json_atomic(obj, tmp_path / "sub" / "r.json")
    back = json.loads(p.read_text())
    assert back == {
        "a": 0.5,
        "b": [0, 1, 2],
        "c": [1.0, 2.0],
        "nan": None,
        "inf": None,
        "path": str(tmp_path),
        "flag": True,
        "nested": [{"x": [1, 2]}],
    }
    _no_temp_files(p.parent)
    assert stat.S_IMODE(p.stat().st_mode) == 0o644  # not mkstemp's 0600
    with pytest.raises(InputError, match="serialise"):
        _atomic.write_json_atomic({"x": object()}, tmp_path / "bad.json")
    assert not (tmp_path / "bad.json").exists()


def test_write_text_atomic_failure_keeps_old_file(tmp_path, monkeypatch):
    p = tmp_path / "report.md"
    _atomic.write_text_atomic("old\n", p)
    assert p.read_text() == "old\n"

    def broken_replace(src, dst):
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk on fire"):
        _atomic.write_text_atomic("new\n", p)
    monkeypatch.undo()
    assert p.read_text() == "old\n"
    assert sorted(q.name for q in tmp_path.iterdir()) == ["report.md"]
    _atomic.write_text_atomic("new\n", p)
    assert p.read_text() == "new\n"
    assert sorted(q.name for q in tmp_path.iterdir()) == ["report.md"]


def test_write_memorization_csv(tmp_path):
    res = SimpleNamespace(
        nn_index=torch.tensor([[3, 9], [4, 1]]),
        nn_dist=torch.tensor([[0.0, 2.0], [1.5, 2.0]]),
        ratio=torch.tensor([0.0, 0.75]),
        memorized=torch.tensor([True, False]),
    )
    p = memorization.write_memorization_csv(res, tmp_path / "s.csv")
    rows = list(csv.DictReader(p.open()))
    assert list(rows[0]) == ["index", "nn1", "nn2", "d1", "d2", "ratio", "memorized"]
    assert rows[0] == {"index": "0", "nn1": "3", "nn2": "9", "d1": "0", "d2": "2", "ratio": "0", "memorized": "1"}
    assert float(rows[1]["ratio"]) == 0.75 and rows[1]["memorized"] == "0"
    _no_temp_files(tmp_path)


def _fake_summary() -> dict:
    def den(cls, frac, med):
        return {
            "class": cls,
            "n_samples": 64,
            "memorized_fraction": frac,
            "median_ratio": med,
            "timings": {"sample_s": 0.5, "score_s": 0.01},
            "files": {"nn_grid": f"nn_grid_{cls[:-8].lower()}.png", "csv": f"per_sample_{cls[:-8].lower()}.csv"},
        }

    return {
        "created": "2025-01-01T00:00:00+00:00",
        "versions": {"python": "3.11", "torch": "2.13", "numpy": "2.4", "diffgen_fast": "0.1.0"},
        "git_sha": None,
        "device": "cpu",
        "data": {
            "name": "digits",
            "source": "sklearn digits",
            "n_train": 1797,
            "d": 64,
            "shape": [1, 8, 8],
            "value_range": [-1.0, 1.0],
        },
        "settings": {
            "n_samples": 64,
            "steps": 18,
            "sampler": "heun",
            "sigma_min": 0.002,
            "sigma_max": 80.0,
            "rho": 7.0,
            "churn": 0.0,
            "seed": 0,
            "backend": "auto",
            "threshold": 1 / 3,
        },
        "denoisers": {
            "empirical": den("EmpiricalDenoiser", 1.0, 1.2e-5),
            "gaussian": den("GaussianDenoiser", 0.0, math.nan),
        },
        "timings": {"total_s": 3.21},
        "files": {"ratio_hist": "ratio_hist.png"},
    }


def test_demo_report_markdown():
    md = demo.demo_report_markdown(_fake_summary())
    assert "| denoiser | samples | memorized fraction | median ratio |" in md
    assert "| empirical (EmpiricalDenoiser) | 64 | 100.0% | 0.0000 |" in md
    assert "| gaussian (GaussianDenoiser) | 64 | 0.0% | n/a |" in md  # NaN median shown as n/a
    for needle in ("digits", "1797", "heun", "18 steps", "L2", "[-1, 1]", "< 1/3", "3.21 s", "git SHA | unknown"):
        assert needle in md, needle
    assert "![ratio histogram](ratio_hist.png)" in md
    assert "(nn_grid_empirical.png)" in md and "(nn_grid_gaussian.png)" in md
    assert "(per_sample_empirical.csv)" in md
    assert "empirical 100.0% (as expected)" in md and "gaussian 0.0% (as expected)" in md


def test_demo_report_markdown_partial_summary():
    md = demo.demo_report_markdown({})
    assert md.startswith("# ") and "| denoiser |" in md and "n/a" in md


def test_report_module_reexports_the_old_names():
    """report.py was split; every name it had is still importable from it, and is the object of its new home."""
    from diffgen_fast.metrics import score_report

    homes = {
        _atomic: ["write_json_atomic", "write_text_atomic", "write_bytes_atomic", "write_npz_atomic", "_jsonable"],
        figures: ["nn_grid_figure", "ratio_histogram", "_new_figure", "_save_figure", "_provenance", "_git_sha",
                  "_as_numpy", "_fmt", "_fmt_fraction", "_format_threshold", "_format_ratio", "_HIST_COLORS"],
        demo: ["run_demo", "demo_report_markdown", "_versions", "_resolved_backends", "_progress_factory"],
        memorization: ["write_memorization_csv"],
        score_report: ["write_score_outputs", "write_score_csv", "distance_figure", "train_vs_heldout_figure",
                       "score_report_markdown"],
    }  # fmt: skip
    for module, names in homes.items():
        for name in names:
            assert getattr(report, name) is getattr(module, name), name
    assert set(report.__all__) == {
        "nn_grid_figure", "ratio_histogram", "write_json_atomic", "write_text_atomic", "write_memorization_csv",
        "demo_report_markdown", "run_demo",
    }  # fmt: skip
