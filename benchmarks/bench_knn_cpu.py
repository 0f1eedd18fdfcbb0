"""Benchmark exact kNN on the CPU: the native backend against the torch reference, naive torch and faiss.

Case: M = 10,000 queries, N = 100,000 training points, d = 64, k = 10, uniform random fp32 data (--tiny: M = 200,
N = 5,000). Implementations, all with the same thread count (--threads, default torch's):
  native_cpu   knn(..., backend="cpu")  (csrc/cpu/knn.cpp)
  torch        knn(..., backend="torch") (the chunked reference; its result is the exact answer the others are
               checked against)
  naive_torch  torch.cdist(x, y).square() + topk, over blocks of 1,000 queries (the [M, N] matrix would be 4 GB)
  faiss        faiss.IndexFlatL2 search (index built outside the timing; fp32, so near-ties may come out in another
               order or with another neighbour: its mismatch count says how many)
Per row: median time and spread, time relative to faiss, index entries that differ from the exact answer, max
relative distance error, and whether the result is exact (same indices, distances within the float32
output's rounding). Rows go to benchmarks/results/knn_cpu-<device>.csv with device,
versions, date and git SHA.

    python benchmarks/bench_knn_cpu.py [--tiny] [--threads N] [--repeat R] [--out DIR]
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

from diffgen_fast import TrainingSet, _native, knn  # noqa: E402
from diffgen_fast.ops.knn.reference import knn_torch  # noqa: E402

FULL = dict(M=10_000, N=100_000, d=64, k=10)
TINY = dict(M=200, N=5_000, d=64, k=10)


def naive_torch(x, y, k, block=1000):
    ds, ids = [], []
    for r0 in range(0, x.shape[0], block):
        d2 = torch.cdist(x[r0 : r0 + block], y).square()
        v, i = torch.topk(d2, k, dim=1, largest=False, sorted=True)
        ds.append(v)
        ids.append(i)
    return torch.cat(ds), torch.cat(ids)


def faiss_impl(y, threads):
    """A search function over a faiss IndexFlatL2 of y, or the reason faiss cannot run."""
    try:
        import faiss
    except Exception as exc:  # not installed, or a broken wheel
        return f"not installed ({type(exc).__name__})"
    faiss.omp_set_num_threads(threads)
    index = faiss.IndexFlatL2(y.shape[1])
    index.add(y.numpy())

    def search(x, k):
        dist, idx = index.search(x.numpy(), k)
        return torch.from_numpy(dist), torch.from_numpy(idx)

    return search


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="small shapes, a few seconds")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="threads for every implementation")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per implementation (the reference runs once)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    shape = TINY if args.tiny else FULL
    M, N, d, k = shape["M"], shape["N"], shape["d"], shape["k"]
    torch.set_num_threads(args.threads)
    if _native.available():
        _native.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(args.seed)
    x = torch.rand(M, d, generator=g)
    y = torch.rand(N, d, generator=g)
    train = TrainingSet.coerce(y)
    train.check_finite()  # cached: not part of any timing

    env = environment(torch.device("cpu"))
    base = dict(env, case="tiny" if args.tiny else "full", M=M, N=N, d=d, k=k, threads=args.threads)

    # The exact answer: the torch reference (certified float64 re-rank), timed once.
    t0 = time.perf_counter()
    exact_d, exact_i = knn_torch(x, train, k)  # float64 distances; knn() would round them to float32
    ref_time = time.perf_counter() - t0

    impls = {}
    if _native.available():
        impls["native_cpu"] = lambda: knn(x, train, k, backend="cpu")
    else:
        impls["native_cpu"] = f"unavailable: {_native.unavailable_reason()}"
    impls["naive_torch"] = lambda: naive_torch(x, y, k)
    search = faiss_impl(y, args.threads)
    impls["faiss"] = search if isinstance(search, str) else (lambda: search(x, k))

    results = {"torch": dict(status="ok", time_s=ref_time, spread_s=0.0, out=(exact_d, exact_i))}
    for name, fn in impls.items():
        if isinstance(fn, str):
            results[name] = dict(status=fn)
            continue
        out = fn()  # warm-up, and the result checked
        median, spread = bench(fn, warmup=0, repeat=args.repeat)
        results[name] = dict(status="ok", time_s=median, spread_s=spread, out=out)

    faiss_time = results["faiss"].get("time_s")
    rows = []
    print(f"kNN M={M} N={N} d={d} k={k} threads={args.threads} on {env['device']}")
    print(f"{'impl':<12} {'time_s':>9} {'vs_faiss':>9} {'mismatch':>9} {'max_rel_err':>11}  exact")
    for name in ("native_cpu", "torch", "naive_torch", "faiss"):
        r = results[name]
        row = dict(base, impl=name, status=r["status"])
        if r["status"] == "ok":
            dist, idx = r["out"]
            dist = dist.double()
            mismatches = int((idx.long() != exact_i).sum())
            max_err = float(((dist - exact_d).abs() / exact_d.abs().clamp_min(1e-30)).max())
            row.update(
                time_s=f"{r['time_s']:.4f}",
                spread_s=f"{r['spread_s']:.4f}",
                time_vs_faiss=f"{r['time_s'] / faiss_time:.3f}" if faiss_time else "",
                mismatches=mismatches,
                max_rel_dist_err=f"{max_err:.3g}",
                exact=mismatches == 0 and max_err <= 2.0**-24,  # the float32 output's rounding
            )
            print(
                f"{name:<12} {r['time_s']:>9.4f} {row['time_vs_faiss']:>9} {mismatches:>9} {max_err:>11.3g}  "
                f"{row['exact']}"
            )
        else:
            print(f"{name:<12} {r['status']}")
        rows.append(row)

    tag = "tiny-" if args.tiny else ""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", f"{tag}{env['device']}").strip("-").lower()[:60]
    out = os.path.join(args.out, f"knn_cpu-{slug}.csv")
    write_rows(out, rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
