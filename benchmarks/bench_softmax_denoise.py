"""softmax_denoise at the GPU targets' scale: every available backend of ours against the peers, float32.

Cases: A = 1024 x 50,000 x 3072 (CIFAR-10 scale), small = 4096 x 1,000,000 x 64 (--tiny: 16 x 500 x 300 and
64 x 3000 x 64); sigma in {0.002, 1, 80}. Device: CUDA when available, else the CPU (--device). Peers in the same
interleaved loop (diffgen_fast.bench): "dense", "chunked", "keops". Each row of ours: the ratio best peer time /
our time, the fraction of the measured GEMM rate, errors against float64.

    python benchmarks/bench_softmax_denoise.py [--tiny] [--cases A,small] [--sigma 0.002,1,80] [--out CSV]
"""

from __future__ import annotations

import torch

from diffgen_fast import bench as B

CASES = {"A": (1024, 50_000, 3072), "small": (4096, 1_000_000, 64)}
TINY = {"A": (16, 500, 300), "small": (64, 3000, 64)}


def main(argv=None):
    p = B.script_parser(__doc__, sigma="0.002,1,80", peers="dense,chunked,keops")
    p.add_argument("--cases", default="A,small")
    p.set_defaults(device="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    return B.run_script(args, name="bench_softmax_denoise", ops=("denoise",), shapes=[CASES[c] for c in cases],
                        tiny_shapes=[TINY[c] for c in cases], backends=None)  # fmt: skip


if __name__ == "__main__":
    main()
