"""Shared test helpers: problem generators, the tie-aware kNN comparison, backends as test parameters and the 2x
tolerance rule (plain_softmax_denoise, assert_2x_rule)."""

from __future__ import annotations

import math

import torch


def make_problem(M, N, d, *, dtype=torch.float32, seed=0, near=0.5, scale=1.0, sigma=None):
    """Training set uniform in [-scale, scale]^d; a fraction `near` of the queries sit close to training points
    (x = alpha y_j + sigma n, the cancellation-prone case), the rest are random."""
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(N, d, generator=g, dtype=torch.float64) * 2 - 1) * scale
    x = (torch.rand(M, d, generator=g, dtype=torch.float64) * 2 - 1) * scale
    n_near = int(M * near)
    if n_near:
        j = torch.randint(0, N, (n_near,), generator=g)
        s = 0.01 if sigma is None else sigma
        x[:n_near] = y[j] + s * torch.randn(n_near, d, generator=g, dtype=torch.float64)
    return x.to(dtype), y.to(dtype)


def assert_knn_matches(d2, idx, x, y, k, *, rtol=1e-9, atol=1e-12):
    """Tie-aware check of (d2, idx) [M, k] against float64 brute force: the distances match, every returned index
    really has the returned distance, and the returned index set equals the true one up to ties at the boundary."""
    x = torch.as_tensor(x).double().reshape(len(x), -1)
    y = torch.as_tensor(y).double().reshape(len(y), -1)
    d2 = torch.as_tensor(d2).double()
    idx = torch.as_tensor(idx)
    assert d2.shape == (len(x), k) and idx.shape == (len(x), k)
    assert idx.dtype == torch.int64
    for r in range(len(x)):
        full = ((x[r][None] - y) ** 2).sum(1)
        ref = torch.sort(full).values[:k]
        torch.testing.assert_close(d2[r], ref, rtol=rtol, atol=atol)
        assert bool((d2[r][1:] >= d2[r][:-1]).all()), "not ascending"
        torch.testing.assert_close(full[idx[r]], d2[r], rtol=rtol, atol=atol)
        assert len(set(idx[r].tolist())) == k, "duplicate indices"
        kth = ref[-1]
        tol = atol + rtol * abs(float(kth))
        must = set((full < kth - tol).nonzero().reshape(-1).tolist())
        allowed = set((full <= kth + tol).nonzero().reshape(-1).tolist())
        got = set(idx[r].tolist())
        assert must <= got <= allowed, f"row {r}: wrong neighbour set"


# ----------------------------------------------------------------------------------------------------------------------
# Backends as test parameters (tests/ops): every backend of an op, skipped with its reason where it cannot run.

DTYPE_NAMES = {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def backend_device(name: str) -> torch.device:
    """Where a backend's tests put their tensors: CUDA for the GPU backends when there is a GPU; the Triton backend
    runs CPU tensors in the interpreter otherwise (TRITON_INTERPRET=1, set by conftest.py)."""
    if name in ("triton", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def backend_unavailable(op: str, name: str):
    """None when backend `name` of `op` ("softmax_denoise" or "knn") can run here, else the reason it cannot."""
    from diffgen_fast.ops import dispatch

    return dispatch._reason(op, name, backend_device(name))


def backend_param(op: str, name: str, *values, id=None):
    """pytest.param(name, *values) with the backend's name in its id; the cuda backend carries the gpu marker (skipped
    without a GPU by conftest.py), and a backend that cannot run here is skipped saying why."""
    import pytest

    marks = [pytest.mark.gpu] if name == "cuda" else []
    why = backend_unavailable(op, name)
    if why is not None:
        marks.append(pytest.mark.skip(reason=f"backend {name!r} cannot run here: {why}"))
    return pytest.param(name, *values, id=id or name, marks=marks)


# ----------------------------------------------------------------------------------------------------------------------
# The tolerance rule (flash-attention's): an op is as accurate as the plain formula in the same dtype.
#
# err(op) = max error of the op's output against the float64 brute force (softmax_denoise_naive);
# err(plain) = the same error of plain_softmax_denoise, the formula written plainly in the inputs' dtype.
# The op must satisfy err(op) <= 2 err(plain) + floor, floor = eps(dtype) * max(1, output scale) (tiny_floor), AND
# every absolute bound the project already states for it (e.g. denoised max abs error <= 2e-5 for fp32 inputs): the
# rule never loosens those. Where the plain formula itself breaks down (non-finite: fp16 logits overflow at small
# sigma), and for float64 inputs (the plain float64 formula is the reference), the absolute bound alone decides.


def plain_softmax_denoise(x, train, sigma, alpha=1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain implementation of the op in the inputs' (promoted) dtype, on the CPU: logits -||x - alpha y||^2 /
    (2 sigma^2) by differences (no cdist, no norm expansion), softmax, weighted sum. Returns (denoised [M, d], lse [M])
    in that dtype. One query block at a time (no [M, N, d] tensor beyond 2^22 elements)."""
    x = torch.as_tensor(x).cpu()
    y = torch.as_tensor(train).cpu()
    dt = torch.promote_types(x.dtype, y.dtype)
    x = x.reshape(x.shape[0], -1).to(dt)
    y = y.reshape(y.shape[0], -1).to(dt)
    M, (N, d) = x.shape[0], y.shape
    s = torch.as_tensor(sigma, dtype=torch.float64).cpu().reshape(-1).expand(M).to(dt)
    a = torch.as_tensor(alpha, dtype=torch.float64).cpu().reshape(-1).expand(M).to(dt)
    out = torch.zeros(M, d, dtype=dt)
    lse = torch.zeros(M, dtype=dt)
    step = max(1, (1 << 22) // max(1, N * d))
    for r0 in range(0, M, step):
        r = slice(r0, r0 + step)
        diff = x[r, None, :] - a[r, None, None] * y[None]
        logits = -(diff * diff).sum(-1) / (2 * s[r, None] * s[r, None])
        lse[r] = torch.logsumexp(logits, dim=1)
        out[r] = torch.softmax(logits, dim=1) @ y
    return out, lse


def plain_kde_log_density(x, train, bandwidth) -> torch.Tensor:
    """log (1/N) sum_i N(x; y_i, h^2 I) from plain_softmax_denoise's lse, in the inputs' dtype."""
    _, lse = plain_softmax_denoise(x, train, bandwidth)
    h = torch.as_tensor(bandwidth, dtype=torch.float64).cpu().reshape(-1).to(lse.dtype)
    N, d = train.shape[0], train[0].numel()
    return lse - math.log(N) - 0.5 * d * torch.log(2 * math.pi * h * h)


def max_abs_error(got, ref) -> float:
    """max |got - ref| (float64, on the CPU); 0 for empty tensors, nan when got has a NaN."""
    got = torch.as_tensor(got).cpu().double().reshape(ref.shape)
    return float((got - ref).abs().max()) if ref.numel() else 0.0


def max_rel_error(got, ref) -> float:
    """max |got - ref| / max(1, |ref|): relative, absolute below 1 (log-sum-exp and log-densities cross 0)."""
    got = torch.as_tensor(got).cpu().double().reshape(ref.shape)
    return float(((got - ref) / ref.abs().clamp(min=1.0)).abs().max()) if ref.numel() else 0.0


def tiny_floor(dtype: torch.dtype, scale: float = 1.0) -> float:
    """The rule's absolute floor at an output scale (max |ref| for denoised outputs, 1 for relative errors): the
    dtype's epsilon times max(1, scale), the rounding of the output to its dtype alone."""
    return torch.finfo(dtype).eps * max(1.0, scale)


def assert_2x_rule(what: str, got, plain, ref, dtype: torch.dtype, *, bound=None, relative=False) -> float:
    """flash-attention's 2x rule: err(got) <= 2 err(plain) + tiny_floor, and err(got) <= bound when one is given.

    got, plain: the op's and the plain implementation's outputs; ref: the float64 brute force; dtype: the inputs'
    dtype; relative: errors by max_rel_error (lse, log-densities) instead of max_abs_error (denoised outputs).
    A non-finite plain error (the plain formula overflowed) gives no bound. float64 inputs: the plain float64
    implementation is the reference formula itself (its error is 0) and nothing more precise is there to judge by, so
    the rule gives no bound and `bound` alone decides. Returns err(got)."""
    err_fn = max_rel_error if relative else max_abs_error
    e, e_plain = err_fn(got, ref), err_fn(plain, ref)
    scale = 1.0 if relative or not ref.numel() else float(ref.abs().max())
    floor = tiny_floor(dtype, scale)
    limit = 2 * e_plain + floor if math.isfinite(e_plain) and dtype != torch.float64 else math.inf
    assert e <= limit, f"{what}: error {e:.3g} > 2 x the plain {dtype} error {e_plain:.3g} + floor {floor:.3g}"
    if bound is not None:
        assert e <= bound, f"{what}: error {e:.3g} > the stated bound {bound:.3g} (plain {dtype}: {e_plain:.3g})"
    return e
