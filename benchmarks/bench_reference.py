"""The torch reference backend (precision exact and fast) against the peers: softmax_denoise and exact kNN (k = 2).

Shapes 256x20000x64 and 64x10000x3072 (--tiny: 64x2000x64, 16x1000x3072), sigma in {0.002, 1, 80}. Peers in the
same interleaved loop (diffgen_fast.bench): "dense" (the papers' cdist code), "chunked", "keops", "faiss" (kNN).

    python benchmarks/bench_reference.py [--tiny] [--out CSV]
"""

from __future__ import annotations

from diffgen_fast import bench as B


def main(argv=None):
    p = B.script_parser(__doc__, sigma="0.002,1,80")
    p.add_argument("--quick", action="store_true", help="same as --tiny")
    args = p.parse_args(argv)
    args.tiny = args.tiny or args.quick
    return B.run_script(args, name="bench_reference", ops=("denoise", "knn"),
                        shapes=[(256, 20_000, 64), (64, 10_000, 3072)], tiny_shapes=[(64, 2000, 64), (16, 1000, 3072)],
                        backends=("torch",), k=2)  # fmt: skip


if __name__ == "__main__":
    main()
