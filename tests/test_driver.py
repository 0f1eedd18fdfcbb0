"""The backend contract: partial states, the one driver, the single-sourced refinement, custom ops, torch.compile."""

from __future__ import annotations

import ast
import importlib
import pathlib

import pytest
import torch

import diffgen_fast
from diffgen_fast import TrainingSet, kde_log_density, softmax_denoise
from diffgen_fast.ops import driver, refine
from diffgen_fast.ops.merge import finalize_softmax_state, merge_softmax_states, merge_topk
from tests.helpers import make_problem


def _available(name: str) -> bool:
    from diffgen_fast.ops import dispatch

    return dispatch._reason("softmax_denoise", name, torch.device("cpu")) is None


SOFTMAX_BACKENDS = [b for b in ("torch", "cpu", "triton") if _available(b)]
KNN_BACKENDS = [b for b in ("torch", "cpu") if b == "torch" or _available(b)]


def _splits(n: int, parts: int, gen: torch.Generator) -> list[int]:
    cuts = sorted(torch.randperm(n - 1, generator=gen)[: parts - 1].add(1).tolist())
    return [0, *cuts, n]


@pytest.mark.parametrize("backend", SOFTMAX_BACKENDS)
@pytest.mark.parametrize("precision", ["exact", "fast", "auto"])
@pytest.mark.parametrize("sigma", [0.01, 0.5])
def test_partial_states_merge_to_the_unchunked_result(backend, precision, sigma):
    """Every backend's partial states over random chunk splits merge to the state of one call over all points."""
    x, y = make_problem(9, 173, 12, seed=5, sigma=sigma)
    M = x.shape[0]
    s = torch.rand(M, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * sigma + sigma
    a = torch.full((M,), 0.9, dtype=torch.float64)
    whole = driver.partial(backend, x, y, s, a, precision, True)
    ref = finalize_softmax_state(whole)
    gen = torch.Generator().manual_seed(3)
    for parts in (2, 3, 7):
        cuts = _splits(y.shape[0], parts, gen)
        state = None
        for c0, c1 in zip(cuts[:-1], cuts[1:]):
            st = driver.partial(backend, x, y[c0:c1], s, a, precision, True)
            state = st if state is None else merge_softmax_states(state, st)
        got = finalize_softmax_state(state)
        tol = dict(rtol=1e-5, atol=1e-5) if precision != "fast" else dict(rtol=5e-3, atol=5e-3)
        torch.testing.assert_close(got[0].double(), ref[0].double(), **tol)
        for g, r in zip(got[1:], ref[1:]):
            torch.testing.assert_close(g, r, **tol)
    # and the driver over a TrainingSet with a small chunk size gives the same
    res = driver.denoise(backend, x, TrainingSet.from_tensor(y), s, a, precision=precision, chunk_size=40)
    torch.testing.assert_close(res.denoised.double(), ref[0].double(), **tol)


@pytest.mark.parametrize("backend", KNN_BACKENDS)
def test_topk_partials_merge_to_the_unchunked_result(backend):
    x, y = make_problem(11, 211, 7, seed=8, sigma=0.3)
    y[50] = y[10]  # a tie: the smaller index wins in every split
    k = 6
    whole_d, whole_i = driver.partial_topk(backend, x, y, k, 0)
    gen = torch.Generator().manual_seed(4)
    for parts in (2, 5):
        cuts = _splits(y.shape[0], parts, gen)
        bd = torch.empty(x.shape[0], 0, dtype=torch.float64)
        bi = torch.empty(x.shape[0], 0, dtype=torch.int64)
        for c0, c1 in zip(cuts[:-1], cuts[1:]):
            dk, ik = driver.partial_topk(backend, x, y[c0:c1], min(k, c1 - c0), c0)
            bd, bi = merge_topk(bd, bi, dk, ik, k)
        assert torch.equal(bi, whole_i)
        torch.testing.assert_close(bd, whole_d, rtol=0, atol=0)
    d2, idx = driver.topk_state(backend, x, TrainingSet.from_tensor(y), k, chunk_size=30)
    assert torch.equal(idx, whole_i)


def test_refinement_constants_are_single_sourced():
    """TAIL_NATS, N_REFINE and REFINE_TOL are assigned only in ops/refine.py; every backend uses those objects."""
    names = {"TAIL_NATS", "N_REFINE", "REFINE_TOL", "REFINE_TOL_F64"}
    root = pathlib.Path(diffgen_fast.__file__).parent
    for path in root.rglob("*.py"):
        if path.name == "refine.py" and path.parent.name == "ops":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            for t in targets:
                assert not (isinstance(t, ast.Name) and t.id in names), f"{path}: assigns {t.id}"
    mods = ["reference", "native", "triton"]
    for m in mods:
        mod = importlib.import_module(f"diffgen_fast.ops.softmax_denoise.{m}")
        assert mod.TAIL_NATS is refine.TAIL_NATS and mod.N_REFINE is refine.N_REFINE, m
    assert refine.TAIL_NATS == 50.0 and refine.N_REFINE == 256


def test_every_backend_runs_under_the_one_driver():
    for name in SOFTMAX_BACKENDS:
        be = driver.softmax_backend(name)
        assert be.op is not None and be.name == name
        assert getattr(torch.ops.diffgen_fast, f"softmax_partial_{name}") is not None
    for name in KNN_BACKENDS:
        assert driver.topk_backend(name).op is not None


@pytest.mark.parametrize("need_out", [True, False])
@pytest.mark.parametrize("precision", ["exact", "fast"])
def test_partial_custom_ops_pass_opcheck(need_out, precision):
    x, y = make_problem(4, 50, 3, seed=0, sigma=0.2)
    s = torch.full((4,), 0.2, dtype=torch.float64)
    a = torch.ones(4, dtype=torch.float64)
    for name in [b for b in SOFTMAX_BACKENDS if b != "triton"]:
        driver.softmax_backend(name)
        op = getattr(torch.ops.diffgen_fast, f"softmax_partial_{name}")
        torch.library.opcheck(op, (x, y, s, a, precision, need_out))
    driver.topk_backend("torch")
    torch.library.opcheck(torch.ops.diffgen_fast.knn_partial_torch, (x, y, 3, 5))


@pytest.mark.parametrize("backend", ["auto", "torch", "cpu"])
def test_fullgraph_compile_of_the_public_op_equals_eager(backend):
    """torch.compile(fullgraph=True) over the public softmax_denoise: no data-dependent guard, the eager result."""
    if backend != "auto" and backend not in SOFTMAX_BACKENDS:
        pytest.skip(f"{backend} unavailable")
    torch._dynamo.reset()
    x, Y = make_problem(6, 240, 5, seed=2, sigma=0.5)
    f = torch.compile(lambda x: softmax_denoise(x, Y, 0.5, backend=backend), backend="eager", fullgraph=True)
    torch.testing.assert_close(f(x), softmax_denoise(x, Y, 0.5, backend=backend), rtol=0, atol=0)
    g = torch.compile(
        lambda x: softmax_denoise(x, Y, 0.5, backend=backend, return_stats=True), backend="eager", fullgraph=True
    )
    for got, ref in zip(g(x), softmax_denoise(x, Y, 0.5, backend=backend, return_stats=True)):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    h = torch.compile(lambda x: kde_log_density(x, Y, 0.3, backend=backend), backend="eager", fullgraph=True)
    torch.testing.assert_close(h(x), kde_log_density(x, Y, 0.3, backend=backend), rtol=0, atol=0)


def test_fullgraph_compile_with_a_training_set_and_per_query_sigma():
    torch._dynamo.reset()
    x, Y = make_problem(6, 240, 5, seed=3, sigma=0.2)
    ts = TrainingSet.from_tensor(Y)
    s = torch.linspace(0.05, 2.0, 6)
    f = torch.compile(lambda x, s: softmax_denoise(x, ts, s, 0.9), backend="eager", fullgraph=True)
    torch.testing.assert_close(f(x, s), softmax_denoise(x, ts, s, 0.9), rtol=0, atol=0)


def test_the_overflow_guard_still_runs_under_compile():
    """Rows a backend cannot compute are recomputed in float64 by the guard op inside the compiled graph."""
    torch._dynamo.reset()
    x = torch.tensor([[3e19, 0.0], [0.1, 0.2]], dtype=torch.float32)
    Y = torch.tensor([[3e19, 1.0], [0.0, 0.0], [1.0, 1.0]], dtype=torch.float32)
    eager = softmax_denoise(x, Y, 1.0, backend="torch")
    f = torch.compile(lambda x: softmax_denoise(x, Y, 1.0, backend="torch"), backend="eager", fullgraph=True)
    got = f(x)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, eager)


def _inductor_unavailable():
    """None when inductor compiles and runs a trivial graph on this machine (it needs a C++ compiler), else why not."""
    try:
        torch._dynamo.reset()
        f = torch.compile(lambda t: t * 2 + 1, fullgraph=True)
        ok = torch.equal(f(torch.arange(4.0)), torch.arange(4.0) * 2 + 1)
        return None if ok else "inductor's trivial graph gave a wrong result"
    except Exception as e:  # pragma: no cover - depends on the machine (no C++ compiler, ...)
        return f"inductor cannot compile here ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_fullgraph_inductor_compile_equals_eager(backend):
    """torch.compile with the default backend (inductor: it compiles the driver's merges and finalisation into C++
    kernels around each backend's opaque partial op) equals eager, for softmax_denoise, its stats and
    kde_log_density."""
    if backend not in SOFTMAX_BACKENDS:
        pytest.skip(f"{backend} unavailable")
    why = _inductor_unavailable()
    if why is not None:
        pytest.skip(why)
    torch._dynamo.reset()
    x, Y = make_problem(6, 240, 5, seed=2, sigma=0.5)
    f = torch.compile(lambda x: softmax_denoise(x, Y, 0.5, backend=backend), fullgraph=True)
    torch.testing.assert_close(f(x), softmax_denoise(x, Y, 0.5, backend=backend), rtol=0, atol=0)
    g = torch.compile(lambda x: softmax_denoise(x, Y, 0.5, backend=backend, return_stats=True), fullgraph=True)
    for got, ref in zip(g(x), softmax_denoise(x, Y, 0.5, backend=backend, return_stats=True)):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    h = torch.compile(lambda x: kde_log_density(x, Y, 0.3, backend=backend), fullgraph=True)
    torch.testing.assert_close(h(x), kde_log_density(x, Y, 0.3, backend=backend), rtol=0, atol=0)
