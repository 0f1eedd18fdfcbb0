"""The bf16 screen of the native kNN (float32 data, d > 32, CPUs with AVX512-BF16): the first pass runs on
bf16-rounded coordinates under a certified error bound and the candidates are re-ranked in float64, so the result
must stay the exact top-k, on inputs where bf16 rounding alone would get the order wrong: near-ties below bf16's
resolution, duplicates, a large common offset, mixed scales, subnormals, odd d (a padded coordinate pair) and large
k. Where the CPU has no AVX512-BF16 the same cases run the fp32 panels (and must pass as well)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from diffgen_fast import _native
from tests.helpers import assert_knn_matches

pytestmark = pytest.mark.skipif(not _native.available(), reason="native extension not built")


def _case(name, seed=0):
    g = torch.Generator().manual_seed(seed)
    if name == "near_ties":  # neighbours that differ below bf16's 8 bits: the screen alone cannot order them
        d, n = 64, 3000
        y = torch.rand(n, d, generator=g) * 2 - 1
        base = y[:20].clone()
        y[20:420] = base.repeat(20, 1) * (1 + 1e-4 * torch.randn(400, d, generator=g))
        x = base + 1e-5 * torch.randn(20, d, generator=g)
        return x, y, 5
    if name == "duplicates":
        d = 65
        y = torch.rand(500, d, generator=g)
        y = torch.cat([y, y[:100], y[:100]])
        return y[:40] + 0.0, y, 3
    if name == "offset":  # a large common offset: the norm expansion cancels ~7 digits
        d = 96
        y = 1000.0 + torch.rand(4000, d, generator=g)
        x = y[torch.randint(0, 4000, (30,), generator=g)] + 1e-3 * torch.randn(30, d, generator=g)
        return x, y, 2
    if name == "scales":
        d = 40
        y = torch.randn(2000, d, generator=g) * torch.logspace(-3, 3, 2000)[:, None]
        x = torch.randn(25, d, generator=g) * 10
        return x, y, 7
    if name == "subnormal":
        d = 34
        y = torch.randn(1000, d, generator=g) * 1e-39
        x = torch.randn(10, d, generator=g) * 1e-39
        return x, y, 4
    if name == "odd_d":
        d = 33
        y = torch.rand(2500, d, generator=g)
        x = y[:30] + 0.01 * torch.randn(30, d, generator=g)
        return x, y, 2
    if name == "large_k":
        d = 128
        y = torch.rand(3000, d, generator=g)
        return torch.rand(9, d, generator=g), y, 200
    raise ValueError(name)


CASES = ["near_ties", "duplicates", "offset", "scales", "subnormal", "odd_d", "large_k"]


@pytest.mark.parametrize("name", CASES)
def test_bf16_screen_gives_the_exact_top_k(name):
    x, y, k = _case(name)
    d2, idx = _native.knn_topk(x, y, k)
    assert_knn_matches(d2, idx, x, y, k, rtol=1e-12, atol=1e-300)


def test_the_screen_is_reported_and_matches_the_fp32_panels_bit_for_bit():
    name = _native.knn_kernel()
    assert name in ("bf16 screen (avx512bf16)", "fp32 panels")
    code = (
        "import json, torch; from diffgen_fast import _native; from tests.test_knn_bf16 import _case, CASES\n"
        "out = {}\n"
        "for c in CASES:\n"
        "    x, y, k = _case(c)\n"
        "    d2, idx = _native.knn_topk(x, y, k)\n"
        "    out[c] = [d2.tolist(), idx.tolist()]\n"
        "print(json.dumps({'kernel': _native.knn_kernel(), 'out': out}))\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    runs = {}
    for mode in ("", "generic"):
        env = dict(os.environ, PYTHONPATH=root)
        env.pop("DIFFGEN_FAST_CPU_KERNEL", None)
        if mode:
            env["DIFFGEN_FAST_CPU_KERNEL"] = mode
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root,
                             timeout=300)  # fmt: skip
        assert res.returncode == 0, res.stderr
        runs[mode] = json.loads(res.stdout.strip().splitlines()[-1])
    assert runs["generic"]["kernel"] == "fp32 panels"
    assert runs[""]["kernel"] == name
    assert runs[""]["out"] == runs["generic"]["out"]  # both exact, ties by index: the same result
