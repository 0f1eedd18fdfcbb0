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


@pytest.mark.parametrize("i, needs", [(0, None), (1, "k_diffusion"), (2, "diffusers")])
def test_readme_dropin_example_runs(i, needs, capsys):
    if needs is not None and importlib.util.find_spec(needs) is None:
        pytest.skip(f"{needs} is not installed")
    code = _blocks()[i]
    exec(compile(code, f"README block {i}", "exec"), {"__name__": "__readme__"})
    out = capsys.readouterr().out
    assert "1.0" in out
