"""Test configuration: NaN-poisoned allocations, the gpu marker, deterministic seeds.

TRITON_INTERPRET must be set before triton is imported; it is set here for CPU-only machines so Triton kernels run
in the interpreter (when triton is installed and no GPU is present).
"""

from __future__ import annotations

import os

import pytest

try:
    import torch as _torch_probe

    _HAS_CUDA = _torch_probe.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


_real_empty = torch.empty
_real_empty_like = torch.empty_like


def _poisoned_empty(*args, **kwargs):
    t = _real_empty(*args, **kwargs)
    if t.is_floating_point():
        with torch.no_grad():  # a leaf allocated with requires_grad=True (inductor's pattern init does) stays a leaf
            t.fill_(float("nan"))
    return t


def _poisoned_empty_like(*args, **kwargs):
    t = _real_empty_like(*args, **kwargs)
    if t.is_floating_point():
        with torch.no_grad():
            t.fill_(float("nan"))
    return t


@pytest.fixture(autouse=True)
def nan_poison(monkeypatch):
    """Every torch.empty / empty_like allocation starts as NaN, so an output left unwritten fails the test."""
    monkeypatch.setattr(torch, "empty", _poisoned_empty)
    monkeypatch.setattr(torch, "empty_like", _poisoned_empty_like)
    yield


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)
