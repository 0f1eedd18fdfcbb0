"""The native steps of the CPU GEMM path (d > 64): the certified refinement of each row's candidates
(_native.refine_candidates), the sparse output product (_native.sparse_pv), and the path's three ways to a row's
scores (fp32 kept, candidates refined natively, float64 GEMM, the last also predicted from a sample of the chunk)
against the float64 brute force."""

import math

import pytest
import torch

from diffgen_fast import _native
from diffgen_fast.errors import InputError, InputTypeError
from diffgen_fast.ops import kde_log_density, refine, softmax_denoise
from diffgen_fast.ops.softmax_denoise import native

pytestmark = pytest.mark.skipif(not _native.available(), reason="native extension not built")


def _scores(x, y, alpha):
    yy = y.double().square().sum(1)
    T = torch.addmm(yy.float().neg()[None, :], x * (2.0 / alpha).float()[:, None], y.T)
    return T, yy


@pytest.mark.parametrize("M,n,d", [(1, 1, 65), (7, 300, 100), (16, 2049, 129)])
def test_refine_candidates_matches_float64_differences(M, n, d):
    g = torch.Generator().manual_seed(M + n + d)
    y = torch.rand(n, d, generator=g) * 2 - 1
    x = y[torch.randint(0, n, (M,), generator=g)] + 0.3 * torch.randn(M, d, generator=g)
    alpha = 0.5 + torch.rand(M, generator=g, dtype=torch.float64)
    T, _ = _scores(x, y, alpha)
    T0 = T.clone()
    xx = x.double().square().sum(1)
    width = torch.rand(M, generator=g) * 40.0
    lo = T.max(dim=1).values - width
    lo[0] = float("inf")  # a row without candidates: untouched
    budget = 50
    shift, count = _native.refine_candidates(T, x, y, alpha, xx, lo, budget)
    x64, y64 = x.double(), y.double()
    d2 = ((x64[:, None, :] - alpha[:, None, None] * y64[None]) ** 2).sum(-1)
    t_exact = (xx[:, None] - d2) / (alpha * alpha)[:, None]
    for i in range(M):
        cand = T0[i] >= lo[i]
        assert int(count[i]) == int(cand.sum())
        if count[i] == 0 or count[i] > budget:
            assert shift[i] == 0 and torch.equal(T[i], T0[i])
            continue
        best = float(t_exact[i][cand].max())
        assert math.isclose(float(shift[i]), best, rel_tol=1e-14, abs_tol=1e-9)
        want = torch.where(cand, (t_exact[i] - best).float(), T0[i] - torch.tensor(best).float())
        assert torch.equal(T[i], want), i


def test_refine_candidates_rejects_bad_arguments():
    x, y = torch.rand(3, 70), torch.rand(5, 70)
    T = torch.zeros(3, 5)
    a, xx, lo = torch.ones(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64), torch.zeros(3)
    with pytest.raises(InputTypeError, match="T"):
        _native.refine_candidates(T.double(), x, y, a, xx, lo, 4)
    with pytest.raises(InputError, match="x"):
        _native.refine_candidates(T, x[:2], y, a, xx, lo, 4)
    with pytest.raises(InputError, match="lo"):
        _native.refine_candidates(T, x, y, a, xx, lo[:2], 4)
    with pytest.raises(InputError, match="budget"):
        _native.refine_candidates(T, x, y, a, xx, lo, 0)
    with pytest.raises(InputError, match="T must have contiguous rows"):
        _native.refine_candidates(torch.zeros(5, 3).T, x, y, a, xx, lo, 4)


@pytest.mark.parametrize("M,n,d", [(1, 1, 65), (9, 513, 100), (32, 3000, 257)])
def test_sparse_pv_matches_the_dense_product(M, n, d):
    g = torch.Generator().manual_seed(M * n + d)
    y = torch.randn(n, d, generator=g)
    W = torch.zeros(M, n)
    for i in range(M):  # a few weights per row, some tiny (below tail_w of the row max: dropped), one empty row
        if i == M - 1 and M > 1:
            continue
        j = torch.randint(0, n, (5,), generator=g)
        W[i, j] = torch.rand(5, generator=g) + 0.1
        W[i, (int(j[0]) + 1) % n] = 1e-30
    o0 = torch.randn(M, d, generator=g, dtype=torch.float64)
    o = o0.clone()
    tail_w = 1e-20
    used = _native.sparse_pv(W, y, o, tail_w, W.numel())
    keep = W >= W.amax(dim=1, keepdim=True) * tail_w
    keep &= W > 0
    assert used == int(keep.sum())
    want = o0 + torch.where(keep, W, 0).double() @ y.double()
    assert torch.allclose(o, want, rtol=1e-13, atol=1e-13)


def test_sparse_pv_declines_above_max_nnz_and_checks_arguments():
    W, y = torch.rand(4, 10), torch.rand(10, 70)
    o = torch.full((4, 70), float("nan"), dtype=torch.float64)
    assert _native.sparse_pv(W, y, o, 0.0, 39) == -1
    assert bool(o.isnan().all())  # untouched
    with pytest.raises(InputError, match="o"):
        _native.sparse_pv(W, y, o[:, :5], 0.0, 100)
    with pytest.raises(InputTypeError, match="W"):
        _native.sparse_pv(W.double(), y, o, 0.0, 100)
    with pytest.raises(ValueError, match="tail_w"):
        _native.sparse_pv(W, y, o, 1.5, 100)


def _problem(M, N, d, seed, spread):
    """Training points uniform in [-1, 1]^d; every other query a noisy copy of a training point, the rest noisy
    uniform points, noise = spread (so the candidate counts range from 1 to every point)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.rand(N, d, generator=g) * 2 - 1
    x = torch.rand(M, d, generator=g) * 2 - 1
    x[::2] = y[torch.randint(0, N, ((M + 1) // 2,), generator=g)]
    return x + spread * torch.randn(M, d, generator=g), y


def _check(x, y, sigma, alpha=1.0):
    out = softmax_denoise(x, y, sigma, alpha=alpha, backend="cpu")
    ref = softmax_denoise(x.double(), y.double(), sigma, alpha=alpha, backend="torch", precision="exact")
    err = float((out.double() - ref).abs().max()) / float(y.abs().max())
    lse = kde_log_density(x, y, sigma, backend="cpu").double()
    lse_ref = kde_log_density(x.double(), y.double(), sigma, backend="torch")
    rel = float(((lse - lse_ref).abs() / lse_ref.abs().clamp_min(1.0)).max())
    assert err <= 2e-6 and rel <= 1e-6, (err, rel)


@pytest.mark.parametrize("sigma", [0.002, 0.3, 1.0, 8.0, 80.0, 1e4])
def test_gemm_path_every_sigma_on_a_chunk_large_enough_to_sample(sigma):
    # N >= 16 * _SAMPLE: rows with many candidates are predicted from a sample and skip the fp32 GEMM
    x, y = _problem(10, 16 * native._SAMPLE + 3, 96, seed=1, spread=min(sigma, 2.0))
    _check(x, y, sigma)


def test_gemm_path_mixes_refined_and_float64_rows(monkeypatch):
    # per-query sigma: some rows keep fp32 scores, some refine a few candidates, some exceed the native budget
    # (a budget of 3 here) and get float64 GEMM scores; with and without the sample's prediction
    x, y = _problem(12, 700, 80, seed=2, spread=0.5)
    sigma = torch.tensor([0.002, 0.05, 0.3, 1.0, 3.0, 80.0] * 2, dtype=torch.float64)
    alpha = torch.linspace(0.6, 1.3, 12, dtype=torch.float64)
    monkeypatch.setattr(native, "N_REFINE_NATIVE", 3)
    _check(x, y, sigma, alpha)
    monkeypatch.setattr(native, "_SAMPLE", 16)
    _check(x, y, sigma, alpha)


def test_float64_scores_in_blocks_equal_one_gemm(monkeypatch):
    x, y = _problem(5, 333, 70, seed=3, spread=1.0)
    x64, a = x.double(), torch.linspace(0.5, 1.5, 5, dtype=torch.float64)
    yy = y.double().square().sum(1)
    monkeypatch.setattr(native, "_Y64_ROWS", 100)  # three full blocks and a partial one
    T64, shift = native._scores64(x64, a, yy, y)
    want = torch.addmm(yy.neg()[None, :], x64 * (2.0 / a)[:, None], y.double().T)
    assert torch.allclose(shift, want.max(dim=1).values, rtol=1e-15, atol=0)
    assert torch.allclose(T64, want - shift[:, None], rtol=0, atol=1e-12 * float(want.abs().max()))


def test_sparse_and_dense_output_products_agree(monkeypatch):
    x, y = _problem(8, 900, 100, seed=4, spread=0.2)
    sparse = softmax_denoise(x, y, 0.2, backend="cpu")
    monkeypatch.setattr(native, "_SPARSE_PV_DIV", 1 << 40)  # max_nnz 0: the dense product every time
    dense = softmax_denoise(x, y, 0.2, backend="cpu")
    assert torch.allclose(sparse, dense, rtol=0, atol=1e-6)
    assert refine.N_REFINE_NATIVE >= refine.N_REFINE


def test_fp32_scores_in_column_blocks_equal_one_gemm(monkeypatch):
    x, y = _problem(6, 1001, 90, seed=5, spread=1.0)
    yy = y.double().square().sum(1).float()
    monkeypatch.setattr(native, "_GEMM_COLS", 300)  # three full blocks and a partial one
    out = torch.full((6, 1001), float("nan"))
    T = native._scores32(yy, 2 * x, y, out=out)
    assert T is out
    want = torch.addmm(yy.neg()[None, :], 2 * x, y.T)
    assert torch.allclose(T, want, rtol=1e-6, atol=1e-4)
    assert torch.equal(native._scores32(yy, 2 * x, y), T)
