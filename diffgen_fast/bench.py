"""The one benchmark system of diffgen-fast: peers, timing loop, ceilings, environment, tables.

``diffgen-fast bench`` and every script in ``benchmarks/`` are thin entry points over this module.

- Peers, one definition each, at the same inputs as ours and computing the same quantity:
  "dense" (the papers' code: torch.cdist + softmax + matmul, cdist + logsumexp for kde, cdist + topk for knn;
  skipped with a reason above a memory budget), "chunked" (the fastest plain-torch loop: addmm logits, online
  softmax with in-place exp_, addmm P @ Y; chunk size calibrated per shape by calibrate_chunk), "keops" (when
  pykeops imports, else a row with the reason) and "faiss" (knn: a raw IndexFlatL2, add + search timed).
- ``time_interleaved``: THE timing loop (warm-up rounds, timed rounds in a rotated order so that machine noise hits
  every implementation alike, input copies cycled; median and spread).
- ``measure_ceilings(device)``: GEMM rate (GFLOP/s, a large torch.mm) and copy bandwidth (GB/s, read + write).
- ``flops`` / ``bytes_moved``: the FLOP and byte models behind the GFLOP/s, GB/s and ceiling-fraction columns.
- ``run_bench(...)``: one row per (op, shape, sigma, implementation): time, spread, throughput, ceiling fractions,
  errors against float64, peak memory, kernel variant, environment; rows of ours carry ``vs_best_peer`` =
  best peer time / our time against the fastest peer measured in the same loop (``best_peer`` names it).
- ``write_csv``, ``format_table``, ``format_markdown``, ``roofline_figure``, ``compare`` (regression check against
  an older CSV), ``profile_trace`` and ``record``.

Peak memory: on the CPU the peak resident set (VmHWM, reset through /proc/self/clear_refs; Linux only) during one
call above the resident set before it (``mem_method`` = "VmHWM"); on CUDA torch.cuda.max_memory_allocated above the
memory allocated before the call ("cuda_allocator"); blank where neither is available.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import io
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Iterable, Sequence
from typing import Callable, Optional, Union

import torch

from diffgen_fast._atomic import PathLike, write_text_atomic

OPS = ("denoise", "knn", "kde")
DEFAULT_SHAPES = {
    "denoise": [(256, 20_000, 64), (64, 5000, 3072)],
    "knn": [(1000, 50_000, 64)],
    "kde": [(256, 20_000, 64)],
}
TINY_SHAPES = {
    "denoise": [(16, 600, 8)],
    "knn": [(16, 600, 8)],
    "kde": [(16, 600, 8)],
}
PEERS = ("dense", "chunked", "keops", "faiss")
_PEER_ALIASES = {"naive": "dense"}
CHUNK_CANDIDATES = (2048, 4096, 8192, 16384, 32768)
KEY_FIELDS = ("op", "impl", "backend", "precision", "M", "N", "d", "sigma", "device")
COLUMNS = (
    "op", "impl", "backend", "precision", "M", "N", "d", "sigma", "k", "dtype", "status", "time_s", "spread_s",
    "best_peer", "best_peer_time_s", "vs_best_peer", "gflops", "tflops", "gbps", "intensity", "gemm_frac",
    "bw_frac", "roof", "max_abs_err", "lse_rel_err", "knn_mismatch", "sqdist_rel_err", "peak_mem_mb", "mem_method",
    "kernel", "chunk", "train", "repeat", "warmup", "rotate", "ceil_gemm_gflops", "ceil_bw_gbps", "device_type",
)  # fmt: skip
_OP_NAME = {"denoise": "softmax_denoise", "kde": "softmax_denoise", "knn": "knn"}
N_REF = 8


# ----------------------------------------------------------------------------------------------------------------------
# environment, models, ceilings


def _git_sha() -> str:
    try:
        return subprocess.check_output(
            ["git", "rev-parse", "--short", "HEAD"],
            text=True,
            stderr=subprocess.DEVNULL,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        ).strip()
    except Exception:
        return "unknown"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device) -> dict:
    """Device, CPU model, threads, SIMD level and build of the native kernels, versions (torch, numpy, faiss,
    pykeops, triton), date (UTC) and git SHA: the fields every row carries."""
    import numpy

    import diffgen_fast

    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.processor() or platform.machine()} x{os.cpu_count()} threads={torch.get_num_threads()}"
    versions = {}
    for mod in ("triton", "faiss", "pykeops"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:
            versions[mod] = ""
    simd, native_build, native_threads = "", "", ""
    try:
        from diffgen_fast import _native

        if _native.available():
            simd = _native.simd_level()
            info = _native.build_info() or {}
            native_build = (f"{info.get('compiler', '')} {info.get('compiler_version', '')} "
                            f"openmp={info.get('openmp', '')}").strip()  # fmt: skip
            native_threads = _native.get_num_threads()
    except Exception:
        pass
    return {
        "device": name,
        "cpu_model": cpu_model(),
        "threads": torch.get_num_threads(),
        "native_threads": native_threads,
        "simd": simd,
        "native_build": native_build,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "faiss": versions["faiss"],
        "pykeops": versions["pykeops"],
        "triton": versions["triton"],
        "cuda": torch.version.cuda or "",
        "diffgen_fast": diffgen_fast.__version__,
        "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git_sha": _git_sha(),
    }


def flops(op: str, M: int, N: int, d: int, k: Optional[int] = None) -> float:
    """FLOPs counted per call: denoise 4 M N d (scores and P Y, a multiply-add each), kde and knn 2 M N d (scores)."""
    if op == "denoise":
        return 4.0 * M * N * d
    if op in ("kde", "knn"):
        return 2.0 * M * N * d
    raise ValueError(f"unknown op {op!r}; expected one of {', '.join(OPS)}")


def bytes_moved(op: str, M: int, N: int, d: int, dtype_bytes: int = 4, k: int = 10) -> float:
    """Bytes of one pass: the training set (N d) and the queries (M d) read once, the outputs written once.

    Outputs: denoise M d values + M lse; kde M log-densities; knn M k distances (dtype_bytes) + M k int64 indices.
    """
    inputs = (N * d + M * d) * dtype_bytes
    if op == "denoise":
        return float(inputs + (M * d + M) * dtype_bytes)
    if op == "kde":
        return float(inputs + M * dtype_bytes)
    if op == "knn":
        return float(inputs + M * k * dtype_bytes + M * k * 8)
    raise ValueError(f"unknown op {op!r}; expected one of {', '.join(OPS)}")


def _cuda_ms(fn: Callable[[], object], repeat: int) -> list[float]:
    start = [torch.cuda.Event(enable_timing=True) for _ in range(repeat)]
    end = [torch.cuda.Event(enable_timing=True) for _ in range(repeat)]
    torch.cuda.synchronize()
    for i in range(repeat):
        start[i].record()
        fn()
        end[i].record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(start, end)]


def measure_ceilings(device="cpu") -> dict:
    """Measured ceilings of `device`: ``gemm_<dtype>_gflops`` of a square matmul and ``copy_gbps`` of a large
    tensor copy (read + write counted), medians of a few runs. CPU: fp32 n = 2048 and a 128 MB copy (~2 s);
    CUDA: bf16, tf32 and fp32 at n = 8192 and a 1 GiB copy (triton.testing.do_bench when installed, else events)."""
    device = torch.device(device)
    out: dict = {"device_type": device.type}
    if device.type == "cuda":
        try:
            from triton.testing import do_bench

            def timer(fn):
                return do_bench(fn, warmup=25, rep=100)
        except ImportError:

            def timer(fn):
                fn()
                return statistics.median(_cuda_ms(fn, 10))

        n = 8192
        old_tf32 = torch.backends.cuda.matmul.allow_tf32
        try:
            for name, dt, tf32 in (("bf16", torch.bfloat16, False), ("tf32", torch.float32, True),
                                   ("fp32", torch.float32, False)):  # fmt: skip
                a = torch.randn(n, n, device=device, dtype=dt)
                b = torch.randn(n, n, device=device, dtype=dt)
                torch.backends.cuda.matmul.allow_tf32 = tf32
                ms = timer(lambda a=a, b=b: a @ b)
                out[f"gemm_{name}_gflops"] = 2 * n**3 / ms / 1e6
                del a, b
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old_tf32
        src = torch.empty(1 << 28, device=device, dtype=torch.float32)
        dst = torch.empty_like(src)
        ms = timer(lambda: dst.copy_(src))
        out["copy_gbps"] = 2 * src.numel() * 4 / ms / 1e6
        out["gemm_gflops"] = out["gemm_tf32_gflops"]
        out["gemm_roof"] = "tf32"
        return out
    n = 2048  # a large sgemm: 17 GFLOP per call
    a, b = torch.randn(n, n), torch.randn(n, n)
    t = _cpu_times(lambda: torch.mm(a, b), warmup=1, repeat=5)
    out["gemm_fp32_gflops"] = 2 * n**3 / statistics.median(t) / 1e9
    src = torch.ones(1 << 25)  # 128 MB: well above the last-level cache
    dst = torch.empty_like(src)
    t = _cpu_times(lambda: dst.copy_(src), warmup=1, repeat=5)
    out["copy_gbps"] = 2 * src.numel() * 4 / statistics.median(t) / 1e9
    out["gemm_gflops"] = out["gemm_fp32_gflops"]
    out["gemm_roof"] = "fp32"
    return out


def _cpu_times(fn: Callable[[], object], *, warmup: int, repeat: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


# ----------------------------------------------------------------------------------------------------------------------
# profiling hooks


@contextlib.contextmanager
def profile_trace(path: PathLike, *, record_shapes: bool = False):
    """torch.profiler over the block (CPU activities, plus CUDA when available); writes a Chrome trace JSON to
    `path` on exit (open it in chrome://tracing or ui.perfetto.dev). Yields the profiler."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    os.makedirs(os.path.dirname(os.path.abspath(os.fspath(path))), exist_ok=True)
    with profile(activities=activities, record_shapes=record_shapes) as prof:
        yield prof
    prof.export_chrome_trace(os.fspath(path))


@contextlib.contextmanager
def record(name: str, *, cuda: Optional[bool] = None):
    """A named range: torch.profiler.record_function (shows in profile_trace) and, on CUDA, an NVTX range (shows in
    Nsight Systems). `cuda` None: NVTX when CUDA is available."""
    use_nvtx = torch.cuda.is_available() if cuda is None else cuda
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.profiler.record_function(name))
        if use_nvtx:
            stack.enter_context(torch.cuda.nvtx.range(name))
        yield


# ----------------------------------------------------------------------------------------------------------------------
# peers


def _kde_const(N, d, h):
    return -math.log(N) - 0.5 * d * math.log(2 * math.pi * h * h)


def dense_softmax_denoise(x, y, sigma):
    """Peer "dense", the papers' code: the whole [M, N] matrix from torch.cdist, squared and scaled in place, its
    logsumexp, the softmax weights exp(z - lse) in place, and one matmul. Returns (denoised, lse)."""
    z = torch.cdist(x, y)
    z.square_().mul_(-0.5 / (sigma * sigma))
    lse = torch.logsumexp(z, dim=1)
    z.sub_(lse[:, None]).exp_()
    return z @ y, lse


def dense_kde(x, y, h):
    """Peer "dense" for kde_log_density: torch.cdist, squared and scaled, logsumexp, the Gaussian constant."""
    z = torch.cdist(x, y)
    z.square_().mul_(-0.5 / (h * h))
    return torch.logsumexp(z, dim=1) + _kde_const(y.shape[0], y.shape[1], h)


def dense_knn(x, y, k, block: Optional[int] = None):
    """Peer "dense" for knn: torch.cdist squared + topk, over blocks of `block` queries (None: all at once)."""
    block = block or x.shape[0]
    vs, js = [], []
    for s in range(0, x.shape[0], block):
        v, j = torch.topk(torch.cdist(x[s : s + block], y).square_(), k, dim=1, largest=False, sorted=True)
        vs.append(v)
        js.append(j)
    return torch.cat(vs), torch.cat(js)


def chunked_softmax_denoise(x, y, sigma, chunk: int = 8192, need_out: bool = True):
    """Peer "chunked": the fastest plain-torch loop we know, float32 throughout.

    Training rows in chunks of `chunk`; per chunk the logits z = (x y^T - ||y||^2 / 2) / sigma^2 by one addmm into a
    reused buffer (the row constant -||x||^2 / (2 sigma^2) cancels in the softmax and is added to the lse at the end),
    an online softmax (running max m, rescale of the running sum l and of the output by exp(m_old - m_new)) with
    in-place sub_ / exp_, and P @ Y accumulated by addmm_. No denormals: shifted logits below -87 are set to -inf
    before exp_ (threshold_, in place), and denormals are flushed during the call (torch.set_flush_denormal, the
    calling thread only); weights below e^-87 of the row maximum cannot change a float32 sum, and without this the
    exp and the P @ Y of small sigma run 5-50x slower. need_out False: the logsumexp only (kde).
    Returns (denoised or None, lse)."""
    old = torch.is_flush_denormal_enabled() if hasattr(torch, "is_flush_denormal_enabled") else False
    torch.set_flush_denormal(True)
    try:
        return _chunked_loop(x, y, sigma, chunk, need_out)
    finally:
        torch.set_flush_denormal(old)


def _chunked_loop(x, y, sigma, chunk, need_out):
    M, d = x.shape
    N = y.shape[0]
    inv = 1.0 / (sigma * sigma)
    m = torch.full((M,), float("-inf"), device=x.device)
    l = torch.zeros(M, device=x.device)
    o = torch.zeros(M, d, device=x.device) if need_out else None
    buf = torch.empty(M * max(1, min(chunk, N)), device=x.device)
    for s in range(0, N, chunk):
        yc = y[s : s + chunk]
        n = yc.shape[0]
        z = buf[: M * n].view(M, n)
        bias = torch.linalg.vector_norm(yc, dim=1).square_().mul_(-0.5 * inv)
        torch.addmm(bias, x, yc.T, alpha=inv, out=z)
        mn = torch.maximum(m, z.amax(dim=1))
        # weights below e^-87 become exact zeros: no denormal (slow) exp results nor P @ Y products
        torch.nn.functional.threshold_(z.sub_(mn[:, None]), -87.0, float("-inf")).exp_()
        r = torch.sub(m, mn).exp_()
        l.mul_(r).add_(z.sum(dim=1))
        if o is not None:
            o.mul_(r[:, None]).addmm_(z, yc)
        m = mn
    lse = m + l.log() - torch.linalg.vector_norm(x, dim=1).square() * (0.5 * inv)
    return (o.div_(l[:, None]) if o is not None else None), lse


def chunked_kde(x, y, h, chunk: int = 8192):
    """Peer "chunked" for kde_log_density: the same loop, logsumexp only, plus the Gaussian constant."""
    return chunked_softmax_denoise(x, y, h, chunk, need_out=False)[1] + _kde_const(y.shape[0], y.shape[1], h)


_CHUNK_CACHE: dict = {}


def calibrate_chunk(op: str, x, y, sigma: float = 1.0, candidates: Sequence[int] = CHUNK_CANDIDATES,
                    device=None) -> tuple[int, dict]:  # fmt: skip
    """The chunk size of the "chunked" peer for this (op, M, N, d, device): each candidate (capped at N, distinct)
    timed once after one untimed call of the first, the fastest kept. Cached per process. Returns (chunk, {chunk:
    seconds})."""
    device = torch.device(device if device is not None else x.device)
    key = (op, x.shape[0], y.shape[0], x.shape[1], str(device))
    if key in _CHUNK_CACHE:
        return _CHUNK_CACHE[key]
    sizes = sorted({min(int(c), y.shape[0]) for c in candidates})
    need_out = op == "denoise"
    chunked_softmax_denoise(x, y, sigma, sizes[0], need_out)
    times = {}
    for c in sizes:
        _sync(device)
        t0 = time.perf_counter()
        chunked_softmax_denoise(x, y, sigma, c, need_out)
        _sync(device)
        times[c] = time.perf_counter() - t0
    best = min(times, key=times.get)
    _CHUNK_CACHE[key] = (best, times)
    return best, times


def _keops():
    try:
        from pykeops.torch import LazyTensor
    except Exception as e:  # not installed, or no compiler
        return None, f"not installed ({type(e).__name__})"
    return LazyTensor, None


def _faiss():
    try:
        import faiss
    except Exception as e:
        return None, f"not installed ({type(e).__name__})"
    return faiss, None


def faiss_knn(x_np, y_np, k: int):
    """Peer "faiss" for knn: a raw faiss.IndexFlatL2, add + search (both timed). Returns (sq. distances, indices)."""
    import faiss

    index = faiss.IndexFlatL2(y_np.shape[1])
    index.add(y_np)
    v, j = index.search(x_np, k)
    return torch.from_numpy(v), torch.from_numpy(j)


def _mem_available(device) -> Optional[int]:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _budget(device, mem_budget: Optional[float]) -> Optional[float]:
    """Bytes the dense peer may use: `mem_budget` (bytes) when given, else half of the memory available now."""
    if mem_budget is not None:
        return float(mem_budget)
    avail = _mem_available(device)
    return None if avail is None else 0.5 * avail


class _Impl:
    """One implementation measured in a run: fn(i) on input copy i, or the status saying why it does not run."""

    def __init__(self, impl, backend, precision, fn=None, status=None, kernel="", chunk=""):
        self.impl, self.backend, self.precision = impl, backend, precision
        self.fn, self.status, self.kernel, self.chunk = fn, status, kernel, chunk


def _peer_impls(op, peers, X, Y, sigma, k, device, budget, chunk, chunk_candidates) -> list[_Impl]:
    """The peers asked for that serve `op`, at the same inputs as ours (one definition each, above)."""
    out: list[_Impl] = []
    M, d = X[0].shape
    N = Y[0].shape[0]
    tv = f"torch {torch.__version__}"
    if "dense" in peers:
        need = 2 * M * N * 4  # the [M, N] fp32 matrix and one temporary of its size (logsumexp / topk)
        if op == "knn":
            block = M if budget is None or need <= budget else int(budget // (2 * N * 4))
            if block < 1:
                out.append(_Impl("dense", "-", "fp32", status=f"skipped: one query row needs {8 * N / 1e9:.2f} GB"))
            else:
                out.append(
                    _Impl(
                        "dense",
                        "-",
                        "fp32",
                        lambda i, b=block: dense_knn(X[i], Y[i], k, b),
                        kernel=f"{tv} cdist + topk" + (f", {block}-query blocks" if block < M else ""),
                    )
                )
        elif budget is not None and need > budget:
            out.append(_Impl("dense", "-", "fp32", status=f"skipped: needs {need / 1e9:.1f} GB > budget "
                                                          f"{budget / 1e9:.1f} GB"))  # fmt: skip
        elif op == "denoise":
            out.append(_Impl("dense", "-", "fp32", lambda i: dense_softmax_denoise(X[i], Y[i], sigma),
                             kernel=f"{tv} cdist + softmax + mm"))  # fmt: skip
        else:
            out.append(_Impl("dense", "-", "fp32", lambda i: dense_kde(X[i], Y[i], sigma),
                             kernel=f"{tv} cdist + logsumexp"))  # fmt: skip
    if "chunked" in peers and op in ("denoise", "kde"):
        if chunk:
            c, how = int(chunk), "fixed"
        else:
            c, times = calibrate_chunk(op, X[0], Y[0], sigma, chunk_candidates, device)
            how = "calibrated " + " ".join(f"{n}:{t * 1e3:.0f}ms" for n, t in times.items())
        if op == "denoise":
            fn = lambda i, c=c: chunked_softmax_denoise(X[i], Y[i], sigma, c)  # noqa: E731
        else:
            fn = lambda i, c=c: chunked_kde(X[i], Y[i], sigma, c)  # noqa: E731
        out.append(_Impl("chunked", "-", "fp32", fn, kernel=f"{tv} addmm online softmax ({how})", chunk=c))
    if "keops" in peers:
        LazyTensor, why = _keops()
        if LazyTensor is None:
            out.append(_Impl("keops", "-", "fp32", status=why))
        else:

            def sqd(i):
                return ((LazyTensor(X[i][:, None, :]) - LazyTensor(Y[i][None, :, :])) ** 2).sum(-1)

            if op == "denoise":

                def keops_denoise(i):
                    z = -sqd(i) / (2 * sigma**2)
                    return z.sumsoftmaxweight(LazyTensor(Y[i][None, :, :]), axis=1), z.logsumexp(axis=1).reshape(-1)

                fn = keops_denoise
            elif op == "kde":
                c = _kde_const(N, d, sigma)

                def fn(i):
                    return (-sqd(i) / (2 * sigma**2)).logsumexp(axis=1).reshape(-1) + c
            else:

                def fn(i):
                    return sqd(i).Kmin_argKmin(k, dim=1)

            out.append(_Impl("keops", "-", "fp32", fn, kernel="pykeops LazyTensor"))
    if "faiss" in peers and op == "knn":
        faiss, why = _faiss()
        if faiss is None:
            out.append(_Impl("faiss", "-", "fp32", status=why))
        elif device.type != "cpu":
            out.append(_Impl("faiss", "-", "fp32", status="skipped: the faiss peer runs on the CPU only"))
        else:
            XN = [t.numpy() for t in X]
            YN = [t.numpy() if isinstance(t, torch.Tensor) else t for t in Y]
            out.append(_Impl("faiss", "-", "fp32", lambda i: faiss_knn(XN[i], YN[i], k),
                             kernel=f"faiss {faiss.__version__} IndexFlatL2 add + search"))  # fmt: skip
    return out


def kernel_variant(op: str, backend: str, precision: str, d: int) -> str:
    """Which kernel of ours runs: the backend and, for the native CPU one, its code path and SIMD level."""
    if backend == "cpu":
        from diffgen_fast import _native

        try:
            simd = _native.simd_level()
        except Exception:
            simd = "?"
        if op == "knn":
            if d <= 32:
                return f"native knn panels (direct) {simd}"
            try:
                first = _native.knn_kernel()
            except Exception:
                first = "fp32 panels"
            return f"native knn {first} (norm expansion) {simd}"
        try:
            from diffgen_fast.ops.softmax_denoise.native import DIRECT_MAX_D
        except Exception:
            DIRECT_MAX_D = 64
        if d <= DIRECT_MAX_D:
            try:
                simd = _native.direct_kernel()
            except Exception:
                pass
            return f"native direct {simd}"
        return f"native BLAS scores + native epilogue {simd}"
    if backend == "torch":
        return "torch reference"
    if backend == "faiss":
        return "faiss IndexFlatL2 + float64 re-rank"
    return backend


def _our_impls(op, backends, device, X, TRAIN, sigma, k, precisions) -> list[_Impl]:
    """Our backends for `op`, each called as a user would (the tensors, or a TrainingSet for a file)."""
    from diffgen_fast.ops import kde_log_density, knn, softmax_denoise
    from diffgen_fast.ops.dispatch import backend_table

    d = X[0].shape[1]
    table = {r["backend"]: r for r in backend_table(device) if r["op"] == _OP_NAME[op]}
    names = list(table) if backends is None else list(backends)
    out: list[_Impl] = []
    for b in names:
        r = table.get(b)
        if r is None:
            continue  # e.g. faiss asked for denoise
        if b == "triton" and device.type != "cuda":
            continue  # the interpreter is for tests, not for timing
        if not r["available"]:
            if backends is not None:  # asked for by name: say why not
                out.append(_Impl("ours", b, "-", status=f"unavailable: {r['reason']}"))
            continue
        if op == "denoise":
            for p in precisions:
                fn = lambda i, b=b, p=p: softmax_denoise(X[i], TRAIN[i], sigma, return_lse=True, backend=b,  # noqa: E731
                                                         precision=p)  # fmt: skip
                out.append(_Impl("ours", b, p, fn, kernel=kernel_variant(op, b, p, d)))
        elif op == "kde":
            fn = lambda i, b=b: kde_log_density(X[i], TRAIN[i], sigma, backend=b)  # noqa: E731
            out.append(_Impl("ours", b, "exact", fn, kernel=kernel_variant(op, b, "exact", d)))
        else:
            fn = lambda i, b=b: knn(X[i], TRAIN[i], k, backend=b)  # noqa: E731
            out.append(_Impl("ours", b, "exact", fn, kernel=kernel_variant(op, b, "exact", d)))
    return out


# ----------------------------------------------------------------------------------------------------------------------
# measuring


def _status_kb(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _peak_call(fn: Callable[[], object], device) -> tuple[object, str, str]:
    """(result, peak extra MB or "", method) of one call."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        res = fn()
        torch.cuda.synchronize()
        return res, f"{(torch.cuda.max_memory_allocated(device) - base) / 2**20:.1f}", "cuda_allocator"
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        base = _status_kb("VmRSS")
    except OSError:
        base = None
    res = fn()
    peak = _status_kb("VmHWM") if base is not None else None
    if base is None or peak is None:
        return res, "", ""
    return res, f"{max(peak - base, 0) / 1024:.1f}", "VmHWM"


def time_interleaved(calls: dict, *, repeat: int, warmup: int = 1, rotate: int = 1, device="cpu",
                     label: Optional[Callable[[object], str]] = None) -> tuple[dict, dict]:  # fmt: skip
    """THE timing loop of every benchmark: `calls` maps a key to fn(i) (i: which input copy).

    `warmup` untimed rounds, then `repeat` timed rounds; each round calls every implementation once, in an order
    rotated by one place per round, so that machine noise (other jobs, frequency changes) hits all of them alike.
    Consecutive calls cycle through `rotate` input copies. CUDA: synchronised around each call. An implementation
    that raises is dropped from the later rounds. Returns ({key: [seconds, ...]}, {key: exception})."""
    device = torch.device(device)
    keys = list(calls)
    times: dict = {key: [] for key in keys}
    failed: dict = {}
    n_calls = 0
    for r in range(warmup + repeat):
        shift = r % max(1, len(keys))
        for key in keys[shift:] + keys[:shift]:
            if key in failed:
                continue
            i = n_calls % rotate
            n_calls += 1
            try:
                with record(f"bench/{label(key) if label else key}"):
                    _sync(device)
                    t0 = time.perf_counter()
                    calls[key](i)
                    _sync(device)
                    dt = time.perf_counter() - t0
            except Exception as e:  # an implementation that cannot run this case gets a row saying why
                failed[key] = e
                continue
            if r >= warmup:
                times[key].append(dt)
    return times, failed


def _errors(op, res, ref) -> dict:
    if op == "denoise":
        out, lse = res
        r_out, r_lse = ref
        n = r_out.shape[0]
        err = float((out[:n].double().cpu() - r_out).abs().max())
        lse_err = float(((lse.reshape(-1)[:n].double().cpu() - r_lse) / r_lse.abs().clamp(min=1)).abs().max())
        return {"max_abs_err": f"{err:.2e}", "lse_rel_err": f"{lse_err:.2e}"}
    if op == "kde":
        n = ref.shape[0]
        v = res.reshape(-1)[:n].double().cpu()
        return {"lse_rel_err": f"{float(((v - ref) / ref.abs().clamp(min=1)).abs().max()):.2e}"}
    d2, idx = res
    r_d2, r_idx = ref
    n = r_d2.shape[0]
    d2 = torch.as_tensor(d2)[:n].double().cpu()
    idx = torch.as_tensor(idx)[:n].long().cpu()
    mismatch = int((idx != r_idx).sum())
    rel = float(((d2 - r_d2).abs() / r_d2.abs().clamp(min=1e-30)).max())
    return {"knn_mismatch": mismatch, "sqdist_rel_err": f"{rel:.2e}"}


def _errors_finite(row: dict) -> bool:
    for c in ("max_abs_err", "lse_rel_err", "sqdist_rel_err"):
        v = row.get(c, "")
        if v != "" and not math.isfinite(float(v)):
            return False
    return True


def _reference(op, x, y, sigma, k):
    """The float64 answer on the first queries (brute force, float64 throughout)."""
    from diffgen_fast.ops.knn.naive import knn_naive
    from diffgen_fast.ops.softmax_denoise.naive import kde_log_density_naive, softmax_denoise_naive

    x, y = x.double().cpu(), y.double().cpu()
    if op == "denoise":
        return softmax_denoise_naive(x, y, sigma)
    if op == "kde":
        return kde_log_density_naive(x, y, sigma)
    return knn_naive(x, y, k)


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return f"{type(e).__name__}: {s[0][:100] if s else ''}"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_data(M: int, N: int, d: int, sigma: float, seed: int = 0, near: float = 0.5):
    """Training points uniform in [-1, 1]^d; queries x = y_j + sigma n for a fraction `near` of them (every
    other row at 0.5: the float64 check on the first rows sees both kinds), x = u + sigma n with u uniform in
    [-1, 1]^d (not a training point) for the rest."""
    g = torch.Generator().manual_seed(seed)
    y = torch.rand(N, d, generator=g) * 2 - 1
    base = torch.rand(M, d, generator=g) * 2 - 1
    j = torch.randint(0, N, (M,), generator=g)
    is_near = torch.zeros(M, dtype=torch.bool)
    n_near = int(round(near * M))
    if n_near:
        step = M / n_near
        is_near[torch.floor(torch.arange(n_near) * step).long()] = True
    base[is_near] = y[j[is_near]]
    return base + sigma * torch.randn(M, d, generator=g), y


def make_npy(path: PathLike, N: int, d: int, seed: int = 0, block: int = 65_536) -> str:
    """A [N, d] float32 .npy of points uniform in [-1, 1]^d, written in blocks (kept when it exists with that
    shape). For the memory-mapped kNN case."""
    import numpy as np

    path = os.fspath(path)
    if os.path.exists(path):
        a = np.load(path, mmap_mode="r")
        if a.shape == (N, d) and a.dtype == np.float32:
            return path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.npy"
    a = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(N, d))
    rng = np.random.default_rng(seed)
    for s in range(0, N, block):
        a[s : s + block] = rng.uniform(-1, 1, size=(min(block, N - s), d)).astype(np.float32)
    a.flush()
    del a
    os.replace(tmp, path)
    return path


ShapeLike = Union[Sequence[tuple[int, int, int]], dict]


def run_bench(
    ops: Iterable[str] = OPS,
    shapes: Optional[ShapeLike] = None,
    backends: Optional[Iterable[str]] = None,
    precision: Iterable[str] = ("exact", "fast"),
    peers: Union[bool, Iterable[str]] = True,
    device="cpu",
    repeat: int = 5,
    warmup: int = 1,
    sigma: Union[float, Sequence[float]] = 1.0,
    k: int = 10,
    out_dir: Optional[PathLike] = None,
    rotate: int = 2,
    *,
    tiny: bool = False,
    ceilings: Optional[dict] = None,
    profile: Optional[PathLike] = None,
    seed: int = 0,
    verbose: bool = False,
    threads: Optional[int] = None,
    mem_budget: Optional[float] = None,
    chunk: Optional[int] = None,
    chunk_candidates: Sequence[int] = CHUNK_CANDIDATES,
    near: float = 0.5,
    train_npy: Optional[PathLike] = None,
    n_ref: int = N_REF,
) -> list[dict]:
    """Measure each op on each shape (and sigma) with our backends and the peers, all in one interleaved loop.

    Args:
        ops: among "denoise" (softmax_denoise with return_lse), "knn", "kde" (kde_log_density).
        shapes: None (DEFAULT_SHAPES, or TINY_SHAPES with tiny=True), a list of (M, N, d) for every op, or a dict
            op -> list of (M, N, d).
        backends: ours to run; None: every backend available on `device` (triton only on CUDA). Named backends
            that cannot run get a row saying why.
        precision: denoise precisions of ours ("exact", "fast", "auto" = the default); kde and knn are exact only.
        peers: True (all of PEERS), False, or names among "dense" (alias "naive"), "chunked", "keops", "faiss".
        sigma: one value or several (denoise and kde run at each; knn once, its queries made with the first).
        repeat, warmup: timed and untimed rounds of time_interleaved (before them, one call per implementation
            measures the peak memory and the errors against float64 on the first `n_ref` queries).
        rotate: copies of the inputs cycled through, so that a call does not find the previous call's data cached.
        threads: torch, native and faiss threads (None: torch's current setting, applied to all three).
        mem_budget: bytes the dense peer may use (None: half the available memory); above it, a "skipped" row.
        chunk: the chunked peer's chunk size (None: calibrate_chunk over `chunk_candidates` per shape).
        near: fraction of the queries that are noisy copies of training points (make_data).
        train_npy: knn only: a [N, d] float32 .npy used memory-mapped as the training set (ours get
            TrainingSet.from_npy, the peers the memory map); the knn shapes' N and d must match it.
        out_dir: where bench.csv and roofline.png go (None: nothing written).
        ceilings: measure_ceilings(device) result to reuse (None: measured here).
        profile: path of a Chrome trace of the whole run (profile_trace); each call is inside record(...).
    Returns:
        one dict per (op, shape, sigma, impl, backend, precision), columns COLUMNS + environment(); the rows of
        ours carry best_peer / best_peer_time_s / vs_best_peer = best peer time / our time, the best over the peers
        measured in the same loop at that shape whose errors are finite.
    """
    device = torch.device(device)
    ops = list(ops)
    for o in ops:
        if o not in OPS:
            raise ValueError(f"unknown op {o!r}; expected one of {', '.join(OPS)}")
    if peers is True:
        peers = PEERS
    elif peers is False or peers is None:
        peers = ()
    peers = tuple(_PEER_ALIASES.get(p, p) for p in peers)
    bad = [p for p in peers if p not in PEERS]
    if bad:
        raise ValueError(f"unknown peer {bad[0]!r}; expected among {', '.join(PEERS)}")
    precision = tuple(precision)
    backends = None if backends is None else tuple(backends)
    sigmas = [float(sigma)] if isinstance(sigma, (int, float)) else [float(s) for s in sigma]
    if shapes is None:
        shapes = TINY_SHAPES if tiny else DEFAULT_SHAPES
    if not isinstance(shapes, dict):
        shapes = {o: list(shapes) for o in ops}
    set_threads(threads)
    ceil = ceilings if ceilings is not None else measure_ceilings(device)
    env = environment(device)
    rotate = max(1, int(rotate))
    budget = _budget(device, mem_budget)
    rows: list[dict] = []
    ctx = profile_trace(profile) if profile else contextlib.nullcontext()
    with ctx:
        for op in ops:
            for M, N, d in shapes.get(op, []):
                for s in sigmas if op != "knn" else sigmas[:1]:
                    rows += _bench_shape(op, int(M), int(N), int(d), s, backends=backends, precision=precision,
                                         peers=peers, device=device, repeat=repeat, warmup=warmup, k=k,
                                         rotate=rotate, seed=seed, ceil=ceil, env=env, verbose=verbose,
                                         budget=budget, chunk=chunk, chunk_candidates=chunk_candidates, near=near,
                                         train_npy=train_npy if op == "knn" else None, n_ref=n_ref)  # fmt: skip
    if out_dir is not None:
        write_csv(rows, os.path.join(os.fspath(out_dir), "bench.csv"))
        roofline_figure(rows, ceil, os.path.join(os.fspath(out_dir), "roofline.png"))
    return rows


def set_threads(threads: Optional[int] = None) -> int:
    """Give torch, the native kernels and faiss the same thread count (None: torch's current one). Returns it."""
    n = int(threads) if threads else torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        from diffgen_fast import _native

        if _native.available():
            _native.set_num_threads(n)
    except Exception:
        pass
    faiss, _ = _faiss()
    if faiss is not None:
        faiss.omp_set_num_threads(n)
    return n


def _bench_shape(op, M, N, d, sigma, *, backends, precision, peers, device, repeat, warmup, k, rotate, seed, ceil,
                 env, verbose, budget, chunk, chunk_candidates, near, train_npy, n_ref) -> list[dict]:  # fmt: skip
    if train_npy is not None:
        import numpy as np

        from diffgen_fast.data import TrainingSet

        ymap = np.load(os.fspath(train_npy), mmap_mode="c")  # copy-on-write: torch.from_numpy takes it as is
        if ymap.shape != (N, d):
            raise ValueError(f"train_npy has shape {ymap.shape}, the knn shape asks for ({N}, {d})")
        g = torch.Generator().manual_seed(seed)
        j = torch.randint(0, N, (M,), generator=g)
        x = torch.from_numpy(np.ascontiguousarray(ymap[np.sort(j.numpy())])) + sigma * torch.randn(M, d, generator=g)
        y = torch.from_numpy(ymap)  # the memory map, not a copy: the peers read the file's pages as ours do
        X, Y = [x], [y]
        TRAIN = [TrainingSet.from_npy(train_npy)]
        ref_y = y
        rotate = 1
    else:
        x, y = make_data(M, N, d, sigma, seed, near)
        X = [x.to(device).clone() for _ in range(rotate)]
        Y = [y.to(device).clone() for _ in range(rotate)]
        TRAIN = Y
        ref_y = y
    ref = _reference(op, x[: min(M, n_ref)], ref_y, sigma, k)
    fl = flops(op, M, N, d, k)
    by = bytes_moved(op, M, N, d, 4, k)
    gemm, bw = ceil.get("gemm_gflops"), ceil.get("copy_gbps")
    impls = _our_impls(op, backends, device, X, TRAIN, sigma, k, precision)
    impls += _peer_impls(op, peers, X, Y, sigma, k, device, budget, chunk, chunk_candidates)
    base = dict(op=op, M=M, N=N, d=d, k=k if op == "knn" else "", dtype="float32", sigma=sigma, repeat=repeat,
                warmup=warmup, rotate=rotate, intensity=f"{fl / by:.4g}", roof=ceil.get("gemm_roof", ""),
                ceil_gemm_gflops=f"{gemm:.4g}" if gemm else "", ceil_bw_gbps=f"{bw:.4g}" if bw else "",
                device_type=device.type, train="npy memmap" if train_npy is not None else "tensor")  # fmt: skip
    rows: dict = {}
    calls: dict = {}
    for n, im in enumerate(impls):
        row = dict(base, impl=im.impl, backend=im.backend, precision=im.precision, kernel=im.kernel, chunk=im.chunk)
        label = f"{op} {im.impl} {im.backend} {im.precision} {M}x{N}x{d} sigma={sigma:g}"
        if im.fn is None:
            rows[n] = {**row, "status": im.status, **env}
            continue
        try:  # the first call: result checked against float64, peak memory
            with record(f"bench/{label}/first"):
                res, peak, method = _peak_call(lambda fn=im.fn: fn(0), device)
            errs = _errors(op, res, ref)
            del res
        except Exception as e:  # an implementation that cannot run this case gets a row saying why
            if device.type == "cuda":
                torch.cuda.empty_cache()
            rows[n] = {**row, "status": f"error: {_first_line(e)}", **env}
            continue
        rows[n] = {**row, **errs, "peak_mem_mb": peak, "mem_method": method, **env}
        calls[n] = im.fn

    def label(n):
        return f"{op} {impls[n].impl} {impls[n].backend} {M}x{N}x{d}"

    times, failed = time_interleaved(calls, repeat=repeat, warmup=warmup, rotate=rotate, device=device, label=label)
    for n, e in failed.items():
        rows[n]["status"] = f"error: {_first_line(e)}"
    for n in calls:
        if n in failed:
            continue
        ts = times[n]
        t = statistics.median(ts)
        gf = fl / t / 1e9
        gbs = by / t / 1e9
        rows[n].update(status="ok", time_s=f"{t:.4g}", spread_s=f"{max(ts) - min(ts):.2g}", gflops=f"{gf:.4g}",
                       tflops=f"{gf / 1e3:.4g}", gbps=f"{gbs:.4g}", gemm_frac=f"{gf / gemm:.4g}" if gemm else "",
                       bw_frac=f"{gbs / bw:.4g}" if bw else "")  # fmt: skip
    out = [rows[n] for n in range(len(impls))]
    add_best_peer(out)
    if verbose:
        for r in out:
            what = f"{float(r['time_s']) * 1e3:.2f} ms" if r.get("status") == "ok" else r.get("status")
            vs = f"  x{r['vs_best_peer']} vs {r['best_peer']}" if r.get("vs_best_peer") else ""
            print(f"{op} {M}x{N}x{d} sigma={sigma:g} {r['impl']} {r['backend']} {r['precision']}: {what}{vs}",
                  flush=True)  # fmt: skip
    return out


def add_best_peer(rows: list[dict]) -> list[dict]:
    """Per (op, M, N, d, sigma, device): the fastest peer row that ran ("ok", finite errors); each row of ours gets
    best_peer (its name), best_peer_time_s and vs_best_peer = best_peer_time / our time (> 1: ours is faster).
    In place; returns `rows`."""
    groups: dict = {}
    for r in rows:
        groups.setdefault(tuple(str(r.get(f, "")) for f in ("op", "M", "N", "d", "sigma", "device")), []).append(r)
    for group in groups.values():
        peers = [r for r in group if r.get("impl") != "ours" and r.get("status") == "ok" and _errors_finite(r)]
        best = min(peers, key=lambda r: float(r["time_s"])) if peers else None
        for r in group:
            if r.get("impl") != "ours":
                continue
            if best is None:
                r.update(best_peer="", best_peer_time_s="", vs_best_peer="")
                continue
            r["best_peer"] = best["impl"]
            r["best_peer_time_s"] = best["time_s"]
            r["vs_best_peer"] = f"{float(best['time_s']) / float(r['time_s']):.3g}" if r.get("status") == "ok" else ""
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# output


def _fields(rows: list[dict]) -> list[str]:
    fields = [c for c in COLUMNS if any(c in r for r in rows)]
    for r in rows:
        fields += [c for c in r if c not in fields]
    return fields


def write_csv(rows: list[dict], path: PathLike) -> str:
    """Write `rows` to a CSV (atomically), columns the union over the rows (COLUMNS first). Returns the path."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=_fields(rows), restval="", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    write_text_atomic(buf.getvalue(), path)
    return os.fspath(path)


def read_csv(path: PathLike) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _pct(v) -> str:
    try:
        return f"{100 * float(v):.1f}%"
    except (TypeError, ValueError):
        return ""


def _err(r: dict) -> str:
    if r.get("op") == "knn":
        if r.get("knn_mismatch", "") == "":
            return ""
        return f"miss {r['knn_mismatch']} d2 {r.get('sqdist_rel_err', '')}"
    parts = []
    if r.get("max_abs_err", "") != "":
        parts.append(f"abs {r['max_abs_err']}")
    if r.get("lse_rel_err", "") != "":
        parts.append(f"lse {r['lse_rel_err']}")
    return " ".join(parts)


def _ms(v) -> str:
    try:
        return f"{float(v) * 1e3:.3f}"
    except (TypeError, ValueError):
        return ""


def format_table(rows: list[dict]) -> str:
    """An aligned text table, one row per measurement: time, the ratio to the best peer, throughput and the
    fractions of the ceilings, errors, peak memory, status."""
    headers = ["op", "shape MxNxd", "sigma", "impl", "backend", "prec", "time ms", "spread", "x best peer", "GFLOP/s",
               "GB/s", "%gemm", "%bw", "error vs fp64", "peak MB", "status"]  # fmt: skip
    body = []
    for r in rows:
        ok = r.get("status") == "ok"
        vs = f"{r['vs_best_peer']} ({r['best_peer']})" if ok and r.get("vs_best_peer") else ""
        body.append([
            str(r.get("op", "")), f"{r.get('M')}x{r.get('N')}x{r.get('d')}", f"{float(r.get('sigma') or 0):g}",
            str(r.get("impl", "")), str(r.get("backend", "")), str(r.get("precision", "")),
            _ms(r["time_s"]) if ok else "", f"{float(r['spread_s']) * 1e3:.2g}" if ok else "", vs,
            f"{float(r['gflops']):.1f}" if ok else "", f"{float(r['gbps']):.2f}" if ok else "",
            _pct(r.get("gemm_frac")) if ok else "", _pct(r.get("bw_frac")) if ok else "", _err(r) if ok else "",
            str(r.get("peak_mem_mb", "")), str(r.get("status", "")),
        ])  # fmt: skip
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(headers)]
    right = {2, 6, 7, 9, 10, 11, 12, 14}

    def line(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [line(headers), "  ".join("-" * w for w in widths)] + [line(b) for b in body]
    return "\n".join(s.rstrip() for s in out)


def format_markdown(rows: list[dict], ceilings: Optional[dict] = None) -> str:
    """A markdown summary: one line per row of ours with its time, the best peer of the same loop and the ratio
    best peer time / our time, GFLOP/s, the fraction of the measured sgemm rate, the error against float64 and the
    kernel; then the peers that did not run and why, and the environment of the run."""
    lines = []
    env = next((r for r in rows if r.get("git_sha")), {})
    if env:
        lines.append(f"{env.get('cpu_model', '')}, {env.get('device', '')}, torch {env.get('torch', '')}, numpy "
                     f"{env.get('numpy', '')}, faiss {env.get('faiss', '') or '-'}, threads {env.get('threads', '')}, "
                     f"SIMD {env.get('simd', '') or '-'}, {env.get('date', '')}, "
                     f"git {env.get('git_sha', '')}")  # fmt: skip
        lines.append("")
    if ceilings:
        lines.append(format_ceilings(ceilings))
        lines.append("")
    lines.append("| op | M x N x d | sigma | ours | time ms | best peer | peer ms | best peer / ours | GFLOP/s "
                 "| % sgemm | error vs fp64 | kernel |")  # fmt: skip
    lines.append("|---|---|---:|---|---:|---|---:|---:|---:|---:|---|---|")
    for r in rows:
        if r.get("impl") != "ours":
            continue
        ok = r.get("status") == "ok"
        ours = f"{r.get('backend')} {r.get('precision')}"
        if not ok:
            lines.append(f"| {r['op']} | {r['M']}x{r['N']}x{r['d']} | {float(r.get('sigma') or 0):g} | {ours} | "
                         f"{r.get('status')} | | | | | | | |")  # fmt: skip
            continue
        vs = f"**{r['vs_best_peer']}x**" if r.get("vs_best_peer") else "no peer ran"
        cells = [r["op"], f"{r['M']}x{r['N']}x{r['d']}", f"{float(r.get('sigma') or 0):g}", ours, _ms(r["time_s"]),
                 r.get("best_peer", ""), _ms(r.get("best_peer_time_s")), vs, f"{float(r['gflops']):.1f}",
                 _pct(r.get("gemm_frac")), _err(r), r.get("kernel", "")]  # fmt: skip
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    skipped = sorted({(r.get("impl"), r.get("op"), r.get("status")) for r in rows
                      if r.get("impl") != "ours" and r.get("status") != "ok"})  # fmt: skip
    if skipped:
        lines.append("")
        for impl, op, status in skipped:
            lines.append(f"- peer {impl} ({op}): {status}")
    chunks = sorted({(r.get("op"), r.get("M"), r.get("N"), r.get("d"), r.get("kernel")) for r in rows
                     if r.get("impl") == "chunked" and r.get("status") == "ok"}, key=str)  # fmt: skip
    if chunks:
        lines.append("")
        lines.append("chunked peer chunk sizes:")
        for op, M, N, d, kernel in chunks:
            lines.append(f"- {op} {M}x{N}x{d}: {kernel}")
    return "\n".join(lines) + "\n"


def format_ceilings(ceilings: dict) -> str:
    parts = [f"{k[5:-7]} GEMM {v:.1f} GFLOP/s" for k, v in ceilings.items() if k.startswith("gemm_") and
             k.endswith("_gflops") and k != "gemm_gflops"]  # fmt: skip
    parts.append(f"copy {ceilings.get('copy_gbps', float('nan')):.1f} GB/s")
    return f"ceilings ({ceilings.get('device_type', '')}): " + ", ".join(parts)


def roofline_figure(rows: list[dict], ceilings: dict, path: PathLike):
    """A log-log roofline PNG: arithmetic intensity (FLOP/byte) on x, achieved GFLOP/s on y, the measured GEMM roof
    (flat) and copy bandwidth (slope) as lines, each measured point labelled. Returns the path."""
    from diffgen_fast.figures import _new_figure, _save_figure

    pts = [r for r in rows if r.get("status") == "ok"]
    gemm = float(ceilings.get("gemm_gflops") or 0) or None
    bw = float(ceilings.get("copy_gbps") or 0) or None
    fig = _new_figure(9.0, 6.0)
    ax = fig.add_subplot(1, 1, 1)
    xs = [float(r["intensity"]) for r in pts]
    ys = [float(r["gflops"]) for r in pts]
    lo = min(xs + [1.0]) / 4
    hi = max(xs + [gemm / bw if gemm and bw else 10.0]) * 4
    grid = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    if bw:
        ax.plot(grid, [bw * x if not gemm else min(bw * x, gemm) for x in grid], color="black", lw=1.5,
                label=f"roofline: copy {bw:.1f} GB/s, {ceilings.get('gemm_roof', '')} GEMM "
                      f"{gemm or float('nan'):.1f} GFLOP/s")  # fmt: skip
        ax.plot(grid, [bw * x for x in grid], color="gray", lw=0.8, ls=":")
    if gemm:
        ax.axhline(gemm, color="gray", lw=0.8, ls=":")
    # One colour per implementation and one marker per op, both in the legend; only the fastest point of each op
    # (ours or a peer) is labelled in the plot, so labels never pile up.
    markers = {"denoise": "o", "kde": "s", "knn": "^"}
    colors: dict = {}
    cmap = ["C0", "C1", "C2", "C3", "C4", "C5", "C6", "C7", "C8", "C9"]
    best: dict = {}
    for r, x, y in zip(pts, xs, ys):
        name = r["impl"] if r["impl"] != "ours" else f"ours {r['backend']} {r['precision']}"
        c = colors.get(name)
        if c is None:
            c = colors[name] = cmap[len(colors) % len(cmap)]
            ax.scatter([], [], marker="o", color=c, s=30, label=name)
        ax.scatter([x], [y], marker=markers.get(r["op"], "o"), color=c, s=30, zorder=3, alpha=0.85)
        if r["op"] not in best or y > best[r["op"]][1]:
            best[r["op"]] = (x, y, name, f"{r['M']}x{r['N']}x{r['d']}")
    for op, m in markers.items():
        if any(r["op"] == op for r in pts):
            ax.scatter([], [], marker=m, color="0.4", s=30, label=f"op: {op}")
    for op, (x, y, name, shape) in best.items():
        ax.annotate(f"fastest {op}: {name} ({shape})", (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax.set_ylabel("achieved GFLOP/s")
    dev = pts[0].get("device", "") if pts else ""
    shapes = sorted({f"{r['M']}x{r['N']}x{r['d']}" for r in pts})
    ax.set_title(f"Roofline of every measured op on {dev} (shapes {', '.join(shapes[:4])}"
                 f"{', ...' if len(shapes) > 4 else ''})", fontsize=9)  # fmt: skip
    ax.grid(True, which="both", alpha=0.2)
    ax.legend(fontsize=7, loc="upper left", ncol=2)
    fig.tight_layout()
    return _save_figure(fig, path)


def _key(r: dict) -> tuple:
    return tuple(str(r.get(f, "")) for f in KEY_FIELDS)


def compare(rows: list[dict], old_csv_path: PathLike, *, tolerance: float = 0.2) -> list[dict]:
    """Match `rows` against an older CSV on (op, impl, backend, precision, M, N, d, device); one dict per matched
    measured row with old_time_s, new_time_s, ratio = new / old and flag "REGRESSION" (slower by more than
    `tolerance`), "faster" (faster by more than `tolerance`) or "ok"."""
    old = {_key(r): r for r in read_csv(old_csv_path) if r.get("status") == "ok" and r.get("time_s")}
    out = []
    for r in rows:
        if r.get("status") != "ok" or not r.get("time_s"):
            continue
        o = old.get(_key(r))
        if o is None:
            continue
        new_t, old_t = float(r["time_s"]), float(o["time_s"])
        ratio = new_t / old_t if old_t > 0 else float("inf")
        flag = "REGRESSION" if ratio > 1 + tolerance else ("faster" if ratio < 1 / (1 + tolerance) else "ok")
        out.append({**{f: r.get(f, "") for f in KEY_FIELDS}, "old_time_s": old_t, "new_time_s": new_t,
                    "ratio": ratio, "flag": flag})  # fmt: skip
    return out


def format_compare(results: list[dict]) -> str:
    lines = []
    for c in results:
        lines.append(f"{c['op']:8s} {c['impl']:14s} {c['backend']:6s} {c['precision']:6s} "
                     f"{c['M']}x{c['N']}x{c['d']:<8} s={c.get('sigma', '')} "
                     f"{c['old_time_s'] * 1e3:10.3f} ms -> {c['new_time_s'] * 1e3:10.3f}"
                     f" ms  x{c['ratio']:.2f}  {c['flag']}")  # fmt: skip
    return "\n".join(lines) if lines else "no matching rows"


# ----------------------------------------------------------------------------------------------------------------------
# the benchmarks/ scripts: common options and one driver


def _csv_list(s: str, cast=str) -> list:
    return [cast(v.strip()) for v in str(s).split(",") if v.strip()]


def script_parser(doc: str, *, sigma: str = "1", repeat: int = 3, backends: str = "", peers: str = ",".join(PEERS)):
    """The options every benchmarks/ script shares: --tiny, --out CSV, --md, --sigma, --backends, --peers,
    --no-peers, --threads, --repeat, --warmup, --device, --verbose/--quiet."""
    import argparse

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny shapes: the same code end to end in seconds")
    p.add_argument("--out", default=None, help="CSV path (default benchmarks/results/<name>-<device>.csv)")
    p.add_argument("--md", default=None, help="markdown table path (default: the CSV's with .md)")
    p.add_argument("--sigma", default=sigma, help=f"comma list (default {sigma})")
    p.add_argument("--backends", default=backends, help="comma list of our backends (default: the script's)")
    p.add_argument("--peers", default=peers, help=f"comma list among {', '.join(PEERS)} (default {peers})")
    p.add_argument("--no-peers", action="store_true", help="no peers (no ratios)")
    p.add_argument("--threads", type=int, default=None, help="threads for torch, ours and faiss (default torch's)")
    p.add_argument("--repeat", type=int, default=repeat, help=f"timed rounds (default {repeat})")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds (default 1)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quiet", action="store_true", help="no per-row progress lines")
    return p


def default_results_path(name: str, rows_or_env: Union[list, dict], tiny: bool) -> str:
    """benchmarks/results/<name>-[tiny-]<device slug>.csv under the repository (the current directory when the
    package is installed elsewhere)."""
    import re

    env = rows_or_env[0] if isinstance(rows_or_env, list) and rows_or_env else rows_or_env
    dev = env.get("device", "device") if isinstance(env, dict) else "device"
    slug = re.sub(r"[^A-Za-z0-9]+", "-", f"{'tiny-' if tiny else ''}{dev}").strip("-").lower()[:60]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    base = os.path.join(root, "benchmarks") if os.path.isdir(os.path.join(root, "benchmarks")) else "benchmarks"
    return os.path.join(base, "results", f"{name}-{slug}.csv")


def run_script(args, *, name: str, ops: Sequence[str], shapes, tiny_shapes, backends: Optional[Sequence[str]],
               precision: Sequence[str] = ("exact", "fast"), k: int = 10,
               extra: Optional[Callable[[dict], list]] = None) -> list[dict]:  # fmt: skip
    """What every benchmarks/ script does after parsing script_parser's options: threads, ceilings, run_bench
    (plus `extra(ceilings)` rows), the text table, CSV and markdown. Returns the rows."""
    import torch as _torch

    device = _torch.device(args.device)
    threads = set_threads(args.threads)
    ceil = measure_ceilings(device)
    print(format_ceilings(ceil), f"threads={threads}", flush=True)
    peers = () if args.no_peers else tuple(_csv_list(args.peers))
    bk = tuple(_csv_list(args.backends)) if args.backends else (None if backends is None else tuple(backends))
    rows = run_bench(ops=ops, shapes=tiny_shapes if args.tiny else shapes, backends=bk, precision=precision,
                     peers=peers, device=device, repeat=args.repeat, warmup=args.warmup,
                     sigma=_csv_list(args.sigma, float), k=k, ceilings=ceil, threads=threads,
                     verbose=not args.quiet)  # fmt: skip
    if extra is not None:
        rows += extra(ceil)
    print(format_table(rows))
    path = args.out or default_results_path(name, rows, args.tiny)
    md = args.md or os.path.splitext(path)[0] + ".md"
    write_csv(rows, path)
    write_text_atomic(format_markdown(rows, ceil), md)
    print(f"wrote {path} and {md}", flush=True)
    return rows
