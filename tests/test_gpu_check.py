"""benchmarks/gpu_check.py --dry-run: the GPU check's script on the CPU (tiny shapes, Triton in the interpreter, CUDA
parts skipped), so that it runs on a bare GPU machine the day it is needed."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # the whole dry run, ~40 s
def test_gpu_check_dry_run_writes_csvs_and_summary(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--out", str(out),
                        "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "case_a: start" in p.stdout  # progress is printed as it goes
    with open(out / "parts.csv") as f:
        parts = {r["part"]: r for r in csv.DictReader(f)}
    assert parts["build"]["status"] == "skipped" and parts["pytest"]["status"] == "skipped"
    for name in ("ceilings", "case_a", "case_b", "small_d", "knn_64", "knn_3072"):
        assert parts[name]["status"] in ("ok", "partial"), parts[name]
        if name != "ceilings":
            assert (out / f"{name}.csv").exists()
    with open(out / "all.csv") as f:
        rows = list(csv.DictReader(f))
    ok = {(r["case"], r["backend"], r["precision"]) for r in rows if r["status"] == "ok"}
    assert ("case_a", "triton", "auto") in ok and ("case_b", "triton", "fast") in ok
    assert any(r["backend"] == "cuda" and r["status"].startswith("skipped") for r in rows)
    for r in rows:  # fp32 data at the default precision is fp32-accurate
        if r["case"] == "case_a" and r["precision"] in ("auto", "exact") and r["status"] == "ok":
            assert float(r["rel_err"]) <= 1e-4, r
    summary = (out / "summary.md").read_text()
    assert "## Verdicts" in summary and "case A triton fast" in summary


def test_gpu_check_keeps_going_past_a_failing_part(tmp_path, monkeypatch):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)

    def boom(args, timeout):
        raise RuntimeError("no nvcc")

    monkeypatch.setattr(gpu_check, "_part_build", boom)
    monkeypatch.setattr(gpu_check, "_child", lambda args, part, timeout: ("ok", "stub"))
    assert gpu_check.main(["--out", str(tmp_path), "--skip", "pytest"]) == 0
    with open(tmp_path / "parts.csv") as f:
        parts = {r["part"]: r for r in csv.DictReader(f)}
    assert parts["build"]["status"] == "error" and "no nvcc" in parts["build"]["note"]
    assert parts["pytest"]["status"] == "skipped" and parts["case_a"]["status"] == "ok"
    assert (tmp_path / "summary.md").exists()
