"""Tests of diffgen_fast.data.TrainingSet: loaders, streaming, statistics, and refusal of bad input."""

from __future__ import annotations

import io
import json
import os
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import diffgen_fast.data as data_mod
from diffgen_fast.data import TrainingSet
from diffgen_fast.errors import DataFormatError, InputError, InputTypeError

# ----------------------------------------------------------------------------------------------------------------------
# fixture builders


def _png_bytes(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def _gray_images(n: int, h: int = 8, w: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w), dtype=np.uint8)


def _write_images(root: Path, images: np.ndarray, names: list[str]) -> None:
    for arr, rel in zip(images, names):
        f = root / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(f)


def _cifar_batch(n: int, seed: int) -> tuple[bytes, np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, size=n)]
    batch = {
        b"batch_label": b"testing batch",
        b"labels": labels,
        b"data": images,
        b"filenames": [f"img_{seed}_{i}.png".encode() for i in range(n)],
    }
    return pickle.dumps(batch, protocol=2), images, labels


def _write_cifar_dir(root: Path, per_batch: int = 3) -> tuple[dict[str, np.ndarray], dict[str, list[int]]]:
    root.mkdir(parents=True, exist_ok=True)
    images, labels = {}, {}
    for i, batch in enumerate([*(f"data_batch_{k}" for k in range(1, 6)), "test_batch"]):
        raw, images[batch], labels[batch] = _cifar_batch(per_batch + (i == 5), seed=i)
        (root / batch).write_bytes(raw)
    return images, labels


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _file_mappings(path: Path) -> list[tuple[int, int]]:
    real = os.path.realpath(path)
    spans = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].strip() == real:
                lo, hi = (int(v, 16) for v in parts[0].split("-"))
                spans.append((lo, hi))
    return spans


# ----------------------------------------------------------------------------------------------------------------------
# arrays and coerce


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_from_tensor_shapes_and_dtype_kept(dtype):
    x = torch.randn(7, 3, 4, 5).to(dtype)
    ts = TrainingSet.from_tensor(x, labels=[0, 1, 2, 0, 1, 2, 0])
    assert ts.shape == (3, 4, 5) and ts.n == len(ts) == 7 and ts.d == 60
    assert ts.dtype == dtype and ts.device == torch.device("cpu") and ts.is_in_memory
    assert ts.flat().shape == (7, 60) and ts.flat().data_ptr() == x.data_ptr()
    assert torch.equal(ts.tensor(), x) and torch.equal(ts[2], x[2]) and torch.equal(ts[1:3], x[1:3])
    assert ts.labels.dtype == torch.int64 and ts.labels.tolist() == [0, 1, 2, 0, 1, 2, 0] and ts.num_classes == 3
    assert ts.value_range is None and ts.source == "tensor"


def test_coerce_tensor_ndarray_path_and_identity(tmp_path):
    x = np.random.default_rng(0).standard_normal((9, 4)).astype(np.float32)
    from_np = TrainingSet.coerce(x)
    assert from_np.shape == (4,) and from_np.dtype == torch.float32 and np.array_equal(from_np.flat().numpy(), x)
    from_t = TrainingSet.coerce(torch.from_numpy(x).double())
    assert from_t.dtype == torch.float64 and from_t.shape == (4,)
    assert TrainingSet.coerce(from_t) is from_t
    np.save(tmp_path / "x.npy", x)
    for p in (tmp_path / "x.npy", str(tmp_path / "x.npy")):
        from_path = TrainingSet.coerce(p)
        assert not from_path.is_in_memory and np.array_equal(from_path.flat().numpy(), x)


@pytest.mark.parametrize(
    "bad",
    [
        torch.zeros(4, 3, dtype=torch.uint8),
        torch.zeros(4, 3, dtype=torch.int64),
        torch.zeros(4, 3, dtype=torch.bool),
        np.zeros((4, 3), dtype=np.uint8),
        np.zeros((4, 3), dtype=np.int32),
        np.zeros((4, 3), dtype=bool),
    ],
)
def test_coerce_refuses_non_float(bad):
    with pytest.raises(InputTypeError, match=r"^dataset: expected a float dtype"):
        TrainingSet.coerce(bad, name="dataset")


@pytest.mark.parametrize("bad", [torch.zeros(5), np.zeros(5), torch.tensor(1.0)])
def test_coerce_refuses_low_rank(bad):
    with pytest.raises(InputError, match=r"^ref: expected \[N, d\] or \[N, \*shape\]"):
        TrainingSet.coerce(bad, name="ref")


def test_coerce_refuses_other_types_and_empty():
    with pytest.raises(InputTypeError, match="train: expected a TrainingSet"):
        TrainingSet.coerce([[1.0, 2.0]])
    with pytest.raises(InputError, match="train: empty training set"):
        TrainingSet.coerce(torch.zeros(0, 3))
    with pytest.raises(InputError, match="at least one value"):
        TrainingSet.coerce(torch.zeros(3, 0))


def test_labels_validated():
    x = torch.zeros(4, 2)
    with pytest.raises(InputError, match=r"labels: expected shape \[4\]"):
        TrainingSet.from_tensor(x, labels=[0, 1, 2])
    with pytest.raises(InputTypeError, match="labels: expected integer class labels"):
        TrainingSet.from_tensor(x, labels=np.zeros(4))
    with pytest.raises(InputTypeError, match="labels: expected integer class labels"):
        TrainingSet.from_tensor(x, labels=torch.zeros(4, dtype=torch.bool))
    with pytest.raises(InputError, match="value_range"):
        TrainingSet.from_tensor(x, value_range=(1.0, -1.0))


# ----------------------------------------------------------------------------------------------------------------------
# chunks, statistics, fingerprint


def test_iter_chunks_covers_every_row_once():
    x = torch.randn(97, 3, 2, 2, dtype=torch.float64)
    ts = TrainingSet.from_tensor(x, labels=torch.arange(97) % 5)
    seen = torch.zeros(97, dtype=torch.int64)
    starts = []
    for start, chunk in ts.iter_chunks(10):
        assert chunk.is_contiguous() and chunk.shape[1] == 12 and chunk.dtype == torch.float64
        assert torch.equal(chunk, x.reshape(97, 12)[start : start + chunk.shape[0]])
        seen[start : start + chunk.shape[0]] += 1
        starts.append(start)
    assert starts == list(range(0, 97, 10)) and bool((seen == 1).all())
    chunks = list(ts.iter_chunks(33, dtype=torch.float32))
    assert [c.shape[0] for _, c in chunks] == [33, 33, 31] and all(c.dtype == torch.float32 for _, c in chunks)
    assert len(list(ts.iter_chunks())) == 1 and len(list(ts.iter_chunks(1000))) == 1
    for start, chunk, labels in ts.iter_chunks_with_labels(10):
        assert torch.equal(labels, torch.arange(start, start + chunk.shape[0]) % 5)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(InputError, match="chunk_size"):
            ts.iter_chunks(bad)
    with pytest.raises(InputTypeError, match="dtype"):
        ts.iter_chunks(10, dtype=torch.int32)


def _np_stats(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    a = a.reshape(len(a), -1).astype(np.float64)
    return (a * a).sum(1), a.mean(0), np.cov(a, rowvar=False, bias=True)


def test_statistics_match_numpy_in_memory():
    rng = np.random.default_rng(1)
    a = (1e4 + rng.standard_normal((97, 6))).astype(np.float32)  # large offset: a naive E[x^2] - E[x]^2 loses digits
    ts = TrainingSet.from_tensor(a)
    sq, mean, cov = _np_stats(a)
    assert ts.sqnorms().dtype == torch.float64 and ts.sqnorms() is ts.sqnorms()
    np.testing.assert_allclose(ts.sqnorms().numpy(), sq, rtol=1e-12)
    np.testing.assert_allclose(ts.mean().numpy(), mean, rtol=1e-12)
    np.testing.assert_allclose(ts.covariance().numpy(), cov, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(ts.covariance(ddof=1).numpy(), np.cov(a.astype(np.float64), rowvar=False), rtol=1e-9)
    assert ts.mean(torch.float32).dtype == torch.float32 and ts.covariance(torch.float32).shape == (6, 6)
    with pytest.raises(InputError, match="ddof"):
        ts.covariance(ddof=97)


def test_statistics_match_numpy_memmap_many_chunks(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    a = (3.0 + 2.0 * rng.standard_normal((97, 2, 3, 3))).astype(np.float32)
    np.save(tmp_path / "a.npy", a)
    # 10 float32 rows, 5 float64 rows per chunk (the constant is read where TrainingSet lives)
    monkeypatch.setattr(data_mod.training_set, "DEFAULT_CHUNK_BYTES", 10 * 18 * 4)
    ts = TrainingSet.from_npy(tmp_path / "a.npy")
    assert not ts.is_in_memory and len(list(ts.iter_chunks())) == 10
    sq, mean, cov = _np_stats(a)
    np.testing.assert_allclose(ts.sqnorms().numpy(), sq, rtol=1e-12)
    np.testing.assert_allclose(ts.mean().numpy(), mean, rtol=1e-12)
    np.testing.assert_allclose(ts.covariance().numpy(), cov, rtol=1e-10, atol=1e-12)
    ts.check_finite()


def test_fingerprint_stable_and_sensitive(tmp_path):
    a = np.random.default_rng(3).standard_normal((20, 5)).astype(np.float32)
    np.save(tmp_path / "a.npy", a)
    fp = TrainingSet.from_tensor(a).fingerprint()
    assert len(fp) == 64 and fp == TrainingSet.from_tensor(a.copy()).fingerprint()
    assert fp == TrainingSet.from_npy(tmp_path / "a.npy").fingerprint()  # same bytes, served the same way
    b = a.copy()
    b[13, 2] = np.nextafter(b[13, 2], np.float32(np.inf))
    assert TrainingSet.from_tensor(b).fingerprint() != fp
    assert TrainingSet.from_tensor(a.reshape(20, 5, 1)).fingerprint() != fp  # same bytes, other shape
    assert TrainingSet.from_tensor(a.astype(np.float64)).fingerprint() != fp
    assert TrainingSet.from_tensor(a[:19]).fingerprint() != fp
    ts = TrainingSet.from_tensor(a)
    assert ts.fingerprint() is ts.fingerprint()
    assert TrainingSet.from_tensor(torch.from_numpy(a).bfloat16()).fingerprint() != fp


def test_check_finite_in_memory_and_memmap(tmp_path, monkeypatch):
    a = np.ones((30, 4), dtype=np.float32)
    a[17, 1] = np.nan
    a[25, 0] = np.inf
    with pytest.raises(InputError, match=r"^train: contains NaN or Inf \(first at row 17\)$"):
        TrainingSet.from_tensor(a)
    with pytest.raises(InputError, match=r"^ref: contains NaN or Inf \(first at row 17\)"):
        TrainingSet.coerce(torch.from_numpy(a), name="ref")
    np.save(tmp_path / "a.npy", a)
    ts = TrainingSet.from_npy(tmp_path / "a.npy")  # lazily checked: construction does not read the data
    with pytest.raises(InputError, match=r"first at row 17"):
        ts.check_finite()
    calls = []
    monkeypatch.setattr(ts, "iter_chunks", lambda *a, **k: calls.append(1) or iter(()))
    with pytest.raises(InputError, match=r"first at row 17"):
        ts.check_finite()
    assert calls == []  # cached
    with pytest.raises(InputError, match="load|NaN"):
        TrainingSet.from_npy(tmp_path / "a.npy").load()
    with pytest.raises(InputError, match=r"first at row 5\)"):
        TrainingSet.from_npy(tmp_path / "a.npy").subset(slice(20, 30)).check_finite()
    big = TrainingSet.from_tensor(torch.full((3, 2), 1e6, dtype=torch.float64))
    with pytest.raises(InputError, match="contains NaN or Inf"):
        big.to(dtype=torch.float16)  # narrowing cast overflows


# ----------------------------------------------------------------------------------------------------------------------
# subset, to, load


def test_subset_keeps_labels():
    x = torch.arange(40, dtype=torch.float32).reshape(10, 2, 2)
    ts = TrainingSet.from_tensor(x, labels=torch.arange(10) * 3)
    cases = {
        "slice": (slice(2, 8, 3), [2, 5]),
        "neg-step": (slice(None, None, -4), [9, 5, 1]),
        "int": (4, [4]),
        "list": ([7, -1, 0], [7, 9, 0]),
        "tensor": (torch.tensor([3, 3, 1]), [3, 3, 1]),
        "ndarray": (np.array([6, 2]), [6, 2]),
        "mask": (torch.arange(10) % 4 == 0, [0, 4, 8]),
    }
    for what, (index, rows) in cases.items():
        sub = ts.subset(index)
        assert sub.shape == (2, 2) and len(sub) == len(rows), what
        assert torch.equal(sub.tensor(), x[rows]), what
        assert sub.labels.tolist() == [3 * r for r in rows], what
    for bad, err in [
        ([], InputError),
        (slice(5, 5), InputError),
        ([10], InputError),
        (-11, InputError),
        (torch.tensor([0.5]), InputTypeError),
        ("3", InputTypeError),
        (torch.ones(9, dtype=torch.bool), InputError),
    ]:
        with pytest.raises(err, match="index"):
            ts.subset(bad)


def test_to_and_load(tmp_path):
    a = np.random.default_rng(4).standard_normal((12, 3)).astype(np.float64)
    ts = TrainingSet.from_tensor(a, labels=np.arange(12))
    assert ts.to() is ts and ts.to("cpu", torch.float64) is ts
    t32 = ts.to(dtype=torch.float32)
    assert t32.dtype == torch.float32 and t32.flat().dtype == torch.float32 and torch.equal(t32.labels, ts.labels)
    with pytest.raises(InputTypeError, match="dtype"):
        ts.to(dtype=torch.int64)
    with pytest.raises(InputError, match="device"):
        ts.to(device="nonsense")
    np.save(tmp_path / "a.npy", a)
    mm = TrainingSet.from_npy(tmp_path / "a.npy")
    lazy = mm.to(dtype=torch.float32)
    assert not lazy.is_in_memory and lazy.dtype == torch.float32
    assert all(c.dtype == torch.float32 for _, c in lazy.iter_chunks(5))
    assert lazy.flat().dtype == torch.float32 and lazy[3].dtype == torch.float32
    assert lazy.fingerprint() == t32.fingerprint()
    loaded = mm.load()
    assert loaded.is_in_memory and torch.equal(loaded.flat(), torch.from_numpy(a)) and loaded.load() is loaded
    view = mm.subset(slice(2, 9, 2))
    assert not view.is_in_memory and torch.equal(view.tensor(), torch.from_numpy(a[2:9:2]))
    gathered = mm.subset([1, 5])
    assert gathered.is_in_memory and torch.equal(gathered.flat(), torch.from_numpy(a[[1, 5]]))


# ----------------------------------------------------------------------------------------------------------------------
# .npy / .npz


def test_npy_memmap_is_lazy_and_file_backed(tmp_path):
    a = np.random.default_rng(5).standard_normal((97, 3, 4, 5)).astype(np.float32)
    np.save(tmp_path / "a.npy", a)
    ts = TrainingSet.from_npy(tmp_path / "a.npy")
    assert not ts.is_in_memory and ts.shape == (3, 4, 5) and ts.n == 97 and ts.dtype == torch.float32
    assert "memmap" in ts.source and ts.labels is None
    flat = ts.flat()
    if os.path.exists("/proc/self/maps"):
        spans = _file_mappings(tmp_path / "a.npy")
        assert any(lo <= flat.data_ptr() < hi for lo, hi in spans), "flat() is not a view of the file mapping"
    rows = torch.cat([c for _, c in ts.iter_chunks(10)])
    assert torch.equal(rows, torch.from_numpy(a.reshape(97, -1)))
    in_mem = TrainingSet.from_npy(tmp_path / "a.npy", mmap=False)
    assert in_mem.is_in_memory and torch.equal(in_mem.flat(), rows)
    np.save(tmp_path / "big_endian.npy", a.astype(">f4"))
    be = TrainingSet.from_npy(tmp_path / "big_endian.npy")
    assert be.dtype == torch.float32 and torch.equal(be.flat(), rows)
    np.save(tmp_path / "fortran.npy", np.asfortranarray(a[:, 0, 0, :]))
    assert torch.equal(TrainingSet.from_npy(tmp_path / "fortran.npy").flat(), torch.from_numpy(a[:, 0, 0, :]))


def test_npy_bad_files(tmp_path):
    (tmp_path / "garbage.npy").write_bytes(b"this is not a numpy file at all" * 4)
    with pytest.raises(DataFormatError, match="garbage.npy"):
        TrainingSet.from_npy(tmp_path / "garbage.npy")
    np.save(tmp_path / "full.npy", np.zeros((50, 8), np.float32))
    raw = (tmp_path / "full.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(raw[: len(raw) // 2])
    for mmap in (True, False):
        with pytest.raises(DataFormatError, match="cut.npy"):
            TrainingSet.from_npy(tmp_path / "cut.npy", mmap=mmap)
    np.save(tmp_path / "int.npy", np.zeros((5, 3), np.int32))  # uint8 pixels load scaled, other ints do not
    with pytest.raises(InputTypeError, match="int.npy"):
        TrainingSet.from_npy(tmp_path / "int.npy")
    np.save(tmp_path / "vec.npy", np.zeros(5, np.float32))
    with pytest.raises(InputError, match=r"expected \[N, d\]"):
        TrainingSet.from_npy(tmp_path / "vec.npy")
    np.save(tmp_path / "empty.npy", np.zeros((0, 3), np.float32))
    with pytest.raises(InputError, match="train: empty training set"):
        TrainingSet.from_npy(tmp_path / "empty.npy")
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        TrainingSet.from_npy(tmp_path / "missing.npy")


def test_npz(tmp_path):
    rng = np.random.default_rng(6)
    x = rng.standard_normal((11, 2, 3)).astype(np.float32)
    y = rng.integers(0, 4, 11)
    np.savez(tmp_path / "xy.npz", x=x, labels=y)
    ts = TrainingSet.from_npz(tmp_path / "xy.npz")
    assert ts.shape == (2, 3) and ts.is_in_memory and np.array_equal(ts.tensor().numpy(), x)
    assert ts.labels.tolist() == y.tolist()
    np.savez_compressed(tmp_path / "single.npz", x.reshape(11, 6))
    single = TrainingSet.from_npz(tmp_path / "single.npz")
    assert single.shape == (6,) and single.labels is None
    np.savez(tmp_path / "two.npz", a=x, b=x[:5])
    with pytest.raises(DataFormatError, match="key="):
        TrainingSet.from_npz(tmp_path / "two.npz")
    assert TrainingSet.from_npz(tmp_path / "two.npz", key="b").n == 5
    np.savez(tmp_path / "mismatch.npz", data=x[:5], y=y)
    with pytest.raises(InputError, match=r"labels: expected shape \[5\]"):
        TrainingSet.from_npz(tmp_path / "mismatch.npz")
    with pytest.raises(InputError, match="key: 'zzz'"):
        TrainingSet.from_npz(tmp_path / "two.npz", key="zzz")
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 but not really a zip archive")
    with pytest.raises(DataFormatError, match="bad.npz"):
        TrainingSet.from_npz(tmp_path / "bad.npz")


# ----------------------------------------------------------------------------------------------------------------------
# images: folder, EDM zip


def test_image_folder_gray_with_labels(tmp_path):
    images = _gray_images(5)
    names = ["b/2.png", "a/1.png", "a/0.png", "c.png", "b/10.png"]
    _write_images(tmp_path, images, names)
    labels = {rel: i for i, rel in enumerate(names)}
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": [[k, v] for k, v in labels.items()]}))
    (tmp_path / "notes.txt").write_text("ignored")
    ts = TrainingSet.from_image_folder(tmp_path)
    order = sorted(names)
    assert ts.shape == (1, 8, 8) and ts.n == 5 and ts.dtype == torch.float32 and ts.value_range == (-1.0, 1.0)
    expected = np.stack([images[names.index(rel)] for rel in order])[:, None].astype(np.float32) / 127.5 - 1
    np.testing.assert_allclose(ts.tensor().numpy(), expected, rtol=0, atol=1e-6)
    assert ts.labels.tolist() == [labels[rel] for rel in order]
    assert float(ts.flat().min()) >= -1.0 and float(ts.flat().max()) <= 1.0


@pytest.mark.parametrize("scale,lo,hi", [("[-1,1]", -1.0, 1.0), ("[0,1]", 0.0, 1.0), ("[0,255]", 0.0, 255.0)])
def test_image_folder_rgb_scales(tmp_path, scale, lo, hi):
    rgb = np.zeros((2, 4, 6, 3), dtype=np.uint8)
    rgb[0, 0, 0] = (0, 128, 255)
    rgb[1] = 255
    _write_images(tmp_path, rgb, ["x0.png", "x1.png"])
    ts = TrainingSet.open(tmp_path, scale=scale)
    assert ts.shape == (3, 4, 6) and ts.value_range == (lo, hi) and ts.labels is None
    assert ts.tensor()[0, :, 0, 0].tolist() == pytest.approx([lo, lo + (hi - lo) * 128 / 255, hi], abs=1e-5)
    assert float(ts.tensor()[1].min()) == hi
    with pytest.raises(InputError, match="scale"):
        TrainingSet.from_image_folder(tmp_path, scale="[0,2]")


def test_image_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="train: empty training set"):
        TrainingSet.from_image_folder(tmp_path / "empty")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(mixed / "a.png")
    Image.fromarray(np.zeros((9, 8), np.uint8)).save(mixed / "b.png")
    with pytest.raises(DataFormatError, match=r"'b.png'.*8x9.*expected 8x8"):
        TrainingSet.from_image_folder(mixed)
    modes = tmp_path / "modes"
    modes.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(modes / "a.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(modes / "b.png")
    with pytest.raises(DataFormatError, match=r"'b.png'.*RGB"):
        TrainingSet.from_image_folder(modes)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(corrupt / "a.png")
    (corrupt / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataFormatError, match="b.png"):
        TrainingSet.from_image_folder(corrupt)
    unlabeled = tmp_path / "unlabeled"
    _write_images(unlabeled, _gray_images(2), ["a.png", "b.png"])
    (unlabeled / "dataset.json").write_text(json.dumps({"labels": [["a.png", 1]]}))
    with pytest.raises(DataFormatError, match=r"dataset.json.*'b.png'"):
        TrainingSet.from_image_folder(unlabeled)
    (unlabeled / "dataset.json").write_text("{not json")
    with pytest.raises(DataFormatError, match="dataset.json"):
        TrainingSet.from_image_folder(unlabeled)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        TrainingSet.from_image_folder(tmp_path / "nowhere")


def _edm_zip(path: Path, images: np.ndarray, labels: list[int] | None, extra: dict[str, bytes] | None = None) -> None:
    names = [f"{i // 2:05d}/img{i:08d}.png" for i in range(len(images))]
    meta = {"labels": None if labels is None else [[n, lab] for n, lab in zip(names, labels)]}
    with zipfile.ZipFile(path, "w") as zf:
        for n, arr in reversed(list(zip(names, images))):  # stored out of order: the loader sorts
            zf.writestr(n, _png_bytes(arr))
        zf.writestr("dataset.json", json.dumps(meta))
        for n, raw in (extra or {}).items():
            zf.writestr(n, raw)


def test_edm_zip(tmp_path):
    images = np.random.default_rng(7).integers(0, 256, size=(5, 4, 4, 3), dtype=np.uint8)
    _edm_zip(tmp_path / "ds.zip", images, [6, 1, 0, 9, 6])
    ts = TrainingSet.from_edm_zip(tmp_path / "ds.zip", scale="[0,255]")
    assert ts.shape == (3, 4, 4) and ts.n == 5 and ts.labels.tolist() == [6, 1, 0, 9, 6]
    assert np.array_equal(ts.tensor().numpy(), images.transpose(0, 3, 1, 2).astype(np.float32))
    assert TrainingSet.open(tmp_path / "ds.zip").value_range == (-1.0, 1.0)
    _edm_zip(tmp_path / "nolabels.zip", images, None)
    assert TrainingSet.from_edm_zip(tmp_path / "nolabels.zip").labels is None


@pytest.mark.parametrize("member", ["../evil.png", "a/../../evil.png", "/abs/evil.png", "..\\evil.png", "C:/evil.png"])
def test_edm_zip_refuses_unsafe_members(tmp_path, member):
    _edm_zip(tmp_path / "evil.zip", _gray_images(2), None, extra={member: _png_bytes(_gray_images(1)[0])})
    with pytest.raises(DataFormatError, match="unsafe entry"):
        TrainingSet.from_edm_zip(tmp_path / "evil.zip")
    assert not (tmp_path / "evil.png").exists()


def test_edm_zip_corrupt_and_empty(tmp_path):
    (tmp_path / "junk.zip").write_bytes(b"definitely not a zip")
    with pytest.raises(DataFormatError, match="junk.zip"):
        TrainingSet.from_edm_zip(tmp_path / "junk.zip")
    _edm_zip(tmp_path / "ok.zip", _gray_images(4), [0, 1, 2, 3])
    raw = (tmp_path / "ok.zip").read_bytes()
    (tmp_path / "cut.zip").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataFormatError, match="cut.zip"):
        TrainingSet.from_edm_zip(tmp_path / "cut.zip")
    with zipfile.ZipFile(tmp_path / "empty.zip", "w") as zf:
        zf.writestr("dataset.json", json.dumps({"labels": None}))
    with pytest.raises(InputError, match="train: empty training set"):
        TrainingSet.from_edm_zip(tmp_path / "empty.zip")
    with zipfile.ZipFile(tmp_path / "badimg.zip", "w") as zf:
        zf.writestr("00000/img0.png", b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(DataFormatError, match="img0.png"):
        TrainingSet.from_edm_zip(tmp_path / "badimg.zip")


# ----------------------------------------------------------------------------------------------------------------------
# CIFAR-10


def test_cifar10_dir_and_tar(tmp_path):
    images, labels = _write_cifar_dir(tmp_path / "cifar-10-batches-py")
    train_x = np.concatenate([images[f"data_batch_{k}"] for k in range(1, 6)]).reshape(-1, 3, 32, 32)
    train_y = sum((labels[f"data_batch_{k}"] for k in range(1, 6)), [])
    for where in (tmp_path / "cifar-10-batches-py", tmp_path):
        ts = TrainingSet.from_cifar10(where)
        assert ts.shape == (3, 32, 32) and ts.n == 15 and ts.dtype == torch.float32 and ts.value_range == (-1, 1)
        np.testing.assert_allclose(ts.tensor().numpy(), train_x / 127.5 - 1, atol=1e-6)
        assert ts.labels.tolist() == train_y
    test = TrainingSet.open(tmp_path / "cifar-10-batches-py", split="test", scale="[0,255]")
    assert test.n == 4 and np.array_equal(test.tensor().numpy(), images["test_batch"].reshape(-1, 3, 32, 32))
    assert test.labels.tolist() == labels["test_batch"]
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tf:
        tf.add(tmp_path / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    from_tar = TrainingSet.open(tmp_path / "cifar-10-python.tar.gz")
    assert from_tar.n == 15 and torch.equal(from_tar.flat(), ts.flat()) and from_tar.labels.tolist() == train_y
    assert TrainingSet.from_cifar10(tmp_path / "cifar-10-python.tar.gz", split="test").n == 4
    with pytest.raises(InputError, match="split"):
        TrainingSet.from_cifar10(tmp_path, split="val")


def test_cifar10_refuses_malicious_pickle(tmp_path):
    marker = tmp_path / "pwned"
    root = tmp_path / "cifar-10-batches-py"
    _write_cifar_dir(root)
    (root / "data_batch_3").write_bytes(pickle.dumps({b"data": _Evil(marker), b"labels": []}, protocol=2))
    with pytest.raises(DataFormatError, match=r"data_batch_3.*system.*refused"):
        TrainingSet.from_cifar10(root)
    assert not marker.exists()
    with tarfile.open(tmp_path / "evil.tar.gz", "w:gz") as tf:
        tf.add(root, arcname="cifar-10-batches-py")
    with pytest.raises(DataFormatError, match="refused"):
        TrainingSet.from_cifar10(tmp_path / "evil.tar.gz")
    assert not marker.exists()
    (root / "data_batch_3").write_bytes(pickle.dumps(__import__("collections").OrderedDict(), protocol=2))
    with pytest.raises(DataFormatError, match="collections.OrderedDict"):
        TrainingSet.from_cifar10(root)


def test_cifar10_bad_batches(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    _write_cifar_dir(root)
    (root / "data_batch_2").write_bytes(b"\x80\x02 truncated garbage")
    with pytest.raises(DataFormatError, match="data_batch_2"):
        TrainingSet.from_cifar10(root)
    (root / "data_batch_2").write_bytes(pickle.dumps([1, 2, 3], protocol=2))
    with pytest.raises(DataFormatError, match="expected a dict"):
        TrainingSet.from_cifar10(root)
    (root / "data_batch_2").write_bytes(pickle.dumps({b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(DataFormatError, match=r"\[n, 3072\]"):
        TrainingSet.from_cifar10(root)
    (root / "data_batch_2").unlink()
    with pytest.raises(DataFormatError, match="data_batch_2"):
        TrainingSet.from_cifar10(root)
    (tmp_path / "broken.tar.gz").write_bytes(b"\x1f\x8b\x08 broken gzip")
    with pytest.raises(DataFormatError, match="broken.tar.gz"):
        TrainingSet.from_cifar10(tmp_path / "broken.tar.gz")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataFormatError, match="no CIFAR-10 batches"):
        TrainingSet.from_cifar10(tmp_path / "nothing")


# ----------------------------------------------------------------------------------------------------------------------
# open, built-ins, gaussian


def test_open_sniffs_contents(tmp_path):
    a = np.random.default_rng(8).standard_normal((6, 4)).astype(np.float32)
    np.save(tmp_path / "a.npy", a)
    os.rename(tmp_path / "a.npy", tmp_path / "points.bin")
    assert np.array_equal(TrainingSet.open(tmp_path / "points.bin").flat().numpy(), a)
    np.savez(tmp_path / "b.npz", x=a)
    os.rename(tmp_path / "b.npz", tmp_path / "archive.data")
    assert TrainingSet.open(tmp_path / "archive.data").n == 6
    assert TrainingSet.open(tmp_path / "archive.data", key="x").n == 6
    (tmp_path / "mystery.xyz").write_bytes(b"\x00" * 64)
    with pytest.raises(DataFormatError, match=r"cannot tell the format of .*mystery.xyz"):
        TrainingSet.open(tmp_path / "mystery.xyz")
    with pytest.raises(FileNotFoundError, match="not-there"):
        TrainingSet.open(tmp_path / "not-there.npy")
    with pytest.raises(InputError, match="split: not an option"):
        TrainingSet.open(tmp_path / "points.bin", split="train")
    with pytest.raises(InputTypeError, match="train: expected a path"):
        TrainingSet.open(3)


def test_builtin_digits():
    ts = TrainingSet.builtin("digits")
    assert ts.n == 1797 and ts.d == 64 and ts.shape == (1, 8, 8) and ts.dtype == torch.float32
    assert float(ts.flat().min()) == -1.0 and float(ts.flat().max()) == 1.0 and ts.value_range == (-1.0, 1.0)
    assert ts.labels.shape == (1797,) and sorted(set(ts.labels.tolist())) == list(range(10)) and ts.num_classes == 10
    with pytest.raises(InputError, match="unknown built-in.*digits"):
        TrainingSet.builtin("imagenet")


def test_gaussian_reproducible():
    a = TrainingSet.gaussian(500, 7, mean=2.0, std=0.5, seed=3)
    b = TrainingSet.gaussian(500, 7, mean=2.0, std=0.5, seed=3)
    c = TrainingSet.gaussian(500, 7, mean=2.0, std=0.5, seed=4)
    assert a.shape == (7,) and a.dtype == torch.float32 and torch.equal(a.flat(), b.flat())
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    assert abs(float(a.mean().mean()) - 2.0) < 0.05 and abs(float(a.flat().std()) - 0.5) < 0.05
    assert TrainingSet.gaussian(3, 2, dtype=torch.float64).dtype == torch.float64
    with pytest.raises(InputError, match="n: expected a positive int"):
        TrainingSet.gaussian(0, 3)
    with pytest.raises(InputError, match="std"):
        TrainingSet.gaussian(3, 3, std=-1.0)


def test_image_folder_and_zip_streamed_into_a_cache(tmp_path, monkeypatch):
    """cache=: images decoded a chunk at a time into a memory-mapped float32 .npy, equal to the in-memory load,
    reused while the files are unchanged and rebuilt when they change."""
    from diffgen_fast.data.formats import images

    monkeypatch.setattr(images, "IMAGE_CACHE_CHUNK", 3)  # several chunks
    images = np.random.default_rng(3).integers(0, 256, size=(8, 4, 4, 3), dtype=np.uint8)
    _edm_zip(tmp_path / "ds.zip", images, [0, 1, 2, 3, 4, 5, 6, 7])
    mem = TrainingSet.from_edm_zip(tmp_path / "ds.zip")
    cached = TrainingSet.open(tmp_path / "ds.zip", cache=tmp_path / "cache")
    assert not cached.is_in_memory and "cached as" in cached.source
    assert torch.equal(cached.tensor(), mem.tensor()) and cached.labels.tolist() == list(range(8))
    assert cached.value_range == (-1.0, 1.0) and cached.shape == (3, 4, 4)
    files = sorted((tmp_path / "cache").glob("*.npy"))
    assert len(files) == 1 and files[0].with_name(files[0].name + ".json").exists()
    mtime = files[0].stat().st_mtime_ns
    again = TrainingSet.open(tmp_path / "ds.zip", cache=tmp_path / "cache")
    assert files[0].stat().st_mtime_ns == mtime and torch.equal(again.tensor(), mem.tensor())  # reused
    gray = _gray_images(7, seed=4)
    _write_images(tmp_path / "imgs", gray, [f"{i:03d}.png" for i in range(7)])
    f = TrainingSet.from_image_folder(tmp_path / "imgs", scale="[0,255]", cache=tmp_path / "c2" / "x.npy")
    assert (tmp_path / "c2" / "x.npy").exists() and not f.is_in_memory
    assert np.array_equal(f.tensor().numpy()[:, 0], gray.astype(np.float32))
    _write_images(tmp_path / "imgs", gray[:1] // 2, ["000.png"])  # a changed file invalidates the cache
    f2 = TrainingSet.from_image_folder(tmp_path / "imgs", scale="[0,255]", cache=tmp_path / "c2" / "x.npy")
    assert np.array_equal(f2.tensor().numpy()[0, 0], (gray[0] // 2).astype(np.float32))
    bad = tmp_path / "bad"
    _write_images(bad, np.concatenate([gray[:2]]), ["a.png", "b.png"])
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(bad / "c.png")
    with pytest.raises(DataFormatError, match="share one size"):
        TrainingSet.from_image_folder(bad, cache=tmp_path / "c3")
    assert not list((tmp_path / "c3").glob("*.npy"))  # nothing half-written
