"""The native CPU direct kernels (d <= 64, float32 data): the AVX-512 kernel (packed panels, float64 norm expansion
where it is certified, else float64 differences; row-layout O += W Y with sparse and dense tiles) and the generic
multiversioned kernel (DIFFGEN_FAST_CPU_KERNEL=generic) agree with the float64 brute force on awkward shapes, per-query
sigma and alpha, every sigma, small and large norms, with and without the output."""

import json
import os
import subprocess
import sys

import pytest
import torch

from diffgen_fast import _native
from diffgen_fast.ops import kde_log_density, softmax_denoise
from diffgen_fast.ops.merge import empty_softmax_state, finalize_softmax_state

pytestmark = pytest.mark.skipif(not _native.available(), reason="native extension not built")

SHAPES = [(1, 1, 1), (3, 31, 2), (9, 257, 5), (17, 300, 16), (8, 1000, 17), (33, 290, 31), (7, 513, 33),
          (40, 700, 48), (5, 4099, 64)]  # fmt: skip


def _problem(M, N, d, scale, seed):
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(N, d, generator=g) * 2 - 1) * scale
    x = (torch.rand(M, d, generator=g) * 2 - 1) * scale
    h = (M + 1) // 2
    x[::2] = y[torch.randint(0, N, (h,), generator=g)] + 0.01 * scale * torch.randn(h, d, generator=g)
    sigma = torch.logspace(-2.7, 4, M, dtype=torch.float64)[torch.randperm(M, generator=g)]
    alpha = 0.5 + torch.rand(M, generator=g, dtype=torch.float64)
    return x, y, sigma, alpha


@pytest.mark.parametrize("M,N,d", SHAPES, ids=[f"M{m}xN{n}xd{d}" for m, n, d in SHAPES])
@pytest.mark.parametrize("scale", [1.0, 60.0], ids=["unit", "big"])
@pytest.mark.parametrize("precision", ["auto", "fast"])
def test_direct_matches_float64(M, N, d, scale, precision):
    x, y, sigma, alpha = _problem(M, N, d, scale, seed=M + N + d)
    out = softmax_denoise(x, y, sigma, alpha=alpha, backend="cpu", precision=precision)
    ref = softmax_denoise(x.double(), y.double(), sigma, alpha=alpha, backend="torch", precision="exact")
    err = float((out.double() - ref).abs().max()) / float(y.abs().max())
    lse = kde_log_density(x, y, sigma, backend="cpu").double()
    lse_ref = kde_log_density(x.double(), y.double(), sigma, backend="torch")
    rel = float(((lse - lse_ref).abs() / lse_ref.abs().clamp_min(1.0)).max())
    if precision == "auto":
        assert err <= 2e-6 and rel <= 1e-6, (err, rel)
    else:  # fp32 differences: relative error (d + 2) u of each distance, large at small sigma and big norms
        big_z = float(((x.double() - alpha[:, None] * y.double()[:1]).square().sum(1) / sigma**2).max())
        assert rel <= 1e-6 * max(1.0, big_z) or err <= 1e-3, (err, rel)


def test_kernel_reports_its_variant():
    name = _native.direct_kernel()
    assert name in ("avx512 intrinsics", "avx512f", "avx2+fma", "baseline")
    assert _native.direct_reads_rows() == (name == "avx512 intrinsics")


def test_state_streams_over_chunks_like_one_call():
    # the kernel's state over two chunks, merged by the kernel itself, equals one call over the whole set
    x, y, sigma, alpha = _problem(21, 900, 40, 1.0, seed=3)
    c = 0.5 / sigma**2
    a = torch.empty_like(alpha).copy_(alpha)
    one = empty_softmax_state(21, 40, dtype=torch.float64)
    _native.denoise_direct(x, y.T.contiguous(), c, a, True, one, y)
    two = empty_softmax_state(21, 40, dtype=torch.float64)
    for part in (y[:333], y[333:]):
        _native.denoise_direct(x, part.T.contiguous(), c, a, True, two, part.contiguous())
    o1, l1, _, _ = finalize_softmax_state(one)
    o2, l2, _, _ = finalize_softmax_state(two)
    assert torch.allclose(o1, o2, rtol=1e-6, atol=1e-7) and torch.allclose(l1, l2, rtol=1e-6)


def _child(code, x, y, sigma, alpha, **env):
    """json.loads of what `code` prints in a child process with the extra environment `env` (the kernel switches are
    read once per process); x, y, sigma, alpha reach it as JSON on stdin."""
    payload = json.dumps({"x": x.tolist(), "y": y.tolist(), "s": sigma.tolist(), "a": alpha.tolist()})
    res = subprocess.run([sys.executable, "-c", code], input=payload, capture_output=True, text=True,
                         env=dict(os.environ, **env), check=True, timeout=300)  # fmt: skip
    return json.loads(res.stdout)


@pytest.mark.skipif(_native.direct_kernel() != "avx512 intrinsics", reason="the AVX-512 kernel does not run here")
def test_avx512_and_generic_kernels_agree():
    # the generic kernel in a child process (the variant is chosen once per process)
    x, y, sigma, alpha = _problem(19, 777, 37, 1.0, seed=5)
    code = (
        "import json, sys, torch\n"
        "from diffgen_fast.ops import softmax_denoise\n"
        "from diffgen_fast import _native\n"
        "a = json.loads(sys.stdin.read())\n"
        "x, y = torch.tensor(a['x']), torch.tensor(a['y'])\n"
        "s, al = torch.tensor(a['s'], dtype=torch.float64), torch.tensor(a['a'], dtype=torch.float64)\n"
        "print(json.dumps({'kernel': _native.direct_kernel(),\n"
        "                  'out': softmax_denoise(x, y, s, alpha=al, backend='cpu').tolist()}))\n"
    )
    got = _child(code, x, y, sigma, alpha, DIFFGEN_FAST_CPU_KERNEL="generic")
    assert got["kernel"] != "avx512 intrinsics"
    generic = torch.tensor(got["out"], dtype=torch.float32)
    ours = softmax_denoise(x, y, sigma, alpha=alpha, backend="cpu")
    assert float((generic - ours).abs().max()) <= 4e-6


@pytest.mark.skipif(_native.direct_kernel() != "avx512 intrinsics", reason="the AVX-512 kernel does not run here")
@pytest.mark.parametrize("d", [1, 2, 7, 33, 64])
def test_small_sigma_screen_matches_the_full_float64_tiles(d):
    # the screen (fp32 expansion, float64 only for the candidates within TAIL_NATS) against the same kernel with the
    # screen off (DIFFGEN_FAST_CPU_SCREEN=0, in a child process: the switch is read once) and the float64 brute
    # force; sigma from 1e-3 to 10 per query, so tiles switch between the screen and the full tiles, alpha != 1,
    # near-duplicate training points (many candidates within the window), kde and the denoised output
    g = torch.Generator().manual_seed(d)
    y = torch.rand(3000, d, generator=g) * 2 - 1
    y[1000:1200] = y[:200] + 1e-4 * torch.randn(200, d, generator=g)
    x = y[torch.randint(0, 3000, (29,), generator=g)] + 0.003 * torch.randn(29, d, generator=g)
    sigma = torch.logspace(-3, 1, 29, dtype=torch.float64)[torch.randperm(29, generator=g)]
    alpha = 0.7 + 0.6 * torch.rand(29, generator=g, dtype=torch.float64)
    code = (
        "import json, sys, torch\n"
        "from diffgen_fast.ops import kde_log_density, softmax_denoise\n"
        "a = json.loads(sys.stdin.read())\n"
        "x, y = torch.tensor(a['x']), torch.tensor(a['y'])\n"
        "s, al = torch.tensor(a['s'], dtype=torch.float64), torch.tensor(a['a'], dtype=torch.float64)\n"
        "print(json.dumps({'out': softmax_denoise(x, y, s, alpha=al, backend='cpu').tolist(),\n"
        "                  'lse': kde_log_density(x, y, s, backend='cpu').tolist()}))\n"
    )
    full = _child(code, x, y, sigma, alpha, DIFFGEN_FAST_CPU_SCREEN="0")
    out = softmax_denoise(x, y, sigma, alpha=alpha, backend="cpu")
    lse = kde_log_density(x, y, sigma, backend="cpu")
    ref = softmax_denoise(x.double(), y.double(), sigma, alpha=alpha, backend="torch", precision="exact")
    lse_ref = kde_log_density(x.double(), y.double(), sigma, backend="torch")
    for got, got_lse in ((out, lse), (torch.tensor(full["out"]), torch.tensor(full["lse"]))):
        assert float((got.double() - ref).abs().max()) <= 2e-6
        assert float(((got_lse.double() - lse_ref).abs() / lse_ref.abs().clamp_min(1.0)).max()) <= 1e-6
    assert float((out - torch.tensor(full["out"])).abs().max()) <= 4e-6


@pytest.mark.parametrize("scale", [1e-25, 1.0, 1e14, 1.8e19])
def test_small_sigma_screen_at_extreme_magnitudes(scale):
    # the screen runs only where its fp32 bound holds ((|x| + alpha max|y|)^2 in [2^-60, 2^100]); beyond, the
    # float64 tiles. Points along one direction at 1.1% to 50% of |x| from it, and the nearest (1%) with alpha > 1
    # and a norm whose square overflows fp32 at the largest scale: the screen must never drop it. sigma puts the
    # nearest two ~2 nats apart and ~3% of the points within the 50-nat window (the screen runs where allowed)
    g = torch.Generator().manual_seed(7)
    u = torch.randn(16, generator=g)
    x = u / u.norm() * scale
    t = -0.011 - 0.489 * torch.rand(3000, generator=g)
    y = x[None] * (1 + t[:, None])
    y[1500] = x * 1.01
    X = (1.5 * x)[None].repeat(8, 1)
    alpha = torch.full((8,), 1.5, dtype=torch.float64)
    sigma = torch.full((8,), 3.4e-3 * scale, dtype=torch.float64)
    out = softmax_denoise(X, y, sigma, alpha=alpha, backend="cpu")
    ref = softmax_denoise(X.double(), y.double(), sigma, alpha=alpha, backend="torch", precision="exact")
    assert float((out.double() - ref).abs().max()) <= 2e-6 * scale
