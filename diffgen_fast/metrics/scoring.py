"""Memorization scoring at scale: the tests of docs/science.md section 5 over a streamed training set, with checkpoints.

`score` runs, in one or two passes over the training set (chunk by chunk, bounded memory, a progress bar):
  - the k nearest training points of every generated sample and every held-out sample (k >= 2);
  - the nearest-neighbour ratio test (memorized when d1 / d2 < threshold);
  - authenticity (Alaa et al.): a second pass finds, for each training point that is some sample's nearest, its own
    nearest other training point;
  - C_T (Meehan et al.) when held-out real samples are given, as their code computes it: k-means cells of the
    training set; in the same pass as the neighbours, each training chunk's rows are given their cell (nearest
    centroid) and every sample and held-out point keeps its nearest training point within its own cell; per cell,
    their Mann-Whitney z of sample against held-out distances (see metrics.copying.c_t).
Every pass runs the driver's top-k partial of the chosen backend on each training chunk (diffgen_fast.ops.driver,
under knn's safety guard), merges it into the pass's top-k state with the one merge rule (ops.merge.merge_topk),
checkpoints exactly that state after each chunk (atomically, .npz without pickles) and resumes from it when run
again with the same inputs and settings. Distances are L2 in the chosen space: pixels (default), the
output of a user's embedding callable, or precomputed embeddings; metric "cosine" normalises the features first
(then d^2 = 2 - 2 cos).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from diffgen_fast._atomic import _atomic_target
from diffgen_fast.errors import DataFormatError, InputError, InputTypeError
from diffgen_fast.layout import RANGE_RULE, align_layout, check_range, scale_for, training_range
from diffgen_fast.metrics.copying import (
    CT_CELLS_DEFAULT,
    CT_VARIANTS,
    assign_cells,
    authenticity,
    ct_from_distances,
    kmeans_centroids,
)
from diffgen_fast.metrics.memorization import MemorizationResult
from diffgen_fast.ops import dispatch, driver
from diffgen_fast.ops._checks import check_float, check_queries, checks_enabled
from diffgen_fast.ops.knn import float64_overflow_error, knn_sqdist64, partial_topk_checked
from diffgen_fast.ops.merge import merge_topk

log = logging.getLogger("diffgen_fast.scoring")
METRICS = ("l2", "cosine")
STOP_ENV = "DIFFGEN_FAST_STOP_AFTER_CHUNKS"  # testing hook: exit (status 75) after this many chunks, as if killed


class _Space:
    """How points become the vectors distances are measured between."""

    def __init__(self, embed: Optional[Callable], metric: str, batch: int = 1024):
        if metric not in METRICS:
            raise InputError(f"metric: expected one of {', '.join(METRICS)}, got {metric!r}")
        if embed is not None and not callable(embed):
            raise InputTypeError(
                f"embed: expected a callable mapping a batch [b, *shape] to features [b, e], got {embed!r}"
            )
        self.embed, self.metric, self.batch = embed, metric, batch

    @property
    def identity(self) -> bool:
        return self.embed is None and self.metric == "l2"

    def __call__(self, x: torch.Tensor, shape: tuple) -> torch.Tensor:
        if self.embed is not None:
            outs = []
            for s in range(0, x.shape[0], self.batch):
                with torch.no_grad():
                    f = self.embed(x[s : s + self.batch].reshape(-1, *shape))
                f = torch.as_tensor(f)
                if f.ndim < 2 or f.shape[0] != min(self.batch, x.shape[0] - s) or not f.is_floating_point():
                    raise InputError(
                        f"embed: expected float features [b, e] for a batch of b = {min(self.batch, x.shape[0] - s)}, "
                        f"got {getattr(f, 'dtype', '?')} of shape {tuple(f.shape)}"
                    )
                outs.append(f.reshape(f.shape[0], -1).detach().float().cpu())
            x = torch.cat(outs)
        if self.metric == "cosine":
            x = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
            norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
            if bool((norm == 0).any()):
                raise InputError("metric: 'cosine' needs non-zero feature vectors; a point has norm 0")
            x = x / norm
        return x


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().view(torch.uint8).numpy()).hexdigest()


class _Checkpoint:
    """The driver's top-k state of a pass saved after every chunk: best_d [M, c] float64, best_i [M, c] int64 (c =
    min(k, next_row) columns, each row ascending by (distance, index), as ops.merge.merge_topk leaves it), the next
    row and a key of the inputs.

    Loading never trusts the file: it is read without pickles, and a file that is unreadable, empty, or inconsistent
    (missing or extra arrays, wrong dtypes or shapes, next_row outside [0, N], NaN distances, indices outside the rows
    already seen) is refused with a DataFormatError that names it and says to delete it to start over.
    """

    _ARRAYS = ("best_d", "best_i", "key", "next_row")

    def __init__(self, path: Optional[Path], key: dict, n_cells: int = 0):
        self.path, self.key = path, json.dumps(key, sort_keys=True)
        # with cells: cell_d [M] float64, cell_i [M] int64 (the top-1 state of each query among the training rows of
        # its own cell, inf / -1 while none is seen) and cell_n [C] int64 (training rows per cell so far)
        self.n_cells = n_cells
        self.arrays = self._ARRAYS + (("cell_d", "cell_i", "cell_n") if n_cells else ())
        self.cell_state: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None

    def _refuse(self, why: str, cause: Optional[BaseException] = None) -> DataFormatError:
        err = DataFormatError(f"checkpoint: '{self.path}' {why}; it is not used: delete it to start over")
        err.__cause__ = cause
        return err

    def load(
        self, rows: Optional[int] = None, k: Optional[int] = None, n: Optional[int] = None
    ) -> Optional[tuple[torch.Tensor, torch.Tensor, int]]:
        """The saved state (best_d, best_i, next_row), None when there is none or it is for other inputs.

        rows, k, n: the number of queries, the k of the pass and the number of training rows; each given one is
        checked against the file.
        """
        if self.path is None or not (self.path.exists() or self.path.is_symlink()):
            return None
        if not self.path.is_file():
            raise self._refuse("is not a regular file")
        try:
            z = np.load(self.path, allow_pickle=False)
            if not isinstance(z, np.lib.npyio.NpzFile):
                raise self._refuse("is not an .npz archive of a top-k state")
            with z:
                names = sorted(z.files)
                if names != sorted(self.arrays):
                    raise self._refuse(f"holds arrays {names}; expected exactly {sorted(self.arrays)}")
                key = z["key"]
                if key.shape != () or key.dtype.kind != "U":
                    raise self._refuse(f"has a key of dtype {key.dtype} and shape {list(key.shape)}; expected a string")
                if str(key) != self.key:
                    log.warning("checkpoint %s is for other inputs or settings; starting over", self.path)
                    return None
                best_d, best_i, next_row = z["best_d"], z["best_i"], z["next_row"]
                cells = tuple(z[a] for a in ("cell_d", "cell_i", "cell_n")) if self.n_cells else None
        except DataFormatError:
            raise
        except Exception as e:  # unreadable, empty, truncated, a pickle, out of memory: never trusted
            raise self._refuse(f"cannot be read ({type(e).__name__}: {e})", e) from e
        state = self._checked(best_d, best_i, next_row, rows, k, n)
        if cells is not None:
            self.cell_state = self._checked_cells(*cells, state[2], best_d.shape[0])
        return state

    def _checked_cells(self, cell_d, cell_i, cell_n, done: int, m: int):
        if cell_d.dtype != np.float64 or cell_i.dtype != np.int64 or cell_n.dtype != np.int64:
            raise self._refuse(f"has cell_d {cell_d.dtype}, cell_i {cell_i.dtype}, cell_n {cell_n.dtype}")
        if cell_d.shape != (m,) or cell_i.shape != (m,) or cell_n.shape != (self.n_cells,):
            raise self._refuse(f"has cell arrays of shapes {[list(a.shape) for a in (cell_d, cell_i, cell_n)]}")
        none = cell_i == -1  # padding needs an infinite distance (a real row may have one: float64 overflow)
        if np.isnan(cell_d).any() or (cell_d < 0).any() or (none & (cell_d != np.inf)).any():
            raise self._refuse("holds NaN, negative or unmatched cell distances")
        if ((cell_i < -1) | (cell_i >= done)).any() or (cell_n < 0).any() or cell_n.sum() != done:
            raise self._refuse(f"holds cell indices or counts inconsistent with the {done} rows seen")
        return tuple(torch.from_numpy(np.array(a)) for a in (cell_d, cell_i, cell_n))

    def _checked(self, best_d, best_i, next_row, rows, k, n) -> tuple[torch.Tensor, torch.Tensor, int]:
        if next_row.shape != () or next_row.dtype.kind not in "iu":
            raise self._refuse(f"has next_row of dtype {next_row.dtype}, shape {list(next_row.shape)}; expected an int")
        done = int(next_row)
        if done < 0 or (n is not None and done > n):
            raise self._refuse(f"has next_row = {done}; expected a row in [0, {'N' if n is None else n}]")
        if best_d.dtype != np.float64 or best_i.dtype != np.int64:
            raise self._refuse(f"has best_d {best_d.dtype}, best_i {best_i.dtype}; expected float64 and int64")
        if best_d.ndim != 2 or best_d.shape != best_i.shape:
            raise self._refuse(
                f"has best_d of shape {list(best_d.shape)} and best_i of shape {list(best_i.shape)}; expected the "
                "same [M, c] shape for both"
            )
        m, c = best_d.shape
        if rows is not None and m != rows:
            raise self._refuse(f"holds {m} queries; expected {rows}")
        if k is not None and c != min(k, done):
            raise self._refuse(
                f"holds {c} neighbours per query after {done} rows; expected min(k, rows) = {min(k, done)}"
            )
        if np.isnan(best_d).any() or (best_d == -np.inf).any():
            raise self._refuse("holds NaN or -inf distances")
        padding = best_i == -1
        bad = ~padding & ((best_i < 0) | (best_i >= done))
        if bad.any() or (padding & (best_d != np.inf)).any():
            example = int(best_i[bad][0]) if bad.any() else -1
            raise self._refuse(f"holds neighbour indices outside the {done} rows seen (e.g. {example})")
        return torch.from_numpy(np.array(best_d)), torch.from_numpy(np.array(best_i)), done

    def save(self, best_d: torch.Tensor, best_i: torch.Tensor, next_row: int, cells=None) -> None:
        if self.path is None:
            return
        extra = {} if cells is None else dict(zip(("cell_d", "cell_i", "cell_n"), (c.numpy() for c in cells)))
        with _atomic_target(self.path) as tmp, open(tmp, "wb") as f:
            np.savez(
                f,
                best_d=best_d.numpy(),
                best_i=best_i.numpy(),
                next_row=np.int64(next_row),
                key=np.str_(self.key),
                **extra,
            )

    def remove(self) -> None:
        if self.path is not None and self.path.exists():
            self.path.unlink()


@dataclass
class PassStats:
    chunks: int = 0
    chunks_skipped: int = 0
    resumed_from_row: int = 0
    seconds: float = 0.0


def stream_topk(
    queries: torch.Tensor,
    train,
    k: int,
    *,
    space: Optional[_Space] = None,
    chunk_size: Optional[int] = None,
    backend: str = "auto",
    checkpoint: Optional[Path] = None,
    key: Optional[dict] = None,
    progress: Any = None,
    on_chunk: Optional[Callable[[int, int], None]] = None,
    cells: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
):
    """Exact top-k of queries [M, e] among the training points (mapped through `space`), chunk by chunk, with the
    state checkpointed after each chunk and resumed from a checkpoint with the same key.

    Each chunk runs the driver's top-k partial of the backend (ops.knn.partial_topk_checked: driver.partial_topk
    under knn's safety guard) and is merged into the state with ops.merge.merge_topk; the state checkpointed is that
    top-k state. The result equals one knn call over the whole set: the same indices (ties to the smaller index), the
    same float64 distances (to float64 rounding); faiss, not a driver backend, runs the public knn per chunk.

    cells: optional (centroids [C, e], query_cells [M] int64): in the same pass, each chunk's rows are given their
    nearest centroid and every query keeps its nearest training point among the rows of its own cell (a top-1 state
    merged the same way).

    Returns (sqdist [M, k] float64, index [M, k] int64, PassStats), and with cells a fourth item (cell_sqdist [M]
    float64, inf where the cell has no training point; cell_index [M] int64, -1 there; train_per_cell [C] int64).
    """
    M = queries.shape[0]
    check_queries(queries, "queries")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(train):
        raise InputError(f"k: expected an int in [1, N = {len(train)}] (training points), got {k!r}")
    name = _stream_backend(backend, queries, train, k)
    stats = PassStats()
    ck_key = {"k": k, "chunk_size": chunk_size, "queries": _sha(queries), **(key or {})}
    if cells is not None:
        cent, q_cells = cells[0].to(torch.float64), torch.as_tensor(cells[1], dtype=torch.int64)
        ck_key["cells"] = _sha(cent) + _sha(q_cells)
    ck = _Checkpoint(checkpoint, ck_key, n_cells=0 if cells is None else cent.shape[0])
    state = ck.load(M, k, len(train))
    if state is not None:
        best_d, best_i, done = state
        stats.resumed_from_row = done
    else:  # the state of the empty set: merging it with a chunk's state gives that state back
        best_d = torch.empty(M, 0, dtype=torch.float64)
        best_i = torch.empty(M, 0, dtype=torch.int64)
        done = 0
    cell_state = None
    if cells is not None:
        cell_state = ck.cell_state if state is not None else None
        if cell_state is None:
            cell_state = (
                torch.full((M,), float("inf"), dtype=torch.float64),
                torch.full((M,), -1, dtype=torch.int64),
                torch.zeros(cent.shape[0], dtype=torch.int64),
            )
    stop_after = int(os.environ.get(STOP_ENV, "0") or 0)
    t0 = time.perf_counter()
    if progress is not None and done:
        progress.update(min(done, len(train)))
    for start, Y in train.iter_chunks(chunk_size, device="cpu"):
        n = Y.shape[0]
        if start + n <= done:
            stats.chunks_skipped += 1
            continue
        if start < done:  # a chunk the checkpoint has partly seen (other chunk boundaries): its rows from `done` on
            Y, start, n = Y[done - start :], done, start + n - done
        F = Y if space is None or space.identity else space(Y, train.shape)
        _check_chunk(F, start, queries.shape[1])
        d2, idx = _chunk_topk(name, queries, F, min(k, n), start)
        best_d, best_i = merge_topk(best_d, best_i, d2, idx, k)
        if cells is not None:
            cell_state = _cell_nn_chunk(queries, q_cells, cent, F, start, cell_state, name)
        done = start + n
        ck.save(best_d, best_i, done, cell_state)
        stats.chunks += 1
        if progress is not None:
            progress.update(n)
        if on_chunk is not None:
            on_chunk(stats.chunks, done)
        if stop_after and stats.chunks >= stop_after:
            os._exit(75)
    # as knn: a row whose k-th squared distance overflows even float64 over the whole set cannot be ranked
    over = ~torch.isfinite(best_d[:, -1]) if best_d.shape[1] else torch.zeros(M, dtype=torch.bool)
    if bool(over.any()):
        raise float64_overflow_error(over.nonzero().squeeze(1))
    stats.seconds = time.perf_counter() - t0
    if cells is not None:
        return best_d, best_i, stats, cell_state
    return best_d, best_i, stats


def _stream_backend(backend: str, queries: torch.Tensor, train, k: int) -> str:
    """The knn backend a streamed pass runs, resolved as knn resolves it for the queries' device; a driver backend is
    checked once for the pass (as driver.topk_state checks it)."""
    name, _ = dispatch.resolve("knn", backend, queries.device)
    if name != "faiss":
        driver.topk_backend(name).check(queries, train, k)
    return name


def _check_chunk(F: torch.Tensor, start: int, e: int) -> None:
    """The checks knn makes of a training set, for one streamed chunk F [n, e'] of rows start..: floating, finite (the
    first bad row named by its row in the training set), e' = e features as the queries."""
    check_float(F, "train")
    if F.ndim != 2 or F.shape[1] != e:
        raise InputError(f"train: rows of {list(F.shape[1:])} features do not match queries of {e} features")
    if checks_enabled() and F.numel() and not bool(torch.isfinite(F).all()):
        row = start + int((~torch.isfinite(F)).any(dim=1).nonzero()[0, 0])
        raise InputError(f"train: contains NaN or Inf (first at row {row}); expected finite values")


def _chunk_topk(name: str, x: torch.Tensor, F: torch.Tensor, k: int, start: int):
    """The exact top-k state (sqdist [m, k] float64, index [m, k] int64, indices start + row of F) of x among the
    rows of the chunk F."""
    if x.shape[0] == 0:
        return torch.empty(0, k, dtype=torch.float64), torch.empty(0, k, dtype=torch.int64)
    if name == "faiss":
        # faiss is not a driver backend (an index, not a chunk partial: ops/knn/faiss.py): its chunk state comes from
        # the public knn over the chunk as before (its exact IndexFlatL2 search, re-rank and the safety guard), and is
        # merged by the same merge_topk as every other backend's
        d2, idx, _ = knn_sqdist64(x, F, k, backend="faiss")
        return d2, idx + start
    d2, idx = partial_topk_checked(name, x, F, k, start)
    return d2.cpu(), idx.cpu()


def _cell_nn_chunk(queries, q_cells, cent, F, start: int, state, name: str):
    """The state (cell_d, cell_i, cell_n) after one chunk F of training rows starting at row `start`: the rows' cells
    (nearest centroid), their count per cell, and each query's top-1 state among the rows of its own cell, the
    chunk's (the driver's partial over the chunk's rows of that cell) merged into it by merge_topk (so ties go to
    the smaller row)."""
    cell_d, cell_i, cell_n = (t.clone() for t in state)
    r_cells = assign_cells(F, cent)
    cell_n += torch.bincount(r_cells, minlength=cell_n.shape[0])
    for c in np.intersect1d(r_cells.unique().numpy(), q_cells.unique().numpy()):
        qi = (q_cells == int(c)).nonzero()[:, 0]
        ri = (r_cells == int(c)).nonzero()[:, 0]  # ascending: the chunk's order by row is the training set's
        d2, idx = _chunk_topk(name, queries[qi], F[ri], 1, 0)
        d, i = merge_topk(cell_d[qi, None], cell_i[qi, None], d2, ri[idx] + start, 1)
        cell_d[qi], cell_i[qi] = d[:, 0], i[:, 0]
    return cell_d, cell_i, cell_n


@dataclass
class ScoreResult:
    """Per-sample facts and the summary of `score`.

    per_sample: numpy arrays of length M: nn_index [M, k], nn_dist [M, k] (L2), ratio, memorized, and when
    computed: inauthentic, train_nn_other_dist (the nearest training point's distance to its own nearest other
    training point), cell. heldout: the same nn facts for the held-out samples (or None). summary: JSON-ready dict.
    """

    per_sample: dict
    heldout: Optional[dict]
    summary: dict
    ct: Optional[dict] = None
    extra: dict = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        return float(self.summary["fraction_memorized"])


def _as_set(obj, name: str, scale: str = "[-1,1]"):
    from diffgen_fast.data import TrainingSet

    if obj is None:
        return None
    if isinstance(obj, (str, os.PathLike)):  # uint8 files are scaled to the training set's convention
        return TrainingSet.open(obj, name=name, scale=scale)
    return TrainingSet.coerce(obj, name=name)


def _names_of(ts, rows: np.ndarray) -> np.ndarray:
    """Source names of training rows ("" where a search found no neighbour, index -1)."""
    rows = np.asarray(rows)
    out = np.full(len(rows), "", dtype=object)
    ok = rows >= 0
    if ok.any():
        out[ok] = ts.names(rows[ok])
    return out.astype(str)


def _features_of(ts, space: _Space) -> torch.Tensor:
    x = ts.flat().to("cpu")
    return x if space.identity else space(x, ts.shape)


def score(
    samples,
    train,
    *,
    heldout=None,
    threshold: float = 1 / 3,
    k: int = 2,
    embed: Optional[Callable] = None,
    metric: str = "l2",
    train_features=None,
    sample_features=None,
    heldout_features=None,
    backend: str = "auto",
    index: Any = None,
    chunk_size: Optional[int] = None,
    checkpoint_dir=None,
    resume: bool = True,
    progress: bool = False,
    n_cells: Optional[int] = None,
    tau: Optional[float] = None,
    ct_variant: str = "reference",
    check_authenticity: bool = True,
    seed: int = 0,
    on_chunk: Optional[Callable[[int, int], None]] = None,
    on_range_mismatch: str = "warn",
) -> ScoreResult:
    """Run the memorization tests of generated samples against a training set.

    Args:
        samples: generated samples [M, *shape] (tensor, array, TrainingSet or path).
        train: the training set (TrainingSet, tensor, array or path: .npy memory-mapped, .npz, image folder, EDM zip,
            CIFAR-10); streamed in chunks of `chunk_size` rows.
        heldout: optional real samples not in the training set; enables C_T and the train-vs-heldout comparison.
        threshold: the ratio test's threshold (memorized when d1 / d2 < threshold).
        k: neighbours kept per sample (>= 2).
        embed: optional callable mapping a batch [b, *shape] to features [b, e]: distances in that space.
        metric: "l2" or "cosine" (features normalised to unit length).
        train_features, sample_features, heldout_features: precomputed embeddings ([N, e] arrays or .npy paths) used
            instead of the points (all that are used must be given together).
        backend: knn backend of each chunk (auto, cpu, torch, cuda, faiss).
        index: a faiss index kind, factory string, FaissIndex or saved .faiss path: search it instead of streaming
            (approximate kinds report recall). Not resumable (one search).
        checkpoint_dir: folder for the per-pass checkpoints (None: no checkpoints); resume: use them.
        n_cells: k-means cells of C_T (default 50, fitted on at most 20,000 training points; capped at N).
        tau: C_T keeps the cells whose share of the samples exceeds tau (default 20 / number of samples).
        ct_variant: "reference" (Meehan et al.'s code: nearest training point within the cell) or "global_nn"
            (nearest training point overall); see metrics.copying.c_t.
        check_authenticity: run the second pass (nearest other training point of each sample's nearest).
        on_chunk: callable(chunks_done, rows_done) after each chunk (for progress or tests).
        on_range_mismatch: "warn" (RangeMismatchWarning), "error" (InputError) or "ignore" when the samples' or
            held-out values are far from the training set's value range (see diffgen_fast.layout.RANGE_RULE),
            checked before any pass.

    Samples (and held-out points) must have the training items' shape, or be flat: a set in the channels-last
    layout of channels-first training items (or the reverse) is permuted to the training layout, other shapes are
    refused. uint8 files (.npy / .npz / images) are scaled to the training set's convention. Every conversion is
    listed in ``summary["conversions"]``; the aligned sets are in ``result.extra["samples"]`` / ``["heldout"]``.
    """
    from diffgen_fast.data import TrainingSet

    t_start = time.perf_counter()
    if (
        isinstance(threshold, bool)
        or not isinstance(threshold, (int, float))
        or not threshold > 0
        or not np.isfinite(threshold)
    ):
        raise InputError(f"threshold: expected a finite number > 0, got {threshold!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise InputError(f"k: expected an int >= 2 (the ratio test needs two neighbours), got {k!r}")
    space = _Space(embed, metric)
    ts_pts = TrainingSet.coerce(train, name="train")
    precomputed = train_features is not None or sample_features is not None or heldout_features is not None
    if on_range_mismatch not in ("warn", "error", "ignore"):
        raise InputError(f"on_range_mismatch: expected 'warn', 'error' or 'ignore', got {on_range_mismatch!r}")
    t_range = training_range(ts_pts) if on_range_mismatch != "ignore" else ts_pts.value_range
    smp = _as_set(samples, "samples", scale_for(t_range))
    ho = _as_set(heldout, "heldout", scale_for(t_range))
    smp = align_layout(smp, ts_pts, "samples", strict=not precomputed)
    ho = align_layout(ho, ts_pts, "heldout", strict=not precomputed) if ho is not None else None
    ranges = {}
    if not precomputed and on_range_mismatch != "ignore":
        for name, st in (("samples", smp), ("heldout", ho)):
            if st is not None:
                ranges[name] = check_range(st, ts_pts, name, on_mismatch=on_range_mismatch)
    if precomputed:
        if embed is not None:
            raise InputError("embed: give either an embedding callable or precomputed features, not both")
        if train_features is None or sample_features is None or (ho is not None and heldout_features is None):
            raise InputError(
                "train_features: precomputed features must be given for the training set and the samples (and the "
                "held-out set when there is one)"
            )
        ts = TrainingSet.coerce(train_features, name="train_features")
        if len(ts) != len(ts_pts):
            raise InputError(f"train_features: {len(ts)} rows for {len(ts_pts)} training points")
        q_smp = TrainingSet.coerce(sample_features, name="sample_features").flat().to("cpu")
        if q_smp.shape[0] != len(smp):
            raise InputError(f"sample_features: {q_smp.shape[0]} rows for {len(smp)} samples")
        q_ho = None
        if ho is not None:
            q_ho = TrainingSet.coerce(heldout_features, name="heldout_features").flat().to("cpu")
            if q_ho.shape[0] != len(ho):
                raise InputError(f"heldout_features: {q_ho.shape[0]} rows for {len(ho)} held-out samples")
        if q_smp.shape[1] != ts.d or (q_ho is not None and q_ho.shape[1] != ts.d):
            raise InputError(f"sample_features: expected {ts.d} features per row (as train_features)")
        feat_space = _Space(None, metric)
        q_smp = feat_space(q_smp, ())
        q_ho = feat_space(q_ho, ()) if q_ho is not None else None
        space_name = "precomputed features"
        stream_space = feat_space
    else:
        ts = ts_pts
        for name, s in (("samples", smp), ("heldout", ho)):
            if s is not None and s.d != ts.d:
                raise InputError(f"{name}: items of d = {s.d} values do not match train items of d = {ts.d}")
        q_smp = _features_of(smp, space)
        q_ho = _features_of(ho, space) if ho is not None else None
        space_name = "pixel" if embed is None else f"embedding {getattr(embed, '__name__', type(embed).__name__)}"
        stream_space = space
    if k > len(ts):
        raise InputError(f"k: expected k <= N = {len(ts)} training points, got {k}")
    if ct_variant not in CT_VARIANTS:
        raise InputError(f"ct_variant: expected one of {', '.join(CT_VARIANTS)}, got {ct_variant!r}")
    if n_cells is not None and (isinstance(n_cells, bool) or not isinstance(n_cells, int) or n_cells < 1):
        raise InputError(f"n_cells: expected an int >= 1, got {n_cells!r}")
    M = q_smp.shape[0]
    H = 0 if q_ho is None else q_ho.shape[0]
    queries = q_smp if q_ho is None else torch.cat([q_smp, q_ho.to(q_smp.dtype)])
    ck_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ck_dir is not None and not resume:
        for p in ck_dir.glob("pass-*.npz") if ck_dir.is_dir() else []:
            p.unlink()
    key = {"train": ts.fingerprint(), "n": len(ts), "metric": metric, "space": space_name, "backend": backend}
    passes: dict[str, Any] = {}

    def run_pass(name: str, q: torch.Tensor, kk: int, desc: str, hook=None, cells=None):
        bar = _bar(progress, len(ts), desc)
        try:
            return stream_topk(
                q,
                ts,
                kk,
                space=stream_space,
                chunk_size=chunk_size,
                backend=backend,
                checkpoint=ck_dir / f"pass-{name}.npz" if ck_dir else None,
                key=key,
                progress=bar,
                on_chunk=hook,
                cells=cells,
            )
        finally:
            if bar is not None:
                bar.close()

    # C_T's cells: k-means centroids of the training set, every query given its nearest centroid; the nearest
    # training point within each query's cell is found in the neighbours pass (the training rows get their cells
    # chunk by chunk)
    cells = cell_nn = None
    if H:
        cent = _kmeans_centroids(ts, stream_space, n_cells or CT_CELLS_DEFAULT, seed)
        cells = (cent, assign_cells(queries, cent))
    index_info = None
    if index is not None:
        if not stream_space.identity:
            raise InputError("index: a faiss index searches the stored points; use it with pixel space or features")
        d2, idx, index_info = knn_sqdist64(queries, ts, k, backend="faiss", index=index)
        d2, idx = torch.as_tensor(d2).double(), torch.as_tensor(idx)
        passes["neighbours"] = PassStats(chunks=1)
        if cells is not None:  # the per-cell search streams the training set (exact)
            *_, passes["cells"], cell_nn = run_pass("cells", queries, 1, "C_T cells", cells=cells)
    elif cells is not None:
        d2, idx, passes["neighbours"], cell_nn = run_pass(
            "neighbours", queries, k, "nearest neighbours", on_chunk, cells=cells
        )
    else:
        d2, idx, passes["neighbours"] = run_pass("neighbours", queries, k, "nearest neighbours", on_chunk)
    # the ratio test of memorization(), on the first two neighbours of samples and held-out points
    facts = MemorizationResult.from_neighbours(d2[:, :2], idx[:, :2], threshold, n_train=len(ts))
    nn_index, nn_dist = idx.numpy(), d2.clamp(min=0).sqrt().numpy()
    ratio, memorized = facts.ratio.numpy(), facts.memorized.numpy()

    def nn_facts(rows: slice) -> dict:
        return {
            "nn_index": nn_index[rows],
            "nn_dist": nn_dist[rows],
            "ratio": ratio[rows],
            "memorized": memorized[rows],
        }

    per = nn_facts(slice(0, M))
    held = nn_facts(slice(M, M + H)) if H else None
    # source names: file names of image folders / zips, "source[row]" of arrays
    per["sample_name"] = np.array(smp.names())
    per["nn_name"] = _names_of(ts_pts, nn_index[:M, 0])
    if held is not None:
        held["sample_name"] = np.array(ho.names())
        held["nn_name"] = _names_of(ts_pts, nn_index[M:, 0])
    # authenticity: the nearest other training point of each sample's nearest training point
    if check_authenticity and len(ts) >= 2:
        uniq = np.unique(nn_index[:M, 0])
        uq = torch.from_numpy(uniq)
        rows = ts[uq].reshape(len(uniq), -1).to("cpu")
        q_tr = rows if stream_space.identity else stream_space(rows, ts.shape)
        ad, ai, passes["authenticity"] = run_pass("authenticity", q_tr.to(queries.dtype), 2, "authenticity")
        ad = ad.clamp(min=0).sqrt()
        other = torch.where(ai[:, 0] == uq, ad[:, 1], ad[:, 0]).numpy()
        lookup = dict(zip(uniq.tolist(), other.tolist()))
        t_other = np.array([lookup[i] for i in nn_index[:M, 0]], dtype=np.float64)
        per["train_nn_other_dist"] = t_other
        per["inauthentic"] = authenticity(nn_dist[:M, 0], t_other)
    ct = None
    if cells is not None:
        c_all = cells[1].numpy()
        cell_d, _, train_per_cell = cell_nn
        dist = cell_d.sqrt().numpy() if ct_variant == "reference" else nn_dist[:, 0]
        per["cell"] = c_all[:M]
        held["cell"] = c_all[M:]
        per["cell_nn_dist"] = cell_d[:M].sqrt().numpy()
        held["cell_nn_dist"] = cell_d[M:].sqrt().numpy()
        ct = ct_from_distances(
            dist[:M], c_all[:M], dist[M:], c_all[M:], train_per_cell.numpy(), tau=tau, variant=ct_variant
        )
    summary = _summary(per, held, ct, ts, threshold, k, metric, space_name, backend, index_info, passes, smp, M, H)
    summary["samples"] = {"source": smp.source, "n": len(smp), "shape": list(smp.shape)}
    if ho is not None:
        summary["heldout"]["source"] = ho.source
        summary["heldout"]["shape"] = list(ho.shape)
    summary["conversions"] = {
        n: st.conversions for n, st in (("train", ts_pts), ("samples", smp), ("heldout", ho)) if st is not None
    }
    if ranges:
        summary["range_check"] = {"rule": RANGE_RULE, **ranges}
    summary["seconds"] = round(time.perf_counter() - t_start, 3)
    if ck_dir is not None:
        for p in ck_dir.glob("pass-*.npz") if ck_dir.is_dir() else []:
            p.unlink()
    return ScoreResult(per_sample=per, heldout=held, summary=summary, ct=ct, extra={"samples": smp, "heldout": ho})


def _kmeans_centroids(ts, space: _Space, cells: int, seed: int) -> torch.Tensor:
    """k-means centroids of (a sample of at most 20,000 of) the training points in the scoring space."""
    g = torch.Generator().manual_seed(seed)
    m = min(len(ts), 20_000)
    rows = torch.randperm(len(ts), generator=g)[:m].sort().values
    x = ts[rows].reshape(m, -1).to("cpu")
    f = x if space.identity else space(x, ts.shape)
    return torch.from_numpy(kmeans_centroids(f.double().numpy(), cells, seed)).to(torch.float64)


def _summary(per, held, ct, ts, threshold, k, metric, space_name, backend, index_info, passes, smp, M, H) -> dict:
    med = lambda a: float(np.median(a)) if len(a) else float("nan")  # noqa: E731
    s = {
        "test": "nearest-neighbour ratio ||x - NN1|| / ||x - NN2|| < threshold (Yoon et al. 2023)",
        "threshold": float(threshold),
        "k": int(k),
        "distance": "L2 (not squared)" if metric == "l2" else "L2 between unit-normalised features (sqrt(2 - 2 cos))",
        "metric": metric,
        "space": space_name,
        "value_range": list(ts.value_range) if ts.value_range is not None else None,
        "train": {
            "source": ts.source,
            "n": len(ts),
            "d": ts.d,
            "shape": list(ts.shape),
            "fingerprint": ts.fingerprint(),
        },
        "n_samples": int(M),
        "n_heldout": int(H),
        "n_memorized": int(per["memorized"].sum()),
        "fraction_memorized": float(per["memorized"].mean()) if M else float("nan"),
        "ratio_median": med(per["ratio"]),
        "nn_dist_median": med(per["nn_dist"][:, 0]),
        "backend": backend,
        "exact": index_info is None or bool(index_info.get("exact")),
        "index": index_info,
        "passes": {n: vars(p) for n, p in passes.items()},
    }
    if "inauthentic" in per:
        s["authenticity"] = {
            "test": "inauthentic when d(x, NN1) < d(NN1, nearest other training point) (Alaa et al. 2022)",
            "n_inauthentic": int(per["inauthentic"].sum()),
            "fraction_inauthentic": float(per["inauthentic"].mean()) if M else float("nan"),
        }
    if held is not None:
        s["heldout"] = {
            "fraction_memorized": float(held["memorized"].mean()),
            "ratio_median": med(held["ratio"]),
            "nn_dist_median": med(held["nn_dist"][:, 0]),
        }
    if ct is not None:
        s["C_T"] = {
            "test": ct["definition"] + "; strongly negative = copying, ~0 = like fresh data",
            **{k2: v for k2, v in ct.items()},
        }
    return s


def _bar(progress: bool, total: int, desc: str):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="pt", unit_scale=True, leave=False, dynamic_ncols=True)


__all__ = ["score", "ScoreResult", "stream_topk", "METRICS"]
