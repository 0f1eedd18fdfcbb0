"""The faiss backend of knn: exact IndexFlatL2 search streamed over the training set, approximate indexes (IVF-Flat,
IVF-PQ, HNSW or any factory string), and a persistent index saved with the training set's fingerprint.

Exact search ("flat"): per training chunk, an IndexFlatL2 returns the k' = k + slack best points by its fp32
distances; they are re-ranked by float64 distances computed as differences, and the row is certified when its
k-th exact distance is strictly below the k'-th fp32 distance minus the fp32 error bound
B = (2 gamma_d + 6 u)(||x|| + max ||y||)^2 (no point outside the candidates can then enter, ties included). Rows that
are not certified are searched again with 4x the candidates, then by the torch reference. Chunks merge with
merge_topk, so results equal the reference's, ties by index.

Approximate search: one index over the whole set (trained on a sample), k' candidates re-ranked by exact float64
distances, so the distances and ratios of what was found are exact; what can be missed is a true neighbour. The
recall against exact search is measured on a sample of the queries and returned with the result.

faiss-gpu: when the installed faiss has GPUs, an approximate or flat index built with device="cuda" is moved to the
GPU with index_cpu_to_gpu (untested here: no faiss-gpu wheel runs on the project's CI).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from diffgen_fast.errors import BackendUnavailableError, DataFormatError, InputError, InputTypeError, StaleIndexError
from diffgen_fast.ops._profile import pass_range
from diffgen_fast.ops.merge import merge_topk, select_topk
from diffgen_fast.ops.softmax_denoise.reference import exact_sqdist_pairs

INDEX_KINDS = ("flat", "ivf", "ivfpq", "hnsw")
SLACK = 16  # candidates beyond k in the first exact try
MAX_CANDIDATES = 4096  # beyond this, uncertified rows go to the torch reference
RECALL_SAMPLE = 256  # queries whose recall an approximate search measures by default
FORMAT = "diffgen-fast.faiss-index/1"
_U32 = 2.0**-24


def _faiss():
    try:
        import faiss  # noqa: PLC0415
    except ImportError as e:  # pragma: no cover - faiss is a dependency
        raise BackendUnavailableError(
            f"backend='faiss': faiss is not installed ({e}); pip install faiss-cpu (or faiss-gpu)"
        ) from e
    return faiss


def probe(device: Optional[torch.device]) -> Optional[str]:
    """None when faiss can serve knn for tensors on `device` (CUDA tensors are searched on the host unless faiss
    has GPUs), else why not."""
    try:
        import faiss  # noqa: F401, PLC0415
    except ImportError as e:
        return f"faiss is not installed ({e}); pip install faiss-cpu"
    return None


def has_gpu() -> bool:
    faiss = _faiss()
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def factory_string(kind: str, n: int, d: int) -> str:
    """The faiss factory string of an index kind ("flat", "ivf", "ivfpq", "hnsw") for n points of dimension d; any
    other string is taken as a faiss factory string as it is (L2 metric)."""
    if not isinstance(kind, str) or not kind.strip():
        raise InputTypeError(f"index: expected one of {', '.join(INDEX_KINDS)} or a faiss factory string, got {kind!r}")
    k = kind.strip().lower()
    nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))
    if k == "flat":
        return "Flat"
    if k == "ivf":
        return f"IVF{nlist},Flat"
    if k == "ivfpq":
        if n < 256:
            raise InputError(f"index: 'ivfpq' needs at least 256 training points to train its codebooks, got N = {n}")
        # 4-bit fast-scan codes: trains in a fraction of the time of 8-bit codes, and the exact re-rank of 4x the
        # candidates recovers the precision the shorter codes lose
        cap = max(2, min(64, d // 2))
        m = max([s for s in range(2, cap + 1, 2) if d % s == 0] or [0])
        return f"IVF{nlist},PQ{m}x4fs" if m else f"IVF{nlist},PQ{d}x4fs"
    if k == "hnsw":
        return "HNSW32,Flat"
    return kind.strip()


def _is_exact_factory(factory: str) -> bool:
    return factory.replace(" ", "") in ("Flat", "IDMap,Flat")


def _np32(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().to(device="cpu", dtype=torch.float32).numpy())


def _set_params(index: Any, nprobe: Optional[int], ef_search: Optional[int], k_cand: int) -> dict:
    """Search parameters of an approximate index; returns what was set."""
    faiss = _faiss()
    ps = faiss.ParameterSpace()
    done: dict[str, int] = {}
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        probes = nprobe if nprobe is not None else min(ivf.nlist, max(8, ivf.nlist // 32))
        ivf.nprobe = int(probes)
        done["nprobe"] = int(probes)
    hnsw = getattr(faiss.downcast_index(index), "hnsw", None)
    if hnsw is not None:
        ef = ef_search if ef_search is not None else max(128, 2 * k_cand)
        ps.set_index_parameter(index, "efSearch", int(ef))
        done["efSearch"] = int(ef)
    return done


def _gather_rows(train, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows [u, d] in float64, positions [M, c] into them) of the training points idx [M, c] (-1: none)."""
    flat = idx.reshape(-1)
    valid = flat >= 0
    uniq, inv = torch.unique(torch.where(valid, flat, torch.zeros_like(flat)), return_inverse=True)
    rows = train[uniq.cpu()].reshape(uniq.numel(), -1).to(device="cpu", dtype=torch.float64)
    return rows, inv.reshape(idx.shape)


def _rerank(x64: torch.Tensor, train, idx: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact float64 distances of the candidates idx [M, c] (-1: none), the k best by (distance, index)."""
    rows, pos = _gather_rows(train, idx)
    d2 = exact_sqdist_pairs(x64, rows, pos)
    d2 = torch.where(idx >= 0, d2, torch.full_like(d2, float("inf")))
    return select_topk(d2, idx, k)


def _fp32_bound(x64: torch.Tensor, ymax: float, d: int, rounded: bool) -> torch.Tensor:
    du = d * _U32
    gamma = du / (1.0 - du) if du < 0.5 else float("inf")
    extra = 4 * _U32 if rounded else 0.0
    return (2.0 * gamma + 6.0 * _U32 + extra) * (x64.norm(dim=1) + ymax) ** 2


def _exact_chunk(x64, x32, Y, k, start, rounded) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of x among the rows of one chunk Y [n, d] (indices offset by start)."""
    faiss = _faiss()
    n, d = Y.shape
    Y64 = Y.to(torch.float64)
    flat = faiss.IndexFlatL2(d)
    flat.add(_np32(Y))
    kk = min(k, n)
    ymax = float(torch.linalg.vector_norm(Y64, dim=1).max())
    bound = _fp32_bound(x64, ymax, d, rounded)
    M = x64.shape[0]
    out_d = torch.full((M, kk), float("inf"), dtype=torch.float64)
    out_i = torch.full((M, kk), -1, dtype=torch.int64)
    rows = torch.arange(M)
    kc = min(n, kk + SLACK)
    while rows.numel():
        A, I = flat.search(x32[rows.numpy()], kc)
        A = torch.from_numpy(A).to(torch.float64)
        I = torch.from_numpy(I).to(torch.int64)
        dk, ik = select_topk(
            torch.where(I >= 0, exact_sqdist_pairs(x64[rows], Y64, I.clamp(min=0)), torch.tensor(float("inf"))), I, kk
        )
        ok = (dk[:, -1] < A[:, -1] - bound[rows]) if kc < n else torch.ones(rows.numel(), dtype=torch.bool)
        out_d[rows[ok]], out_i[rows[ok]] = dk[ok], ik[ok]
        rows = rows[~ok]
        if rows.numel() and 4 * kc > MAX_CANDIDATES and kc < n:
            from diffgen_fast.data import TrainingSet
            from diffgen_fast.ops.knn.reference import knn_torch

            rd, ri = knn_torch(x64[rows], TrainingSet.from_tensor(Y64, name="train"), kk)
            out_d[rows], out_i[rows] = rd, ri
            break
        kc = min(n, 4 * kc)
    return out_d, torch.where(out_i >= 0, out_i + start, out_i)


def knn_faiss_exact(x: torch.Tensor, train, k: int, *, chunk_size: Optional[int] = None, progress=None):
    """Exact k nearest neighbours with faiss IndexFlatL2 per training chunk, re-ranked and certified in float64.

    x: [M, d]; train: TrainingSet. Returns (sqdist [M, k] float64, index [M, k] int64), ascending, ties by index.
    """
    x64 = x.detach().to(device="cpu", dtype=torch.float64)
    x32 = _np32(x)
    rounded = torch.float64 in (x.dtype, train.dtype)
    best_d = torch.empty(x.shape[0], 0, dtype=torch.float64)
    best_i = torch.empty(x.shape[0], 0, dtype=torch.int64)
    for start, Y in train.iter_chunks(chunk_size, device="cpu"):
        with pass_range("faiss.flat_chunk"):
            dk, ik = _exact_chunk(x64, x32, Y, k, start, rounded)
        best_d, best_i = merge_topk(best_d, best_i, dk, ik, k)
        if progress is not None:
            progress(Y.shape[0])
    return best_d, best_i


def tie_aware_recall(found_d: torch.Tensor, exact_d: torch.Tensor) -> float:
    """Mean fraction of the k exact neighbours found: a found point counts when its exact distance is at most the
    exact k-th distance (so ties at the boundary are not held against an index; distances given in float32 are
    compared within their rounding)."""
    k = exact_d.shape[1]
    kth = exact_d[:, -1:]
    hits = (found_d.double() <= kth.double() * (1 + 2.0**-22) + 1e-300).sum(dim=1).clamp(max=k)  # fp32 rounding
    return float(hits.double().mean() / k) if hits.numel() else float("nan")


class FaissIndex:
    """A faiss index over a TrainingSet, saved with the set's fingerprint and refused when the set changed.

    Build with :meth:`build`, save with :meth:`save`, reopen with :meth:`load`; :meth:`search` (or
    ``knn(..., index=this)``) runs it. An exact ("flat") index gives exactly the reference's answer; the others
    give exact distances for the points they find and report their measured recall.

    Attributes:
        spec: what was asked for ("flat", "ivf", "ivfpq", "hnsw" or a factory string).
        factory: the faiss factory string used.
        n, d: size and dimension of the training set; fingerprint: its TrainingSet.fingerprint().
        exact: True for a flat index.
    """

    def __init__(self, index: Any, *, spec: str, factory: str, n: int, d: int, fingerprint: str, meta=None):
        self.index = index
        self.spec = spec
        self.factory = factory
        self.n = int(n)
        self.d = int(d)
        self.fingerprint = fingerprint
        self.exact = _is_exact_factory(factory)
        self.meta = dict(meta or {})

    def __repr__(self) -> str:
        return f"FaissIndex(spec={self.spec!r}, factory={self.factory!r}, n={self.n}, d={self.d}, exact={self.exact})"

    @classmethod
    def build(
        cls,
        train,
        index: str = "flat",
        *,
        train_sample: Optional[int] = None,
        seed: int = 0,
        chunk_size: Optional[int] = None,
        device: str = "cpu",
        progress=None,
    ) -> FaissIndex:
        """Build an index over a training set (any TrainingSet input), adding it chunk by chunk.

        Args:
            train: TrainingSet, [N, d] / [N, *shape] tensor or array, or a path.
            index: "flat" (exact), "ivf", "ivfpq", "hnsw", or a faiss factory string (L2 metric).
            train_sample: points the index is trained on (IVF centroids, PQ codebooks); default
                min(N, max(50,000, 64 * nlist)), drawn without replacement with `seed`.
            chunk_size: rows added per call (None: the TrainingSet default of about 64 MiB).
            device: "cpu", or "cuda" to move the index to the GPU (needs faiss-gpu; untested here).
            progress: optional callable(rows_done) called after each chunk.
        """
        from diffgen_fast.data import TrainingSet

        faiss = _faiss()
        ts = TrainingSet.coerce(train, name="train")
        ts.check_finite()
        factory = factory_string(index, len(ts), ts.d)
        try:
            idx = faiss.index_factory(ts.d, factory, faiss.METRIC_L2)
        except Exception as e:
            raise InputError(f"index: faiss cannot build {factory!r} for d = {ts.d}: {str(e).splitlines()[0]}") from e
        t0 = time.perf_counter()
        if not idx.is_trained:
            default = max(50_000, 64 * max(1, getattr(faiss.try_extract_index_ivf(idx), "nlist", 1)))
            m = min(len(ts), train_sample or default)
            g = torch.Generator().manual_seed(seed)
            rows = torch.randperm(len(ts), generator=g)[:m].sort().values
            idx.train(_np32(ts[rows].reshape(m, -1)))
        for _, Y in ts.iter_chunks(chunk_size, device="cpu"):
            idx.add(_np32(Y))
            if progress is not None:
                progress(Y.shape[0])
        if device != "cpu":
            idx = _to_gpu(idx)
        meta = {"build_seconds": round(time.perf_counter() - t0, 3), "source": ts.source, "shape": list(ts.shape)}
        return cls(idx, spec=str(index), factory=factory, n=len(ts), d=ts.d, fingerprint=ts.fingerprint(), meta=meta)

    def check_matches(self, train) -> None:
        """Raise StaleIndexError unless `train` is the training set this index was built for."""
        if len(train) != self.n or train.d != self.d or train.fingerprint() != self.fingerprint:
            raise StaleIndexError(
                f"index: built for a training set with N = {self.n}, d = {self.d}, fingerprint "
                f"{self.fingerprint[:16]}..., but train has N = {len(train)}, d = {train.d}, fingerprint "
                f"{train.fingerprint()[:16]}...; the training set changed since the index was built: rebuild it "
                "(diffgen-fast index build)"
            )

    def search(
        self,
        queries,
        k: int,
        train=None,
        *,
        k_candidates: Optional[int] = None,
        nprobe: Optional[int] = None,
        ef_search: Optional[int] = None,
        recall_sample: int = RECALL_SAMPLE,
    ) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """k nearest training points of each query, re-ranked by exact float64 distances.

        Args:
            queries: [M, d] tensor.
            k: neighbours per query.
            train: the TrainingSet the index was built for (checked by fingerprint; needed for the exact re-rank).
            k_candidates: candidates taken from the index before the re-rank (default k + 16, at least 2k).
            nprobe, ef_search: IVF / HNSW search parameters (defaults: max(8, nlist/32) probes; efSearch 128).
            recall_sample: queries of an approximate search whose recall@k is measured against exact search
                (0: do not measure).

        Returns:
            (sqdist [M, k] float64, index [M, k] int64, info dict with index, factory, exact, recall_at_k, ...).
        """
        from diffgen_fast.data import TrainingSet

        if train is None:
            raise InputError("train: the training set the index was built for is needed to re-rank its results")
        ts = TrainingSet.coerce(train, name="train")
        self.check_matches(ts)
        x = queries if isinstance(queries, torch.Tensor) else torch.as_tensor(np.asarray(queries))
        x = x.reshape(x.shape[0], -1)
        if x.shape[1] != self.d:
            raise InputError(f"queries: expected d = {self.d} values per item (the index's), got {x.shape[1]}")
        if not 1 <= k <= self.n:
            raise InputError(f"k: expected 1 <= k <= N = {self.n}, got {k}")
        info: dict[str, Any] = {"index": self.spec, "factory": self.factory, "exact": self.exact, "k": k}
        x64 = x.detach().to(device="cpu", dtype=torch.float64)
        if self.exact:
            d2, i2 = self._search_exact(x64, _np32(x), ts, k)
            info["recall_at_k"] = 1.0
            return d2, i2, info
        base = max(k + SLACK, 2 * k) * (4 if "PQ" in self.factory else 1)
        kc = min(self.n, k_candidates or base)
        info.update(_set_params(self.index, nprobe, ef_search, kc))
        t0 = time.perf_counter()
        _, I = self.index.search(_np32(x), kc)
        info["search_seconds"] = round(time.perf_counter() - t0, 4)
        d2, i2 = _rerank(x64, ts, torch.from_numpy(I).to(torch.int64), k)
        info["k_candidates"] = kc
        info["missing"] = int((i2 < 0).sum())
        s = min(x.shape[0], int(recall_sample))
        if s > 0:
            rows = torch.linspace(0, x.shape[0] - 1, s).round().long().unique()
            ed, _ = knn_faiss_exact(x64[rows], ts, k)
            info["recall_at_k"] = tie_aware_recall(d2[rows], ed)
            info["recall_sample"] = int(rows.numel())
        else:
            info["recall_at_k"] = None
        return d2, i2, info

    def _search_exact(self, x64, x32, ts, k):
        n = self.n
        kk = min(k, n)
        ymax = float(ts.sqnorms().max().sqrt())
        bound = _fp32_bound(x64, ymax, self.d, torch.float64 in (x64.dtype, ts.dtype) and ts.dtype == torch.float64)
        M = x64.shape[0]
        out_d = torch.full((M, kk), float("inf"), dtype=torch.float64)
        out_i = torch.full((M, kk), -1, dtype=torch.int64)
        rows = torch.arange(M)
        kc = min(n, kk + SLACK)
        while rows.numel():
            A, I = self.index.search(x32[rows.numpy()], kc)
            A = torch.from_numpy(A).to(torch.float64)
            dk, ik = _rerank(x64[rows], ts, torch.from_numpy(I).to(torch.int64), kk)
            ok = (dk[:, -1] < A[:, -1] - bound[rows]) if kc < n else torch.ones(rows.numel(), dtype=torch.bool)
            out_d[rows[ok]], out_i[rows[ok]] = dk[ok], ik[ok]
            rows = rows[~ok]
            if rows.numel() and 4 * kc > MAX_CANDIDATES and kc < n:
                rd, ri = knn_faiss_exact(x64[rows], ts, kk)
                out_d[rows], out_i[rows] = rd, ri
                break
            kc = min(n, 4 * kc)
        return out_d, out_i

    # -- persistence ---------------------------------------------------------------------------------------------

    def save(self, path) -> Path:
        """Write the index to `path` and its metadata (fingerprint, factory, sizes, checksum) to `path`.json, each
        atomically. Returns the index path."""
        from diffgen_fast._atomic import write_bytes_atomic, write_text_atomic

        faiss = _faiss()
        p = Path(path)
        idx = self.index
        if hasattr(faiss, "index_gpu_to_cpu") and type(idx).__name__.startswith("Gpu"):
            idx = faiss.index_gpu_to_cpu(idx)
        blob = faiss.serialize_index(idx).tobytes()
        write_bytes_atomic(blob, p)
        meta = {
            "format": FORMAT,
            "spec": self.spec,
            "factory": self.factory,
            "metric": "L2",
            "n": self.n,
            "d": self.d,
            "fingerprint": self.fingerprint,
            "sha256": hashlib.sha256(blob).hexdigest(),
            "bytes": len(blob),
            "faiss_version": getattr(faiss, "__version__", "?"),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **self.meta,
        }
        write_text_atomic(json.dumps(meta, indent=2) + "\n", meta_path(p))
        return p

    @classmethod
    def load(cls, path, train=None, *, device: str = "cpu") -> FaissIndex:
        """Open a saved index; with `train`, refuse it (StaleIndexError) unless it was built for that training set.
        A missing, truncated or altered file raises DataFormatError (its checksum is verified before faiss reads
        it)."""
        faiss = _faiss()
        p = Path(os.fspath(path))
        mp = meta_path(p)
        if not p.is_file():
            raise DataFormatError(f"index: no index file at '{p}'")
        if not mp.is_file():
            raise DataFormatError(f"index: '{p}' has no metadata file '{mp}' (write indexes with FaissIndex.save)")
        try:
            meta = json.loads(mp.read_text())
        except (OSError, ValueError) as e:
            raise DataFormatError(f"index: cannot read the metadata '{mp}': {e}") from e
        need = {"format": str, "spec": str, "factory": str, "n": int, "d": int, "fingerprint": str, "sha256": str}
        if not isinstance(meta, dict) or any(not isinstance(meta.get(k), t) for k, t in need.items()):
            raise DataFormatError(f"index: '{mp}' is not diffgen-fast index metadata (expected keys {sorted(need)})")
        if meta["format"] != FORMAT:
            raise DataFormatError(f"index: '{mp}' has format {meta['format']!r}, expected {FORMAT!r}")
        blob = p.read_bytes()
        if hashlib.sha256(blob).hexdigest() != meta["sha256"]:
            raise DataFormatError(f"index: '{p}' is corrupt or was changed (its checksum does not match '{mp}')")
        try:
            idx = faiss.deserialize_index(np.frombuffer(blob, dtype=np.uint8))
        except Exception as e:
            raise DataFormatError(f"index: faiss cannot read '{p}': {str(e).splitlines()[0]}") from e
        if idx.ntotal != meta["n"] or idx.d != meta["d"]:
            raise DataFormatError(
                f"index: '{p}' holds {idx.ntotal} x {idx.d}, its metadata says {meta['n']} x {meta['d']}"
            )
        if device != "cpu":
            idx = _to_gpu(idx)
        extra = {k: v for k, v in meta.items() if k not in need}
        out = cls(
            idx,
            spec=meta["spec"],
            factory=meta["factory"],
            n=meta["n"],
            d=meta["d"],
            fingerprint=meta["fingerprint"],
            meta=extra,
        )
        if train is not None:
            from diffgen_fast.data import TrainingSet

            out.check_matches(TrainingSet.coerce(train, name="train"))
        return out


def meta_path(p: Path) -> Path:
    return p.with_name(p.name + ".json")


def _to_gpu(idx):
    faiss = _faiss()
    if not has_gpu():
        raise BackendUnavailableError("device='cuda': the installed faiss has no GPU support (pip install faiss-gpu)")
    res = faiss.StandardGpuResources()  # pragma: no cover - needs faiss-gpu
    return faiss.index_cpu_to_gpu(res, 0, idx)  # pragma: no cover


def knn_faiss(
    x: torch.Tensor,
    train,
    k: int,
    *,
    index: Any = None,
    nprobe: Optional[int] = None,
    ef_search: Optional[int] = None,
    k_candidates: Optional[int] = None,
    recall_sample: int = RECALL_SAMPLE,
    chunk_size: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The faiss backend: (sqdist [M, k] float64, index [M, k] int64, info).

    index: None or "flat" (exact, streamed per chunk), "ivf", "ivfpq", "hnsw", a faiss factory string (built for
    this call), a FaissIndex, or the path of a saved one.
    """
    if index is None or (isinstance(index, str) and index.strip().lower() == "flat"):
        d2, i2 = knn_faiss_exact(x, train, k, chunk_size=chunk_size)
        return d2, i2, {"index": "flat", "factory": "Flat", "exact": True, "k": k, "recall_at_k": 1.0}
    if isinstance(index, (str, os.PathLike)) and Path(os.fspath(index)).suffix == ".faiss":
        index = FaissIndex.load(index, train)
    if isinstance(index, str):
        index = FaissIndex.build(train, index)
    if not isinstance(index, FaissIndex):
        raise InputTypeError(
            f"index: expected None, one of {', '.join(INDEX_KINDS)}, a faiss factory string, a FaissIndex or the path "
            f"of a saved .faiss index, got {type(index).__name__}"
        )
    return index.search(
        x, k, train, k_candidates=k_candidates, nprobe=nprobe, ef_search=ef_search, recall_sample=recall_sample
    )


__all__ = ["FaissIndex", "knn_faiss", "knn_faiss_exact", "factory_string", "tie_aware_recall", "probe", "INDEX_KINDS"]
