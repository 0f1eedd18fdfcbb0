"""Item layouts and value ranges: catch samples given in another layout or on another scale than the training set.

Two item shapes with the same number of values can still hold the values in a different order: a channels-last
image ``[H, W, C]`` against channels-first training items ``[C, H, W]`` compares pixel values of different
positions, and exact copies score as fresh samples. The ops accept a flat ``[M, d]`` query against any item shape
(and any query shape against a flat training set), and shapes that differ only by dimensions of size 1; any other
pair of different item shapes is refused, naming the channels-last permutation when that is what it is.
:func:`align_layout` converts a set in the channels-last (or channels-first) layout of the training items, and
:func:`range_mismatch` applies the value-range rule of ``score``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional

from diffgen_fast.errors import InputError

__all__ = [
    "RANGE_RULE",
    "RangeMismatchWarning",
    "align_layout",
    "check_item_shapes",
    "check_range",
    "layout_permutation",
    "observed_range",
    "range_mismatch",
    "scale_for",
    "training_range",
]

#: The rule of :func:`range_mismatch`, as stated in summary.json.
RANGE_RULE = (
    "mismatch when the values reach outside the training range by more than half its width, or all lie in one half "
    "of it (5% tolerance), e.g. [0, 1] or [0, 255] against [-1, 1]"
)


class RangeMismatchWarning(UserWarning):
    """Samples (or held-out points) lie on another value scale than the training set."""


def _squeeze(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(s for s in shape if s != 1)


def layout_permutation(shape: tuple[int, ...], target: tuple[int, ...]) -> Optional[tuple[str, tuple[int, ...]]]:
    """If items of ``shape`` are the channels-last (``[*S, C]``) or channels-first (``[C, *S]``) layout of items of
    ``target``, return (description, permutation of the batch dims ``[M, *shape]`` giving ``[M, *target]``)."""
    shape, target = tuple(shape), tuple(target)
    if len(shape) < 2 or len(shape) != len(target) or shape == target:
        return None
    n = len(shape)
    if shape == (*target[1:], target[0]):  # channels-last -> channels-first
        return "channels-last", (0, n, *range(1, n))
    if shape == (target[-1], *target[:-1]):  # channels-first -> channels-last
        return "channels-first", (0, *range(2, n + 1), 1)
    return None


def check_item_shapes(
    x_shape: tuple[int, ...], train_shape: tuple[int, ...], *, x_name: str = "x", train_name: str = "train"
) -> None:
    """Raise InputError unless items of ``x_shape`` can be compared value by value with items of ``train_shape``.

    Accepted: equal shapes, a flat side (``(d,)``) with the same d, and shapes equal up to dimensions of size 1.
    """
    x_shape, train_shape = tuple(int(s) for s in x_shape), tuple(int(s) for s in train_shape)
    d, dt = math.prod(x_shape), math.prod(train_shape)
    if d != dt:
        raise InputError(
            f"{x_name}: items of shape {x_shape} (d={d}) do not match {train_name} items of shape "
            f"{train_shape} (d={dt}); expected the same number of values per item"
        )
    if len(x_shape) == 1 or len(train_shape) == 1 or _squeeze(x_shape) == _squeeze(train_shape):
        return
    perm = layout_permutation(x_shape, train_shape)
    hint = ""
    if perm is not None:
        kind, p = perm
        other = "channels-first" if kind == "channels-last" else "channels-last"
        hint = (
            f"; {x_name} looks like the {kind} layout of {other} {train_name} items: permute it with "
            f"x.permute{p} (numpy: x.transpose{p})"
        )
    raise InputError(
        f"{x_name}: items of shape {x_shape} do not match {train_name} items of shape {train_shape} (same d={d}, "
        f"but the values are in another order){hint}; expected the same item shape, or flat [M, {d}] items"
    )


def align_layout(s, train, name: str = "samples", *, strict: bool = True):
    """Return ``s`` (a TrainingSet) in the item layout of ``train``: unchanged when the shapes match (or one is
    flat), converted (in memory) when it is the channels-last / channels-first layout of the training items, with
    the conversion appended to its ``conversions``; otherwise InputError as :func:`check_item_shapes` (strict) or
    ``s`` unchanged (not strict)."""
    src, dst = tuple(s.shape), tuple(train.shape)
    perm = layout_permutation(src, dst)
    if perm is None:
        if strict:
            check_item_shapes(src, dst, x_name=name, train_name="train")
        return s
    kind, p = perm
    x = s.tensor().permute(*p).contiguous()
    out = type(s)(x, s.labels, value_range=s.value_range, source=s.source, name=name)
    out._names = getattr(s, "_names", None)
    note = f"layout: {kind} items {list(src)} permuted to {list(dst)} like the training items (x.permute{p})"
    out._conversions = [*s.conversions, note]
    return out


def observed_range(ts) -> tuple[float, float]:
    """(min, max) of the values of a TrainingSet, streamed chunk by chunk and cached on the set."""
    cached = getattr(ts, "_observed_range", None)
    if cached is not None:
        return cached
    lo, hi = math.inf, -math.inf
    for _, chunk in ts.iter_chunks(device="cpu"):
        lo, hi = min(lo, float(chunk.min())), max(hi, float(chunk.max()))
    ts._observed_range = (lo, hi)
    return lo, hi


def training_range(ts) -> tuple[float, float]:
    """The declared value_range of the training set, else its observed (min, max)."""
    return tuple(ts.value_range) if ts.value_range is not None else observed_range(ts)


def range_mismatch(s_range: tuple[float, float], t_range: tuple[float, float]) -> bool:
    """The value-range rule (:data:`RANGE_RULE`) on a set's observed (min, max) and the training range."""
    c, e = (float(v) for v in s_range)
    a, b = (float(v) for v in t_range)
    w = b - a
    if not (math.isfinite(w) and w > 0):
        return False
    outside = max(0.0, a - c) + max(0.0, e - b)
    mid, tol = (a + b) / 2, 0.05 * w
    return outside > 0.5 * w or c >= mid - tol or e <= mid + tol


def _fmt_range(r: tuple[float, float]) -> str:
    return f"[{r[0]:.4g}, {r[1]:.4g}]"


def check_range(s, train, name: str, *, on_mismatch: str = "warn", hint: str = "") -> dict:
    """Compare the observed range of ``s`` with the training range; return the facts for summary.json, and warn
    (RangeMismatchWarning), raise (InputError) or do nothing on a mismatch, as ``on_mismatch`` says."""
    if on_mismatch not in ("warn", "error", "ignore"):
        raise InputError(f"on_range_mismatch: expected 'warn', 'error' or 'ignore', got {on_mismatch!r}")
    sr, tr = observed_range(s), training_range(train)
    bad = range_mismatch(sr, tr)
    facts: dict[str, Any] = {"range": list(sr), "train_range": list(tr), "mismatch": bad}
    if bad:
        msg = (
            f"{name}: values in {_fmt_range(sr)} are far from the training set's value range {_fmt_range(tr)} "
            f"({RANGE_RULE}); distances across scales are meaningless: copies score as fresh samples. Expected "
            f"{name} on the training set's scale (rescale them){hint}"
        )
        facts["message"] = msg
        if on_mismatch == "error":
            raise InputError(msg)
        if on_mismatch == "warn":
            warnings.warn(msg, RangeMismatchWarning, stacklevel=3)
    return facts


def scale_for(t_range: Optional[tuple[float, float]]) -> str:
    """The image scale (``"[-1,1]"``, ``"[0,1]"`` or ``"[0,255]"``) closest to a training range; ``"[-1,1]"`` when
    it is unknown. uint8 samples are scaled with it, to the training set's convention."""
    scales = {"[-1,1]": (-1.0, 1.0), "[0,1]": (0.0, 1.0), "[0,255]": (0.0, 255.0)}
    if t_range is None or not all(math.isfinite(v) for v in t_range):
        return "[-1,1]"
    lo, hi = t_range
    return min(scales, key=lambda k: max(abs(scales[k][0] - lo), abs(scales[k][1] - hi)))
