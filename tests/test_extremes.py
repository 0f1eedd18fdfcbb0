"""No silent wrong answers at the edges of the floating-point range: values whose squared distances overflow the
GEMM dtype (float32 above ~1e19, float64 above ~1e154), subnormal inputs and exact ties (docs/precision.md).

Every case is checked against float64 brute force by differences; where float64 cannot resolve it either, the
functions must raise InputError naming the argument and the rows.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffgen_fast import _native
from diffgen_fast.errors import InputError
from diffgen_fast.metrics.memorization import memorization
from diffgen_fast.ops import kde_log_density, knn, softmax_denoise
from diffgen_fast.ops.knn.naive import knn_naive
from diffgen_fast.ops.softmax_denoise.naive import kde_log_density_naive, softmax_denoise_naive

try:
    import faiss  # noqa: F401

    HAVE_FAISS = True
except ImportError:  # pragma: no cover
    HAVE_FAISS = False

needs_ext = pytest.mark.skipif(not _native.available(), reason="native extension unavailable")
KNN_BACKENDS = [
    "torch",
    pytest.param("cpu", marks=needs_ext),
    pytest.param("faiss", marks=pytest.mark.skipif(not HAVE_FAISS, reason="faiss not installed")),
    "auto",
]
SD_BACKENDS = ["torch", pytest.param("cpu", marks=needs_ext), "auto"]


def _far_problem(off: float, d: int, dtype: torch.dtype, seed: int = 0):
    """Training points: 40 near the origin, 10 clustered around `off`; queries: one near the origin, one near the
    far cluster, one at `off` in a single coordinate (far from everything), one duplicate of a far point."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(50, d, generator=g, dtype=torch.float64)
    y[40:] = off * (1.0 + 0.01 * torch.randn(10, d, generator=g, dtype=torch.float64))
    x = torch.randn(4, d, generator=g, dtype=torch.float64)
    x[1] = off * (1.0 + 0.01 * torch.randn(d, generator=g, dtype=torch.float64))
    x[2, 0] += off
    x[3] = y[44]
    return x.to(dtype), y.to(dtype)


def _check_exact(d2, idx, x, y, k):
    rd, ri = knn_naive(x, y, k)
    assert torch.equal(torch.as_tensor(idx), ri)
    torch.testing.assert_close(torch.as_tensor(d2).double(), rd, rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend", KNN_BACKENDS)
@pytest.mark.parametrize("k", [1, 2, 5])
@pytest.mark.parametrize("d", [8, 40])
@pytest.mark.parametrize(
    "dtype,off",
    [(torch.float32, 1e20), (torch.float32, 1e30), (torch.float64, 1e20), (torch.float64, 1e30),
     (torch.float64, 1e100)],  # fmt: skip
)
def test_knn_overflow_float64_result_is_exact(backend, k, d, dtype, off):
    x, y = _far_problem(off, d, dtype)
    # float32 data as float64 inputs (exact conversion): the answer float64 resolves
    x64, y64 = x.double(), y.double()
    d2, idx = knn(x64, y64, k, backend=backend)
    _check_exact(d2, idx, x64, y64, k)
    assert int(idx.min()) >= 0 and int(idx.max()) < len(y)


@pytest.mark.parametrize("backend", KNN_BACKENDS)
@pytest.mark.parametrize("off", [1e20, 1e30])
def test_knn_float32_result_out_of_range_raises(backend, off):
    x, y = _far_problem(off, 8, torch.float32)
    with pytest.raises(InputError, match=r"queries: the squared distances of rows (1, )?2(, 3)? are above.*float64"):
        knn(x, y, 2, backend=backend)


@pytest.mark.parametrize("backend", KNN_BACKENDS)
@pytest.mark.parametrize("k", [1, 2, 5])
@pytest.mark.parametrize("d", [8, 40])
def test_knn_float32_expansion_overflow_small_distances(backend, k, d):
    # norms near 1.5e19: ||x||^2 + ||y||^2 overflows float32 while the distances themselves fit
    g = torch.Generator().manual_seed(1)
    base = 1.5e19 / d**0.5
    y = (base * (1.0 + 1e-3 * torch.randn(30, d, generator=g, dtype=torch.float64))).float()
    x = (base * (1.0 + 1e-3 * torch.randn(3, d, generator=g, dtype=torch.float64))).float()
    d2, idx = knn(x, y, k, backend=backend)
    assert d2.dtype == torch.float32
    rd, ri = knn_naive(x, y, k)
    assert torch.equal(idx, ri)
    torch.testing.assert_close(d2, rd.float(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", KNN_BACKENDS)
def test_knn_float64_overflow_raises(backend):
    x, y = _far_problem(1e160, 8, torch.float64)
    with pytest.raises(InputError, match=r"queries: the squared distances of rows 1, 2, 3 overflow even float64"):
        knn(x, y, 2, backend=backend)


@pytest.mark.parametrize("backend", KNN_BACKENDS)
def test_knn_subnormal_inputs(backend):
    g = torch.Generator().manual_seed(2)
    y = (torch.randn(30, 4, generator=g, dtype=torch.float64) * 1e-42).float()
    x = (torch.randn(3, 4, generator=g, dtype=torch.float64) * 1e-42).float()
    # float64 result: exact
    d2, idx = knn(x.double(), y.double(), 3, backend=backend)
    _check_exact(d2, idx, x.double(), y.double(), 3)
    assert bool((d2 > 0).all())
    # float32 result: the squared distances (~1e-84) are not representable, never a silent 0
    with pytest.raises(InputError, match="queries: .*float32's smallest subnormal"):
        knn(x, y, 3, backend=backend)


@pytest.mark.parametrize("backend", KNN_BACKENDS)
@pytest.mark.parametrize("k", [1, 2, 5])
def test_knn_exact_ties_by_index(backend, k):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(6, 5, generator=g)
    y = torch.cat([base, base, base])  # every point three times
    x = torch.cat([base[:2], torch.randn(2, 5, generator=g)])
    d2, idx = knn(x, y, k, backend=backend)
    rd, ri = knn_naive(x, y, k)
    assert torch.equal(idx, ri)
    torch.testing.assert_close(d2.double(), rd, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("backend", KNN_BACKENDS)
@pytest.mark.parametrize("off", [1e20, 1e30])
def test_memorization_far_samples_not_memorized(backend, off):
    x, y = _far_problem(off, 8, torch.float32)
    res = memorization(x, y, backend=backend)
    rd, ri = knn_naive(x, y, 2)
    assert torch.equal(res.nn_index, ri)
    torch.testing.assert_close(res.nn_sqdist.double(), rd, rtol=1e-12, atol=0)
    ratio = (rd[:, 0] / rd[:, 1]).sqrt()
    assert res.memorized.tolist() == (ratio < 1 / 3).tolist()
    assert res.memorized.tolist()[:3] == [False, False, False] and bool(res.memorized[3])  # row 3 copies y[44]


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=needs_ext), "torch"])
def test_streamed_score_far_samples(backend):
    from diffgen_fast.metrics.scoring import score

    x, y = _far_problem(1e20, 8, torch.float32)
    res = score(x.numpy(), y.numpy(), backend=backend, chunk_size=16, check_authenticity=False)
    rd, ri = knn_naive(x, y, 2)
    assert np.array_equal(res.per_sample["nn_index"], ri.numpy())
    np.testing.assert_allclose(res.per_sample["nn_dist"], rd.sqrt().numpy(), rtol=1e-12)
    assert res.per_sample["memorized"].tolist() == [False, False, False, True]


def _sd_problem(off: float, d: int, dtype):
    g = torch.Generator().manual_seed(4)
    y = off * (1.0 + 0.01 * torch.randn(40, d, generator=g, dtype=torch.float64))
    x = off * (1.0 + 0.01 * torch.randn(3, d, generator=g, dtype=torch.float64))
    return x.to(dtype), y.to(dtype)


@pytest.mark.parametrize("backend", SD_BACKENDS)
@pytest.mark.parametrize("precision", ["auto", "fast", "exact"])
@pytest.mark.parametrize("d", [8, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_softmax_denoise_at_1e30(backend, precision, d, dtype):
    x, y = _sd_problem(1e30, d, dtype)
    out = softmax_denoise(x, y, 0.5, backend=backend, precision=precision)
    ref, _ = softmax_denoise_naive(x, y, 0.5)
    # sigma << distances: the sigma -> 0 limit, the nearest training point
    nearest = y.double()[knn_naive(x, y, 1)[1][:, 0]]
    torch.testing.assert_close(ref, nearest, rtol=0, atol=0)
    torch.testing.assert_close(out.double(), ref, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=0)


@pytest.mark.parametrize("backend", SD_BACKENDS)
@pytest.mark.parametrize("d", [8, 100])
def test_kde_log_density_at_1e30(backend, d):
    x, y = _sd_problem(1e30, d, torch.float64)
    got = kde_log_density(x, y, 0.5, backend=backend)
    torch.testing.assert_close(got, kde_log_density_naive(x, y, 0.5), rtol=1e-12, atol=0)
    # float32 inputs: a log-density of -1e58 is outside float32's range: a clear error, not -inf
    with pytest.raises(InputError, match="x: the log-density of rows 0, 1, 2 exceeds float32"):
        kde_log_density(x.float(), y.float(), 0.5, backend=backend)


@pytest.mark.parametrize("backend", SD_BACKENDS)
@pytest.mark.parametrize("d", [8, 100])
def test_softmax_denoise_float64_overflow_raises(backend, d):
    x, y = _sd_problem(1e160, d, torch.float64)
    with pytest.raises(InputError, match=r"x: .*rows 0, 1, 2.*overflow"):
        softmax_denoise(x, y, 0.5, backend=backend)
    with pytest.raises(InputError, match=r"x: .*rows 0, 1, 2.*overflow"):
        kde_log_density(x, y, 0.5, backend=backend)


@pytest.mark.parametrize("backend", SD_BACKENDS)
def test_softmax_denoise_subnormal_inputs(backend):
    g = torch.Generator().manual_seed(5)
    y = (torch.randn(30, 4, generator=g, dtype=torch.float64) * 1e-42).float()
    x = (torch.randn(3, 4, generator=g, dtype=torch.float64) * 1e-42).float()
    out = softmax_denoise(x, y, 1e-42, backend=backend)
    ref, _ = softmax_denoise_naive(x, y, torch.tensor(1e-42, dtype=torch.float32).double())
    assert bool(torch.isfinite(out).all())
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1.5e-45)  # one float32 subnormal ulp
