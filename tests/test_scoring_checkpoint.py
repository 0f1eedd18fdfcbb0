"""Checkpoints of the streamed scoring passes are never trusted: an empty, unreadable or tampered file is refused with
an error that names it and says to delete it, and a checkpoint is read without pickles."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffgen_fast.errors import DataFormatError
from diffgen_fast.metrics.scoring import _Checkpoint, stream_topk

N, M, K, CHUNK = 60, 5, 3, 10


class _Stop(Exception):
    pass


def _inputs():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(M, 4, generator=gen, dtype=torch.float64), torch.randn(N, 4, generator=gen, dtype=torch.float64)


def _run(tmp_path, stop_after: int | None = None):
    from diffgen_fast.data import TrainingSet

    q, train = _inputs()

    def stop(chunks, rows):
        if stop_after is not None and chunks == stop_after:
            raise _Stop

    return stream_topk(
        q, TrainingSet(train), K, chunk_size=CHUNK, backend="torch", checkpoint=tmp_path / "ck.npz", on_chunk=stop
    )


def _saved(tmp_path) -> dict:
    with pytest.raises(_Stop):
        _run(tmp_path, stop_after=3)
    with np.load(tmp_path / "ck.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _write(tmp_path, arrays: dict, **kw) -> None:
    with open(tmp_path / "ck.npz", "wb") as f:
        np.savez(f, **arrays, **kw)


def _refused(tmp_path, what: str = "") -> None:
    with pytest.raises(DataFormatError, match=rf"ck\.npz'.*{what}.*delete it to start over"):
        _run(tmp_path)


def test_valid_checkpoint_resumes(tmp_path):
    from diffgen_fast.data import TrainingSet

    q, train = _inputs()
    ref_d, ref_i, _ = stream_topk(q, TrainingSet(train), K, chunk_size=CHUNK, backend="torch")
    state = _saved(tmp_path)
    assert int(state["next_row"]) == 3 * CHUNK and state["best_d"].shape == (M, K)
    d, i, stats = _run(tmp_path)
    assert stats.resumed_from_row == 3 * CHUNK and stats.chunks_skipped == 3
    assert torch.equal(i, ref_i) and torch.allclose(d, ref_d)


def test_empty_or_unreadable_checkpoint_refused(tmp_path):
    (tmp_path / "ck.npz").write_bytes(b"")
    _refused(tmp_path, "cannot be read")
    (tmp_path / "ck.npz").write_bytes(b"PK\x03\x04 garbage")
    _refused(tmp_path, "cannot be read")
    np.save(tmp_path / "ck.npz", np.zeros(3))  # a plain .npy under the checkpoint's name
    (tmp_path / "ck.npz.npy").rename(tmp_path / "ck.npz")
    _refused(tmp_path, "not an .npz")
    (tmp_path / "ck.npz").unlink()
    (tmp_path / "ck.npz").mkdir()
    _refused(tmp_path, "not a regular file")


def test_pickled_checkpoint_refused_without_running_it(tmp_path):
    state = _saved(tmp_path)
    state["best_i"] = np.array([object()] * M, dtype=object)
    _write(tmp_path, state)
    _refused(tmp_path, "cannot be read")


@pytest.mark.parametrize(
    "tamper, what",
    [
        (lambda s: s.update(next_row=np.int64(N + 1)), "next_row = 61"),
        (lambda s: s.update(next_row=np.int64(-1)), "next_row = -1"),
        (lambda s: s.update(next_row=np.float64(30.0)), "next_row of dtype float64"),
        (lambda s: s.update(next_row=np.array([30])), "next_row of dtype"),
        (lambda s: s["best_d"].__setitem__((1, 1), np.nan), "NaN"),
        (lambda s: s["best_d"].__setitem__((1, 1), -np.inf), "NaN or -inf"),
        (lambda s: s["best_i"].__setitem__((2, 0), 30), "indices outside"),  # not among the 30 rows seen
        (lambda s: s["best_i"].__setitem__((2, 0), -5), "indices outside"),
        (lambda s: s["best_i"].__setitem__((2, 0), -1), "indices outside"),  # padding needs an infinite distance
        (lambda s: s.update(best_d=s["best_d"].astype(np.float32)), "float64 and int64"),
        (lambda s: s.update(best_i=s["best_i"].astype(np.float64)), "float64 and int64"),
        (lambda s: s.update(best_d=s["best_d"][:, :2]), "same"),
        (lambda s: s.update(best_d=s["best_d"][:, :2], best_i=s["best_i"][:, :2]), "2 neighbours"),
        (lambda s: s.update(best_d=s["best_d"][:4], best_i=s["best_i"][:4]), "4 queries"),
        (lambda s: s.update(best_d=s["best_d"].ravel(), best_i=s["best_i"].ravel()), "shape"),
        (lambda s: s.update(key=np.array([1, 2])), "key of dtype"),
        (lambda s: s.update(extra=np.zeros(2)), "expected exactly"),
        (lambda s: s.pop("best_i"), "expected exactly"),
    ],
)
def test_tampered_checkpoint_refused(tmp_path, tamper, what):
    state = _saved(tmp_path)
    tamper(state)
    _write(tmp_path, state)
    _refused(tmp_path, what)


def test_checkpoint_for_other_inputs_is_started_over(tmp_path):
    state = _saved(tmp_path)
    key = json.loads(str(state["key"]))
    key["k"] = K + 1
    state["key"] = np.str_(json.dumps(key, sort_keys=True))
    _write(tmp_path, state)
    _, _, stats = _run(tmp_path)
    assert stats.resumed_from_row == 0 and stats.chunks_skipped == 0


def test_load_checks_against_the_pass():
    ck = _Checkpoint(None, {})
    assert ck.load(M, K, N) is None
