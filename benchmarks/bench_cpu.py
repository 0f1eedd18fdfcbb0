"""The CPU grid: softmax_denoise and kde_log_density of the native backend against the best peer, and exact kNN.

Shapes (M x N x d): 1000x50000x2, 1000x50000x64, 256x20000x64, 256x20000x3072, 64x5000x3072; sigma in
{0.05, 1, 80}; training points uniform in [-1, 1]^d, half the queries noisy copies of training points
(x = y + sigma n), half noisy uniform points. Ours: softmax_denoise(backend="cpu") at the default precision and
at precision="fast", kde_log_density(backend="cpu"). Peers, measured in the same interleaved loop
(diffgen_fast.bench): "dense" (cdist + softmax + matmul / cdist + logsumexp), "chunked" (tuned plain torch, chunk
size calibrated per shape), "keops" (when installed). Each row of ours: the ratio best peer time / our time.

--knn-1m adds exact kNN top-2 of 10,000 queries against a 1,000,000 x 64 float32 .npy, memory-mapped (written
once to --data-dir), against a raw faiss IndexFlatL2 add + search with the same threads (tens of seconds a call).

    python benchmarks/bench_cpu.py [--tiny] [--out CSV] [--md MD] [--sigma 0.05,1,80] [--knn-1m] [--threads N]
"""

from __future__ import annotations

import os

from diffgen_fast import bench as B

SHAPES = [(1000, 50_000, 2), (1000, 50_000, 64), (256, 20_000, 64), (256, 20_000, 3072), (64, 5000, 3072)]
TINY_SHAPES = [(40, 2000, 2), (40, 2000, 64), (16, 500, 3072)]
KNN = (10_000, 1_000_000, 64)
KNN_TINY = (200, 20_000, 64)
DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".data")


def main(argv=None):
    p = B.script_parser(__doc__, sigma="0.05,1,80", backends="cpu", peers="dense,chunked,keops")
    p.add_argument("--knn-1m", action="store_true", help="also the exact kNN top-2 case (10k x 1M x 64 .npy)")
    p.add_argument("--data-dir", default=DATA, help="where the kNN .npy is written (default benchmarks/.data)")
    args = p.parse_args(argv)

    def knn_case(ceil):
        M, N, d = KNN_TINY if args.tiny else KNN
        path = B.make_npy(os.path.join(args.data_dir, f"uniform-{N}x{d}.npy"), N, d)
        return B.run_bench(ops=("knn",), shapes=[(M, N, d)], backends=("cpu",), peers=("faiss",), k=2,
                           sigma=0.05, repeat=args.repeat, warmup=args.warmup, ceilings=ceil, threads=args.threads,
                           train_npy=path, verbose=not args.quiet)  # fmt: skip

    return B.run_script(args, name="bench_cpu", ops=("denoise", "kde"), shapes=SHAPES, tiny_shapes=TINY_SHAPES,
                        backends=("cpu",), precision=("auto", "fast"),
                        extra=knn_case if args.knn_1m else None)  # fmt: skip


if __name__ == "__main__":
    main()
