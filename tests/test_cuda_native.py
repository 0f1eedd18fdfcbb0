"""The native CUDA backend ("cuda"): build and argument checks here, kernels against the float64 brute force on a GPU.

Tests without the gpu marker run on any machine (the module must build and import without a GPU driver, and its
argument validation must reject bad input before touching the GPU); gpu-marked ones skip without CUDA (conftest.py).
"""

from __future__ import annotations

import importlib
import math
import re
import shutil
import subprocess

import pytest
import torch

from diffgen_fast import TrainingSet, _native, _native_cuda, kde_log_density, knn, softmax_denoise
from diffgen_fast.errors import BackendUnavailableError, InputError
from diffgen_fast.ops import dispatch
from diffgen_fast.ops.knn.native_cuda import certified_bound_factors
from diffgen_fast.ops.merge import SoftmaxState, empty_softmax_state, merge_softmax_states
from diffgen_fast.ops.softmax_denoise.naive import kde_log_density_naive, softmax_denoise_naive
from diffgen_fast.ops.softmax_denoise.native_cuda import merge_splits
from tests.helpers import assert_knn_matches, make_problem

F64 = torch.float64
needs_cuda_build = pytest.mark.skipif(
    not _native_cuda.built_with_cuda(), reason="diffgen_fast._C was built without CUDA (or is unavailable)"
)


@pytest.fixture
def C():
    if not _native_cuda.built_with_cuda():
        pytest.skip("diffgen_fast._C was built without CUDA (or is unavailable)")
    return importlib.import_module("diffgen_fast._C")


# -- build ---------------------------------------------------------------------------------------------------------


def test_build_info_reports_cuda_when_nvcc_is_present():
    if shutil.which("nvcc") is None:
        pytest.skip("no nvcc on PATH: the extension is built without CUDA here")
    if not _native.available():
        pytest.skip(f"native extension unavailable: {_native.unavailable_reason()}")
    info = _native.build_info()
    assert info["cuda"] is True, "nvcc is on PATH but the extension was built without CUDA (see the build log)"
    cb = info["cuda_build"]
    release = re.search(r"V([0-9.]+)", subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout)
    assert release is not None and cb["nvcc_version"] == release.group(1)
    assert cb["cudart"] == "static" and cb["arch"]
    assert cb["select_max_k"] == _native_cuda.SELECT_MAX_K and cb["softmax_max_d"] == _native_cuda.SOFTMAX_MAX_D


@needs_cuda_build
def test_cuda_build_info_works_without_a_driver():
    for _ in range(2):  # repeatable: no sticky error, no exception
        cb = _native_cuda.build_info()
        assert isinstance(cb["runtime_version"], int) and cb["runtime_version"] >= 11000
        assert isinstance(cb["driver_version"], int) and isinstance(cb["device_count"], int)
        if torch.cuda.is_available():
            assert cb["device_count"] >= 1 and cb["device_error"] is None
        else:
            assert cb["device_count"] == 0
            assert cb["device_error"] or cb["driver_error"], cb  # the runtime's reason, as text


def test_unavailable_reason_says_why():
    why = _native_cuda.unavailable_reason(torch.device("cpu"))
    assert why is not None and len(why) > 10
    if _native_cuda.built_with_cuda() and torch.cuda.is_available():
        assert "CUDA tensors" in why
        assert _native_cuda.unavailable_reason(torch.device("cuda")) is None


# -- dispatch ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda x, y: softmax_denoise(x, y, 0.5, backend="cuda"),
        lambda x, y: kde_log_density(x, y, 0.5, backend="cuda"),
        lambda x, y: knn(x, y, 2, backend="cuda"),
    ],
)
def test_backend_cuda_on_cpu_tensors_raises_saying_why(call):
    x, y = make_problem(3, 20, 5)
    with pytest.raises(BackendUnavailableError) as err:
        call(x, y)
    assert "backend='cuda'" in str(err.value)
    assert _native_cuda.unavailable_reason(torch.device("cpu")) in str(err.value)


def test_auto_never_picks_cuda_on_cpu():
    cpu = torch.device("cpu")
    for dtype in (torch.float32, torch.float16, None):
        assert dispatch.resolve("softmax_denoise", "auto", cpu, dtype, d=8)[0] != "cuda"
        assert dispatch.resolve("knn", "auto", cpu, dtype)[0] != "cuda"
    rows = {(r["op"], r["backend"]): r for r in dispatch.backend_table(cpu)}
    for op in ("softmax_denoise", "knn"):
        assert not rows[(op, "cuda")]["available"] and rows[(op, "cuda")]["reason"]


def test_auto_rules_for_cuda_need_a_small_known_d():
    cuda = torch.device("cuda")
    assert dispatch._auto_candidate("softmax_denoise", "cuda", cuda, torch.float32, 64)
    assert not dispatch._auto_candidate("softmax_denoise", "cuda", cuda, torch.float32, 65)
    assert not dispatch._auto_candidate("softmax_denoise", "cuda", cuda, torch.float32, None)
    assert not dispatch._auto_candidate("softmax_denoise", "cuda", cuda, torch.float64, 8)
    assert dispatch._auto_candidate("knn", "cuda", cuda, torch.float32, None)
    assert dispatch.CUDA_SOFTMAX_MAX_D == _native_cuda.SOFTMAX_MAX_D


def test_check_tensor_rejects_cpu_tensors_naming_the_argument():
    with pytest.raises(InputError, match="queries_x must be a CUDA tensor"):
        _native_cuda.check_tensor(torch.zeros(2, 3), "queries_x", (torch.float32,), 2)
    with pytest.raises(TypeError, match="y must be a torch.Tensor"):
        _native_cuda.check_tensor([1.0], "y", (torch.float32,), 2)


# -- argument validation in bindings_cuda.cpp (fake pointers: it must raise before any CUDA call) -----------------

P = 1 << 20  # an aligned, fake, non-null "device pointer"


def test_select_topk_validates_k(C):
    with pytest.raises(ValueError, match=r"k must be in \[1, 2048\]"):
        C.cuda_select_topk(P, P, P, 4, 100, 0, 0)
    with pytest.raises(ValueError, match=r"k must be in \[1, 2048\]"):
        C.cuda_select_topk(P, P, P, 4, 5000, 2049, 0)
    with pytest.raises(ValueError, match="k must be <= n"):
        C.cuda_select_topk(P, P, P, 4, 10, 11, 0)
    with pytest.raises(ValueError, match="idx is a null pointer"):
        C.cuda_select_topk(P, P, 0, 4, 10, 5, 0)
    with pytest.raises(ValueError, match="idx is not aligned"):
        C.cuda_select_topk(P, P, P + 4, 4, 10, 5, 0)
    with pytest.raises(ValueError, match="n must be < 2"):
        C.cuda_select_topk(P, P, P, 1, 1 << 31, 5, 0)
    with pytest.raises(ValueError, match="M must be >= 0"):
        C.cuda_select_topk(P, P, P, -1, 10, 5, 0)


def test_sqdist_validates_pointers_sizes_and_dtype(C):
    with pytest.raises(ValueError, match="x is a null pointer"):
        C.cuda_sqdist(0, P, P, 2, 3, 4, "float32", 0)
    with pytest.raises(ValueError, match="y is not aligned to 8"):
        C.cuda_sqdist(P, P + 4, P, 2, 3, 4, "float64", 0)
    with pytest.raises(ValueError, match="out is a null pointer"):
        C.cuda_sqdist(P, P, 0, 2, 3, 4, "float32", 0)
    with pytest.raises(ValueError, match="dtype must be 'float32' or 'float64'"):
        C.cuda_sqdist(P, P, P, 2, 3, 4, "float16", 0)
    with pytest.raises(TypeError, match="dtype must be a str"):
        C.cuda_sqdist(P, P, P, 2, 3, 4, 32, 0)
    with pytest.raises(ValueError, match="d must be >= 1"):
        C.cuda_sqdist(P, P, P, 2, 3, 0, "float32", 0)
    with pytest.raises(ValueError, match="too large"):
        C.cuda_sqdist(P, P, P, 1 << 40, 1 << 40, 4, "float32", 0)
    with pytest.raises(ValueError, match="stream must be a non-negative pointer"):
        C.cuda_sqdist(P, P, P, 2, 3, 4, "float32", -1)
    with pytest.raises(TypeError, match="stream must be a pointer"):
        C.cuda_sqdist(P, P, P, 2, 3, 4, "float32", "0")
    with pytest.raises(TypeError, match="x must be a pointer"):
        C.cuda_sqdist(1.5, P, P, 2, 3, 4, "float32", 0)
    C.cuda_sqdist(0, 0, 0, 0, 3, 4, "float32", 0)  # M = 0: nothing to do, no pointer touched, no launch


def test_sqdist_pairs_validates(C):
    with pytest.raises(ValueError, match="n must be >= 1"):
        C.cuda_sqdist_pairs(P, P, P, P, 2, 0, 3, 4, "float32", 0)
    with pytest.raises(ValueError, match="idx is a null pointer"):
        C.cuda_sqdist_pairs(P, P, 0, P, 2, 5, 3, 4, "float32", 0)
    with pytest.raises(ValueError, match="out is not aligned to 8"):
        C.cuda_sqdist_pairs(P, P, P, P + 4, 2, 5, 3, 4, "float32", 0)


def test_softmax_state_validates_d_splits_and_pointers(C):
    args = dict(x=P, y=P, alpha=P, c2=P, m=P, l=P, q=P, o=P, M=4, n=100, d=8, splits=2, per_split=50, exact=True)
    for d in (0, 65, 3072):
        with pytest.raises(ValueError, match=r"d must be in \[1, 64\]"):
            C.cuda_softmax_state(**{**args, "d": d}, stream=0)
    with pytest.raises(ValueError, match="splits \\* per_split must cover n"):
        C.cuda_softmax_state(**{**args, "per_split": 49}, stream=0)
    with pytest.raises(ValueError, match=r"splits must be in \[1, 65535\]"):
        C.cuda_softmax_state(**{**args, "splits": 0}, stream=0)
    with pytest.raises(ValueError, match=r"splits must be in \[1, 65535\]"):
        C.cuda_softmax_state(**{**args, "splits": 70000}, stream=0)
    with pytest.raises(ValueError, match="per_split must be >= 1"):
        C.cuda_softmax_state(**{**args, "per_split": 0}, stream=0)
    with pytest.raises(ValueError, match="c2 is a null pointer"):
        C.cuda_softmax_state(**{**args, "c2": 0}, stream=0)
    with pytest.raises(ValueError, match="alpha is not aligned to 8"):
        C.cuda_softmax_state(**{**args, "alpha": P + 4}, stream=0)
    with pytest.raises(ValueError, match="o is not aligned to 4"):
        C.cuda_softmax_state(**{**args, "o": P + 2}, stream=0)
    with pytest.raises(TypeError, match="exact must be a bool"):
        C.cuda_softmax_state(**{**args, "exact": 1}, stream=0)


def test_launch_without_a_driver_raises_runtime_error(C):
    """With valid arguments and no usable GPU the launch fails inside CUDA: a RuntimeError with the CUDA error
    text, not a crash. (Only where no device exists: fake pointers must never reach a real GPU.)"""
    cb = _native_cuda.build_info()
    if torch.cuda.is_available() or cb["device_count"] != 0:
        pytest.skip("a CUDA device exists; this test passes fake pointers")
    with pytest.raises(RuntimeError, match="CUDA error: sqdist_tile_kernel: cuda"):
        C.cuda_sqdist(P, P, P, 2, 3, 4, "float32", 0)


# -- pure-torch pieces of the wrappers (run anywhere) -----------------------------------------------------------


def test_merge_splits_equals_pairwise_merges():
    g = torch.Generator().manual_seed(3)
    S, M, d = 5, 7, 3
    m = torch.randn(S, M, dtype=F64, generator=g) * 30
    m[1, 2] = float("-inf")  # an empty split
    m[:, 4] = float("-inf")  # a row empty everywhere
    l = 1 + torch.rand(S, M, dtype=F64, generator=g) * 10
    q = l * torch.rand(S, M, dtype=F64, generator=g)
    o = torch.randn(S, M, d, generator=g)
    for t in (l, q):
        t[torch.isneginf(m)] = 0
    o[torch.isneginf(m)] = 0
    ref = empty_softmax_state(M, d, dtype=F64)
    for s in range(S):
        ref = merge_softmax_states(ref, SoftmaxState(m[s], l[s], q[s], o[s].double()))
    got = merge_splits(m, l, q, o)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=0)


def test_certified_bound_factors():
    div32, abs32 = certified_bound_factors(3072, torch.float32)
    div64, abs64 = certified_bound_factors(3072, torch.float64)
    assert 1 + 3076 * 2.0**-24 < div32 < 1 + 3080 * 2.0**-24
    assert 1 + 2.0**-24 < div64 < 1 + 2.0**-23
    assert 0 < abs32 == abs64 < 1e-40


# -- GPU: softmax_denoise / kde -------------------------------------------------------------------------------------

gpu = pytest.mark.gpu
DEV = torch.device("cuda")


def _sigmas(M: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(M, dtype=F64, generator=g)
    return torch.exp(math.log(0.002) + u * (math.log(80.0) - math.log(0.002)))  # log-uniform in [0.002, 80]


def _alphas(M: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    return 0.5 + 0.5 * torch.rand(M, dtype=F64, generator=g)


def _err(out, lse, ref, ref_lse):
    e_out = float((out.cpu().double() - ref).abs().max()) if out.numel() else 0.0
    e_lse = float(((lse.cpu().double() - ref_lse) / ref_lse.abs().clamp(min=1.0)).abs().max()) if lse.numel() else 0.0
    return e_out, e_lse


@gpu
@pytest.mark.parametrize("M", [1, 3, 97, 1025])
@pytest.mark.parametrize("N", [1, 3, 97, 1025])
@pytest.mark.parametrize("d", [1, 2, 3, 17, 64])
def test_softmax_exact_matches_bruteforce(M, N, d):
    x, y = make_problem(M, N, d, seed=M * 7 + N + d, sigma=0.01)
    sigma, alpha = _sigmas(M, M + N + d), _alphas(M, M + N)
    x = x * alpha[:, None].float()  # VP-style queries near alpha y
    out, lse = softmax_denoise(x.to(DEV), y.to(DEV), sigma, alpha, return_lse=True, backend="cuda", precision="exact")
    assert out.dtype == torch.float32 and out.shape == x.shape and lse.dtype == torch.float32
    assert bool(torch.isfinite(out).all()) and bool(torch.isfinite(lse).all())
    ref, ref_lse = softmax_denoise_naive(x, y, sigma, alpha)
    e_out, e_lse = _err(out, lse, ref, ref_lse)
    assert e_out <= 2e-5, e_out
    assert e_lse <= 1e-6, e_lse


@gpu
@pytest.mark.parametrize("d", [1, 3, 17, 64])
@pytest.mark.parametrize("sigma", [0.05, 1.0, 80.0])
def test_softmax_fast_error(d, sigma):
    x, y = make_problem(97, 1025, d, seed=d, sigma=sigma)
    out, lse = softmax_denoise(x.to(DEV), y.to(DEV), sigma, return_lse=True, backend="cuda", precision="fast")
    ref, ref_lse = softmax_denoise_naive(x, y, sigma)
    e_out, e_lse = _err(out, lse, ref, ref_lse)
    # fp32 distances: logit error <= (d + 2) 2^-24 |z|, |z| <= ~2d / (2 sigma^2) for data in [-1, 1]
    zmax = 4.0 * d / (2 * sigma * sigma)
    assert e_lse <= 1e-6 + (d + 2) * 2.0**-24 * zmax / max(1.0, float(ref_lse.abs().min())), e_lse
    assert e_out <= 2e-5 + 4 * (d + 2) * 2.0**-24 * zmax, e_out


@gpu
def test_auto_precision_and_stats():
    x, y = make_problem(33, 500, 8, seed=5, sigma=0.002)
    res = softmax_denoise(x.to(DEV), y.to(DEV), 0.002, return_stats=True, backend="cuda")
    ref, ref_lse = softmax_denoise_naive(x, y, 0.002)
    e_out, e_lse = _err(res.denoised, res.lse, ref, ref_lse)
    assert e_out <= 2e-5 and e_lse <= 1e-6
    ref_stats = softmax_denoise(x, y, 0.002, return_stats=True, backend="torch", precision="exact")
    torch.testing.assert_close(res.top_weight.cpu().double(), ref_stats.top_weight.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res.n_eff.cpu().double(), ref_stats.n_eff.double(), rtol=1e-5, atol=1e-6)


@gpu
@pytest.mark.parametrize("d", [1, 17, 64])
def test_kde_matches_bruteforce(d):
    x, y = make_problem(97, 1025, d, seed=d + 1, sigma=0.1)
    h = _sigmas(97, d).clamp(min=0.01)
    got = kde_log_density(x.to(DEV), y.to(DEV), h, backend="cuda").cpu().double()
    ref = kde_log_density_naive(x, y, h)
    assert float(((got - ref) / ref.abs().clamp(min=1.0)).abs().max()) <= 1e-6


@gpu
@pytest.mark.parametrize("precision", ["exact", "fast"])
def test_softmax_chunks_and_splits_agree(precision):
    from diffgen_fast.ops.softmax_denoise.native_cuda import softmax_denoise_cuda

    x, y = make_problem(70, 3001, 17, seed=9, sigma=0.3)
    ts = TrainingSet.from_tensor(y)
    sig = torch.full((70,), 0.3, dtype=F64, device=DEV)
    one = torch.ones(70, dtype=F64, device=DEV)
    base = softmax_denoise_cuda(x.to(DEV), ts, sig, one, precision=precision, splits=1)
    for kw in (dict(chunk_size=37), dict(splits=13), dict(chunk_size=1000, splits=7)):
        other = softmax_denoise_cuda(x.to(DEV), ts, sig, one, precision=precision, **kw)
        torch.testing.assert_close(other.denoised, base.denoised, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(other.lse, base.lse, rtol=1e-12, atol=1e-9)


@gpu
def test_softmax_limits_and_large_d():
    x, y = make_problem(5, 50, 8)
    near = softmax_denoise(y[:5].to(DEV) + 1e-4, y.to(DEV), 1e-6, backend="cuda", precision="exact").cpu()
    torch.testing.assert_close(near, y[:5], rtol=0, atol=2e-6)  # sigma -> 0: the nearest training point
    far = softmax_denoise(x.to(DEV), y.to(DEV), 1e7, backend="cuda", precision="exact").cpu()
    torch.testing.assert_close(far, y.double().mean(0).float().expand(5, 8), rtol=0, atol=2e-6)  # the mean
    xb, yb = make_problem(3, 20, 65)
    with pytest.raises(BackendUnavailableError, match="d <= 64"):
        softmax_denoise(xb.to(DEV), yb.to(DEV), 0.5, backend="cuda")
    assert dispatch.resolve("softmax_denoise", "auto", DEV, torch.float32, d=65)[0] != "cuda"


# -- GPU: knn --------------------------------------------------------------------------------------------------------


def _knn_both(x, y, k):
    got = knn(x.to(DEV), y.to(DEV), k, backend="cuda")
    ref = knn(x.to(DEV), y.to(DEV), k, backend="torch")
    return [t.cpu() for t in got], [t.cpu() for t in ref]


@gpu
@pytest.mark.parametrize("M", [1, 3, 97, 1025])
@pytest.mark.parametrize("N", [1, 3, 97, 1025])
@pytest.mark.parametrize("d", [1, 3, 17, 3072])
@pytest.mark.parametrize("k", [1, 10, 1024])
def test_knn_matches_reference(M, N, d, k):
    if k > N or (d == 3072 and M * N > 100_000):
        pytest.skip("k > N, or too large for the float64 brute-force check")
    x, y = make_problem(M, N, d, seed=M + N + d + k)
    (gd, gi), (rd, ri) = _knn_both(x, y, k)
    assert gd.dtype == torch.float32 and gi.dtype == torch.int64 and gd.shape == (M, k)
    assert bool(torch.isfinite(gd).all())
    assert torch.equal(gi, ri)
    # float64 re-rank summed in another order than the reference's: at most an fp32 rounding boundary apart
    torch.testing.assert_close(gd, rd, rtol=1.2e-7, atol=0)
    if M * N <= 20_000:
        assert_knn_matches(gd, gi, x, y, k, rtol=1e-6, atol=1e-7)


@gpu
@pytest.mark.parametrize("k", [1, 5, 40])
def test_knn_ties_go_to_the_smaller_index(k):
    g = torch.Generator().manual_seed(1)
    base = torch.randint(-3, 4, (50, 6), generator=g).float()
    y = base[torch.randint(0, 50, (2000,), generator=g)]  # many exact duplicates, integer distances: many ties
    x = torch.randint(-3, 4, (64, 6), generator=g).float()
    (gd, gi), (rd, ri) = _knn_both(x, y, k)
    assert torch.equal(gi, ri) and torch.equal(gd, rd)
    d_all = ((x[:, None, :].double() - y[None].double()) ** 2).sum(-1)
    order = torch.argsort(d_all, dim=1, stable=True)[:, :k]  # stable: equal distances by index
    assert torch.equal(gi, order)


@gpu
def test_knn_float64_and_chunked_streaming():
    from diffgen_fast.ops.knn.native_cuda import knn_cuda

    x, y = make_problem(97, 1025, 17, seed=4)
    ts = TrainingSet.from_tensor(y)
    whole = knn_cuda(x.to(DEV), ts, 10)
    for chunk in (1, 37, 1024):
        part = knn_cuda(x.to(DEV), ts, 10, chunk_size=chunk)
        assert torch.equal(part[0], whole[0]) and torch.equal(part[1], whole[1])
    (gd, gi), (rd, ri) = _knn_both(x.double(), y.double(), 10)
    assert gd.dtype == F64 and torch.equal(gi, ri)
    torch.testing.assert_close(gd, rd, rtol=1e-15, atol=0)


@gpu
def test_raw_select_kernel_against_sort():
    g = torch.Generator().manual_seed(2)
    x = torch.randint(-4, 5, (9, 5), generator=g).float().to(DEV)
    y = torch.randint(-4, 5, (3000, 5), generator=g).float().to(DEV)  # integer data: exact fp32 distances, ties
    for k in (1, 2, 31, 1000, 2048):
        vals, idx = _native_cuda.sqdist_topk(x, y, k)
        dist = ((x[:, None, :] - y[None]) ** 2).sum(-1)
        order = torch.argsort(dist, dim=1, stable=True)[:, :k]
        assert torch.equal(idx, order)
        assert torch.equal(vals, torch.gather(dist, 1, order))
    exact = _native_cuda.sqdist_pairs(x, y, idx)
    torch.testing.assert_close(exact, torch.gather(dist, 1, idx).double(), rtol=0, atol=0)


@gpu
def test_custom_ops_trace_under_torch_compile():
    x = torch.randn(16, 8, device=DEV)
    y = torch.randn(300, 8, device=DEV)

    def f(x, y):
        vals, idx = torch.ops.diffgen_fast.cuda_sqdist_topk(x, y, 5)
        return vals.sqrt(), idx

    compiled = torch.compile(f, fullgraph=True)
    (a, ia), (b, ib) = compiled(x, y), f(x, y)
    assert torch.equal(ia, ib)
    torch.testing.assert_close(a, b)
