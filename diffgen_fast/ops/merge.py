"""The two exact merge rules every reduction over the training set is built from.

1. Softmax state (m, l, q, o) of a set of logits z_i with values y_i:
       m = max_i z_i                     (float64, -inf for an empty set)
       l = sum_i exp(z_i - m)            (float64)
       q = sum_i exp(2 (z_i - m))        (float64; gives the effective number of neighbours)
       o = sum_i exp(z_i - m) y_i        ([M, d], the accumulation dtype)
   Two states of disjoint sets merge by rescaling both to the larger m. The final results are
       D = o / l,  LSE = m + log l,  top weight = 1 / l,  n_eff = l^2 / q.
2. Top-k state (sqdist, index), each row sorted ascending by (sqdist, index). Two states merge by a k-way
   selection with the same ordering, so ties go to the smaller training index, deterministically.

The same functions merge chunks of one call, chunks streamed from disk, and partial results of other processes.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class SoftmaxState(NamedTuple):
    m: torch.Tensor  # [M] float64
    l: torch.Tensor  # [M] float64
    q: torch.Tensor  # [M] float64
    o: Optional[torch.Tensor]  # [M, d] or None when only the log-sum-exp is wanted


def empty_softmax_state(
    M: int, d: Optional[int], *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> SoftmaxState:
    """The state of the empty set: merging it with any state gives that state back."""
    f64 = dict(dtype=torch.float64, device=device)
    o = None if d is None else torch.zeros(M, d, dtype=dtype, device=device)
    return SoftmaxState(torch.full((M,), float("-inf"), **f64), torch.zeros(M, **f64), torch.zeros(M, **f64), o)


def _scale(m_old: torch.Tensor, m_new: torch.Tensor) -> torch.Tensor:
    # exp(m_old - m_new), with 0 for an empty state (m_old = -inf) even when m_new is -inf too.
    return torch.where(torch.isneginf(m_old), torch.zeros_like(m_old), torch.exp(m_old - m_new))


def merge_softmax_states(a: SoftmaxState, b: SoftmaxState) -> SoftmaxState:
    """Exact merge of the softmax states of two disjoint sets of training points (same queries)."""
    m = torch.maximum(a.m, b.m)
    sa, sb = _scale(a.m, m), _scale(b.m, m)
    l = a.l * sa + b.l * sb
    q = a.q * sa * sa + b.q * sb * sb
    if a.o is None or b.o is None:
        o = None
    else:
        o = a.o * sa.to(a.o.dtype)[:, None] + b.o * sb.to(b.o.dtype)[:, None]
    return SoftmaxState(m, l, q, o)


def finalize_softmax_state(state: SoftmaxState):
    """(D [M, d] or None, lse [M] float64, top_weight [M] float64, n_eff [M] float64) of a complete state."""
    lse = state.m + torch.log(state.l)
    top_weight = 1.0 / state.l
    n_eff = state.l * state.l / state.q
    out = None if state.o is None else state.o / state.l.to(state.o.dtype)[:, None]
    return out, lse, top_weight, n_eff


def merge_topk(
    d_a: torch.Tensor, i_a: torch.Tensor, d_b: torch.Tensor, i_b: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two top-k states [M, ka], [M, kb] into the k smallest by (sqdist, index), ascending.

    Entries with index -1 are padding (sqdist = +inf) and sort last.
    """
    d = torch.cat([d_a, d_b], dim=1)
    i = torch.cat([i_a, i_b], dim=1)
    return select_topk(d, i, k)


def select_topk(d: torch.Tensor, i: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k smallest of each row by (sqdist, index): sort by index, then stable sort by distance."""
    big = torch.iinfo(torch.int64).max
    key_i = torch.where(i < 0, torch.full_like(i, big), i)
    order = torch.argsort(key_i, dim=1, stable=True)
    d, i = torch.gather(d, 1, order), torch.gather(i, 1, order)
    order = torch.argsort(d, dim=1, stable=True)[:, :k]
    return torch.gather(d, 1, order), torch.gather(i, 1, order)
