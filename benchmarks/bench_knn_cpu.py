"""Exact kNN on the CPU: our backends (native cpu, torch reference, faiss with a float64 re-rank) against the peers.

Case: M = 10,000 queries, N = 100,000 training points, d = 64, k = 10 (--tiny: 200 x 5,000). Peers in the same
interleaved loop (diffgen_fast.bench): "faiss" (raw IndexFlatL2, add + search timed, same threads) and "dense"
(torch.cdist + topk, in query blocks when the [M, N] matrix exceeds the memory budget). Each row of ours: the ratio
best peer time / our time, index mismatches and distance error against float64.

    python benchmarks/bench_knn_cpu.py [--tiny] [--threads N] [--repeat R] [--out CSV]
"""

from __future__ import annotations

from diffgen_fast import bench as B


def main(argv=None):
    p = B.script_parser(__doc__, sigma="0.1", peers="dense,faiss")
    p.add_argument("--k", type=int, default=10)
    args = p.parse_args(argv)
    return B.run_script(args, name="bench_knn_cpu", ops=("knn",), shapes=[(10_000, 100_000, 64)],
                        tiny_shapes=[(200, 5000, 64)], backends=None, k=args.k)  # fmt: skip


if __name__ == "__main__":
    main()
