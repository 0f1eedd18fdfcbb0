"""Memorization scoring at scale: planted copies, C_T, authenticity, streaming, checkpoints and resume, feature
spaces, the `score` CLI and its files."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from diffgen_fast import DataFormatError, InputError, InputTypeError, TrainingSet
from diffgen_fast.metrics.copying import authenticity, ct_statistic, mann_whitney_z
from diffgen_fast.metrics.scoring import score


def planted(seed=0, N=2000, d=24, n_copy=40, n_noisy=40, n_fresh=80, n_held=240):
    """Training set from a Gaussian mixture; samples = exact copies, noisy copies (sigma 0.01) and fresh draws;
    held-out = fresh draws of the same distribution."""
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(15, d)) * 2
    tot = N + n_fresh + n_held
    pts = (c[rng.integers(0, 15, tot)] + rng.normal(size=(tot, d))).astype(np.float32)
    train, fresh, held = pts[:N], pts[N : N + n_fresh], pts[N + n_fresh :]
    copies = train[rng.choice(N, n_copy, replace=False)]
    noisy = train[rng.choice(N, n_noisy, replace=False)] + 0.01 * rng.normal(size=(n_noisy, d)).astype(np.float32)
    samples = np.concatenate([copies, noisy, fresh]).astype(np.float32)
    return train, samples, held, n_copy + n_noisy


def test_planted_copies_found_clean_not():
    train, samples, held, n_planted = planted()
    r = score(samples, train, heldout=held, n_cells=4)  # 160 samples: 4 cells of about 40 (> 20 each)
    mem = r.per_sample["memorized"]
    assert mem[:n_planted].all() and not mem[n_planted:].any()
    assert r.fraction == pytest.approx(n_planted / len(samples))
    assert r.per_sample["inauthentic"][:n_planted].all()
    assert r.summary["C_T"]["C_T"] < -3  # strongly negative: copying
    assert not r.heldout["memorized"].any()
    assert r.summary["exact"] and r.summary["threshold"] == pytest.approx(1 / 3)
    assert r.summary["space"] == "pixel" and r.summary["distance"].startswith("L2")
    # exact copies: distance 0 and the right index
    d1 = r.per_sample["nn_dist"][:40, 0]
    assert (d1 == 0).all()


def test_ct_near_zero_for_heldout_real_data():
    train, _, held, _ = planted(seed=1, n_held=600)
    r = score(held[:300], train, heldout=held[300:], check_authenticity=False, n_cells=5)
    assert abs(r.summary["C_T"]["C_T"]) < 3
    assert r.summary["C_T"]["cells_used"] >= 2
    assert r.fraction < 0.05


def test_mann_whitney_z_matches_pair_count_and_ties():
    rng = np.random.default_rng(0)
    g = rng.integers(0, 5, 30).astype(float)
    h = rng.integers(0, 5, 40).astype(float)
    u = sum((a > b) + 0.5 * (a == b) for a in g for b in h)
    m, n = len(g), len(h)
    _, counts = np.unique(np.concatenate([g, h]), return_counts=True)
    var = m * n / 12 * ((m + n + 1) - (counts**3 - counts).sum() / ((m + n) * (m + n - 1)))
    assert mann_whitney_z(g, h) == pytest.approx((u - m * n / 2) / np.sqrt(var))
    assert mann_whitney_z(np.zeros(5), np.ones(5)) < -2
    assert np.isnan(mann_whitney_z([], [1.0]))
    ct = ct_statistic(np.zeros(20), np.zeros(20, int), np.ones(20), np.zeros(20, int), 2, min_cell=5)
    assert ct["cells_used"] == 1 and ct["C_T"] < -4
    with pytest.raises(InputError, match="heldout"):
        ct_statistic(np.zeros(0), np.zeros(0, int), np.ones(3), np.zeros(3, int), 1)


def test_authenticity_rule():
    assert authenticity([0.0, 1.0, 2.0], [0.5, 1.0, 1.0]).tolist() == [True, False, False]


def test_streaming_tiny_chunks_equals_in_memory(tmp_path):
    train, samples, held, _ = planted(seed=2, N=600)
    np.save(tmp_path / "t.npy", train)
    ref = score(samples, train, heldout=held, n_cells=4)
    got = score(samples, TrainingSet.open(tmp_path / "t.npy"), heldout=held, chunk_size=37, n_cells=4)
    for key in ("nn_index", "nn_dist", "ratio", "memorized", "inauthentic", "cell", "cell_nn_dist"):
        np.testing.assert_array_equal(got.per_sample[key], ref.per_sample[key])
    assert got.summary["C_T"]["C_T"] == pytest.approx(ref.summary["C_T"]["C_T"])
    assert got.summary["C_T"]["cells_used"] >= 1
    assert got.summary["passes"]["neighbours"]["chunks"] == -(-600 // 37)


def test_interrupted_run_resumes_without_redoing_chunks(tmp_path):
    train, samples, held, _ = planted(seed=3, N=500)
    ck = tmp_path / "ck"
    ref = score(samples, train, heldout=held, n_cells=4)

    class Stop(Exception):
        pass

    def stop_after_4(chunks, rows):
        if chunks == 4:
            raise Stop

    with pytest.raises(Stop):
        score(samples, train, heldout=held, chunk_size=50, checkpoint_dir=ck, on_chunk=stop_after_4, n_cells=4)
    assert (ck / "pass-neighbours.npz").exists()
    seen = []
    got = score(
        samples, train, heldout=held, chunk_size=50, checkpoint_dir=ck, on_chunk=lambda c, r: seen.append(r), n_cells=4
    )
    p = got.summary["passes"]["neighbours"]
    assert p["resumed_from_row"] == 200 and p["chunks_skipped"] == 4 and p["chunks"] == 6
    assert seen[0] == 250
    for key in ("nn_index", "nn_dist", "memorized", "inauthentic", "cell", "cell_nn_dist"):
        np.testing.assert_array_equal(got.per_sample[key], ref.per_sample[key])
    np.testing.assert_array_equal(got.heldout["cell_nn_dist"], ref.heldout["cell_nn_dist"])
    assert got.summary["C_T"]["C_T"] == ref.summary["C_T"]["C_T"]
    assert not list(ck.glob("pass-*.npz"))  # removed once the results exist
    # a checkpoint of other inputs is not used
    with pytest.raises(Stop):
        score(samples, train, chunk_size=50, checkpoint_dir=ck, on_chunk=stop_after_4)
    got2 = score(samples[:-1], train, chunk_size=50, checkpoint_dir=ck)
    assert got2.summary["passes"]["neighbours"]["resumed_from_row"] == 0
    # a corrupt checkpoint is refused clearly
    (ck / "pass-neighbours.npz").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(DataFormatError, match="checkpoint"):
        score(samples, train, chunk_size=50, checkpoint_dir=ck)


def test_feature_spaces_callable_precomputed_and_cosine(tmp_path):
    train, samples, held, n_planted = planted(seed=4, N=800)
    W = torch.randn(24, 8, generator=torch.Generator().manual_seed(0))
    embed = lambda b: b.reshape(len(b), -1) @ W  # noqa: E731
    a = score(samples, train, heldout=held, embed=embed)
    np.save(tmp_path / "ft.npy", (torch.from_numpy(train) @ W).numpy())
    np.save(tmp_path / "fs.npy", (torch.from_numpy(samples) @ W).numpy())
    np.save(tmp_path / "fh.npy", (torch.from_numpy(held) @ W).numpy())
    b = score(
        samples,
        train,
        heldout=held,
        train_features=tmp_path / "ft.npy",
        sample_features=tmp_path / "fs.npy",
        heldout_features=tmp_path / "fh.npy",
    )
    np.testing.assert_array_equal(a.per_sample["nn_index"], b.per_sample["nn_index"])
    np.testing.assert_allclose(a.per_sample["nn_dist"], b.per_sample["nn_dist"], rtol=1e-5, atol=1e-5)
    assert a.summary["space"].startswith("embedding") and b.summary["space"] == "precomputed features"
    # cosine: scaled copies are copies in angle, not in L2
    scaled = 3.0 * train[:30]
    c_l2 = score(scaled, train, check_authenticity=False)
    c_cos = score(scaled, train, metric="cosine", check_authenticity=False)
    assert c_l2.fraction < 0.5 and c_cos.fraction == 1.0
    assert "cos" in c_cos.summary["distance"]


def test_bad_arguments():
    train, samples, held, _ = planted(seed=5, N=100)
    with pytest.raises(InputError, match="metric"):
        score(samples, train, metric="manhattan")
    with pytest.raises(InputError, match="k"):
        score(samples, train, k=1)
    with pytest.raises(InputError, match="threshold"):
        score(samples, train, threshold=0)
    with pytest.raises(InputTypeError, match="embed"):
        score(samples, train, embed=3)
    with pytest.raises(InputError, match="samples"):
        score(samples[:, :5], train)
    with pytest.raises(InputError, match="train_features"):
        score(samples, train, train_features=np.zeros((100, 3), np.float32))
    with pytest.raises(InputError, match="embed"):
        score(samples, train, embed=lambda b: b.reshape(len(b), -1)[:1])
    with pytest.raises(InputError, match="cosine"):
        score(np.zeros((2, 24), np.float32), train, metric="cosine")


def test_approximate_index_reports_recall():
    pytest.importorskip("faiss")
    train, samples, held, n_planted = planted(seed=6, N=3000)
    r = score(samples, train, index="hnsw")
    assert r.summary["exact"] is False and r.summary["index"]["recall_at_k"] > 0.9
    assert r.per_sample["memorized"][:n_planted].all()


def _run_cli(args, env=None):
    e = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "diffgen_fast", *args], capture_output=True, text=True, env=e, timeout=300
    )


def test_cli_score_writes_files_and_resumes_after_a_kill(tmp_path):
    train, samples, held, n_planted = planted(seed=7, N=1200)
    for name, a in (("train", train), ("samples", samples), ("held", held)):
        np.save(tmp_path / f"{name}.npy", a)
    base = [
        "score",
        "--train",
        str(tmp_path / "train.npy"),
        "--samples",
        str(tmp_path / "samples.npy"),
        "--heldout",
        str(tmp_path / "held.npy"),
        "--chunk-size",
        "100",
        "--cells",
        "4",
        "--no-progress",
    ]
    ref = _run_cli([*base, "--out", str(tmp_path / "ref")])
    assert ref.returncode == 0, ref.stderr
    assert "50.0%" in ref.stdout and "C_T" in ref.stdout
    # killed after 3 chunks (the testing hook exits as a kill would, without cleanup)
    out = tmp_path / "run"
    killed = _run_cli([*base, "--out", str(out)], env={"DIFFGEN_FAST_STOP_AFTER_CHUNKS": "3"})
    assert killed.returncode == 75
    assert (out / ".checkpoints" / "pass-neighbours.npz").exists() and not (out / "summary.json").exists()
    again = _run_cli([*base, "--out", str(out)])
    assert again.returncode == 0, again.stderr
    assert "resumed from a checkpoint at training row 300" in again.stdout
    assert (out / "per_sample.csv").read_text() == (tmp_path / "ref" / "per_sample.csv").read_text()
    for f in (
        "report.md",
        "summary.json",
        "per_sample.npz",
        "nn_grid.png",
        "ratio_hist.png",
        "nn_dist_hist.png",
        "train_vs_heldout.png",
    ):
        assert (out / f).stat().st_size > 0, f
    assert not (out / ".checkpoints").exists()
    s = json.loads((out / "summary.json").read_text())
    assert s["fraction_memorized"] == 0.5 and s["k"] == 2 and s["space"] == "pixel" and s["C_T"]["C_T"] < -3
    rows = list(csv.DictReader(open(out / "per_sample.csv")))
    assert len(rows) == len(samples) and {"nn1", "nn2", "d1", "d2", "ratio", "memorized", "inauthentic"} <= set(rows[0])
    with np.load(out / "per_sample.npz", allow_pickle=False) as z:
        assert z["nn_index"].shape == (len(samples), 2) and "heldout_nn_dist" in z.files
    assert "![nn_grid.png](nn_grid.png)" in (out / "report.md").read_text()


def test_cli_score_bad_input(tmp_path):
    (tmp_path / "bad.npy").write_bytes(b"\x93NUMPY garbage")
    train, samples, _, _ = planted(seed=8, N=50)
    np.save(tmp_path / "s.npy", samples)
    r = _run_cli(
        [
            "score",
            "--train",
            str(tmp_path / "bad.npy"),
            "--samples",
            str(tmp_path / "s.npy"),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert r.returncode == 2 and "error: train" in r.stderr


def test_cli_score_on_images_zip_and_folder(tmp_path):
    """EDM zip as the training set, a folder of PNGs as the samples (half copies): decoded through the cache."""
    import zipfile

    from PIL import Image

    rng = np.random.default_rng(9)
    imgs = rng.integers(0, 256, size=(60, 6, 6, 3), dtype=np.uint8)
    with zipfile.ZipFile(tmp_path / "train.zip", "w") as zf:
        for i, a in enumerate(imgs):
            buf = __import__("io").BytesIO()
            Image.fromarray(a).save(buf, format="PNG")
            zf.writestr(f"00000/img{i:08d}.png", buf.getvalue())
    (tmp_path / "samples").mkdir()
    fresh = rng.integers(0, 256, size=(6, 6, 6, 3), dtype=np.uint8)
    for i, a in enumerate(np.concatenate([imgs[:6], fresh])):
        Image.fromarray(a).save(tmp_path / "samples" / f"{i:03d}.png")
    r = _run_cli(
        [
            "score",
            "--train",
            str(tmp_path / "train.zip"),
            "--samples",
            str(tmp_path / "samples"),
            "--out",
            str(tmp_path / "o"),
            "--no-progress",
        ]
    )
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert s["fraction_memorized"] == 0.5 and s["value_range"] == [-1.0, 1.0]
    assert "cached as" in s["train"]["source"] and list((tmp_path / "o" / ".cache").glob("*.npy"))
