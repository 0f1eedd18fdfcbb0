"""The native CPU backend's default precision ("auto") and kde_log_density are fp32-accurate against float64 at
every sigma, on data in [-1, 1] and on data with large norms (|x| ~ 100), on the direct (d <= 64) and GEMM paths."""

import pytest
import torch

from diffgen_fast import _native
from diffgen_fast.ops import kde_log_density, softmax_denoise

pytestmark = pytest.mark.skipif(not _native.available(), reason="native extension not built")


def _data(M, N, d, scale, sigma, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(N, d, generator=g) * 2 - 1) * scale
    x = (torch.rand(M, d, generator=g) * 2 - 1) * scale
    h = M // 2 + M % 2
    x[::2] = y[torch.randint(0, N, (h,), generator=g)] + sigma * torch.randn(h, d, generator=g)
    return x, y


@pytest.mark.parametrize("d", [2, 64, 3072])
@pytest.mark.parametrize("sigma", [0.002, 0.05, 1.0, 80.0, 1e4])
@pytest.mark.parametrize("scale", [1.0, "big"])
def test_auto_fp32_accurate(d, sigma, scale):
    # "big": |x| ~ 100 whatever d
    s = 100.0 / (d / 3) ** 0.5 if scale == "big" else scale
    x, y = _data(12, 600, d, s, sigma)
    out = softmax_denoise(x, y, sigma, backend="cpu")
    ref = softmax_denoise(x.double(), y.double(), sigma, backend="torch", precision="exact")
    assert out.dtype == torch.float32
    span = float(y.abs().max())
    err = float((out.double() - ref).abs().max()) / span
    assert err <= 2e-6, err
    lse = kde_log_density(x, y, sigma, backend="cpu").double()
    lse_ref = kde_log_density(x.double(), y.double(), sigma, backend="torch")
    rel = float(((lse - lse_ref).abs() / lse_ref.abs().clamp_min(1.0)).max())
    assert rel <= 1e-6, rel
