"""diffgen_fast.distributed: sharded ops over 2 gloo processes equal the single-process ops on the full set."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import diffgen_fast as dg
from diffgen_fast import distributed as dgd
from diffgen_fast.errors import InputError

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, world: int, tmp_path: Path, *args) -> None:
    init = f"file://{tmp_path / 'pg_init'}"
    mp.spawn(fn, args=(world, init, str(tmp_path), *args), nprocs=world, join=True)


def _init(rank: int, world: int, init: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)


def _rel(a, b) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float(((a - b).abs() / b.abs().clamp(min=1e-30)).max())


def _close(a, b, rel: float) -> None:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    err = float((a - b).abs().max())
    scale = float(b.abs().max()) + 1e-30
    assert err <= rel * scale, (err, scale)


def _data(n: int, d: int = 5, m: int = 4, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)
    x = (y[torch.arange(m) % n] + 0.5 * torch.randn(m, d, generator=g, dtype=torch.float64)).to(dtype)
    return y, x


def _check_all_ops(y: torch.Tensor, x: torch.Tensor, sharded, out: dict, tag: str) -> None:
    """Every op against the single-process one on the full set; results kept in out for the cross-rank check."""
    full = dg.TrainingSet(y)
    M = x.shape[0]
    sig = torch.linspace(0.3, 1.5, M, dtype=torch.float64)
    for s in (0.7, sig, sig.reshape(M, 1)):
        den, lse = dgd.softmax_denoise(x, sharded, s, return_lse=True)
        den0, lse0 = dg.softmax_denoise(x, full, s, return_lse=True)
        _close(den, den0, 1e-6)
        assert _rel(lse, lse0) <= 1e-6
    st = dgd.softmax_denoise(x, sharded, sig, 0.8, return_stats=True)
    st0 = dg.softmax_denoise(x, full, sig, 0.8, return_stats=True)
    for a, b in zip(st, st0):
        _close(a, b, 1e-6)
    kde = dgd.kde_log_density(x, sharded, sig)
    kde0 = dg.kde_log_density(x, full, sig)
    assert _rel(kde, kde0) <= 1e-9
    for k in sorted({1, min(3, len(full)), len(full)}):
        d2, idx = dgd.knn(x, sharded, k)
        d20, idx0 = dg.knn(x, full, k)
        assert torch.equal(idx, idx0), (tag, k, idx, idx0)
        _close(d2, d20, 1e-12)
    if len(full) >= 2:
        mem = dgd.memorization(x, sharded, threshold=0.9)
        mem0 = dg.memorization(x, full, threshold=0.9)
        assert mem.fraction == mem0.fraction and torch.equal(mem.nn_index, mem0.nn_index)
        assert torch.equal(mem.memorized, mem0.memorized)
    out[tag] = {"den": den, "lse": lse, "kde": kde, "idx": idx, "d2": d2}


def _worker_ops(rank: int, world: int, init: str, tmp: str) -> None:
    _init(rank, world, init)
    out: dict = {}
    for n in (7, 1, 2, 3, 40):  # uneven shards; N=1 leaves rank 1 empty
        y, x = _data(n, seed=n)
        sh = dgd.ShardedTrainingSet(y)
        assert sh.n == n and sh.bounds == [dgd.shard_bounds(n, world, r) for r in range(world)]
        assert (sh.local is None) == (sh.start == sh.stop)
        _check_all_ops(y, x, sh, out, f"full{n}")
    # from_local: rank 0 holds rows 0..4, rank 1 rows 5..6 (a different split than from_full's)
    y, x = _data(7, seed=11)
    rows = y[:5] if rank == 0 else y[5:]
    sh = dgd.ShardedTrainingSet.from_local(rows)
    assert (sh.start, sh.stop, sh.n) == ((0, 5, 7) if rank == 0 else (5, 7, 7))
    _check_all_ops(y, x, sh, out, "local")
    # from_local with an empty shard on rank 1
    sh = dgd.ShardedTrainingSet.from_local(y if rank == 0 else None)
    _check_all_ops(y, x, sh, out, "local_empty")
    # float32 digits, item shape (1, 8, 8), numpy queries
    digits = dg.TrainingSet.builtin("digits").subset(slice(0, 301))
    shd = dgd.ShardedTrainingSet(digits)
    q = (digits.tensor()[::60] + 0.2 * torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))).numpy()
    den, lse = dgd.softmax_denoise(q, shd, 0.3, return_lse=True)
    den0, lse0 = dg.softmax_denoise(q, digits, 0.3, return_lse=True)
    assert isinstance(den, np.ndarray) and den.shape == q.shape and den.dtype == np.float32
    _close(den, den0, 1e-6)
    assert _rel(lse, lse0) <= 1e-6
    d2, idx = dgd.knn(q, shd, 4)
    assert np.array_equal(idx, dg.knn(q, digits, 4)[1])
    copies = digits.tensor()[:3].numpy()  # exact copies of training points: memorized
    mem, mem0 = dgd.memorization(copies, shd), dg.memorization(copies, digits)
    assert mem.fraction == mem0.fraction == 1.0
    # errors, raised on every rank
    y, x = _data(7, seed=3)
    sh = dgd.ShardedTrainingSet(y)
    with pytest.raises(InputError, match="differ"):
        dgd.softmax_denoise(x + rank, sh, 0.5)
    with pytest.raises(InputError, match="sigma|differ"):
        dgd.kde_log_density(x, sh, 0.5 + rank)
    with pytest.raises(InputError, match="shape"):
        dgd.knn(x[: 3 + rank], sh, 2)
    with pytest.raises(InputError, match="k: expected"):
        dgd.knn(x, sh, 8)
    bad = x.clone()
    if rank == 1:
        bad[0, 0] = float("nan")
    with pytest.raises((InputError, dgd.DistributedError)):
        dgd.knn(bad, sh, 2)
    dgd.knn(x, sh, 2)  # the group still works after the errors
    torch.save(out, Path(tmp) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow  # spawns ranks, ~12 s
def test_distributed_ops_match_single_process(tmp_path):
    _spawn(_worker_ops, 2, tmp_path)
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    assert r0.keys() == r1.keys()
    for tag in r0:
        for key in r0[tag]:
            assert torch.equal(r0[tag][key], r1[tag][key]), (tag, key)  # every rank returns the identical result


def _worker_npy(rank: int, world: int, init: str, tmp: str, path: str) -> None:
    _init(rank, world, init)
    sh = dgd.ShardedTrainingSet(path)
    assert sh.local is not None and not sh.local.is_in_memory  # stays memory-mapped, only its rows are read
    assert len(sh.local) == sh.stop - sh.start == dgd.shard_bounds(sh.n, world, rank)[1] - sh.start
    full = dg.TrainingSet.open(path)
    x = full.tensor()[:5] + 0.1
    _close(dgd.softmax_denoise(x, sh, 0.4), dg.softmax_denoise(x, full, 0.4), 1e-6)
    assert torch.equal(dgd.knn(x, sh, 3)[1], dg.knn(x, full, 3)[1])
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow  # spawns three ranks, ~10 s
def test_distributed_three_ranks_memmap(tmp_path):
    y, _ = _data(10, d=6, dtype=torch.float32)
    path = tmp_path / "train.npy"
    np.save(path, y.numpy())
    _spawn(_worker_npy, 3, tmp_path, str(path))


def test_single_process_without_init():
    assert not dist.is_initialized()
    y, x = _data(9, seed=5)
    sh = dgd.ShardedTrainingSet(y)
    assert (sh.rank, sh.world, sh.start, sh.stop, len(sh)) == (0, 1, 0, 9, 9)
    _check_all_ops(y, x, sh, {}, "single")
    assert dgd.init_from_env() == (0, 1) or "RANK" in os.environ


def test_errors_single_process(monkeypatch):
    y, x = _data(5)
    sh = dgd.ShardedTrainingSet(y)
    with pytest.raises(InputError, match="k: expected"):
        dgd.knn(x, sh, 6)
    with pytest.raises(InputError, match="x: items"):
        dgd.softmax_denoise(x[:, :3], sh, 0.5)
    with pytest.raises(dg.InputTypeError, match="sharded"):
        dgd.softmax_denoise(x, y, 0.5)
    with pytest.raises(InputError, match="sharded: the ratio test"):
        dgd.memorization(x, dgd.ShardedTrainingSet(y[:1]))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(InputError, match="not initialized"):
        dgd.ShardedTrainingSet(y)


def test_shard_bounds():
    for n in (0, 1, 5, 7, 100):
        for w in (1, 2, 3, 8):
            b = [dgd.shard_bounds(n, w, r) for r in range(w)]
            assert b[0][0] == 0 and b[-1][1] == n and all(b[i][1] == b[i + 1][0] for i in range(w - 1))
            assert max(s - a for a, s in b) - min(s - a for a, s in b) <= 1


@pytest.mark.slow  # torchrun, ~10 s
def test_example_with_torchrun():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}", str(ROOT / "examples" / "distributed_demo.py"),
    ]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)
    assert p.returncode == 0, p.stdout + p.stderr
    out = p.stdout
    assert "rows=[0, 899) of N=1797" in out and "rows=[899, 1797) of N=1797" in out
    assert "knn indices equal: True" in out and "memorization equal: True" in out
    for line in out.splitlines():
        if line.startswith(("max |denoised diff|", "max relative lse diff")):
            assert float(line.split("=")[1]) < 1e-5, line
