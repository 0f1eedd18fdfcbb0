"""Benchmarks of the ops against the papers' code and peers, with the machine's measured ceilings.

The library side of ``diffgen-fast bench``: importable without the ``benchmarks/`` scripts.

- ``measure_ceilings(device)``: GEMM rate (GFLOP/s) and copy bandwidth (GB/s, read + write) measured on the device.
- ``flops`` / ``bytes_moved``: the FLOP and byte models behind the TFLOP/s, GB/s and roofline columns.
- ``run_bench(...)``: every available backend of ours and each peer ("naive torch": the papers' cdist + softmax +
  matmul; "chunked torch": an fp32 online-softmax loop; "keops"; "faiss" for knn) on a list of shapes; one row per
  measurement with time, throughput, ceiling fractions, errors against float64 and peak memory.
- ``write_csv``, ``format_table``, ``roofline_figure``, ``compare`` (regression check against an older CSV).
- ``profile_trace(path)`` (torch.profiler, Chrome trace JSON) and ``record(name)`` (a profiler range, plus NVTX on
  CUDA) around each measured call.

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
PEERS = ("naive", "chunked", "keops", "faiss")
KEY_FIELDS = ("op", "impl", "backend", "precision", "M", "N", "d", "device")
COLUMNS = (
    "op", "impl", "backend", "precision", "M", "N", "d", "k", "dtype", "status", "time_s", "spread_s", "gflops",
    "tflops", "gbps", "intensity", "gemm_frac", "bw_frac", "roof", "max_abs_err", "lse_rel_err", "knn_mismatch",
    "sqdist_rel_err", "peak_mem_mb", "mem_method", "repeat", "warmup", "rotate", "sigma", "ceil_gemm_gflops",
    "ceil_bw_gbps", "device_type",
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


def environment(device) -> dict:
    """Device name, versions, date (UTC) and git SHA, the same record as benchmarks/common.environment."""
    import numpy

    import diffgen_fast

    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.processor() or platform.machine()} x{os.cpu_count()} threads={torch.get_num_threads()}"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    return {
        "device": name,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda or "",
        "numpy": numpy.__version__,
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
    tensor copy (read + write counted), medians of a few runs. CPU: fp32 n = 1024 and a 128 MB copy (< 3 s);
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
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    t = _cpu_times(lambda: a @ b, warmup=1, repeat=5)
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


def _naive_denoise(x, y, sigma):
    """The papers' code: the whole [M, N] distance matrix in fp32, softmax, matmul."""
    logits = -torch.cdist(x.float(), y.float()).square() / (2 * sigma**2)
    return torch.softmax(logits, dim=1) @ y.float(), torch.logsumexp(logits, dim=1)


def _chunked_denoise(x, y, sigma, chunk=16384, need_out=True):
    """What a careful user writes: an fp32 online softmax over training chunks."""
    xx = (x * x).sum(1)
    m = torch.full((x.shape[0],), float("-inf"), device=x.device)
    l = torch.zeros(x.shape[0], device=x.device)
    o = torch.zeros(x.shape[0], x.shape[1], device=x.device) if need_out else None
    for s in range(0, y.shape[0], chunk):
        yc = y[s : s + chunk]
        z = -(xx[:, None] - 2 * (x @ yc.T) + (yc * yc).sum(1)[None]) / (2 * sigma**2)
        mn = torch.maximum(m, z.max(1).values)
        p = torch.exp(z - mn[:, None])
        r = torch.exp(m - mn)
        l = l * r + p.sum(1)
        if need_out:
            o = o * r[:, None] + p @ yc
        m = mn
    return (o / l[:, None] if need_out else None), m + l.log()


def _kde_const(N, d, h):
    return -math.log(N) - 0.5 * d * math.log(2 * math.pi * h * h)


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


def _peer_impls(op, peers, X, Y, sigma, k, device):
    """name -> (fn(i) or None, status when None) of the peers asked for that serve `op`."""
    out: dict = {}
    M, d = X[0].shape
    N = Y[0].shape[0]
    if "naive" in peers:
        need = 3 * M * N * 4  # cdist result, its square / logits, the softmax
        avail = _mem_available(device)
        if avail is not None and need > 0.5 * avail:
            out["naive torch"] = (None, f"skipped: needs {need / 1e9:.1f} GB")
        elif op == "denoise":
            out["naive torch"] = (lambda i: _naive_denoise(X[i], Y[i], sigma), None)
        elif op == "kde":
            c = _kde_const(N, d, sigma)
            out["naive torch"] = (
                lambda i: torch.logsumexp(-torch.cdist(X[i], Y[i]).square() / (2 * sigma**2), dim=1) + c,
                None,
            )
        else:

            def naive_knn(i):
                d2 = torch.cdist(X[i], Y[i]).square()
                v, j = torch.topk(d2, k, dim=1, largest=False)
                return v, j

            out["naive torch"] = (naive_knn, None)
    if "chunked" in peers and op in ("denoise", "kde"):
        if op == "denoise":
            out["chunked torch"] = (lambda i: _chunked_denoise(X[i], Y[i], sigma), None)
        else:
            c = _kde_const(N, d, sigma)
            out["chunked torch"] = (lambda i: _chunked_denoise(X[i], Y[i], sigma, need_out=False)[1] + c, None)
    if "keops" in peers:
        LazyTensor, why = _keops()
        if LazyTensor is None:
            out["keops"] = (None, why)
        else:

            def z_of(i):
                xi, yi = LazyTensor(X[i][:, None, :]), LazyTensor(Y[i][None, :, :])
                return ((xi - yi) ** 2).sum(-1)

            if op == "denoise":

                def keops_denoise(i):
                    z = -z_of(i) / (2 * sigma**2)
                    return z.sumsoftmaxweight(LazyTensor(Y[i][None, :, :]), axis=1), z.logsumexp(axis=1).reshape(-1)

                out["keops"] = (keops_denoise, None)
            elif op == "kde":
                c = _kde_const(N, d, sigma)
                out["keops"] = (lambda i: (-z_of(i) / (2 * sigma**2)).logsumexp(axis=1).reshape(-1) + c, None)
            else:

                def keops_knn(i):
                    v, j = z_of(i).Kmin_argKmin(k, dim=1)
                    return v, j

                out["keops"] = (keops_knn, None)
    if "faiss" in peers and op == "knn":
        faiss, why = _faiss()
        if faiss is None:
            out["faiss"] = (None, why)
        elif device.type != "cpu":
            out["faiss"] = (None, "skipped: faiss peer runs on the CPU only")
        else:
            indexes, queries = [], []
            for i in range(len(X)):
                ix = faiss.IndexFlatL2(d)
                ix.add(Y[i].numpy())  # the index build (a copy) is outside the timed call
                indexes.append(ix)
                queries.append(X[i].numpy())

            def faiss_knn(i):
                v, j = indexes[i].search(queries[i], k)
                return torch.from_numpy(v), torch.from_numpy(j)

            out["faiss"] = (faiss_knn, None)
    return out


def _our_impls(op, backends, device, X, TS, sigma, k, precisions):
    """(impl, backend, precision) -> (fn(i) or None, status) of our backends for `op`."""
    from diffgen_fast.ops import kde_log_density, knn, softmax_denoise
    from diffgen_fast.ops.dispatch import backend_table

    table = {r["backend"]: r for r in backend_table(device) if r["op"] == _OP_NAME[op]}
    names = list(table) if backends is None else list(backends)
    out: dict = {}
    for b in names:
        r = table.get(b)
        if r is None:
            continue  # e.g. faiss asked for denoise
        if b == "triton" and device.type != "cuda":
            continue  # the interpreter is for tests, not for timing
        if not r["available"]:
            if backends is not None:  # asked for by name: say why not
                out[("ours", b, "-")] = (None, f"unavailable: {r['reason']}")
            continue
        if op == "denoise":
            for p in precisions:
                out[("ours", b, p)] = (
                    lambda i, b=b, p=p: softmax_denoise(X[i], TS[i], sigma, return_lse=True, backend=b, precision=p),
                    None,
                )
        elif op == "kde":
            out[("ours", b, "exact")] = (lambda i, b=b: kde_log_density(X[i], TS[i], sigma, backend=b), None)
        else:
            out[("ours", b, "exact")] = (lambda i, b=b: knn(X[i], TS[i], k, backend=b), None)
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
    d2 = d2[:n].double().cpu()
    idx = idx[:n].long().cpu()
    mismatch = int((idx != r_idx).sum())
    rel = float(((d2 - r_d2).abs() / r_d2.abs().clamp(min=1e-30)).max())
    return {"knn_mismatch": mismatch, "sqdist_rel_err": f"{rel:.2e}"}


def _reference(op, x, y, sigma, k):
    from diffgen_fast.ops.knn.naive import knn_naive
    from diffgen_fast.ops.softmax_denoise.naive import kde_log_density_naive, softmax_denoise_naive

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
    sigma: float = 1.0,
    k: int = 10,
    out_dir: Optional[PathLike] = None,
    rotate: int = 2,
    *,
    tiny: bool = False,
    ceilings: Optional[dict] = None,
    profile: Optional[PathLike] = None,
    seed: int = 0,
    verbose: bool = False,
) -> list[dict]:
    """Measure each op on each shape with every available backend of ours and each available peer.

    Args:
        ops: among "denoise", "knn", "kde".
        shapes: None (DEFAULT_SHAPES, or TINY_SHAPES with tiny=True), a list of (M, N, d) for every op, or a dict
            op -> list of (M, N, d).
        backends: ours to run; None: every backend available on `device` (triton only on CUDA). Named backends
            that cannot run get a row saying why.
        precision: denoise precisions of ours ("exact", "fast", "auto"); kde and knn are exact only.
        peers: True (all of PEERS), False, or names among "naive", "chunked", "keops", "faiss".
        repeat, warmup: timed calls after untimed ones (the first untimed call also measures peak memory and the
            errors against float64 on the first 8 queries).
        rotate: copies of the inputs cycled through, so that a call does not find the previous call's data cached.
        out_dir: where bench.csv and roofline.png go (None: nothing written).
        ceilings: measure_ceilings(device) result to reuse (None: measured here).
        profile: path of a Chrome trace of the whole run (profile_trace); each call is inside record(...).
    Returns:
        one dict per (op, shape, impl, backend, precision), columns COLUMNS + environment().
    """
    device = torch.device(device)
    ops = [o for o in ops]
    for o in ops:
        if o not in OPS:
            raise ValueError(f"unknown op {o!r}; expected one of {', '.join(OPS)}")
    if peers is True:
        peers = PEERS
    elif peers is False or peers is None:
        peers = ()
    peers = tuple(peers)
    precision = tuple(precision)
    backends = None if backends is None else tuple(backends)
    if shapes is None:
        shapes = TINY_SHAPES if tiny else DEFAULT_SHAPES
    if not isinstance(shapes, dict):
        shapes = {o: list(shapes) for o in ops}
    ceil = ceilings if ceilings is not None else measure_ceilings(device)
    env = environment(device)
    rotate = max(1, int(rotate))
    rows: list[dict] = []
    ctx = profile_trace(profile) if profile else contextlib.nullcontext()
    with ctx:
        for op in ops:
            for M, N, d in shapes.get(op, []):
                rows += _bench_shape(op, int(M), int(N), int(d), backends, precision, peers, device, repeat,
                                     warmup, sigma, k, rotate, seed, ceil, env, verbose)  # fmt: skip
    if out_dir is not None:
        write_csv(rows, os.path.join(os.fspath(out_dir), "bench.csv"))
        roofline_figure(rows, ceil, os.path.join(os.fspath(out_dir), "roofline.png"))
    return rows


def _bench_shape(op, M, N, d, backends, precision, peers, device, repeat, warmup, sigma, k, rotate, seed, ceil,
                 env, verbose) -> list[dict]:  # fmt: skip
    from diffgen_fast.data import TrainingSet

    g = torch.Generator().manual_seed(seed)
    y = torch.rand(N, d, generator=g) * 2 - 1
    j = torch.randint(0, N, (M,), generator=g)
    x = y[j] + sigma * torch.randn(M, d, generator=g)
    n_ref = min(M, N_REF)
    ref = _reference(op, x[:n_ref], y, sigma, k)
    X = [x.to(device).clone() for _ in range(rotate)]
    Y = [y.to(device).clone() for _ in range(rotate)]
    TS = [TrainingSet.from_tensor(t) for t in Y]
    fl = flops(op, M, N, d, k)
    by = bytes_moved(op, M, N, d, 4, k)
    gemm, bw = ceil.get("gemm_gflops"), ceil.get("copy_gbps")
    impls = _our_impls(op, backends, device, X, TS, sigma, k, precision)
    for name, v in _peer_impls(op, peers, X, Y, sigma, k, device).items():
        impls[(name, "-", "fp32")] = v
    rows = []
    for (impl, backend, prec), (fn, status) in impls.items():
        row = dict(op=op, impl=impl, backend=backend, precision=prec, M=M, N=N, d=d, k=k if op == "knn" else "",
                   dtype="float32", sigma=sigma, repeat=repeat, warmup=warmup, rotate=rotate,
                   intensity=f"{fl / by:.4g}", roof=ceil.get("gemm_roof", ""),
                   ceil_gemm_gflops=f"{gemm:.4g}" if gemm else "", ceil_bw_gbps=f"{bw:.4g}" if bw else "",
                   device_type=device.type)  # fmt: skip
        label = f"{op} {impl} {backend} {prec} {M}x{N}x{d}"
        if fn is None:
            rows.append({**row, "status": status, **env})
            if verbose:
                print(f"{label}: {status}", flush=True)
            continue
        try:
            with record(f"bench/{label}/first"):
                res, peak, method = _peak_call(lambda fn=fn: fn(0), device)
            errs = _errors(op, res, ref)
            del res
            for w in range(max(0, warmup - 1)):
                fn((w + 1) % rotate)
            _sync(device)
            times = []
            for r in range(repeat):
                i = r % rotate
                with record(f"bench/{label}"):
                    if device.type == "cuda":
                        times += [t / 1e3 for t in _cuda_ms(lambda i=i, fn=fn: fn(i), 1)]
                    else:
                        t0 = time.perf_counter()
                        fn(i)
                        times.append(time.perf_counter() - t0)
        except Exception as e:  # an implementation that cannot run this case gets a row saying why
            if device.type == "cuda":
                torch.cuda.empty_cache()
            rows.append({**row, "status": f"error: {_first_line(e)}", **env})
            if verbose:
                print(f"{label}: {rows[-1]['status']}", flush=True)
            continue
        t = statistics.median(times)
        gf = fl / t / 1e9
        gbs = by / t / 1e9
        rows.append({**row, "status": "ok", "time_s": f"{t:.4g}", "spread_s": f"{max(times) - min(times):.2g}",
                     "gflops": f"{gf:.4g}", "tflops": f"{gf / 1e3:.4g}", "gbps": f"{gbs:.4g}",
                     "gemm_frac": f"{gf / gemm:.4g}" if gemm else "", "bw_frac": f"{gbs / bw:.4g}" if bw else "",
                     **errs, "peak_mem_mb": peak, "mem_method": method, **env})  # fmt: skip
        if verbose:
            print(f"{label}: {t * 1e3:.2f} ms", flush=True)
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


def format_table(rows: list[dict]) -> str:
    """An aligned text table, one row per measurement: time, throughput and the fractions of the ceilings."""
    headers = ["op", "shape MxNxd", "impl", "backend", "prec", "time ms", "spread", "GFLOP/s", "GB/s", "%gemm",
               "%bw", "error vs fp64", "peak MB", "status"]  # fmt: skip
    body = []
    for r in rows:
        ok = r.get("status") == "ok"
        t = float(r["time_s"]) * 1e3 if ok else None
        body.append([
            str(r.get("op", "")), f"{r.get('M')}x{r.get('N')}x{r.get('d')}", str(r.get("impl", "")),
            str(r.get("backend", "")), str(r.get("precision", "")),
            f"{t:.3f}" if ok else "", f"{float(r['spread_s']) * 1e3:.2g}" if ok else "",
            f"{float(r['gflops']):.1f}" if ok else "", f"{float(r['gbps']):.2f}" if ok else "",
            _pct(r.get("gemm_frac")) if ok else "", _pct(r.get("bw_frac")) if ok else "", _err(r) if ok else "",
            str(r.get("peak_mem_mb", "")), str(r.get("status", "")),
        ])  # fmt: skip
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(headers)]
    right = {5, 6, 7, 8, 9, 10, 12}

    def line(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [line(headers), "  ".join("-" * w for w in widths)] + [line(b) for b in body]
    return "\n".join(s.rstrip() for s in out)


def format_ceilings(ceilings: dict) -> str:
    parts = [f"{k[5:-7]} GEMM {v:.1f} GFLOP/s" for k, v in ceilings.items() if k.startswith("gemm_") and
             k.endswith("_gflops") and k != "gemm_gflops"]  # fmt: skip
    parts.append(f"copy {ceilings.get('copy_gbps', float('nan')):.1f} GB/s")
    return f"ceilings ({ceilings.get('device_type', '')}): " + ", ".join(parts)


def roofline_figure(rows: list[dict], ceilings: dict, path: PathLike):
    """A log-log roofline PNG: arithmetic intensity (FLOP/byte) on x, achieved GFLOP/s on y, the measured GEMM roof
    (flat) and copy bandwidth (slope) as lines, each measured point labelled. Returns the path."""
    from diffgen_fast.report import _new_figure, _save_figure

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
    markers = {"denoise": "o", "kde": "s", "knn": "^"}
    colors = {}
    cmap = ["C0", "C1", "C2", "C3", "C4", "C5", "C6", "C7", "C8", "C9"]
    for r, x, y in zip(pts, xs, ys):
        key = (r["impl"], r["backend"], r["precision"])
        c = colors.setdefault(key, cmap[len(colors) % len(cmap)])
        ax.scatter([x], [y], marker=markers.get(r["op"], "o"), color=c, s=30, zorder=3)
        name = r["impl"] if r["impl"] != "ours" else f"{r['backend']} {r['precision']}"
        ax.annotate(f"{r['op']} {name} {r['M']}x{r['N']}x{r['d']}", (x, y), fontsize=6, xytext=(3, 2),
                    textcoords="offset points")  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax.set_ylabel("achieved GFLOP/s")
    dev = pts[0].get("device", "") if pts else ""
    ax.set_title(f"roofline: {dev}", fontsize=9)
    ax.grid(True, which="both", alpha=0.2)
    ax.legend(fontsize=7, loc="lower right")
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
                     f"{c['M']}x{c['N']}x{c['d']:<8}  {c['old_time_s'] * 1e3:10.3f} ms -> {c['new_time_s'] * 1e3:10.3f}"
                     f" ms  x{c['ratio']:.2f}  {c['flag']}")  # fmt: skip
    return "\n".join(lines) if lines else "no matching rows"
