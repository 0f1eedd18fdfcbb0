"""diffgen_fast.bench: FLOP / byte models, the tiny run end to end, CSV, roofline, regression check, profiler."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from diffgen_fast import bench

CEILINGS = {"device_type": "cpu", "gemm_fp32_gflops": 50.0, "gemm_gflops": 50.0, "gemm_roof": "fp32", "copy_gbps": 10.0}
PEERS = ("dense", "chunked", "faiss")  # keops compiles a module per shape (~10 s each): left to the CLI runs
ENV_FIELDS = ("device", "cpu_model", "threads", "simd", "torch", "numpy", "faiss", "date", "git_sha")


def test_flops_model():
    assert bench.flops("denoise", 2, 3, 5) == 4 * 2 * 3 * 5
    assert bench.flops("kde", 2, 3, 5) == 2 * 2 * 3 * 5
    assert bench.flops("knn", 2, 3, 5, k=1) == 60
    assert bench.flops("denoise", 256, 20_000, 64) == pytest.approx(1.31072e9)
    with pytest.raises(ValueError):
        bench.flops("nope", 1, 1, 1)


def test_bytes_model():
    # training set + queries read once, outputs written once
    assert bench.bytes_moved("denoise", 2, 3, 5, 4) == 4 * (3 * 5 + 2 * 5 + 2 * 5 + 2)
    assert bench.bytes_moved("kde", 2, 3, 5, 4) == 4 * (15 + 10 + 2)
    assert bench.bytes_moved("knn", 2, 3, 5, 4, k=2) == 4 * (15 + 10) + 2 * 2 * 4 + 2 * 2 * 8
    assert bench.bytes_moved("denoise", 1, 1000, 10, 2) == 2 * (10_000 + 10 + 10 + 1)
    # intensity of the large-N denoiser tends to 4 M / dtype_bytes FLOP per byte
    M = 64
    ai = bench.flops("denoise", M, 10**7, 64) / bench.bytes_moved("denoise", M, 10**7, 64, 4)
    assert ai == pytest.approx(M, rel=1e-3)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    rows = bench.run_bench(tiny=True, peers=PEERS, repeat=2, ceilings=CEILINGS, out_dir=out)
    return rows, out


def test_tiny_run_csv(tiny_run):
    rows, out = tiny_run
    path = out / "bench.csv"
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames
        got = list(reader)
    assert len(got) == len(rows) > 0
    for col in (
        "op",
        "impl",
        "backend",
        "precision",
        "M",
        "N",
        "d",
        "dtype",
        "status",
        "time_s",
        "spread_s",
        "gflops",
        "tflops",
        "gbps",
        "gemm_frac",
        "bw_frac",
        "max_abs_err",
        "lse_rel_err",
        "knn_mismatch",
        "sqdist_rel_err",
        "peak_mem_mb",
        "mem_method",
        "best_peer",
        "best_peer_time_s",
        "vs_best_peer",
        "kernel",
        "sigma",
        *ENV_FIELDS,
    ):
        assert col in fields, col
    from diffgen_fast.ops.dispatch import backend_table

    avail = {(r["op"], r["backend"]) for r in backend_table("cpu") if r["available"] and r["backend"] != "triton"}
    keys = {(r["op"], r["impl"], r["backend"], r["precision"]) for r in got}
    assert len(keys) == len(got)  # one row per backend / precision / peer
    for op, name in (("denoise", "softmax_denoise"), ("kde", "softmax_denoise"), ("knn", "knn")):
        ours = {r["backend"] for r in got if r["op"] == op and r["impl"] == "ours"}
        assert ours == {b for o, b in avail if o == name}, op
        assert "dense" in {r["impl"] for r in got if r["op"] == op}
    assert {r["precision"] for r in got if r["op"] == "denoise" and r["impl"] == "ours"} == {"exact", "fast"}
    assert "chunked" in {r["impl"] for r in got if r["op"] == "denoise"}
    assert "chunked" in {r["impl"] for r in got if r["op"] == "kde"}
    if any(b == "faiss" for _, b in avail):
        assert "faiss" in {r["impl"] for r in got if r["op"] == "knn"}
    for r in got:
        assert r["status"] == "ok", r
        for f in ENV_FIELDS:
            assert r[f] != "", (f, r)
        assert int(r["threads"]) >= 1 and r["kernel"]
        assert float(r["time_s"]) > 0 and float(r["gflops"]) > 0 and float(r["gbps"]) > 0
        assert 0 < float(r["gemm_frac"]) and 0 < float(r["bw_frac"])
        exact = r["impl"] == "ours" and r["precision"] == "exact"
        tol = 1e-5 if exact else 1e-3
        if r["op"] == "denoise":
            assert float(r["max_abs_err"]) < tol and float(r["lse_rel_err"]) < tol, r
        elif r["op"] == "kde":
            assert float(r["lse_rel_err"]) < tol, r
        else:
            assert int(r["knn_mismatch"]) == 0 and float(r["sqdist_rel_err"]) < tol, r
    table = bench.format_table(rows)
    assert len(table.splitlines()) == len(rows) + 2 and "%gemm" in table


def test_tiny_run_roofline(tiny_run):
    _, out = tiny_run
    png = out / "roofline.png"
    assert png.stat().st_size > 1000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unavailable_backend_and_skips():
    rows = bench.run_bench(
        ops=("denoise",),
        shapes=[(4, 50, 3)],
        backends=("torch", "cuda"),
        precision=("exact",),
        peers=False,
        repeat=1,
        ceilings=CEILINGS,
    )
    by = {r["backend"]: r for r in rows}
    assert by["torch"]["status"] == "ok"
    assert by["cuda"]["status"].startswith("unavailable")
    assert "time_s" not in by["cuda"]


def test_compare_flags_planted_regression(tiny_run, tmp_path):
    rows, _ = tiny_run
    old = tmp_path / "old.csv"
    bench.write_csv(rows, old)
    assert all(c["flag"] == "ok" for c in bench.compare(rows, old))
    slow = [dict(r) for r in rows]
    slow[1]["time_s"] = str(float(slow[1]["time_s"]) * 2)
    res = bench.compare(slow, old, tolerance=0.2)
    assert len(res) == len(rows)
    flagged = [c for c in res if c["flag"] == "REGRESSION"]
    assert len(flagged) == 1
    assert all(flagged[0][f] == str(slow[1][f]) or flagged[0][f] == slow[1][f] for f in bench.KEY_FIELDS)
    assert flagged[0]["ratio"] == pytest.approx(2.0)
    assert "REGRESSION" in bench.format_compare(res)


def test_profile_trace(tmp_path):
    import torch

    path = tmp_path / "trace.json"
    with bench.profile_trace(path):
        with bench.record("bench/test-range"):
            torch.randn(64, 64) @ torch.randn(64, 64)
    trace = json.loads(path.read_text())
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    assert len(events) > 0
    assert any("bench/test-range" in str(e.get("name", "")) for e in events)


def test_ceilings_cpu():
    c = bench.measure_ceilings("cpu")
    assert c["gemm_fp32_gflops"] > 0 and c["copy_gbps"] > 0 and c["gemm_gflops"] == c["gemm_fp32_gflops"]
    assert "fp32 GEMM" in bench.format_ceilings(c)


def test_cli_bench_tiny_compare_flags_a_regression(tmp_path):
    """`diffgen-fast bench --tiny` prints the ceilings and a table and writes CSV + roofline; --compare against a
    planted faster history exits 1."""
    import csv as _csv

    from click.testing import CliRunner

    from diffgen_fast.cli import main

    r = CliRunner().invoke(main, ["bench", "--tiny", "--op", "knn", "--repeat", "2", "--out", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    assert "GEMM" in r.output and "faiss" in r.output and (tmp_path / "a" / "roofline.png").stat().st_size > 1000
    rows = list(_csv.DictReader(open(tmp_path / "a" / "bench.csv")))
    for row in rows:
        if row["time_s"]:  # peers that are not installed (e.g. keops) have a status row without a time
            row["time_s"] = str(float(row["time_s"]) / 10)  # the "old" run was 10x faster
    with open(tmp_path / "old.csv", "w", newline="") as f:
        w = _csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    r = CliRunner().invoke(
        main,
        [
            "bench",
            "--tiny",
            "--op",
            "knn",
            "--repeat",
            "2",
            "--out",
            str(tmp_path / "b"),
            "--compare",
            str(tmp_path / "old.csv"),
        ],
    )
    assert r.exit_code == 1 and "REGRESSION" in r.output, r.output
    r = CliRunner().invoke(main, ["bench", "--shapes", "4x50", "--out", str(tmp_path / "c")])
    assert r.exit_code == 2 and "--shapes" in r.output


def test_kernel_passes_carry_profiler_ranges(tmp_path):
    """Each pass of the native kernels is a named torch.profiler range (NVTX on CUDA)."""
    import json as _json

    from diffgen_fast import _native, knn, softmax_denoise
    from diffgen_fast.bench import profile_trace

    if not _native.available():
        pytest.skip("native extension not built")
    x, y = torch.randn(8, 100), torch.randn(300, 100)
    with profile_trace(tmp_path / "t.json"):
        softmax_denoise(x, y, 0.5, backend="cpu", precision="exact")
        knn(x, y, 2, backend="cpu")
    names = {e.get("name", "") for e in _json.loads((tmp_path / "t.json").read_text())["traceEvents"]}
    for n in ("diffgen_fast/cpu.pass1_scores", "diffgen_fast/cpu.epilogue", "diffgen_fast/cpu.knn_chunk"):
        assert n in names, n


# ----------------------------------------------------------------------------------------------------------------------
# the peers, the ratio column, the timing loop


def _data(M=24, N=1500, d=16, sigma=0.7, seed=0):
    return bench.make_data(M, N, d, sigma, seed=seed)


@pytest.mark.parametrize("sigma", [0.3, 1.0, 20.0])
@pytest.mark.parametrize("chunk", [64, 500, 1500, 4096])  # dividing N, not dividing it, = N, > N
def test_chunked_and_dense_match_float64(sigma, chunk):
    from diffgen_fast.ops.softmax_denoise.naive import kde_log_density_naive, softmax_denoise_naive

    x, y = _data(sigma=sigma)
    ref, ref_lse = softmax_denoise_naive(x.double(), y.double(), sigma)
    ref_kde = kde_log_density_naive(x.double(), y.double(), sigma)
    out, lse = bench.chunked_softmax_denoise(x, y, sigma, chunk)
    d_out, d_lse = bench.dense_softmax_denoise(x, y, sigma)
    for o, l in ((out, lse), (d_out, d_lse)):
        assert o.dtype == torch.float32 and l.dtype == torch.float32
        torch.testing.assert_close(o.double(), ref, atol=2e-5, rtol=0)
        torch.testing.assert_close(l.double(), ref_lse, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out, d_out, atol=2e-5, rtol=0)
    none, lse_only = bench.chunked_softmax_denoise(x, y, sigma, chunk, need_out=False)
    assert none is None and torch.equal(lse_only, lse)
    for kde in (bench.chunked_kde(x, y, sigma, chunk), bench.dense_kde(x, y, sigma)):
        torch.testing.assert_close(kde.double(), ref_kde, atol=1e-4, rtol=1e-5)


def test_knn_peers_match_float64():
    from diffgen_fast.ops.knn.naive import knn_naive

    x, y = _data(M=30, N=800, d=8)
    r_d2, r_idx = knn_naive(x.double(), y.double(), 3)
    results = [bench.dense_knn(x, y, 3), bench.dense_knn(x, y, 3, block=7)]
    pytest.importorskip("faiss")
    results.append(bench.faiss_knn(x.numpy(), y.numpy(), 3))
    for d2, idx in results:
        assert torch.equal(idx.long(), r_idx)
        torch.testing.assert_close(d2.double(), r_d2, rtol=1e-4, atol=1e-5)


def test_make_data_near_fraction():
    x, y = bench.make_data(10, 50, 4, 1e-4, seed=1, near=0.5)
    dmin = torch.cdist(x.double(), y.double()).min(1).values
    near = dmin < 1e-2
    assert near.tolist() == [True, False] * 5  # every other row is a noisy training point


def test_calibrate_chunk_picks_a_candidate():
    x, y = _data(M=8, N=3000, d=4)
    best, times = bench.calibrate_chunk("denoise", x, y, 1.0, candidates=(256, 1024, 8192))
    assert set(times) == {256, 1024, 3000}  # capped at N
    assert best == min(times, key=times.get)
    assert bench.calibrate_chunk("denoise", x, y, 1.0, candidates=(256, 1024, 8192)) == (best, times)  # cached


def test_best_peer_ratio_is_against_the_fastest_valid_peer():
    def row(impl, t, status="ok", **kw):
        base = dict(op="denoise", M=4, N=5, d=6, sigma=1.0, device="cpu", impl=impl, backend="-", status=status,
                    time_s=str(t), max_abs_err="1e-06", gflops="1.0")  # fmt: skip
        return {**base, **kw}

    rows = [
        row("ours", 0.5, backend="cpu"),
        row("ours", 4.0, backend="torch"),
        row("dense", 3.0),
        row("chunked", 2.0),
        row("keops", "", status="not installed (ModuleNotFoundError)"),
        row("fastbutwrong", 0.1, max_abs_err="nan"),  # wrong answers do not count
        dict(row("dense", 0.01), sigma=80.0),  # another sigma: another group
    ]
    bench.add_best_peer(rows)
    assert rows[0]["best_peer"] == "chunked" and rows[0]["best_peer_time_s"] == "2.0"
    assert float(rows[0]["vs_best_peer"]) == pytest.approx(4.0)
    assert float(rows[1]["vs_best_peer"]) == pytest.approx(0.5)
    assert "vs_best_peer" not in rows[2]
    md = bench.format_markdown(rows)
    assert "| chunked |" in md and "**4x**" in md and "keops" in md


def test_time_interleaved_rotates_and_drops_failures():
    calls = []

    def make(name):
        return lambda i: calls.append((name, i))

    def boom(i):
        raise RuntimeError("no")

    fns = {"a": make("a"), "b": make("b"), "c": make("c"), "bad": boom}
    times, failed = bench.time_interleaved(fns, repeat=3, warmup=1, rotate=2)
    assert set(failed) == {"bad"} and isinstance(failed["bad"], RuntimeError)
    assert all(len(times[k]) == 3 for k in "abc") and times["bad"] == []
    order = [n for n, _ in calls]
    assert order[:3] == ["a", "b", "c"]  # round 0 (warm-up): a b c, then bad raises and is dropped
    assert order[3:6] == ["b", "c", "a"]  # round 1: the order rotated by one place
    assert order[6:9] == ["c", "a", "b"]  # round 2
    assert order[9:] == ["a", "b", "c"]  # round 3
    assert {i for _, i in calls} == {0, 1}  # input copies cycled


def test_dense_skipped_over_the_memory_budget():
    rows = bench.run_bench(ops=("denoise", "kde"), shapes=[(8, 400, 4)], backends=("torch",), precision=("exact",),
                           peers=("dense", "chunked", "keops"), repeat=1, ceilings=CEILINGS,
                           mem_budget=1000)  # fmt: skip
    dense = [r for r in rows if r["impl"] == "dense"]
    assert len(dense) == 2 and all(r["status"].startswith("skipped: needs") for r in dense)
    keops = [r for r in rows if r["impl"] == "keops"]
    assert all(r["status"] == "ok" or r["status"].startswith("not installed") for r in keops)
    ours = [r for r in rows if r["impl"] == "ours"]
    assert all(r["best_peer"] in ("chunked", "keops") for r in ours)


def test_knn_on_a_memory_mapped_npy(tmp_path):
    path = bench.make_npy(tmp_path / "y.npy", 3000, 8)
    rows = bench.run_bench(ops=("knn",), shapes=[(20, 3000, 8)], backends=("cpu", "torch"), peers=("faiss", "dense"),
                           k=2, repeat=1, ceilings=CEILINGS, train_npy=path)  # fmt: skip
    assert {r["impl"] for r in rows} == {"ours", "faiss", "dense"}
    for r in rows:
        if r["status"].startswith("unavailable"):
            continue
        assert r["status"] == "ok" and r["train"] == "npy memmap" and int(r["knn_mismatch"]) == 0, r
        if r["impl"] == "ours":
            assert r["best_peer"] in ("faiss", "dense") and float(r["vs_best_peer"]) > 0


def test_cli_bench_help_renders_paragraphs():
    from click.testing import CliRunner

    from diffgen_fast.cli import main

    r = CliRunner().invoke(main, ["bench", "--help"])
    assert r.exit_code == 0
    assert "\\b" not in r.output and "\b" not in r.output
    lines = r.output.splitlines()
    ex = [ln.strip() for ln in lines if ln.strip().startswith("diffgen-fast bench")]
    assert len(ex) == 3, r.output  # one example per line, not run together
    assert "--sigma" in r.output and "--threads" in r.output
