"""The README's drop-in examples run as written (EDM class-conditional, k-diffusion, diffusers)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks():
    s = README.read_text()
    part = s[s.index("## Drop it into") : s.index("## Backends")]
    return re.findall(r"```python\n(.*?)```", part, re.S)


def _printed():
    """The "prints" block after each python block of the drop-in section."""
    s = README.read_text()
    part = s[s.index("## Drop it into") : s.index("## The papers")]
    return re.findall(r"```python\n.*?```\n\nprints\n\n```\n(.*?)```", part, re.S)


@pytest.mark.parametrize("i, needs", [(0, None), (1, "k_diffusion"), (2, "diffusers")])
def test_readme_dropin_example_runs(i, needs, capsys):
    """Each drop-in example runs as written and prints exactly what the README says it prints."""
    if needs is not None and importlib.util.find_spec(needs) is None:
        pytest.skip(f"{needs} is not installed")
    code = _blocks()[i]
    exec(compile(code, f"README block {i}", "exec"), {"__name__": "__readme__"})
    out = capsys.readouterr().out
    assert out.strip().splitlines() == _printed()[i].strip().splitlines()


def _normalise(text: str) -> list[str]:
    """The printed lines with what differs between runs masked: timings and the image cache's stamp hash."""
    out = []
    for line in text.strip().splitlines():
        if line.startswith("done in "):
            continue
        out.append(re.sub(r"train-[0-9a-f]{16}\.npy", "train-HASH.npy", line.rstrip()))
    return out


@pytest.mark.slow  # the CLI on image folders, ~10 s
def test_readme_score_image_example_prints_what_the_readme_says(tmp_path):
    """The README's image-folder score example, run as written: the same lines (the same counts, names, values)."""
    import subprocess
    import sys

    s = README.read_text()
    part = s[s.index("On images, with named samples") :]
    commands = re.search(r"```bash\n(.*?)```", part, re.S).group(1)
    printed = re.search(r"prints \(a real run[^\n]*\n\n```\n(.*?)```", part, re.S).group(1)
    script = Path(__file__).resolve().parents[1] / "examples" / "make_image_example.py"
    lines = []
    for cmd in [c.split("#")[0].strip() for c in commands.strip().splitlines()]:
        if cmd.startswith("python examples/make_image_example.py"):
            argv = [sys.executable, str(script)]
        elif cmd.startswith("diffgen-fast "):
            argv = [sys.executable, "-m", "diffgen_fast", *cmd.split()[1:], "--no-progress"]
        elif cmd.startswith("head -3 "):
            lines += (tmp_path / cmd.split()[-1]).read_text().splitlines()[:3]
            continue
        else:
            raise AssertionError(f"unexpected README command {cmd!r}")
        r = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        lines += r.stdout.splitlines()
    assert _normalise("\n".join(lines)) == _normalise(printed)
