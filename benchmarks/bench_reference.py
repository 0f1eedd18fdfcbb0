"""Benchmark the reference (torch) backend against the papers' naive code, on the machine at hand.

Cases: the softmax-weighted denoiser at sigma in {0.002, 1, 80} and exact kNN (k = 2). Baselines measured in the same
run: "naive" = the papers' approach (fp32 torch.cdist over the whole training set, softmax, matmul; cdist + topk for
kNN). Reports median time and spread, the error against the float64 brute force on the first 8 queries (denoised: max
absolute; lse: max relative; knn squared distances: max relative), and the
[M, N] bytes the naive code materialises. Results are appended to benchmarks/results/<device>.csv with device,
versions, date and git SHA.

    python benchmarks/bench_reference.py [--quick] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import os
import re
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bench, environment, write_rows  # noqa: E402

from diffgen_fast import knn, softmax_denoise  # noqa: E402
from diffgen_fast.ops.softmax_denoise.naive import softmax_denoise_naive  # noqa: E402


def naive_denoise(x, y, sigma):
    """The papers' code: the whole [M, N] fp32 distance matrix from torch.cdist, softmax, matmul."""
    logits = -torch.cdist(x, y).square() / (2 * sigma**2)
    return torch.softmax(logits, dim=1) @ y, torch.logsumexp(logits, dim=1)


def naive_knn(x, y, k):
    return torch.topk(torch.cdist(x, y).square(), k, dim=1, largest=False)


def make(M, N, d, noise, seed=0):
    """Forward samples x = y_j + noise * n of a training set uniform in [-1, 1]^d (what a sampler feeds D*)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.rand(N, d, generator=g) * 2 - 1
    j = torch.randint(0, N, (M,), generator=g)
    x = y[j] + noise * torch.randn(M, d, generator=g)
    return x, y


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small shapes (a few seconds)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args(argv)
    dev = torch.device("cpu")
    env = environment(dev)
    shapes = [(64, 2000, 64), (16, 1000, 3072)] if args.quick else [(256, 20000, 64), (64, 10000, 3072)]
    rows = []

    def record(op, impl, M, N, d, sigma, k, t, spread, base, err, lse_err):
        rows.append(
            dict(
                op=op,
                impl=impl,
                M=M,
                N=N,
                d=d,
                sigma=sigma,
                k=k,
                time_s=f"{t:.4g}",
                spread_s=f"{spread:.2g}",
                speedup_vs_naive=f"{base / t:.2f}",
                max_abs_err=f"{err:.2e}",
                lse_max_rel_err=lse_err,
                naive_MN_bytes=M * N * 4,
                **env,
            )
        )

    for M, N, d in shapes:
        for sigma in (0.002, 1.0, 80.0):
            x, y = make(M, N, d, noise=sigma)
            ref, ref_lse = softmax_denoise_naive(x[:8], y, sigma)
            impls = {
                "naive fp32 cdist (papers)": lambda x=x, y=y, s=sigma: naive_denoise(x, y, s),
                "torch exact": lambda x=x, y=y, s=sigma: softmax_denoise(
                    x, y, s, return_lse=True, backend="torch", precision="exact"
                ),
                "torch fast": lambda x=x, y=y, s=sigma: softmax_denoise(
                    x, y, s, return_lse=True, backend="torch", precision="fast"
                ),
            }
            base = None
            for name, fn in impls.items():
                t, spread = bench(fn, repeat=3)
                out, lse = fn()
                err = float((out[:8].double() - ref).abs().max())
                lse_err = float(((lse[:8].double() - ref_lse) / ref_lse.abs().clamp(min=1)).abs().max())
                base = base or t
                record("softmax_denoise", name, M, N, d, sigma, "", t, spread, base, err, f"{lse_err:.2e}")
        x, y = make(M, N, d, noise=0.1)
        ref_d2 = torch.stack([((x[r].double() - y.double()) ** 2).sum(1) for r in range(8)]).sort(1).values[:, :2]
        base = None
        for name, fn in {
            "naive fp32 cdist+topk (papers)": lambda x=x, y=y: naive_knn(x, y, 2),
            "torch exact": lambda x=x, y=y: knn(x, y, 2, backend="torch"),
        }.items():
            t, spread = bench(fn, repeat=3)
            err = float(((fn()[0][:8].double() - ref_d2) / ref_d2).abs().max())  # relative
            base = base or t
            record("knn", name, M, N, d, "", 2, t, spread, base, err, "")
    cols = ["op", "impl", "M", "N", "d", "sigma", "time_s", "speedup_vs_naive", "max_abs_err", "lse_max_rel_err"]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r[c]) for c in cols))
    slug = re.sub(r"[^A-Za-z0-9]+", "-", "cpu-" + env["device"]).strip("-").lower()[:60]
    out = os.path.join(args.out, f"{slug}.csv")
    write_rows(out, rows)
    print(f"\n{env}\nwrote {out}")


if __name__ == "__main__":
    main()
