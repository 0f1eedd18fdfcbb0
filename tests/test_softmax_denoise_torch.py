"""What is particular to the torch backend of softmax_denoise: its query blocks and chunking, the "exact" mode's
sparse-candidate and float64 paths, "exact" against norm expansion at small sigma, "fast" at large sigma, and a
memory-mapped training set streamed in chunks. The cases every backend shares are in tests/ops/."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffgen_fast import TrainingSet, softmax_denoise
from diffgen_fast.ops.softmax_denoise import reference
from diffgen_fast.ops.softmax_denoise.naive import softmax_denoise_naive
from diffgen_fast.ops.softmax_denoise.reference import softmax_denoise_torch
from tests.helpers import make_problem


@pytest.mark.slow  # six chunkings in float64, ~6 s
def test_chunking_and_query_blocks(monkeypatch):
    x, y = make_problem(29, 301, 17, dtype=torch.float64, seed=11)
    ts = TrainingSet.coerce(y)
    s = torch.full((29,), 0.3, dtype=torch.float64)
    a = torch.ones(29, dtype=torch.float64)
    whole = softmax_denoise_torch(x, ts, s, a, precision="exact")
    monkeypatch.setattr(reference, "_TILE_ELEMS", 40)  # query blocks of 40 // chunk rows
    for chunk in (1, 7, 64, 300, 301, 1000):
        part = softmax_denoise_torch(x, ts, s, a, precision="exact", chunk_size=chunk)
        torch.testing.assert_close(part.denoised, whole.denoised, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(part.lse, whole.lse, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(part.n_eff, whole.n_eff, rtol=1e-12, atol=1e-12)


def test_exact_beats_norm_expansion_at_small_sigma():
    """Large-norm data, queries within 0.002 of training points: fp32 norm expansion loses the softmax."""
    x, y = make_problem(16, 500, 3072, seed=21, scale=4.0, near=1.0, sigma=0.002)
    ref, ref_lse = softmax_denoise_naive(x, y, 0.002)
    out, lse = softmax_denoise(x, y, 0.002, return_lse=True, backend="torch", precision="exact")
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-6, atol=1e-4)


def test_fast_mode_at_large_sigma():
    x, y = make_problem(8, 300, 64, seed=6)
    for sigma in (5.0, 80.0):
        out = softmax_denoise(x, y, sigma, backend="torch", precision="fast")
        ref, _ = softmax_denoise_naive(x, y, sigma)
        torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "sigma,d,scale,expect_sparse", [(0.002, 256, 3.0, True), (0.05, 256, 3.0, True), (1.0, 16, 1.0, False)]
)
def test_exact_paths_sparse_candidates_and_float64_fallback(monkeypatch, sigma, d, scale, expect_sparse):
    """fp32 "exact" takes the fp32-candidates + float64-differences path when few points carry the mass, and the
    float64 GEMM otherwise; both must match the brute force."""
    taken = []
    from diffgen_fast.ops import refine

    real = refine.candidate_state

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(refine, "candidate_state", spy)
    x, y = make_problem(12, 400, d, seed=17, scale=scale, near=1.0, sigma=sigma)
    out, lse = softmax_denoise(x, y, sigma, return_lse=True, backend="torch", precision="exact")
    ref, ref_lse = softmax_denoise_naive(x, y, sigma)
    assert taken and all(t == expect_sparse for t in taken)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-6, atol=1e-5)
    # forcing the float64 GEMM gives the same answer
    monkeypatch.setattr(refine, "N_REFINE", 0)
    out2, lse2 = softmax_denoise(x, y, sigma, return_lse=True, backend="torch", precision="exact")
    torch.testing.assert_close(out2, out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse2, lse, rtol=1e-7, atol=1e-6)


def test_memmapped_training_set_streams_in_chunks(tmp_path, monkeypatch):
    """A .npy training set is read chunk by chunk (never loaded) and gives the in-memory answer."""
    x, y = make_problem(9, 503, 24, seed=30)
    path = tmp_path / "train.npy"
    np.save(path, y.numpy())
    ts = TrainingSet.from_npy(path)
    assert not ts.is_in_memory
    monkeypatch.setattr(reference, "default_chunk_size", lambda d: 50)  # 11 chunks
    for sigma in (0.002, 0.3, 30.0):
        a, la = softmax_denoise(x, ts, sigma, return_lse=True)
        b, lb = softmax_denoise(x, y, sigma, return_lse=True)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(la, lb, rtol=1e-7, atol=1e-6)
    assert not ts.is_in_memory
