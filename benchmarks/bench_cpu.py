"""Benchmark the native CPU backend of softmax_denoise against torch (chunked, naive, our reference) and KeOps.

Cases of the native-kernels issue, on the machine at hand with the same thread count for every implementation:
  d2     M = 1000, N = 50,000, d = 2
  d64    M = 1000, N = 50,000, d = 64
  d3072  M = 256,  N = 20,000, d = 3072
at sigma 0.05, 1 and 80 (x = y_j + sigma n: noisy copies of training points), and the memory case
  mem    M = 10,000, N = 1,000,000, d = 2: peak RSS above the inputs, measured in a fresh subprocess.

Implementations: "cpu fast" / "cpu exact" (ours, native), "torch ref" (our torch backend, precision auto),
"chunked" (a careful user's online-softmax loop, fp32 matmuls, 16k-point chunks: the baseline of the targets),
"naive" (the papers' fp32 cdist + softmax + matmul), "keops" (pykeops LazyTensor on the CPU, if installed).
Each row: median time, the speed-up over "chunked" and over "keops", and the max errors against the float64 brute
force on the first queries. Rows go to benchmarks/results/cpu_denoise-<device>.csv with device, versions, date, SHA.

    python benchmarks/bench_cpu.py [--tiny] [--cases d2,d64,d3072,mem] [--sigma 0.05,1,80] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_softmax_denoise import chunked, keops_impl, naive  # noqa: E402
from common import bench, environment, write_rows  # noqa: E402

from diffgen_fast import TrainingSet, _native, softmax_denoise  # noqa: E402
from diffgen_fast.ops.softmax_denoise.naive import softmax_denoise_naive  # noqa: E402

CASES = {"d2": (1000, 50_000, 2), "d64": (1000, 50_000, 64), "d3072": (256, 20_000, 3072)}
TINY = {"d2": (50, 2000, 2), "d64": (50, 2000, 64), "d3072": (16, 500, 3072)}
MEM = (10_000, 1_000_000, 2)
MEM_TINY = (1000, 100_000, 2)

_MEM_CHILD = """
import torch
from diffgen_fast import TrainingSet, softmax_denoise
M, N, d = {M}, {N}, {d}
g = torch.Generator().manual_seed(0)
y = torch.rand(N, d, generator=g) * 2 - 1
x = y[:M] + 0.1 * torch.randn(M, d, generator=g)
ts = TrainingSet.from_tensor(y)
softmax_denoise(x[:2], ts, 0.1, backend="cpu")  # load the kernels before the baseline


def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])


with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current RSS
base = status("VmRSS")
out = softmax_denoise(x, ts, 0.1, backend="cpu", precision="{precision}")
print(base, status("VmHWM"))
"""


def memory_case(M, N, d, precision):
    """(peak RSS above the inputs in MB, inputs' size in MB) of one native call, in a fresh process (Linux: the
    peak is reset through /proc/self/clear_refs after the inputs exist, so it counts the call alone)."""
    code = _MEM_CHILD.format(M=M, N=N, d=d, precision=precision)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    base, peak = (int(v) for v in res.stdout.split()[-2:])
    return (peak - base) / 1024.0, (M + N) * d * 4 / 2**20


def make_impls(x, y, ts, sigma, keops):
    """The implementations measured, each a no-argument call returning (denoised, lse)."""

    def ours(backend, precision):
        return lambda: softmax_denoise(x, ts, sigma, return_lse=True, backend=backend, precision=precision)

    return {
        "cpu fast": ours("cpu", "fast"),
        "cpu exact": ours("cpu", "exact"),
        "torch ref": ours("torch", "auto"),
        "chunked": lambda: chunked(x, y, sigma, torch.float32),
        "naive": lambda: naive(x, y, sigma),
        "keops": (lambda: keops(x, y, sigma)) if keops else None,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="small shapes (seconds)")
    p.add_argument("--cases", default="d2,d64,d3072,mem")
    p.add_argument("--sigma", default="0.05,1,80")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--no-keops", action="store_true")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    _native.set_num_threads(args.threads)
    env = {**environment(torch.device("cpu")), "simd": _native.simd_level(), "threads": args.threads}
    keops = None if args.no_keops else keops_impl()
    table = TINY if args.tiny else CASES
    rows = []
    for case in args.cases.split(","):
        if case == "mem":
            M, N, d = MEM_TINY if args.tiny else MEM
            for precision in ("fast", "exact"):
                extra, inputs = memory_case(M, N, d, precision)
                rows.append(dict(case=case, impl=f"cpu {precision}", M=M, N=N, d=d, status="ok",
                                 peak_extra_mb=f"{extra:.1f}", inputs_mb=f"{inputs:.1f}", **env))  # fmt: skip
                print(f"mem   cpu {precision:5s} M={M} N={N} d={d}: peak {extra:.1f} MB above {inputs:.1f} MB inputs")
            continue
        M, N, d = table[case]
        g = torch.Generator().manual_seed(0)
        y = torch.rand(N, d, generator=g) * 2 - 1
        ts = TrainingSet.from_tensor(y)
        for sigma in [float(s) for s in args.sigma.split(",")]:
            j = torch.randint(0, N, (M,), generator=g)
            x = y[j] + sigma * torch.randn(M, d, generator=g)
            n_ref = min(M, 8)
            ref, ref_lse = softmax_denoise_naive(x[:n_ref].double(), y.double(), sigma)
            impls = make_impls(x, y, ts, sigma, keops)
            times = {}
            for name, fn in impls.items():
                row = dict(case=case, impl=name, M=M, N=N, d=d, sigma=sigma)
                if fn is None:
                    rows.append({**row, "status": "not installed", **env})
                    continue
                try:
                    out, lse = fn()
                    t, spread = bench(fn, warmup=0, repeat=3)
                except Exception as e:  # an implementation that cannot run this case gets a row saying why
                    rows.append({**row, "status": f"error: {str(e).splitlines()[0][:80]}", **env})
                    print(f"{case} {name} sigma={sigma}: {rows[-1]['status']}")
                    continue
                times[name] = t
                err = float((out[:n_ref].double() - ref).abs().max())
                lse_err = float(((lse.reshape(-1)[:n_ref].double() - ref_lse) / ref_lse.abs().clamp(min=1)).abs().max())
                rows.append({**row, "status": "ok", "time_s": f"{t:.4g}", "spread_s": f"{spread:.2g}",
                             "max_abs_err": f"{err:.2e}", "lse_rel_err": f"{lse_err:.2e}", **env})  # fmt: skip
            for r in rows:
                if r.get("case") == case and r.get("sigma") == sigma and r["status"] == "ok":
                    t = float(r["time_s"])
                    r["vs_chunked"] = f"{times['chunked'] / t:.2f}" if "chunked" in times else ""
                    r["vs_keops"] = f"{times['keops'] / t:.2f}" if "keops" in times else ""
                    print(f"{case:6s} {r['impl']:9s} sigma={sigma:<5g} {r['time_s']:>9s} s  "
                          f"x{r['vs_chunked']:>6s} vs chunked  x{r['vs_keops'] or '-':>6s} vs keops  "
                          f"err {r['max_abs_err']} lse {r['lse_rel_err']}", flush=True)  # fmt: skip
    tag = "tiny-" if args.tiny else ""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", f"{tag}{env['device']}").strip("-").lower()[:60]
    path = os.path.join(args.out, f"cpu_denoise-{slug}.csv")
    keys = list(dict.fromkeys(k for r in rows for k in r))
    write_rows(path, [{k: r.get(k, "") for k in keys} for r in rows])
    print(f"wrote {path}")
    print(json.dumps({"device": env["device"], "simd": env["simd"], "threads": args.threads}))
    return rows


if __name__ == "__main__":
    main()
