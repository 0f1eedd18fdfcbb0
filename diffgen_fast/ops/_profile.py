"""Profiling ranges around each pass of each kernel: torch.profiler.record_function (shows in `diffgen-fast bench
--profile` traces and any torch.profiler session) and, on CUDA, an NVTX range for Nsight Systems."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def pass_range(name: str, device=None):
    """A named range `diffgen_fast/<name>` around one kernel pass (cheap: a few microseconds when not profiling)."""
    label = f"diffgen_fast/{name}"
    cuda = device is not None and torch.device(device).type == "cuda"
    with torch.profiler.record_function(label):
        if cuda:
            torch.cuda.nvtx.range_push(label)
        try:
            yield
        finally:
            if cuda:
                torch.cuda.nvtx.range_pop()
