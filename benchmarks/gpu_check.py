"""One-shot GPU check for a bare GPU machine, bounded to ~8 minutes: build, gpu tests, benchmarks, summary.

    python benchmarks/gpu_check.py --out DIR          # on the GPU machine (benchmarks/gpu_check.sh)
    python benchmarks/gpu_check.py --out DIR --dry-run  # CPU: tiny shapes, Triton in the interpreter, no build

Parts, each run with its own time budget and recorded as ok / error / timeout / skipped (a failing part never
stops the next one; benchmark parts run in a child process killed at their budget):

  build     python setup.py build_ext --inplace with DIFFGEN_FAST_BUILD_EXT=1 DIFFGEN_FAST_BUILD_CUDA=1
  pytest    pytest -m gpu -q
  ceilings  diffgen_fast.bench.measure_ceilings: bf16 / tf32 / fp32 GEMM rate, copy bandwidth
  case_a    denoise 1024 x 50k x 3072 fp32 (compute-bound: fraction of the measured bf16 GEMM rate)
  case_b    denoise 64 x 1.28M x 12288 bf16 (memory-bound: fraction of the copy bandwidth; N cut to --mem-gb)
  small_d   denoise 4096 x 1M x 64 fp32 (triton and the native cuda kernel)
  knn_64    knn 10k x 1M x 64 fp32 against dense cdist + topk
  knn_3072  knn 50k x 50k x 3072 fp32 against dense cdist + topk

Data are synthetic and generated on the device; errors are against float64 on the first --n-ref queries (computed
on the device in float64, chunked). Timing, ceilings, FLOP / byte models and error columns are diffgen_fast.bench's.
Writes DIR/<part>.csv, DIR/all.csv, DIR/parts.csv, DIR/ceilings.json and DIR/summary.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (op, M, N, d, dtype, sigma, ours [(backend, precision)], peers, budget seconds on the GPU)
CASES = {
    "case_a": ("denoise", 1024, 50_000, 3072, "float32", 1.0,
               [("triton", "fast"), ("triton", "auto"), ("triton", "exact"), ("torch", "auto")], ("chunked",), 55),
    "case_b": ("denoise", 64, 1_280_000, 12288, "bfloat16", 80.0,
               [("triton", "fast"), ("triton", "auto"), ("triton", "exact")], (), 55),
    "small_d": ("denoise", 4096, 1_000_000, 64, "float32", 1.0,
                [("triton", "fast"), ("triton", "auto"), ("cuda", "auto"), ("cuda", "fast")], ("chunked",), 40),
    "knn_64": ("knn", 10_000, 1_000_000, 64, "float32", 0.1, [("cuda", "exact"), ("torch", "exact")], ("dense",), 35),
    "knn_3072": ("knn", 50_000, 50_000, 3072, "float32", 0.1, [("torch", "exact"), ("cuda", "exact")], ("dense",),
                 35),
}  # fmt: skip
TINY = {  # --dry-run: the same cases at interpreter-sized shapes
    "case_a": (8, 300, 48), "case_b": (4, 400, 64), "small_d": (8, 300, 8), "knn_64": (8, 300, 8),
    "knn_3072": (8, 200, 48),
}  # fmt: skip
BUDGETS = {"build": 200, "pytest": 100, "ceilings": 20}
TIME_LIMIT = 450.0  # seconds for everything (the window is 8 minutes)
K = 10


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------------------------------
# the parent: parts in order, each bounded


def _run_cmd(cmd, timeout, env=None, log_path=None) -> tuple[str, str]:
    """(status, note) of a subprocess bounded by `timeout` seconds; its output goes to log_path and the tail here."""
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, timeout=timeout, capture_output=True, text=True)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"") if isinstance(e.stdout, bytes) else (e.stdout or "").encode()
        if log_path:
            with open(log_path, "wb") as f:
                f.write(out)
        return "timeout", f"killed after {timeout:.0f} s"
    text = p.stdout + p.stderr
    if log_path:
        with open(log_path, "w") as f:
            f.write(text)
    tail = [ln for ln in text.strip().splitlines() if ln.strip()][-1:] or [""]
    return ("ok" if p.returncode == 0 else "error"), f"rc={p.returncode} {tail[0][:160]}"


def _part_build(args, timeout):
    if args.dry_run:
        return "skipped", "dry run: no build"
    env = dict(os.environ, DIFFGEN_FAST_BUILD_EXT="1", DIFFGEN_FAST_BUILD_CUDA="1",
               MAX_JOBS=str(os.cpu_count() or 4))  # fmt: skip
    return _run_cmd([sys.executable, "setup.py", "build_ext", "--inplace"], timeout, env,
                    os.path.join(args.out, "build.log"))  # fmt: skip


def _part_pytest(args, timeout):
    if args.dry_run:
        return "skipped", "dry run: no GPU tests"
    return _run_cmd([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"], timeout,
                    None, os.path.join(args.out, "pytest.log"))  # fmt: skip


def _child(args, part, timeout):
    cmd = [sys.executable, os.path.abspath(__file__), "--part", part, "--out", args.out, "--mem-gb", str(args.mem_gb),
           "--n-ref", str(args.n_ref)] + (["--dry-run"] if args.dry_run else [])  # fmt: skip
    status_path = os.path.join(args.out, "parts", f"{part}.json")
    try:
        p = subprocess.run(cmd, cwd=ROOT, timeout=timeout)
        rc = p.returncode
    except subprocess.TimeoutExpired:
        st = _read_json(status_path)
        return "timeout", f"killed after {timeout:.0f} s; {st.get('note', '')}".strip("; ")
    st = _read_json(status_path)
    if rc != 0:
        return "error", st.get("note") or f"child rc={rc}"
    return st.get("status", "error"), st.get("note", "")


def _read_json(path) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except Exception:
        return {}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for the CSVs, logs and summary.md")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton interpreter, no build")
    ap.add_argument("--time-limit", type=float, default=TIME_LIMIT, help="seconds for all parts together")
    ap.add_argument("--mem-gb", type=float, default=60.0, help="most GB of device memory for one case's data")
    ap.add_argument("--n-ref", type=int, default=4, help="queries checked against float64")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip")
    ap.add_argument("--part", help=argparse.SUPPRESS)  # the child process: one benchmark part
    args = ap.parse_args(argv)
    os.makedirs(os.path.join(args.out, "parts"), exist_ok=True)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if args.part:
        return _child_main(args)
    t0 = time.monotonic()
    skip = {s for s in args.skip.split(",") if s}
    parts = [("build", _part_build), ("pytest", _part_pytest), ("ceilings", None)] + [(c, None) for c in CASES]
    records = []
    for name, fn in parts:
        left = args.time_limit - (time.monotonic() - t0)
        budget = BUDGETS.get(name) or CASES[name][-1]
        if args.dry_run:
            budget = max(budget, 120)  # the interpreter and CPU imports are slow; no window to keep
        timeout = min(budget, left)
        t = time.monotonic()
        if name in skip:
            status, note = "skipped", "--skip"
        elif timeout < 10:
            status, note = "skipped", f"out of time ({left:.0f} s left)"
        else:
            log(f"{name}: start (budget {timeout:.0f} s, {left:.0f} s left)")
            try:
                status, note = fn(args, timeout) if fn else _child(args, name, timeout)
            except Exception as e:  # keep going
                status, note = "error", f"{type(e).__name__}: {e}"
        dt = time.monotonic() - t
        records.append(dict(part=name, status=status, seconds=f"{dt:.1f}", note=note))
        log(f"{name}: {status} in {dt:.1f} s {note}")
    _finish(args, records, time.monotonic() - t0)
    return 0


# ----------------------------------------------------------------------------------------------------------------------
# the child: one benchmark part


def _child_main(args) -> int:
    import torch

    t0 = time.monotonic()
    part = args.part
    status_path = os.path.join(args.out, "parts", f"{part}.json")
    device = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    st = {"status": "error", "note": ""}
    try:
        if part == "ceilings":
            from diffgen_fast import bench

            ceil = bench.measure_ceilings(device)
            ceil["environment"] = bench.environment(device)
            with open(os.path.join(args.out, "ceilings.json"), "w") as f:
                json.dump(ceil, f, indent=1)
            st = {"status": "ok", "note": bench.format_ceilings(ceil)}
        else:
            rows, note = run_case(part, args, device, t0)
            st = {"status": "ok" if rows and all(r.get("status") == "ok" for r in rows) else "partial", "note": note}
    except Exception as e:
        import traceback

        traceback.print_exc()
        st = {"status": "error", "note": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
    st["seconds"] = time.monotonic() - t0
    with open(status_path, "w") as f:
        json.dump(st, f)
    return 0


def _gen(N, d, dtype, device, seed, block=1 << 16):
    """[N, d] uniform in [-1, 1], generated on the device in blocks (no fp32 copy of a bf16 set)."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    y = torch.empty(N, d, dtype=dtype, device=device)
    for s in range(0, N, block):
        e = min(N, s + block)
        y[s:e] = torch.rand(e - s, d, generator=g, device=device).mul_(2).sub_(1)
    return y


def _reference(op, x, y, sigma, k, block=1 << 15):
    """float64 answer on the device for the few queries x, streamed over y (differences-free norm expansion in
    float64: its error is ~d 2^-53 of the norms, far below the fp32 errors measured)."""
    import torch

    x = x.double()
    xx = (x * x).sum(1)
    M, d = x.shape
    if op == "knn":
        best_d = torch.empty(M, 0, dtype=torch.float64, device=x.device)
        best_i = torch.empty(M, 0, dtype=torch.int64, device=x.device)
        for s in range(0, y.shape[0], block):
            yc = y[s : s + block].double()
            d2 = (xx[:, None] - 2 * x @ yc.T + (yc * yc).sum(1)[None]).clamp_min(0)
            cd = torch.cat([best_d, d2], 1)
            ci = torch.cat([best_i, torch.arange(s, s + yc.shape[0], device=x.device).expand(M, -1)], 1)
            v, j = cd.topk(min(k, cd.shape[1]), dim=1, largest=False)
            best_d, best_i = v, ci.gather(1, j)
        return best_d.cpu(), best_i.cpu()
    m = torch.full((M,), -math.inf, dtype=torch.float64, device=x.device)
    l = torch.zeros(M, dtype=torch.float64, device=x.device)
    o = torch.zeros(M, d, dtype=torch.float64, device=x.device)
    for s in range(0, y.shape[0], block):
        yc = y[s : s + block].double()
        z = -(xx[:, None] - 2 * x @ yc.T + (yc * yc).sum(1)[None]).clamp_min(0) / (2 * sigma * sigma)
        mn = torch.maximum(m, z.max(1).values)
        r = torch.exp(m - mn)
        p = torch.exp(z - mn[:, None])
        l = l * r + p.sum(1)
        o = o * r[:, None] + p @ yc
        m = mn
    return (o / l[:, None]).cpu(), (m + l.log()).cpu()


def run_case(part, args, device, t0):
    import torch

    from diffgen_fast import bench, knn, softmax_denoise

    op, M, N, d, dtype_name, sigma, ours, peers, budget = CASES[part]
    if args.dry_run:
        M, N, d = TINY[part]
        budget = 120
    dtype = getattr(torch, dtype_name)
    nbytes = torch.finfo(dtype).bits // 8
    note = []
    if N * d * nbytes > args.mem_gb * 1e9:
        N = int(args.mem_gb * 1e9 // (d * nbytes))
        note.append(f"N cut to {N} by --mem-gb {args.mem_gb:g}")
    ceil = _read_json(os.path.join(args.out, "ceilings.json"))
    if not ceil:
        ceil = bench.measure_ceilings(device)
    env = ceil.get("environment") or bench.environment(device)
    gemm16 = ceil.get("gemm_bf16_gflops") or ceil.get("gemm_gflops")
    bw = ceil.get("copy_gbps")
    log(f"{part}: {op} {M} x {N} x {d} {dtype_name} sigma={sigma:g} on {device.type}")
    y = _gen(N, d, dtype, device, seed=1)
    g = torch.Generator(device=device).manual_seed(2)
    j = torch.randint(0, N, (M,), device=device, generator=g)
    x = (y[j].float() + sigma * torch.randn(M, d, device=device, generator=g)).to(dtype)
    x[1::2] = (torch.rand(M // 2, d, device=device, generator=g) * 2 - 1).to(dtype)  # half near, half random
    n_ref = min(M, args.n_ref)
    ref = _reference(op, x[:n_ref], y, sigma, K)
    impls = []
    for b, p in ours:
        if b == "cuda" and device.type != "cuda":
            impls.append(bench._Impl("ours", b, p, status="skipped: needs CUDA (dry run)"))
            continue
        if op == "denoise":
            fn = lambda i, b=b, p=p: softmax_denoise(x, y, sigma, return_lse=True, backend=b, precision=p)  # noqa: E731
        else:
            fn = lambda i, b=b: knn(x, y, K, backend=b)  # noqa: E731
        impls.append(bench._Impl("ours", b, p, fn, kernel=bench.kernel_variant(op, b, p, d)))
    if dtype == torch.float32 and peers:
        mem = bench._budget(device, None)
        impls += bench._peer_impls(op, peers, [x], [y], sigma, K, device, mem, 4096 if args.dry_run else 16384, ())
    fl = bench.flops(op, M, N, d, K)
    by = bench.bytes_moved(op, M, N, d, nbytes, K)
    base = dict(op=op, M=M, N=N, d=d, k=K if op == "knn" else "", dtype=dtype_name, sigma=sigma,
                device_type=device.type, intensity=f"{fl / by:.4g}", roof="bf16",
                ceil_gemm_gflops=f"{gemm16:.4g}" if gemm16 else "",
                ceil_bw_gbps=f"{bw:.4g}" if bw else "", case=part)  # fmt: skip
    rows, calls, first = {}, {}, {}
    for n, im in enumerate(impls):
        row = dict(base, impl=im.impl, backend=im.backend, precision=im.precision, kernel=im.kernel, chunk=im.chunk)
        if im.fn is None:
            rows[n] = {**row, "status": im.status, **env}
            continue
        if time.monotonic() - t0 > budget * 0.8:
            rows[n] = {**row, "status": "skipped: case time budget spent", **env}
            continue
        try:
            t = time.monotonic()
            res, peak, method = bench._peak_call(lambda fn=im.fn: fn(0), device)  # compiles / autotunes
            first[n] = time.monotonic() - t
            errs = bench._errors(op, res, ref)
            if op == "denoise":
                out = res[0][:n_ref].double().cpu()
                errs["rel_err"] = f"{float(((out - ref[0]).norm(dim=1) / ref[0].norm(dim=1)).max()):.2e}"
            del res
        except Exception as e:
            rows[n] = {**row, "status": f"error: {bench._first_line(e)}", **env}
            continue
        rows[n] = {**row, **errs, "peak_mem_mb": peak, "mem_method": method, "first_call_s": f"{first[n]:.3g}", **env}
        calls[n] = im.fn
        log(f"{part}: {im.impl} {im.backend} {im.precision} first call {first[n]:.2f} s, errors {errs}")
    # repetitions from what is left of the budget: a second call costs about the fastest of the later ones, bounded
    left = budget * 0.9 - (time.monotonic() - t0)
    per_round = sum(min(first[n], 10.0) for n in calls) or 1.0
    repeat = max(1, min(5, int(left / per_round) - 1))
    warmup = 1 if left > 3 * per_round else 0
    times, failed = bench.time_interleaved(calls, repeat=repeat if left > per_round else 1, warmup=warmup,
                                           device=device)  # fmt: skip
    for n, e in failed.items():
        rows[n]["status"] = f"error: {bench._first_line(e)}"
    for n in calls:
        if n in failed or not times[n]:
            continue
        t = statistics.median(times[n])
        gf, gbs = fl / t / 1e9, by / t / 1e9
        rows[n].update(status="ok", time_s=f"{t:.4g}", spread_s=f"{max(times[n]) - min(times[n]):.2g}",
                       gflops=f"{gf:.4g}", tflops=f"{gf / 1e3:.4g}", gbps=f"{gbs:.4g}", repeat=len(times[n]),
                       warmup=warmup, gemm_frac=f"{gf / gemm16:.4g}" if gemm16 else "",
                       bw_frac=f"{gbs / bw:.4g}" if bw else "")  # fmt: skip
        log(f"{part}: {rows[n]['impl']} {rows[n]['backend']} {rows[n]['precision']}: {t * 1e3:.2f} ms, "
            f"{gf / 1e3:.3g} TFLOP/s ({rows[n]['gemm_frac']} of bf16 GEMM), "
            f"{gbs:.4g} GB/s ({rows[n]['bw_frac']} of copy)")
    out = bench.add_best_peer([rows[n] for n in range(len(impls))])
    bench.write_csv(out, os.path.join(args.out, f"{part}.csv"))
    return out, "; ".join(note)


# ----------------------------------------------------------------------------------------------------------------------
# summary


def _find(rows, **kw):
    return [r for r in rows if all(str(r.get(k)) == str(v) for k, v in kw.items()) and r.get("status") == "ok"]


def _f(v, fmt="{:.3g}"):
    try:
        return fmt.format(float(v))
    except (TypeError, ValueError):
        return "-"


def verdicts(rows) -> list[str]:
    """The targets of docs/gpu.md, one line each."""
    out = []
    a = {r["precision"]: r for r in _find(rows, case="case_a", backend="triton")}
    if "fast" in a:
        fr = float(a["fast"]["gemm_frac"] or "nan")
        out.append(f"case A triton fast: {_f(a['fast']['tflops'])} TFLOP/s = {_f(100 * fr, '{:.0f}')}% of the bf16 "
                   f"GEMM rate (target >= 70%): {'PASS' if fr >= 0.7 else 'FAIL'}")  # fmt: skip
        for p in ("auto", "exact"):
            if p in a:
                ratio = float(a[p]["time_s"]) / float(a["fast"]["time_s"])
                tgt = " (target <= 3x)" if p == "exact" else ""
                ok = (" PASS" if ratio <= 3 else " FAIL") if p == "exact" else ""
                err = a[p].get("rel_err", "-")
                out.append(f"case A triton {p}: {ratio:.2f}x the fast time{tgt}{ok}; rel err {err}")
    b = {r["precision"]: r for r in _find(rows, case="case_b", backend="triton")}
    if "fast" in b:
        fr = float(b["fast"]["bw_frac"] or "nan")
        out.append(f"case B triton fast: {_f(b['fast']['gbps'])} GB/s = {_f(100 * fr, '{:.0f}')}% of the copy "
                   f"bandwidth (target >= 80%): {'PASS' if fr >= 0.8 else 'FAIL'}")  # fmt: skip
        if "exact" in b:
            ratio = float(b["exact"]["time_s"]) / float(b["fast"]["time_s"])
            ok = "PASS" if ratio <= 3 else "FAIL"
            out.append(f"case B triton exact: {ratio:.2f}x the fast time (target <= 3x) {ok}")
    for case in ("knn_64", "knn_3072"):
        for r in _find(rows, case=case, impl="ours"):
            if r.get("vs_best_peer"):
                out.append(f"{case} {r['backend']}: {_f(r['time_s'])} s, {r['best_peer']} (cdist + topk) time / ours = "
                           f"{r['vs_best_peer']}; index mismatches {r.get('knn_mismatch', '-')}")  # fmt: skip
    return out


def _finish(args, records, total):
    sys.path.insert(0, ROOT)
    from diffgen_fast import bench

    bench.write_csv(records, os.path.join(args.out, "parts.csv"))
    rows = []
    for c in CASES:
        p = os.path.join(args.out, f"{c}.csv")
        if os.path.exists(p):
            rows += bench.read_csv(p)
    if rows:
        bench.write_csv(rows, os.path.join(args.out, "all.csv"))
    ceil = _read_json(os.path.join(args.out, "ceilings.json"))
    lines = [f"# GPU check{' (dry run, CPU)' if args.dry_run else ''}", "",
             f"total {total:.0f} s; device: {(ceil.get('environment') or {}).get('device', '?')}", "",
             "| part | status | seconds | note |", "|---|---|---|---|"]  # fmt: skip
    lines += [f"| {r['part']} | {r['status']} | {r['seconds']} | {r['note'].replace('|', '/')} |" for r in records]
    if ceil:
        lines += ["", "Ceilings: " + ", ".join(f"{k} {_f(v, '{:.4g}')}" for k, v in ceil.items()
                                               if k.endswith(("gflops", "gbps")))]  # fmt: skip
    lines += ["", "## Verdicts" + (" (dry run: tiny shapes on the CPU interpreter, not meaningful)" if args.dry_run
                                   else ""), ""]  # fmt: skip
    lines += [f"- {v}" for v in verdicts(rows) or ["(no case produced timings)"]]
    if rows:
        lines += ["", "## Rows", "", "| case | impl | backend | precision | M x N x d | dtype | status | ms | "
                  "TFLOP/s | GEMM frac | GB/s | BW frac | rel err | max abs err | knn mismatch |", "|" + "---|" * 15]
        for r in rows:
            lines.append("| " + " | ".join([r.get("case", ""), r["impl"], r["backend"], r["precision"],
                                            f"{r['M']} x {r['N']} x {r['d']}", r.get("dtype", ""),
                                            r["status"][:60].replace("|", "/"), _f(r.get("time_s"), "{:.4g}") if
                                            r.get("time_s") in (None, "") else f"{1e3 * float(r['time_s']):.3g}",
                                            _f(r.get("tflops")), _f(r.get("gemm_frac")), _f(r.get("gbps")),
                                            _f(r.get("bw_frac")), r.get("rel_err", "") or "-",
                                            r.get("max_abs_err", "") or "-", r.get("knn_mismatch", "") or "-"]) + " |")
    path = os.path.join(args.out, "summary.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    log(f"wrote {path}")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    sys.exit(main())
