"""Benchmark memorization-scale nearest-neighbour search on the machine at hand (the memorization issue's cases).

Cases (--tiny: a few seconds each):
  mmap64   10,000 samples against a 1,000,000 x 64 training set memory-mapped from an .npy file (generated once in
           benchmarks/.data/, a Gaussian mixture; 10% of the samples are copies of training points)
  d3072    10,000 samples against 50,000 x 3072 (CIFAR-10 sized), in memory
Implementations: exact top-2 with knn(backend="cpu") (native), knn(backend="faiss") (IndexFlatL2 per chunk,
certified float64 re-rank), the dense torch.cdist + topk baseline of the papers' scripts where its [M, N] matrix
fits in memory (else a row saying how much it needs), the full `score` run (ratio test + authenticity pass), and
the approximate faiss indexes ivf / ivfpq / hnsw (build time, search time, recall@2 against the exact answer on
every query). Exact runs execute in a fresh subprocess that reports its peak RSS above the inputs (the pages of the
memory map it touched count in the RSS; the file's size is recorded beside it). Rows go to
benchmarks/results/memorization-<device>.csv with device, versions, date and git SHA.

    python benchmarks/bench_memorization.py [--tiny] [--cases mmap64,d3072] [--indexes ivf,ivfpq,hnsw]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment, write_rows  # noqa: E402

CASES = {"mmap64": (10_000, 1_000_000, 64, True), "d3072": (10_000, 50_000, 3072, False)}
TINY = {"mmap64": (500, 20_000, 64, True), "d3072": (200, 2_000, 3072, False)}
DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".data")

_CHILD = r"""
import json, sys, time, numpy as np, torch
from diffgen_fast import TrainingSet, knn
from diffgen_fast.metrics.scoring import score

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])

impl, train_path, q_path = sys.argv[1], sys.argv[2], sys.argv[3]
ts = TrainingSet.from_npy(train_path)
q = torch.from_numpy(np.load(q_path))
knn(q[:2], TrainingSet(torch.from_numpy(np.load(q_path)[:4])), 2, backend="cpu" if impl != "faiss" else "faiss")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = status("VmRSS")
t0 = time.perf_counter()
if impl == "score":
    r = score(q, ts)
    idx = r.per_sample["nn_index"]
elif impl == "cdist":
    y = ts.flat()
    d = torch.cdist(q, y).square()
    v, i = torch.topk(d, 2, dim=1, largest=False)
    idx = i.numpy()
else:
    d2, i2 = knn(q, ts, 2, backend=impl)
    idx = i2.numpy()
t = time.perf_counter() - t0
np.save(sys.argv[4], idx)
print(json.dumps({"time_s": t, "peak_extra_mb": (status("VmHWM") - base) / 1024}))
"""


def make_data(case, M, N, d, seed=0):
    """(train .npy path, queries .npy path): a Gaussian mixture, queries = 10% copies + 90% fresh draws."""
    os.makedirs(DATA, exist_ok=True)
    tp = os.path.join(DATA, f"{case}-{N}x{d}.npy")
    qp = os.path.join(DATA, f"{case}-{N}x{d}-q{M}.npy")
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(256, d)).astype(np.float32) * 2
    if not os.path.exists(tp):
        from numpy.lib.format import open_memmap

        mm = open_memmap(tp + ".tmp.npy", mode="w+", dtype=np.float32, shape=(N, d))
        for s in range(0, N, 100_000):
            n = min(N, s + 100_000) - s
            mm[s : s + n] = centers[rng.integers(0, 256, n)] + rng.normal(size=(n, d)).astype(np.float32)
        mm.flush()
        del mm
        os.replace(tp + ".tmp.npy", tp)
    if not os.path.exists(qp):
        y = np.load(tp, mmap_mode="r")
        n_copy = M // 10
        copies = y[np.sort(rng.choice(N, n_copy, replace=False))]
        fresh = centers[rng.integers(0, 256, M - n_copy)] + rng.normal(size=(M - n_copy, d)).astype(np.float32)
        np.save(qp, np.concatenate([copies, fresh]).astype(np.float32))
    return tp, qp


def run_child(impl, tp, qp, out):
    res = subprocess.run([sys.executable, "-c", _CHILD, impl, tp, qp, out], capture_output=True, text=True)
    if res.returncode != 0:
        return {"status": "error: " + (res.stderr.strip().splitlines() or ["?"])[-1][:100]}
    return {"status": "ok", **json.loads(res.stdout.strip().splitlines()[-1])}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--cases", default="mmap64,d3072")
    p.add_argument("--indexes", default="ivf,ivfpq,hnsw")
    p.add_argument("--approx-only", action="store_true", help="only the approximate indexes (exact runs skipped)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    env = environment(torch.device("cpu"))
    table = TINY if args.tiny else CASES
    rows = []
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    for case in args.cases.split(","):
        M, N, d, mmap = table[case]
        tp, qp = make_data(case + ("-tiny" if args.tiny else ""), M, N, d)
        file_mb = os.path.getsize(tp) / 2**20
        common = dict(case=case, M=M, N=N, d=d, k=2, memmap=mmap, train_file_mb=f"{file_mb:.0f}")
        exact_idx = None
        tflop = 2 * M * N * d / 1e12
        for impl in () if args.approx_only else ("cpu", "faiss", "score", "cdist"):
            need_gb = M * N * 4 * 2 / 2**30 + N * d * 4 / 2**30
            if impl == "cdist" and need_gb > 0.6 * mem_gb:
                rows.append(
                    {**common, "impl": "cdist+topk (papers)", "status": f"skipped: needs {need_gb:.0f} GB", **env}
                )
                print(f"{case:7s} cdist+topk: skipped, its [M, N] matrices need {need_gb:.0f} GB", flush=True)
                continue
            out = os.path.join(DATA, f"idx-{impl}.npy")
            r = run_child(impl, tp, qp, out)
            name = {
                "cpu": "knn cpu (native)",
                "faiss": "knn faiss flat",
                "score": "score (ratio+authenticity)",
                "cdist": "cdist+topk (papers)",
            }[impl]
            row = {**common, "impl": name, **r, **env}
            if r["status"] == "ok":
                idx = np.load(out)
                if impl == "cpu":
                    exact_idx = idx
                row["matches_exact"] = "" if exact_idx is None else int((idx[:, :2] == exact_idx).all(1).sum())
                row["gflops"] = f"{tflop * 1e3 / r['time_s']:.1f}"
                row["time_s"] = f"{r['time_s']:.3f}"
                row["peak_extra_mb"] = f"{r['peak_extra_mb']:.0f}"
            rows.append(row)
            print(
                f"{case:7s} {name:28s} {row['status']:4s} {row.get('time_s', ''):>9s} s  "
                f"{row.get('gflops', ''):>7s} GFLOP/s  peak +{row.get('peak_extra_mb', '')} MB  "
                f"rows equal to exact: {row.get('matches_exact', '')}/{M}",
                flush=True,
            )
        if exact_idx is None and not args.approx_only:
            continue
        from diffgen_fast import TrainingSet, knn
        from diffgen_fast.ops.knn.faiss import FaissIndex

        ts = TrainingSet.from_npy(tp)
        q = torch.from_numpy(np.load(qp))
        exact_d, _ = knn(q, ts, 2, backend="cpu")
        for kind in [s for s in args.indexes.split(",") if s]:
            t0 = time.perf_counter()
            try:
                index = FaissIndex.build(ts, kind)
            except Exception as e:
                rows.append({**common, "impl": f"faiss {kind}", "status": f"error: {e}"[:100], **env})
                continue
            t_build = time.perf_counter() - t0
            t0 = time.perf_counter()
            d2, i2, info = index.search(q, 2, ts, recall_sample=0)
            t_search = time.perf_counter() - t0
            from diffgen_fast.ops.knn.faiss import tie_aware_recall

            recall = tie_aware_recall(d2, exact_d.double())
            rows.append(
                {
                    **common,
                    "impl": f"faiss {kind}",
                    "status": "ok",
                    "factory": info["factory"],
                    "build_s": f"{t_build:.2f}",
                    "time_s": f"{t_search:.3f}",
                    "recall_at_2": f"{recall:.4f}",
                    "params": json.dumps({k: info[k] for k in ("nprobe", "efSearch", "k_candidates") if k in info}),
                    **env,
                }
            )
            print(
                f"{case:7s} faiss {kind:22s} build {t_build:7.2f} s  search {t_search:7.3f} s  recall@2 {recall:.4f}"
                f"  ({info['factory']})",
                flush=True,
            )
    tag = "tiny-" if args.tiny else ""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", f"{tag}{env['device']}").strip("-").lower()[:60]
    path = os.path.join(args.out, f"memorization-{slug}.csv")
    keys = list(dict.fromkeys(k for r in rows for k in r))
    write_rows(path, [{k: r.get(k, "") for k in keys} for r in rows])
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
