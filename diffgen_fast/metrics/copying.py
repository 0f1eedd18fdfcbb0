"""Data-copying statistics of docs/science.md section 5 beyond the ratio test: Meehan et al.'s C_T and Alaa et al.'s
authenticity. Pure functions of nearest-neighbour distances; diffgen_fast.metrics.scoring computes the distances.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from diffgen_fast.errors import InputError


def mann_whitney_z(gen: np.ndarray, ref: np.ndarray) -> float:
    """z-score of the Mann-Whitney U statistic of `gen` against `ref` (with the tie correction).

    U counts the pairs (g, r) with g > r (ties count 1/2); under the null E[U] = mn/2. Negative z: the generated
    distances are smaller than the reference ones (copying). NaN when either side is empty.
    """
    gen = np.asarray(gen, dtype=np.float64).ravel()
    ref = np.asarray(ref, dtype=np.float64).ravel()
    m, n = gen.size, ref.size
    if m == 0 or n == 0:
        return float("nan")
    both = np.concatenate([gen, ref])
    order = np.argsort(both, kind="stable")
    sorted_v = both[order]
    ranks = np.empty(m + n, dtype=np.float64)
    _, first, counts = np.unique(sorted_v, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0  # average 1-based rank of each group of equal values
    ranks[order] = np.repeat(avg, counts)
    u = ranks[:m].sum() - m * (m + 1) / 2.0
    N = m + n
    ties = float((counts.astype(np.float64) ** 3 - counts).sum())
    var = m * n / 12.0 * ((N + 1) - ties / (N * (N - 1))) if N > 1 else 0.0
    if var <= 0:
        return 0.0
    return float((u - m * n / 2.0) / np.sqrt(var))


def ct_statistic(
    gen_dist: np.ndarray,
    gen_cell: np.ndarray,
    heldout_dist: np.ndarray,
    heldout_cell: np.ndarray,
    n_cells: int,
    *,
    min_cell: int = 10,
) -> dict:
    """Meehan, Chaudhuri, Dasgupta (2020) data-copying statistic C_T.

    Per cell pi of a partition of the space (k-means cells of the training set): Z_U(pi) compares the nearest-
    training-point distances of the generated samples in the cell with those of held-out real samples in the cell;
    C_T = sum_pi P_n(pi) Z_U(pi) / sum_pi P_n(pi) over the cells with at least `min_cell` generated and `min_cell`
    held-out points, P_n(pi) the held-out fraction in the cell. Strongly negative: copying; about 0: generated
    samples are as far from the training set as fresh real data; positive: underfitting.

    Returns a dict: C_T, z_global (one cell), per-cell rows (cell, n_gen, n_heldout, z), cells_used, min_cell.
    """
    gen_dist, heldout_dist = np.asarray(gen_dist, np.float64), np.asarray(heldout_dist, np.float64)
    gen_cell, heldout_cell = np.asarray(gen_cell, np.int64), np.asarray(heldout_cell, np.int64)
    if gen_dist.size == 0 or heldout_dist.size == 0:
        raise InputError("heldout: C_T needs at least one generated and one held-out sample")
    rows, num, den = [], 0.0, 0.0
    n = heldout_dist.size
    for c in range(n_cells):
        g, h = gen_dist[gen_cell == c], heldout_dist[heldout_cell == c]
        used = g.size >= min_cell and h.size >= min_cell
        z = mann_whitney_z(g, h) if (g.size and h.size) else float("nan")
        rows.append({"cell": c, "n_gen": int(g.size), "n_heldout": int(h.size), "z": z, "used": bool(used)})
        if used:
            w = h.size / n
            num += w * z
            den += w
    ct = num / den if den > 0 else float("nan")
    return {
        "C_T": ct,
        "z_global": mann_whitney_z(gen_dist, heldout_dist),
        "cells": rows,
        "cells_used": int(sum(r["used"] for r in rows)),
        "n_cells": int(n_cells),
        "min_cell": int(min_cell),
    }


def authenticity(sample_nn_dist: np.ndarray, train_nn_other_dist: np.ndarray) -> np.ndarray:
    """Alaa et al. (2022): a sample is inauthentic when it is closer to its nearest training point than that
    training point is to its own nearest other training point. Inputs are L2 distances [M]; returns bool [M]."""
    a = np.asarray(sample_nn_dist, np.float64)
    b = np.asarray(train_nn_other_dist, np.float64)
    return a < b


def default_cells(n_heldout: Optional[int], n_train: int) -> int:
    """Cells of the C_T partition: about 40 held-out points per cell, between 1 and 20, at most N / 10."""
    if not n_heldout:
        return 1
    return int(max(1, min(20, n_heldout // 40, max(1, n_train // 10))))
