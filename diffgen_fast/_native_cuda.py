"""The one place Python touches the CUDA kernels of the native extension ``diffgen_fast._C``.

``_C`` takes device pointers (``tensor.data_ptr()``), sizes and the CUDA stream handle
(``torch.cuda.current_stream().cuda_stream``) as ints and knows nothing of torch. This module checks CUDA tensors
(device, dtype, contiguity: non-contiguous ones are copied, a wrong dtype raises InputTypeError naming the argument),
allocates the outputs with torch, and launches on torch's current stream of the tensors' device, so the kernels
order with torch's own work and need no synchronisation. The raw kernels are registered as torch custom ops
(``torch.ops.diffgen_fast.*``, with fake implementations for shapes) so torch.compile can trace through them.

``unavailable_reason(device)`` says why the kernels cannot run: the extension is missing, was built without CUDA
(no nvcc at install time), torch has no CUDA device, or the tensors are not on a CUDA device.
"""

from typing import Any, Optional

import torch

from diffgen_fast import _native
from diffgen_fast.errors import BackendUnavailableError, InputError, InputTypeError

SELECT_MAX_K = 2048  # largest k of one selection kernel call (csrc/cuda/kernels.h kSelectMaxK)
SOFTMAX_MAX_D = 64  # largest d of the fused small-d softmax kernel (kSoftmaxMaxD)
_DTYPE_NAMES = {torch.float32: "float32", torch.float64: "float64"}


def built_with_cuda() -> bool:
    """True when the extension is importable and was compiled with the CUDA kernels."""
    module = _native._load()
    return module is not None and hasattr(module, "cuda_sqdist")


def build_info() -> Optional[dict]:
    """The extension's CUDA build: nvcc version, arch list, runtime / driver versions and errors; None without."""
    info = _native.build_info()
    if info is None or not info.get("cuda"):
        return None
    return dict(info["cuda_build"])


def unavailable_reason(device: Any = None) -> Optional[str]:
    """Why the CUDA kernels cannot run on `device` (None: a CUDA device is assumed), or None when they can."""
    if not _native.available():
        return f"the native extension is unavailable: {_native.unavailable_reason()}"
    if not built_with_cuda():
        return (
            "diffgen_fast._C was built without CUDA (nvcc not found at install time, or DIFFGEN_FAST_BUILD_CUDA=0; "
            'reinstall with DIFFGEN_FAST_BUILD_CUDA=1 pip install -v -e ".[dev]" to see why)'
        )
    if not torch.cuda.is_available():
        return "torch has no usable CUDA device (torch.cuda.is_available() is False)"
    if device is not None and torch.device(device).type != "cuda":
        return f"needs CUDA tensors, got device {torch.device(device)}"
    return None


def available(device: Any = None) -> bool:
    return unavailable_reason(device) is None


def probe(device: Any) -> Optional[str]:
    """The dispatch probe: None if the kernels can run on `device` (None counts as the CPU), else the reason."""
    return unavailable_reason(device if device is not None else torch.device("cpu"))


def _require() -> Any:
    why = unavailable_reason()
    if why is not None:
        raise BackendUnavailableError(f"the native CUDA kernels are unavailable: {why}")
    return _native._load()


def check_tensor(t: Any, name: str, dtypes: tuple, ndim: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """t as a contiguous CUDA tensor (copied if needed) after checking type, device, dtype and rank."""
    if not isinstance(t, torch.Tensor):
        raise InputTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cuda":
        raise InputError(f"{name} must be a CUDA tensor for the native CUDA backend, got device {t.device}")
    if device is not None and t.device != device:
        raise InputError(f"{name} is on {t.device} but the other arguments are on {device}; expected one device")
    if t.layout != torch.strided:
        raise InputError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
    if t.dtype not in dtypes:
        expected = " or ".join(str(dt) for dt in dtypes)
        raise InputTypeError(f"{name} must have dtype {expected}, got {t.dtype}")
    if t.dim() != ndim:
        raise InputError(f"{name} must have {ndim} dimension(s), got shape {tuple(t.shape)}")
    return t if t.is_contiguous() else t.contiguous()


def _stream(device: torch.device) -> int:
    return int(torch.cuda.current_stream(device).cuda_stream)


# -- the kernels' implementations (pointers and sizes into _C) ---------------------------------------------------------


def _sqdist_topk_impl(x: torch.Tensor, y: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    C = _require()
    M, d = x.shape
    n = y.shape[0]
    dev = x.device
    vals = torch.empty(M, k, dtype=torch.float32, device=dev)
    idx = torch.empty(M, k, dtype=torch.int64, device=dev)
    if M == 0:
        return vals, idx
    dist = torch.empty(M, n, dtype=torch.float32, device=dev)
    with torch.cuda.device(dev):
        s = _stream(dev)
        C.cuda_sqdist(x.data_ptr(), y.data_ptr(), dist.data_ptr(), M, n, d, _DTYPE_NAMES[x.dtype], s)
        C.cuda_select_topk(dist.data_ptr(), vals.data_ptr(), idx.data_ptr(), M, n, k, s)
    return vals, idx


def _sqdist_pairs_impl(x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    C = _require()
    M, d = x.shape
    n = y.shape[0]
    c = idx.shape[1]
    out = torch.empty(M, c, dtype=torch.float64, device=x.device)
    if M == 0 or c == 0:
        return out
    with torch.cuda.device(x.device):
        C.cuda_sqdist_pairs(
            x.data_ptr(), y.data_ptr(), idx.data_ptr(), out.data_ptr(), M, n, c, d, _DTYPE_NAMES[x.dtype],
            _stream(x.device),
        )  # fmt: skip
    return out


def _softmax_state_impl(
    x: torch.Tensor,
    y: torch.Tensor,
    alpha: torch.Tensor,
    c2: torch.Tensor,
    splits: int,
    per_split: int,
    exact: bool,
    need_out: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    C = _require()
    M, d = x.shape
    n = y.shape[0]
    dev = x.device
    f64 = dict(dtype=torch.float64, device=dev)
    m = torch.empty(splits, M, **f64)
    l = torch.empty(splits, M, **f64)
    q = torch.empty(splits, M, **f64)
    o = torch.empty(splits, M, d if need_out else 0, dtype=torch.float32, device=dev)
    if M == 0:
        return m, l, q, o
    with torch.cuda.device(dev):
        C.cuda_softmax_state(
            x.data_ptr(), y.data_ptr(), alpha.data_ptr(), c2.data_ptr(), m.data_ptr(), l.data_ptr(), q.data_ptr(),
            o.data_ptr() if need_out else 0, M, n, d, splits, per_split, bool(exact), _stream(dev),
        )  # fmt: skip
    return m, l, q, o


# -- torch custom ops (torch >= 2.4), so torch.compile traces through the kernels ------------------------------------

_sqdist_topk_op = _sqdist_topk_impl
_sqdist_pairs_op = _sqdist_pairs_impl
_softmax_state_op = _softmax_state_impl

if hasattr(torch.library, "custom_op"):
    _sqdist_topk_op = torch.library.custom_op(
        "diffgen_fast::cuda_sqdist_topk",
        _sqdist_topk_impl,
        mutates_args=(),
        schema="(Tensor x, Tensor y, int k) -> (Tensor, Tensor)",
    )
    _sqdist_pairs_op = torch.library.custom_op(
        "diffgen_fast::cuda_sqdist_pairs",
        _sqdist_pairs_impl,
        mutates_args=(),
        schema="(Tensor x, Tensor y, Tensor idx) -> Tensor",
    )
    _softmax_state_op = torch.library.custom_op(
        "diffgen_fast::cuda_softmax_state",
        _softmax_state_impl,
        mutates_args=(),
        schema="(Tensor x, Tensor y, Tensor alpha, Tensor c2, int splits, int per_split, bool exact, bool need_out)"
        " -> (Tensor, Tensor, Tensor, Tensor)",
    )

    @_sqdist_topk_op.register_fake
    def _(x, y, k):
        M = x.shape[0]
        return x.new_empty(M, k, dtype=torch.float32), x.new_empty(M, k, dtype=torch.int64)

    @_sqdist_pairs_op.register_fake
    def _(x, y, idx):
        return x.new_empty(idx.shape[0], idx.shape[1], dtype=torch.float64)

    @_softmax_state_op.register_fake
    def _(x, y, alpha, c2, splits, per_split, exact, need_out):
        M, d = x.shape
        f64 = x.new_empty(splits, M, dtype=torch.float64)
        return f64, f64.new_empty(splits, M), f64.new_empty(splits, M), x.new_empty(splits, M, d if need_out else 0)


# -- checked entry points ---------------------------------------------------------------------------------------------


def _pair(x: Any, y: Any) -> tuple[torch.Tensor, torch.Tensor]:
    x = check_tensor(x, "x", (torch.float32, torch.float64), 2)
    y = check_tensor(y, "y", (x.dtype,), 2, x.device)
    if y.shape[1] != x.shape[1]:
        raise InputError(f"y must have d = {x.shape[1]} columns like x, got shape {tuple(y.shape)}")
    if x.shape[1] < 1:
        raise InputError("x must have at least one column (d >= 1)")
    return x, y


def sqdist_topk(x: Any, y: Any, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query, the k training points with the smallest direct-difference fp32 squared distance (computed in the
    inputs' precision, stored as fp32), ascending by (distance, index): (vals [M, k] float32, idx [M, k] int64).

    x [M, d], y [n, d] float32 or float64 (the same dtype) on one CUDA device; 1 <= k <= min(n, SELECT_MAX_K)."""
    x, y = _pair(x, y)
    if isinstance(k, bool) or not isinstance(k, int):
        raise InputTypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= min(y.shape[0], SELECT_MAX_K):
        raise InputError(f"k must be in [1, min(n, {SELECT_MAX_K})] with n = {y.shape[0]}, got {k}")
    return _sqdist_topk_op(x, y, k)


def sqdist_pairs(x: Any, y: Any, idx: Any) -> torch.Tensor:
    """out[i, j] = ||x_i - y_idx[i, j]||^2 in float64 from differences: x [M, d], y [n, d], idx [M, c] int64."""
    x, y = _pair(x, y)
    idx = check_tensor(idx, "idx", (torch.int64,), 2, x.device)
    if idx.shape[0] != x.shape[0]:
        raise InputError(f"idx must have M = {x.shape[0]} rows like x, got shape {tuple(idx.shape)}")
    if y.shape[0] < 1:
        raise InputError("y must have at least one row")
    return _sqdist_pairs_op(x, y, idx)


def softmax_state(
    x: Any, y: Any, alpha: Any, c2: Any, splits: int, per_split: int, *, exact: bool, need_out: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Partial softmax states (m, l, q [splits, M] float64; o [splits, M, d] float32, [splits, M, 0] without
    need_out) of the small-d fused kernel; split s covers training rows [s per_split, (s + 1) per_split)."""
    x = check_tensor(x, "x", (torch.float32,), 2)
    y = check_tensor(y, "y", (torch.float32,), 2, x.device)
    alpha = check_tensor(alpha, "alpha", (torch.float64,), 1, x.device)
    c2 = check_tensor(c2, "c2", (torch.float64,), 1, x.device)
    M, d = x.shape
    if not 1 <= d <= SOFTMAX_MAX_D:
        raise InputError(f"x must have 1 <= d <= {SOFTMAX_MAX_D} for the small-d CUDA kernel, got d = {d}")
    if y.shape[1] != d:
        raise InputError(f"y must have d = {d} columns like x, got shape {tuple(y.shape)}")
    if alpha.shape[0] != M or c2.shape[0] != M:
        raise InputError(f"alpha and c2 must have M = {M} entries, got {tuple(alpha.shape)} and {tuple(c2.shape)}")
    if splits < 1 or per_split < 1 or splits * per_split < y.shape[0]:
        raise InputError(f"splits * per_split must cover n = {y.shape[0]}, got {splits} x {per_split}")
    return _softmax_state_op(x, y, alpha, c2, int(splits), int(per_split), bool(exact), bool(need_out))
