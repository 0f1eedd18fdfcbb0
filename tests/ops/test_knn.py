"""knn on every exact backend: torch, cpu (native), faiss (certified IndexFlatL2) and cuda (gpu-marked), one set of
cases against the float64 brute force (knn_naive: stable sort, equal distances by index).

Every backend is exact: the same indices as the brute force (random data has no ties; tie cases check the smaller
index first), float64 distances equal to float64 rounding (knn_sqdist64), and the public result those distances
rounded to the output dtype. Ids read backend-dtype-shape-k, e.g. ``faiss-fp32-M97xN1025xd33-k1024``.
Backend-specific tests (raw kernels, thread counts, approximate faiss indexes, saved indexes) stay in
tests/test_knn_{torch,native,faiss}.py and tests/test_cuda_native.py.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from diffgen_fast import TrainingSet, knn
from diffgen_fast.ops import dispatch
from diffgen_fast.ops.knn import knn_sqdist64
from diffgen_fast.ops.knn.naive import knn_naive
from tests.helpers import DTYPE_NAMES, assert_knn_matches, backend_device, backend_param, make_problem

OP = "knn"
BACKENDS = ("torch", "cpu", "faiss", "cuda")
F32, F64 = torch.float32, torch.float64
ULP32 = 2.0**-23  # one float32 ulp, relative: the public fp32 distances are the float64 ones rounded


SHAPES = [(1, 1, 1), (3, 3, 2), (97, 97, 3), (1025, 97, 1), (3, 1025, 17), (97, 1025, 64), (1, 97, 3072),
          (3, 3, 3072), (97, 1025, 33), (1025, 1025, 2), (11, 97, 59), (13, 300, 3072)]  # fmt: skip


def _grid():
    # shape and dtype outermost: the cases of one problem run together and share its brute force (_problem)
    for M, N, d in SHAPES:
        for dtype in (F32, F64):
            for backend in BACKENDS:
                for k in sorted({1, min(10, N), N} | ({1024} if N >= 1024 else set()) | ({2} if d == 59 else set())):
                    p = backend_param(OP, backend, dtype, (M, N, d), k,
                                      id=f"{backend}-{DTYPE_NAMES[dtype]}-M{M}xN{N}xd{d}-k{k}")  # fmt: skip
                    if k >= 1024:  # k = 1024 and N: ~1-2 s each; k = 1 and 10 of the same problems stay quick
                        p = pytest.param(*p.values, id=p.id, marks=[*p.marks, pytest.mark.slow])
                    yield p


def _run(backend, x, y, k):
    """(public (sqdist, index), float64 (sqdist, index)), on the CPU: float32 inputs also through knn_sqdist64, the
    float64 distances the public op rounds (for float64 inputs they are the public result)."""
    dev = backend_device(backend)
    d2, idx = knn(x.to(dev), y.to(dev), k, backend=backend)
    assert idx.device.type == dev.type
    if x.dtype == F64:
        return (d2.cpu(), idx.cpu()), (d2.cpu(), idx.cpu())
    d64, i64, info = knn_sqdist64(x.to(dev), y.to(dev), k, backend=backend)
    assert info["backend"] == backend and info["exact"] is True
    assert torch.equal(idx.cpu(), i64)
    return (d2.cpu(), idx.cpu()), (d64, i64)


def _assert_exact(public, full, ref, dtype, *, rtol64=1e-13):
    (d2, idx), (d64, i64), (rd, ri) = public, full, ref
    assert d2.dtype == dtype and idx.dtype == torch.int64 and d2.shape == ri.shape and d64.dtype == F64
    assert torch.equal(i64, ri)  # no ties in random data: the order is unique
    torch.testing.assert_close(d64, rd, rtol=rtol64, atol=1e-300)
    rounded = rd.to(dtype).double()
    torch.testing.assert_close(d2.double(), rounded, rtol=ULP32 if dtype == F32 else rtol64, atol=1e-300)


@functools.lru_cache(maxsize=4)
def _problem(M, N, d, dtype):
    """Inputs of one shape and dtype with their float64 brute-force order over all N (shared by the backends and k)."""
    x, y = make_problem(M, N, d, dtype=dtype, seed=M + 7 * N + d)
    return x, y, knn_naive(x, y, N)


@pytest.mark.parametrize("backend,dtype,shape,k", list(_grid()))
def test_matches_bruteforce(backend, dtype, shape, k):
    x, y, (rd, ri) = _problem(*shape, dtype)
    public, full = _run(backend, x, y, k)
    _assert_exact(public, full, (rd[:, :k], ri[:, :k]), dtype)


@pytest.mark.parametrize(
    "backend,dtype,d",
    [backend_param(OP, b, t, d, id=f"{b}-{DTYPE_NAMES[t]}-d{d}") for b in BACKENDS for t in (F32, F64)
     for d in (1, 3, 8, 17, 64)],
)  # fmt: skip
def test_exact_ties_smaller_index_first(backend, dtype, d):
    """Duplicates and integer coordinates (exact distances, many equal): ties go to the smaller index. The queries:
    integer points, and training points shifted by 0.5 in every coordinate."""
    g = torch.Generator().manual_seed(d)
    base = torch.randint(-2, 3, (40, d), generator=g).to(dtype)
    y = torch.cat([base, base, base[:7], base])
    x = torch.cat([torch.randint(-2, 3, (23, d), generator=g).to(dtype), base[:5] + 0.5])
    for k in (1, 3, 10, 60, len(y)):
        (d2, idx), (d64, i64) = _run(backend, x, y, k)
        rd, ri = knn_naive(x, y, k)  # stable sort of exact distances: ties by index
        assert torch.equal(i64, ri), k
        assert torch.equal(d64, rd) and torch.equal(d2.double(), rd), k  # multiples of 1/4: exact in float32 too


@pytest.mark.parametrize(
    "backend,d,k", [backend_param(OP, b, d, k, id=f"{b}-d{d}-k{k}") for b in BACKENDS for d in (4, 8, 40)
                    for k in (1, 35, 40)],
)  # fmt: skip
def test_ties_beyond_the_candidate_window(backend, d, k):
    """20 far points, then 150 copies of one point and 130 of another, k up to 40: more ties than a first candidate
    set holds."""
    y = torch.cat([3.0 + torch.rand(20, d, generator=torch.Generator().manual_seed(d)), torch.zeros(150, d),
                   torch.ones(130, d)])  # fmt: skip
    x = torch.full((3, d), 0.1)
    (d2, idx), _ = _run(backend, x, y, k)
    assert idx.tolist() == [list(range(20, 20 + k))] * 3


@pytest.mark.parametrize("backend", [backend_param(OP, b) for b in BACKENDS])
def test_near_ties_with_large_norms(backend):
    """Norm ~1e3, differences 1e-3: fp32 norm expansion cannot order them; the float64 re-rank must."""
    g = torch.Generator().manual_seed(1)
    center = 30.0 + torch.rand(1, 1024, generator=g, dtype=F64)
    y = (center + 1e-3 * torch.randn(300, 1024, generator=g, dtype=F64)).float()
    x = (center + 1e-3 * torch.randn(6, 1024, generator=g, dtype=F64)).float()
    (d2, idx), (d64, i64) = _run(backend, x, y, 4)
    assert_knn_matches(d64, i64, x, y, 4, rtol=1e-12)
    assert_knn_matches(d2, idx, x, y, 4, rtol=1e-6)
    assert torch.equal(i64, knn_naive(x, y, 4)[1])


def _slow_for_faiss(b):
    p = backend_param(OP, b)  # faiss: 2 x 8 chunkings of IndexFlatL2 searches, ~8 s
    return pytest.param(*p.values, id=p.id, marks=[*p.marks, pytest.mark.slow]) if b == "faiss" else p


@pytest.mark.parametrize("backend", [_slow_for_faiss(b) for b in BACKENDS])
def test_chunked_and_memmapped_streaming_identical(backend, tmp_path):
    """Any chunk size, and a memory-mapped .npy training set read chunk by chunk: the same result, bitwise."""
    x, y = make_problem(13, 211, 9, seed=4)
    dev = backend_device(backend)
    _, impl = dispatch.resolve("knn", backend, dev)

    def run(train, **kw):
        res = impl(x.to(dev), TrainingSet.coerce(train), 7, **kw)
        return res[0].cpu(), res[1].cpu()  # faiss adds an info dict

    whole = run(y)
    assert torch.equal(whole[1], knn_naive(x, y, 7)[1])
    np.save(tmp_path / "y.npy", y.numpy())
    ts = TrainingSet.from_npy(tmp_path / "y.npy")
    for chunk in (1, 5, 6, 7, 40, 64, 211, 1000):
        for train in (y, ts):
            got = run(train, chunk_size=chunk)
            assert torch.equal(got[1], whole[1]), chunk
            torch.testing.assert_close(got[0], whole[0], rtol=0, atol=0)
    (d2, idx), _ = _run(backend, x, ts, 4)  # the public op on the memory-mapped set
    assert_knn_matches(d2, idx, x, y, 4, rtol=1e-6)
    assert not ts.is_in_memory


@pytest.mark.parametrize("backend", [backend_param(OP, b) for b in BACKENDS])
def test_numpy_image_shapes_and_empty_queries(backend):
    x, y = make_problem(4, 50, 12, seed=2)
    ref = knn_naive(x, y, 2)
    if backend_device(backend).type == "cpu":
        d2, idx = knn(x.reshape(4, 3, 2, 2).numpy(), y.reshape(50, 3, 2, 2).numpy(), 2, backend=backend)
        assert isinstance(d2, np.ndarray) and d2.dtype == np.float32 and idx.dtype == np.int64
        assert idx.tolist() == ref[1].tolist()
        assert_knn_matches(d2, idx, x, y, 2, rtol=1e-6)
    dev = backend_device(backend)
    d2, idx = knn(x.reshape(4, 3, 2, 2).to(dev), y.reshape(50, 3, 2, 2).to(dev), 2, backend=backend)
    assert torch.equal(idx.cpu(), ref[1])
    d0, i0 = knn(x[:0].to(dev), y.to(dev), 3, backend=backend)
    assert d0.shape == (0, 3) and i0.shape == (0, 3)
