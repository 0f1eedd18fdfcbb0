"""Sharded softmax_denoise / knn / memorization over TrainingSet.builtin("digits").

Run with:  torchrun --nproc_per_node=2 examples/distributed_demo.py
(also runs as a plain single process: python examples/distributed_demo.py)

Every rank holds ~1/world of the 1797 digits; the queries are the same on every rank (same seed). Rank 0 prints the
results and their largest difference against the single-process functions on the full set.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

import diffgen_fast as dg
from diffgen_fast import distributed as dgd


def main() -> None:
    rank, world = dgd.init_from_env()
    full = dg.TrainingSet.builtin("digits")
    sharded = dgd.ShardedTrainingSet(full)  # each rank keeps rows [start, stop) only
    print(f"[rank {rank}/{world}] {sharded}", flush=True)

    gen = torch.Generator().manual_seed(0)  # the same queries on every rank
    clean = full.tensor()[torch.arange(0, 1797, 300)]
    sigma = torch.tensor([0.05, 0.1, 0.2, 0.5, 1.0, 2.0], dtype=torch.float32)
    x = clean + sigma[:, None, None, None] * torch.randn(clean.shape, generator=gen)

    den, lse = dgd.softmax_denoise(x, sharded, sigma, return_lse=True)
    d2, idx = dgd.knn(x, sharded, 3)
    samples = torch.cat([clean[:3], x[3:]])  # three exact copies of training points, three noisy queries
    mem = dgd.memorization(samples, sharded)

    if rank == 0:
        den0, lse0 = dg.softmax_denoise(x, full, sigma, return_lse=True)
        d20, idx0 = dg.knn(x, full, 3)
        mem0 = dg.memorization(samples, full)
        print("lse:", [round(v, 4) for v in lse.tolist()])
        print("knn index:", idx.tolist())
        print(f"memorized fraction: {mem.fraction:.4f} (single process {mem0.fraction:.4f})")
        print(f"max |denoised diff| = {(den - den0).abs().max().item():.3g}")
        print(f"max relative lse diff = {((lse - lse0).abs() / lse0.abs()).max().item():.3g}")
        print(f"max |knn sqdist diff| = {(d2 - d20).abs().max().item():.3g}")
        print(f"knn indices equal: {torch.equal(idx, idx0)}")
        print(f"memorization equal: {torch.equal(mem.memorized, mem0.memorized) and mem.fraction == mem0.fraction}")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
