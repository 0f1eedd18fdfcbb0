"""Reports: per-sample tables, JSON summaries, Markdown and PNG figures.

Everything here writes atomically (a temporary file in the destination folder, fsync, ``os.replace``), so a reader
never sees a half-written file and an interrupted run leaves no debris. Figures use matplotlib's object API with the
Agg canvas and never touch ``matplotlib.pyplot``, so importing this module changes no global plotting state.

The public pieces:

- ``nn_grid_figure``: each generated sample beside its nearest training image, most memorized first.
- ``ratio_histogram``: overlaid histograms of the nearest-neighbour ratio with the memorization threshold.
- ``write_json_atomic``, ``write_text_atomic``, ``write_memorization_csv``: atomic writers.
- ``demo_report_markdown``: the ``report.md`` text of a demo summary.
- ``run_demo``: the end-to-end demo behind ``diffgen-fast demo``.
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import math
import os
import platform
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np

from diffgen_fast.errors import InputError

PathLike = Union[str, "os.PathLike[str]"]

__all__ = [
    "nn_grid_figure",
    "ratio_histogram",
    "write_json_atomic",
    "write_text_atomic",
    "write_memorization_csv",
    "demo_report_markdown",
    "run_demo",
]

_MEMORIZED_COLOR = "#c0392b"
_HIST_COLORS = ("#c0392b", "#2471a3", "#27ae60", "#8e44ad", "#d68910", "#566573")

# ----------------------------------------------------------------------------------------------------------------------
# Atomic writes


from diffgen_fast._atomic import _atomic_target, write_bytes_atomic, write_text_atomic  # noqa: E402, F401


def _jsonable(obj: Any) -> Any:
    """A copy of ``obj`` that ``json.dumps(allow_nan=False)`` accepts: numpy/torch values become Python values,
    paths become strings and non-finite floats become ``None``."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "detach") and hasattr(obj, "cpu"):  # a torch tensor, without importing torch
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, (datetime.datetime, datetime.date)):
        return obj.isoformat()
    raise InputError(f"write_json_atomic: cannot serialise a value of type {type(obj).__name__}")


def write_json_atomic(obj: Any, path: PathLike, *, indent: int = 2) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically.

    numpy scalars and arrays, torch tensors and paths are converted; NaN and infinities are written as ``null`` so
    the file is strict JSON that any reader accepts.
    """
    text = json.dumps(_jsonable(obj), indent=indent, allow_nan=False) + "\n"
    return write_text_atomic(text, path)


def write_memorization_csv(result: Any, path: PathLike) -> Path:
    """Write the per-sample table of a memorization result to ``path`` atomically.

    Columns: ``index`` (sample), ``nn1``, ``nn2`` (training indices of the two nearest neighbours), ``d1``, ``d2``
    (their L2 distances, not squared), ``ratio`` (d1 / d2) and ``memorized`` (0/1). ``result`` needs the fields
    ``nn_index`` [M, 2], ``nn_dist`` [M, 2], ``ratio`` [M] and ``memorized`` [M] of ``MemorizationResult``.
    """
    nn_index = _as_numpy(result.nn_index).astype(np.int64)
    nn_dist = _as_numpy(result.nn_dist).astype(np.float64)
    ratio = _as_numpy(result.ratio).astype(np.float64)
    memorized = _as_numpy(result.memorized).astype(bool)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["index", "nn1", "nn2", "d1", "d2", "ratio", "memorized"])
    for i in range(len(ratio)):
        w.writerow(
            [
                i,
                int(nn_index[i, 0]),
                int(nn_index[i, 1]),
                f"{nn_dist[i, 0]:.9g}",
                f"{nn_dist[i, 1]:.9g}",
                f"{ratio[i]:.9g}",
                int(memorized[i]),
            ]
        )
    return write_text_atomic(buf.getvalue(), path)


# ----------------------------------------------------------------------------------------------------------------------
# Figures


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


# ----------------------------------------------------------------------------------------------------------------------
# Markdown


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


def _backend_line(settings: Mapping[str, Any]) -> str:
    line = _fmt(settings.get("backend"))
    resolved = settings.get("resolved_backends") or {}
    if resolved:
        line += " (ran: " + ", ".join(f"{op} {_fmt(b)}" for op, b in resolved.items()) + ")"
    if settings.get("backend_env"):
        line += f"; DIFFGEN_FAST_BACKEND={settings['backend_env']}"
    return line


def demo_report_markdown(summary: Mapping[str, Any]) -> str:
    """The ``report.md`` text of a demo summary (the dict ``run_demo`` returns and writes to ``report.json``).

    Missing keys are shown as "n/a" rather than failing, so a partial summary still renders.
    """
    data = summary.get("data", {}) or {}
    settings = summary.get("settings", {}) or {}
    versions = summary.get("versions", {}) or {}
    timings = summary.get("timings", {}) or {}
    denoisers = summary.get("denoisers", {}) or {}
    files = summary.get("files", {}) or {}
    threshold = settings.get("threshold", 1 / 3)
    vr = data.get("value_range", [-1.0, 1.0])

    out: list[str] = []
    out.append("# diffgen-fast demo: memorization of the empirical optimal denoiser\n")
    out.append(
        "Samples drawn with the empirical optimal denoiser D*(x) (the exact minimiser of the denoising loss over the "
        "training set) and with the Gaussian (linear) denoiser of the same training set, then scored with the "
        "nearest-neighbour ratio test.\n"
    )
    out.append("## What was run\n")
    shape = data.get("shape")
    shape_s = "x".join(str(s) for s in shape) if shape else "n/a"
    rows = [
        ("data", f"{_fmt(data.get('name'))} ({_fmt(data.get('source'))})"),
        ("training points N", _fmt(data.get("n_train"))),
        ("dimension d", f"{_fmt(data.get('d'))} (item shape {shape_s})"),
        (
            "sampler",
            f"{_fmt(settings.get('sampler'))}, {_fmt(settings.get('steps'))} steps, sigma "
            f"{_fmt(settings.get('sigma_max'))} -> {_fmt(settings.get('sigma_min'))}, rho {_fmt(settings.get('rho'))}, "
            f"churn {_fmt(settings.get('churn'))}",
        ),
        ("samples per denoiser", _fmt(settings.get("n_samples"))),
        ("seed", _fmt(settings.get("seed"))),
        ("backend", _backend_line(settings)),
        ("device", _fmt(summary.get("device"))),
        ("total time", f"{_fmt(timings.get('total_s'), '.2f')} s"),
        ("date", _fmt(summary.get("created"))),
        ("git SHA", _fmt(summary.get("git_sha"), missing="unknown")),
        (
            "versions",
            ", ".join(f"{k} {v}" for k, v in versions.items()) if versions else "n/a",
        ),
    ]
    out.append("| | |\n|---|---|")
    out.extend(f"| {k} | {v} |" for k, v in rows)
    out.append("")

    out.append("## Results\n")
    out.append("| denoiser | samples | memorized fraction | median ratio | sampling time | scoring time |")
    out.append("|---|---:|---:|---:|---:|---:|")
    for name, d in denoisers.items():
        t = d.get("timings", {}) or {}
        label = f"{name} ({d['class']})" if d.get("class") else name
        out.append(
            f"| {label} | {_fmt(d.get('n_samples'))} | {_fmt_fraction(d.get('memorized_fraction'))} | "
            f"{_fmt(d.get('median_ratio'), '.4f')} | {_fmt(t.get('sample_s'), '.2f')} s | "
            f"{_fmt(t.get('score_s'), '.2f')} s |"
        )
    out.append("")

    out.append("## Conventions\n")
    out.append(
        f"- Distances are L2 (not squared) in pixel space, on images scaled to "
        f"[{_fmt(vr[0] if vr else None)}, {_fmt(vr[1] if vr else None)}], flattened to d = {_fmt(data.get('d'))}."
    )
    out.append(
        f"- A sample x is memorized when ||x - NN1(x)|| / ||x - NN2(x)|| < {_format_threshold(float(threshold))}, "
        "with NN1 and NN2 its two nearest training points (Yoon et al. 2023; Gu et al. 2023)."
    )
    out.append("- The median ratio is over all samples of a denoiser; smaller means closer to a single training image.")
    out.append("")

    out.append("## Expected outcome\n")
    out.append(
        "- **Empirical optimum: about 100% memorized.** With a deterministic sampler every sample lands on a training "
        "point (Yi, Sun, Li 2023): as sigma -> 0, D*(x) is the nearest training point, so the ratio is ~0."
    )
    out.append(
        "- **Gaussian denoiser: about 0% memorized.** It only knows the mean and covariance of the data, so its "
        "samples are new points of the fitted Gaussian, not copies (Li, Dai, Qu 2024)."
    )
    expected = {"empirical": (0.9, None), "gaussian": (None, 0.2)}
    checks = []
    for name, (lo, hi) in expected.items():
        f = (denoisers.get(name) or {}).get("memorized_fraction")
        if isinstance(f, (int, float)) and math.isfinite(float(f)):
            ok = (lo is None or f >= lo) and (hi is None or f <= hi)
            checks.append(f"{name} {_fmt_fraction(f)} ({'as expected' if ok else 'NOT as expected'})")
    if checks:
        out.append(f"- This run: {'; '.join(checks)}.")
    out.append("")

    out.append("## Figures\n")
    out.append("Histogram of the nearest-neighbour ratio, both denoisers:\n")
    out.append(f"![ratio histogram]({files.get('ratio_hist', 'ratio_hist.png')})\n")
    for name, d in denoisers.items():
        f = (d.get("files", {}) or {}).get("nn_grid", f"nn_grid_{name}.png")
        out.append(f"{name}: each sample (left) beside its nearest training image (right), most memorized first:\n")
        out.append(f"![{name} nearest neighbours]({f})\n")

    out.append("## Files\n")
    for name, d in denoisers.items():
        f = (d.get("files", {}) or {}).get("csv")
        if f:
            out.append(f"- [{f}]({f}): per-sample table for {name} (index, nn1, nn2, d1, d2, ratio, memorized)")
    out.append("- [report.json](report.json): this summary, machine-readable")
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------------------------------------------
# The demo


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


def _resolved_backends(backend: str, device: Any) -> dict[str, str | None]:
    """Which backend each op actually ran with (what "auto" resolved to), None where that cannot be told."""
    from diffgen_fast.ops import dispatch

    out: dict[str, str | None] = {}
    for op in ("softmax_denoise", "knn"):
        try:
            out[op] = dispatch.resolve(op, backend, device)[0]
        except Exception:
            out[op] = None
    return out


def _progress_factory(progress: bool, name: str) -> Any:
    """A tqdm factory for ``sample(progress=...)`` whose bar names the denoiser; False when off."""
    if not progress:
        return False

    def factory(total: int, desc: str) -> Any:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=f"{name}: {desc}", unit="call", leave=False)

    return factory


def _versions() -> dict[str, str]:
    import torch

    import diffgen_fast

    return {
        "python": platform.python_version(),
        "diffgen_fast": getattr(diffgen_fast, "__version__", "unknown"),
        "torch": torch.__version__,
        "numpy": np.__version__,
    }


def run_demo(
    out_dir: PathLike,
    *,
    n: int = 64,
    steps: int = 18,
    seed: int = 0,
    backend: str = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """Sample the built-in digits with the empirical optimal and the Gaussian denoiser, score both, write a report.

    Draws ``n`` samples with ``EmpiricalDenoiser`` and ``n`` with ``GaussianDenoiser`` (same seed, EDM Heun sampler),
    runs the nearest-neighbour ratio test on both and writes into ``out_dir`` (each file atomically):
    ``report.md``, ``report.json`` (the returned summary), ``nn_grid_empirical.png``, ``nn_grid_gaussian.png``,
    ``ratio_hist.png`` and ``per_sample_{empirical,gaussian}.csv``. ``report.json`` is written last.

    Args:
        out_dir: output folder, created if needed.
        n: samples per denoiser (>= 2). Default 64.
        steps: sampler steps (>= 1). Default 18.
        seed: random seed of the initial noise. Default 0.
        backend: backend of the denoiser kernel and of the kNN search ("auto", "torch", "cpu", ...). Default "auto".
        progress: show a progress bar while sampling. Default True.
    """
    from diffgen_fast.data import TrainingSet
    from diffgen_fast.denoisers import EmpiricalDenoiser, GaussianDenoiser
    from diffgen_fast.metrics.memorization import memorization
    from diffgen_fast.sampling import sample

    if int(n) < 2:
        raise InputError(f"run_demo: n must be >= 2, got {n}")
    if int(steps) < 1:
        raise InputError(f"run_demo: steps must be >= 1, got {steps}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    t0 = time.perf_counter()
    ts = TrainingSet.builtin("digits")
    train_images = ts.tensor()
    load_s = time.perf_counter() - t0
    shape = tuple(int(s) for s in ts.shape)
    value_range = tuple(float(v) for v in ts.value_range)
    sampler = dict(sampler="heun", sigma_min=0.002, sigma_max=80.0, rho=7.0, churn=0.0)

    makers = {
        "empirical": lambda: EmpiricalDenoiser(ts, backend=backend),
        "gaussian": lambda: GaussianDenoiser(ts),
    }
    results: dict[str, Any] = {}
    per_denoiser: dict[str, Any] = {}
    threshold = 1 / 3
    for name, make in makers.items():
        t0 = time.perf_counter()
        denoiser = make()
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        x = sample(
            denoiser, n, steps=steps, seed=seed, shape=shape, progress=_progress_factory(progress, name), **sampler
        )
        sample_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = memorization(x, ts, threshold=threshold, backend=backend)
        score_s = time.perf_counter() - t0
        threshold = float(res.threshold)
        ratio = _as_numpy(res.ratio).astype(np.float64)
        finite = ratio[np.isfinite(ratio)]
        results[name] = (x, res)
        per_denoiser[name] = {
            "class": type(denoiser).__name__,
            "n_samples": int(res.n_samples),
            "memorized_fraction": float(res.fraction),
            "n_memorized": int(_as_numpy(res.memorized).sum()),
            "median_ratio": float(np.median(finite)) if finite.size else None,
            "min_ratio": float(finite.min()) if finite.size else None,
            "max_ratio": float(finite.max()) if finite.size else None,
            "timings": {"build_s": build_s, "sample_s": sample_s, "score_s": score_s},
            "memorization": res.summary(),
            "files": {"nn_grid": f"nn_grid_{name}.png", "csv": f"per_sample_{name}.csv"},
        }

    t0 = time.perf_counter()
    for name, (x, res) in results.items():
        nn1 = _as_numpy(res.nn_index)[:, 0].astype(np.int64)
        neighbours = _as_numpy(train_images)[nn1]
        titles = [f"#{i} \u2192 train {j}" for i, j in enumerate(nn1.tolist())]
        nn_grid_figure(
            _as_numpy(x).reshape(len(nn1), *shape),
            neighbours.reshape(len(nn1), *shape),
            res.ratio,
            out / per_denoiser[name]["files"]["nn_grid"],
            value_range=value_range,
            titles=titles,
            threshold=threshold,
            suptitle=f"{per_denoiser[name]['class']} on {ts.source}: "
            f"{per_denoiser[name]['memorized_fraction']:.0%} memorized",
        )
        write_memorization_csv(res, out / per_denoiser[name]["files"]["csv"])
    ratio_histogram(
        {name: res.ratio for name, (_, res) in results.items()}, out / "ratio_hist.png", threshold=threshold,
        data=f"samples of each denoiser vs {ts.source}",
    )  # fmt: skip
    figures_s = time.perf_counter() - t0

    device = str(getattr(train_images, "device", "cpu"))
    summary: dict[str, Any] = {
        "kind": "diffgen_fast.demo",
        "schema": 1,
        "created": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
        "versions": _versions(),
        "git_sha": _git_sha(),
        "platform": platform.platform(),
        "device": device,
        "data": {
            "name": "digits",
            "source": str(ts.source),
            "n_train": len(ts),
            "d": int(ts.d),
            "shape": list(shape),
            "value_range": list(value_range),
        },
        "settings": {"n_samples": int(n), "steps": int(steps), "seed": int(seed), "backend": backend, **sampler},
        "conventions": {
            "distance": "L2 (not squared), pixel space",
            "value_range": list(value_range),
            "ratio": "||x - NN1|| / ||x - NN2||",
            "memorized": f"ratio < {_format_threshold(threshold)}",
        },
        "denoisers": per_denoiser,
        "timings": {"load_s": load_s, "figures_s": figures_s},
        "files": {
            "report_md": "report.md",
            "report_json": "report.json",
            "ratio_hist": "ratio_hist.png",
            **{f"nn_grid_{k}": v["files"]["nn_grid"] for k, v in per_denoiser.items()},
            **{f"csv_{k}": v["files"]["csv"] for k, v in per_denoiser.items()},
        },
    }
    summary["settings"]["threshold"] = threshold
    summary["settings"]["backend_env"] = os.environ.get("DIFFGEN_FAST_BACKEND") or None
    summary["settings"]["resolved_backends"] = _resolved_backends(backend, train_images.device)
    summary["timings"]["total_s"] = time.perf_counter() - t_start
    write_text_atomic(demo_report_markdown(summary), out / "report.md")
    write_json_atomic(summary, out / "report.json")
    return _jsonable(summary)


# ----------------------------------------------------------------------------------------------------------------------
# `diffgen-fast score`: per-sample table, summary, figures, report


def write_score_csv(per: Mapping[str, Any], path: PathLike) -> Path:
    """Per-sample table of a ScoreResult: index, sample_name (source name of the sample: file name in a folder or
    zip, "file:key[row]" of arrays), nn1..nnk, nn_name (source name of nn1), d1..dk (L2), ratio, memorized and,
    when computed, inauthentic, train_nn_other_dist, cell and cell_nn_dist (C_T's distance to the nearest training
    point in the sample's own cell). Written atomically."""
    nn_index = np.asarray(per["nn_index"])
    nn_dist = np.asarray(per["nn_dist"], dtype=np.float64)
    k = nn_index.shape[1]
    extra = [c for c in ("inauthentic", "train_nn_other_dist", "cell", "cell_nn_dist") if c in per]
    names = "sample_name" in per and "nn_name" in per
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(
        [
            "index",
            *(["sample_name"] if names else []),
            *[f"nn{j + 1}" for j in range(k)],
            *(["nn_name"] if names else []),
            *[f"d{j + 1}" for j in range(k)],
            "ratio",
            "memorized",
            *extra,
        ]
    )
    for i in range(nn_index.shape[0]):
        row = [
            i,
            *([str(per["sample_name"][i])] if names else []),
            *[int(v) for v in nn_index[i]],
            *([str(per["nn_name"][i])] if names else []),
            *[f"{v:.9g}" for v in nn_dist[i]],
            f"{float(per['ratio'][i]):.9g}",
            int(per["memorized"][i]),
        ]
        for c in extra:
            v = per[c][i]
            row.append(int(v) if c in ("inauthentic", "cell") else f"{float(v):.9g}")
        w.writerow(row)
    return write_text_atomic(buf.getvalue(), path)


def write_npz_atomic(arrays: Mapping[str, Any], path: PathLike) -> Path:
    """np.savez of plain arrays (no object arrays, so np.load(allow_pickle=False) reads it), atomically."""
    with _atomic_target(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})
    return Path(path)


def distance_figure(
    per: Mapping[str, Any], held: Mapping[str, Any] | None, path: PathLike, data: str | None = None
) -> Path:
    """Histogram of the samples' nearest-training-point distances, and the held-out samples' for comparison."""
    fig = _new_figure(7.0, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    series = {"generated": np.asarray(per["nn_dist"])[:, 0]}
    if held is not None:
        series["held-out real"] = np.asarray(held["nn_dist"])[:, 0]
    allv = np.concatenate([v[np.isfinite(v)] for v in series.values()])
    hi = float(allv.max()) if allv.size else 1.0
    edges = np.linspace(0.0, hi if hi > 0 else 1.0, 41)
    for k, (name, v) in enumerate(series.items()):
        c = _HIST_COLORS[k % len(_HIST_COLORS)]
        ax.hist(v, bins=edges, color=c, alpha=0.35, label=f"{name}: n={v.size}, median {np.median(v):.3g}")
        ax.hist(v, bins=edges, color=c, histtype="step", lw=1.4)
    ax.set_xlabel("distance to the nearest training point (L2)")
    ax.set_ylabel("samples")
    ax.set_title("Nearest-training-point distances (a spike at 0 = copies)", fontsize=10)
    ax.legend(fontsize=8, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save_figure(fig, path, data=data)


def train_vs_heldout_figure(
    per: Mapping[str, Any],
    held: Mapping[str, Any],
    ct: Mapping[str, Any] | None,
    path: PathLike,
    data: str | None = None,
) -> Path:
    """Empirical CDFs of the distance to the nearest training point for generated and held-out samples (C_T's
    comparison: within each point's cell for the reference C_T), with C_T in the title."""
    fig = _new_figure(7.0, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    in_cell = ct is not None and ct.get("variant") == "reference" and "cell_nn_dist" in per
    pick = (lambda r: np.asarray(r["cell_nn_dist"])) if in_cell else (lambda r: np.asarray(r["nn_dist"])[:, 0])
    for k, (name, v) in enumerate((("generated -> train", pick(per)), ("held-out -> train", pick(held)))):
        v = np.sort(v[np.isfinite(v)])
        ax.step(
            v,
            np.arange(1, v.size + 1) / max(1, v.size),
            where="post",
            color=_HIST_COLORS[k],
            lw=1.6,
            label=f"{name} (n={v.size})",
        )
    title = "Distance to the training set: generated vs held-out real samples"
    if ct is not None:
        title += f"\nC_T = {_fmt(ct.get('C_T'), '.3g')} over {ct.get('cells_used')} cells (negative = copying)"
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("distance to the nearest training point" + (" in the same C_T cell" if in_cell else "") + " (L2)")
    ax.set_ylabel("fraction of samples")
    ax.legend(fontsize=8, frameon=False, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save_figure(fig, path, data=data)


def score_report_markdown(summary: Mapping[str, Any], files: Sequence[str]) -> str:
    s = summary
    lines = [
        "# diffgen-fast memorization report",
        "",
        f"Training set: {s['train']['source']} (N = {s['train']['n']}, item shape {tuple(s['train']['shape'])}, "
        f"fingerprint `{s['train']['fingerprint'][:16]}`). Samples: {s['n_samples']}; held-out: {s['n_heldout']}.",
        f"Space: {s['space']}; distance: {s['distance']}; values: {s.get('value_range') or 'as stored'}; "
        f"k = {s['k']}; backend: {s['backend']}; {'exact' if s['exact'] else 'approximate'} search.",
        "",
        "| test | result |",
        "|---|---|",
        f"| NN ratio < {_format_threshold(s['threshold'])} (memorized) | {s['n_memorized']} of {s['n_samples']} "
        f"({_fmt_fraction(s['fraction_memorized'])}); median ratio {_fmt(s['ratio_median'])} |",
    ]
    if "authenticity" in s:
        a = s["authenticity"]
        lines.append(
            f"| inauthentic (Alaa et al.) | {a['n_inauthentic']} ({_fmt_fraction(a['fraction_inauthentic'])}) |"
        )
    if "heldout" in s:
        lines.append(
            f"| held-out real data, NN ratio < threshold | {_fmt_fraction(s['heldout']['fraction_memorized'])} |"
        )
    if "C_T" in s:
        c = s["C_T"]
        lines.append(
            f"| C_T (Meehan et al.; << 0 copying, ~0 fresh) | {_fmt(c['C_T'])} over {c['cells_used']} of "
            f"{c['n_cells']} cells (sample share > tau = {_fmt(c['tau'])}) |"
        )
    if s.get("index"):
        i = s["index"]
        lines.append(
            f"| index | {i.get('factory')} (recall@{s['k']} on {i.get('recall_sample', 'all')} queries: "
            f"{_fmt(i.get('recall_at_k'))}) |"
        )
    if "C_T" in s:
        lines += ["", f"C_T: {s['C_T']['definition']}."]
    conv = [f"{who}: {c}" for who, cs in (s.get("conversions") or {}).items() for c in cs]
    if conv:
        lines += ["", "Conversions applied on loading:", "", *[f"- {c}" for c in conv]]
    rc = s.get("range_check") or {}
    checked = [who for who in ("samples", "heldout") if who in rc]
    if checked:
        lines.append("")
    for who in checked:
        r, t = rc[who]["range"], rc[who]["train_range"]
        verdict = "MISMATCH, scored anyway" if rc[who]["mismatch"] else "ok"
        lines.append(
            f"Value range of {who}: [{_fmt(r[0])}, {_fmt(r[1])}] against the training range "
            f"[{_fmt(t[0])}, {_fmt(t[1])}]: {verdict}."
        )
    lines += [
        "",
        "`per_sample.csv` / `per_sample.npz` name each sample and its nearest training item by source "
        "(`sample_name`, `nn_name`: file name in a folder or zip, `file:key[row]` for arrays).",
    ]
    lines += ["", "Files: " + ", ".join(f"`{f}`" for f in files), ""]
    lines += [f"![{f}]({f})" for f in files if f.endswith(".png")]
    return "\n".join(lines) + "\n"


def _short(name: Any, width: int = 24) -> str:
    name = str(name)
    return name if len(name) <= width else "..." + name[-(width - 3) :]


def write_score_outputs(result: Any, out_dir: PathLike, samples: Any, train: Any) -> list[str]:
    """Write report.md, summary.json, per_sample.csv, per_sample.npz and the figures of a ScoreResult into
    out_dir; returns the file names."""
    import torch

    out = Path(out_dir)
    per, held, s = result.per_sample, result.heldout, result.summary
    aligned = (getattr(result, "extra", None) or {}).get("samples")  # aligned to the training items' layout
    samples = aligned if aligned is not None else samples
    files = ["summary.json", "per_sample.csv", "per_sample.npz"]
    # the figure's inputs first, so that a failure leaves no per-sample files behind
    label = f"{len(per['ratio'])} samples vs {getattr(train, 'source', 'the training set')} (N={len(train)})"
    vr = tuple(s["value_range"]) if s.get("value_range") else None
    order = np.argsort(np.asarray(per["ratio"]), kind="stable")[:64]
    xs = samples[torch.from_numpy(order)].cpu().numpy()
    nn = train[torch.from_numpy(np.asarray(per["nn_index"])[order, 0])].cpu().numpy()
    if xs.shape != nn.shape and xs[0].size == nn[0].size:  # a flat side: show both in the training items' shape
        xs = xs.reshape(nn.shape)
    if vr is None:
        lo, hi = float(min(xs.min(), nn.min())), float(max(xs.max(), nn.max()))
        vr = (lo, hi if hi > lo else lo + 1.0)
    titles = None
    if "sample_name" in per and "nn_name" in per:
        titles = [f"{_short(per['sample_name'][i])}\n~ {_short(per['nn_name'][i])}" for i in order]
    out.mkdir(parents=True, exist_ok=True)
    nn_grid_figure(
        xs,
        nn,
        np.asarray(per["ratio"])[order],
        out / "nn_grid.png",
        value_range=vr,
        threshold=s["threshold"],
        titles=titles,
        suptitle="Generated samples beside their nearest training points (above: sample name ~ nearest's name)"
        if titles
        else "Generated samples beside their nearest training points",
        n_total=len(per["ratio"]),
        data=label,
    )
    write_score_csv(per, out / "per_sample.csv")
    arrays = {k: v for k, v in per.items()}
    if held is not None:
        arrays.update({f"heldout_{k}": v for k, v in held.items()})
    write_npz_atomic(arrays, out / "per_sample.npz")
    ratios = {"generated": per["ratio"]}
    if held is not None:
        ratios["held-out real"] = held["ratio"]
    ratio_histogram(ratios, out / "ratio_hist.png", threshold=s["threshold"], data=label)
    distance_figure(per, held, out / "nn_dist_hist.png", data=label)
    files += ["nn_grid.png", "ratio_hist.png", "nn_dist_hist.png"]
    if held is not None:
        train_vs_heldout_figure(per, held, result.ct, out / "train_vs_heldout.png", data=label)
        files.append("train_vs_heldout.png")
    write_json_atomic(s, out / "summary.json")
    write_text_atomic(score_report_markdown(s, files), out / "report.md")
    return ["report.md", *files]
