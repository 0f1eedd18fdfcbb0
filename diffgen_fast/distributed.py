"""Multi-process (torch.distributed) versions of the training-set reductions: each rank holds one shard.

Every rank of a process group holds rows ``[start, stop)`` of the training set (a :class:`ShardedTrainingSet`),
computes the partial state of its shard -- the softmax state (m, l, q, o) or the top-k state (sqdist, index) of
:mod:`diffgen_fast.ops.merge` -- and the states of all ranks are gathered (one ``all_gather``) and merged exactly with
the same rules, in rank order, so that **every rank returns the same full result**, equal to the single-process one
up to float rounding of the merge (knn indices and memorization exactly).

Conventions:
  * The queries (and sigma / alpha / bandwidth) must be the same on every rank. A cheap fingerprint of them is
    compared across ranks (``check_queries=True``, one tiny all_gather) and a mismatch raises InputError.
  * Collectives run on CPU tensors for gloo and on the current CUDA device for NCCL; the results are returned on the
    queries' device (numpy in, numpy out, like the single-process functions).
  * An error on one rank (a NaN in its shard, an unavailable backend) is raised on every rank: the failing rank
    raises its own error, the others a :class:`DistributedError`, so that no rank hangs in a collective.
  * Without an initialized process group everything runs in one process (world size 1), no init needed.

Launch with ``torchrun --nproc_per_node=P script.py`` and call :func:`init_from_env` first.
"""

from __future__ import annotations

import math
import os
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from diffgen_fast.data import TrainingSet
from diffgen_fast.errors import DiffgenError, InputError, InputTypeError
from diffgen_fast.metrics.memorization import MemorizationResult
from diffgen_fast.ops import dispatch, driver
from diffgen_fast.ops._checks import acc_dtype, check_precision, check_queries, per_query
from diffgen_fast.ops._prepare import back
from diffgen_fast.ops.merge import SoftmaxState, finalize_softmax_state, merge_softmax_states, select_topk
from diffgen_fast.ops.softmax_denoise.reference import DenoiseResult

__all__ = [
    "DistributedError",
    "ShardedTrainingSet",
    "init_from_env",
    "shard_bounds",
    "softmax_denoise",
    "kde_log_density",
    "knn",
    "memorization",
]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class DistributedError(DiffgenError, RuntimeError):
    """Another rank failed (its own error is raised there), or the process group is unusable."""


# ----------------------------------------------------------------------------------------------------------------------
# process group helpers


def init_from_env(backend: Optional[str] = None, **kw: Any) -> tuple[int, int]:
    """Initialize the default process group when launched by torchrun (env RANK and WORLD_SIZE set).

    Args:
        backend: "nccl" or "gloo"; None picks "nccl" when CUDA is available, else "gloo". With NCCL the current CUDA
            device is set to LOCAL_RANK.
        **kw: passed to torch.distributed.init_process_group (e.g. timeout).

    Returns:
        (rank, world_size); (0, 1) without RANK / WORLD_SIZE in the environment (single process, nothing is
        initialized) or the values of the already initialized default group.
    """
    if not dist.is_available():
        return 0, 1
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, **kw)
    return dist.get_rank(), dist.get_world_size()


class _Comm:
    """rank / world / device of a process group, or a single process when torch.distributed is not initialized."""

    def __init__(self, group: Any = None) -> None:
        initialized = dist.is_available() and dist.is_initialized()
        if not initialized:
            if group is not None:
                raise InputError(
                    "group: torch.distributed is not initialized; call diffgen_fast.distributed.init_from_env() "
                    "(or torch.distributed.init_process_group) first"
                )
            world_env = int(os.environ.get("WORLD_SIZE", "1") or 1)
            if world_env > 1:
                raise InputError(
                    f"group: launched with WORLD_SIZE={world_env} but torch.distributed is not initialized; call "
                    "diffgen_fast.distributed.init_from_env() first"
                )
            self.group, self.rank, self.world, self.device = None, 0, 1, torch.device("cpu")
            return
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        if self.rank < 0:
            raise InputError("group: this process is not a member of the given process group")
        name = str(dist.get_backend(group)).lower()
        if "nccl" in name:
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """[world, *t.shape] on t's device; every rank must pass the same shape and dtype."""
        if self.world == 1:
            return t[None]
        src = t.to(self.device).contiguous()
        out = [torch.empty_like(src) for _ in range(self.world)]
        dist.all_gather(out, src, group=self.group)
        return torch.stack(out).to(t.device)

    def all_gather_object(self, obj: Any) -> list:
        if self.world == 1:
            return [obj]
        out: list = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out


def shard_bounds(n: int, world: int, rank: int) -> tuple[int, int]:
    """[start, stop) rows of rank ``rank`` when n rows are split over ``world`` ranks as evenly as possible (the first
    n % world ranks get one row more; ranks beyond n get an empty shard)."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


# ----------------------------------------------------------------------------------------------------------------------
# the sharded training set


class ShardedTrainingSet:
    """This rank's shard, rows ``[start, stop)`` of a training set of N points split over a process group.

    Build it with ``ShardedTrainingSet(train)`` / :meth:`from_full` (every rank names the whole set and keeps its own
    rows; a path or memory-mapped .npy stays memory-mapped, so each rank only reads its rows) or :meth:`from_local`
    (every rank already holds its own rows). Memory per rank is its shard only (for an in-memory tensor passed
    whole, the shard is a view of it: pass a path or memmap to avoid holding the full set on every rank).

    Args:
        train: TrainingSet, [N, d] / [N, *shape] tensor or array, or a path TrainingSet.open reads (.npy memmapped).
        group: torch.distributed process group; None is the default group, or a single process when
            torch.distributed is not initialized.
        device: optional device to serve the shard on (e.g. "cuda" for NCCL); None keeps the set's device.

    Attributes:
        local: TrainingSet of this rank's rows [stop - start, d], or None for an empty shard (N < world).
        start, stop: global row range of this shard; global index = start + local index.
        n (and len()): global N. d, shape, dtype: as for TrainingSet. rank, world: this process in the group.
        bounds: [(start, stop)] of every rank.
    """

    def __init__(self, train: Any, *, group: Any = None, device: Any = None) -> None:
        comm = _Comm(group)
        ts = TrainingSet.coerce(train, name="train")
        start, stop = shard_bounds(len(ts), comm.world, comm.rank)
        local = ts.subset(slice(start, stop)) if stop > start else None
        if local is not None and device is not None:
            local = local.to(device)
        bounds = [shard_bounds(len(ts), comm.world, r) for r in range(comm.world)]
        self._init(comm, local, bounds, ts.shape, ts.dtype, ts.value_range)

    @classmethod
    def from_full(cls, train: Any, *, group: Any = None, device: Any = None) -> ShardedTrainingSet:
        """Same as ``ShardedTrainingSet(train, group=group, device=device)``."""
        return cls(train, group=group, device=device)

    @classmethod
    def from_local(
        cls,
        local: Any,
        *,
        group: Any = None,
        shape: Optional[tuple] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> ShardedTrainingSet:
        """Wrap the rows this rank already holds; the global order is rank 0's rows, then rank 1's, ...

        Args:
            local: this rank's rows (TrainingSet, [n_r, *shape] tensor / array, or path), or None for an empty shard.
            group: process group (see the class).
            shape, dtype: item shape and dtype, needed only when every rank's shard is empty; otherwise taken from
                the non-empty shards, which must agree.
        One all_gather_object of (n_r, shape, dtype) is made; every rank must call it.
        """
        comm = _Comm(group)
        ts = None
        if local is not None and not (isinstance(local, (torch.Tensor, np.ndarray)) and local.shape[0] == 0):
            ts = TrainingSet.coerce(local, name="local")
        meta = (0, None, None, None) if ts is None else (len(ts), tuple(ts.shape), str(ts.dtype), ts.value_range)
        metas = comm.all_gather_object(meta)
        shapes = {m[1] for m in metas if m[0] > 0}
        dtypes = {m[2] for m in metas if m[0] > 0}
        if len(shapes) > 1:
            raise InputError(f"local: the ranks' shards have different item shapes {sorted(shapes)}; expected one")
        if len(dtypes) > 1:
            raise InputError(f"local: the ranks' shards have different dtypes {sorted(dtypes)}; expected one")
        if shapes:
            shape = shapes.pop()
            dtype_name = dtypes.pop()
            dtype = next(dt for dt in _DTYPES if str(dt) == dtype_name)
        elif shape is None or dtype is None:
            raise InputError("shape: every shard is empty; pass shape= and dtype= to from_local")
        bounds, pos = [], 0
        for m in metas:
            bounds.append((pos, pos + m[0]))
            pos += m[0]
        self = cls.__new__(cls)
        value_range = next((m[3] for m in metas if m[3] is not None), None)
        self._init(comm, ts, bounds, tuple(shape), dtype, value_range)
        return self

    def _init(
        self,
        comm: _Comm,
        local: Optional[TrainingSet],
        bounds: list,
        shape: tuple,
        dtype: torch.dtype,
        value_range: Any = None,
    ) -> None:
        self._comm = comm
        self.local = local
        self.bounds = list(bounds)
        self.start, self.stop = bounds[comm.rank]
        self.n = bounds[-1][1]
        self.shape = tuple(shape)
        self.d = math.prod(self.shape)
        self.dtype = dtype
        self.value_range = value_range
        self.rank, self.world, self.group = comm.rank, comm.world, comm.group

    def __len__(self) -> int:
        return self.n

    @property
    def local_n(self) -> int:
        """Rows of this rank's shard (0 for an empty shard)."""
        return self.stop - self.start

    @property
    def labels(self) -> Optional[torch.Tensor]:
        """This shard's labels [local_n] (None without labels or for an empty shard)."""
        return None if self.local is None else self.local.labels

    def __repr__(self) -> str:
        return (
            f"ShardedTrainingSet(rank={self.rank}/{self.world}, rows=[{self.start}, {self.stop}) of N={self.n}, "
            f"shape={self.shape}, dtype={str(self.dtype).replace('torch.', '')})"
        )


def _as_sharded(sharded: Any) -> ShardedTrainingSet:
    if isinstance(sharded, ShardedTrainingSet):
        return sharded
    raise InputTypeError(
        f"sharded: expected a ShardedTrainingSet (diffgen_fast.distributed.ShardedTrainingSet(train)), "
        f"got {type(sharded).__name__}"
    )


# ----------------------------------------------------------------------------------------------------------------------
# the two-collective protocol: (1) check the queries agree, (2) gather the partial states


def _fingerprint(x2: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
    """[2 + 2 * (1 + len(extra))] float64 fingerprint of the queries (and per-query parameters)."""
    vals = [float(x2.shape[0]), float(x2.shape[1])]
    for t in (x2, *extra):
        f = t.reshape(-1).to(torch.float64)
        w = torch.linspace(1.0, 2.0, f.numel(), dtype=torch.float64, device=f.device) if f.numel() else f
        vals += [float(f.sum()), float((f * w).sum())]
    return torch.tensor(vals, dtype=torch.float64)


def _check_all(comm: _Comm, error: Optional[BaseException], fp: Optional[torch.Tensor], n_fp: int, what: str) -> None:
    """Collective 1: an error flag and the queries' fingerprint of every rank; raise on every rank if needed."""
    row = torch.zeros(1 + n_fp, dtype=torch.float64)
    row[0] = 1.0 if error is not None else 0.0
    if error is None and fp is not None:
        row[1:] = fp
    rows = comm.all_gather(row)
    _raise_if_failed(comm, error, rows[:, 0])
    if fp is None:
        return
    ref = rows[0, 1:]
    for r in range(1, comm.world):
        other = rows[r, 1:]
        if int(other[0]) != int(ref[0]) or int(other[1]) != int(ref[1]):
            raise InputError(
                f"{what}: rank {r} has queries of shape [{int(other[0])}, {int(other[1])}], rank 0 has "
                f"[{int(ref[0])}, {int(ref[1])}]; pass the same queries on every rank"
            )
        if not torch.equal(other, ref):
            raise InputError(
                f"{what}: the queries (or sigma / alpha / bandwidth) on rank {r} differ from rank 0's; pass the same "
                "values on every rank (draw them from the same seed, or torch.distributed.broadcast them)"
            )


def _raise_if_failed(comm: _Comm, error: Optional[BaseException], flags: torch.Tensor) -> None:
    failed = [r for r in range(comm.world) if float(flags[r]) != 0.0]
    if not failed:
        return
    if error is not None:
        raise error
    raise DistributedError(f"rank(s) {failed} failed while computing their partial result; see the error there")


def _prepare_queries(x: Any, sharded: ShardedTrainingSet, name: str):
    """(x as a tensor [M, *shape], x flattened [M, d] contiguous, was_numpy), checked like the single-process ops."""
    xt, was_np = check_queries(x, name)
    M = xt.shape[0]
    d = math.prod(xt.shape[1:])
    if d != sharded.d:
        raise InputError(
            f"{name}: items of shape {tuple(xt.shape[1:])} (d={d}) do not match the training items of shape "
            f"{sharded.shape} (d={sharded.d}); expected the same number of values per item"
        )
    return xt, xt.reshape(M, d).contiguous(), was_np


_STATE_COLS = 4  # packed state: error flag, m, l, q, then o


def _local_softmax(x2, sharded, s, a, backend, precision, need_out) -> torch.Tensor:
    """This shard's softmax state from the driver, packed as [M, 4 + d] float64: (flag, m, l, q, o).

    The state is the one every backend's partials merge into (diffgen_fast.ops.driver.softmax_state), not finalised;
    an empty shard packs the empty state (m = -inf, l = q = 0, o = 0), the identity of the merge.
    """
    M, d = x2.shape
    cols = _STATE_COLS + (d if need_out else 0)
    packed = torch.zeros(M, cols, dtype=torch.float64, device=x2.device)
    packed[:, 1] = float("-inf")
    local = sharded.local
    if local is None:
        return packed
    local.check_finite()
    name, _ = dispatch.resolve("softmax_denoise", backend, x2.device, torch.promote_types(x2.dtype, local.dtype), d=d)
    state = driver.softmax_state(
        name, x2, local, s, a, precision=precision if need_out else "exact", need_out=need_out
    )
    packed[:, 1] = state.m.to(torch.float64)
    packed[:, 2] = state.l.to(torch.float64)
    packed[:, 3] = state.q.to(torch.float64)
    if need_out:
        packed[:, _STATE_COLS:] = state.o.to(torch.float64)
    return packed


def _merge_packed_softmax(allp: torch.Tensor, need_out: bool):
    """[world, M, 4 + d] gathered states -> (out [M, d] float64 or None, lse, top_weight, n_eff), merged in rank
    order with merge_softmax_states and finalised with finalize_softmax_state, as in the single-process driver."""
    state = None
    for p in allp:
        st = SoftmaxState(p[:, 1], p[:, 2], p[:, 3], p[:, _STATE_COLS:] if need_out else None)
        state = st if state is None else merge_softmax_states(state, st)
    return finalize_softmax_state(state)


def _meta_fp(x2: torch.Tensor, n_fp: int) -> torch.Tensor:
    fp = torch.zeros(n_fp, dtype=torch.float64)
    fp[0], fp[1] = float(x2.shape[0]), float(x2.shape[1])
    return fp


def _gather_checked(comm: _Comm, packed: torch.Tensor, error: Optional[BaseException]) -> torch.Tensor:
    """Collective 2: gather packed [1 + M, C] (row 0 holds the error flag) of every rank -> [world, M, C]."""
    packed[0, 0] = 1.0 if error is not None else 0.0
    allp = comm.all_gather(packed)
    _raise_if_failed(comm, error, allp[:, 0, 0])
    return allp[:, 1:]


def _front(comm, x, sharded, params, names, name, check_queries_):
    """Validate the queries on every rank and run collective 1. Returns (xt, x2, was_np, per-query params)."""
    error, fp = None, None
    xt = x2 = was_np = None
    per: list = []
    n_fp = 2 + 2 * (1 + len(params))
    try:
        xt, x2, was_np = _prepare_queries(x, sharded, name)
        M = x2.shape[0]
        per = [per_query(v, M, nm, device=x2.device) for v, nm in zip(params, names)]
        fp = _fingerprint(x2, *per) if check_queries_ else _meta_fp(x2, n_fp)
    except Exception as e:  # raised on every rank by _check_all, after the collective
        error = e
    if comm.world == 1:
        if error is not None:
            raise error
    else:
        _check_all(comm, error, fp, n_fp, name)
    return xt, x2, was_np, per


def _run_softmax(x, sharded, params, names, backend, precision, need_out, check_queries_):
    """Shared body of softmax_denoise and kde_log_density: returns (xt, x2, was_np, out, lse, top_w, n_eff)."""
    sharded = _as_sharded(sharded)
    comm = sharded._comm
    xt, x2, was_np, per = _front(comm, x, sharded, params, names, "x", check_queries_)
    M, d = x2.shape
    cols = _STATE_COLS + (d if need_out else 0)
    packed = torch.zeros(1 + M, cols, dtype=torch.float64, device=x2.device)
    error = None
    try:
        packed[1:] = _local_softmax(x2, sharded, per[0], per[1], backend, precision, need_out)
    except Exception as e:
        error = e
    allp = _gather_checked(comm, packed, error)
    out, lse, top_w, n_eff = _merge_packed_softmax(allp, need_out)
    return xt, x2, was_np, out, lse, top_w, n_eff


def softmax_denoise(
    x: Any,
    sharded: ShardedTrainingSet,
    sigma: Any,
    alpha: Any = 1.0,
    *,
    return_lse: bool = False,
    return_stats: bool = False,
    backend: str = "auto",
    precision: str = "auto",
    check_queries: bool = True,
):
    """The empirical optimal denoiser over a training set sharded across ranks (see diffgen_fast.softmax_denoise).

    Every rank must call it with the same x, sigma, alpha; every rank returns the same full result.

    Args:
        x: [M, *shape] or [M, d] noisy queries (torch or numpy, floating, finite), identical on all ranks.
        sharded: ShardedTrainingSet.
        sigma: float, [M] or [M, 1, 1, 1] noise levels > 0.  alpha: float or [M] signal scale > 0 (default 1).
        return_lse: also return lse [M] (unnormalised log-sum-exp over all N training points).
        return_stats: return DenoiseResult(denoised, lse, top_weight, n_eff) instead.
        backend, precision: of the per-shard computation (see diffgen_fast.softmax_denoise).
        check_queries: compare a fingerprint of (x, sigma, alpha) across ranks and raise InputError on a mismatch.

    Returns:
        denoised [M, *shape] in x's dtype (numpy if x was); with return_lse (denoised, lse), lse float64 if x or the
        training set is float64 else float32.
    """
    precision = check_precision(precision)
    xt, x2, was_np, out, lse, top_w, n_eff = _run_softmax(
        x, sharded, (sigma, alpha), ("sigma", "alpha"), backend, precision, True, check_queries
    )
    acc = acc_dtype(x2.dtype, sharded.dtype)
    out = out.to(acc).to(xt.dtype).reshape(xt.shape)
    lse_dtype = torch.float64 if acc == torch.float64 else torch.float32
    if return_stats:
        return DenoiseResult(
            back(out, was_np), back(lse.to(lse_dtype), was_np), back(top_w, was_np), back(n_eff, was_np)
        )
    if return_lse:
        return back(out, was_np), back(lse.to(lse_dtype), was_np)
    return back(out, was_np)


def kde_log_density(
    x: Any, sharded: ShardedTrainingSet, bandwidth: Any, *, backend: str = "auto", check_queries: bool = True
):
    """Gaussian-KDE log-density log (1/N) sum_i N(x; y_i, h^2 I) over all N points of a sharded training set.

    The shards' log-sum-exps are merged exactly, then normalised with the global N.

    Args:
        x: [M, *shape] or [M, d] query points, identical on all ranks.  sharded: ShardedTrainingSet.
        bandwidth: h > 0, float or [M] (identical on all ranks).
    Returns:
        [M] log-densities, float64 if x or the training set is float64 else float32; numpy if x was numpy.
    """
    xt, x2, was_np, _, lse, _, _ = _run_softmax(
        x, sharded, (bandwidth, 1.0), ("bandwidth", "alpha"), backend, "exact", False, check_queries
    )
    h = per_query(bandwidth, x2.shape[0], "bandwidth", device=x2.device)
    d = x2.shape[1]
    logp = lse - math.log(sharded.n) - 0.5 * d * torch.log(2.0 * math.pi * h * h)
    return back(logp.to(acc_dtype(x2.dtype, sharded.dtype)), was_np)


def _knn_impl(queries, sharded, k, backend, check_queries_):
    """(sqdist [M, k] float64, global index [M, k] int64, xt, x2, was_np), identical on every rank."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise InputTypeError(f"k: expected an int, got {type(k).__name__}")
    sharded = _as_sharded(sharded)
    if k < 1 or k > sharded.n:
        raise InputError(f"k: expected 1 <= k <= N = {sharded.n} (training points over all ranks), got {k}")
    if backend == "faiss":
        raise InputError("backend: 'faiss' is not supported by diffgen_fast.distributed.knn; use an exact backend")
    comm = sharded._comm
    xt, x2, was_np, _ = _front(comm, queries, sharded, (), (), "queries", check_queries_)
    M = x2.shape[0]
    # packed [M, 1 + 2k] float64: flag, k distances, k global indices (exact in float64 below 2^53)
    packed = torch.zeros(1 + M, 1 + 2 * k, dtype=torch.float64, device=x2.device)
    packed[1:, 1 : 1 + k] = float("inf")
    packed[1:, 1 + k :] = -1.0
    error = None
    try:
        local = sharded.local
        if local is not None:
            local.check_finite()
            name, _ = dispatch.resolve("knn", backend, x2.device)
            if name == "faiss":
                name = "torch"
            kk = min(k, len(local))
            d2, idx = driver.topk_state(name, x2, local, kk)  # this shard's top-k state
            packed[1:, 1 : 1 + kk] = d2.to(device=x2.device, dtype=torch.float64)
            packed[1:, 1 + k : 1 + k + kk] = (idx.to(x2.device) + sharded.start).to(torch.float64)
    except Exception as e:
        error = e
    allp = _gather_checked(comm, packed, error)
    dist_all = torch.cat([p[:, 1 : 1 + k] for p in allp], dim=1)
    idx_all = torch.cat([p[:, 1 + k :] for p in allp], dim=1).to(torch.int64)
    d2, idx = select_topk(dist_all, idx_all, k)
    return d2, idx, xt, x2, was_np


def knn(queries: Any, sharded: ShardedTrainingSet, k: int, *, backend: str = "auto", check_queries: bool = True):
    """Exact k nearest training points (squared L2) over all ranks' shards, with global indices.

    Args:
        queries: [M, *shape] or [M, d] (torch or numpy, floating, finite), identical on all ranks.
        sharded: ShardedTrainingSet.  k: 1 <= k <= N (global).
        backend: exact knn backend of the per-shard search ("auto", "torch", "cpu", "cuda", ...; not "faiss").
    Returns:
        (sqdist [M, k], index [M, k] int64 global row indices), ascending by (sqdist, index), so ties go to the
        smaller global index exactly as in the single-process knn; sqdist float64 if queries or the training set is
        float64 else float32; numpy if queries were numpy. The same on every rank.
    """
    d2, idx, _, x2, was_np = _knn_impl(queries, sharded, k, backend, check_queries)
    dtype = torch.float64 if torch.float64 in (x2.dtype, sharded.dtype) else torch.float32
    return back(d2.to(dtype), was_np), back(idx, was_np)


def memorization(
    samples: Any,
    sharded: ShardedTrainingSet,
    threshold: float = 1 / 3,
    *,
    backend: str = "auto",
    check_queries: bool = True,
) -> MemorizationResult:
    """Nearest-neighbour ratio test ||x - NN1|| / ||x - NN2|| < threshold against a sharded training set (N >= 2).

    Args:
        samples: [M, *shape] or [M, d] generated samples, identical on all ranks.
        sharded: ShardedTrainingSet.  threshold: > 0 (default 1/3).  backend: knn backend per shard.
    Returns:
        MemorizationResult (global nn_index), the same on every rank.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.floating)) or not threshold > 0:
        raise InputError(f"threshold: expected a number > 0, got {threshold!r}")
    sharded = _as_sharded(sharded)
    if sharded.n < 2:
        raise InputError(f"sharded: the ratio test needs at least 2 training points, got {sharded.n}")
    d2, idx, _, x2, _ = _knn_impl(samples, sharded, 2, backend, check_queries)
    dtype = torch.float64 if torch.float64 in (x2.dtype, sharded.dtype) else torch.float32
    return MemorizationResult.from_neighbours(
        d2.to(dtype), idx, threshold, n_train=sharded.n, value_range=sharded.value_range, backend=backend,
        extra={"world_size": sharded.world},
    )  # fmt: skip
