"""softmax_denoise (torch backend) against the float64 brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffgen_fast import TrainingSet, softmax_denoise
from diffgen_fast.ops.softmax_denoise import reference
from diffgen_fast.ops.softmax_denoise.naive import softmax_denoise_naive
from diffgen_fast.ops.softmax_denoise.reference import softmax_denoise_torch
from tests.helpers import make_problem

SIGMAS = [0.002, 0.01, 0.1, 1.0, 10.0, 80.0]


def _tol(dtype):
    return dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("N,d", [(1, 3), (97, 1), (97, 59), (1025, 3), (1025, 59), (97, 3072)])
@pytest.mark.parametrize("sigma", SIGMAS)
def test_matches_bruteforce(dtype, N, d, sigma):
    x, y = make_problem(7, N, d, dtype=dtype, seed=N * 31 + d, sigma=sigma)
    out, lse = softmax_denoise(x, y, sigma, return_lse=True, backend="torch", precision="exact")
    ref, ref_lse = softmax_denoise_naive(x, y, sigma)
    assert out.dtype == dtype and out.shape == x.shape
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(out.double(), ref, **_tol(dtype))
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-6 if dtype == torch.float32 else 1e-11, atol=1e-5)


@pytest.mark.parametrize("precision", ["auto", "exact"])
def test_per_query_sigma_and_alpha(precision):
    M, N, d = 33, 257, 64
    x, y = make_problem(M, N, d, seed=3)
    g = torch.Generator().manual_seed(5)
    sigma = torch.logspace(np.log10(0.002), np.log10(80.0), M, dtype=torch.float64)[torch.randperm(M, generator=g)]
    alpha = 0.3 + 0.7 * torch.rand(M, generator=g, dtype=torch.float64)
    out, lse = softmax_denoise(x, y, sigma, alpha, return_lse=True, backend="torch", precision=precision)
    ref, ref_lse = softmax_denoise_naive(x, y, sigma, alpha)
    torch.testing.assert_close(out.double(), ref, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-6, atol=1e-5)


def test_image_shapes_and_sigma_like_edm():
    x, y = make_problem(5, 40, 3 * 4 * 4, seed=9)
    x, y = x.reshape(5, 3, 4, 4), y.reshape(40, 3, 4, 4)
    sigma = torch.full((5, 1, 1, 1), 0.5)
    out = softmax_denoise(x, y, sigma, backend="torch")
    assert out.shape == (5, 3, 4, 4)
    ref, _ = softmax_denoise_naive(x, y, 0.5)
    torch.testing.assert_close(out.reshape(5, -1).double(), ref, rtol=1e-5, atol=1e-5)
    # [M, d] queries against [N, *shape] training items
    out2 = softmax_denoise(x.reshape(5, -1), y, 0.5, backend="torch")
    assert out2.shape == (5, 48)


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


def test_sigma_to_zero_gives_nearest_training_point():
    x, y = make_problem(16, 200, 48, seed=2, near=0.0)
    out = softmax_denoise(x, y, 1e-6, backend="torch")
    nn = ((x.double()[:, None] - y.double()[None]) ** 2).sum(-1).argmin(1)
    assert torch.equal(out, y[nn])


def test_sigma_to_zero_with_alpha():
    x, y = make_problem(8, 50, 10, dtype=torch.float64, seed=4, near=0.0)
    alpha = 0.5
    out = softmax_denoise(x, y, 1e-7, alpha, backend="torch")
    nn = ((x[:, None] - alpha * y[None]) ** 2).sum(-1).argmin(1)
    assert torch.equal(out, y[nn])


def test_sigma_to_infinity_gives_mean():
    x, y = make_problem(6, 333, 20, dtype=torch.float64, seed=8)
    out = softmax_denoise(x, y, 1e7, backend="torch")
    torch.testing.assert_close(out, y.mean(0).expand_as(out), rtol=1e-8, atol=1e-8)


def test_stats_top_weight_and_neff():
    x, y = make_problem(9, 120, 5, dtype=torch.float64, seed=12)
    sigma = 0.4
    res = softmax_denoise(x, y, sigma, return_stats=True, backend="torch")
    logits = -((x[:, None] - y[None]) ** 2).sum(-1) / (2 * sigma**2)
    w = torch.softmax(logits, 1)
    torch.testing.assert_close(res.top_weight, w.max(1).values, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(res.n_eff, 1 / (w**2).sum(1), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(res.lse, torch.logsumexp(logits, 1), rtol=1e-12, atol=1e-12)


def test_numpy_in_numpy_out_and_low_precision_dtypes():
    x, y = make_problem(4, 30, 6, seed=1)
    out, lse = softmax_denoise(x.numpy(), y.numpy(), 0.7, return_lse=True)
    assert isinstance(out, np.ndarray) and isinstance(lse, np.ndarray) and out.dtype == np.float32
    ref, _ = softmax_denoise_naive(x, y, 0.7)
    np.testing.assert_allclose(out, ref.numpy(), rtol=1e-5, atol=1e-5)
    for dt in (torch.float16, torch.bfloat16):
        o = softmax_denoise(x.to(dt), y.to(dt), 0.7, backend="torch")
        assert o.dtype == dt
        r, _ = softmax_denoise_naive(x.to(dt), y.to(dt), 0.7)
        torch.testing.assert_close(o.double(), r, rtol=2e-2, atol=2e-2)


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


def test_training_set_input_and_empty_queries():
    x, y = make_problem(3, 20, 4, seed=0)
    ts = TrainingSet.from_tensor(y)
    torch.testing.assert_close(softmax_denoise(x, ts, 0.3), softmax_denoise(x, y, 0.3))
    out, lse = softmax_denoise(x[:0], y, 0.3, return_lse=True)
    assert out.shape == (0, 4) and lse.shape == (0,)


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
