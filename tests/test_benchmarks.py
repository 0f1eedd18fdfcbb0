"""The benchmarks/ scripts are thin entry points over diffgen_fast.bench: each runs end to end with --tiny and writes
its CSV (rows with provenance and, for ours, the best-peer ratio) and markdown table. Timings are never asserted."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # each script end to end in a subprocess, 6-13 s

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--tiny", "--quiet", "--repeat", "1", "--warmup", "0"]


def _run(script, tmp_path, *extra):
    out = tmp_path / f"{script}.csv"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", f"{script}.py"), *FAST, "--out", str(out), *extra]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    rows = list(csv.DictReader(open(out)))
    md = (tmp_path / f"{script}.md").read_text()
    assert rows and "best peer / ours" in md
    for r in rows:
        for f in ("device", "cpu_model", "threads", "torch", "numpy", "date", "git_sha", "kernel" if r["impl"] == "ours"
                  else "op"):  # fmt: skip
            assert r[f], (f, r)
    ours = [r for r in rows if r["impl"] == "ours" and r["status"] == "ok"]
    assert ours
    for r in ours:  # the ratio is against the fastest peer that ran at that shape and sigma
        peers = [p for p in rows if p["impl"] != "ours" and p["status"] == "ok" and
                 all(p[f] == r[f] for f in ("op", "M", "N", "d", "sigma"))]  # fmt: skip
        if not peers:
            continue
        best = min(peers, key=lambda p: float(p["time_s"]))
        assert r["best_peer"] == best["impl"]
        assert float(r["vs_best_peer"]) == pytest.approx(float(best["time_s"]) / float(r["time_s"]), rel=1e-2)
    return rows, res.stdout


def test_bench_cpu_tiny(tmp_path):
    rows, out = _run("bench_cpu", tmp_path, "--sigma", "0.05,80", "--knn-1m", "--data-dir", str(tmp_path / "data"))
    assert "GEMM" in out
    ops = {(r["op"], r["impl"], r["precision"]) for r in rows}
    assert {("denoise", "ours", "auto"), ("denoise", "ours", "fast"), ("kde", "ours", "exact")} <= ops
    assert {("denoise", "dense", "fp32"), ("denoise", "chunked", "fp32"), ("kde", "chunked", "fp32")} <= ops
    assert {r["sigma"] for r in rows if r["op"] == "denoise"} == {"0.05", "80.0"}
    knn = [r for r in rows if r["op"] == "knn"]
    assert {r["impl"] for r in knn} == {"ours", "faiss"} and all(r["train"] == "npy memmap" for r in knn)
    assert {r["impl"] for r in rows if r["impl"] == "keops"} <= {"keops"}


def test_bench_knn_cpu_tiny(tmp_path):
    rows, _ = _run("bench_knn_cpu", tmp_path)
    assert {"dense", "faiss"} <= {r["impl"] for r in rows}
    assert all(int(r["knn_mismatch"]) == 0 for r in rows if r["impl"] == "ours" and r["status"] == "ok")


def test_bench_reference_tiny(tmp_path):
    rows, _ = _run("bench_reference", tmp_path, "--sigma", "1", "--peers", "dense,chunked,faiss")
    assert {r["backend"] for r in rows if r["impl"] == "ours"} == {"torch"}
    assert {r["op"] for r in rows} == {"denoise", "knn"}


def test_bench_softmax_denoise_tiny(tmp_path):
    rows, _ = _run("bench_softmax_denoise", tmp_path, "--sigma", "1", "--cases", "small", "--device", "cpu")
    assert {r["impl"] for r in rows} >= {"ours", "dense", "chunked"}


def test_bench_memorization_tiny(tmp_path):
    rows, _ = _run("bench_memorization", tmp_path, "--data-dir", str(tmp_path / "data"))
    assert {r["train"] for r in rows} == {"npy memmap", "tensor"}
    assert {r["impl"] for r in rows} >= {"ours", "faiss", "dense"}
