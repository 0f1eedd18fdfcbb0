"""Compatibility module: the names ``diffgen_fast.report`` had before it was split, re-exported from their homes.

- :mod:`diffgen_fast.figures`: the figure primitives (``_new_figure``, ``_save_figure`` with its data / provenance
  stamp, ``nn_grid_figure``, ``ratio_histogram`` and the shared formatting helpers).
- :mod:`diffgen_fast.demo`: the demo behind ``diffgen-fast demo`` (``run_demo``, ``demo_report_markdown``).
- :mod:`diffgen_fast.metrics.score_report`: the outputs of ``diffgen-fast score`` (``write_score_outputs`` and its
  table, figure and Markdown writers).
- :mod:`diffgen_fast._atomic`: the atomic writers (``write_text_atomic``, ``write_bytes_atomic``,
  ``write_json_atomic``, ``write_npz_atomic``).
- :mod:`diffgen_fast.metrics.memorization`: ``write_memorization_csv``, the per-sample table of a MemorizationResult.

New code imports from those modules. Patching a name here changes nothing: patch it in its home module.
"""

from __future__ import annotations

from diffgen_fast._atomic import (  # noqa: F401
    PathLike,
    _atomic_target,
    _jsonable,
    write_bytes_atomic,
    write_json_atomic,
    write_npz_atomic,
    write_text_atomic,
)
from diffgen_fast.demo import (  # noqa: F401
    _backend_line,
    _progress_factory,
    _resolved_backends,
    _versions,
    demo_report_markdown,
    run_demo,
)
from diffgen_fast.figures import (  # noqa: F401
    _HIST_COLORS,
    _MEMORIZED_COLOR,
    _as_numpy,
    _fmt,
    _fmt_fraction,
    _format_ratio,
    _format_threshold,
    _git_sha,
    _new_figure,
    _pair_image,
    _provenance,
    _save_figure,
    _to_display,
    nn_grid_figure,
    ratio_histogram,
)
from diffgen_fast.metrics.memorization import write_memorization_csv
from diffgen_fast.metrics.score_report import (  # noqa: F401
    _short,
    distance_figure,
    score_report_markdown,
    train_vs_heldout_figure,
    write_score_csv,
    write_score_outputs,
)

__all__ = [
    "nn_grid_figure",
    "ratio_histogram",
    "write_json_atomic",
    "write_text_atomic",
    "write_memorization_csv",
    "demo_report_markdown",
    "run_demo",
]
