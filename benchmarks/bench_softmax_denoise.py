"""Benchmark softmax_denoise backends against the papers' code and chunked torch, with the device's ceilings.

Cases (full size needs a GPU; --tiny runs the same code end to end on small shapes, on the CPU through the Triton
interpreter when no GPU is present):
  A      M = 1024, N = 50,000,    d = 3072   (CIFAR-10 scale), fp32 data
  B      M = 64,   N = 1,280,000, d = 12288  (ImageNet-64 scale), bf16 storage: memory-bound
  small  M = 4096, N = 1,000,000, d = 64

Implementations measured in the same run: "naive" (the papers' code: fp32 torch.cdist over the whole training set,
softmax, matmul), "chunked fp32" / "chunked bf16" (an online-softmax loop over training chunks with matmuls in that
dtype), "torch" (our reference, precision fast and exact), "keops" (pykeops LazyTensors, if installed) and
"triton" (fast, exact). Reported per row: median time and spread, TFLOP/s counting 4 M N d, GB/s counting one read of
the training set, the fractions of the measured bf16 GEMM rate and copy bandwidth, the max errors against the float64
brute force on the first queries, and peak extra memory. Rows go to benchmarks/results/<device>.csv with device,
versions, date and git SHA; an OOM or a missing package gives a row that says so.

    python benchmarks/bench_softmax_denoise.py [--tiny] [--cases A,B,small] [--sigma 0.002,1,80] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bench, environment, write_rows  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

from diffgen_fast import TrainingSet, softmax_denoise  # noqa: E402
from diffgen_fast.ops.softmax_denoise.naive import softmax_denoise_naive  # noqa: E402

CASES = {
    "A": dict(M=1024, N=50_000, d=3072, dtype=torch.float32),
    "B": dict(M=64, N=1_280_000, d=12288, dtype=torch.bfloat16),
    "small": dict(M=4096, N=1_000_000, d=64, dtype=torch.float32),
}
TINY = {
    "A": dict(M=16, N=500, d=300, dtype=torch.float32),
    "B": dict(M=4, N=2000, d=600, dtype=torch.bfloat16),
    "small": dict(M=64, N=3000, d=64, dtype=torch.float32),
}


def naive(x, y, sigma):
    """The papers' code: the whole [M, N] distance matrix in fp32."""
    logits = -torch.cdist(x.float(), y.float()).square() / (2 * sigma**2)
    return torch.softmax(logits, dim=1) @ y.float(), torch.logsumexp(logits, dim=1)


def chunked(x, y, sigma, dtype, chunk=16384):
    """What a careful user writes: online softmax over training chunks, matmuls in `dtype`."""
    xd = x.to(dtype)
    xx = (x.float() ** 2).sum(1)
    m = torch.full((x.shape[0],), float("-inf"), device=x.device)
    l = torch.zeros(x.shape[0], device=x.device)
    o = torch.zeros(x.shape[0], x.shape[1], device=x.device)
    for s in range(0, y.shape[0], chunk):
        yc = y[s : s + chunk]
        ycd = yc.to(dtype)
        z = -(xx[:, None] - 2 * (xd @ ycd.T).float() + (yc.float() ** 2).sum(1)[None]) / (2 * sigma**2)
        mn = torch.maximum(m, z.max(1).values)
        p = torch.exp(z - mn[:, None])
        r = torch.exp(m - mn)
        l = l * r + p.sum(1)
        o = o * r[:, None] + (p.to(dtype) @ ycd).float()
        m = mn
    return o / l[:, None], m + l.log()


def keops_impl():
    try:
        from pykeops.torch import LazyTensor
    except Exception:
        return None

    def run(x, y, sigma):
        X = LazyTensor(x.float()[:, None, :])
        Y = LazyTensor(y.float()[None, :, :])
        z = -((X - Y) ** 2).sum(-1) / (2 * sigma**2)
        return z.sumsoftmaxweight(LazyTensor(y.float()[None, :, :]), axis=1), z.logsumexp(axis=1).reshape(-1)

    return run


def ceilings(device: torch.device) -> dict:
    """Measured bf16 / fp32 GEMM rate (TFLOP/s) and device copy bandwidth (GB/s)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        n = 8192
        out = {}
        for name, dt in (("bf16", torch.bfloat16), ("tf32", torch.float32)):
            a = torch.randn(n, n, device=device, dtype=dt)
            b = torch.randn(n, n, device=device, dtype=dt)
            torch.backends.cuda.matmul.allow_tf32 = name == "tf32"
            ms = do_bench(lambda a=a, b=b: a @ b, warmup=50, rep=300)
            out[f"gemm_{name}_tflops"] = 2 * n**3 / ms / 1e9
        torch.backends.cuda.matmul.allow_tf32 = False
        src = torch.empty(1 << 28, device=device, dtype=torch.float32)
        dst = torch.empty_like(src)
        ms = do_bench(lambda: dst.copy_(src), warmup=20, rep=200)
        out["copy_gbps"] = 2 * src.numel() * 4 / ms / 1e6
        return out
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    t, _ = bench(lambda: a @ b, repeat=5)
    src = torch.empty(1 << 25)
    dst = torch.empty_like(src)
    tc, _ = bench(lambda: dst.copy_(src), repeat=5)
    return {"gemm_fp32_tflops": 2 * n**3 / t / 1e12, "copy_gbps": 2 * src.numel() * 4 / tc / 1e9}


def timed(fn, device):
    if device.type == "cuda":
        from triton.testing import do_bench

        times = [do_bench(fn, warmup=3, rep=20, return_mode=m) / 1e3 for m in ("median", "min", "max")]
        return times[0], times[2] - times[1]
    return bench(fn, warmup=1, repeat=3)


def make_impls(x, y, ts, sigma, keops):
    """The implementations measured, each a no-argument call returning (denoised, lse)."""

    def ours(backend, precision):
        return lambda: softmax_denoise(x, ts, sigma, return_lse=True, backend=backend, precision=precision)

    return {
        "naive": lambda: naive(x, y, sigma),
        "chunked_fp32": lambda: chunked(x, y, sigma, torch.float32),
        "chunked_bf16": lambda: chunked(x, y, sigma, torch.bfloat16),
        "torch_fast": ours("torch", "fast"),
        "torch_exact": ours("torch", "exact"),
        "keops": (lambda: keops(x, y, sigma)) if keops else None,
        "triton_fast": ours("triton", "fast"),
        "triton_exact": ours("triton", "exact"),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="small shapes: runs anywhere (Triton via the interpreter)")
    p.add_argument("--cases", default="A,B,small")
    p.add_argument("--sigma", default="0.002,1,80")
    p.add_argument("--impls", default="naive,chunked_fp32,chunked_bf16,torch_fast,torch_exact,keops,triton_fast,"
                   "triton_exact")  # fmt: skip
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = environment(dev)
    ceil = ceilings(dev)
    print(f"{env['device']}: " + ", ".join(f"{k} {v:.3g}" for k, v in ceil.items()))
    table = TINY if args.tiny else CASES
    sigmas = [float(s) for s in args.sigma.split(",")]
    keops = keops_impl()
    gemm_ceiling = max(ceil.get("gemm_bf16_tflops", ceil.get("gemm_fp32_tflops", 0.0)), 1e-9)
    rows = []
    for case in args.cases.split(","):
        cfg = table[case]
        M, N, d, dt = cfg["M"], cfg["N"], cfg["d"], cfg["dtype"]
        g = torch.Generator(device="cpu").manual_seed(0)
        try:
            y = (torch.rand(N, d, generator=g, dtype=torch.float32) * 2 - 1).to(dt).to(dev)
        except torch.OutOfMemoryError:
            print(f"case {case}: training set does not fit")
            continue
        ts = TrainingSet.from_tensor(y)
        for sigma in sigmas:
            j = torch.randint(0, N, (M,), generator=g).to(dev)
            x = (y[j].float() + sigma * torch.randn(M, d, generator=g).to(dev)).to(dt)
            n_ref = min(M, 4)
            ref, ref_lse = softmax_denoise_naive(x[:n_ref].cpu(), y.cpu(), sigma)
            impls = make_impls(x, y, ts, sigma, keops)
            naive_t = None
            for name in args.impls.split(","):
                fn = impls.get(name)
                row = dict(case=case, impl=name, M=M, N=N, d=d, dtype=str(dt).replace("torch.", ""), sigma=sigma)
                if fn is None:
                    rows.append({**row, "status": "not installed", **env})
                    continue
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                base_mem = torch.cuda.memory_allocated() if dev.type == "cuda" else 0
                try:
                    t0 = time.perf_counter()
                    out, lse = fn()
                    first = time.perf_counter() - t0
                    t, spread = timed(fn, dev) if first < 60 else (first, 0.0)
                except (torch.OutOfMemoryError, RuntimeError) as e:
                    msg = "OOM" if "out of memory" in str(e).lower() or isinstance(e, torch.OutOfMemoryError) else (
                        f"error: {str(e).splitlines()[0][:80]}")  # fmt: skip
                    rows.append({**row, "status": msg, **env})
                    print(f"{case} {name} sigma={sigma}: {msg}")
                    continue
                peak = (torch.cuda.max_memory_allocated() - base_mem) / 2**30 if dev.type == "cuda" else float("nan")
                err = float((out[:n_ref].double().cpu() - ref).abs().max())
                lse_err = float(((lse[:n_ref].double().cpu() - ref_lse) / ref_lse.abs().clamp(min=1)).abs().max())
                flops = 4.0 * M * N * d
                nbytes = N * d * y.element_size()
                naive_t = t if name == "naive" else naive_t
                rows.append({
                    **row, "status": "ok", "time_s": f"{t:.4g}", "spread_s": f"{spread:.2g}",
                    "tflops": f"{flops / t / 1e12:.3g}", "gbps": f"{nbytes / t / 1e9:.3g}",
                    "frac_gemm": f"{flops / t / 1e12 / gemm_ceiling:.3f}",
                    "frac_copy": f"{nbytes / t / 1e9 / ceil['copy_gbps']:.3f}",
                    "vs_naive": f"{naive_t / t:.2f}" if naive_t else "",
                    "max_abs_err": f"{err:.2e}", "lse_rel_err": f"{lse_err:.2e}", "peak_extra_gib": f"{peak:.2f}",
                    **{k: f"{v:.4g}" for k, v in ceil.items()}, **env,
                })  # fmt: skip
                r = rows[-1]
                print(f"{case:5s} {name:13s} sigma={sigma:<6g} {r['time_s']:>9s} s  {r['tflops']:>7s} TFLOP/s  "
                      f"{r['frac_gemm']} of GEMM  {r['frac_copy']} of copy  "
                      f"err {r['max_abs_err']} lse {r['lse_rel_err']}")  # fmt: skip
        del y, ts
    tag = "tiny-" if args.tiny else ""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", f"{dev.type}-{tag}{env['device']}").strip("-").lower()[:60]
    out = os.path.join(args.out, f"softmax_denoise-{slug}.csv")
    keys = list(dict.fromkeys(k for r in rows for k in r))  # first-seen order: case, impl, shape, ... provenance
    write_rows(out, [{k: r.get(k, "") for k in keys} for r in rows])
    print(f"wrote {out}")
    return rows


if __name__ == "__main__":
    main()
