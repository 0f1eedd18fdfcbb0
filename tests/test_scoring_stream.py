"""Streamed scoring runs the driver's top-k partial per chunk and merges with the one merge rule: its result is one
knn call over the whole set (the same indices, ties to the smaller index, the same float64 distances) for every
chunk size, backend, tie and duplicate, also when resumed from a checkpoint written mid-run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffgen_fast import _native
from diffgen_fast.data import TrainingSet
from diffgen_fast.errors import InputError
from diffgen_fast.metrics import scoring
from diffgen_fast.metrics.copying import assign_cells
from diffgen_fast.metrics.scoring import stream_topk
from diffgen_fast.ops import driver
from diffgen_fast.ops.knn import knn_sqdist64
from diffgen_fast.ops.knn.naive import knn_naive

try:
    import faiss  # noqa: F401

    HAS_FAISS = True
except ImportError:  # pragma: no cover
    HAS_FAISS = False

needs_ext = pytest.mark.skipif(not _native.available(), reason="native extension unavailable")
needs_faiss = pytest.mark.skipif(not HAS_FAISS, reason="faiss not installed")
BACKENDS = [
    "torch",
    pytest.param("cpu", marks=needs_ext),
    pytest.param("faiss", marks=needs_faiss),
]
N = 53


class _Stop(Exception):
    pass


def _tied(dtype=torch.float64, seed=0):
    """Training points on an integer grid (many equal distances) with duplicated rows; queries: grid points (ties),
    copies of training points (distance 0, duplicated), and random points."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (N, 3), generator=g).to(torch.float64)
    y[40:46] = y[3]  # six more copies of row 3
    y[50:] = y[10]
    x = torch.cat(
        [
            torch.randint(0, 3, (6, 3), generator=g).to(torch.float64),
            y[[3, 10, 44, 0]],
            torch.rand(5, 3, generator=g, dtype=torch.float64) * 2,
        ]
    )
    return x.to(dtype), y.to(dtype)


def _assert_same(got_d, got_i, ref_d, ref_i):
    assert torch.equal(got_i, torch.as_tensor(ref_i))
    torch.testing.assert_close(got_d, torch.as_tensor(ref_d).double(), rtol=2**-52, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk", [1, 7, N, N + 9])
@pytest.mark.parametrize("k", [1, 5])
def test_streamed_equals_whole_set_knn(backend, chunk, k):
    x, y = _tied()
    ref_d, ref_i, _ = knn_sqdist64(x, y, k, backend=backend)
    nd, ni = knn_naive(x, y, k)
    assert torch.equal(ref_i, ni)  # the whole-set call itself: ties by index
    d, i, stats = stream_topk(x, TrainingSet(y), k, chunk_size=chunk, backend=backend)
    _assert_same(d, i, ref_d, ref_i)
    _assert_same(d, i, nd, ni)
    assert stats.chunks == -(-N // chunk)


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=needs_ext)])
def test_float32_streamed_equals_whole_set_knn(backend):
    x, y = _tied(torch.float32, seed=1)
    x = x + 0.25 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    ref_d, ref_i, _ = knn_sqdist64(x, y, 4, backend=backend)
    d, i, _ = stream_topk(x, TrainingSet(y), 4, chunk_size=11, backend=backend)
    _assert_same(d, i, ref_d, ref_i)


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=needs_ext)])
def test_driver_partial_runs_each_chunk(monkeypatch, backend):
    """A driver backend's chunks go through driver.partial_topk, never through the public knn."""
    calls = []
    real = driver.partial_topk

    def counting(name, x, Y, k, index_offset=0):
        calls.append((name, Y.shape[0], k, index_offset))
        return real(name, x, Y, k, index_offset)

    def no_knn(*a, **kw):
        raise AssertionError("the public knn was called per chunk")

    monkeypatch.setattr(driver, "partial_topk", counting)
    monkeypatch.setattr(scoring, "knn_sqdist64", no_knn)
    x, y = _tied()
    d, i, _ = stream_topk(x, TrainingSet(y), 3, chunk_size=20, backend=backend)
    assert calls == [(backend, 20, 3, 0), (backend, 20, 3, 20), (backend, 13, 3, 40)]
    _assert_same(d, i, *knn_naive(x, y, 3))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk, stop", [(1, 17), (7, 3), (N + 9, None)])
def test_resume_mid_run_gives_the_same_answer(tmp_path, backend, chunk, stop):
    x, y = _tied(seed=3)
    ref_d, ref_i, _ = knn_sqdist64(x, y, 5, backend=backend)
    ck = tmp_path / "ck.npz"

    def stop_at(chunks, rows):
        if chunks == stop:
            raise _Stop

    if stop is not None:
        with pytest.raises(_Stop):
            stream_topk(x, TrainingSet(y), 5, chunk_size=chunk, backend=backend, checkpoint=ck, on_chunk=stop_at)
        with np.load(ck, allow_pickle=False) as z:
            assert int(z["next_row"]) == stop * chunk
            assert z["best_d"].shape == (len(x), min(5, stop * chunk))
            # the checkpoint is the merged top-k state of the rows seen: the whole-set knn of those rows
            pd, pi, _ = knn_sqdist64(x, y[: stop * chunk], min(5, stop * chunk), backend="torch")
            assert np.array_equal(z["best_i"], pi.numpy())
    d, i, stats = stream_topk(x, TrainingSet(y), 5, chunk_size=chunk, backend=backend, checkpoint=ck)
    assert stats.resumed_from_row == (stop * chunk if stop else 0)
    assert stats.chunks_skipped == (stop or 0)
    _assert_same(d, i, ref_d, ref_i)


def test_resume_across_other_chunk_boundaries(tmp_path):
    """A checkpoint whose next row falls inside a chunk (other chunk boundaries) is resumed from that row, without
    merging a row twice."""
    x, y = _tied(seed=4)
    ck = tmp_path / "ck.npz"

    def stop_at(chunks, rows):
        if chunks == 2:
            raise _Stop

    with pytest.raises(_Stop):
        stream_topk(x, TrainingSet(y), 5, chunk_size=7, backend="torch", checkpoint=ck, on_chunk=stop_at)
    with np.load(ck, allow_pickle=False) as z:
        state = {k: z[k] for k in z.files}
    key = json.loads(str(state["key"]))
    key["chunk_size"] = 5
    state["key"] = np.str_(json.dumps(key, sort_keys=True))
    with open(ck, "wb") as f:
        np.savez(f, **state)
    d, i, stats = stream_topk(x, TrainingSet(y), 5, chunk_size=5, backend="torch", checkpoint=ck)
    assert stats.resumed_from_row == 14 and stats.chunks_skipped == 2  # rows 0..9; rows 10..13 of [10, 15) too
    _assert_same(d, i, *knn_naive(x, y, 5))
    assert len(set(map(tuple, i.tolist()))) > 1 and all(len(set(r)) == 5 for r in i.tolist())


def test_safety_guard_recomputes_bad_partial_rows(monkeypatch):
    """Rows of a chunk's partial with a non-finite distance or an index outside the chunk (as faiss -1 / inf or an
    overflowing kernel give) are recomputed exactly, as the public knn does."""
    real = driver.partial_topk

    def broken(name, x, Y, k, index_offset=0):
        d2, idx = real(name, x, Y, k, index_offset)
        d2, idx = d2.clone(), idx.clone()
        d2[0, -1], idx[0, -1] = float("inf"), -1
        idx[1, 0] = index_offset + Y.shape[0]  # one past the chunk
        d2[2, 0] = float("nan")
        return d2, idx

    monkeypatch.setattr(driver, "partial_topk", broken)
    x, y = _tied(seed=5)
    d, i, _ = stream_topk(x, TrainingSet(y), 4, chunk_size=9, backend="torch")
    _assert_same(d, i, *knn_naive(x, y, 4))


def test_float64_overflow_in_one_chunk_only():
    """A chunk whose squared distances overflow float64 is kept as +inf (its rows ranked last); the pass fails only
    when the k-th distance over the whole set overflows, as knn does."""
    g = torch.Generator().manual_seed(6)
    y = torch.randn(20, 4, generator=g, dtype=torch.float64)
    y[:10] *= 1e200  # the first two chunks: beyond float64 squared
    x = torch.randn(3, 4, generator=g, dtype=torch.float64)
    ref_d, ref_i, _ = knn_sqdist64(x, y, 3, backend="torch")
    d, i, _ = stream_topk(x, TrainingSet(y), 3, chunk_size=5, backend="torch")
    _assert_same(d, i, ref_d, ref_i)
    assert bool((i >= 10).all())
    with pytest.raises(InputError, match="overflow even float64"):
        knn_sqdist64(x, y, 12, backend="torch")
    with pytest.raises(InputError, match="overflow even float64"):
        stream_topk(x, TrainingSet(y), 12, chunk_size=5, backend="torch")


def test_nonfinite_chunk_named_by_its_training_row():
    x, y = _tied()
    y[30, 1] = float("nan")
    with pytest.raises(InputError, match=r"train: contains NaN or Inf \(first at row 30\)"):
        stream_topk(x, _Unchecked(y), 2, chunk_size=8, backend="torch")


class _Unchecked:
    """The part of the TrainingSet interface stream_topk uses, without the finite check at construction."""

    def __init__(self, t):
        self.t, self.shape = t, tuple(t.shape[1:])

    def __len__(self):
        return self.t.shape[0]

    def iter_chunks(self, chunk_size=None, *, device=None, dtype=None):
        for s in range(0, len(self), chunk_size or len(self)):
            yield s, self.t[s : s + (chunk_size or len(self))].clone()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk", [1, 7, N + 9])
def test_cells_pass_is_the_nearest_within_the_cell(tmp_path, backend, chunk):
    """The per-cell top-1 state (merged with merge_topk): the nearest training row of the query's own cell, ties to
    the smaller row, the same for every chunk size, and after a resume."""
    x, y = _tied(seed=7)
    cent = torch.tensor([[0.0, 0.0, 0.0], [2.0, 2.0, 2.0], [0.0, 2.0, 1.0]], dtype=torch.float64)
    qc, yc = assign_cells(x, cent), assign_cells(y, cent)
    want_d = torch.full((len(x),), float("inf"), dtype=torch.float64)
    want_i = torch.full((len(x),), -1, dtype=torch.int64)
    for r in range(len(x)):
        rows = (yc == qc[r]).nonzero()[:, 0]
        if rows.numel():
            dd, ii = knn_naive(x[r : r + 1], y[rows], 1)
            want_d[r], want_i[r] = dd[0, 0], rows[ii[0, 0]]
    ck = tmp_path / "ck.npz"

    def stop_at(chunks, rows):
        if chunks == 2:
            raise _Stop

    if chunk < N:
        with pytest.raises(_Stop):
            stream_topk(x, TrainingSet(y), 2, chunk_size=chunk, backend=backend, cells=(cent, qc), checkpoint=ck,
                        on_chunk=stop_at)  # fmt: skip
    d, i, stats, (cd, ci, cn) = stream_topk(
        x, TrainingSet(y), 2, chunk_size=chunk, backend=backend, cells=(cent, qc), checkpoint=ck
    )
    assert stats.resumed_from_row == (2 * chunk if chunk < N else 0)
    assert torch.equal(ci, want_i)
    torch.testing.assert_close(cd, want_d, rtol=2**-52, atol=0)
    assert torch.equal(cn, torch.bincount(yc, minlength=3))
    _assert_same(d, i, *knn_naive(x, y, 2))
