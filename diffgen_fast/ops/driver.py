"""The one driver every backend runs under: prepare -> train.iter_chunks -> partial -> merge -> finalize.

A softmax backend (SoftmaxBackend) implements

    partial(x [M, d], Y [n, d], sigma [M], alpha [M], precision, need_out) -> SoftmaxState (m, l, q, o)

for one training chunk (its fast path, its verifier: "auto" resolved from the certified error bound of the fast
path, and the certified refinement of diffgen_fast.ops.refine for "exact"), its preferred chunk size and the dtype
it wants the chunks in. A kNN backend (TopkBackend) implements

    partial_topk(x [M, d], Y [n, d], k, index_offset) -> (sqdist [M, k] float64, index [M, k] int64)

exact, ascending by (distance, index). Everything else is here, once: the chunk loop over the TrainingSet, the exact
merges of diffgen_fast.ops.merge, and the finalisation. The same states are what diffgen_fast.distributed gathers
across ranks and what metrics.scoring streams and checkpoints.

Every partial is also registered as a torch custom op, `torch.ops.diffgen_fast.softmax_partial_<backend>` and
`torch.ops.diffgen_fast.knn_partial_<backend>` (with fake kernels), so torch.compile traces the driver, the merges
and the finalisation and treats each backend's chunk computation as one opaque node.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from diffgen_fast.errors import BackendUnavailableError
from diffgen_fast.ops.merge import (
    SoftmaxState,
    empty_softmax_state,
    finalize_softmax_state,
    merge_softmax_states,
    merge_topk,
)

_SCHEMA = (
    "(Tensor x, Tensor y, Tensor sigma, Tensor alpha, str precision, bool need_out) -> (Tensor, Tensor, Tensor, Tensor)"
)
_TOPK_SCHEMA = "(Tensor x, Tensor y, int k, int index_offset) -> (Tensor, Tensor)"


@dataclass
class SoftmaxBackend:
    name: str
    # partial(x, Y, sigma, alpha, precision, need_out, **options) -> SoftmaxState of the chunk Y
    partial: Callable[..., SoftmaxState]
    # o_dtype(x dtype, chunk dtype, precision) -> dtype of the partial state's o
    o_dtype: Callable[[torch.dtype, torch.dtype, str], torch.dtype]
    # out_dtype(x dtype, train dtype) -> dtype of the finalised denoised output
    out_dtype: Callable[[torch.dtype, torch.dtype], torch.dtype]
    # chunk_size(M, d, precision, need_out) -> preferred training rows per chunk (None: the TrainingSet's default)
    chunk_size: Callable[[int, int, str, bool], Optional[int]]
    # chunk_dtype(x dtype, train dtype) -> dtype the chunks are served in (None: the training set's)
    chunk_dtype: Callable[[torch.dtype, torch.dtype], Optional[torch.dtype]] = lambda xd, td: None
    # check(x, train) raises BackendUnavailableError when the backend cannot run this call
    check: Callable[[torch.Tensor, object], None] = lambda x, train: None
    # takes_norms: partial accepts yy= (the chunk's float64 ||y||^2), given in eager mode when the TrainingSet has them
    takes_norms: bool = False
    op: Optional[Callable] = field(default=None, repr=False)


@dataclass
class TopkBackend:
    name: str
    # partial_topk(x, Y, k, index_offset) -> (sqdist [M, k] float64, index [M, k] int64) of the chunk Y, k <= len(Y)
    partial_topk: Callable[[torch.Tensor, torch.Tensor, int, int], tuple[torch.Tensor, torch.Tensor]]
    chunk_size: Callable[[int, int, int], Optional[int]]  # (M, d, k) -> rows per chunk
    chunk_dtype: Callable[[torch.dtype, torch.dtype], Optional[torch.dtype]] = lambda xd, td: None
    check: Callable[[torch.Tensor, object, int], None] = lambda x, train, k: None
    op: Optional[Callable] = field(default=None, repr=False)


def _register_softmax_op(be: SoftmaxBackend) -> None:
    name = f"diffgen_fast::softmax_partial_{be.name}"

    def run(x, y, sigma, alpha, precision, need_out):
        st = be.partial(x, y, sigma, alpha, precision, need_out)
        o = st.o if st.o is not None else x.new_zeros(x.shape[0], 0, dtype=be.o_dtype(x.dtype, y.dtype, precision))
        outs = (st.m, st.l, st.q, o)
        # a custom op's outputs never alias its inputs (nor each other)
        return tuple(t.clone() if _aliases(t, (x, y, sigma, alpha)) else t for t in outs)

    if not hasattr(torch.library, "custom_op"):  # pragma: no cover - torch < 2.4: no torch.compile tracing
        be.op = run
        return
    op = torch.library.custom_op(name, run, mutates_args=(), schema=_SCHEMA)

    @op.register_fake
    def _(x, y, sigma, alpha, precision, need_out):
        M, d = x.shape
        f64 = dict(dtype=torch.float64)
        od = be.o_dtype(x.dtype, y.dtype, precision)
        return x.new_empty(M, **f64), x.new_empty(M, **f64), x.new_empty(M, **f64), x.new_empty(M, d if need_out else 0,
                                                                                             dtype=od)  # fmt: skip

    be.op = op


def _register_topk_op(be: TopkBackend) -> None:
    name = f"diffgen_fast::knn_partial_{be.name}"

    def run(x, y, k, index_offset):
        d2, idx = be.partial_topk(x, y, k, index_offset)
        return tuple(t.clone() if _aliases(t, (x, y)) else t for t in (d2, idx))

    if not hasattr(torch.library, "custom_op"):  # pragma: no cover - torch < 2.4
        be.op = run
        return
    op = torch.library.custom_op(name, run, mutates_args=(), schema=_TOPK_SCHEMA)

    @op.register_fake
    def _(x, y, k, index_offset):
        return x.new_empty(x.shape[0], k, dtype=torch.float64), x.new_empty(x.shape[0], k, dtype=torch.int64)

    be.op = op


def _aliases(t: torch.Tensor, inputs) -> bool:
    try:
        return any(t.untyped_storage().data_ptr() == i.untyped_storage().data_ptr() for i in inputs if i.numel())
    except Exception:  # pragma: no cover - storage-less tensors
        return False


_SOFTMAX: dict[str, SoftmaxBackend] = {}
_TOPK: dict[str, TopkBackend] = {}


def register_softmax(be: SoftmaxBackend) -> SoftmaxBackend:
    """Register a softmax backend and its partial custom op (once per process: backend modules call it on import)."""
    if be.name not in _SOFTMAX:
        _register_softmax_op(be)
        _SOFTMAX[be.name] = be
    return _SOFTMAX[be.name]


def register_topk(be: TopkBackend) -> TopkBackend:
    if be.name not in _TOPK:
        _register_topk_op(be)
        _TOPK[be.name] = be
    return _TOPK[be.name]


def _load(name: str) -> None:
    import importlib

    modules = {
        "torch": "diffgen_fast.ops.softmax_denoise.reference",
        "cpu": "diffgen_fast.ops.softmax_denoise.native",
        "triton": "diffgen_fast.ops.softmax_denoise.triton",
        "cuda": "diffgen_fast.ops.softmax_denoise.native_cuda",
    }
    importlib.import_module(modules[name])


def _load_topk(name: str) -> None:
    import importlib

    modules = {
        "torch": "diffgen_fast.ops.knn.reference",
        "cpu": "diffgen_fast.ops.knn.native",
        "cuda": "diffgen_fast.ops.knn.native_cuda",
    }
    importlib.import_module(modules[name])


def softmax_backend(name: str) -> SoftmaxBackend:
    if name not in _SOFTMAX:
        _load(name)
    return _SOFTMAX[name]


def topk_backend(name: str) -> TopkBackend:
    if name not in _TOPK:
        _load_topk(name)
    return _TOPK[name]


def partial(
    name: str, x, Y, sigma, alpha, precision: str = "auto", need_out: bool = True, **options
) -> SoftmaxState:
    """One chunk's softmax state on backend `name`, through its custom op (options, for tests: the Python partial)."""
    be = softmax_backend(name)
    if options or not torch.compiler.is_compiling():
        # eager: the Python partial itself (the custom op's first call imports torch._dynamo, seconds of start-up
        # for every CLI run); the custom op is what torch.compile traces
        return be.partial(x, Y, sigma, alpha, precision, need_out, **options)
    m, l, q, o = be.op(x, Y, sigma, alpha, precision, need_out)
    return SoftmaxState(m, l, q, o if need_out else None)


def softmax_state(
    name: str,
    x: torch.Tensor,
    train,
    sigma: torch.Tensor,
    alpha: torch.Tensor,
    *,
    precision: str = "auto",
    need_out: bool = True,
    chunk_size: Optional[int] = None,
    **options,
) -> SoftmaxState:
    """The complete softmax state of x [M, d] over the TrainingSet `train` on backend `name` (not finalised)."""
    be = softmax_backend(name)
    be.check(x, train)
    M, d = x.shape
    if M == 0:
        return empty_softmax_state(M, d if need_out else None, dtype=be.o_dtype(x.dtype, train.dtype, precision),
                                   device=x.device)  # fmt: skip
    chunk = chunk_size or be.chunk_size(M, d, precision, need_out)
    state: Optional[SoftmaxState] = None
    # the training set's cached float64 squared norms (computed with its finiteness check) spare the backend a pass
    norms = getattr(train, "_sqnorms", None) if be.takes_norms and not torch.compiler.is_compiling() else None
    for start, Y in train.iter_chunks(chunk, device=x.device, dtype=be.chunk_dtype(x.dtype, train.dtype)):
        if norms is not None and norms.device == Y.device:
            options["yy"] = norms[start : start + Y.shape[0]]
        st = partial(name, x, Y, sigma, alpha, precision, need_out, **options)
        state = st if state is None else merge_softmax_states(state, st)
    assert state is not None  # a TrainingSet has at least one point (checked by the ops)
    return state


def denoise(name: str, x, train, sigma, alpha, *, precision="auto", need_out=True, chunk_size=None, **options):
    """DenoiseResult(denoised or None, lse, top_weight, n_eff) of backend `name`: the driver's state finalised.

    The backend implementation the dispatcher, autograd and the overflow guard call
    (impl(x, ts, s, a, *, precision, need_out))."""
    from diffgen_fast.ops.softmax_denoise.reference import DenoiseResult

    be = softmax_backend(name)
    state = softmax_state(name, x, train, sigma, alpha, precision=precision, need_out=need_out,
                          chunk_size=chunk_size, **options)  # fmt: skip
    out, lse, top_w, n_eff = finalize_softmax_state(state)
    if need_out and out is not None:
        out = out.to(be.out_dtype(x.dtype, train.dtype))
    return DenoiseResult(out if need_out else None, lse, top_w, n_eff)


def denoiser(name: str) -> Callable:
    """impl(x, ts, s, a, *, precision, need_out, chunk_size=None) of backend `name`, for the dispatcher."""

    def impl(x, train, sigma, alpha, *, precision="auto", need_out=True, chunk_size=None, **options):
        return denoise(name, x, train, sigma, alpha, precision=precision, need_out=need_out, chunk_size=chunk_size,
                       **options)  # fmt: skip

    impl.__name__ = f"softmax_denoise_{name}"
    return impl


def partial_topk(name: str, x, Y, k: int, index_offset: int = 0):
    """One chunk's top-k state on backend `name` (through its custom op under torch.compile)."""
    be = topk_backend(name)
    if not torch.compiler.is_compiling():
        return be.partial_topk(x, Y, k, index_offset)
    return be.op(x, Y, k, index_offset)


def topk_state(name: str, x: torch.Tensor, train, k: int, *, chunk_size: Optional[int] = None):
    """(sqdist [M, k] float64, index [M, k] int64): the exact top-k of x over the TrainingSet on backend `name`."""
    be = topk_backend(name)
    be.check(x, train, k)
    M, d = x.shape
    dev = x.device
    best_d = torch.empty(M, 0, dtype=torch.float64, device=dev)
    best_i = torch.empty(M, 0, dtype=torch.int64, device=dev)
    if M == 0:
        return torch.zeros(0, k, dtype=torch.float64, device=dev), torch.zeros(0, k, dtype=torch.int64, device=dev)
    chunk = chunk_size or be.chunk_size(M, d, k)
    for start, Y in train.iter_chunks(chunk, device=dev, dtype=be.chunk_dtype(x.dtype, train.dtype)):
        dk, ik = partial_topk(name, x, Y, min(k, Y.shape[0]), start)
        best_d, best_i = merge_topk(best_d, best_i, dk, ik, k)
    return best_d, best_i


def knn_impl(name: str) -> Callable:
    def impl(x, train, k, *, chunk_size=None):
        return topk_state(name, x, train, k, chunk_size=chunk_size)

    impl.__name__ = f"knn_{name}"
    return impl


def unavailable(backend: str, why: str) -> BackendUnavailableError:
    return BackendUnavailableError(f"backend={backend!r}: {why}")


__all__ = [
    "SoftmaxBackend",
    "TopkBackend",
    "register_softmax",
    "register_topk",
    "softmax_backend",
    "topk_backend",
    "partial",
    "softmax_state",
    "denoise",
    "denoiser",
    "partial_topk",
    "topk_state",
    "knn_impl",
]
