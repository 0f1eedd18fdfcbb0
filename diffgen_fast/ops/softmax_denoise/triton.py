"""The Triton backend ("triton") of softmax_denoise / kde_log_density: two GEMM passes over the training set.

Per training chunk (the chunk's [M, Nc] score buffer is the only M x N object, bounded by _BUF_ELEMS):

  pass 1  _scores_kernel   T = (2 / a) X Y^T - ||y||^2 (fp32 accumulation; the bias in the epilogue), stored, and per
                           (row, N-tile) partials: max T, sum exp(c (T - max)), sum exp(2 c (T - max)), c = a^2 / 2s^2.
  pass 2  _output_kernel   O = exp(c (T - Tmax)) Y with the output dimension split over programs and, when M is
                           small, N split over programs too (partial outputs summed: all share the row's Tmax).

The logit is z = (a^2 T - ||x||^2) / (2 s^2); ||x||^2 is a float64 row constant outside the kernels. For d <= 256
_fused_kernel does both passes in one (online softmax, the state kept in registers, N split and merged).

precision:
  "fast"   products in bf16 (fp32 data is rounded to bf16 inside the kernels; fp16/bf16 data as stored), fp32
           accumulation, P in the data's dtype for pass 2.
  "exact"  fp32-accurate products (3xTF32 on the GPU, IEEE fp32 in the interpreter; bf16/fp16 products are exact in
           fp32), P kept in fp32. Then, where the certified window around the row max (2 s^2 TAIL_NATS plus twice the
           certified GEMM error) holds at most N_REFINE points in every row, those candidates' distances are recomputed
           in float64 as differences and the scores are re-based on the exact best one, so the result is exact at
           small sigma, where the norm expansion cancels catastrophically. Every other point carries < e^-TAIL_NATS of
           the top weight: the certified tail bound of docs/science.md section 2.7.
  "auto"   16-bit data: "fast" where the certified logit error of the bf16 products is below AUTO_TOL for every row of
           the chunk, else "exact". fp32 data: the bf16-product scores only where their certified logit error is below
           AUTO_TOL_F32 (the weights' relative error e^(2 err) - 1 stays at fp32 rounding level), and then the weights
           stay in fp32 and P Y runs on the fp32 data with fp32-accurate products ("mixed"); else "exact". fp32 inputs
           without precision="fast" thus always get fp32-accurate outputs (docs/precision.md).
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch

from diffgen_fast.ops import refine
from diffgen_fast.ops._profile import pass_range
from diffgen_fast.ops.merge import SoftmaxState, empty_softmax_state, merge_softmax_states
from diffgen_fast.ops.refine import N_REFINE, REFINE_TOL, TAIL_NATS
from diffgen_fast.ops.softmax_denoise.reference import DenoiseResult

try:  # importable without triton; the backend's probe says why it cannot run
    import triton
    import triton.language as tl

    _IMPORT_ERROR: Optional[str] = None
except Exception as e:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    _IMPORT_ERROR = f"triton is not importable ({type(e).__name__}: {e})"

AUTO_TOL = 1e-3
AUTO_TOL_F32 = 2.0**-22  # certified logit error of bf16 scores accepted by "auto" for fp32 data (fp32-accurate weights)
FUSED_MAX_D = 256
_BUF_ELEMS = 1 << 26  # fp32 elements of the [M, Nc] score buffer of one chunk (256 MiB)
_U32 = 2.0**-24
_U_BF16 = 2.0**-8


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def probe(device: Optional[torch.device]) -> Optional[str]:
    """None if the Triton backend can run on `device`, else the reason."""
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        return None
    if interpreting():
        return None
    return f"needs CUDA tensors (got {dev.type}); CPU tensors run only in the interpreter (TRITON_INTERPRET=1)"


def _configs(kind: str) -> list:
    """Autotuning candidates per kernel; the interpreter gets one small legal config (it runs programs in numpy).

    Tiles stay within shared memory for fp32 operands at num_stages = 3 (the autotuner drops configs that do not
    compile or fit, and picks per (M bucket, d bucket, operand dtype) key).
    """
    if interpreting():
        one = dict(BM=16, BN=32, BD=32) if kind != "fused" else dict(BM=16, BN=32)
        return [triton.Config(one, num_warps=4, num_stages=1)]
    out = []
    if kind == "scores":
        for bm, bn, bd, w, st in [
            (64, 64, 32, 4, 3), (64, 128, 32, 4, 3), (128, 64, 32, 8, 3), (128, 128, 32, 8, 3),
            (128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (128, 256, 64, 8, 3), (32, 128, 64, 4, 4),
        ]:  # fmt: skip
            out.append(triton.Config(dict(BM=bm, BN=bn, BD=bd), num_warps=w, num_stages=st))
    elif kind == "output":
        for bm, bn, bd, w, st in [
            (64, 64, 64, 4, 3), (64, 64, 128, 4, 3), (128, 64, 64, 8, 3), (128, 64, 128, 8, 3),
            (32, 64, 128, 4, 4), (16, 128, 128, 4, 4), (64, 128, 128, 8, 3),
        ]:  # fmt: skip
            out.append(triton.Config(dict(BM=bm, BN=bn, BD=bd), num_warps=w, num_stages=st))
    else:
        for bm, bn, w, st in [(64, 64, 4, 3), (64, 128, 4, 3), (128, 64, 8, 3), (32, 64, 4, 3), (16, 128, 4, 3)]:
            out.append(triton.Config(dict(BM=bm, BN=bn), num_warps=w, num_stages=st))
    return out


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


if triton is not None:
    _ALL_BN = [c.kwargs["BN"] for k in ("scores", "output", "fused") for c in _configs(k)]
    _MIN_BN = min(_ALL_BN)  # the partials buffer has a column per BN tile of the smallest size
    _MAX_BN = max(_ALL_BN)  # N splits are multiples of every BN


def _bucket(v: int) -> int:
    return 1 << max(0, (max(1, v) - 1).bit_length())


if triton is not None:

    @triton.autotune(configs=_configs("scores"), key=["M_KEY", "D_KEY", "TO_BF16", "PREC"])
    @triton.jit
    def _scores_kernel(
        X, Y, YY, SX, C, T, PMAX, PL, PQ,
        M, N, D, stride_xm, stride_yn, stride_tm, n_tiles, M_KEY, D_KEY,
        PREC: tl.constexpr, TO_BF16: tl.constexpr, DOT_F32: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
    ):  # fmt: skip
        i_m = tl.program_id(0)
        i_n = tl.program_id(1)
        o_m = i_m * BM + tl.arange(0, BM)
        o_n = i_n * BN + tl.arange(0, BN)
        m_m = o_m < M
        m_n = o_n < N
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, D, BD):
            o_d = k + tl.arange(0, BD)
            m_d = o_d < D
            b_x = tl.load(X + o_m[:, None] * stride_xm + o_d[None, :], mask=m_m[:, None] & m_d[None, :], other=0.0)
            b_y = tl.load(Y + o_n[:, None] * stride_yn + o_d[None, :], mask=m_n[:, None] & m_d[None, :], other=0.0)
            if TO_BF16:
                b_x = b_x.to(tl.bfloat16)
                b_y = b_y.to(tl.bfloat16)
            if DOT_F32:  # the interpreter's bf16 dot is wrong; bf16 x bf16 products are exact in fp32 anyway
                acc += tl.dot(b_x.to(tl.float32), tl.trans(b_y.to(tl.float32)), input_precision="ieee")
            else:
                acc += tl.dot(b_x, tl.trans(b_y), input_precision=PREC)
        b_sx = tl.load(SX + o_m, mask=m_m, other=0.0)
        b_yy = tl.load(YY + o_n, mask=m_n, other=0.0)
        b_t = acc * b_sx[:, None] - b_yy[None, :]
        b_t = tl.where(m_n[None, :], b_t, float("-inf"))
        tl.store(T + o_m[:, None] * stride_tm + o_n[None, :], b_t, mask=m_m[:, None] & m_n[None, :])
        b_c = tl.load(C + o_m, mask=m_m, other=1.0)
        b_max = tl.max(b_t, axis=1)
        b_p = tl.exp((b_t - b_max[:, None]) * b_c[:, None])
        tl.store(PMAX + o_m * n_tiles + i_n, b_max, mask=m_m)
        tl.store(PL + o_m * n_tiles + i_n, tl.sum(b_p, axis=1), mask=m_m)
        tl.store(PQ + o_m * n_tiles + i_n, tl.sum(b_p * b_p, axis=1), mask=m_m)

    @triton.autotune(configs=_configs("output"), key=["M_KEY", "D_KEY", "P_LOW", "PREC"])
    @triton.jit
    def _output_kernel(
        T, Y, C, TMAX, O, L, Q,
        M, N, D, stride_tm, stride_yn, n_per_split, M_KEY, D_KEY,
        PREC: tl.constexpr, P_LOW: tl.constexpr, Y_TO_BF16: tl.constexpr, DOT_F32: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
    ):  # fmt: skip
        i_m = tl.program_id(0)
        i_d = tl.program_id(1)
        i_s = tl.program_id(2)
        o_m = i_m * BM + tl.arange(0, BM)
        o_d = i_d * BD + tl.arange(0, BD)
        m_m = o_m < M
        m_d = o_d < D
        b_c = tl.load(C + o_m, mask=m_m, other=1.0)
        b_tmax = tl.load(TMAX + o_m, mask=m_m, other=0.0)
        acc = tl.zeros((BM, BD), dtype=tl.float32)
        b_l = tl.zeros((BM,), dtype=tl.float32)
        b_q = tl.zeros((BM,), dtype=tl.float32)
        n0 = i_s * n_per_split
        n1 = tl.minimum(N, n0 + n_per_split)
        for n in range(n0, n1, BN):
            o_n = n + tl.arange(0, BN)
            m_n = o_n < n1
            b_t = tl.load(T + o_m[:, None] * stride_tm + o_n[None, :], mask=m_m[:, None] & m_n[None, :],
                          other=float("-inf"))  # fmt: skip
            b_p = tl.exp((b_t - b_tmax[:, None]) * b_c[:, None])
            b_y = tl.load(Y + o_n[:, None] * stride_yn + o_d[None, :], mask=m_n[:, None] & m_d[None, :], other=0.0)
            if P_LOW:
                if Y_TO_BF16:
                    b_y = b_y.to(tl.bfloat16)
                if DOT_F32:
                    acc += tl.dot(b_p.to(b_y.dtype).to(tl.float32), b_y.to(tl.float32), input_precision="ieee")
                else:
                    acc += tl.dot(b_p.to(b_y.dtype), b_y)
            else:
                acc += tl.dot(b_p, b_y.to(tl.float32), input_precision=PREC)
            b_l += tl.sum(b_p, axis=1)
            b_q += tl.sum(b_p * b_p, axis=1)
        o_base = i_s * M * D
        tl.store(O + o_base + o_m[:, None] * D + o_d[None, :], acc, mask=m_m[:, None] & m_d[None, :])
        if i_d == 0:
            tl.store(L + i_s * M + o_m, b_l, mask=m_m)
            tl.store(Q + i_s * M + o_m, b_q, mask=m_m)

    @triton.autotune(configs=_configs("fused"), key=["M_KEY", "BD", "TO_BF16"])
    @triton.jit
    def _fused_kernel(
        X, Y, YY, SX, C, O, MX, L, Q,
        M, N, D, stride_xm, stride_yn, n_per_split, M_KEY,
        BD: tl.constexpr, TO_BF16: tl.constexpr, DOT_F32: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr,
    ):  # fmt: skip
        i_m = tl.program_id(0)
        i_s = tl.program_id(1)
        o_m = i_m * BM + tl.arange(0, BM)
        o_d = tl.arange(0, BD)
        m_m = o_m < M
        m_d = o_d < D
        b_x = tl.load(X + o_m[:, None] * stride_xm + o_d[None, :], mask=m_m[:, None] & m_d[None, :], other=0.0)
        if TO_BF16:
            b_x = b_x.to(tl.bfloat16)
        b_sx = tl.load(SX + o_m, mask=m_m, other=0.0)
        b_c = tl.load(C + o_m, mask=m_m, other=1.0)
        b_mx = tl.full((BM,), float("-inf"), dtype=tl.float32)
        b_l = tl.zeros((BM,), dtype=tl.float32)
        b_q = tl.zeros((BM,), dtype=tl.float32)
        acc = tl.zeros((BM, BD), dtype=tl.float32)
        n0 = i_s * n_per_split
        n1 = tl.minimum(N, n0 + n_per_split)
        for n in range(n0, n1, BN):
            o_n = n + tl.arange(0, BN)
            m_n = o_n < n1
            b_y = tl.load(Y + o_n[:, None] * stride_yn + o_d[None, :], mask=m_n[:, None] & m_d[None, :], other=0.0)
            b_yy = tl.load(YY + o_n, mask=m_n, other=0.0)
            if TO_BF16:
                b_y = b_y.to(tl.bfloat16)
            if DOT_F32:
                b_t = tl.dot(b_x.to(tl.float32), tl.trans(b_y.to(tl.float32)), input_precision="ieee")
            else:
                b_t = tl.dot(b_x, tl.trans(b_y))
            b_t = b_t * b_sx[:, None] - b_yy[None, :]
            b_t = tl.where(m_n[None, :], b_t, float("-inf"))
            b_new = tl.maximum(b_mx, tl.max(b_t, axis=1))
            b_r = tl.exp((b_mx - b_new) * b_c)
            b_p = tl.exp((b_t - b_new[:, None]) * b_c[:, None])
            b_l = b_l * b_r + tl.sum(b_p, axis=1)
            b_q = b_q * b_r * b_r + tl.sum(b_p * b_p, axis=1)
            if DOT_F32:
                b_pv = tl.dot(b_p.to(b_y.dtype).to(tl.float32), b_y.to(tl.float32), input_precision="ieee")
            else:
                b_pv = tl.dot(b_p.to(b_y.dtype), b_y)
            acc = acc * b_r[:, None] + b_pv
            b_mx = b_new
        tl.store(O + i_s * M * D + o_m[:, None] * D + o_d[None, :], acc, mask=m_m[:, None] & m_d[None, :])
        tl.store(MX + i_s * M + o_m, b_mx, mask=m_m)
        tl.store(L + i_s * M + o_m, b_l, mask=m_m)
        tl.store(Q + i_s * M + o_m, b_q, mask=m_m)


def _pow2(v: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, 1 << max(0, (max(1, v) - 1).bit_length())))


def _n_splits(m_blocks: int, d_blocks: int, n: int, device: torch.device) -> int:
    """Split N over programs when (M blocks x d blocks) alone cannot fill the device (small M: memory-bound)."""
    if device.type != "cuda":
        return max(1, min(4, -(-n // (_MAX_BN * 2))))  # exercise the split path in the interpreter
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = max(1, -(-2 * sms // max(1, m_blocks * d_blocks)))
    return max(1, min(want, -(-n // (_MAX_BN * 4))))


def _split_len(n: int, splits: int) -> tuple[int, int]:
    """(points per split, a multiple of every config's BN; number of splits actually used)."""
    per = _cdiv(_cdiv(n, max(1, splits)), _MAX_BN) * _MAX_BN
    return per, _cdiv(n, per)


def _prec(precision: str, operand_dtype: torch.dtype, device: torch.device) -> str:
    """input_precision of the fp32 dots: 3xTF32 for "exact" on the GPU (IEEE in the interpreter); bf16/fp16 operands
    keep the default (their products are exact in fp32)."""
    if precision == "fast" or operand_dtype != torch.float32:
        return "tf32"
    return "ieee" if device.type != "cuda" else "tf32x3"


def _check(x: torch.Tensor, train=None) -> None:
    why = probe(x.device)
    if why is not None:
        from diffgen_fast.errors import BackendUnavailableError

        raise BackendUnavailableError(f"backend='triton': {why}")


def _chunk_size(M: int, d: int, precision: str, need_out: bool) -> int:
    return max(1, min(_BUF_ELEMS // max(M, 1), (1 << 30) // (4 * max(d, 1))))


def partial_triton(
    x: torch.Tensor,
    Y: torch.Tensor,
    sigma: torch.Tensor,
    alpha: torch.Tensor,
    precision: str = "auto",
    need_out: bool = True,
    *,
    fused: Optional[bool] = None,
    splits: Optional[int] = None,
) -> SoftmaxState:
    """The softmax state (m, l, q float64; o float32) of x [M, d] (CUDA, or CPU under TRITON_INTERPRET=1) over the
    training chunk Y [n, d]; sigma, alpha: [M] float64. "auto" is resolved per chunk by the verifier
    (fast_logit_error against AUTO_TOL); fused / splits force the small-d fused kernel and the number of N splits
    (tests)."""
    _check(x)
    M, d = x.shape
    dev = x.device
    inv2s2 = 0.5 / (sigma * sigma)
    x64 = x.to(torch.float64)
    xx = (x64 * x64).sum(dim=1)
    xnorm = xx.sqrt()
    kdtype = x.dtype if x.dtype in (torch.float16, torch.bfloat16) else torch.float32
    xk = x.to(kdtype).contiguous()
    sx = (2.0 / alpha).to(torch.float32).contiguous()
    c = (alpha * alpha * inv2s2).clamp(max=torch.finfo(torch.float32).max).to(torch.float32).contiguous()
    yy64 = torch.linalg.vector_norm(Y, dim=1, dtype=torch.float64).square()
    if M == 0 or Y.shape[0] == 0:
        return empty_softmax_state(M, d if need_out else None, dtype=torch.float32, device=dev)
    if precision == "auto":
        precision = _resolve_auto(d, alpha, xnorm, float(yy64.max().sqrt()), inv2s2, kdtype)
    use_fused = fused if fused is not None else (need_out and precision == "fast" and d <= FUSED_MAX_D)
    Yk = Y.to(kdtype if Y.dtype != torch.float64 else torch.float32).contiguous()
    if use_fused and d <= FUSED_MAX_D:
        st = _fused_chunk(xk, Yk, yy64, sx, c, alpha, xx, inv2s2, precision, splits)
        return st if need_out else SoftmaxState(st.m, st.l, st.q, None)
    return _two_pass_chunk(xk, x64, Y, Yk, yy64, sx, c, alpha, xx, xnorm, sigma, inv2s2, precision, need_out, splits)


def softmax_denoise_triton(
    x: torch.Tensor,
    train,
    sigma: torch.Tensor,
    alpha: torch.Tensor,
    *,
    precision: str = "auto",
    need_out: bool = True,
    chunk_size: Optional[int] = None,
    fused: Optional[bool] = None,
    splits: Optional[int] = None,
) -> DenoiseResult:
    """Softmax-weighted denoiser on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1): the driver over
    partial_triton.

    x: [M, d] float32/float16/bfloat16 (float64 is computed in float32); train: TrainingSet with train.d == d;
    sigma, alpha: [M] float64 on x.device. chunk_size bounds the training chunk (default: the [M, Nc] buffer holds
    _BUF_ELEMS); fused / splits force the small-d fused kernel and the number of N splits (tests).
    """
    from diffgen_fast.ops import driver

    options = {k: v for k, v in dict(fused=fused, splits=splits).items() if v is not None}
    return driver.denoise("triton", x, train, sigma, alpha, precision=precision, need_out=need_out,
                          chunk_size=chunk_size, **options)  # fmt: skip


def _resolve_auto(d, alpha, xnorm, ymax: float, inv2s2, kdtype) -> str:
    """"auto" for one chunk: "fast" (16-bit data), "mixed" (fp32 data: bf16-product scores, fp32 weights and fp32-
    accurate P Y) or "exact", from the certified logit error of the bf16 scores."""
    err = fast_logit_error(d, alpha, xnorm, ymax, inv2s2, kdtype)
    if kdtype == torch.float32:
        return "mixed" if bool((err <= AUTO_TOL_F32).all()) else "exact"
    return "fast" if bool((err <= AUTO_TOL).all()) else "exact"


def fast_logit_error(d, alpha, xnorm, ymax: float, inv2s2, kdtype) -> torch.Tensor:
    """The verifier of "fast": certified logit error 2 a (2 u_in + d u_32) ||x|| max||y|| / (2 s^2) per row, u_in =
    bf16 rounding of fp32 data (0 for data already in bf16/fp16: their products are exact in fp32)."""
    u_in = _U_BF16 if kdtype == torch.float32 else 0.0
    return 2.0 * alpha * (2 * u_in + d * _U32) * xnorm * ymax * inv2s2


def _two_pass_chunk(
    xk, x64, Y, Yk, yy64, sx, c, alpha, xx, xnorm, sigma, inv2s2, precision, need_out, splits
) -> SoftmaxState:
    M, d = xk.shape
    n = Yk.shape[0]
    dev = xk.device
    to_bf16 = precision in ("fast", "mixed") and xk.dtype == torch.float32
    prec = _prec(precision, torch.bfloat16 if to_bf16 else xk.dtype, dev)
    # P Y: "fast" weights in the data's 16-bit dtype; "mixed" / "exact" fp32 weights with fp32-accurate products
    prec_out = _prec("fast" if precision == "fast" else "exact", xk.dtype, dev)
    yy = yy64.to(torch.float32)
    n_tiles = -(-n // _MIN_BN)
    T = torch.empty(M, n, dtype=torch.float32, device=dev)
    # columns beyond the tiles of the chosen config stay neutral: max -inf, sums 0
    pmax = torch.full((M, n_tiles), float("-inf"), dtype=torch.float32, device=dev)
    pl = torch.zeros_like(pmax)
    pq = torch.zeros_like(pmax)
    m_key, d_key = _bucket(M), _bucket(d)
    with pass_range("triton.pass1_scores", dev):
        _scores_kernel[lambda meta: (triton.cdiv(M, meta["BM"]), triton.cdiv(n, meta["BN"]))](
            xk, Yk, yy, sx, c, T, pmax, pl, pq, M, n, d, xk.stride(0), Yk.stride(0), T.stride(0), n_tiles, m_key,
            d_key, PREC=prec, TO_BF16=to_bf16, DOT_F32=interpreting(),
        )  # fmt: skip
    tmax = pmax.max(dim=1).values
    shift = None
    if precision == "exact":
        with pass_range("triton.exact_rerank", dev):
            shift = _refine_exact(T, tmax, x64, Y, alpha, xx, xnorm, sigma, yy64, d)
        if shift is not None:
            tmax = T.max(dim=1).values
    if not need_out and shift is None:
        r = torch.exp((pmax - tmax[:, None]) * c[:, None])
        l = (pl * r).sum(dim=1).to(torch.float64)
        q = (pq * r * r).sum(dim=1).to(torch.float64)
        o = None
    else:
        d_out = d if need_out else 1
        nominal_bm = 16 if interpreting() else 64
        per, S = _split_len(n, splits or _n_splits(triton.cdiv(M, nominal_bm), triton.cdiv(d_out, 64), n, dev))
        O = torch.empty(S, M, d_out, dtype=torch.float32, device=dev)
        L = torch.empty(S, M, dtype=torch.float32, device=dev)
        Q = torch.empty_like(L)
        Yo = Yk if need_out else torch.zeros(n, 1, dtype=Yk.dtype, device=dev)
        with pass_range("triton.pass2_output", dev):
            _output_kernel[lambda meta: (triton.cdiv(M, meta["BM"]), triton.cdiv(d_out, meta["BD"]), S)](
                T, Yo, c, tmax.contiguous(), O, L, Q, M, n, d_out, T.stride(0), Yo.stride(0), per, m_key, d_key,
                PREC=prec_out, P_LOW=precision == "fast", Y_TO_BF16=Yo.dtype == torch.float32, DOT_F32=interpreting(),
            )  # fmt: skip
        o = O.sum(dim=0) if need_out else None
        l = L.to(torch.float64).sum(dim=0)
        q = Q.to(torch.float64).sum(dim=0)
    t_best = tmax.to(torch.float64) + (shift if shift is not None else 0.0)
    m = (alpha * alpha * t_best - xx) * inv2s2
    return SoftmaxState(m, l, q, o)


def _refine_exact(T, tmax, x64, Y, alpha, xx, xnorm, sigma, yy64, d) -> Optional[torch.Tensor]:
    """diffgen_fast.ops.refine.exact_scores on the fp32-accurate scores T (in place), with this backend's certified
    |T error|: the fp32-accurate dot (d + 2) u32 |x||y| scaled by 2/a, plus the fp32 yy and epilogue rounding.
    Returns the float64 per-row shift (T now holds T - shift), or None when T is kept as it is."""
    ymax = float(yy64.max().sqrt())
    a = alpha
    err_t = (d + 2) * _U32 * 2.0 * xnorm * ymax / a + 4 * _U32 * (2.0 * xnorm * ymax / a + ymax * ymax)
    T2, shift = refine.exact_scores(T, x64, Y, a, xx, sigma, err_t, yy64)
    if T2 is not T:
        T.copy_(T2)
    return shift


def _fused_chunk(xk, Yk, yy64, sx, c, alpha, xx, inv2s2, precision, splits) -> SoftmaxState:
    M, d = xk.shape
    n = Yk.shape[0]
    dev = xk.device
    BD = _pow2(d, 16, FUSED_MAX_D)
    nominal_bm = 16 if interpreting() else 64
    per, S = _split_len(n, splits or _n_splits(triton.cdiv(M, nominal_bm), 1, n, dev))
    O = torch.empty(S, M, d, dtype=torch.float32, device=dev)
    MX = torch.empty(S, M, dtype=torch.float32, device=dev)
    L = torch.empty_like(MX)
    Q = torch.empty_like(MX)
    with pass_range("triton.fused", dev):
        _fused_kernel[lambda meta: (triton.cdiv(M, meta["BM"]), S)](
            xk, Yk, yy64.to(torch.float32), sx, c, O, MX, L, Q, M, n, d, xk.stride(0), Yk.stride(0), per, _bucket(M),
            BD=BD, TO_BF16=precision == "fast" and xk.dtype == torch.float32, DOT_F32=interpreting(),
        )  # fmt: skip
    state = None
    for s in range(S):
        mx = MX[s].to(torch.float64)
        m = torch.where(torch.isneginf(mx), mx, (alpha * alpha * mx - xx) * inv2s2)
        st = SoftmaxState(m, L[s].double(), Q[s].double(), O[s])
        state = st if state is None else merge_softmax_states(state, st)
    return state


def _register():
    from diffgen_fast.ops import driver

    return driver.register_softmax(
        driver.SoftmaxBackend(
            name="triton",
            partial=partial_triton,
            o_dtype=lambda xd, yd, precision: torch.float32,
            out_dtype=lambda xd, td: torch.float32,
            chunk_size=_chunk_size,
            check=_check,
        )
    )


softmax_partial_triton_op = _register().op  # torch.ops.diffgen_fast.softmax_partial_triton


__all__ = [
    "softmax_denoise_triton",
    "partial_triton",
    "softmax_partial_triton_op",
    "probe",
    "interpreting",
    "math",
    "TAIL_NATS",
    "N_REFINE",
    "REFINE_TOL",
]
