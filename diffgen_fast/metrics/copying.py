"""Data-copying statistics of docs/science.md section 5 beyond the ratio test: Meehan et al.'s C_T and Alaa et al.'s
authenticity.

`c_t` is C_T as Meehan, Chaudhuri and Dasgupta's released code computes it (distances to the nearest training point
within each cell, their z with the continuity term, cells kept by their share of the samples); `ct_from_distances`
is its second half, used by diffgen_fast.metrics.scoring, which finds the distances over a streamed training set.
`ct_statistic` / `mann_whitney_z` are this package's earlier C_T (nearest training point overall, tie-corrected z,
cells with >= min_cell points of each kind), kept for comparison.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from diffgen_fast.errors import InputError, InputTypeError
from diffgen_fast.ops.softmax_denoise.reference import sqdist_diff64


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
    """This package's earlier C_T (not the reference; see `c_t`): distances to the nearest training point overall.

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


# -- C_T as Meehan, Chaudhuri, Dasgupta's released code computes it ---------------------------------------------------

CT_VARIANTS = ("reference", "global_nn")
CT_DEFINITION = {
    "reference": "Meehan et al. 2020 as their code computes it: per k-means cell of the training set, distances of "
    "samples and held-out points to the nearest training point in the same cell; Mann-Whitney U of sample against "
    "held-out distances (pairs q > p, ties 1/2), z = (U - (nm/2 - 0.5)) / sqrt(nm(n+m+1)/12); cells with sample "
    "share > tau; C_T = held-out-share-weighted mean of their z",
    "global_nn": "variant 'global_nn': as the reference C_T but with distances to the nearest training point "
    "overall (any cell); differs for points whose nearest training point lies in another cell",
}
CT_CELLS_DEFAULT = 50  # the authors' experiments
CT_MIN_SAMPLES = 20  # tau = 20 / m: a kept cell holds more than 20 generated samples


def meehan_u(gen: np.ndarray, ref: np.ndarray) -> float:
    """Mann-Whitney U of `gen` against `ref`: the number of pairs (g, r) with g > r, ties counted 1/2."""
    gen = np.asarray(gen, dtype=np.float64).ravel()
    ref = np.sort(np.asarray(ref, dtype=np.float64).ravel())
    lo = np.searchsorted(ref, gen, side="left")
    hi = np.searchsorted(ref, gen, side="right")
    return float(lo.sum() + 0.5 * (hi - lo).sum())


def meehan_z(gen: np.ndarray, ref: np.ndarray) -> float:
    """Z_U of Meehan et al.'s code: (U - (nm/2 - 0.5)) / sqrt(nm(n+m+1)/12), U = meehan_u(gen, ref), n = len(gen),
    m = len(ref); no tie correction of the variance. Negative: the generated distances are smaller (copying).
    NaN when either side is empty."""
    n, m = np.size(gen), np.size(ref)
    if n == 0 or m == 0:
        return float("nan")
    mean = n * m / 2.0 - 0.5
    sd = np.sqrt(n * m * (n + m + 1) / 12.0)
    return float((meehan_u(gen, ref) - mean) / sd)


def _flat64(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    try:
        a = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise InputTypeError(f"{name}: expected an array of points [n, ...], got {type(x).__name__}") from e
    if a.ndim < 1:
        raise InputError(f"{name}: expected an array of points [n, ...], got a scalar")
    a = a.reshape(a.shape[0], int(np.prod(a.shape[1:])))
    if not np.isfinite(a).all():
        raise InputError(f"{name}: holds NaN or infinite values")
    return a


def _labels(x, n: int, name: str) -> np.ndarray:
    a = np.asarray(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x)
    if a.ndim != 1 or a.shape[0] != n:
        raise InputError(f"{name}: expected {n} integer cell labels, got shape {list(a.shape)}")
    if a.size and (a.dtype.kind not in "iu" or a.min() < 0):
        raise InputError(f"{name}: expected non-negative integer cell labels, got dtype {a.dtype}")
    return a.astype(np.int64)


def assign_cells(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """The nearest centroid of each row (k-means' predict): float64 squared distances computed as differences, the
    first centroid on ties. x [n, e], centroids [C, e]; returns int64 [n]. The same rows give the same cells in any
    batch."""
    if x.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64)
    d2 = sqdist_diff64(x.to(torch.float64), centroids.to(torch.float64))
    return d2.argmin(dim=1).cpu()


def kmeans_centroids(x: np.ndarray, n_cells: int, seed: int, n_init: int = 3) -> np.ndarray:
    """k-means (scikit-learn) centroids of the rows of x [n, e] (float64); n_cells is capped at n."""
    from sklearn.cluster import KMeans

    k = max(1, min(int(n_cells), x.shape[0]))
    return KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(np.asarray(x, np.float64)).cluster_centers_


def cell_nn_dist(train: np.ndarray, train_cells: np.ndarray, q: np.ndarray, q_cells: np.ndarray) -> np.ndarray:
    """L2 distance of each query to the nearest training point with the query's cell label (inf when the cell holds
    no training point)."""
    out = np.full(q.shape[0], np.inf)
    for c in np.unique(q_cells):
        qi, ti = np.nonzero(q_cells == c)[0], np.nonzero(train_cells == c)[0]
        if ti.size == 0:
            continue
        d2 = sqdist_diff64(torch.from_numpy(q[qi]), torch.from_numpy(train[ti]))
        out[qi] = d2.min(dim=1).values.clamp(min=0).sqrt().numpy()
    return out


def global_nn_dist(train: np.ndarray, q: np.ndarray) -> np.ndarray:
    """L2 distance of each query to its nearest training point."""
    if q.shape[0] == 0:
        return np.zeros(0)
    return sqdist_diff64(torch.from_numpy(q), torch.from_numpy(train)).min(dim=1).values.clamp(min=0).sqrt().numpy()


def ct_from_distances(
    sample_dist,
    sample_cells,
    heldout_dist,
    heldout_cells,
    train_counts,
    *,
    tau: Optional[float] = None,
    variant: str = "reference",
) -> dict:
    """C_T from per-point distances and cell labels (the part of `c_t` after the nearest-neighbour search).

    train_counts[c]: training points in cell c (len = number of cells). A cell's z is NaN when it holds no training
    point, no held-out point or no sample; a cell is kept when its sample share exceeds tau and its z is defined
    (a cell over tau without a z is named in "skipped"). C_T = sum_kept P_n z / sum_kept P_n, NaN when none is kept.
    """
    if variant not in CT_VARIANTS:
        raise InputError(f"variant: expected one of {', '.join(CT_VARIANTS)}, got {variant!r}")
    sd, hd = np.asarray(sample_dist, np.float64), np.asarray(heldout_dist, np.float64)
    sc, hc = np.asarray(sample_cells, np.int64), np.asarray(heldout_cells, np.int64)
    counts = np.asarray(train_counts, np.int64)
    m, h = sd.size, hd.size
    if m == 0 or h == 0:
        raise InputError("heldout: C_T needs at least one generated and one held-out sample")
    note = None
    if tau is None:
        tau = CT_MIN_SAMPLES / m  # may be >= 1 for few samples: then no cell is kept and C_T is NaN, said in "note"
        if tau >= 1:
            note = (f"too few generated samples ({m}) for the default tau = {CT_MIN_SAMPLES} / m: no cell can hold "
                    f"more than {CT_MIN_SAMPLES} of them, so C_T is undefined (pass tau= to use fewer)")  # fmt: skip
    elif isinstance(tau, bool) or not isinstance(tau, (int, float, np.floating)) or not 0 <= tau < 1:
        raise InputError(f"tau: expected a number in [0, 1) (a cell's minimum share of the samples), got {tau!r}")
    n_cells = int(max(counts.size, sc.max() + 1, hc.max() + 1))
    counts = np.concatenate([counts, np.zeros(n_cells - counts.size, np.int64)])
    rows, skipped, num, den = [], [], 0.0, 0.0
    for c in range(n_cells):
        g, r = sd[sc == c], hd[hc == c]
        share, pn = g.size / m, r.size / h
        z = meehan_z(g, r) if counts[c] > 0 else float("nan")
        kept = bool(share > tau and np.isfinite(z))
        if share > tau and not kept:
            skipped.append(c)
        if kept:
            num += pn * z
            den += pn
        rows.append(
            {
                "cell": c,
                "n_train": int(counts[c]),
                "n_heldout": int(r.size),
                "n_samples": int(g.size),
                "share": share,
                "heldout_share": pn,
                "z": z,
                "kept": kept,
            }
        )
    return {
        "C_T": num / den if den > 0 else float("nan"),
        "variant": variant,
        "definition": CT_DEFINITION[variant],
        "tau": float(tau),
        "n_cells": n_cells,
        "cells_used": int(sum(r["kept"] for r in rows)),
        "skipped": skipped,
        "cells": rows,
        **({"note": note} if note else {}),
    }


def c_t(
    train,
    heldout,
    samples,
    *,
    cells: Optional[tuple] = None,
    n_cells: Optional[int] = None,
    tau: Optional[float] = None,
    seed: int = 0,
    variant: str = "reference",
) -> dict:
    """Meehan, Chaudhuri, Dasgupta (2020) data-copying statistic C_T, as their released code computes it.

    Cells: ``cells=(train_cells, heldout_cells, sample_cells)`` (non-negative integer labels, one per point), or
    k-means with ``n_cells`` (default 50) centroids fitted on the training set (scikit-learn, n_init 3,
    random_state ``seed``) and every point given its nearest centroid. In each cell pi: L(P) = L2 distances of the
    held-out points in pi to their nearest training point in pi, L(Q) = the same for the samples; U = pairs
    (q, p) with q > p (ties 1/2); z = (U - (nm/2 - 0.5)) / sqrt(nm(n+m+1)/12). Cells whose share of the samples
    exceeds ``tau`` (default 20 / number of samples) are kept; C_T = sum_kept P_n(pi) z(pi) / sum_kept P_n(pi),
    P_n the held-out share. Strongly negative: copying; about 0: as far from the training set as fresh data;
    positive: underfitting.

    A cell without training points, held-out points or samples has no z and is not kept (its number is listed in
    "skipped" when its sample share exceeds tau); C_T is NaN when no cell is kept.

    ``variant="global_nn"``: distances to the nearest training point overall instead of within the cell (this
    package's C_T before it followed the reference code); everything else is the same.

    Returns {"C_T", "variant", "definition", "tau", "n_cells", "cells_used", "skipped", "cells": [{"cell",
    "n_train", "n_heldout", "n_samples", "share" (of the samples), "heldout_share", "z", "kept"}]}.
    """
    if variant not in CT_VARIANTS:
        raise InputError(f"variant: expected one of {', '.join(CT_VARIANTS)}, got {variant!r}")
    y, p, q = _flat64(train, "train"), _flat64(heldout, "heldout"), _flat64(samples, "samples")
    if y.shape[0] == 0:
        raise InputError("train: C_T needs at least one training point")
    if p.shape[1] != y.shape[1] or q.shape[1] != y.shape[1]:
        raise InputError(
            f"samples: items of {q.shape[1]} values and held-out items of {p.shape[1]} values do not match training "
            f"items of {y.shape[1]} values"
        )
    if cells is not None:
        if n_cells is not None:
            raise InputError("n_cells: give either cells (a partition) or n_cells (k-means), not both")
        if not isinstance(cells, (tuple, list)) or len(cells) != 3:
            raise InputError("cells: expected (train_cells, heldout_cells, sample_cells)")
        tc = _labels(cells[0], y.shape[0], "cells[0] (train)")
        hc = _labels(cells[1], p.shape[0], "cells[1] (heldout)")
        sc = _labels(cells[2], q.shape[0], "cells[2] (samples)")
    else:
        k = CT_CELLS_DEFAULT if n_cells is None else n_cells
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise InputError(f"n_cells: expected an int >= 1, got {n_cells!r}")
        cent = torch.from_numpy(kmeans_centroids(y, k, seed))
        tc, hc, sc = (assign_cells(torch.from_numpy(a), cent).numpy() for a in (y, p, q))
    if variant == "reference":
        hd, sd = cell_nn_dist(y, tc, p, hc), cell_nn_dist(y, tc, q, sc)
    else:
        hd, sd = global_nn_dist(y, p), global_nn_dist(y, q)
    n = int(max(tc.max(initial=-1), hc.max(initial=-1), sc.max(initial=-1)) + 1)
    return ct_from_distances(sd, sc, hd, hc, np.bincount(tc, minlength=n), tau=tau, variant=variant)
