"""Memorization-scale exact nearest-neighbour search (top-2, the ratio test's input) against the peers.

Cases (--tiny: a few seconds each):
  mmap64   10,000 queries against a 1,000,000 x 64 float32 training set memory-mapped from an .npy file (written
           once to --data-dir, uniform in [-1, 1]); ours get TrainingSet.from_npy, the peers the memory map
  d3072    10,000 queries against 50,000 x 3072 (CIFAR-10 sized), in memory
Ours: knn(backend="cpu") and knn(backend="faiss"); peers in the same interleaved loop (diffgen_fast.bench): "faiss"
(raw IndexFlatL2 add + search, same threads) and "dense" (cdist + topk in query blocks under the memory budget).

    python benchmarks/bench_memorization.py [--tiny] [--cases mmap64,d3072] [--out CSV]
"""

from __future__ import annotations

import os

from diffgen_fast import bench as B

CASES = {"mmap64": (10_000, 1_000_000, 64), "d3072": (10_000, 50_000, 3072)}
TINY = {"mmap64": (500, 20_000, 64), "d3072": (200, 2_000, 3072)}
DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".data")


def main(argv=None):
    p = B.script_parser(__doc__, sigma="0.05", backends="cpu,faiss", peers="faiss,dense")
    p.add_argument("--cases", default="mmap64,d3072")
    p.add_argument("--data-dir", default=DATA, help="where the mmap64 .npy is written (default benchmarks/.data)")
    args = p.parse_args(argv)
    table = TINY if args.tiny else CASES
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    peers = () if args.no_peers else tuple(B._csv_list(args.peers))

    def mmap_case(ceil):
        M, N, d = table["mmap64"]
        path = B.make_npy(os.path.join(args.data_dir, f"uniform-{N}x{d}.npy"), N, d)
        return B.run_bench(ops=("knn",), shapes=[(M, N, d)], backends=tuple(B._csv_list(args.backends)), peers=peers,
                           k=2, sigma=float(args.sigma.split(",")[0]), repeat=args.repeat, warmup=args.warmup,
                           ceilings=ceil, threads=args.threads, train_npy=path, verbose=not args.quiet)  # fmt: skip

    mem = [table[c] for c in cases if c != "mmap64"]
    return B.run_script(args, name="bench_memorization", ops=("knn",), shapes=mem, tiny_shapes=mem,
                        backends=("cpu", "faiss"), k=2, extra=mmap_case if "mmap64" in cases else None)  # fmt: skip


if __name__ == "__main__":
    main()
