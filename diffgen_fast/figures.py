"""Figure primitives shared by every module that draws: a matplotlib figure that touches no global state, saving it
atomically as PNG stamped with the data it shows and its provenance, the memorization figures used by several
reports, and the number formats of figures and reports.

Figures use matplotlib's object API with the Agg canvas and never touch ``matplotlib.pyplot``, so importing this
module (or drawing with it) changes no global plotting state; matplotlib itself is imported on the first figure.

- ``_new_figure(width, height)``: a Figure on an Agg canvas.
- ``_save_figure(fig, path, data=...)``: write it as PNG atomically, stamped in a corner with ``data`` (what it
  shows) and ``_provenance()`` (version, git SHA, date).
- ``nn_grid_figure``: each generated sample beside its nearest training image, most memorized first.
- ``ratio_histogram``: overlaid histograms of the nearest-neighbour ratio with the memorization threshold.
- ``_as_numpy``, ``_fmt``, ``_fmt_fraction``, ``_format_threshold``, ``_format_ratio``, ``_HIST_COLORS``: shared
  helpers.

Metrics, bench and the report writers import from here; nothing here imports them.
"""

from __future__ import annotations

import math
import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np

from diffgen_fast._atomic import _atomic_target
from diffgen_fast.errors import InputError

PathLike = Union[str, "os.PathLike[str]"]

__all__ = ["nn_grid_figure", "ratio_histogram"]

_MEMORIZED_COLOR = "#c0392b"
_HIST_COLORS = ("#c0392b", "#2471a3", "#27ae60", "#8e44ad", "#d68910", "#566573")


def _as_numpy(a: Any) -> np.ndarray:
    if hasattr(a, "detach") and hasattr(a, "cpu"):
        a = a.detach().cpu()
        if hasattr(a, "float") and str(getattr(a, "dtype", "")) in ("torch.bfloat16", "torch.float16"):
            a = a.float()
        a = a.numpy()
    return np.asarray(a)


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _git_sha() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        p = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    sha = p.stdout.strip()
    return sha if p.returncode == 0 and len(sha) >= 7 else None


def _provenance() -> str:
    """'diffgen-fast VERSION, git SHA, DATE': stamped in the corner of every figure the toolkit writes."""
    import datetime as _dt

    from diffgen_fast import __version__

    sha = _git_sha()
    day = _dt.date.today().isoformat()
    return f"diffgen-fast {__version__}" + (f" @ {sha[:10]}" if sha else "") + f", {day}"


def _save_figure(fig, path: PathLike, *, data: str | None = None) -> Path:
    """Write fig as PNG atomically, stamped in a corner with the data it shows (when given) and its provenance."""
    stamp = (f"data: {data}  |  " if data else "") + _provenance()
    fig.text(0.995, 0.003, stamp, ha="right", va="bottom", fontsize=6, color="0.45")
    with _atomic_target(path) as tmp:
        fig.savefig(tmp, format="png", dpi=fig.dpi, facecolor="white")
    return Path(path)


def _format_threshold(t: float) -> str:
    return "1/3" if abs(t - 1 / 3) < 1e-12 else f"{t:.3g}"


def _format_ratio(r: float) -> str:
    if not np.isfinite(r):
        return "ratio n/a"
    if r == 0:
        return "0 (exact copy)"
    return f"{r:.1e}" if r < 1e-3 else f"{r:.3f}"


def _fmt(v: Any, spec: str = ".3g", missing: str = "n/a") -> str:
    if v is None:
        return missing
    if isinstance(v, float):
        return format(v, spec) if math.isfinite(v) else missing
    return str(v)


def _fmt_fraction(v: Any) -> str:
    if not isinstance(v, (int, float)) or not math.isfinite(float(v)):
        return "n/a"
    return f"{100 * float(v):.1f}%"


def _to_display(x: np.ndarray, value_range: tuple[float, float]) -> np.ndarray:
    lo, hi = float(value_range[0]), float(value_range[1])
    if not hi > lo:
        raise InputError(f"value_range must be (low, high) with high > low, got {value_range!r}")
    return np.clip((x.astype(np.float64) - lo) / (hi - lo), 0.0, 1.0)


def _pair_image(a: np.ndarray, b: np.ndarray, gap: int) -> np.ndarray:
    """[C, H, W] x 2 in [0, 1] -> [H, 2W + gap, 3] RGB with a white gap column."""
    if a.shape[0] == 1:
        a, b = np.repeat(a, 3, axis=0), np.repeat(b, 3, axis=0)
    h = a.shape[1]
    sep = np.ones((3, h, gap))
    return np.concatenate([a, sep, b], axis=2).transpose(1, 2, 0)


def nn_grid_figure(
    samples: Any,
    neighbours: Any,
    ratios: Any,
    path: PathLike,
    *,
    value_range: tuple[float, float] = (-1.0, 1.0),
    ncols: int = 8,
    titles: Sequence[str] | None = None,
    max_items: int = 64,
    threshold: float | None = 1 / 3,
    suptitle: str | None = None,
    n_total: int | None = None,
    data: str | None = None,
) -> Path:
    """Draw each sample beside its nearest training image, most memorized (smallest ratio) first, and save a PNG.

    Args:
        samples: generated samples, [n, C, H, W] with C in {1, 3}, [n, H, W] (one channel) or flat [n, d].
        neighbours: the nearest training point of each sample, same shape as ``samples``.
        ratios: [n] nearest-neighbour ratios ||x - NN1|| / ||x - NN2||, printed under each pair; NaN sorts last.
        path: where the PNG goes (written atomically).
        value_range: (low, high) of the pixel values, mapped to black and white. Default (-1, 1).
        ncols: pairs per row. Default 8.
        titles: optional [n] labels printed above each pair (sorted along with the pairs).
        max_items: at most this many pairs are drawn (the most memorized ones). Default 64.
        threshold: ratios below it are printed in red as memorized; None to disable. Default 1/3.
        suptitle: optional first line of the figure title.
        n_total: how many samples there were when the caller passes only the most memorized ones (the title then
            says "most memorized n of n_total shown").

    Flat vectors (or images with a channel count other than 1 or 3) are drawn as line plots, sample solid and
    neighbour dashed, since they have no image layout. Returns ``Path(path)``.
    """
    x = _as_numpy(samples)
    y = _as_numpy(neighbours)
    r = _as_numpy(ratios).astype(np.float64).reshape(-1)
    if x.shape != y.shape:
        raise InputError(f"nn_grid_figure: samples {x.shape} and neighbours {y.shape} must have the same shape")
    if x.ndim < 2 or len(x) != len(r):
        raise InputError(f"nn_grid_figure: expected samples [n, ...] and ratios [n], got {x.shape} and {r.shape}")
    if titles is not None and len(titles) != len(r):
        raise InputError(f"nn_grid_figure: {len(titles)} titles for {len(r)} samples")
    if ncols < 1 or max_items < 1:
        raise InputError(f"nn_grid_figure: ncols and max_items must be >= 1, got {ncols} and {max_items}")

    if x.ndim == 3:
        x, y = x[:, None], y[:, None]
    if x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):  # channels-last images
        x, y = x.transpose(0, 3, 1, 2), y.transpose(0, 3, 1, 2)
    as_image = x.ndim == 4 and x.shape[1] in (1, 3)
    if not as_image:
        x, y = x.reshape(len(x), -1), y.reshape(len(y), -1)

    order = np.argsort(r, kind="stable")[:max_items]  # NaN last
    n = len(order)
    ncols = max(1, min(ncols, n))
    nrows = max(1, math.ceil(n / ncols))

    if as_image:
        _, _, h, w = x.shape
        gap = max(1, w // 8)
        pair_w_in = 1.7
        panel_h_in = pair_w_in * h / (2 * w + gap)
    else:
        pair_w_in, panel_h_in = 2.4, 1.2
    title_lines = max((str(t).count("\n") + 1 for t in titles), default=1) if titles is not None else 0
    text_h_in = 0.28 + 0.14 * title_lines
    head_in = 0.75
    fig = _new_figure(ncols * pair_w_in, nrows * (panel_h_in + text_h_in) + head_in)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).reshape(-1)
    fig_w, fig_h = fig.get_figwidth(), fig.get_figheight()
    fig.subplots_adjust(
        left=(0.1 if as_image else 0.35) / fig_w,
        right=1 - 0.1 / fig_w,
        bottom=0.3 / fig_h,
        top=1 - head_in / fig_h,
        wspace=0.08 if as_image else 0.25,
        hspace=0.45 if titles is None else 0.45 + 0.15 * title_lines,
    )

    for k, ax in enumerate(axes):
        if k >= n:
            ax.set_axis_off()
            continue
        i = int(order[k])
        if as_image:
            a, b = _to_display(x[i], value_range), _to_display(y[i], value_range)
            ax.imshow(_pair_image(a, b, gap), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
        else:
            t = np.arange(x.shape[1])
            ax.plot(t, x[i], lw=0.8, color="#1f3b73", label="sample")
            ax.plot(t, y[i], lw=0.8, ls="--", color="#e67e22", label="nearest")
            ax.set_xticks([])
            ax.tick_params(labelsize=6)
        ri = r[i]
        memorized = threshold is not None and np.isfinite(ri) and ri < threshold
        label = _format_ratio(ri)
        ax.text(
            0.5,
            -0.04,
            label,
            transform=ax.transAxes,
            ha="center",
            va="top",
            fontsize=8,
            color=_MEMORIZED_COLOR if memorized else "black",
            fontweight="bold" if memorized else "normal",
        )
        if titles is not None:
            ax.set_title(str(titles[i]), fontsize=7, pad=2)

    if as_image:
        what = "left: generated sample, right: nearest training image"
    else:
        what = "solid: generated sample, dashed: nearest training point (flat vectors, no image layout)"
    lines = [suptitle] if suptitle else []
    total = max(len(r), n_total or 0)
    lines.append(f"{what}; most memorized {n} of {total} shown" if total > n else f"{what}; most memorized first")
    rule = "number: ||x - NN1|| / ||x - NN2||"
    if threshold is not None:
        rule += f", red when < {_format_threshold(threshold)} (memorized)"
    lines.append(rule)
    fig.suptitle("\n".join(lines), fontsize=9, y=1 - 0.08 / fig.get_figheight(), va="top")
    if n == 0:
        axes[0].text(0.5, 0.5, "no samples", ha="center", va="center", transform=axes[0].transAxes)
    return _save_figure(fig, path, data=data)


def ratio_histogram(
    ratios_by_name: Mapping[str, Any],
    path: PathLike,
    *,
    threshold: float = 1 / 3,
    bins: int = 40,
    title: str | None = None,
    data: str | None = None,
) -> Path:
    """Overlaid histograms of nearest-neighbour ratios, one per name, with the memorization threshold; save a PNG.

    Args:
        ratios_by_name: {name: [n] ratios ||x - NN1|| / ||x - NN2||}; NaN values are dropped and counted.
        path: where the PNG goes (written atomically).
        threshold: the memorization threshold drawn as a vertical line. Default 1/3.
        bins: number of bins over [0, 1] (widened if a ratio exceeds 1). Default 40.
        title: optional figure title.
    """
    fig = _new_figure(7.0, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    data = {name: _as_numpy(v).astype(np.float64).reshape(-1) for name, v in ratios_by_name.items()}
    hi = 1.0
    for v in data.values():
        finite = v[np.isfinite(v)]
        if finite.size:
            hi = max(hi, float(finite.max()))
    edges = np.linspace(0.0, hi, bins + 1)
    for k, (name, v) in enumerate(data.items()):
        color = _HIST_COLORS[k % len(_HIST_COLORS)]
        finite = v[np.isfinite(v)]
        frac = float(np.mean(finite < threshold)) if finite.size else float("nan")
        label = f"{name}: n={finite.size}, memorized {frac:.0%}" if finite.size else f"{name}: no finite ratios"
        if finite.size < v.size:
            label += f" ({v.size - finite.size} NaN dropped)"
        ax.hist(finite, bins=edges, color=color, alpha=0.35, label=label)
        ax.hist(finite, bins=edges, color=color, histtype="step", lw=1.4)
    ax.axvline(threshold, color="black", ls="--", lw=1.2, label=f"threshold {_format_threshold(threshold)}")
    ax.axvspan(0.0, threshold, color="#c0392b", alpha=0.05, lw=0)
    ax.set_xlim(0.0, hi)
    ax.set_xlabel("nearest-neighbour ratio  ||x - NN1|| / ||x - NN2||  (L2)")
    ax.set_ylabel("samples")
    ax.set_title(title or "Memorization ratio test: below the threshold = memorized", fontsize=10)
    ax.legend(fontsize=8, loc="upper center", frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save_figure(fig, path, data=data)
