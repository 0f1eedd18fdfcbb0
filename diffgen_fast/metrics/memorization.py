"""Memorization of generated samples: the nearest-neighbour ratio test (docs/science.md section 5.1).

A sample x is memorized when ||x - NN1(x)|| / ||x - NN2(x)|| < threshold (1/3, Yoon et al. 2023, Gu et al. 2023),
with L2 distances in the space the samples and the training set are given in (pixel space by default).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from diffgen_fast._atomic import PathLike, write_text_atomic
from diffgen_fast.errors import InputError
from diffgen_fast.figures import _as_numpy
from diffgen_fast.ops.knn import knn_sqdist64


@dataclass
class MemorizationResult:
    """Per-sample nearest-neighbour facts and the memorized fraction.

    nn_index [M, 2] int64, nn_sqdist [M, 2], nn_dist [M, 2] (L2), ratio [M] = nn_dist[:, 0] / nn_dist[:, 1]
    (0 when both are 0), memorized [M] bool = ratio < threshold; fraction = memorized.mean().
    """

    nn_index: torch.Tensor
    nn_sqdist: torch.Tensor
    nn_dist: torch.Tensor
    ratio: torch.Tensor
    memorized: torch.Tensor
    threshold: float
    fraction: float
    n_samples: int
    n_train: int
    space: str = "pixel"
    value_range: Optional[tuple] = None
    backend: str = "auto"
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_neighbours(
        cls, d2: torch.Tensor, idx: torch.Tensor, threshold: float, *, n_train: int, value_range=None,
        backend: str = "auto", extra: Optional[dict] = None,
    ) -> MemorizationResult:  # fmt: skip
        """The ratio test from the two nearest neighbours: d2 [M, 2] squared distances, idx [M, 2] indices."""
        d2 = d2.clamp(min=0)
        dist = d2.sqrt()
        tiny = torch.finfo(dist.dtype).tiny
        ratio = torch.where(dist[:, 1] > 0, dist[:, 0] / dist[:, 1].clamp(min=tiny), torch.zeros_like(dist[:, 0]))
        mem = ratio < threshold
        M = int(mem.numel())
        return cls(
            nn_index=idx, nn_sqdist=d2, nn_dist=dist, ratio=ratio, memorized=mem, threshold=float(threshold),
            fraction=float(mem.double().mean()) if M else float("nan"), n_samples=M, n_train=n_train,
            value_range=value_range, backend=backend, extra=dict(extra or {}),
        )  # fmt: skip

    def summary(self) -> dict:
        """JSON-serialisable summary with every convention stated."""
        r = self.ratio.double()
        return {
            "test": "nearest-neighbour ratio ||x - NN1|| / ||x - NN2|| < threshold",
            "threshold": self.threshold,
            "distance": "L2 (not squared)",
            "space": self.space,
            "value_range": list(self.value_range) if self.value_range is not None else None,
            "k": 2,
            "n_samples": self.n_samples,
            "n_train": self.n_train,
            "n_memorized": int(self.memorized.sum()),
            "fraction_memorized": self.fraction,
            "ratio_median": float(r.median()) if r.numel() else float("nan"),
            "ratio_mean": float(r.mean()) if r.numel() else float("nan"),
            "nn_dist_median": float(self.nn_dist[:, 0].double().median()) if r.numel() else float("nan"),
            "backend": self.backend,
            **self.extra,
        }

    def to_numpy(self) -> dict:
        """The per-sample arrays as numpy (for .npz / CSV)."""
        return {
            "nn_index": self.nn_index.cpu().numpy(),
            "nn_sqdist": self.nn_sqdist.cpu().numpy(),
            "nn_dist": self.nn_dist.cpu().numpy(),
            "ratio": self.ratio.cpu().numpy(),
            "memorized": self.memorized.cpu().numpy(),
        }


def memorization(samples, train, *, threshold: float = 1 / 3, backend: str = "auto") -> MemorizationResult:
    """Nearest-neighbour ratio test of generated samples against the training set.

    Args:
        samples: [M, *shape] or [M, d] generated samples (torch or numpy), same space and scale as train.
        train: [N, *shape], [N, d] or a TrainingSet with N >= 2.
        threshold: a sample is memorized when its ratio is below this (default 1/3).
        backend: knn backend.
    """
    from diffgen_fast.data import TrainingSet

    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.floating)) or not threshold > 0:
        raise InputError(f"threshold: expected a number > 0, got {threshold!r}")
    ts = TrainingSet.coerce(train, name="train")
    if len(ts) < 2:
        raise InputError(f"train: the ratio test needs at least 2 training points, got {len(ts)}")
    d2, idx, _ = knn_sqdist64(samples, ts, 2, backend=backend)  # float64: the ratio needs distances float32 can't hold
    return MemorizationResult.from_neighbours(
        torch.as_tensor(d2), torch.as_tensor(idx), threshold, n_train=len(ts),
        value_range=getattr(ts, "value_range", None), backend=backend,
    )  # fmt: skip


def write_memorization_csv(result: Any, path: PathLike) -> Path:
    """Write the per-sample table of a memorization result to ``path`` atomically.

    Columns: ``index`` (sample), ``nn1``, ``nn2`` (training indices of the two nearest neighbours), ``d1``, ``d2``
    (their L2 distances, not squared), ``ratio`` (d1 / d2) and ``memorized`` (0/1). ``result`` needs the fields
    ``nn_index`` [M, 2], ``nn_dist`` [M, 2], ``ratio`` [M] and ``memorized`` [M] of ``MemorizationResult``.
    """
    nn_index = _as_numpy(result.nn_index).astype(np.int64)
    nn_dist = _as_numpy(result.nn_dist).astype(np.float64)
    ratio = _as_numpy(result.ratio).astype(np.float64)
    memorized = _as_numpy(result.memorized).astype(bool)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["index", "nn1", "nn2", "d1", "d2", "ratio", "memorized"])
    for i in range(len(ratio)):
        w.writerow(
            [
                i,
                int(nn_index[i, 0]),
                int(nn_index[i, 1]),
                f"{nn_dist[i, 0]:.9g}",
                f"{nn_dist[i, 1]:.9g}",
                f"{ratio[i]:.9g}",
                int(memorized[i]),
            ]
        )
    return write_text_atomic(buf.getvalue(), path)
