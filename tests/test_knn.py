"""knn (torch backend) against float64 brute force, tie-aware."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffgen_fast import TrainingSet, knn
from diffgen_fast.ops.knn.naive import knn_naive
from diffgen_fast.ops.knn.reference import knn_torch
from tests.helpers import assert_knn_matches, make_problem


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("N,d,k", [(1, 3, 1), (97, 1, 5), (97, 59, 2), (1025, 3, 10), (1025, 59, 1), (97, 3072, 3)])
def test_matches_bruteforce(dtype, N, d, k):
    x, y = make_problem(11, N, d, dtype=dtype, seed=N + d)
    d2, idx = knn(x, y, k, backend="torch")
    assert d2.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_knn_matches(d2, idx, x, y, k, rtol=1e-6 if dtype == torch.float32 else 1e-12)


def test_exact_ties_go_to_smaller_index():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(10, 8, generator=g)
    y = torch.cat([base, base, base[:3]])  # rows i, i + 10 (and i + 20 for i < 3) are identical
    x = base[:5] + 0.01 * torch.randn(5, 8, generator=g)
    d2, idx = knn(x, y, 3, backend="torch")
    assert_knn_matches(d2, idx, x, y, 3, rtol=1e-6)
    for r in range(3):
        assert idx[r].tolist() == [r, r + 10, r + 20]
    ref_d2, ref_idx = knn_naive(x, y, 3)
    assert torch.equal(idx, ref_idx)


def test_many_duplicates_beyond_candidate_window():
    y = torch.zeros(300, 4)
    y[150:] = 1.0
    x = torch.full((2, 4), 0.1)
    d2, idx = knn(x, y, 40, backend="torch")
    assert idx[0].tolist() == list(range(40))


def test_near_ties_with_large_norms_are_resolved_exactly():
    """Points of norm ~1e3 differing by 1e-3: float32 norm expansion cannot order them; the re-rank must."""
    g = torch.Generator().manual_seed(1)
    center = 30.0 + torch.rand(1, 1024, generator=g, dtype=torch.float64)
    y = center + 1e-3 * torch.randn(64, 1024, generator=g, dtype=torch.float64)
    x = center + 1e-3 * torch.randn(6, 1024, generator=g, dtype=torch.float64)
    d2, idx = knn(x.float(), y.float(), 4, backend="torch")
    assert_knn_matches(d2, idx, x.float(), y.float(), 4, rtol=1e-5)


def test_chunked_merge_equals_single_chunk():
    x, y = make_problem(13, 211, 9, seed=4)
    ts = TrainingSet.coerce(y)
    ref = knn_torch(x, ts, 7)
    for chunk in (1, 5, 6, 50, 211):
        d2, idx = knn_torch(x, ts, 7, chunk_size=chunk)
        assert torch.equal(idx, ref[1])
        torch.testing.assert_close(d2, ref[0], rtol=0, atol=0)


def test_numpy_and_image_shapes():
    x, y = make_problem(4, 50, 12, seed=2)
    d2, idx = knn(x.reshape(4, 3, 2, 2).numpy(), y.reshape(50, 3, 2, 2).numpy(), 2)
    assert isinstance(d2, np.ndarray) and idx.dtype == np.int64
    assert_knn_matches(d2, idx, x, y, 2, rtol=1e-6)


def test_memmapped_training_set(tmp_path, monkeypatch):
    from diffgen_fast.ops.knn import reference as knn_ref

    x, y = make_problem(7, 301, 5, seed=8)
    np.save(tmp_path / "t.npy", y.numpy())
    ts = TrainingSet.from_npy(tmp_path / "t.npy")
    monkeypatch.setattr(knn_ref, "default_chunk_size", lambda d: 40)
    d2, idx = knn(x, ts, 4)
    assert_knn_matches(d2, idx, x, y, 4, rtol=1e-6)
