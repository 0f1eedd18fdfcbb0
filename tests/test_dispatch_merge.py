"""Backend selection and the merge rules."""

from __future__ import annotations

import os

import torch

from diffgen_fast.ops import dispatch
from diffgen_fast.ops.merge import (
    SoftmaxState,
    empty_softmax_state,
    finalize_softmax_state,
    merge_softmax_states,
    merge_topk,
)


def _state(logits, values):
    m = logits.max(1).values
    p = torch.exp(logits - m[:, None])
    return SoftmaxState(m, p.sum(1), (p * p).sum(1), p @ values)


def test_softmax_merge_is_exact_and_associative():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, 30, generator=g, dtype=torch.float64) * 50
    v = torch.randn(30, 4, generator=g, dtype=torch.float64)
    whole = finalize_softmax_state(_state(z, v))
    parts = [_state(z[:, a:b], v[a:b]) for a, b in [(0, 7), (7, 8), (8, 30)]]
    left = merge_softmax_states(merge_softmax_states(parts[0], parts[1]), parts[2])
    right = merge_softmax_states(parts[0], merge_softmax_states(parts[1], parts[2]))
    for merged in (left, right):
        out = finalize_softmax_state(merged)
        for a, b in zip(out, whole):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_softmax_merge_with_empty_states():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, 6, generator=g, dtype=torch.float64)
    v = torch.randn(6, 2, generator=g, dtype=torch.float64)
    s = _state(z, v)
    e = empty_softmax_state(3, 2, dtype=torch.float64)
    for merged in (merge_softmax_states(e, s), merge_softmax_states(s, e)):
        for a, b in zip(merged, s):
            torch.testing.assert_close(a, b)
    ee = merge_softmax_states(e, e)
    assert torch.isneginf(ee.m).all() and (ee.l == 0).all() and not torch.isnan(ee.o).any()


def test_topk_merge_orders_by_distance_then_index():
    d_a = torch.tensor([[1.0, 2.0, 2.0]])
    i_a = torch.tensor([[5, 9, 7]])
    d_b = torch.tensor([[2.0, float("inf")]])
    i_b = torch.tensor([[3, -1]])
    d, i = merge_topk(d_a, i_a, d_b, i_b, 3)
    assert d.tolist() == [[1.0, 2.0, 2.0]] and i.tolist() == [[5, 3, 7]]


def _has_faiss():
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _has_triton():
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def test_backend_table_and_resolution(monkeypatch):
    rows = dispatch.backend_table(torch.device("cpu"))
    by = {(r["op"], r["backend"]): r for r in rows}
    assert by[("softmax_denoise", "torch")]["available"]
    assert by[("knn", "torch")]["available"]
    assert not by[("knn", "cuda")]["available"] and by[("knn", "cuda")]["reason"]
    assert by[("knn", "faiss")]["available"] == _has_faiss()
    triton_row = by[("softmax_denoise", "triton")]
    if os.environ.get("TRITON_INTERPRET") == "1" and _has_triton():
        assert triton_row["available"]  # CPU tensors run in the interpreter (the test suite sets it without CUDA)
    else:
        assert not triton_row["available"] and triton_row["reason"]
    from diffgen_fast import _native

    on_cpu = "cpu" if _native.available() else "torch"  # the native kernels win on CPU (benchmarks/bench_cpu.py)
    assert dispatch.resolve("softmax_denoise", "auto", torch.device("cpu"))[0] == on_cpu
    monkeypatch.setenv("DIFFGEN_FAST_BACKEND", "faiss")  # ignored by softmax_denoise, which has no faiss backend
    assert dispatch.resolve("softmax_denoise", "auto", torch.device("cpu"))[0] == on_cpu
    monkeypatch.setenv("DIFFGEN_FAST_DISABLE_EXT", "1")
    monkeypatch.delenv("DIFFGEN_FAST_BACKEND")
    assert dispatch.resolve("softmax_denoise", "auto", torch.device("cpu"))[0] == "torch"
