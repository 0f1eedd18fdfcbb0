"""knn backend "faiss": approximate indexes with measured recall above stated floors; the persistent index, its
fingerprint check and corrupt files. The exact IndexFlatL2 (certified, streamed) runs the cases every knn backend
shares, in tests/ops/test_knn.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffgen_fast import DataFormatError, InputError, StaleIndexError, TrainingSet, knn

faiss = pytest.importorskip("faiss")
from diffgen_fast.ops.knn.faiss import FaissIndex, factory_string, tie_aware_recall  # noqa: E402

# Recall floors on the clustered data below (k = 5; measured 1.0 / 1.0 / 0.8-0.9 when written)
RECALL_FLOOR = {"ivf": 0.95, "hnsw": 0.95, "ivfpq": 0.6}


def clustered(n, m, d, seed=0, clusters=40):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(clusters, d, generator=g) * 3
    y = c[torch.randint(0, clusters, (n,), generator=g)] + torch.randn(n, d, generator=g)
    x = c[torch.randint(0, clusters, (m,), generator=g)] + torch.randn(m, d, generator=g)
    return x, y


@pytest.mark.parametrize("kind", ["ivf", "hnsw", pytest.param("ivfpq", marks=pytest.mark.slow)])  # ivfpq: ~12 s
def test_approximate_recall_is_reported_and_above_floor(kind):
    x, y = clustered(20000, 300, 32, seed=2)
    d2, idx, info = knn(x, y, 5, index=kind, return_info=True)
    assert info["backend"] == "faiss" and info["exact"] is False
    assert info["recall_sample"] == 256 and info["recall_at_k"] >= RECALL_FLOOR[kind], info
    # the distances of what was found are exact, and rows are ascending by (distance, index)
    ex = ((x[:, None, :].double() - y[idx].double()) ** 2).sum(-1)
    torch.testing.assert_close(d2.double(), ex, rtol=1e-6, atol=1e-9)
    assert bool((d2[:, 1:] >= d2[:, :-1]).all())
    # the measured recall agrees with a direct count on all queries
    ref_d, _ = knn(x, y, 5, backend="cpu" if _has_native() else "torch")
    assert abs(tie_aware_recall(d2.double(), ref_d.double()) - info["recall_at_k"]) < 0.1


def _has_native():
    from diffgen_fast import _native

    return _native.available()


def test_factory_strings():
    assert factory_string("flat", 100, 8) == "Flat"
    assert factory_string("ivf", 10000, 8).startswith("IVF") and factory_string("ivf", 10000, 8).endswith(",Flat")
    assert factory_string("ivfpq", 10000, 64).endswith("PQ32x4fs")
    assert factory_string("hnsw", 10, 8) == "HNSW32,Flat"
    assert factory_string("IVF16,Flat", 10, 8) == "IVF16,Flat"
    with pytest.raises(InputError, match="ivfpq"):
        factory_string("ivfpq", 100, 8)
    x, y = clustered(500, 5, 8)
    d2, idx, info = knn(x, y, 3, index="IVF8,Flat", nprobe=8, return_info=True)
    assert info["factory"] == "IVF8,Flat" and info["nprobe"] == 8 and info["recall_at_k"] == 1.0  # all lists probed
    with pytest.raises(InputError, match="index"):
        knn(x, y, 3, index="NotAnIndex42")
    with pytest.raises(InputError, match="only the faiss backend"):
        knn(x, y, 3, backend="torch", index="ivf")


def test_persistent_index_roundtrip_stale_and_corrupt(tmp_path):
    x, y = clustered(3000, 40, 16, seed=5)
    np.save(tmp_path / "train.npy", y.numpy())
    ts = TrainingSet.open(tmp_path / "train.npy")
    for kind in ("flat", "ivf"):
        built = FaissIndex.build(ts, kind)
        path = built.save(tmp_path / f"{kind}.faiss")
        meta = json.loads((tmp_path / f"{kind}.faiss.json").read_text())
        assert meta["fingerprint"] == ts.fingerprint() and meta["n"] == 3000 and meta["d"] == 16
        loaded = FaissIndex.load(path, ts)
        d_a, i_a, _ = built.search(x, 4, ts)
        d_b, i_b, info = loaded.search(x, 4, ts)
        assert torch.equal(i_a, i_b) and torch.equal(d_a, d_b)
        d_p, i_p = knn(x, ts, 4, index=str(path))  # a saved index by path
        assert torch.equal(i_p, i_b)
    ref_d, ref_i = knn(x, ts, 4, backend="torch")
    assert torch.equal(FaissIndex.load(tmp_path / "flat.faiss", ts).search(x, 4, ts)[1], ref_i)
    # stale: one value of the training set changed
    y2 = y.clone()
    y2[17, 3] += 1e-3
    with pytest.raises(StaleIndexError, match="rebuild"):
        FaissIndex.load(tmp_path / "ivf.faiss", y2)
    with pytest.raises(StaleIndexError, match="changed"):
        knn(x, y2, 4, index=str(tmp_path / "ivf.faiss"))
    # corrupt: a flipped byte, a truncated file, a missing or foreign metadata file
    raw = bytearray((tmp_path / "ivf.faiss").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (tmp_path / "bad.faiss").write_bytes(bytes(raw))
    (tmp_path / "bad.faiss.json").write_text((tmp_path / "ivf.faiss.json").read_text())
    with pytest.raises(DataFormatError, match="corrupt"):
        FaissIndex.load(tmp_path / "bad.faiss", ts)
    (tmp_path / "short.faiss").write_bytes(bytes(raw[:100]))
    with pytest.raises(DataFormatError, match="metadata"):
        FaissIndex.load(tmp_path / "short.faiss")
    (tmp_path / "short.faiss.json").write_text('{"format": "something else"}')
    with pytest.raises(DataFormatError, match="not diffgen-fast index metadata"):
        FaissIndex.load(tmp_path / "short.faiss")
    (tmp_path / "short.faiss.json").write_text("{not json")
    with pytest.raises(DataFormatError, match="cannot read"):
        FaissIndex.load(tmp_path / "short.faiss")
    with pytest.raises(DataFormatError, match="no index file"):
        FaissIndex.load(tmp_path / "missing.faiss")


def test_search_argument_errors():
    x, y = clustered(300, 4, 8)
    idx = FaissIndex.build(y, "flat")
    with pytest.raises(InputError, match="train"):
        idx.search(x, 2)
    with pytest.raises(InputError, match="d = 8"):
        idx.search(torch.randn(2, 5), 2, y)
    with pytest.raises(InputError, match="k"):
        idx.search(x, 0, y)


def test_cli_index_build_info_and_stale(tmp_path):
    from click.testing import CliRunner

    from diffgen_fast.cli import main

    _, y = clustered(2000, 1, 8, seed=7)
    np.save(tmp_path / "t.npy", y.numpy())
    r = CliRunner().invoke(
        main,
        ["index", "build", "--train", str(tmp_path / "t.npy"), "--index", "ivf", "--out", str(tmp_path / "t.faiss")],
    )
    assert r.exit_code == 0, r.output
    assert "IVF" in r.output and (tmp_path / "t.faiss.json").exists()
    r = CliRunner().invoke(main, ["index", "info", str(tmp_path / "t.faiss"), "--train", str(tmp_path / "t.npy")])
    assert r.exit_code == 0 and "matches the training set: yes" in r.output, r.output
    y[0, 0] += 1
    np.save(tmp_path / "t2.npy", y.numpy())
    r = CliRunner().invoke(main, ["index", "info", str(tmp_path / "t.faiss"), "--train", str(tmp_path / "t2.npy")])
    assert r.exit_code == 2 and "rebuild" in r.output
    r = CliRunner().invoke(main, ["index", "build", "--train", str(tmp_path / "t.npy"), "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and ".faiss" in r.output
