"""What is particular to the native CPU backend ("cpu") of softmax_denoise: "fast" mode, chunking, thread counts and
non-contiguous inputs, the direct kernel's split over N, the raw kernels' argument checks, dispatch and the custom
op. The accuracy cases it shares with every backend (shapes, sigmas, limits, per-query sigma and alpha, stats,
kde_log_density) are in tests/ops/."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from diffgen_fast import TrainingSet, _native, softmax_denoise
from diffgen_fast.errors import BackendUnavailableError, InputError
from diffgen_fast.ops import dispatch
from diffgen_fast.ops.merge import empty_softmax_state
from diffgen_fast.ops.softmax_denoise import native
from diffgen_fast.ops.softmax_denoise.naive import softmax_denoise_naive
from tests.helpers import make_problem

pytestmark = pytest.mark.skipif(not _native.available(), reason=f"no native extension: {_native.unavailable_reason()}")

def _errs(out, lse, ref, ref_lse):
    e_out = float((out.double() - ref).abs().max())
    e_lse = float(((lse.double() - ref_lse) / ref_lse.abs().clamp(min=1.0)).abs().max())
    return e_out, e_lse


@pytest.mark.parametrize("M,N,d", [(5, 300, 3), (13, 97, 64), (4, 333, 65)])
@pytest.mark.parametrize("sigma", [1.0, 80.0])
def test_fast_mode_close(M, N, d, sigma):
    x, y = make_problem(M, N, d, seed=3, sigma=sigma)
    out, lse = softmax_denoise(x, y, sigma, return_lse=True, backend="cpu", precision="fast")
    ref, ref_lse = softmax_denoise_naive(x, y, sigma)
    e_out, e_lse = _errs(out, lse, ref, ref_lse)
    assert e_out <= 1e-4 and e_lse <= 1e-5, (e_out, e_lse)


@pytest.mark.parametrize("d", [3, 64, 100])
def test_chunking_threads_and_noncontiguous_give_the_same_result(d):
    x, y = make_problem(37, 1500, d, seed=5, sigma=0.5)
    ts = TrainingSet.from_tensor(y)
    s = torch.full((37,), 0.5, dtype=torch.float64)
    a = torch.ones(37, dtype=torch.float64)
    whole = native.softmax_denoise_cpu(x, ts, s, a, precision="exact")
    parts = native.softmax_denoise_cpu(x, ts, s, a, precision="exact", chunk_size=257)
    torch.testing.assert_close(parts.denoised, whole.denoised, atol=2e-6, rtol=0)
    torch.testing.assert_close(parts.lse, whole.lse, atol=0, rtol=1e-6)
    before = _native.get_num_threads()
    try:
        _native.set_num_threads(1)
        one = native.softmax_denoise_cpu(x, ts, s, a, precision="exact")
        _native.set_num_threads(2)
        two = native.softmax_denoise_cpu(x, ts, s, a, precision="exact")
    finally:
        _native.set_num_threads(before)
    assert torch.equal(one.denoised, two.denoised) and torch.equal(one.lse, two.lse)  # bitwise
    xt = torch.empty(d, 37).copy_(x.T).T  # non-contiguous view of the same values
    assert not xt.is_contiguous()
    nc = softmax_denoise(xt, y, 0.5, backend="cpu", precision="exact")
    torch.testing.assert_close(nc, whole.denoised, atol=2e-6, rtol=0)


def test_direct_kernel_splits_over_n_for_few_queries():
    # few queries: the training points are split over threads and the partial states merged
    x, y = make_problem(1, 5000, 2, seed=1, sigma=0.3)
    out, lse = softmax_denoise(x, y, 0.3, return_lse=True, backend="cpu")
    ref, ref_lse = softmax_denoise_naive(x, y, 0.3)
    e_out, e_lse = _errs(out, lse, ref, ref_lse)
    assert e_out <= 2e-5 and e_lse <= 1e-6


def test_bad_input_to_the_raw_kernels():
    x = torch.zeros(2, 3)
    state = empty_softmax_state(2, 3, dtype=torch.float64)
    c = torch.ones(2, dtype=torch.float64)
    with pytest.raises(InputError, match="yT"):
        _native.denoise_direct(x, torch.zeros(4, 5), c, c, True, state)
    with pytest.raises(TypeError, match="yT has dtype"):
        _native.denoise_direct(x, torch.zeros(3, 5, dtype=torch.float64), c, c, True, state)
    with pytest.raises(InputError, match="c must have 2"):
        _native.denoise_direct(x, torch.zeros(3, 5), torch.ones(3, dtype=torch.float64), c, True, state)
    with pytest.raises(InputError, match="state.o"):
        _native.denoise_direct(x, torch.zeros(3, 5), c, c, True, empty_softmax_state(2, 4, dtype=torch.float64))
    C = _native._require()
    with pytest.raises(ValueError, match="x is a null pointer"):
        C.denoise_direct(0, 8, 1, 1, 1, 8, 8, True, 8, 8, 8, 0, "float32")
    with pytest.raises(ValueError, match="dtype"):
        C.denoise_direct(8, 8, 1, 1, 1, 8, 8, True, 8, 8, 8, 0, "float16")
    with pytest.raises(ValueError, match="ldS must be >= n"):
        C.denoise_epilogue(8, 1, 4, 2, 8, 8, 8, 8, 8, 0, 0, 0, "float32")


def test_dispatch_and_errors():
    assert dispatch.resolve("softmax_denoise", "auto", torch.device("cpu"), torch.float32)[0] == "cpu"
    with pytest.raises(BackendUnavailableError, match="CPU tensors"):
        native.softmax_denoise_cpu(
            torch.zeros(1, 2, device="meta"), TrainingSet.from_tensor(torch.zeros(3, 2)), torch.ones(1), torch.ones(1)
        )


def test_custom_op_traces_with_torch_compile_shapes():
    x, y = make_problem(4, 50, 3, seed=0, sigma=0.2)
    s = torch.full((4,), 0.2, dtype=torch.float64)
    a = torch.ones(4, dtype=torch.float64)
    import diffgen_fast.ops.softmax_denoise.native  # noqa: F401  (registers the op)
    from diffgen_fast.ops.merge import SoftmaxState, finalize_softmax_state

    m, l, q, o = torch.ops.diffgen_fast.softmax_partial_cpu(x, y, s, a, "exact", True)
    out, lse, _, _ = finalize_softmax_state(SoftmaxState(m, l, q, o))
    ref, ref_lse = softmax_denoise_naive(x, y, 0.2)
    assert float((out.double() - ref).abs().max()) <= 2e-5
    torch.testing.assert_close(lse, ref_lse, atol=0, rtol=1e-6)
    for need_out in (True, False):
        torch.library.opcheck(torch.ops.diffgen_fast.softmax_partial_cpu, (x, y, s, a, "exact", need_out))


def test_package_works_without_the_extension():
    code = (
        "import torch; from diffgen_fast import softmax_denoise; from diffgen_fast.ops import dispatch;"
        "print(dispatch.resolve('softmax_denoise', 'auto', torch.device('cpu'), torch.float32)[0]);"
        "print(float(softmax_denoise(torch.zeros(1, 2), torch.ones(3, 2), 1.0)[0, 0]))"
    )
    env = {**os.environ, "DIFFGEN_FAST_DISABLE_EXT": "1"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert res.stdout.split() == ["torch", "1.0"]
