"""The nearest-neighbour ratio test."""

from __future__ import annotations

import json

import numpy as np
import torch

from diffgen_fast import memorization


def test_ratio_and_flags():
    y = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    s = torch.tensor([[0.0, 0.0], [1.0, 0.0], [5.0, 0.0], [0.1, 9.0]])
    r = memorization(s, y)
    expect = torch.tensor([0.0, 1 / 9, 1.0, float(np.hypot(0.1, 1.0) / np.hypot(0.1, 9.0))])
    torch.testing.assert_close(r.ratio.double(), expect.double(), rtol=1e-6, atol=1e-7)
    assert r.memorized.tolist() == [True, True, False, True]
    assert r.fraction == 0.75 and r.nn_index[:, 0].tolist() == [0, 0, 0, 2]
    torch.testing.assert_close(r.nn_dist, r.nn_sqdist.sqrt())
    summary = r.summary()
    json.dumps(summary)
    assert summary["threshold"] == 1 / 3 and summary["space"] == "pixel" and summary["n_memorized"] == 3


def test_duplicate_training_points_give_ratio_zero_for_exact_copies():
    y = torch.tensor([[1.0, 1.0], [1.0, 1.0], [5.0, 5.0]])
    r = memorization(torch.tensor([[1.0, 1.0]]), y, threshold=0.5)
    assert float(r.ratio[0]) == 0.0 and bool(r.memorized[0])


def test_numpy_and_threshold():
    g = np.random.default_rng(0)
    y = g.normal(size=(50, 8)).astype(np.float32)
    s = y[:10] + 0.001 * g.normal(size=(10, 8)).astype(np.float32)
    r = memorization(s, y, threshold=0.01)
    assert r.n_samples == 10 and r.fraction == 1.0
    r2 = memorization(g.normal(size=(10, 8)).astype(np.float32), y)
    assert r2.fraction < 0.5
