"""The native CPU kNN (backend="cpu", csrc/cpu/knn.cpp): mixed dtypes, non-contiguous inputs, thread counts, index
offsets, dispatch, the fallback without the extension, the custom op and the raw function's argument checks. The
cases every knn backend shares (shapes, k, ties, near ties, chunking) are in tests/ops/test_knn.py.

Skips when the extension is not built (test_native.py's test_extension_built_when_required catches a broken build
on CI). Results must equal the reference's exactly: the same indices, distances equal to float64 rounding.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

from diffgen_fast import TrainingSet, _native, knn
from diffgen_fast.errors import BackendUnavailableError, InputError, InputTypeError
from diffgen_fast.ops import dispatch
from diffgen_fast.ops.knn.naive import knn_naive
from diffgen_fast.ops.knn.reference import knn_torch
from tests.helpers import assert_knn_matches, make_problem

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(
    not _native.available(), reason=f"native extension unavailable: {_native.unavailable_reason()}"
)


def knn_cpu(x, y, k, **kw):
    from diffgen_fast.ops.knn.native import knn_cpu as impl

    return impl(x, TrainingSet.coerce(y), k, **kw)


@pytest.fixture
def restore_threads():
    before = _native.get_num_threads()
    yield
    _native.set_num_threads(before)


def assert_same(got, ref):
    """Identical indices, float64 distances equal to rounding."""
    assert got[0].dtype == torch.float64 and got[1].dtype == torch.int64
    assert torch.equal(got[1], ref[1])
    torch.testing.assert_close(got[0], ref[0].to(torch.float64), rtol=1e-13, atol=1e-300)


def test_mixed_dtypes_promote():
    x, y = make_problem(9, 200, 5, seed=3)
    got = knn_cpu(x, y.double(), 7)
    assert_same(got, knn_torch(x, TrainingSet.coerce(y.double()), 7))
    got = knn_cpu(x.to(torch.bfloat16), y, 7)
    assert_same(got, knn_torch(x.to(torch.bfloat16), TrainingSet.coerce(y), 7))


def test_non_contiguous_inputs():
    x, y = make_problem(30, 200, 12, seed=5)
    xs = torch.cat([x, x], dim=1)[:, ::2]
    yt = y.t().contiguous().t()
    assert not xs.is_contiguous() and not yt.is_contiguous()
    ref = knn_torch(xs.contiguous(), TrainingSet.coerce(y), 5)
    assert_same(_native.knn_topk(xs, yt, 5), ref)
    assert_same(knn_cpu(xs, yt, 5), ref)


def test_thread_counts_give_identical_results(restore_threads):
    for M, N, d, k in [(200, 3000, 5, 10), (2, 5000, 48, 20), (64, 2000, 300, 1024)]:
        x, y = make_problem(M, N, d, seed=N)
        _native.set_num_threads(1)
        one = _native.knn_topk(x, y, k)
        _native.set_num_threads(2)
        two = _native.knn_topk(x, y, k)
        assert torch.equal(one[1], two[1]) and torch.equal(one[0], two[0])


def test_index_offset_and_empty_queries():
    x, y = make_problem(4, 50, 3, seed=2)
    d0, i0 = _native.knn_topk(x, y, 3)
    d1, i1 = _native.knn_topk(x, y, 3, index_offset=1000)
    assert torch.equal(i1, i0 + 1000) and torch.equal(d1, d0)
    d2, i2 = _native.knn_topk(x[:0], y, 3)
    assert d2.shape == (0, 3) and i2.shape == (0, 3)


def test_public_api_and_auto():
    x, y = make_problem(8, 120, 6, seed=9)
    assert dispatch.resolve("knn", "auto", torch.device("cpu"))[0] == "cpu"
    d2, idx = knn(x, y, 3)
    assert d2.dtype == torch.float32
    ref = knn(x, y, 3, backend="torch")
    assert torch.equal(idx, ref[1]) and torch.equal(d2, ref[0])
    d2, idx = knn(x.numpy(), y.numpy(), 3, backend="cpu")
    assert idx.tolist() == ref[1].tolist()


def test_disabled_extension_falls_back_to_torch(monkeypatch):
    import importlib.util

    monkeypatch.setenv(_native.DISABLE_ENV, "1")
    x, y = make_problem(5, 60, 4, seed=1)
    # the next exact backend: faiss's certified IndexFlatL2 when faiss is installed, else the torch reference
    fallback = "faiss" if importlib.util.find_spec("faiss") is not None else "torch"
    assert dispatch.resolve("knn", "auto", torch.device("cpu"))[0] == fallback
    with pytest.raises(BackendUnavailableError, match="DIFFGEN_FAST_DISABLE_EXT"):
        knn(x, y, 2, backend="cpu")
    d2, idx = knn(x, y, 2)
    assert_knn_matches(d2, idx, x, y, 2, rtol=1e-6)


def test_custom_op_fake_tensor():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from diffgen_fast.ops.knn.native import knn_topk_cpu

    if not hasattr(torch.library, "custom_op"):
        pytest.skip("torch.library.custom_op needs torch >= 2.4")
    with FakeTensorMode():
        d2, idx = knn_topk_cpu(torch.randn(5, 3), torch.randn(20, 3), 4, 0)
    assert d2.shape == (5, 4) and d2.dtype == torch.float64 and idx.dtype == torch.int64
    x, y = make_problem(5, 20, 3, seed=0)
    d2, idx = torch.compile(lambda a, b: knn_topk_cpu(a, b, 4, 0), backend="eager", fullgraph=True)(x, y)
    assert torch.equal(idx, knn_naive(x, y, 4)[1])


def test_wrapper_argument_errors():
    x, y = make_problem(4, 10, 3, seed=0)
    with pytest.raises(InputTypeError, match="x must have dtype"):
        _native.knn_topk(x.long(), y, 2)
    with pytest.raises(InputTypeError, match="y has dtype"):
        _native.knn_topk(x, y.double(), 2)
    with pytest.raises(InputError, match="x must be on the CPU"):
        _native.knn_topk(torch.empty(4, 3, device="meta"), y, 2)
    with pytest.raises(InputError, match="y has 4 columns"):
        _native.knn_topk(x, torch.zeros(10, 4), 2)
    with pytest.raises(InputError, match="k must satisfy"):
        _native.knn_topk(x, y, 11)
    with pytest.raises(InputError, match="index_offset"):
        _native.knn_topk(x, y, 2, index_offset=-1)


def test_raw_function_rejects_bad_arguments():
    C = importlib.import_module("diffgen_fast._C")
    x = torch.zeros(4, 3)
    y = torch.zeros(10, 3)
    od = torch.zeros(4, 2, dtype=torch.float64)
    oi = torch.zeros(4, 2, dtype=torch.int64)
    good = dict(x=x.data_ptr(), y=y.data_ptr(), M=4, n=10, d=3, k=2, dtype="float32", out_dist=od.data_ptr(),
                out_index=oi.data_ptr(), index_offset=0)  # fmt: skip
    C.knn_topk(**good)
    bad = [
        ("M", -1),
        ("n", 0),
        ("d", 0),
        ("k", 0),
        ("k", 11),
        ("index_offset", -3),
        ("dtype", "float16"),
        ("x", 0),
        ("y", 0),
        ("out_dist", 0),
        ("out_index", od.data_ptr() + 4),
        ("x", x.data_ptr() + 2),
        ("out_dist", -8),
    ]
    for name, value in bad:
        with pytest.raises(ValueError, match=name):
            C.knn_topk(**{**good, name: value})
    for name, value in [("M", 4.0), ("dtype", 32), ("x", "0x10"), ("k", True)]:
        with pytest.raises(TypeError, match=name):
            C.knn_topk(**{**good, name: value})


def test_custom_op_passes_opcheck():
    if not hasattr(torch.library, "opcheck"):
        pytest.skip("torch.library.opcheck needs torch >= 2.4")
    from diffgen_fast.ops.knn import native  # noqa: F401  (registers the op)

    x, y = make_problem(6, 50, 5, seed=3)
    torch.library.opcheck(torch.ops.diffgen_fast.knn_partial_cpu, (x, y, 4, 7))
