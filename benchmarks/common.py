"""Shared benchmark plumbing: environment record, timing, CSV rows."""

from __future__ import annotations

import csv
import os
import statistics
import time
from typing import Callable

import torch


def git_sha() -> str:
    return environment(torch.device("cpu"))["git_sha"]


def environment(device: torch.device) -> dict:
    """diffgen_fast.bench.environment (device, versions, date, git SHA) plus whether Triton runs interpreted."""
    from diffgen_fast.bench import environment as _environment

    return {**_environment(device), "interpreter": os.environ.get("TRITON_INTERPRET", "0") == "1"}


def bench(fn: Callable[[], object], *, warmup: int = 1, repeat: int = 5, device=None) -> tuple[float, float]:
    """(median, spread = max - min) wall time in seconds over `repeat` runs after `warmup`."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), max(times) - min(times)


def write_rows(path: str, rows: list[dict]) -> None:
    """Append rows to a CSV; when the columns differ from the file's, the file is rewritten with the union
    (atomically: a temporary file, then os.replace)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    old: list[dict] = []
    fields: list[str] = []
    if os.path.exists(path):
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            fields = list(reader.fieldnames or [])
            old = list(reader)
    for r in rows:
        fields += [k for k in r if k not in fields]
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, restval="")
        w.writeheader()
        w.writerows(old + rows)
    os.replace(tmp, path)
