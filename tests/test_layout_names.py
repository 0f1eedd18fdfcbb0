"""No silent wrong answers in `score`: item layouts (channels-last), value ranges, uint8 sample archives (ADM .npz,
.npy, PNG folders) and the source names of samples and their nearest training items."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from diffgen_fast import InputError, TrainingSet
from diffgen_fast.cli import main
from diffgen_fast.layout import RangeMismatchWarning, range_mismatch
from diffgen_fast.metrics.memorization import memorization
from diffgen_fast.metrics.scoring import score
from diffgen_fast.ops import kde_log_density, knn, softmax_denoise


def _images(n=40, c=3, h=6, w=5, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, size=(n, c, h, w)).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------------
# item shapes in the ops


@pytest.mark.parametrize(
    "op",
    [
        lambda x, t: softmax_denoise(x, t, 0.5),
        lambda x, t: kde_log_density(x, t, 0.5),
        lambda x, t: knn(x, t, 2),
        lambda x, t: memorization(x, t),
    ],
)
def test_ops_refuse_channels_last_queries_and_say_how_to_permute(op):
    train = _images()
    x = train[:4].transpose(0, 2, 3, 1).copy()  # [M, H, W, C] against [C, H, W]
    with pytest.raises(InputError) as e:
        op(x, train)
    msg = str(e.value)
    assert "(6, 5, 3)" in msg and "(3, 6, 5)" in msg and "channels-last" in msg and "permute(0, 3, 1, 2)" in msg
    # the reverse: channels-first queries against channels-last training items
    with pytest.raises(InputError, match=r"channels-first.*permute\(0, 2, 3, 1\)"):
        op(train[:4], train.transpose(0, 2, 3, 1).copy())
    # another order of the same d values, not a known layout: refused, both shapes named
    with pytest.raises(InputError, match=r"\(5, 6, 3\).*\(3, 6, 5\)"):
        op(train[:4].reshape(4, 5, 6, 3), train)
    # flat queries against any item shape, any queries against a flat training set, size-1 dims: accepted
    op(train[:4].reshape(4, -1), train)
    op(train[:4], train.reshape(len(train), -1))
    gray = train[:, :1]
    op(gray[:4, 0], gray)


# ----------------------------------------------------------------------------------------------------------------------
# score(): layout conversion, value ranges, names


def test_score_converts_channels_last_samples_and_says_so():
    train = _images(seed=1)
    samples = train[:10].transpose(0, 2, 3, 1).copy()
    r = score(samples, train, check_authenticity=False)
    assert r.per_sample["memorized"].all()  # the old code: 0% memorized, no word
    conv = r.summary["conversions"]["samples"]
    assert len(conv) == 1 and "channels-last" in conv[0] and "[6, 5, 3]" in conv[0] and "[3, 6, 5]" in conv[0]
    assert r.extra["samples"].shape == (3, 6, 5)


def test_range_rule():
    assert range_mismatch((0, 1), (-1, 1)) and range_mismatch((0, 255), (-1, 1)) and range_mismatch((-1, 1), (0, 1))
    assert range_mismatch((0, 1), (0, 255)) and range_mismatch((-1, 1), (0, 255)) and range_mismatch((0, 255), (0, 1))
    assert not range_mismatch((-1, 1), (-1, 1)) and not range_mismatch((-0.7, 0.9), (-1, 1))
    assert not range_mismatch((-2.9, 3.1), (-4.5, 4.4))  # fewer samples than training points: a narrower range


def test_score_warns_on_samples_in_another_range_naming_both():
    train = _images(seed=2)
    expected = r"samples: values in \[0\.\d+, 1\].*training set's value range \[-0\.99"
    with pytest.warns(RangeMismatchWarning, match=expected):
        r = score((train[:10] + 1) / 2, train, check_authenticity=False)
    assert r.summary["range_check"]["samples"]["mismatch"]
    with pytest.raises(InputError, match=r"samples: values in \[0\.\d+, 25\d.*value range \[-0\.99"):
        score((train[:10] + 1) * 127.5, train, on_range_mismatch="error")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        score(train[:10], train, check_authenticity=False)  # same range: no warning


def test_score_names_samples_and_neighbours(tmp_path):
    train = _images(seed=3)
    np.save(tmp_path / "train.npy", train)
    np.savez(tmp_path / "samples.npz", arr_0=train[[7, 3]])
    r = score(str(tmp_path / "samples.npz"), str(tmp_path / "train.npy"), check_authenticity=False)
    assert list(r.per_sample["sample_name"]) == ["samples.npz:arr_0[0]", "samples.npz:arr_0[1]"]
    assert list(r.per_sample["nn_name"]) == ["train.npy[7]", "train.npy[3]"]
    ts = TrainingSet.from_npy(tmp_path / "train.npy")
    assert ts.names([0, 39]) == ["train.npy[0]", "train.npy[39]"] and ts.subset([5, 2]).names() == [
        "train.npy[5]",
        "train.npy[2]",
    ]


def test_uint8_npy_and_npz_load_scaled_like_images(tmp_path):
    u8 = np.random.default_rng(4).integers(0, 256, size=(5, 4, 4, 3), dtype=np.uint8)
    np.save(tmp_path / "s.npy", u8)
    np.savez(tmp_path / "s.npz", arr_0=u8)
    for f in ("s.npy", "s.npz"):
        ts = TrainingSet.open(tmp_path / f)
        assert ts.value_range == (-1.0, 1.0) and ts.dtype == torch.float32 and ts.shape == (4, 4, 3)
        assert np.allclose(ts.tensor().numpy(), u8 / 127.5 - 1, atol=1e-6) and "uint8" in ts.conversions[0]
        ts01 = TrainingSet.open(tmp_path / f, scale="[0,1]")
        assert np.allclose(ts01.tensor().numpy(), u8 / 255, atol=1e-6) and ts01.value_range == (0.0, 1.0)


# ----------------------------------------------------------------------------------------------------------------------
# the CLI end to end


def _png_folder(path, u8_hwc):
    from PIL import Image

    path.mkdir()
    for i, a in enumerate(u8_hwc):
        Image.fromarray(a).save(path / f"img{i:03d}.png")


def _cli(args):
    return subprocess.run([sys.executable, "-m", "diffgen_fast", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # CLI end to end, ~11 s
def test_cli_scores_adm_npz_of_copies_against_png_folder(tmp_path):
    """guided-diffusion / ADM samples: arr_0 uint8 [N, H, W, C]; the training set: a folder of PNGs ([C, H, W])."""
    rng = np.random.default_rng(5)
    imgs = rng.integers(0, 256, size=(30, 6, 6, 3), dtype=np.uint8)
    _png_folder(tmp_path / "train", imgs)
    copies = imgs[[4, 17, 0, 29, 8, 11, 23, 2, 9, 14]]
    np.savez(tmp_path / "samples.npz", arr_0=copies)
    np.save(tmp_path / "samples.npy", copies)
    for src in ("samples.npz", "samples.npy"):
        out = tmp_path / f"out-{src}"
        r = _cli(["score", "--train", str(tmp_path / "train"), "--samples", str(tmp_path / src), "--out", str(out),
                  "--no-progress"])  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert "samples: layout: channels-last" in r.stdout and "uint8 scaled" in r.stdout
        s = json.loads((out / "summary.json").read_text())
        assert s["n_memorized"] == 10 and s["fraction_memorized"] == 1.0
        conv = " ".join(s["conversions"]["samples"])
        assert "uint8 scaled x / 127.5 - 1 to [-1,1]" in conv and "channels-last items [6, 6, 3]" in conv
        assert not s["range_check"]["samples"]["mismatch"]
        rows = list(csv.DictReader(open(out / "per_sample.csv")))
        key = "samples.npz:arr_0" if src.endswith("npz") else "samples.npy"
        assert rows[1]["sample_name"] == f"{key}[1]" and rows[1]["nn_name"] == "img017.png"
        with np.load(out / "per_sample.npz", allow_pickle=False) as z:
            assert z["nn_name"][3] == "img029.png" and z["sample_name"][0] == f"{key}[0]"
        md = (out / "report.md").read_text()
        assert "channels-last" in md and "sample_name" in md


@pytest.mark.slow  # CLI end to end, ~5 s
def test_cli_uint8_training_npz_and_png_samples(tmp_path):
    rng = np.random.default_rng(6)
    imgs = rng.integers(0, 256, size=(25, 5, 5, 3), dtype=np.uint8)
    np.savez(tmp_path / "train.npz", arr_0=imgs)
    _png_folder(tmp_path / "samples", imgs[:6])
    out = tmp_path / "o"
    r = _cli(["score", "--train", str(tmp_path / "train.npz"), "--samples", str(tmp_path / "samples"), "--out",
              str(out), "--no-progress"])  # fmt: skip
    assert r.returncode == 0, r.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["fraction_memorized"] == 1.0 and "channels-first" in " ".join(s["conversions"]["samples"])
    rows = list(csv.DictReader(open(out / "per_sample.csv")))
    assert rows[2]["sample_name"] == "img002.png" and rows[2]["nn_name"] == "train.npz:arr_0[2]"


def test_cli_refuses_range_mismatch_before_writing_anything(tmp_path):
    train = _images(seed=7)
    np.save(tmp_path / "train.npy", train)
    np.save(tmp_path / "s01.npy", (train[:10] + 1) / 2)
    out = tmp_path / "o"
    args = ["score", "--train", str(tmp_path / "train.npy"), "--samples", str(tmp_path / "s01.npy"), "--out", str(out),
            "--no-progress"]  # fmt: skip
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2
    assert "samples: values in [" in r.output and "[-1, 1]" in r.output and "--allow-range-mismatch" in r.output
    assert not (out / "per_sample.csv").exists() and not (out / "summary.json").exists()
    r = CliRunner().invoke(main, [*args, "--allow-range-mismatch"])
    assert r.exit_code == 0, r.output
    assert "warning: samples: values in" in r.output
    s = json.loads((out / "summary.json").read_text())
    assert s["range_check"]["samples"]["mismatch"] and "MISMATCH" in (out / "report.md").read_text()


def test_cli_refuses_unknown_layout_before_writing_anything(tmp_path):
    train = _images(seed=8)
    np.save(tmp_path / "train.npy", train)
    np.save(tmp_path / "odd.npy", train[:10].reshape(10, 5, 6, 3))
    out = tmp_path / "o"
    r = CliRunner().invoke(main, ["score", "--train", str(tmp_path / "train.npy"), "--samples",
                                  str(tmp_path / "odd.npy"), "--out", str(out), "--no-progress"])  # fmt: skip
    assert r.exit_code == 2 and "(5, 6, 3)" in r.output and "(3, 6, 5)" in r.output
    assert not (out / "per_sample.csv").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--out", ""], "Invalid value for '--out'"),
        (["--out", "o", "--threshold", "inf"], "Invalid value for '--threshold'"),
        (["--out", "o", "--threshold", "nan"], "Invalid value for '--threshold'"),
        (["--out", "o", "--threshold", "0"], "Invalid value for '--threshold'"),
    ],
)
def test_cli_refuses_empty_out_and_bad_thresholds(tmp_path, extra, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "t.npy", _images(seed=9))
    r = CliRunner().invoke(main, ["score", "--train", "t.npy", "--samples", "t.npy", "--no-progress", *extra])
    assert r.exit_code == 2 and message in r.output
    assert not list(tmp_path.glob("*.csv")) and not (tmp_path / "o").exists()


def test_nn_grid_title_says_how_many_are_shown(tmp_path, monkeypatch):
    from diffgen_fast import figures
    from diffgen_fast.metrics.score_report import write_score_outputs

    seen = {}
    real = figures._save_figure

    def spy(fig, path, **kw):
        if str(path).endswith("nn_grid.png"):
            seen["title"] = fig._suptitle.get_text()
            seen["texts"] = [ax.get_title() for ax in fig.axes]
            seen["data"] = kw.get("data")
        return real(fig, path, **kw)

    monkeypatch.setattr(figures, "_save_figure", spy)  # nn_grid_figure saves through it
    train = _images(n=300, seed=10)
    r = score(train[:100], train, check_authenticity=False)
    write_score_outputs(r, tmp_path, train[:100], TrainingSet(train))
    assert "most memorized 64 of 100 shown" in seen["title"]
    assert seen["data"].startswith("100 samples vs ") and "(N=300)" in seen["data"]  # the data, stamped on it
    assert any("samples[" in t and "~ train[" in t for t in seen["texts"])
