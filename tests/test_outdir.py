"""Output folders: one run at a time, and a run's files published as one set (diffgen_fast._outdir)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from click.testing import CliRunner

from diffgen_fast._outdir import OutputFolder, OutputLockedError, read_manifest, verify_manifest
from diffgen_fast.cli import main
from diffgen_fast.errors import InputError


def _publish(out, files: dict, **kw):
    with OutputFolder(out) as f:
        st = f.stage()
        for name, text in files.items():
            (st / name).write_text(text)
        f.publish(list(files), **kw)
        return f.run_id


def _leftovers(out):
    return sorted(p.name for p in out.iterdir() if p.name.startswith(".staging-") or p.name.endswith(".tmp"))


def test_publish_writes_the_set_and_a_manifest(tmp_path):
    out = tmp_path / "o"
    run = _publish(out, {"a.txt": "1", "b.txt": "2"}, info={"command": "test"})
    m = read_manifest(out)
    assert m["run"] == run and m["command"] == "test" and set(m["files"]) == {"a.txt", "b.txt"}
    assert verify_manifest(out) == [] and _leftovers(out) == []
    # a second run with fewer files: the old set's extra file goes, so the folder holds exactly one run's set
    run2 = _publish(out, {"a.txt": "3"})
    assert read_manifest(out)["run"] == run2 and not (out / "b.txt").exists() and (out / "a.txt").read_text() == "3"
    (out / "a.txt").write_text("changed underneath")
    assert verify_manifest(out) == [f"a.txt: not the file run {run2} wrote"]


def test_second_holder_is_refused_at_once(tmp_path):
    with OutputFolder(tmp_path / "o"):
        t0 = time.perf_counter()
        with pytest.raises(OutputLockedError, match="in use by another run .*pid"):
            OutputFolder(tmp_path / "o").__enter__()
        assert time.perf_counter() - t0 < 1.0
    with OutputFolder(tmp_path / "o"):  # released on exit
        pass


def test_lock_is_released_when_the_holder_dies(tmp_path):
    code = (
        "from diffgen_fast._outdir import OutputFolder; import os; "
        f"OutputFolder({str(tmp_path / 'o')!r}).__enter__(); os._exit(9)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 9
    with OutputFolder(tmp_path / "o"):
        pass


@pytest.mark.parametrize("bad", ["", "  "])
def test_empty_path_refused(bad):
    with pytest.raises(InputError, match="out: expected a folder path"):
        OutputFolder(bad, name="out")


def test_a_file_is_not_a_folder(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(InputError, match="is not a folder"):
        OutputFolder(tmp_path / "f").__enter__()


def _killed_publish(out, files: dict, kill_after_moves: int | None) -> int:
    """A run in a child process killed (os._exit) after `kill_after_moves` file moves of its publication, or while
    writing its stage when None."""
    code = textwrap.dedent(
        f"""
        import os
        from diffgen_fast import _outdir
        files = {files!r}
        f = _outdir.OutputFolder({str(out)!r}).__enter__()
        st = f.stage()
        for name, text in files.items():
            (st / name).write_text(text)
            if {kill_after_moves!r} is None:
                os._exit(9)
        real, n = os.replace, [0]
        def replace(a, b):
            if str(a).startswith(str(st)):
                if n[0] == {kill_after_moves!r}:
                    os._exit(9)
                n[0] += 1
            return real(a, b)
        _outdir.os.replace = replace
        f.publish(list(files))
        """
    )
    return subprocess.run([sys.executable, "-c", code]).returncode


def test_kill_while_writing_leaves_the_old_set(tmp_path):
    out = tmp_path / "o"
    old = _publish(out, {"a.txt": "old a", "b.txt": "old b"})
    assert _killed_publish(out, {"a.txt": "new a", "b.txt": "new b"}, None) == 9
    assert (out / "a.txt").read_text() == "old a" and read_manifest(out)["run"] == old and verify_manifest(out) == []
    with OutputFolder(out):  # the next run clears the dead run's stage
        assert _leftovers(out) == []


@pytest.mark.parametrize("moves", [0, 1, 2])
def test_kill_while_publishing_is_rolled_forward(tmp_path, moves):
    out = tmp_path / "o"
    _publish(out, {"a.txt": "old a", "b.txt": "old b", "old_only.txt": "x"})
    assert _killed_publish(out, {"a.txt": "new a", "b.txt": "new b", "c.txt": "new c"}, moves) == 9
    with OutputFolder(out):
        pass
    assert [(out / f).read_text() for f in ("a.txt", "b.txt", "c.txt")] == ["new a", "new b", "new c"]
    assert not (out / "old_only.txt").exists() and verify_manifest(out) == [] and _leftovers(out) == []
    assert not (out / ".publish.json").exists()


def test_cli_score_refuses_a_busy_folder_and_publishes_one_set(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.normal(size=(300, 8)).astype("f4")
    np.save(tmp_path / "train.npy", y)
    np.save(tmp_path / "samples.npy", np.concatenate([y[:10], rng.normal(size=(10, 8)).astype("f4")]))
    np.save(tmp_path / "held.npy", rng.normal(size=(40, 8)).astype("f4"))
    out = tmp_path / "out"
    base = ["score", "--train", str(tmp_path / "train.npy"), "--samples", str(tmp_path / "samples.npy"),
            "--out", str(out), "--no-progress"]  # fmt: skip
    with OutputFolder(out):
        r = CliRunner().invoke(main, base)
        assert r.exit_code == 2 and "in use by another run" in r.output, r.output
        assert not (out / "summary.json").exists()
    r = CliRunner().invoke(main, [*base, "--heldout", str(tmp_path / "held.npy")])
    assert r.exit_code == 0, r.output
    m1 = read_manifest(out)
    assert "train_vs_heldout.png" in m1["files"] and verify_manifest(out) == []
    assert json.loads((out / "summary.json").read_text())["n_memorized"] == 10
    r = CliRunner().invoke(main, base)  # no held-out set this time: the old figure must not stay behind
    assert r.exit_code == 0, r.output
    m2 = read_manifest(out)
    assert m2["run"] != m1["run"] and "train_vs_heldout.png" not in m2["files"]
    assert not (out / "train_vs_heldout.png").exists() and verify_manifest(out) == []
    assert _leftovers(out) == [] and not (out / ".checkpoints").exists()
    names = set(os.listdir(out))
    assert names == {*m2["files"], "manifest.json", ".lock", ".cache"} - ({".cache"} - names)
