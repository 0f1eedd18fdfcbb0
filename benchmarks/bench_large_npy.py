"""Stream an .npy training set larger than memory with bounded RSS.

Writes a sparse float32 ``[N, d]`` .npy of zeros (a header, then the file truncated to its full size: it takes no
real disk space) into the folder given on the command line, opens it with ``TrainingSet.open`` (a read-only memory
map), streams every row with ``iter_chunks``, optionally runs an exact kNN of a few queries against it, and prints
N, d, bytes, seconds and the peak RSS of the process (VmHWM). The file is deleted at the end.

    python benchmarks/bench_large_npy.py FOLDER [--gb 25] [--d 3072] [--knn 0]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffgen_fast import TrainingSet  # noqa: E402


def peak_rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def write_sparse_npy(path: Path, n: int, d: int) -> int:
    header = {"descr": "<f4", "fortran_order": False, "shape": (n, d)}
    with open(path, "wb") as f:
        np.lib.format.write_array_header_2_0(f, header)
        offset = f.tell()
        f.truncate(offset + n * d * 4)
    return offset + n * d * 4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", help="folder to write the sparse file into (it is deleted at the end)")
    ap.add_argument("--gb", type=float, default=25.0, help="size of the file in GB (1e9 bytes)")
    ap.add_argument("--d", type=int, default=3072, help="values per point")
    ap.add_argument("--knn", type=int, default=0, help="also run an exact kNN of this many queries (k = 2)")
    args = ap.parse_args()
    n = int(args.gb * 1e9) // (4 * args.d)
    path = Path(args.folder) / f"large-{n}x{args.d}.npy"
    size = write_sparse_npy(path, n, args.d)
    out: dict = {"N": n, "d": args.d, "bytes": size, "mem_total_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf(
        "SC_PHYS_PAGES")}  # fmt: skip
    try:
        rss0 = peak_rss_bytes()
        t0 = time.perf_counter()
        ts = TrainingSet.open(path)
        out["open_seconds"] = round(time.perf_counter() - t0, 3)
        out["in_memory"] = ts.is_in_memory
        t0 = time.perf_counter()
        rows, total = 0, 0.0
        for _, chunk in ts.iter_chunks():
            rows += chunk.shape[0]
            total += float(chunk[:, :8].sum())
        assert rows == n and total == 0.0
        out["stream_seconds"] = round(time.perf_counter() - t0, 2)
        out["stream_GBps"] = round(size / 1e9 / out["stream_seconds"], 2)
        if args.knn:
            from diffgen_fast.ops import knn

            q = np.random.default_rng(0).standard_normal((args.knn, args.d)).astype(np.float32)
            t0 = time.perf_counter()
            d2, idx = knn(q, ts, 2)
            out["knn_seconds"] = round(time.perf_counter() - t0, 2)
            out["knn_first"] = [float(np.asarray(d2)[0, 0]), int(np.asarray(idx)[0, 0])]
        out["peak_rss_before_bytes"] = rss0
        out["peak_rss_bytes"] = peak_rss_bytes()
        out["peak_rss_GiB"] = round(out["peak_rss_bytes"] / 2**30, 3)
    finally:
        path.unlink()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
