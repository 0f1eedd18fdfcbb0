"""``python -m diffgen_fast``: the same command line as ``diffgen-fast``."""

from __future__ import annotations

from diffgen_fast.cli import main

if __name__ == "__main__":
    main(prog_name="diffgen-fast")
