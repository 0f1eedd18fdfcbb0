"""Tests of the "no silent wrong answers" guards of diffgen_fast.data: read-only memory maps that are streamed with
explicit reads and checked unchanged before every chunk (a file cut short raises DataFormatError, not SIGBUS),
read-only arrays wrapped without a copy, archive members that expand beyond a limit, and absurd EDM labels."""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
import textwrap
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import diffgen_fast
import diffgen_fast.data as data_mod
from diffgen_fast.data import TrainingSet
from diffgen_fast.errors import DataFormatError, InputError

ROOT = Path(diffgen_fast.__file__).resolve().parents[1]  # the package under test, for the subprocesses
MAX_LABEL = (1 << 24) - 1  # data_mod.MAX_CLASS_LABEL
LINUX_MAPS = os.path.exists("/proc/self/maps")


def _mapping_perms(path: Path) -> list[str]:
    real = os.path.realpath(path)
    with open("/proc/self/maps") as f:
        return [p[1] for p in (line.split(maxsplit=5) for line in f) if len(p) == 6 and p[5].strip() == real]


def _run(script: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """Run a script in a fresh interpreter, so a SIGBUS (a regression) fails the test instead of the test run."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------------------------------
# .npy: read-only maps, copies per chunk, files that change while in use


@pytest.mark.skipif(not LINUX_MAPS, reason="needs /proc/self/maps")
def test_npy_is_mapped_read_only_without_warnings(tmp_path):
    a = np.random.default_rng(0).standard_normal((50, 7)).astype(np.float32)
    np.save(tmp_path / "a.npy", a)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch.from_numpy of a read-only array would warn
        ts = TrainingSet.from_npy(tmp_path / "a.npy")
        flat = ts.flat()
        chunks = [c for _, c in ts.iter_chunks(8)]
    perms = _mapping_perms(tmp_path / "a.npy")
    assert perms and all("w" not in p for p in perms), f"the .npy is mapped writable: {perms}"
    assert not ts.is_in_memory and torch.equal(flat, torch.from_numpy(a))
    assert torch.equal(torch.cat(chunks), torch.from_numpy(a))


def test_chunks_of_a_mapped_set_are_copies(tmp_path):
    a = np.random.default_rng(1).standard_normal((40, 5)).astype(np.float32)
    np.save(tmp_path / "a.npy", a)
    ts = TrainingSet.from_npy(tmp_path / "a.npy")
    for _, chunk in ts.iter_chunks(7):
        chunk.fill_(123.0)  # a consumer scribbling on its chunk changes neither the set nor the file
    assert torch.equal(ts.flat(), torch.from_numpy(a))
    assert torch.equal(torch.cat([c for _, c in ts.iter_chunks(9)]), torch.from_numpy(a))
    assert np.array_equal(np.load(tmp_path / "a.npy"), a)


def test_views_of_a_mapped_set_stream_the_right_rows(tmp_path):
    a = np.random.default_rng(2).standard_normal((100, 3, 2)).astype(np.float64)
    np.save(tmp_path / "a.npy", a)
    ts = TrainingSet.from_npy(tmp_path / "a.npy")
    flat = a.reshape(100, -1)
    for sl in (slice(5, 90), slice(1, 100, 3), slice(99, None)):
        sub = ts.subset(sl)
        assert not sub.is_in_memory
        assert np.array_equal(torch.cat([c for _, c in sub.iter_chunks(6)]).numpy(), flat[sl])
    half = ts.to(dtype=torch.float32)
    assert torch.equal(torch.cat([c for _, c in half.iter_chunks(11)]), torch.from_numpy(flat).float())
    assert torch.equal(ts.load().flat(), torch.from_numpy(flat))
    assert torch.equal(ts[[3, 1]], torch.from_numpy(a[[3, 1]]))


def test_read_only_memmap_and_array_are_not_copied(tmp_path):
    a = np.random.default_rng(3).standard_normal((60, 4)).astype(np.float32)
    np.save(tmp_path / "a.npy", a)
    mm = np.load(tmp_path / "a.npy", mmap_mode="r")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ts = TrainingSet.coerce(mm)
    assert not ts.is_in_memory and "memmap" in ts.source
    assert ts.flat().data_ptr() == mm.ctypes.data, "a read-only memmap was copied"
    assert torch.equal(torch.cat([c for _, c in ts.iter_chunks(13)]), torch.from_numpy(a))
    ro = a.copy()
    ro.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ts2 = TrainingSet.from_tensor(ro)
    assert ts2.flat().data_ptr() == ro.ctypes.data, "a read-only array was copied"
    for _, chunk in ts2.iter_chunks(16):
        chunk.zero_()  # chunks of read-only memory are copies
    assert np.array_equal(ro, a)
    from diffgen_fast.ops import knn

    _, idx = knn(torch.from_numpy(a[:3]), mm, 1, backend="torch")
    assert torch.as_tensor(idx).flatten().tolist() == [0, 1, 2]


_CHANGES = [
    'os.truncate("t.npy", 4096)',  # cut short: reading the lost pages through a map would be SIGBUS
    'os.truncate("t.npy", 0)',
    'np.save("t2.npy", np.zeros((400, 256), np.float32)); os.replace("t2.npy", "t.npy")',  # replaced
    'time.sleep(0.05); f = open("t.npy", "r+b"); f.seek(1000); f.write(b"xx"); f.close()',  # rewritten in place
]
_CHANGE_WHILE_STREAMING = """
import os, sys, time, numpy as np
from diffgen_fast import TrainingSet
from diffgen_fast.errors import DataFormatError
for change in sys.argv[1:]:
    np.save("t.npy", np.ones((400, 256), np.float32))
    ts = {open}
    it = ts.iter_chunks(50)
    next(it)
    exec(change)
    try:
        for _, chunk in it:
            float(chunk.sum())
        print("STREAMED", flush=True)
    except DataFormatError as e:
        print("REFUSED", e, flush=True)
    try:
        float(ts.flat().sum())
        print("FLAT READ", flush=True)
    except DataFormatError as e:
        print("REFUSED FLAT", e, flush=True)
"""


@pytest.mark.parametrize("opener", ['TrainingSet.open("t.npy")', 'TrainingSet.coerce(np.load("t.npy", mmap_mode="r"))'])
def test_file_changed_while_streaming_is_refused_not_sigbus(tmp_path, opener):
    r = _run(_CHANGE_WHILE_STREAMING.format(open=opener), tmp_path, *_CHANGES)
    assert r.returncode == 0, f"process died with {r.returncode} (SIGBUS is -7): {r.stdout} {r.stderr[-2000:]}"
    lines = r.stdout.splitlines()
    assert len(lines) == 2 * len(_CHANGES), r.stdout
    for change, streamed, flat in zip(_CHANGES, lines[::2], lines[1::2]):
        assert streamed.startswith("REFUSED ") and "t.npy" in streamed, (change, streamed)
        assert "changed" in streamed or "ended" in streamed, (change, streamed)
        assert flat.startswith("REFUSED FLAT") and "t.npy" in flat, (change, flat)


def test_file_unchanged_streams_twice(tmp_path):
    np.save(tmp_path / "t.npy", np.arange(60, dtype=np.float32).reshape(20, 3))
    ts = TrainingSet.open(tmp_path / "t.npy")
    first = torch.cat([c for _, c in ts.iter_chunks(6)])
    time.sleep(0.01)
    os.utime(tmp_path / "t.npy")  # a new modification time is a change: the file may have been rewritten
    with pytest.raises(DataFormatError, match=r"t\.npy.*changed"):
        list(ts.iter_chunks(6))
    ts = TrainingSet.open(tmp_path / "t.npy")
    assert torch.equal(torch.cat([c for _, c in ts.iter_chunks(6)]), first)
    assert torch.equal(torch.cat([c for _, c in ts.iter_chunks(7)]), first)


# ----------------------------------------------------------------------------------------------------------------------
# archive members that expand hugely


def _zip_bomb(path: Path, member: str, size: int, extra: dict[str, bytes] | None = None) -> None:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        with zf.open(member, "w", force_zip64=True) as f:
            block = bytes(1 << 20)
            for _ in range(size >> 20):
                f.write(block)
        for name, raw in (extra or {}).items():
            zf.writestr(name, raw)


def test_member_limit_setting(monkeypatch):
    monkeypatch.delenv(data_mod.MAX_MEMBER_BYTES_ENV, raising=False)
    assert data_mod._member_limit() == data_mod.MAX_MEMBER_BYTES == 4 << 30
    monkeypatch.setenv(data_mod.MAX_MEMBER_BYTES_ENV, "12345")
    assert data_mod._member_limit() == 12345 and data_mod._member_limit(77) == 77
    for bad in ("zero", "0", "-5", "1.5"):
        monkeypatch.setenv(data_mod.MAX_MEMBER_BYTES_ENV, bad)
        with pytest.raises(InputError, match=data_mod.MAX_MEMBER_BYTES_ENV):
            data_mod._member_limit()
    monkeypatch.delenv(data_mod.MAX_MEMBER_BYTES_ENV)
    for bad in (0, -1, 2.5, True, "10"):
        with pytest.raises(InputError, match="max_member_bytes"):
            data_mod._member_limit(bad)


def test_zip_bomb_refused(tmp_path, monkeypatch):
    png = _png(np.zeros((4, 4), np.uint8))
    _zip_bomb(tmp_path / "bomb.zip", "00000/img1.png", 64 << 20, extra={"00000/img0.png": png})
    assert (tmp_path / "bomb.zip").stat().st_size < 1 << 20  # 64 MiB of zeros compress to well under 1 MiB
    monkeypatch.setenv(data_mod.MAX_MEMBER_BYTES_ENV, str(1 << 20))
    with pytest.raises(DataFormatError, match=r"img1\.png.*bomb\.zip.*limit of 1048576 bytes"):
        TrainingSet.from_edm_zip(tmp_path / "bomb.zip")
    with pytest.raises(DataFormatError, match="limit"):
        TrainingSet.open(tmp_path / "bomb.zip", cache=tmp_path / "cache")
    monkeypatch.delenv(data_mod.MAX_MEMBER_BYTES_ENV)
    with pytest.raises(DataFormatError, match="limit of 1000 bytes"):
        TrainingSet.open(tmp_path / "bomb.zip", max_member_bytes=1000)
    # a bomb in dataset.json
    _zip_bomb(tmp_path / "json.zip", "dataset.json", 8 << 20, extra={"00000/img0.png": png})
    with pytest.raises(DataFormatError, match=r"dataset\.json.*json\.zip.*limit"):
        TrainingSet.from_edm_zip(tmp_path / "json.zip", max_member_bytes=1 << 20)


def test_zip_member_lying_about_its_size_is_refused(tmp_path):
    png = _png(np.zeros((4, 4), np.uint8))
    _zip_bomb(tmp_path / "liar.zip", "00000/img1.png", 4 << 20, extra={"00000/img0.png": png})
    with zipfile.ZipFile(tmp_path / "liar.zip") as zf:
        zf.getinfo("00000/img1.png").file_size = 100  # a forged directory entry claims 100 bytes
        with pytest.raises(DataFormatError, match=r"img1\.png.*liar\.zip"):
            data_mod._zip_read(zf, "00000/img1.png", "'liar.zip'", "train", 1 << 20)


def test_memory_error_while_reading_a_member_is_typed(tmp_path, monkeypatch):
    zpath = tmp_path / "ok.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("00000/img0.png", _png(np.zeros((4, 4), np.uint8)))

    def oom(self, *a, **k):
        raise MemoryError

    monkeypatch.setattr(zipfile.ZipExtFile, "read", oom)
    with pytest.raises(DataFormatError, match=r"out of memory.*img0\.png.*ok\.zip"):
        TrainingSet.from_edm_zip(zpath)


def test_npz_bomb_refused(tmp_path, monkeypatch):
    np.savez_compressed(tmp_path / "bomb.npz", x=np.zeros((16 << 20) // 4, np.float32).reshape(-1, 64))
    assert (tmp_path / "bomb.npz").stat().st_size < 1 << 20
    with pytest.raises(DataFormatError, match=r"x\.npy.*bomb\.npz.*limit of 1048576"):
        TrainingSet.from_npz(tmp_path / "bomb.npz", max_member_bytes=1 << 20)
    monkeypatch.setenv(data_mod.MAX_MEMBER_BYTES_ENV, str(1 << 20))
    with pytest.raises(DataFormatError, match="limit"):
        TrainingSet.open(tmp_path / "bomb.npz")
    monkeypatch.delenv(data_mod.MAX_MEMBER_BYTES_ENV)
    # labels are members too
    np.savez_compressed(tmp_path / "lab.npz", x=np.zeros((4, 3), np.float32), labels=np.zeros(1 << 20, np.int64))
    with pytest.raises(DataFormatError, match=r"labels\.npy.*limit"):
        TrainingSet.from_npz(tmp_path / "lab.npz", max_member_bytes=1 << 20)
    assert TrainingSet.from_npz(tmp_path / "bomb.npz").n == (16 << 20) // 256  # under the default limit


def test_npz_header_promising_more_than_the_member_holds(tmp_path):
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (1 << 20, 1 << 10)})
    buf.write(bytes(64))
    with zipfile.ZipFile(tmp_path / "liar.npz", "w") as zf:
        zf.writestr("x.npy", buf.getvalue())
    with pytest.raises(DataFormatError, match=r"x\.npy.*liar\.npz.*limit"):
        TrainingSet.from_npz(tmp_path / "liar.npz", max_member_bytes=1 << 20)
    with pytest.raises(DataFormatError, match=r"x\.npy.*liar\.npz.*truncated"):
        TrainingSet.from_npz(tmp_path / "liar.npz")


def test_cifar_tar_bomb_refused(tmp_path, monkeypatch):
    raw = pickle.dumps({b"data": np.zeros((4096, 3072), np.uint8), b"labels": [0] * 4096}, protocol=2)
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tf:
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tf.addfile(info, io.BytesIO(raw))
    assert (tmp_path / "cifar-10-python.tar.gz").stat().st_size < len(raw)
    monkeypatch.setenv(data_mod.MAX_MEMBER_BYTES_ENV, str(1 << 20))
    with pytest.raises(DataFormatError, match=r"data_batch_1.*cifar-10-python\.tar\.gz.*limit"):
        TrainingSet.from_cifar10(tmp_path / "cifar-10-python.tar.gz")
    monkeypatch.delenv(data_mod.MAX_MEMBER_BYTES_ENV)
    with pytest.raises(DataFormatError, match=r"test_batch.*limit of 5000"):
        TrainingSet.open(tmp_path / "cifar-10-python.tar.gz", split="test", max_member_bytes=5000)
    assert TrainingSet.from_cifar10(tmp_path / "cifar-10-python.tar.gz", split="test").n == 4096


# ----------------------------------------------------------------------------------------------------------------------
# EDM labels


def _labeled_zip(path: Path, labels: list, names: list[str] | None = None) -> None:
    images = [f"00000/img{i:08d}.png" for i in range(2)]
    names = names or images
    with zipfile.ZipFile(path, "w") as zf:
        for n in images:
            zf.writestr(n, _png(np.zeros((4, 4), np.uint8)))
        zf.writestr("dataset.json", json.dumps({"labels": [[n, lab] for n, lab in zip(names, labels)]}))


@pytest.mark.parametrize(
    "labels, why",
    [
        ([0, -1], "out of range"),
        ([0, 2**70], "out of range"),
        ([0, MAX_LABEL + 1], "out of range"),
        ([0, 1.5], "only integer"),
        ([0, 1.0], "only integer"),
        ([0, True], "only integer"),
        ([0, "1"], "only integer"),
        ([0, None], "only integer"),
    ],
)
def test_edm_labels_out_of_range_or_not_ints_refused(tmp_path, labels, why):
    _labeled_zip(tmp_path / "ds.zip", labels)
    with pytest.raises(DataFormatError, match=rf"dataset\.json.*ds\.zip.*{why}"):
        TrainingSet.from_edm_zip(tmp_path / "ds.zip")
    folder = tmp_path / "folder" / "00000"
    folder.mkdir(parents=True)
    for i in range(2):
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(folder / f"img{i:08d}.png")
    meta = {"labels": [[f"00000/img{i:08d}.png", lab] for i, lab in enumerate(labels)]}
    (tmp_path / "folder" / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DataFormatError, match=rf"dataset\.json.*{why}"):
        TrainingSet.from_image_folder(tmp_path / "folder")


def test_edm_labels_duplicated_or_huge_json_refused(tmp_path):
    names = ["00000/img00000000.png", "00000/img00000001.png", "00000/img00000001.png"]
    _labeled_zip(tmp_path / "dup.zip", [0, 1, 2], names)
    with pytest.raises(DataFormatError, match=r"dataset\.json.*dup\.zip.*img00000001\.png.*more than once"):
        TrainingSet.from_edm_zip(tmp_path / "dup.zip")
    names = ["00000/img00000000.png", "00000/img00000001.png", "00000\\img00000001.png"]
    _labeled_zip(tmp_path / "dup2.zip", [0, 1, 1], names)
    with pytest.raises(DataFormatError, match="more than once"):
        TrainingSet.from_edm_zip(tmp_path / "dup2.zip")
    with zipfile.ZipFile(tmp_path / "digits.zip", "w") as zf:
        zf.writestr("00000/img0.png", _png(np.zeros((4, 4), np.uint8)))
        zf.writestr("dataset.json", '{"labels": [["00000/img0.png", ' + "9" * 5000 + "]]}")
    with pytest.raises(DataFormatError, match=r"dataset\.json.*digits\.zip"):
        TrainingSet.from_edm_zip(tmp_path / "digits.zip")
    assert data_mod.MAX_CLASS_LABEL == MAX_LABEL
    _labeled_zip(tmp_path / "ok.zip", [0, MAX_LABEL])
    assert TrainingSet.from_edm_zip(tmp_path / "ok.zip").labels.tolist() == [0, MAX_LABEL]


def test_a_bomb_under_the_size_limit_is_refused_by_its_expansion(tmp_path, monkeypatch):
    """Under the default 4 GiB size limit, a member that expands > 100x and past 64 MiB is refused anyway."""
    png = _png(np.zeros((4, 4), np.uint8))
    _zip_bomb(tmp_path / "bomb.zip", "00000/img1.png", 80 << 20, extra={"00000/img0.png": png})
    with pytest.raises(DataFormatError, match=r"img1\.png.*expands from \d+ to 83886080 bytes.*archive bomb"):
        TrainingSet.from_edm_zip(tmp_path / "bomb.zip")
    np.savez_compressed(tmp_path / "bomb.npz", x=np.zeros((80 << 20) // 4, np.float32).reshape(-1, 64))
    with pytest.raises(DataFormatError, match=r"x\.npy.*archive bomb"):
        TrainingSet.from_npz(tmp_path / "bomb.npz")
    monkeypatch.setenv(data_mod.MAX_EXPANSION_ENV, "1e9")  # a trusted file: the check can be lifted
    assert len(TrainingSet.from_npz(tmp_path / "bomb.npz")) == (80 << 20) // 256
    monkeypatch.setenv(data_mod.MAX_EXPANSION_ENV, "0.5")
    with pytest.raises(InputError, match=data_mod.MAX_EXPANSION_ENV):
        TrainingSet.from_npz(tmp_path / "bomb.npz")
