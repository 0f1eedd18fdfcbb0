"""The native extension diffgen_fast._C and its Python face diffgen_fast._native.

Tests that need the built extension skip, with the reason, when it is not there; test_extension_built_when_required
fails instead when DIFFGEN_FAST_REQUIRE_EXT=1 (CI sets it, so a broken build cannot hide behind the skips).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import diffgen_fast
from diffgen_fast import _native
from diffgen_fast.errors import BackendUnavailableError, InputError, InputTypeError
from diffgen_fast.ops.merge import SoftmaxState, empty_softmax_state
from diffgen_fast.ops.merge import merge_softmax_states as reference_merge

F64 = torch.float64
NEG_INF = float("-inf")

needs_ext = pytest.mark.skipif(
    not _native.available(), reason=f"native extension unavailable: {_native.unavailable_reason()}"
)


@pytest.fixture
def C():
    """The raw module, for tests of its own argument checks."""
    if not _native.available():
        pytest.skip(f"native extension unavailable: {_native.unavailable_reason()}")
    return importlib.import_module("diffgen_fast._C")


@pytest.fixture
def restore_threads():
    if not _native.available():
        pytest.skip(f"native extension unavailable: {_native.unavailable_reason()}")
    before = _native.get_num_threads()
    yield
    _native.set_num_threads(before)


@pytest.fixture
def fresh_native(monkeypatch):
    """_native reloaded after the test's own environment changes, and reloaded clean afterwards."""
    yield monkeypatch
    monkeypatch.undo()
    importlib.reload(_native)


def random_state(M: int, d: int | None, o_dtype: torch.dtype, gen: torch.Generator, empty: torch.Tensor):
    """A plausible softmax state: l >= 1 and 0 < q <= l on non-empty rows; rows where empty is True are the
    empty set (m = -inf, l = q = 0, o = 0)."""
    m = torch.randn(M, dtype=F64, generator=gen) * 20
    l = 1 + torch.rand(M, dtype=F64, generator=gen) * 50
    q = l * torch.rand(M, dtype=F64, generator=gen).clamp_min(1e-3)
    m[empty], l[empty], q[empty] = NEG_INF, 0.0, 0.0
    o = None
    if d is not None:
        o = torch.randn(M, d, dtype=F64, generator=gen).to(o_dtype) * 5
        o[empty] = 0
    return SoftmaxState(m, l, q, o)


def empty_masks(M: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows empty in a, in b, in both, and in neither (all four kinds when M >= 4)."""
    pattern = torch.arange(M) % 4
    ea, eb = (pattern == 1) | (pattern == 3), (pattern == 2) | (pattern == 3)
    if M < 4:  # M = 1: cover the cases through the seed instead
        r = torch.randint(0, 4, (M,), generator=gen)
        ea, eb = (r == 1) | (r == 3), (r == 2) | (r == 3)
    return ea, eb


def tolerances(dtype: torch.dtype) -> dict[str, float]:
    # The two sides use different exp implementations (std::exp vs torch's vectorised one): an ulp or so apart.
    return {"rtol": 1e-13, "atol": 1e-13} if dtype == F64 else {"rtol": 1e-6, "atol": 1e-6}


def assert_states_close(got: SoftmaxState, want: SoftmaxState) -> None:
    assert torch.equal(got.m, want.m)  # a max: exact
    torch.testing.assert_close(got.l, want.l, **tolerances(F64))
    torch.testing.assert_close(got.q, want.q, **tolerances(F64))
    if want.o is None:
        assert got.o is None
    else:
        assert got.o is not None and got.o.dtype == want.o.dtype and got.o.shape == want.o.shape
        torch.testing.assert_close(got.o, want.o, **tolerances(want.o.dtype))


def clone_state(s: SoftmaxState) -> SoftmaxState:
    return SoftmaxState(*(None if t is None else t.clone() for t in s))


def assert_states_equal(x: SoftmaxState, y: SoftmaxState) -> None:
    for a, b in zip(x, y):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a, b)


# --- presence -----------------------------------------------------------------------------------------------------


def test_extension_built_when_required():
    """Fails (rather than skips) when CI demands the extension and it does not import."""
    try:
        importlib.import_module("diffgen_fast._C")
    except ImportError as exc:
        if os.environ.get("DIFFGEN_FAST_REQUIRE_EXT") == "1":
            pytest.fail(f"DIFFGEN_FAST_REQUIRE_EXT=1 but diffgen_fast._C does not import: {exc}")
        pytest.skip(f"native extension not built: {exc}")


@needs_ext
def test_build_info_fields():
    info = _native.build_info()
    assert isinstance(info, dict)
    for key in ("version", "compiler", "compiler_version", "cxx_standard", "openmp", "max_threads", "simd", "cuda"):
        assert key in info, key
    assert info["version"] == diffgen_fast.__version__
    assert info["cxx_standard"] >= 201703
    assert isinstance(info["openmp"], bool)
    assert isinstance(info["max_threads"], int) and info["max_threads"] >= 1
    assert isinstance(info["simd"], list) and all(isinstance(f, str) for f in info["simd"])
    assert isinstance(info["cuda"], bool)  # True when nvcc compiled the CUDA kernels (tests/test_cuda_native.py)
    if not info["openmp"]:
        assert info["max_threads"] == 1
    assert _native.unavailable_reason() is None


# --- merge against the reference ----------------------------------------------------------------------------------


@needs_ext
@pytest.mark.parametrize("o_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d", [1, 3, 59, None])
@pytest.mark.parametrize("M", [1, 7, 97])
def test_merge_matches_reference(M, d, o_dtype):
    for seed in range(4):
        gen = torch.Generator().manual_seed(1000 * M + 10 * (d or 0) + seed)
        ea, eb = empty_masks(M, gen)
        a = random_state(M, d, o_dtype, gen, ea)
        b = random_state(M, d, o_dtype, gen, eb)
        if seed == 1:  # ties in m
            b = SoftmaxState(torch.where(ea | eb, b.m, a.m), b.l, b.q, b.o)
        a0, b0 = clone_state(a), clone_state(b)
        got = _native.merge_softmax_states(a, b)
        assert_states_close(got, reference_merge(a, b))
        assert_states_equal(a, a0)  # inputs untouched
        assert_states_equal(b, b0)
        if M >= 4:
            both = ea & eb
            assert torch.isneginf(got.m[both]).all() and (got.l[both] == 0).all() and (got.q[both] == 0).all()


@needs_ext
@pytest.mark.parametrize("o_dtype", [torch.float32, torch.float64])
def test_merge_with_empty_state_is_identity(o_dtype):
    gen = torch.Generator().manual_seed(7)
    a = random_state(33, 5, o_dtype, gen, torch.zeros(33, dtype=torch.bool))
    e = empty_softmax_state(33, 5, dtype=o_dtype)
    assert_states_equal(_native.merge_softmax_states(a, e), a)
    assert_states_equal(_native.merge_softmax_states(e, a), a)


@needs_ext
def test_merge_o_none_in_one_state_gives_none():
    gen = torch.Generator().manual_seed(3)
    a = random_state(9, 4, F64, gen, torch.zeros(9, dtype=torch.bool))
    b = random_state(9, None, F64, gen, torch.zeros(9, dtype=torch.bool))
    for x, y in ((a, b), (b, a)):
        got = _native.merge_softmax_states(x, y)
        assert got.o is None
        assert_states_close(got, reference_merge(x, y))


@needs_ext
def test_merge_empty_shapes():
    for M, d in ((0, 4), (0, None), (5, 0)):
        a = empty_softmax_state(M, d, dtype=torch.float32)
        gen = torch.Generator().manual_seed(0)
        b = random_state(M, d, torch.float32, gen, torch.zeros(M, dtype=torch.bool))
        assert_states_close(_native.merge_softmax_states(a, b), reference_merge(a, b))


@needs_ext
def test_merge_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(11)
    a = random_state(40, 6, torch.float32, gen, torch.arange(40) % 5 == 0)
    b = random_state(40, 6, torch.float32, gen, torch.arange(40) % 7 == 0)
    # every other row, and o transposed twice: strided views of the same values
    a_v = SoftmaxState(*(t.repeat_interleave(2, 0)[::2] for t in a[:3]), a.o.t().contiguous().t())
    b_v = SoftmaxState(*(t.repeat_interleave(2, 0)[::2] for t in b[:3]), b.o.t().contiguous().t())
    assert not a_v.m.is_contiguous() and not a_v.o.is_contiguous()
    got = _native.merge_softmax_states(a_v, b_v)
    assert all(t.is_contiguous() for t in got)
    assert_states_close(got, reference_merge(a, b))


@needs_ext
def test_merge_of_shared_tensors():
    gen = torch.Generator().manual_seed(5)
    a = random_state(20, 3, F64, gen, torch.arange(20) % 3 == 0)
    a0 = clone_state(a)
    assert_states_close(_native.merge_softmax_states(a, a), reference_merge(a0, a0))
    assert_states_equal(a, a0)


# --- threads ------------------------------------------------------------------------------------------------------


@needs_ext
@pytest.mark.parametrize("o_dtype", [torch.float32, torch.float64])
def test_threads_give_identical_results(o_dtype, restore_threads):
    M, d = 3000, 64  # above the parallel threshold
    gen = torch.Generator().manual_seed(21)
    a = random_state(M, d, o_dtype, gen, torch.arange(M) % 4 == 1)
    b = random_state(M, d, o_dtype, gen, torch.arange(M) % 4 == 2)
    torch_threads = torch.get_num_threads()
    _native.set_num_threads(1)
    assert _native.get_num_threads() == 1
    one = _native.merge_softmax_states(a, b)
    _native.set_num_threads(2)
    assert _native.get_num_threads() == (2 if _native.build_info()["openmp"] else 1)
    two = _native.merge_softmax_states(a, b)
    assert_states_equal(one, two)
    assert torch.get_num_threads() == torch_threads  # the native setting is its own
    assert_states_close(two, reference_merge(a, b))


@needs_ext
def test_set_num_threads_rejects_bad_values(C):
    for bad in (0, -1):
        with pytest.raises(InputError, match="n must be"):
            _native.set_num_threads(bad)
        with pytest.raises(ValueError, match="n must be"):
            C.set_num_threads(bad)
    with pytest.raises(InputTypeError, match="n must be an int"):
        _native.set_num_threads(2.0)


# --- bad arguments ------------------------------------------------------------------------------------------------


def _good_pair(M: int = 4, d: int = 3, o_dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(0)
    none = torch.zeros(M, dtype=torch.bool)
    return random_state(M, d, o_dtype, gen, none), random_state(M, d, o_dtype, gen, none)


@needs_ext
@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda a, b: (a._replace(m=a.m.float()), b), InputTypeError, "a.m must have dtype torch.float64"),
        (lambda a, b: (a, b._replace(q=b.q[:3])), InputError, "b.q has 3 rows"),
        (lambda a, b: (a, b._replace(l=b.l[:, None])), InputError, "b.l must have 1 dimension"),
        (lambda a, b: (a._replace(o=a.o.to(torch.float16)), b), InputTypeError, "a.o must have dtype"),
        (lambda a, b: (a, b._replace(o=b.o.double())), InputTypeError, "b.o has dtype torch.float64"),
        (lambda a, b: (a, b._replace(o=b.o[:, :2])), InputError, "b.o has shape"),
        (lambda a, b: (a._replace(o=a.o[:2]), b), InputError, "a.o has 2 rows"),
        (lambda a, b: (a._replace(l=a.l.tolist()), b), InputTypeError, "a.l must be a torch.Tensor"),
        (lambda a, b: (a._replace(m=torch.empty(4, dtype=F64, device="meta")), b), InputError, "a.m must be on"),
        (lambda a, b: (a._replace(m=a.m.clone().requires_grad_()), b), InputError, "a.m requires grad"),
        (lambda a, b: ("state", b), InputTypeError, "a must be a SoftmaxState"),
    ],
)
def test_native_merge_rejects_bad_inputs(make, error, match):
    a, b = make(*_good_pair())
    with pytest.raises(error, match=match):
        _native.merge_softmax_states(a, b)


@needs_ext
def test_raw_merge_rejects_bad_arguments(C):
    M, d = 4, 3
    a, b = _good_pair(M, d)
    ptrs = [t.data_ptr() for t in a] + [t.data_ptr() for t in b]

    def call(**kw):
        names = ["m1", "l1", "q1", "o1", "m2", "l2", "q2", "o2"]
        args = dict(zip(names, ptrs), M=M, d=d, o_dtype="float32")
        args.update(kw)
        C.merge_softmax_states(**args)

    call()  # the good call works
    for kw, match in [
        ({"M": -1}, "M must be >= 0"),
        ({"d": -2}, "d must be >= 0"),
        ({"o_dtype": "float16"}, "o_dtype must be 'float32' or 'float64'"),
        ({"m1": 0}, "m1 is a null pointer"),
        ({"q2": 0}, "q2 is a null pointer"),
        ({"o1": 0}, "o1 is 0 .* but o2 is not"),
        ({"l1": ptrs[1] + 1}, "l1 is not aligned"),
        ({"o2": -8}, "o2 must be a non-negative pointer"),
        ({"M": 2**62, "d": 2**10}, "M \\* d is too large"),
    ]:
        with pytest.raises(ValueError, match=match):
            call(**kw)
    for kw, match in [
        ({"m1": 1.5}, "m1 must be a pointer"),
        ({"M": "4"}, "M must be an int"),
        ({"o_dtype": 1}, "o_dtype"),
    ]:
        with pytest.raises(TypeError, match=match):
            call(**kw)
    call(o1=0, o2=0)  # no o: fine
    call(M=0, m1=0, l1=0, q1=0, o1=0, m2=0, l2=0, q2=0, o2=0)  # nothing to do: null pointers allowed


# --- fallback -----------------------------------------------------------------------------------------------------


def test_disable_env_forces_fallback(fresh_native):
    fresh_native.setenv("DIFFGEN_FAST_DISABLE_EXT", "1")
    importlib.reload(_native)
    assert _native.available() is False
    assert _native.unavailable_reason() == "disabled by DIFFGEN_FAST_DISABLE_EXT=1"
    assert _native.build_info() is None
    a, b = _good_pair()
    with pytest.raises(BackendUnavailableError, match="DIFFGEN_FAST_DISABLE_EXT=1"):
        _native.merge_softmax_states(a, b)


def test_missing_module_is_reported_not_raised(fresh_native):
    fresh_native.delenv("DIFFGEN_FAST_DISABLE_EXT", raising=False)
    fresh_native.setitem(sys.modules, "diffgen_fast._C", None)  # makes the import fail
    fresh_native.delattr(diffgen_fast, "_C", raising=False)
    importlib.reload(_native)
    assert _native.available() is False
    reason = _native.unavailable_reason()
    assert reason is not None and "diffgen_fast._C" in reason
    with pytest.raises(BackendUnavailableError, match="unavailable"):
        _native.ensure_available()


def test_disable_env_in_fresh_process():
    root = str(Path(diffgen_fast.__file__).resolve().parent.parent)
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, DIFFGEN_FAST_DISABLE_EXT="1", PYTHONPATH=path)
    code = "from diffgen_fast import _native; print(_native.available()); print(_native.unavailable_reason())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.splitlines() == ["False", "disabled by DIFFGEN_FAST_DISABLE_EXT=1"]
