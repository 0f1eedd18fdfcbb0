"""The command line: demo end to end, info and its self-check, help, bad options, clean package errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from diffgen_fast import demo
from diffgen_fast.cli import main
from diffgen_fast.errors import InputError

REPO = Path(__file__).resolve().parents[1]

DEMO_FILES = (
    "report.md",
    "report.json",
    "nn_grid_empirical.png",
    "nn_grid_gaussian.png",
    "ratio_hist.png",
    "per_sample_empirical.csv",
    "per_sample_gaussian.csv",
)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    result = CliRunner().invoke(main, ["demo", "--n", "8", "--steps", "6", "--out", str(out), "--no-progress"])
    return out, result


def test_demo_end_to_end(demo_run):
    out, result = demo_run
    assert result.exit_code == 0, result.output + repr(result.exception)
    for name in DEMO_FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
        assert str(out / name) in result.output  # every written file is listed
    assert [p.name for p in out.iterdir() if p.name.endswith(".tmp")] == []

    summary = json.loads((out / "report.json").read_text())
    emp, gau = summary["denoisers"]["empirical"], summary["denoisers"]["gaussian"]
    assert emp["n_samples"] == gau["n_samples"] == 8
    assert emp["memorized_fraction"] >= 0.9
    assert gau["memorized_fraction"] <= 0.2
    assert summary["settings"]["steps"] == 6 and summary["data"]["n_train"] == 1797 and summary["data"]["d"] == 64
    for key in ("python", "torch", "numpy", "diffgen_fast"):
        assert summary["versions"][key]
    assert "git_sha" in summary and summary["created"]

    # The printed table has one row per denoiser with its fraction.
    assert "empirical" in result.output and "gaussian" in result.output
    assert f"{100 * emp['memorized_fraction']:.1f}%" in result.output

    # The per-sample CSV agrees with the summary.
    rows = (out / "per_sample_empirical.csv").read_text().splitlines()
    assert rows[0] == "index,nn1,nn2,d1,d2,ratio,memorized"
    assert len(rows) == 9
    assert sum(int(r.rsplit(",", 1)[1]) for r in rows[1:]) == emp["n_memorized"]

    md = (out / "report.md").read_text()
    assert "| denoiser | samples | memorized fraction | median ratio |" in md


def test_info_runs_checks_and_lists_backends():
    from diffgen_fast.ops.dispatch import backend_table

    result = CliRunner().invoke(main, ["info"])
    assert result.exit_code == 0, result.output
    for row in backend_table():
        assert row["backend"] in result.output
    for word in ("python", "torch", "numpy", "triton", "faiss", "sklearn", "pykeops", "CUDA", "native extension"):
        assert word in result.output, word
    assert "PASS" in result.output and "FAIL" not in result.output
    assert "softmax_denoise exact sigma=0.01" in result.output and "knn k=5" in result.output


def test_info_no_check():
    result = CliRunner().invoke(main, ["info", "--no-check"])
    assert result.exit_code == 0, result.output
    assert "self-check skipped" in result.output and "PASS" not in result.output


@pytest.mark.slow  # CLI subprocesses, ~5 s
def test_info_never_claims_a_backend_that_raises(monkeypatch):
    import diffgen_fast.ops.dispatch as dispatch

    real = dispatch.backend_table

    def lying_table(device=None):
        rows = real(device)
        for r in rows:
            if r["op"] == "knn" and r["backend"] == "cuda":
                r["available"], r["reason"] = True, "claimed"
        return rows

    monkeypatch.setattr(dispatch, "backend_table", lying_table)
    result = CliRunner().invoke(main, ["info"])
    assert result.exit_code == 1
    line = next(ln for ln in result.output.splitlines() if ln.split()[:2] == ["knn", "cuda"])
    assert " no " in line and "raised" in line and "FAIL" in line


def test_help():
    runner = CliRunner()
    for args in (["--help"], ["-h"], ["demo", "--help"], ["info", "--help"]):
        result = runner.invoke(main, args)
        assert result.exit_code == 0, (args, result.output)
        assert "Usage:" in result.output
    top = runner.invoke(main, ["--help"]).output
    assert "Examples" in top and "demo" in top and "info" in top
    demo_help = runner.invoke(main, ["demo", "--help"]).output
    assert "[default: 64; x>=2]" in demo_help and "--steps INT" in demo_help


def test_python_dash_m_help():
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run(
        [sys.executable, "-m", "diffgen_fast", "--help"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert p.returncode == 0, p.stderr
    assert "Usage:" in p.stdout and "demo" in p.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["demo", "--n", "1"], "Invalid value for '--n'"),
        (["demo", "--steps", "0"], "Invalid value for '--steps'"),
        (["demo", "--backend", "gpu-please"], "Invalid value for '--backend'"),
        (["demo", "--n", "many"], "'many' is not a valid integer"),
        (["nonsense"], "No such command"),
    ],
)
def test_bad_option_values(args, message):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert message in result.output


def test_package_errors_are_one_clean_line(monkeypatch, tmp_path):
    def failing_demo(*args, **kwargs):
        raise InputError("train: expected [N, d],\n got [3]")

    monkeypatch.setattr(demo, "run_demo", failing_demo)  # the CLI imports it from diffgen_fast.demo
    result = CliRunner().invoke(main, ["demo", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert result.output.strip() == "error: train: expected [N, d], got [3]"
    assert "Traceback" not in result.output


def test_info_reports_the_dispatched_simd_variant():
    from diffgen_fast import _native

    if not _native.available():
        pytest.skip("native extension not built")
    out = CliRunner().invoke(main, ["info", "--no-check"]).output
    assert f"simd dispatched (kernel variant running on this CPU): {_native.simd_level()}" in out
    assert _native.simd_level() in ("avx512f", "avx2+fma", "baseline")
    assert f"direct kernel (d <= 64, float32): {_native.direct_kernel()}" in out
    assert f"knn first pass (d > 32, float32): {_native.knn_kernel()}" in out
