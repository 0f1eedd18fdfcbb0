"""What is particular to the Triton backend: in the interpreter here (TRITON_INTERPRET=1, set by conftest.py),
compiled on a GPU (the same tests, plus the gpu-marked ones). Its precision modes ("fast", "auto" per error model,
"mixed"), split / chunked / fused paths, streaming, dispatch and the interpreter's message; the accuracy cases it
shares with every backend are in tests/ops/."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from diffgen_fast import TrainingSet, softmax_denoise
from diffgen_fast.errors import BackendUnavailableError
from diffgen_fast.ops import dispatch
from diffgen_fast.ops.softmax_denoise.naive import softmax_denoise_naive
from tests.helpers import make_problem

tri = pytest.importorskip("diffgen_fast.ops.softmax_denoise.triton")
if tri.probe(torch.device("cuda" if torch.cuda.is_available() else "cpu")) is not None:
    pytest.skip(f"triton backend cannot run here: {tri.probe(None)}", allow_module_level=True)

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# exact: fp32-accurate. Low-precision data is compared with the brute force on the same (rounded) data; the
# output is rounded to the data's dtype, hence the dtype's epsilon.
EXACT_TOL = {
    torch.float32: dict(out=2e-5, lse=1e-6),
    torch.float16: dict(out=2e-3, lse=1e-6),
    torch.bfloat16: dict(out=1.6e-2, lse=1e-6),
}


def _run(x, y, sigma, alpha=1.0, **kw):
    return softmax_denoise(x.to(DEV), y.to(DEV), sigma, alpha, return_lse=True, backend="triton", **kw)


def _err(out, lse, ref, ref_lse):
    e_out = float((out.cpu().double() - ref).abs().max())
    e_lse = float(((lse.cpu().double() - ref_lse) / ref_lse.abs().clamp(min=1.0)).abs().max())
    return e_out, e_lse


@pytest.mark.parametrize("M,N,d", [(3, 97, 3), (59, 97, 59), pytest.param(2, 59, 3072, marks=pytest.mark.slow)])
@pytest.mark.parametrize("sigma", [1.0, 80.0])
def test_fast_error_is_bf16_level(M, N, d, sigma):
    """fast: bf16 products; the denoised error is the bf16 rounding of the data (~4e-3 at values in [-1, 1])."""
    x, y = make_problem(M, N, d, seed=7, sigma=sigma)
    out, lse = _run(x, y, sigma, precision="fast")
    ref, ref_lse = softmax_denoise_naive(x, y, sigma)
    e_out, e_lse = _err(out, lse, ref, ref_lse)
    assert e_out <= 3e-2 and e_lse <= 1e-2, (e_out, e_lse)


def test_auto_picks_per_error_model(monkeypatch):
    picked = []
    real = tri._two_pass_chunk

    def spy(*args):
        picked.append(args[12])  # precision
        return real(*args)

    monkeypatch.setattr(tri, "_two_pass_chunk", spy)
    x, y = make_problem(4, 60, 300, seed=2, sigma=0.01)
    _run(x, y, 0.01, precision="auto")  # small sigma: the bf16 bound is far too loose -> exact
    assert picked == ["exact"]
    picked.clear()
    x, y = make_problem(4, 60, 300, seed=2, near=0.0)
    y = y.bfloat16()  # bf16 data: products exact in fp32; at sigma = 80 the certified error is tiny -> fast
    out, lse = _run(x.bfloat16(), y, 80.0, precision="auto")
    assert picked == ["fast"]
    ref, ref_lse = softmax_denoise_naive(x.bfloat16(), y, 80.0)
    e_out, e_lse = _err(out, lse, ref, ref_lse)
    assert e_out <= 1.6e-2 and e_lse <= tri.AUTO_TOL


def _rel(out, ref):
    return float(((out.cpu().double() - ref).norm(dim=1) / ref.norm(dim=1)).max())


@pytest.mark.parametrize("M,N,d", [(4, 300, 64), (3, 97, 300)])
@pytest.mark.parametrize("sigma", [0.002, 0.05, 1.0, 80.0, 1e4])
def test_auto_fp32_inputs_give_fp32_accurate_outputs(M, N, d, sigma):
    """fp32 data, default precision: fp32-accurate at every sigma, including the near-uniform average at sigma = 1e4
    (where bf16 weights gave ~7e-3 relative error: "auto" certified the logits only)."""
    x, y = make_problem(M, N, d, seed=3, sigma=sigma, near=0.0)
    out = softmax_denoise(x.to(DEV), y.to(DEV), sigma, backend="triton")
    assert out.dtype == torch.float32
    ref, _ = softmax_denoise_naive(x.double(), y.double(), sigma)
    assert _rel(out, ref) <= 1e-4, _rel(out, ref)


@pytest.mark.slow  # d = 3072 in the interpreter, ~45 s
def test_auto_fp32_large_sigma_image_scale(monkeypatch):
    """The issue's case: 500 points, d = 3072, sigma = 1e4 -> bf16-product scores, fp32 weights ("mixed")."""
    picked = []
    real = tri._two_pass_chunk

    def spy(*args):
        picked.append(args[12])
        return real(*args)

    monkeypatch.setattr(tri, "_two_pass_chunk", spy)
    x, y = make_problem(2, 500, 3072, seed=5, near=0.0)
    out = softmax_denoise(x.to(DEV), y.to(DEV), 1e4, backend="triton")
    assert picked == ["mixed"]
    ref, _ = softmax_denoise_naive(x.double(), y.double(), 1e4)
    assert _rel(out, ref) <= 1e-4, _rel(out, ref)
    fast = softmax_denoise(x.to(DEV), y.to(DEV), 1e4, backend="triton", precision="fast")
    assert _rel(fast, ref) <= 3e-2  # "fast" stays bf16


@pytest.mark.parametrize("precision", ["fast", "exact"])
def test_split_chunking_and_fused_paths_agree(precision):
    x, y = make_problem(21, 203, 24, seed=11, sigma=0.3)
    ts = TrainingSet.from_tensor(y.to(DEV))
    s = torch.full((21,), 0.3, dtype=torch.float64, device=DEV)
    a = torch.ones(21, dtype=torch.float64, device=DEV)
    base = tri.softmax_denoise_triton(x.to(DEV), ts, s, a, precision=precision, splits=1, fused=False)
    variants = [
        dict(splits=3, fused=False),
        dict(splits=1, fused=False, chunk_size=37),
        dict(splits=2, fused=False, chunk_size=100),
        dict(splits=1, fused=True),
        dict(splits=4, fused=True, chunk_size=64),
    ]
    tol = 1e-5 if precision == "exact" else 2e-2
    for kw in variants:
        r = tri.softmax_denoise_triton(x.to(DEV), ts, s, a, precision=precision, **kw)
        torch.testing.assert_close(r.denoised, base.denoised, rtol=tol, atol=tol, msg=str(kw))
        torch.testing.assert_close(r.lse, base.lse, rtol=1e-5, atol=tol, msg=str(kw))
        torch.testing.assert_close(r.n_eff, base.n_eff, rtol=1e-3 if precision == "exact" else 5e-2, atol=1e-3)


def test_streams_a_cpu_training_set_in_chunks(tmp_path, monkeypatch):
    x, y = make_problem(5, 150, 10, seed=1)
    np.save(tmp_path / "y.npy", y.numpy())
    ts = TrainingSet.from_npy(tmp_path / "y.npy")
    monkeypatch.setattr(tri, "_BUF_ELEMS", 5 * 40)  # chunks of 40 points
    out, lse = softmax_denoise(x.to(DEV), ts, 0.5, return_lse=True, backend="triton", precision="exact")
    ref, ref_lse = softmax_denoise_naive(x, y, 0.5)
    e_out, e_lse = _err(out, lse, ref, ref_lse)
    assert e_out <= 2e-5 and e_lse <= 1e-6


def test_dispatch_rules():
    assert dispatch.resolve("softmax_denoise", "auto", torch.device("cuda"), torch.float32)[0] == "triton"
    assert dispatch.resolve("softmax_denoise", "auto", torch.device("cuda"), torch.float64)[0] == "torch"
    from diffgen_fast import _native

    on_cpu = "cpu" if _native.available() else "torch"  # the native CPU kernels win there (benchmarks/bench_cpu.py)
    assert dispatch.resolve("softmax_denoise", "auto", torch.device("cpu"), torch.float32)[0] == on_cpu
    row = [r for r in dispatch.backend_table(torch.device(DEV)) if r["backend"] == "triton"][0]
    assert row["available"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-without-interpreter message")
def test_cpu_tensors_need_the_interpreter():
    code = (
        "import torch, diffgen_fast as dg\n"
        "try:\n"
        "    dg.softmax_denoise(torch.randn(2, 3), torch.randn(4, 3), 1.0, backend='triton')\n"
        "except dg.BackendUnavailableError as e:\n"
        "    print('ERR', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "ERR" in out.stdout and "needs CUDA tensors" in out.stdout and "TRITON_INTERPRET=1" in out.stdout


def test_unavailable_error_type():
    assert issubclass(BackendUnavailableError, RuntimeError)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sigma", [0.002, 0.5, 80.0])
def test_gpu_image_scale(dtype, sigma):
    x, y = make_problem(130, 3000, 3072, seed=5, sigma=sigma)
    x, y = x.to(dtype), y.to(dtype)
    out, lse = _run(x, y, sigma, precision="exact")
    ref, ref_lse = softmax_denoise_naive(x, y, sigma)
    e_out, e_lse = _err(out, lse, ref, ref_lse)
    assert e_out <= EXACT_TOL[dtype]["out"] and e_lse <= EXACT_TOL[dtype]["lse"], (e_out, e_lse)
