"""C_T as Meehan, Chaudhuri and Dasgupta's released code computes it, checked against an independent implementation
written here with plain loops: per cell, brute-force nearest training point *of that cell*, Mann-Whitney U by
counting pairs (ties 1/2), z = (U - (nm/2 - 0.5)) / sqrt(nm(n+m+1)/12), cells kept when their share of the samples
exceeds tau, C_T = held-out-share-weighted mean of the kept cells' z."""

from __future__ import annotations

import math

import numpy as np
import pytest

from diffgen_fast.errors import InputError
from diffgen_fast.metrics.copying import c_t, meehan_z
from diffgen_fast.metrics.scoring import score


def brute(train, tc, held, hc, samp, sc, tau=None, within_cell=True):
    """Independent C_T: returns (C_T, {cell: z}) over the cells that have a z, and the kept cells."""
    m, h = len(samp), len(held)
    tau = 20 / m if tau is None else tau
    k = max(list(tc) + list(hc) + list(sc)) + 1

    def nn(x, c):
        pool = [train[i] for i in range(len(train)) if (tc[i] == c or not within_cell)]
        if not pool:
            return None
        return min(math.sqrt(sum((float(a) - float(b)) ** 2 for a, b in zip(x, t))) for t in pool)

    zs, kept, num, den = {}, [], 0.0, 0.0
    for c in range(k):
        if not any(tc[i] == c for i in range(len(train))):
            continue
        P = [nn(held[i], c) for i in range(h) if hc[i] == c]
        Q = [nn(samp[i], c) for i in range(m) if sc[i] == c]
        if not P or not Q:
            continue
        U = 0.0
        for q in Q:
            for p in P:
                U += 1.0 if q > p else (0.5 if q == p else 0.0)
        n_, m_ = len(Q), len(P)
        z = (U - (n_ * m_ / 2 - 0.5)) / math.sqrt(n_ * m_ * (n_ + m_ + 1) / 12)
        zs[c] = z
        if len(Q) / m > tau:
            kept.append(c)
            num += len(P) / h * z
            den += len(P) / h
    return (num / den if den else float("nan")), zs, kept


def _data(seed=0, N=120, H=90, M=100, d=3, cells=4, integer=False):
    rng = np.random.default_rng(seed)
    draw = (
        (lambda n: rng.integers(-2, 3, size=(n, d)).astype(np.float64))
        if integer
        else (lambda n: rng.normal(size=(n, d)))
    )
    y, p, q = draw(N), draw(H), draw(M)
    # labels unrelated to geometry: the nearest training point overall is often in another cell
    return y, p, q, rng.integers(0, cells, N), rng.integers(0, cells, H), rng.integers(0, cells, M)


def _check(out, ref):
    ct, zs, kept = ref
    assert out["C_T"] == pytest.approx(ct, abs=1e-9, rel=0)
    assert [r["cell"] for r in out["cells"] if r["kept"]] == kept
    for r in out["cells"]:
        if r["cell"] in zs:
            assert r["z"] == pytest.approx(zs[r["cell"]], abs=1e-9, rel=0)
        else:
            assert math.isnan(r["z"]) and not r["kept"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_given_cells_match_brute_force(seed):
    y, p, q, tc, hc, sc = _data(seed)
    out = c_t(y, p, q, cells=(tc, hc, sc))
    _check(out, brute(y, tc, p, hc, q, sc))
    assert out["variant"] == "reference" and out["tau"] == pytest.approx(20 / len(q))
    r0 = out["cells"][0]
    assert (
        r0["n_train"] == (tc == 0).sum() and r0["n_heldout"] == (hc == 0).sum() and r0["n_samples"] == (sc == 0).sum()
    )
    assert r0["share"] == pytest.approx((sc == 0).mean())
    # the global-nn variant is a different statistic here, and matches its own brute force
    g = c_t(y, p, q, cells=(tc, hc, sc), variant="global_nn")
    _check(g, brute(y, tc, p, hc, q, sc, within_cell=False))
    assert abs(g["C_T"] - out["C_T"]) > 1e-6


def test_ties_match_pair_counting():
    y, p, q, tc, hc, sc = _data(3, integer=True, cells=3)  # integer grid points: many equal distances
    out = c_t(y, p, q, cells=(tc, hc, sc))
    _check(out, brute(y, tc, p, hc, q, sc))
    # exact copies tie with held-out copies at distance 0
    q2 = np.concatenate([y[:40], p[:40]])
    sc2 = np.concatenate([tc[:40], hc[:40]])
    _check(c_t(y, p, q2, cells=(tc, hc, sc2)), brute(y, tc, p, hc, q2, sc2))


def test_cell_without_training_points_and_empty_cells():
    y, p, q, tc, hc, sc = _data(4, cells=3)
    # cell 5: samples and held-out points but no training point; cells 3 and 4: empty
    sc = sc.copy()
    hc = hc.copy()
    sc[:30], hc[:10] = 5, 5
    out = c_t(y, p, q, cells=(tc, hc, sc))
    _check(out, brute(y, tc, p, hc, q, sc))
    rows = {r["cell"]: r for r in out["cells"]}
    assert out["n_cells"] == 6 and rows[5]["n_train"] == 0 and rows[5]["n_samples"] == 30
    assert not rows[5]["kept"] and math.isnan(rows[5]["z"]) and out["skipped"] == [5]
    for c in (3, 4):
        assert rows[c]["n_train"] == rows[c]["n_heldout"] == rows[c]["n_samples"] == 0 and not rows[c]["kept"]
    # a kept-sized cell without held-out points has no z either
    hc2 = np.where(hc == 1, 0, hc)
    out2 = c_t(y, p, q, cells=(tc, hc2, sc))
    _check(out2, brute(y, tc, p, hc2, q, sc))
    assert 1 in out2["skipped"]


def test_tau_filtering():
    rng = np.random.default_rng(5)
    y, p = rng.normal(size=(60, 2)), rng.normal(size=(60, 2))
    q = rng.normal(size=(61, 2))
    tc, hc = np.arange(60) % 3, np.arange(60) % 3
    sc = np.array([0] * 20 + [1] * 21 + [2] * 20)  # default tau = 20 / 61: a cell needs more than 20 samples
    out = c_t(y, p, q, cells=(tc, hc, sc))
    assert [r["kept"] for r in out["cells"]] == [False, True, False]
    _check(out, brute(y, tc, p, hc, q, sc))
    assert out["C_T"] == pytest.approx(out["cells"][1]["z"], abs=1e-12)
    loose = c_t(y, p, q, cells=(tc, hc, sc), tau=0.0)
    assert all(r["kept"] for r in loose["cells"])
    _check(loose, brute(y, tc, p, hc, q, sc, tau=0.0))
    none = c_t(y, p, q, cells=(tc, hc, sc), tau=0.5)
    assert math.isnan(none["C_T"]) and none["cells_used"] == 0


def test_kmeans_cells_fitted_on_train_and_copying_sign():
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(6)
    y = rng.normal(size=(400, 4))
    p = rng.normal(size=(200, 4))
    q = np.concatenate([y[:150], rng.normal(size=(50, 4))])
    out = c_t(y, p, q, n_cells=3, seed=0)
    km = KMeans(n_clusters=3, n_init=3, random_state=0).fit(y)
    tc, hc, sc = km.predict(y), km.predict(p), km.predict(q)
    _check(out, brute(y, tc, p, hc, q, sc))
    assert out["C_T"] < -5  # copying
    fresh = c_t(y, p, rng.normal(size=(200, 4)), n_cells=3)
    assert abs(fresh["C_T"]) < 3


def test_meehan_z_convention():
    # n generated, m held-out; mean nm/2 - 0.5, variance nm(n+m+1)/12, no tie correction
    g, r = np.array([0.0, 1.0, 2.0]), np.array([1.0, 3.0])
    U = 0 + 0.5 + 1 + 0 + 0 + 0  # pairs q > p, ties 1/2
    assert meehan_z(g, r) == pytest.approx((U - (6 / 2 - 0.5)) / math.sqrt(6 * 6 / 12))
    assert meehan_z(np.zeros(5), np.ones(5)) < -2 and math.isnan(meehan_z([], [1.0]))


def test_bad_arguments():
    y, p, q, tc, hc, sc = _data(7)
    with pytest.raises(InputError, match="cells"):
        c_t(y, p, q, cells=(tc, hc))
    with pytest.raises(InputError, match="heldout"):
        c_t(y, p, q, cells=(tc, hc[:-1], sc))
    with pytest.raises(InputError, match="non-negative"):
        c_t(y, p, q, cells=(tc - 1, hc, sc))
    with pytest.raises(InputError, match="n_cells"):
        c_t(y, p, q, cells=(tc, hc, sc), n_cells=3)
    with pytest.raises(InputError, match="variant"):
        c_t(y, p, q, variant="nope")
    with pytest.raises(InputError, match="tau"):
        c_t(y, p, q, cells=(tc, hc, sc), tau=1.5)


@pytest.mark.parametrize("chunk", [None, 23])
def test_score_streams_the_reference_ct(chunk):
    """score's streamed per-cell search (training chunks assigned to cells as they pass) equals c_t in memory."""
    rng = np.random.default_rng(8)
    y = rng.normal(size=(300, 6)).astype(np.float32)
    p = rng.normal(size=(150, 6)).astype(np.float32)
    q = np.concatenate([y[:60], rng.normal(size=(90, 6)).astype(np.float32)])
    r = score(q, y, heldout=p, n_cells=3, chunk_size=chunk, check_authenticity=False)
    ref = c_t(y, p, q, n_cells=3)
    ct = r.summary["C_T"]
    assert ct["variant"] == "reference" and ct["C_T"] == pytest.approx(ref["C_T"], abs=1e-9)
    assert [c["z"] for c in ct["cells"]] == pytest.approx([c["z"] for c in ref["cells"]], abs=1e-9)
    assert [c["n_train"] for c in ct["cells"]] == [c["n_train"] for c in ref["cells"]]
    assert "nearest training point in the same cell" in ct["test"]
    g = score(q, y, heldout=p, n_cells=3, chunk_size=chunk, check_authenticity=False, ct_variant="global_nn")
    assert g.summary["C_T"]["C_T"] == pytest.approx(c_t(y, p, q, n_cells=3, variant="global_nn")["C_T"], abs=1e-9)
    # the per-sample in-cell distance is never below the overall nearest distance
    assert (r.per_sample["cell_nn_dist"] >= r.per_sample["nn_dist"][:, 0] - 1e-6).all()


def test_default_tau_with_few_samples_gives_nan_with_a_note():
    import numpy as np

    from diffgen_fast.metrics.copying import ct_from_distances

    r = ct_from_distances(np.ones(10), np.zeros(10, np.int64), np.ones(8), np.zeros(8, np.int64), np.array([5]))
    assert np.isnan(r["C_T"]) and r["cells_used"] == 0 and "too few generated samples (10)" in r["note"]
