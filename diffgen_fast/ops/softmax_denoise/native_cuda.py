"""The native CUDA backend ("cuda") of softmax_denoise / kde_log_density: the fused small-d kernel, d <= 64 only.

csrc/cuda/softmax_small.cu runs one query per thread with the training points in shared-memory tiles and the online
softmax state (m, l, q, o) in registers; the logits z = -||x - alpha y||^2 / (2 sigma^2) come from direct differences
(no norm expansion, so no cancellation at small sigma). Per training chunk, N is split over blocks (more splits when
M is small, and at most EXACT_SPLIT_CAP points per thread in "exact" where the partial outputs fit in _PARTIAL_ELEMS,
so the fp32 accumulation of o stays short); the partial states
are merged here with the SoftmaxState rule in float64, the chunks with merge_softmax_states, and the result is
finalised with finalize_softmax_state like every backend.

precision:
  "exact"  differences, squared distances, logits and exp in float64 (the tile is converted once, in shared memory);
           m, l, q float64; o accumulated in fp32 over at most EXACT_SPLIT_CAP points per thread, then merged in
           float64. Logit error ~ (d + 2) 2^-53 |z|: exact at every sigma; the denoised output carries the fp32
           accumulation error of o (<= gamma_4096 worst case, ~sqrt(4096) 2^-24 relative typically).
  "fast"   fp32 differences fma(-alpha, y, x) (one rounding; alpha itself rounded to fp32, which adds an absolute
           error |alpha y| 2^-24 per coordinate unless alpha is exact in fp32, e.g. 1), fp32 fma accumulation (relative
           distance error <= (d + 2) 2^-24, so a logit error <= (d + 2) 2^-24 |z|), expf; m, l, q float64.
  "auto"   "exact". The fp32 error is relative to the logit, and the logits of the points that carry the mass lie
           within ~30 nats of the row max m, so the certified error 2 (d + 2) 2^-24 (|m| + 30) exceeds the reference's
           2^-22 tolerance for "fast" at every sigma; "fast" runs only when asked for.
Inputs are computed in fp32 (float64 inputs are rounded to fp32, fp16/bf16 upcast exactly); denoised is float32.
"""

from __future__ import annotations

from typing import Optional

import torch

from diffgen_fast import _native_cuda
from diffgen_fast.errors import BackendUnavailableError
from diffgen_fast.ops.merge import SoftmaxState, empty_softmax_state
from diffgen_fast.ops.softmax_denoise.reference import DenoiseResult

MAX_D = _native_cuda.SOFTMAX_MAX_D
THREADS = 128  # queries per block (kThreads in softmax_small.cu)
EXACT_SPLIT_CAP = 4096  # most training points one thread accumulates o over in "exact"
FAST_SPLIT_CAP = 65536  # ... in "fast"
MIN_SPLIT = 256  # fewest points per split when splitting for parallelism
_PARTIAL_ELEMS = 1 << 25  # fp32 elements of the [splits, M, d] partial outputs of one chunk
_CHUNK_BYTES = 256 << 20  # bytes of one fp32 training chunk on the GPU


def probe(device) -> Optional[str]:
    return _native_cuda.probe(device)


def _n_splits(n: int, m_blocks: int, sms: int, cap: int, max_splits: int) -> int:
    want = max(-(-n // cap), -(-4 * sms // max(1, m_blocks)))
    return max(1, min(want, -(-n // MIN_SPLIT), max_splits, 65535))


def merge_splits(m: torch.Tensor, l: torch.Tensor, q: torch.Tensor, o: Optional[torch.Tensor]) -> SoftmaxState:
    """The SoftmaxState merge rule over the first dimension of stacked partial states (float64 result)."""
    mx = m.max(dim=0).values
    sc = torch.where(torch.isneginf(m), torch.zeros_like(m), torch.exp(m - mx[None, :]))
    out = None if o is None else (o.to(torch.float64) * sc[:, :, None]).sum(dim=0)
    return SoftmaxState(mx, (l * sc).sum(dim=0), (q * sc * sc).sum(dim=0), out)


def _check(x: torch.Tensor, train=None) -> None:
    why = probe(x.device)
    if why is not None:
        raise BackendUnavailableError(f"backend='cuda': {why}")
    d = x.shape[1]
    if d > MAX_D:
        raise BackendUnavailableError(
            f"backend='cuda' runs softmax_denoise / kde_log_density only for d <= {MAX_D} (its small-d fused kernel), "
            f"got d = {d}; use backend='triton', 'cpu' or 'torch'"
        )


def _max_splits(M: int, d: int, need_out: bool) -> int:
    return max(1, min(65535, _PARTIAL_ELEMS // (max(M, 1) * (d if need_out else 1))))


def _chunk_size(M: int, d: int, precision: str, need_out: bool) -> int:
    cap = FAST_SPLIT_CAP if precision == "fast" else EXACT_SPLIT_CAP
    return max(MIN_SPLIT, min(1 << 24, _max_splits(M, d, need_out) * cap, _CHUNK_BYTES // (4 * d)))


def partial_cuda(
    x: torch.Tensor,
    Y: torch.Tensor,
    sigma: torch.Tensor,
    alpha: torch.Tensor,
    precision: str = "auto",
    need_out: bool = True,
    *,
    splits: Optional[int] = None,
) -> SoftmaxState:
    """The softmax state (float64) of the CUDA queries x [M, d <= 64] over the training chunk Y [n, d] with the
    fused small-d kernel; "auto" is "exact". splits forces the number of N splits (tests)."""
    _check(x)
    M, d = x.shape
    dev = x.device
    if M == 0 or Y.shape[0] == 0:
        return empty_softmax_state(M, d if need_out else None, dtype=torch.float64, device=dev)
    xk = x.to(torch.float32).contiguous()
    Y = Y.to(torch.float32).contiguous()
    alpha64 = alpha.to(device=dev, dtype=torch.float64).contiguous()
    sigma64 = sigma.to(device=dev, dtype=torch.float64)
    inv2s2 = (0.5 / (sigma64 * sigma64)).contiguous()
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    m_blocks = -(-M // THREADS)
    n = Y.shape[0]
    exact = precision != "fast"
    s = splits or _n_splits(n, m_blocks, sms, EXACT_SPLIT_CAP if exact else FAST_SPLIT_CAP,
                            _max_splits(M, d, need_out))  # fmt: skip
    per = -(-n // s)
    s = -(-n // per)
    m, l, q, o = _native_cuda.softmax_state(xk, Y, alpha64, inv2s2, s, per, exact=exact, need_out=need_out)
    return merge_splits(m, l, q, o if need_out else None)


def softmax_denoise_cuda(
    x: torch.Tensor,
    train,
    sigma: torch.Tensor,
    alpha: torch.Tensor,
    *,
    precision: str = "auto",
    need_out: bool = True,
    chunk_size: Optional[int] = None,
    splits: Optional[int] = None,
) -> DenoiseResult:
    """Softmax-weighted denoiser on CUDA tensors with d <= 64: the driver over partial_cuda.

    x: [M, d]; train: TrainingSet with train.d == d; sigma, alpha: [M] float64 on x.device. chunk_size: training rows
    per chunk streamed to the GPU; splits forces the number of N splits per chunk (tests).
    """
    from diffgen_fast.ops import driver

    options = {} if splits is None else {"splits": splits}
    return driver.denoise("cuda", x, train, sigma, alpha, precision=precision, need_out=need_out,
                          chunk_size=chunk_size, **options)  # fmt: skip


def _register():
    from diffgen_fast.ops import driver

    return driver.register_softmax(
        driver.SoftmaxBackend(
            name="cuda",
            partial=partial_cuda,
            o_dtype=lambda xd, yd, precision: torch.float64,
            out_dtype=lambda xd, td: torch.float32,
            chunk_size=_chunk_size,
            chunk_dtype=lambda xd, td: torch.float32,
            check=_check,
        )
    )


softmax_partial_cuda_op = _register().op  # torch.ops.diffgen_fast.softmax_partial_cuda


__all__ = ["softmax_denoise_cuda", "partial_cuda", "softmax_partial_cuda_op", "probe", "merge_splits"]
